//! `metatrain chaos` end to end, short: workers killed with SIGKILL about every second and restarted; the
//! command must report no task lost and parameters equal to the undisturbed run's, and exit 0.

use std::process::Command;
use std::time::Duration;

use metatrain_tests::*;

#[test]
fn chaos_loses_no_task_and_changes_no_parameter() {
    let dir = scratch("chaos");
    let mut cmd = Command::new(binary("metatrain"));
    cmd.args(["chaos", "--config"])
        .arg(root().join("configs/noisy-linear.toml"))
        .args(["--steps", "150", "--kill-every", "1", "--set", "eval.every=50", "--set", "eval.tasks=20"])
        .args(["--set", "eval.final_tasks=50", "--out"])
        .arg(&dir);
    let (status, lines) = Proc::spawn(&mut cmd, "chaos").finish(Duration::from_secs(600));
    assert!(status.success(), "{status}: {lines:?}");
    let killed: u64 = lines
        .iter()
        .find_map(|l| l.strip_prefix("chaos run: ")?.split(' ').next()?.parse().ok())
        .expect("kill count printed");
    assert!(killed >= 1, "{lines:?}");
    // 150 × 16 training tasks, two periodic evaluations of 20, a final one of 50.
    let needed = 150 * 16 + 2 * 20 + 50;
    assert!(lines.iter().any(|l| l.contains(&format!("of the {needed} the run needs (0 lost)"))), "{lines:?}");
    assert!(lines.iter().any(|l| l.contains("EQUAL to")), "{lines:?}");
    let report = read_report(&dir.join("chaos"));
    assert_eq!(report["params_sha256"], read_report(&dir.join("reference"))["params_sha256"]);
}
