use super::*;

#[test]
fn empty_config_is_the_default_and_valid() {
    let c = Config::from_toml("").unwrap();
    assert_eq!(c, Config::default());
}

#[test]
fn overrides_apply_and_are_typed() {
    let c = Config::from_toml_with_overrides(
        "[task]\ndistribution = \"noisy-linear\"\n",
        &["train.meta_lr=0.01".into(), "model.name=mlp-ln".into(), "seed=7".into()],
    )
    .unwrap();
    assert_eq!(c.train.meta_lr, 0.01);
    assert_eq!(c.model.name, ModelKind::MlpLn);
    assert_eq!(c.seed, 7);
    assert_eq!(c.task, TaskConfig::NoisyLinear(RegressionTaskConfig { support: 30, query: 20 }));
}

#[test]
fn errors_name_the_field() {
    let e = Config::from_toml_with_overrides("", &["train.meta_batch=0".into()]).unwrap_err();
    assert!(e.to_string().contains("train.meta_batch"), "{e}");
    let e = Config::from_toml("[train]\nmeta_btch = 3\n").unwrap_err();
    assert!(e.to_string().contains("meta_btch"), "{e}");
    let e = Config::from_toml("[model]\nname = \"resnet\"\n").unwrap_err();
    assert!(e.to_string().contains("mlp-ln"), "allowed values listed: {e}");
    let e = Config::from_toml("[task]\ndistribution = \"omniglot\"\n").unwrap_err();
    assert!(e.to_string().contains("model.name"), "{e}");
    let e = Config::from_toml_with_overrides("", &["nonsense".into()]).unwrap_err();
    assert!(matches!(e, ConfigError::BadOverride(_)));
}

#[test]
fn out_of_range_values_are_refused_before_they_can_overflow_or_starve() {
    for bad in
        ["task_timeout_secs=1e300", "task_timeout_secs=1e19", "task_timeout_secs=nan", "task_timeout_secs=1e-300"]
            .map(|s| format!("cluster.{s}"))
    {
        let e = Config::from_toml_with_overrides("", std::slice::from_ref(&bad)).unwrap_err();
        assert!(e.to_string().contains("cluster.task_timeout_secs"), "{bad}: {e}");
    }
    let omniglot = "[task]\ndistribution = \"omniglot\"\n[model]\nname = \"conv4\"\n";
    let e = Config::from_toml_with_overrides(omniglot, &["task.n_way=660".into()]).unwrap_err();
    assert!(e.to_string().contains("659"), "{e}");
    assert!(Config::from_toml_with_overrides(omniglot, &["task.n_way=659".into()]).is_ok());
}

#[test]
fn memory_budgets_are_checked_and_do_not_block_a_resume() {
    for (bad, key) in [
        ("cluster.receive_memory_mb=0", "cluster.receive_memory_mb"),
        ("cluster.receive_memory_mb=2000000000", "cluster.receive_memory_mb"),
        ("cluster.reorder_memory_mb=2000000000", "cluster.reorder_memory_mb"),
        ("cluster.reorder_memory_mb=-1", "reorder_memory_mb"),
        ("cluster.spill_dir=\"\"", "cluster.spill_dir"),
    ] {
        let e = Config::from_toml_with_overrides("", &[bad.to_string()]).unwrap_err();
        assert!(e.to_string().contains(key), "{bad}: {e}");
    }
    let c = Config::from_toml_with_overrides(
        "",
        &["cluster.reorder_memory_mb=0".into(), "cluster.spill_dir=\"/var/tmp/mt\"".into()],
    )
    .unwrap();
    assert_eq!(c.cluster.reorder_memory_bytes(), 0);
    assert_eq!(c.cluster.spill_folder(), std::path::PathBuf::from("/var/tmp/mt"));
    assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    // Where gradients wait does not change the parameters, so a resumed run may change it.
    assert!(Config::default().resume_conflicts(&c).is_empty());
}

#[test]
fn a_task_override_on_the_default_keeps_the_default_distribution() {
    let c = Config::from_toml_with_overrides("", &["task.support=20".into()]).unwrap();
    assert_eq!(c.task, TaskConfig::Sinusoid(RegressionTaskConfig { support: 20, query: 10 }));
}

#[test]
fn resume_conflicts_name_what_differs_and_allow_run_length_changes() {
    let a = Config::default();
    let mut b = a.clone();
    b.train.steps = 99_999;
    b.eval.every = 7;
    b.checkpoint.every = 3;
    b.cluster.task_timeout_secs = 30.0;
    assert!(a.resume_conflicts(&b).is_empty());
    b.train.meta_lr = 0.5;
    b.algo.name = AlgoKind::Fomaml;
    b.cluster.grad_dtype = crate::tensor::Dtype::Bf16;
    b.algo.compute_dtype = ComputeDtype::Bf16;
    let c = a.resume_conflicts(&b);
    assert_eq!(c.len(), 4, "{c:?}");
    assert!(c.iter().any(|l| l.starts_with("cluster.grad_dtype")), "{c:?}");
    assert!(c.iter().any(|l| l.starts_with("algo.compute_dtype")), "{c:?}");
    assert!(c.iter().any(|l| l.starts_with("train.meta_lr: 0.001 in the checkpoint, 0.5 now")), "{c:?}");
    assert!(c.iter().any(|l| l.starts_with("algo.name")), "{c:?}");
}

#[test]
fn an_adaptive_curriculum_makes_the_periodic_evaluations_part_of_the_run() {
    let mut a = Config::default();
    a.curriculum.schedule = Schedule::Adaptive;
    let mut b = a.clone();
    b.eval.final_tasks = 10;
    b.train.steps = 5000;
    assert!(a.resume_conflicts(&b).is_empty());
    b.eval.every = 7;
    let c = a.resume_conflicts(&b);
    assert!(c.len() == 1 && c[0].starts_with("eval.every"), "{c:?}");
}

#[test]
fn round_trips_through_toml() {
    let c = Config::from_toml(
        "[task]\ndistribution = \"omniglot\"\nn_way = 20\n[model]\nname = \"conv4\"\n[algo]\ninner_grad_clamp = inf\n",
    )
    .unwrap();
    assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    assert!(c.algo.inner_grad_clamp.is_infinite());
}
