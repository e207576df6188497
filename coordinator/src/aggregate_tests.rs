use super::*;
use metatrain_common::tensor::{encode_f32, Dtype};

fn result(pre: f32, post: f32, grad_len: u64) -> TaskResult {
    TaskResult {
        id: 0,
        version: 0,
        mode: Mode::Train,
        pre_loss: pre,
        post_loss: post,
        pre_accuracy: None,
        post_accuracy: None,
        compute_seconds: 0.0,
        difficulty: 0.5,
        grad_dtype: Dtype::F32,
        grad_len,
    }
}

fn with_mode(mut r: TaskResult, mode: Mode) -> TaskResult {
    r.mode = mode;
    r
}

fn outcome(g: Vec<f32>) -> TaskOutcome {
    TaskOutcome {
        pre_loss: 1.0,
        post_loss: 0.5,
        pre_accuracy: None,
        post_accuracy: None,
        difficulty: 0.5,
        grad: Some(g),
    }
}

#[test]
fn validation_refuses_what_it_must() {
    let g = encode_f32(&[1.0, 2.0]);
    assert!(validate(&with_mode(result(1.0, 0.5, 2), Mode::Train), &g, 2).is_ok());
    let r = |res: Result<TaskOutcome, Rejection>| res.unwrap_err().reason();
    assert_eq!(r(validate(&with_mode(result(f32::NAN, 0.5, 2), Mode::Train), &g, 2)), "non_finite_loss");
    assert_eq!(r(validate(&with_mode(result(1.0, f32::INFINITY, 2), Mode::Train), &g, 2)), "non_finite_loss");
    assert_eq!(r(validate(&with_mode(result(1.0, 0.5, 2), Mode::Train), &g, 3)), "wrong_shape");
    assert_eq!(
        r(validate(&with_mode(result(1.0, 0.5, 2), Mode::Train), &encode_f32(&[1.0, f32::NAN]), 2)),
        "non_finite_gradient"
    );
    assert_eq!(r(validate(&with_mode(result(1.0, 0.5, 0), Mode::Train), &[], 2)), "missing_gradient");
    assert_eq!(r(validate(&with_mode(result(1.0, 0.5, 2), Mode::Eval), &g, 2)), "unexpected_gradient");
    let mut bad_acc = result(1.0, 0.5, 0);
    bad_acc.post_accuracy = Some(1.5);
    assert_eq!(r(validate(&with_mode(bad_acc, Mode::Eval), &[], 2)), "bad_accuracy");
    for d in [f32::NAN, -0.1, 1.5] {
        let mut bad = result(1.0, 0.5, 2);
        bad.difficulty = d;
        assert_eq!(r(validate(&with_mode(bad, Mode::Train), &g, 2)), "bad_difficulty");
    }
}

#[test]
fn a_gradient_in_another_dtype_than_the_runs_is_refused_and_is_not_a_task_failure() {
    let mut bf16 = result(1.0, 0.5, 2);
    bf16.grad_dtype = Dtype::Bf16;
    assert!(check_wire_dtype(&bf16, Dtype::Bf16).is_ok());
    let why = check_wire_dtype(&bf16, Dtype::F32).unwrap_err();
    assert_eq!(why.reason(), "wrong_dtype");
    assert!(!why.is_task_failure());
    // An evaluation result carries no gradient: its dtype field is not checked.
    let mut eval = with_mode(result(1.0, 0.5, 0), Mode::Eval);
    eval.grad_dtype = Dtype::F16;
    assert!(check_wire_dtype(&eval, Dtype::F32).is_ok());
    let nan = validate(&result(f32::NAN, 0.5, 2), &encode_f32(&[1.0, 2.0]), 2).unwrap_err();
    assert!(nan.is_task_failure());
}

#[test]
fn reduction_is_independent_of_arrival_order() {
    // Values whose f32/f64 sums depend on order if summed naively in arrival order.
    let grads: Vec<Vec<f32>> = (0..7).map(|i| vec![1e8 * (i as f32 - 3.0), 0.1 * i as f32 + 1e-7]).collect();
    let run = |order: &[usize]| {
        let mut streamed = BatchCollector::new(7, Some(2), false, Reorder::in_memory());
        let mut held = BatchCollector::new(7, Some(2), true, Reorder::in_memory());
        for &i in order {
            assert!(!streamed.is_complete());
            streamed.insert(i, outcome(grads[i].clone())).unwrap();
            held.insert(i, outcome(grads[i].clone())).unwrap();
        }
        assert!(streamed.is_complete() && held.is_complete());
        let g = streamed.finish(f64::INFINITY, None).unwrap().mean_grad.unwrap();
        // Holding the gradients (for a defence) and taking their unweighted mean is the same sum.
        let mut window = Window::default();
        let off = DefenceConfig { aggregate: metatrain_common::config::Aggregation::Mean, ..DefenceConfig::default() };
        assert_eq!(held.finish(f64::INFINITY, Some((&off, &mut window))).unwrap().mean_grad.unwrap(), g);
        g
    };
    let a = run(&[0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(a, run(&[6, 5, 4, 3, 2, 1, 0]));
    assert_eq!(a, run(&[3, 0, 6, 1, 5, 2, 4]));
}

/// Bit patterns, so that -0.0 and 0.0 (and any NaN) would tell apart.
fn bits(g: &[f32]) -> Vec<u32> {
    g.iter().map(|v| v.to_bits()).collect()
}

/// Gradients whose f64 sums depend on the order of addition (±1e20 beside values near 1), `numel`
/// values each.
fn awkward_grads(tasks: usize, numel: usize) -> Vec<Vec<f32>> {
    (0..tasks)
        .map(|t| {
            (0..numel)
                .map(|j| match (t + j) % tasks {
                    0 => 1e20,
                    1 => -1e20,
                    _ => 1.0 + (j % 7) as f32 * 0.125,
                })
                .collect()
        })
        .collect()
}

#[test]
fn the_test_gradients_do_depend_on_order() {
    let grads = awkward_grads(7, 3);
    let sum =
        |order: &[usize]| (0..3).map(|j| order.iter().map(|&t| grads[t][j] as f64).sum::<f64>()).collect::<Vec<_>>();
    assert_ne!(sum(&[0, 1, 2, 3, 4, 5, 6]), sum(&[3, 0, 6, 1, 5, 2, 4]));
}

/// Runs one batch in `order`; returns the mean gradient and how many gradients were spilled.
fn run_batch(grads: &[Vec<f32>], order: &[usize], hold: Option<&DefenceConfig>, reorder: Reorder) -> (Vec<f32>, usize) {
    let numel = grads[0].len();
    let mut c = BatchCollector::new(grads.len(), Some(numel), hold.is_some(), reorder);
    for &i in order {
        c.insert(i, outcome(grads[i].clone())).unwrap();
        assert!(c.memory_bytes <= c.reorder.memory_bytes.max(numel as u64 * 4), "over the budget");
    }
    let spilled = c.spilled();
    let mut window = Window::default();
    let s = c.finish(f64::INFINITY, hold.map(|cfg| (cfg, &mut window))).unwrap();
    (s.mean_grad.unwrap(), spilled)
}

#[test]
fn spilled_gradients_reduce_to_the_same_bits_and_memory_stays_in_budget() {
    let numel = 3;
    let grads = awkward_grads(7, numel);
    let one = numel as u64 * 4;
    let spill = |memory_bytes| Reorder { memory_bytes, store: Box::new(MemorySpill::default()) };
    let reversed = [6, 5, 4, 3, 2, 1, 0];
    let (reference, none) = run_batch(&grads, &[0, 1, 2, 3, 4, 5, 6], None, Reorder::in_memory());
    assert_eq!(none, 0);
    // Reversed arrival: six results wait. With room for none, all six are spilled; with room for two,
    // four are.
    let (g, n) = run_batch(&grads, &reversed, None, spill(0));
    assert_eq!((bits(&g), n), (bits(&reference), 6));
    let (g, n) = run_batch(&grads, &reversed, None, spill(2 * one));
    assert_eq!((bits(&g), n), (bits(&reference), 4));
    // In order nothing waits, so nothing is spilled even with no room at all.
    assert_eq!(run_batch(&grads, &[0, 1, 2, 3, 4, 5, 6], None, spill(0)).1, 0);
    let (g, _) = run_batch(&grads, &[3, 0, 6, 1, 5, 2, 4], None, spill(one));
    assert_eq!(bits(&g), bits(&reference));
    // Through a real file.
    let dir = std::env::temp_dir().join(format!("metatrain-aggregate-spill-{}", std::process::id()));
    let file = Reorder { memory_bytes: 0, store: Box::new(crate::spill::FileSpill::new(&dir)) };
    let (g, n) = run_batch(&grads, &reversed, None, file);
    assert_eq!((bits(&g), n), (bits(&reference), 6));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_defence_over_spilled_gradients_is_the_same_and_reads_them_in_chunks() {
    use metatrain_common::config::{Aggregation, QuarantineMode};
    // Longer than two chunks, so the element-wise reduction runs over three ranges.
    let numel = crate::spill::SPILL_CHUNK * 2 + 3;
    let grads = awkward_grads(5, numel);
    let order = [4, 2, 0, 3, 1];
    for cfg in [
        DefenceConfig { aggregate: Aggregation::Median, ..DefenceConfig::default() },
        DefenceConfig { aggregate: Aggregation::TrimmedMean, trim: 0.2, ..DefenceConfig::default() },
        DefenceConfig { quarantine: QuarantineMode::DownWeight, ..DefenceConfig::default() },
    ] {
        let (reference, _) = run_batch(&grads, &order, Some(&cfg), Reorder::in_memory());
        // Room for two of the five: three are spilled.
        let reorder = Reorder { memory_bytes: 2 * numel as u64 * 4, store: Box::new(MemorySpill::default()) };
        let (g, n) = run_batch(&grads, &order, Some(&cfg), reorder);
        assert_eq!(n, 3);
        assert!(bits(&g) == bits(&reference), "{:?} differs when spilled", cfg.aggregate);
    }
}

#[test]
fn a_store_that_refuses_costs_memory_not_results() {
    let grads = awkward_grads(4, 2);
    let (reference, _) = run_batch(&grads, &[0, 1, 2, 3], None, Reorder::in_memory());
    let store = MemorySpill::refusing();
    let mut c = BatchCollector::new(4, Some(2), false, Reorder { memory_bytes: 0, store: Box::new(store) });
    for i in [3, 2, 1] {
        c.insert(i, outcome(grads[i].clone())).unwrap();
    }
    assert!(c.take_spill_failure().is_some());
    assert!(c.take_spill_failure().is_none(), "said once");
    assert_eq!((c.spilled(), c.memory_bytes), (0, 3 * 2 * 4));
    c.insert(0, outcome(grads[0].clone())).unwrap();
    assert_eq!(c.memory_bytes, 0);
    assert_eq!(bits(&c.finish(f64::INFINITY, None).unwrap().mean_grad.unwrap()), bits(&reference));
}

#[test]
fn global_norm_clipping() {
    let mut c = BatchCollector::new(2, Some(2), false, Reorder::in_memory());
    c.insert(0, outcome(vec![6.0, 0.0])).unwrap();
    c.insert(1, outcome(vec![0.0, 8.0])).unwrap();
    let s = c.finish(1.0, None).unwrap();
    // mean = (3, 4), norm 5 → rescaled to norm 1.
    assert!((s.grad_norm - 5.0).abs() < 1e-12);
    assert!(s.clipped);
    let g = s.mean_grad.unwrap();
    assert!((g[0] - 0.6).abs() < 1e-6 && (g[1] - 0.8).abs() < 1e-6);
    let mut c = BatchCollector::new(1, Some(2), false, Reorder::in_memory());
    c.insert(0, outcome(vec![0.3, 0.4])).unwrap();
    let s = c.finish(1.0, None).unwrap();
    assert!(!s.clipped);
    assert_eq!(s.mean_grad.unwrap(), vec![0.3, 0.4]);
}

#[test]
fn a_quarantined_task_leaves_the_step() {
    use metatrain_common::config::QuarantineMode;
    let cfg = DefenceConfig { quarantine: QuarantineMode::Skip, ..DefenceConfig::default() };
    let mut c = BatchCollector::new(6, Some(1), true, Reorder::in_memory());
    for i in 0..6 {
        // Five ordinary tasks and one whose losses and gradient are 10⁴ times larger.
        let mut o = outcome(vec![if i == 4 { 1e4 } else { 1.0 + 0.01 * i as f32 }]);
        o.post_loss = if i == 4 { 1e4 } else { 1.0 + 0.1 * i as f64 };
        o.pre_loss = if i == 4 { 3e4 } else { 3.0 - 0.1 * i as f64 };
        c.insert(i, o).unwrap();
    }
    let mut window = Window::default();
    let s = c.finish(f64::INFINITY, Some((&cfg, &mut window))).unwrap();
    assert_eq!(s.quarantined(), 1);
    assert!(s.scores[4].quarantined.is_some());
    let g = s.mean_grad.unwrap()[0];
    assert!((g - (5.0 + 0.01 * 11.0) / 5.0).abs() < 1e-6, "mean of the five others: {g}");
    assert_eq!(window.len(), 6);
}

#[test]
fn student_t_interval_for_few_samples() {
    // Three samples 1, 2, 3: sd 1, se 1/sqrt(3), t(2) = 4.303.
    let m = mean_ci_t(&[1.0, 2.0, 3.0]);
    assert_eq!(m.mean, 2.0);
    assert!((m.ci95 - 4.303 / 3f64.sqrt()).abs() < 1e-12, "{}", m.ci95);
    assert_eq!(mean_ci_t(&[5.0]).ci95, 0.0);
    let many: Vec<f64> = (0..100).map(|i| (i % 7) as f64).collect();
    assert!((mean_ci_t(&many).ci95 - mean_ci(&many).ci95).abs() < 1e-12);
}

#[test]
fn mean_and_ci() {
    let m = mean_ci(&[1.0, 2.0, 3.0, 4.0]);
    assert_eq!(m.mean, 2.5);
    // sample std = sqrt(5/3); ci = 1.96 * std / 2
    assert!((m.ci95 - 1.96 * (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
}
