//! Dirty tasks and the defences against them, on a real local cluster: a run with a curriculum,
//! corrupted tasks, quarantine and a robust reduction is as reproducible as a plain one (1 or 3
//! workers, and across a SIGKILL and `--resume`), and the quarantine finds the corrupted tasks.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use metatrain_tests::*;

const STEPS: u32 = 40;

/// Noisy-linear with 20 % corrupted tasks, an adaptive curriculum (its state must survive a resume),
/// quarantine and a trimmed mean.
fn dirty_run(out: &Path, local_workers: usize) -> Command {
    let mut cmd = noisy_linear_run(out, STEPS, 21, local_workers);
    for set in [
        "eval.every=5",
        "eval.tasks=20",
        "checkpoint.every=10",
        "corrupt.fraction=0.2",
        "curriculum.schedule=\"adaptive\"",
        "curriculum.patience=1",
        "curriculum.min_improvement=0.3",
        "defence.quarantine=\"skip\"",
        "defence.aggregate=\"trimmed-mean\"",
    ] {
        cmd.args(["--set", set]);
    }
    cmd
}

fn finish_ok(mut cmd: Command) -> serde_json::Value {
    let (status, _) = Proc::spawn(&mut cmd, "metatrain").finish(Duration::from_secs(300));
    assert!(status.success(), "{status}");
    let out = cmd.get_args().skip_while(|a| *a != "--out" && *a != "--resume").nth(1).expect("--out or --resume");
    read_report(Path::new(out))
}

#[test]
fn a_dirty_run_with_curriculum_and_defence_is_reproducible_and_resumes_exactly() {
    let dir = scratch("dirty");
    let one = finish_ok(dirty_run(&dir.join("one"), 1));
    let three = finish_ok(dirty_run(&dir.join("three"), 3));
    assert_eq!(one["final_step"], STEPS);
    assert_eq!(one["params_sha256"], three["params_sha256"], "1 worker vs 3 workers");

    let d = &one["defence"];
    let corrupted = d["tasks_corrupted"].as_u64().expect("tasks_corrupted");
    // 640 training tasks at 20 %: the binomial's 99.99 % range is well inside 90..170.
    assert!((90..170).contains(&corrupted), "{d}");
    assert!(d["tasks_quarantined"].as_u64().expect("tasks_quarantined") > 0, "{d}");
    let competence = one["curriculum"]["final_competence"].as_f64().expect("final_competence");
    assert!(competence > 0.2, "the adaptive curriculum advanced from its start of 0.2: {competence}");

    // A coordinator killed mid-run and resumed ends with the same parameters and the same defence record.
    let crashed = dir.join("crashed");
    let mut p = Proc::spawn(&mut dirty_run(&crashed, 2), "coordinator");
    let m = p.wait_for(Duration::from_secs(30), metrics_address);
    wait_for_steps(&m, 25.0, Duration::from_secs(120));
    p.signal("KILL");
    drop(p);
    let mut resume = Command::new(binary("metatrain"));
    resume.arg("train").arg("--resume").arg(&crashed);
    let resumed = finish_ok(resume);
    assert_eq!(resumed["params_sha256"], one["params_sha256"], "resume continues exactly");
    assert_eq!(resumed["defence"], one["defence"]);
    assert_eq!(resumed["curriculum"], one["curriculum"]);
}

#[test]
fn quarantine_finds_tasks_with_huge_targets() {
    let dir = scratch("dirty-huge");
    let mut cmd = noisy_linear_run(&dir.join("run"), STEPS, 4, 2);
    for set in ["corrupt.fraction=0.2", "corrupt.kinds=[\"huge-scale\"]", "defence.quarantine=\"skip\""] {
        cmd.args(["--set", set]);
    }
    let r = finish_ok(cmd);
    let d = &r["defence"];
    // Targets ×100 make losses ×10⁴: far outside any robust z threshold, so nearly every one is caught,
    // and few clean tasks are taken for them.
    let recall = d["quarantine_recall"].as_f64().expect("recall");
    let precision = d["quarantine_precision"].as_f64().expect("precision");
    assert!(recall > 0.95 && precision > 0.8, "{d}");
    let kind = &d["by_kind"]["huge-scale"];
    assert_eq!(kind["corrupted"], d["tasks_corrupted"], "one kind: {d}");
    assert_eq!(kind["recall"], d["quarantine_recall"]);
}
