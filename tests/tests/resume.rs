//! Checkpoints and exact resume: a coordinator killed with SIGKILL mid-run, resumed with `--resume`,
//! ends with the same parameters as an uninterrupted run; SIGTERM checkpoints and exits 0; resuming
//! with a config that changes the run is refused with the differing keys named.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use metatrain_tests::*;

const STEPS: u32 = 60;

fn train(args: &[&str]) -> Command {
    let mut cmd = Command::new(binary("metatrain"));
    cmd.arg("train").args(args);
    cmd
}

fn fresh(out: &Path) -> Command {
    let mut cmd = noisy_linear_run(out, STEPS, 5, 2);
    cmd.args(["--set", "checkpoint.every=10"]);
    cmd
}

/// Starts a run and waits until it has done at least `n` meta-steps.
fn start_until(out: &Path, n: f64) -> Proc {
    let mut p = Proc::spawn(&mut fresh(out), "coordinator");
    let m = p.wait_for(Duration::from_secs(30), metrics_address);
    wait_for_steps(&m, n, Duration::from_secs(120));
    p
}

fn finish_ok(mut cmd: Command) -> Vec<String> {
    let (status, lines) = Proc::spawn(&mut cmd, "metatrain").finish(Duration::from_secs(300));
    assert!(status.success(), "{status}");
    lines
}

#[test]
fn sigkill_then_resume_equals_an_uninterrupted_run() {
    let dir = scratch("resume");
    finish_ok(fresh(&dir.join("whole")));
    let whole = read_report(&dir.join("whole"));

    let crashed = dir.join("crashed");
    let p = start_until(&crashed, 25.0);
    p.signal("KILL");
    drop(p);
    assert!(!crashed.join("report.json").exists());
    let lines = finish_ok({
        let mut c = train(&["--resume"]);
        c.arg(&crashed);
        c
    });
    assert!(
        lines.iter().any(|l| l.contains("resuming") && l.contains("step 20")),
        "resumed from the step-20 checkpoint"
    );
    let resumed = read_report(&crashed);
    assert_eq!(resumed["final_step"], STEPS);
    assert_eq!(resumed["params_sha256"], whole["params_sha256"], "resume continues exactly");
    // metrics.csv has each step once.
    let csv = std::fs::read_to_string(crashed.join("metrics.csv")).expect("csv");
    let steps: Vec<u64> = csv
        .lines()
        .skip(1)
        .filter(|l| l.starts_with("train,"))
        .filter_map(|l| l.split(',').nth(1)?.parse().ok())
        .collect();
    assert_eq!(steps, (1..=STEPS as u64).collect::<Vec<_>>());
}

#[test]
fn sigterm_checkpoints_and_an_incompatible_resume_is_refused() {
    let dir = scratch("sigterm");
    let out = dir.join("run");
    let p = start_until(&out, 5.0);
    p.signal("TERM");
    let (status, lines) = p.finish(Duration::from_secs(60));
    assert!(status.success(), "SIGTERM exits 0: {status}");
    assert!(lines.iter().any(|l| l.contains("--resume")), "says how to continue");
    let report = read_report(&out);
    assert_eq!(report["interrupted"], true);
    let stopped_at = report["final_step"].as_u64().expect("final_step");
    assert!(stopped_at >= 5);

    let o = train(&["--resume"])
        .arg(&out)
        .args(["--set", "train.meta_lr=0.5", "--set", "algo.inner_steps=2"])
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("train.meta_lr") && err.contains("algo.inner_steps"), "names what differs: {err}");
    assert!(!err.contains("panicked"));

    // Changing only what does not alter the trajectory is fine: the run continues from the checkpoint.
    let lines = finish_ok({
        let mut c = train(&["--resume"]);
        c.arg(&out).args(["--set", "eval.final_tasks=10"]);
        c
    });
    assert!(lines.iter().any(|l| l.contains(&format!("step {stopped_at}"))), "resumed where it stopped");
    assert_eq!(read_report(&out)["final_step"], STEPS);
}

/// A loopback UDP port that was free a moment ago (for a coordinator that must come back on the same
/// address after a restart).
fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("bind").port()
}

#[test]
fn an_external_worker_rejoins_a_restarted_coordinator() {
    let dir = scratch("rejoin");
    let out = dir.join("run");
    let listen = format!("127.0.0.1:{}", free_udp_port());
    let mut cmd = noisy_linear_run(&out, STEPS, 5, 0);
    cmd.args(["--set", "checkpoint.every=10", "--listen", &listen]);
    let mut p = Proc::spawn(&mut cmd, "coordinator");
    let m = p.wait_for(Duration::from_secs(30), metrics_address);
    let (addr, fp) = p.wait_for(Duration::from_secs(30), coordinator_address);
    let w = Proc::spawn(&mut worker(&addr, &fp, &out.join("tls"), "survivor"), "worker");
    wait_for_steps(&m, 15.0, Duration::from_secs(120));
    p.signal("KILL");
    drop(p);
    // Same address, same TLS directory (so the worker's pinned fingerprint still holds), no local
    // workers: only the surviving worker can finish the run.
    let mut c = train(&["--resume"]);
    c.arg(&out).args(["--listen", &listen, "--local-workers", "0"]);
    finish_ok(c);
    assert_eq!(read_report(&out)["final_step"], STEPS);
    let (status, lines) = w.finish(Duration::from_secs(30));
    assert!(status.success(), "the worker ends cleanly with the run: {status}");
    assert!(lines.iter().any(|l| l.contains("reconnecting")), "the worker said it reconnects");
}

#[test]
fn a_run_stopped_during_its_final_evaluation_resumes_into_it() {
    let dir = scratch("final-eval-resume");
    let out = dir.join("run");
    let mut cmd = noisy_linear_run(&out, 10, 5, 2);
    // Enough held-out tasks that the final evaluation takes a few seconds.
    cmd.args(["--set", "eval.final_tasks=30000"]);
    let mut p = Proc::spawn(&mut cmd, "coordinator");
    p.wait_for(Duration::from_secs(120), |l| l.contains("final evaluation on").then_some(()));
    p.signal("TERM");
    let (status, _) = p.finish(Duration::from_secs(60));
    assert!(status.success());
    let stopped = read_report(&out);
    assert_eq!(stopped["interrupted"], true);
    assert_eq!(stopped["final_step"], 10);
    let lines = finish_ok({
        let mut c = train(&["--resume"]);
        c.arg(&out);
        c
    });
    assert!(lines.iter().any(|l| l.contains("final evaluation on 30000")), "{lines:?}");
    let report = read_report(&out);
    assert_eq!(report["interrupted"], false);
    assert_eq!(report["eval"]["tasks"], 30000);
    // A finished run is not resumed again.
    let o = train(&["--resume"]).arg(&out).output().expect("run");
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already has 10 of 10"));
}

#[test]
fn a_run_stopped_during_a_periodic_evaluation_resumes_exactly() {
    // An adaptive curriculum advances on the periodic evaluations (here at every one after the first),
    // so a resumed run that skipped the interrupted evaluation would draw other tasks from then on.
    let dir = scratch("periodic-eval-resume");
    let run = |out: &Path| {
        let mut cmd = noisy_linear_run(out, 30, 8, 2);
        for set in [
            "eval.every=10",
            "eval.tasks=4000",
            "checkpoint.every=10",
            "curriculum.schedule=\"adaptive\"",
            "curriculum.patience=1",
            "curriculum.min_improvement=0.99",
        ] {
            cmd.args(["--set", set]);
        }
        cmd
    };
    finish_ok(run(&dir.join("whole")));
    let whole = read_report(&dir.join("whole"));

    let out = dir.join("stopped");
    let mut p = Proc::spawn(&mut run(&out), "coordinator");
    let m = p.wait_for(Duration::from_secs(30), metrics_address);
    // At 20 meta-steps the coordinator is in the evaluation of 4000 held-out tasks (seconds long); meta-step
    // 21 cannot start before it ends.
    wait_for_steps(&m, 20.0, Duration::from_secs(120));
    assert_eq!(metric(&scrape(&m), "metatrain_meta_steps_total"), 20.0, "stopped inside the evaluation");
    p.signal("TERM");
    let (status, _) = p.finish(Duration::from_secs(60));
    assert!(status.success());
    assert_eq!(read_report(&out)["final_step"], 20);
    finish_ok({
        let mut c = train(&["--resume"]);
        c.arg(&out);
        c
    });
    let resumed = read_report(&out);
    assert_eq!(resumed["params_sha256"], whole["params_sha256"], "the interrupted evaluation ran again");
    assert_eq!(resumed["curriculum"], whole["curriculum"]);
    let csv = std::fs::read_to_string(out.join("metrics.csv")).expect("csv");
    let evals: Vec<&str> = csv.lines().filter(|l| l.starts_with("eval,")).filter_map(|l| l.split(',').nth(1)).collect();
    assert_eq!(evals, ["10", "20"], "each periodic evaluation once (this run has no final one)");
}
