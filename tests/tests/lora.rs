//! LoRA meta-learning on the cluster: a short run exports a base model; a LoRA run over it meta-learns
//! only rank-r adapters, which alone travel (the report's wire bytes say so), and a base file other
//! than the one the run was pinned to is refused.

use std::process::Command;
use std::time::Duration;

use metatrain_tests::*;

fn sinusoid(out: &std::path::Path, steps: u32, extra: &[String]) -> Command {
    let mut cmd = Command::new(binary("metatrain"));
    cmd.args(["train", "--config"])
        .arg(root().join("configs/sinusoid.toml"))
        .args(["--steps", &steps.to_string(), "--set", "eval.every=0", "--set", "eval.final_tasks=50"])
        .args(["--set", "train.meta_batch=8", "--local-workers", "2", "--out"])
        .arg(out);
    for s in extra {
        cmd.args(["--set", s]);
    }
    cmd
}

#[test]
fn lora_meta_learns_only_the_adapters_and_only_they_travel() {
    let dir = scratch("lora");
    let (status, _) = Proc::spawn(&mut sinusoid(&dir.join("base"), 30, &[]), "base").finish(Duration::from_secs(300));
    assert!(status.success());
    let base_file = dir.join("base/params.safetensors");
    let lora = |out: &str, extra: &[&str]| {
        let mut sets = vec!["model.lora_rank=4".to_string(), format!("model.lora_base={}", base_file.display())];
        sets.extend(extra.iter().map(|s| s.to_string()));
        sinusoid(&dir.join(out), 30, &sets)
    };
    let (status, lines) = Proc::spawn(&mut lora("lora", &[]), "lora").finish(Duration::from_secs(300));
    assert!(status.success(), "{lines:?}");
    let full = read_report(&dir.join("base"));
    let r = read_report(&dir.join("lora"));
    // Adapters of the 1 → 40 → 40 → 1 MLP at rank 4: (4·1 + 40·4) + (4·40 + 40·4) + (4·40 + 1·4) = 648.
    let adapters = 648u64;
    let tasks = r["tasks_completed"].as_u64().unwrap() - 50; // minus the final evaluation's
    assert_eq!(r["wire"]["gradients_received_bytes"].as_u64(), Some(tasks * adapters * 4));
    let per_step = |rep: &serde_json::Value| rep["wire"]["bytes_per_meta_step"].as_f64().unwrap();
    println!(
        "bytes per meta-step: full model {} (1761 parameters), LoRA rank 4 {} ({adapters} adapter values): {:.2}×",
        per_step(&full),
        per_step(&r),
        per_step(&full) / per_step(&r)
    );
    // Same steps, workers and tasks: the bytes scale with the values that travel (1761 / 648 = 2.72),
    // give or take the parameter copies, which depend on how tasks spread over the two workers and on
    // duplicated stragglers.
    let ratio = per_step(&full) / per_step(&r);
    assert!((2.3..3.2).contains(&ratio), "{ratio}");
    assert!(r["config"]["model"]["lora_base_sha256"].as_str().is_some_and(|h| h.len() == 64));
    assert!(r["eval"]["post_adapt_loss"].as_f64().is_some_and(f64::is_finite));
    // The exported initialisation holds the adapters only.
    let bytes = std::fs::read(dir.join("lora/params.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().cloned().collect();
    names.sort();
    assert_eq!(names.len(), 6);
    assert!(names.iter().all(|n| n.starts_with("lora.")), "{names:?}");

    // `metatrain adapt` adapts the adapters over the same base.
    let rows = |n: usize, shift: f64| {
        let mut s = String::from("x,y\n");
        for i in 0..n {
            let x = -5.0 + 10.0 * (i as f64 + shift) / n as f64;
            s += &format!("{x},{}\n", 2.0 * (x + 0.5).sin());
        }
        s
    };
    std::fs::write(dir.join("support.csv"), rows(10, 0.0)).unwrap();
    std::fs::write(dir.join("query.csv"), rows(10, 0.5)).unwrap();
    let o = Command::new(binary("metatrain"))
        .args(["adapt", "--params"])
        .arg(dir.join("lora/params.safetensors"))
        .args(["--support", "support.csv", "--query", "query.csv", "--out", "pred.csv"])
        .current_dir(&dir)
        .output()
        .expect("adapt");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("query MSE on 10 labelled rows"), "{stdout}");

    // An output directory whose params.safetensors is the base: refused, and the base survives.
    std::fs::create_dir_all(dir.join("lb")).unwrap();
    std::fs::copy(&base_file, dir.join("lb/params.safetensors")).unwrap();
    let own = format!("model.lora_base={}", dir.join("lb/params.safetensors").display());
    let o = sinusoid(&dir.join("lb"), 3, &["model.lora_rank=2".into(), own]).output().expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("would overwrite the LoRA base"), "{err}");
    assert_eq!(std::fs::read(dir.join("lb/params.safetensors")).unwrap(), std::fs::read(&base_file).unwrap());

    // Pinned to another file's hash: refused before anything runs.
    let wrong = format!("model.lora_base_sha256={}", "0".repeat(64));
    let o = lora("wrong", &[&wrong]).output().expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("SHA-256") && !err.contains("panicked"), "{err}");
    // A base of another model: refused with the tensor named.
    let o = lora("other", &["model.name=mlp-ln"]).output().expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("LoRA base") && !err.contains("panicked"), "{err}");
}
