//! A local cluster (the embedded default: 2 worker processes over real QUIC) learns the sinusoid task,
//! and leaves the documented outputs.

use std::process::Command;
use std::time::Duration;

use metatrain_tests::{binary, read_report, root, scratch, Proc};

#[test]
fn local_cluster_learns_sinusoid_and_writes_its_outputs() {
    let out = scratch("local-cluster").join("run");
    let steps = 300;
    let mut cmd = Command::new(binary("metatrain"));
    cmd.arg("train")
        .arg("--config")
        .arg(root().join("configs/sinusoid.toml"))
        .arg("--steps")
        .arg(steps.to_string())
        .args(["--set", "eval.every=100", "--set", "eval.tasks=50", "--set", "eval.final_tasks=200"])
        .arg("--local-workers")
        .arg("2")
        .arg("--out")
        .arg(&out);
    let (status, lines) = Proc::spawn(&mut cmd, "metatrain").finish(Duration::from_secs(300));
    assert!(status.success(), "train failed: {status}");
    assert!(lines.iter().any(|l| l.contains("params_sha256")), "summary printed");

    let report = read_report(&out);
    assert_eq!(report["final_step"], steps);
    assert_eq!(report["interrupted"], false);
    assert_eq!(report["max_workers"], 2, "both local workers joined");
    assert_eq!(report["tasks_completed"], steps * 25 + 2 * 50 + 200, "25 per step + evaluations");
    let eval = &report["eval"];
    assert_eq!(eval["tasks"], 200);
    let pre = eval["pre_adapt_loss"].as_f64().expect("pre_adapt_loss");
    let post = eval["post_adapt_loss"].as_f64().expect("post_adapt_loss");
    let ci = eval["post_adapt_loss_ci95"].as_f64().expect("ci");
    println!("held-out: pre {pre:.3}, post {post:.3} ± {ci:.3}");
    assert!(post < 0.7 * pre, "adaptation must clearly help after {steps} steps: pre {pre}, post {post}");
    assert!(post + ci < pre, "the improvement exceeds the CI");
    assert_eq!(report["config"]["algo"]["name"], "maml");
    assert_eq!(report["params_sha256"].as_str().map(str::len), Some(64));

    // metrics.csv: a header, one row per step, one per periodic and final evaluation.
    let csv = std::fs::read_to_string(out.join("metrics.csv")).expect("metrics.csv");
    let rows: Vec<&str> = csv.lines().collect();
    assert!(rows[0].starts_with("kind,step,"));
    assert_eq!(rows.iter().filter(|r| r.starts_with("train,")).count(), steps as usize);
    assert_eq!(rows.iter().filter(|r| r.starts_with("eval,")).count(), 3);

    // params.safetensors holds the model's tensors, and hashes to params_sha256.
    let bytes = std::fs::read(out.join("params.safetensors")).expect("params.safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    let spec = metatrain_common::layout::ModelSpec {
        kind: metatrain_common::config::ModelKind::Mlp,
        in_features: 1,
        outputs: 1,
    };
    let mut flat = Vec::new();
    for p in spec.layout().params {
        let t = st.tensor(&p.name).unwrap_or_else(|_| panic!("{} missing", p.name));
        assert_eq!(t.shape(), p.shape.as_slice());
        flat.extend(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
    }
    assert_eq!(Some(metatrain_common::layout::params_sha256(&flat).as_str()), report["params_sha256"].as_str());
}

#[test]
fn a_bad_config_is_refused_with_the_field_named() {
    let dir = scratch("bad-config");
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "[train]\nmeta_batch = 0\n").expect("write");
    let out = Command::new(binary("metatrain"))
        .args(["train", "--local-workers", "0", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("train.meta_batch"), "{err}");
    let out = Command::new(binary("metatrain"))
        .args(["train", "--local-workers", "0", "--set", "model.name=resnet", "--out"])
        .arg(dir.join("run2"))
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("mlp-ln") && err.contains("conv4"), "allowed values listed: {err}");
}

#[test]
fn omniglot_conv4_runs_on_real_images_and_reports_accuracy() {
    // A short run on the real Omniglot arrays (../shared/data): the classification path end to end —
    // episodes from both splits, conv4 with batch norm, accuracy in the report and metrics.csv.
    let out = scratch("omniglot").join("run");
    let steps = 20;
    let mut cmd = Command::new(binary("metatrain"));
    cmd.arg("train")
        .arg("--config")
        .arg(root().join("configs/omniglot-5w1s.toml"))
        .arg("--steps")
        .arg(steps.to_string())
        .args(["--set", "train.meta_batch=8", "--set", "eval.every=10", "--set", "eval.tasks=20"])
        .args(["--set", "eval.final_tasks=100", "--local-workers", "2", "--out"])
        .arg(&out);
    let (status, _) = Proc::spawn(&mut cmd, "metatrain").finish(Duration::from_secs(600));
    assert!(status.success(), "train failed: {status}");
    let report = read_report(&out);
    assert_eq!(report["final_step"], steps);
    let eval = &report["eval"];
    assert_eq!(eval["tasks"], 100);
    let pre = eval["pre_adapt_accuracy"].as_f64().expect("pre_adapt_accuracy");
    let post = eval["accuracy"].as_f64().expect("accuracy");
    let ci = eval["accuracy_ci95"].as_f64().expect("accuracy_ci95");
    println!("held-out 5-way 1-shot after {steps} steps: {pre:.3} before, {post:.3} ± {ci:.3} after adaptation");
    // Before adapting, labels are a random assignment of classes to outputs: chance, 20 %. Three inner
    // steps on one image per class must beat that by more than the CI even this early.
    assert!((0.0..=1.0).contains(&pre) && (0.0..=1.0).contains(&post));
    assert!(post - ci > 0.2 && post > pre, "adaptation must help: {pre} → {post} ± {ci}");
    let csv = std::fs::read_to_string(out.join("metrics.csv")).expect("metrics.csv");
    let eval_rows: Vec<&str> = csv.lines().filter(|l| l.starts_with("eval,")).collect();
    assert_eq!(eval_rows.len(), 2, "one periodic and the final evaluation: {eval_rows:?}");
    assert!(eval_rows.iter().all(|r| r.split(',').nth(5).is_some_and(|a| a.parse::<f64>().is_ok())), "accuracy column");
}

#[test]
fn a_diverging_run_stops_with_the_reason_and_leaves_a_loadable_checkpoint() {
    let dir = scratch("diverged");
    let out = dir.join("run");
    let mut cmd = metatrain_tests::noisy_linear_run(&out, 20, 1, 2);
    cmd.args(["--set", "train.meta_lr=1e39"]);
    let (status, lines) = Proc::spawn(&mut cmd, "metatrain").finish(Duration::from_secs(120));
    assert!(!status.success());
    assert!(lines.iter().any(|l| l.contains("diverged") && l.contains("meta-step 0")), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("panicked") || l.contains("workers exited")), "{lines:?}");
    // The checkpoint holds the last finite state: resuming it reaches the same divergence, not a load error.
    let o = Command::new(binary("metatrain")).args(["train", "--resume"]).arg(&out).output().expect("resume");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("diverged") && !err.contains("damaged"), "{err}");
}
