#!/usr/bin/env python3
"""Lake's 20 official Omniglot one-shot runs, scored with `metatrain adapt`.

Each run of ../shared/data/omniglot/all_runs.zip is a 20-way one-shot episode: 20 training images (one per
class, all from the evaluation split) and 20 test images, matched by class_labels.txt. For every episode
this script lays the images out as folders (support/<class>/x.png, query/<class>/y.png), runs
`metatrain adapt` with the given meta-initialisation, and reads the accuracy it prints.

  --way 20   the official episodes (needs a model meta-trained for 20-way tasks, task.n_way = 20);
  --way 5    each run's 20 classes split into 4 groups of 5 (80 five-way episodes; not Lake's protocol,
             but the same held-out images for a 5-way model).

Prints each episode's accuracy, then the mean over episodes with a 95 % interval (normal approximation
over episodes). Standard library only (no torch needed).

  scripts/lake_runs.py --params runs/omniglot-5w1s/params.safetensors --way 5
"""
import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def data_zip():
    for d in (os.environ.get("METATRAIN_DATA_DIR"), os.path.join(ROOT, "shared/data"), os.path.join(ROOT, "../shared/data")):
        if d and os.path.isfile(os.path.join(d, "omniglot/all_runs.zip")):
            return os.path.join(d, "omniglot/all_runs.zip")
    sys.exit("error: cannot find omniglot/all_runs.zip under $METATRAIN_DATA_DIR, shared/data or ../shared/data")


def metatrain():
    beside = os.path.join(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release/metatrain")
    return beside if os.path.isfile(beside) else shutil.which("metatrain") or sys.exit("error: build first (scripts/setup.sh)")


def episodes(z, way):
    """Yields (name, [(class, train_png_bytes, [test_png_bytes])]) per episode."""
    runs = sorted({n.split("/")[0] for n in z.namelist() if re.match(r"run\d\d/class_labels.txt$", n)})
    for run in runs:
        pairs = {}
        for line in z.read(f"{run}/class_labels.txt").decode().split("\n"):
            if line.strip():
                test, train = line.split()
                pairs.setdefault(train, []).append(test)
        classes = sorted(pairs)
        if len(classes) != 20:
            sys.exit(f"error: {run} has {len(classes)} classes, expected 20")
        groups = [classes] if way == 20 else [classes[i:i + way] for i in range(0, 20, way)]
        for g, group in enumerate(groups):
            yield f"{run}" + ("" if way == 20 else f"-{g}"), [
                (os.path.basename(c)[:-4], z.read(c), [z.read(t) for t in pairs[c]]) for c in group]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", required=True, help="a run's params.safetensors (conv4, Omniglot)")
    ap.add_argument("--way", type=int, choices=(5, 20), default=20)
    ap.add_argument("--steps", type=int, help="adaptation steps (default: the run's eval.inner_steps)")
    ap.add_argument("--config", help="the run's config, for a params file that does not carry one")
    args = ap.parse_args()
    accs = []
    with zipfile.ZipFile(data_zip()) as z, tempfile.TemporaryDirectory() as tmp:
        for name, classes in episodes(z, args.way):
            ep = os.path.join(tmp, name)
            for cls, train, tests in classes:
                os.makedirs(os.path.join(ep, "support", cls))
                os.makedirs(os.path.join(ep, "query", cls))
                open(os.path.join(ep, "support", cls, "train.png"), "wb").write(train)
                for i, t in enumerate(tests):
                    open(os.path.join(ep, "query", cls, f"test{i}.png"), "wb").write(t)
            cmd = [metatrain(), "adapt", "--params", args.params, "--support", os.path.join(ep, "support"),
                   "--query", os.path.join(ep, "query"), "--out", os.path.join(ep, "pred.csv")]
            if args.steps is not None:
                cmd += ["--steps", str(args.steps)]
            if args.config is not None:
                cmd += ["--config", args.config]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"error: {name}: {p.stderr.strip()}")
            m = re.search(r"→ ([0-9.]+)% ± [0-9.]+% after", p.stdout)
            if not m:
                sys.exit(f"error: {name}: no accuracy in the output:\n{p.stdout}")
            accs.append(float(m.group(1)))
            print(f"{name}: {accs[-1]:.2f}%", flush=True)
    n = len(accs)
    mean = sum(accs) / n
    sd = math.sqrt(sum((a - mean) ** 2 for a in accs) / (n - 1)) if n > 1 else 0.0
    print(f"Lake's one-shot runs, {args.way}-way, {n} episodes: {mean:.2f}% ± {1.96 * sd / math.sqrt(n):.2f}% (95 % CI over episodes)")


if __name__ == "__main__":
    main()
