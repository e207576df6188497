//! deploy/ checked offline: manifests against the Kubernetes schemas, kustomizations, YAML lint, the
//! Prometheus config and the shell scripts (scripts/check_deploy.py); and the Slurm job script run for
//! real on this machine, with `srun` and `scontrol` replaced by stand-ins that start the tasks locally.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use metatrain_tests::*;

/// The tools scripts/test.sh installs; outside CI a missing tool skips the check (with a message).
fn have(tool: &str) -> bool {
    let ok = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().is_ok_and(|o| o.status.success());
    if !ok && std::env::var_os("CI").is_some() {
        panic!("{tool} is required in CI (scripts/test.sh installs it)");
    }
    ok
}

#[test]
fn deploy_files_validate_offline() {
    let pytools = std::env::var("METATRAIN_PYTOOLS")
        .unwrap_or_else(|_| format!("{}/.cache/metatrain/pytools", std::env::var("HOME").unwrap_or_default()));
    let tools_ok = Path::new(&pytools).join("yamllint").is_dir() || std::env::var_os("CI").is_some();
    if !(tools_ok && have("promtool") && have("shellcheck")) {
        eprintln!(
            "SKIPPED: yamllint/kubernetes-validate, promtool or shellcheck missing (scripts/test.sh installs them)"
        );
        return;
    }
    let out = Command::new("python3").arg(root().join("scripts/check_deploy.py")).output().expect("python3");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "deploy/ checks failed:\n{text}");
    assert!(
        text.contains("ok    kubernetes schema kubernetes/jobset/jobset.yaml JobSet/metatrain replicatedJob workers")
    );
    assert!(text.contains("0 failure(s)"));
}

/// Stand-ins for Slurm's commands: `scontrol show hostnames` prints this host; `srun --het-group=G CMD`
/// runs CMD once for group 0 and SLURM_NTASKS_HET_GROUP_1 times (with SLURM_PROCID and SLURM_LOCALID)
/// for group 1.
fn fake_slurm(bin: &Path) {
    std::fs::create_dir_all(bin).expect("mkdir");
    let write = |name: &str, body: &str| {
        let p = bin.join(name);
        std::fs::write(&p, body).expect("write");
        Command::new("chmod").arg("+x").arg(&p).status().expect("chmod");
    };
    write("scontrol", "#!/bin/sh\necho 127.0.0.1\n");
    write(
        "srun",
        r#"#!/bin/bash
group=0
while [[ $1 == --* ]]; do [[ $1 == --het-group=* ]] && group=${1#--het-group=}; shift; done
if [ "$group" = 0 ]; then exec "$@"; fi
pids=()
for ((i = 0; i < SLURM_NTASKS_HET_GROUP_1; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@" & pids+=($!); done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
"#,
    );
}

#[test]
fn the_slurm_script_runs_a_cluster_and_resumes() {
    let dir = scratch("slurm");
    let bin = dir.join("bin");
    fake_slurm(&bin);
    let port = std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("bind").port();
    let sbatch = |steps: &str| {
        let mut cmd = Command::new("bash");
        cmd.arg(root().join("deploy/slurm/metatrain.sbatch"))
            .arg(root().join("configs/noisy-linear.toml"))
            .args(["--steps", steps, "--set", "eval.every=0", "--set", "eval.final_tasks=20"])
            .env("PATH", format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
            .env("METATRAIN_HOME", root())
            .env("METATRAIN_BIN", binary("metatrain").parent().expect("bin dir"))
            .env("RUN_DIR", dir.join("run"))
            .env("TLS_DIR", dir.join("tls"))
            .env("METATRAIN_PORT", port.to_string())
            .env("METATRAIN_METRICS_PORT", "0")
            .env("METATRAIN_WORKER_METRICS_PORT", "0")
            .env("METATRAIN_DEVICE", "cpu")
            .env("SLURM_NTASKS_HET_GROUP_1", "2")
            .env("SLURM_JOB_NODELIST_HET_GROUP_0", "localhost");
        let (status, lines) = Proc::spawn(&mut cmd, "sbatch").finish(Duration::from_secs(300));
        assert!(status.success(), "{status}");
        lines
    };
    let lines = sbatch("10");
    assert!(lines.iter().any(|l| l.contains("2 worker(s)")), "{lines:?}");
    let report = read_report(&dir.join("run"));
    assert_eq!(report["final_step"], 10);
    assert_eq!(report["max_workers"], 2, "both worker ranks joined");
    assert!(dir.join("tls/workers/worker-1.crt").exists(), "one certificate per rank");
    // Resubmitting with more steps continues the run from its checkpoint.
    let lines = sbatch("15");
    assert!(lines.iter().any(|l| l.contains("resuming")), "{lines:?}");
    assert_eq!(read_report(&dir.join("run"))["final_step"], 15);
}
