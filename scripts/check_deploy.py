#!/usr/bin/env python3
"""Validates deploy/ offline: YAML lint, Kubernetes schemas, kustomizations, Prometheus config, shell
scripts and the Grafana files. Needs the tools scripts/test.sh installs (yamllint, kubernetes-validate
under ~/.cache/metatrain/pytools; promtool; shellcheck). Prints one line per check; exits 1 on any failure.

Usage: scripts/check_deploy.py [DEPLOY_DIR]
"""

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TOOLS = Path(os.environ.get("METATRAIN_PYTOOLS", Path.home() / ".cache/metatrain/pytools"))
sys.path.insert(0, str(TOOLS))
import yaml  # noqa: E402  (installed with yamllint into TOOLS)

KUBERNETES_VERSION = "1.33"
# Top-level fields of a JobSet (jobset.x-k8s.io/v1alpha2); its Job templates are validated as Jobs.
JOBSET_SPEC_FIELDS = {
    "replicatedJobs", "network", "successPolicy", "failurePolicy", "startupPolicy", "suspend",
    "coordinator", "managedBy", "ttlSecondsAfterFinished",
}
failures = []


def check(name, ok, detail=""):
    print(("ok    " if ok else "FAIL  ") + name + (f": {detail}" if detail and not ok else ""))
    if not ok:
        failures.append(name)


def run(cmd, **kw):
    env = dict(os.environ, PYTHONPATH=str(TOOLS))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, **kw)


def docs(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def validate_k8s(label, doc):
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(doc, f)
    r = run([sys.executable, "-m", "kubernetes_validate", "--strict", "-k", KUBERNETES_VERSION, f.name])
    os.unlink(f.name)
    check(f"kubernetes schema {label}", r.returncode == 0, (r.stdout + r.stderr).strip())


def main():
    deploy = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent / "deploy")
    yamls = sorted(p for p in deploy.rglob("*") if p.suffix in (".yaml", ".yml"))

    lint_config = "{extends: default, rules: {line-length: {max: 120}, document-start: disable, truthy: {check-keys: false}}}"
    r = run([sys.executable, "-m", "yamllint", "-d", lint_config, *map(str, yamls)])
    check(f"yamllint ({len(yamls)} files)", r.returncode == 0, r.stdout.strip())

    k8s = deploy / "kubernetes"
    for path in sorted(k8s.rglob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in docs(path):
            label = f"{path.relative_to(deploy)} {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            if doc.get("kind") == "JobSet":
                extra = set(doc["spec"]) - JOBSET_SPEC_FIELDS
                check(f"JobSet fields {label}", not extra, f"unknown fields {extra}")
                for rj in doc["spec"]["replicatedJobs"]:
                    job = {"apiVersion": "batch/v1", "kind": "Job",
                           "metadata": {"name": f"{doc['metadata']['name']}-{rj['name']}"},
                           "spec": copy.deepcopy(rj["template"]["spec"])}
                    validate_k8s(f"{label} replicatedJob {rj['name']} (as a Job)", job)
            else:
                validate_k8s(label, doc)

    for kust in sorted(k8s.rglob("kustomization.yaml")):
        k = docs(kust)[0]
        base = kust.parent
        refs = list(k.get("resources", []))
        for gen in k.get("configMapGenerator", []):
            refs += [f.split("=", 1)[-1] for f in gen.get("files", [])]
        missing = [r for r in refs if not (base / r).exists()]
        check(f"kustomization {kust.relative_to(deploy)} references exist", not missing, f"missing {missing}")
        for patch in k.get("patches", []):
            target = patch["target"]
            found = [d for p in resolve(base) for d in docs(p)
                     if d.get("kind") == target["kind"] and d["metadata"]["name"] == target["name"]]
            ok = len(found) == 1
            for op in yaml.safe_load(patch["patch"]) if ok else []:
                node = found[0]
                for part in op["path"].strip("/").split("/"):
                    node = node[int(part)] if isinstance(node, list) else node.get(part) if node else None
                ok = ok and node is not None
            check(f"kustomization {kust.relative_to(deploy)} patches apply to existing fields", ok)

    # Render every variant as kubectl would apply it (where kubectl is installed) and check that each
    # ConfigMap a pod mounts is one the render creates (kustomize renames generated ConfigMaps only in
    # the kinds it knows; a JobSet is not one of them).
    if shutil.which("kubectl"):
        for kust in sorted(k8s.rglob("kustomization.yaml")):
            if kust.parent.name == "base":
                continue
            r = run(["kubectl", "kustomize", str(kust.parent)])
            label = f"kubectl kustomize {kust.parent.relative_to(deploy)}"
            check(label, r.returncode == 0, r.stderr.strip())
            if r.returncode != 0:
                continue
            rendered = [d for d in yaml.safe_load_all(r.stdout) if d]
            made = {d["metadata"]["name"] for d in rendered if d.get("kind") == "ConfigMap"}
            mounted = set(configmap_refs(rendered))
            check(f"{label}: mounted ConfigMaps exist", mounted and mounted <= made, f"mounts {mounted}, creates {made}")
    else:
        print("skip  kubectl kustomize renders (kubectl not installed)")

    r = run(["promtool", "check", "config", str(deploy / "prometheus/prometheus.yml")])
    check("promtool check config prometheus.yml", r.returncode == 0, (r.stdout + r.stderr).strip())

    scripts = [deploy / "slurm/metatrain.sbatch", k8s / "base/start-coordinator.sh"]
    for s in scripts:
        r = run(["bash", "-n", str(s)])
        check(f"bash -n {s.relative_to(deploy)}", r.returncode == 0, r.stderr.strip())
    r = run(["shellcheck", *map(str, scripts)])
    check("shellcheck", r.returncode == 0, r.stdout.strip())

    dash = json.loads((deploy / "grafana/dashboards/metatrain.json").read_text())
    ids = [p["id"] for p in dash["panels"]]
    check("dashboard panel ids unique", len(ids) == len(set(ids)))
    names = {v["name"] for v in dash["templating"]["list"]}
    check("dashboard has datasource, job and instance variables", {"datasource", "job", "instance"} <= names)
    bad = [p["title"] for p in dash["panels"] if p["type"] != "row"
           and (p["datasource"].get("uid") != "${datasource}" or not p.get("targets"))]
    check("every panel uses the templated datasource and has queries", not bad, f"{bad}")
    provider = docs(deploy / "grafana/provisioning/dashboards/metatrain.yaml")[0]
    check("dashboard provider is a file provider", provider["providers"][0]["type"] == "file")
    ds = docs(deploy / "grafana/provisioning/datasources/prometheus.yaml")[0]
    check("datasource is Prometheus", ds["datasources"][0]["type"] == "prometheus")

    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


def configmap_refs(node):
    """Names of ConfigMaps referenced by `configMap: {name: ...}` volumes anywhere under node."""
    if isinstance(node, dict):
        if isinstance(node.get("configMap"), dict) and "name" in node["configMap"]:
            yield node["configMap"]["name"]
        for v in node.values():
            yield from configmap_refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from configmap_refs(v)


def resolve(base):
    """The manifest files a kustomization directory includes, recursively."""
    k = docs(base / "kustomization.yaml")[0]
    out = []
    for r in k.get("resources", []):
        p = base / r
        out += resolve(p) if p.is_dir() else [p]
    return out


if __name__ == "__main__":
    sys.exit(main())
