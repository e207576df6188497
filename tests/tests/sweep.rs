//! `metatrain sweep`: a grid plus a listed run, queued on one shared pool of local workers; each run
//! gets its own directory and report, the summary table and comparison plot are written, and running
//! the same sweep again skips what is finished.

use std::process::Command;
use std::time::Duration;

use metatrain_tests::*;

#[test]
fn a_sweep_runs_every_configuration_on_one_worker_pool_and_skips_finished_runs() {
    let dir = scratch("sweep");
    let sweep = dir.join("sweep.toml");
    std::fs::write(
        &sweep,
        format!(
            r#"base = "{}"
[set]
"train.steps" = 6
"eval.every" = 0
"eval.final_tasks" = 40
[grid]
"algo.name" = ["maml", "fomaml"]
[[runs]]
name = "plain-mlp"
set = {{ "model.name" = "mlp" }}
"#,
            root().join("configs/noisy-linear.toml").display()
        ),
    )
    .expect("write sweep");
    let out = dir.join("out");
    let sweep_cmd = || {
        let mut c = Command::new(binary("metatrain"));
        c.arg("sweep").arg("--config").arg(&sweep).arg("--out").arg(&out).args(["--local-workers", "2"]);
        c
    };
    let (status, lines) = Proc::spawn(&mut sweep_cmd(), "sweep").finish(Duration::from_secs(300));
    assert!(status.success(), "{status}");
    let names = ["r00-name=maml", "r01-name=fomaml", "plain-mlp"];
    for name in names {
        let report = read_report(&out.join(name));
        assert_eq!(report["final_step"], 6, "{name}");
        assert_eq!(report["max_workers"], 2, "{name}: the pool's two workers served this run too");
        assert!(out.join(name).join("loss.png").exists());
    }
    let csv = std::fs::read_to_string(out.join("summary.csv")).expect("summary.csv");
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.lines().skip(1).all(|l| l.contains(",done,")), "{csv}");
    let md = std::fs::read_to_string(out.join("summary.md")).expect("summary.md");
    assert!(md.contains("| plain-mlp |") && md.contains("`algo.name`"), "{md}");
    assert!(lines.iter().any(|l| l.contains("| r01-name=fomaml | fomaml |")), "the table is printed");
    let png = std::fs::read(out.join("comparison.png")).expect("comparison.png");
    assert_eq!(&png[..4], b"\x89PNG");
    // The two algorithms give different parameters; the listed run another model altogether.
    let sha = |n: &str| read_report(&out.join(n))["params_sha256"].clone();
    assert_ne!(sha(names[0]), sha(names[1]));

    let (status, lines) = Proc::spawn(&mut sweep_cmd(), "sweep again").finish(Duration::from_secs(120));
    assert!(status.success());
    assert_eq!(lines.iter().filter(|l| l.contains("finished earlier, skipped")).count(), 3, "{lines:?}");

    // An edited sweep file does not pass off the old results as the new runs'.
    let text = std::fs::read_to_string(&sweep).expect("read sweep");
    std::fs::write(&sweep, text.replace("\"eval.final_tasks\" = 40", "\"eval.final_tasks\" = 41")).expect("edit");
    let o = sweep_cmd().output().expect("sweep edited");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("another config") && err.contains("eval.final_tasks"), "{err}");
}

#[test]
fn a_sweep_with_seeds_compares_groups_over_seeds() {
    let dir = scratch("sweep-seeds");
    let sweep = dir.join("sweep.toml");
    let base = root().join("configs/noisy-linear.toml");
    let text = format!(
        "base = \"{}\"\nseeds = [1, 2]\n[set]\n\"train.steps\" = 4\n\"eval.every\" = 0\n\"eval.final_tasks\" = 30\n[[runs]]\nname = \"a\"\n[[runs]]\nname = \"b\"\nset = {{ \"algo.name\" = \"fomaml\" }}\n",
        base.display()
    );
    std::fs::write(&sweep, text).expect("write sweep");
    let out = dir.join("out");
    let mut cmd = Command::new(binary("metatrain"));
    cmd.arg("sweep").arg("--config").arg(&sweep).arg("--out").arg(&out).args(["--local-workers", "1"]);
    let (status, _) = Proc::spawn(&mut cmd, "sweep").finish(Duration::from_secs(300));
    assert!(status.success(), "{status}");
    // Each replicate ran with its own seed.
    assert_eq!(read_report(&out.join("a-seed=2"))["config"]["seed"], 2);
    assert_ne!(
        read_report(&out.join("a-seed=1"))["params_sha256"],
        read_report(&out.join("a-seed=2"))["params_sha256"]
    );
    let groups = std::fs::read_to_string(out.join("summary-groups.csv")).expect("summary-groups.csv");
    let rows: Vec<Vec<&str>> = groups.lines().skip(1).map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.iter().map(|r| (r[0], r[1], r[2])).collect::<Vec<_>>(), [("a", "2", "2"), ("b", "2", "2")]);
    // The group's mean is the mean of its replicates' reports.
    let post = |n: &str| read_report(&out.join(n))["eval"]["post_adapt_loss"].as_f64().expect("post");
    let mean: f64 = rows[0][5].parse().expect("mean");
    assert!((mean - (post("a-seed=1") + post("a-seed=2")) / 2.0).abs() < 1e-5, "{groups}");
    let md = std::fs::read_to_string(out.join("summary.md")).expect("summary.md");
    assert!(md.contains("## Over seeds") && md.contains("| b | 2/2 |"), "{md}");
}

#[test]
fn a_bad_sweep_is_refused_before_anything_runs() {
    let dir = scratch("sweep-bad");
    let sweep = dir.join("sweep.toml");
    std::fs::write(
        &sweep,
        format!(
            "base = \"{}\"\n[grid]\n\"train.meta_lr\" = [0.001, -1.0]\n",
            root().join("configs/noisy-linear.toml").display()
        ),
    )
    .expect("write");
    let o = Command::new(binary("metatrain"))
        .arg("sweep")
        .arg("--config")
        .arg(&sweep)
        .arg("--out")
        .arg(dir.join("out"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("r01-meta_lr=-1.0") && err.contains("train.meta_lr"), "names the run and the field: {err}");
    assert!(!dir.join("out").exists(), "nothing was started");
}
