//! The batched path against the per-task loop (itself checked against finite differences in
//! `gradcheck_tests`): equal meta-gradients, losses and accuracies in f64, for every model and both
//! algorithms; and, in f32, a task's result bitwise independent of the batch it was computed in.

use metatrain_common::config::{AlgoKind, ComputeDtype, ModelKind};
use metatrain_common::layout::ModelSpec;
use tch::{Kind, Tensor};

use crate::algo::{evaluate_task, meta_gradient, InnerLoop, TaskTensors};
use crate::batched::{evaluate, meta_gradients, BatchError, TaskBatch};
use crate::gradcheck_tests::{image_task, params, regression_task, seeded};
use crate::model::TargetTensor;

fn to_f32(task: &TaskTensors) -> TaskTensors {
    let y = |y: &TargetTensor| match y {
        TargetTensor::Real(t) => TargetTensor::Real(t.to_kind(Kind::Float)),
        TargetTensor::Class(t) => TargetTensor::Class(t.shallow_clone()),
    };
    TaskTensors {
        support_x: task.support_x.to_kind(Kind::Float),
        support_y: y(&task.support_y),
        query_x: task.query_x.to_kind(Kind::Float),
        query_y: y(&task.query_y),
    }
}

fn max_rel_diff(a: &[Tensor], b: &[Tensor]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max);
    let den: f64 = b.iter().map(|y| y.abs().max().double_value(&[])).fold(0.0, f64::max);
    num / den.max(1e-12)
}

/// Batched vs per-task loop on `tasks` tasks from `make`, in the tasks' own dtype.
fn compare(spec: &ModelSpec, algo: AlgoKind, inner: InnerLoop, make: impl Fn() -> TaskTensors, tol: f64) {
    let theta = params(spec, 7);
    let tasks: Vec<TaskTensors> = (0..5).map(|_| make()).collect();
    let batch = TaskBatch::stack(&tasks).expect("same shapes");
    let batched = meta_gradients(spec, algo, &theta, &batch, &inner, ComputeDtype::F32);
    assert_eq!(batched.len(), tasks.len());
    let mut worst: f64 = 0.0;
    for (task, b) in tasks.iter().zip(&batched) {
        let one = meta_gradient(spec, algo, &theta, task, &inner);
        let (gb, g1) = (b.meta_gradient.as_ref().expect("gradient"), one.meta_gradient.as_ref().expect("gradient"));
        worst = worst.max(max_rel_diff(gb, g1));
        for (x, y) in [(b.pre_loss, one.pre_loss), (b.post_loss, one.post_loss)] {
            assert!(
                (x - y).abs() <= tol * y.abs().max(1.0),
                "{:?} {algo:?}: loss {x} batched, {y} per task",
                spec.kind
            );
        }
        assert_eq!(b.pre_accuracy.is_some(), one.pre_accuracy.is_some());
        if let (Some(x), Some(y)) = (b.post_accuracy, one.post_accuracy) {
            assert!((x - y).abs() < 1e-9, "accuracy {x} batched, {y} per task");
        }
    }
    println!("{:?} {algo:?} K={}: batched vs per-task max rel diff {worst:.2e}", spec.kind, inner.steps);
    assert!(worst < tol, "{:?} {algo:?}: batched meta-gradient differs from the per-task loop by {worst:e}", spec.kind);
}

const F64_TOL: f64 = 1e-10;

#[test]
fn batched_equals_per_task_loop_mlp_and_mlp_ln() {
    for algo in [AlgoKind::Maml, AlgoKind::Fomaml] {
        seeded(101);
        let spec = ModelSpec { kind: ModelKind::Mlp, in_features: 1, outputs: 1 };
        compare(&spec, algo, InnerLoop { steps: 2, lr: 0.05, clamp: 0.05 }, || regression_task(1, 10, 10), F64_TOL);
        seeded(102);
        let spec = ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 };
        compare(&spec, algo, InnerLoop { steps: 3, lr: 0.1, clamp: 10.0 }, || regression_task(2, 12, 9), F64_TOL);
    }
}

#[test]
fn batched_equals_per_task_loop_conv4() {
    for algo in [AlgoKind::Maml, AlgoKind::Fomaml] {
        seeded(103);
        let spec = ModelSpec { kind: ModelKind::Conv4, in_features: 784, outputs: 3 };
        compare(&spec, algo, InnerLoop { steps: 2, lr: 0.4, clamp: 10.0 }, || image_task(3, 2, 2), F64_TOL);
    }
}

#[test]
fn batched_equals_per_task_loop_in_f32() {
    // What the worker runs: f32. Agreement to float tolerance, not bitwise (different kernels).
    seeded(104);
    let spec = ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 };
    let theta: Vec<Tensor> = params(&spec, 7).iter().map(|p| p.to_kind(Kind::Float)).collect();
    let tasks: Vec<TaskTensors> = (0..4).map(|_| to_f32(&regression_task(2, 30, 20))).collect();
    let inner = InnerLoop { steps: 5, lr: 0.1, clamp: 10.0 };
    let batched = meta_gradients(
        &spec,
        AlgoKind::Maml,
        &theta,
        &TaskBatch::stack(&tasks).expect("stack"),
        &inner,
        ComputeDtype::F32,
    );
    let worst = tasks
        .iter()
        .zip(&batched)
        .map(|(t, b)| {
            let one = meta_gradient(&spec, AlgoKind::Maml, &theta, t, &inner).meta_gradient.expect("gradient");
            max_rel_diff(b.meta_gradient.as_ref().expect("gradient"), &one)
        })
        .fold(0.0, f64::max);
    println!("f32 mlp-ln MAML K=5: batched vs per-task max rel diff {worst:.2e}");
    assert!(worst < 1e-4, "f32 batched differs by {worst:e}");
}

/// A task's f32 result is bitwise the same alone, in a batch of 3 and in a batch of 8 (at any position),
/// with one intra-op thread as the worker runs by default (more threads split work by size), for the
/// models a CPU worker batches (mlp, mlp-ln). conv4 is batched only on GPUs (a CPU worker computes it
/// one task at a time, `compute.rs`); on a CPU its grouped convolutions are batch-invariant or not
/// depending on the kernels oneDNN picks for the instruction set (bitwise on the Intel Xeon of the
/// first measurements, not on an AMD Zen one, where a lone task differs by ~6e-7 relative), so conv4
/// is held to float tolerance.
#[test]
fn a_tasks_result_does_not_depend_on_its_batch() {
    tch::set_num_threads(1);
    let cases: Vec<(ModelSpec, InnerLoop, Box<dyn Fn() -> TaskTensors>)> = vec![
        (
            ModelSpec { kind: ModelKind::Mlp, in_features: 1, outputs: 1 },
            InnerLoop { steps: 1, lr: 0.01, clamp: 10.0 },
            Box::new(|| to_f32(&regression_task(1, 10, 10))),
        ),
        (
            ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 },
            InnerLoop { steps: 5, lr: 0.1, clamp: 10.0 },
            Box::new(|| to_f32(&regression_task(2, 30, 20))),
        ),
        (
            ModelSpec { kind: ModelKind::Conv4, in_features: 784, outputs: 5 },
            InnerLoop { steps: 1, lr: 0.4, clamp: 10.0 },
            Box::new(|| to_f32(&image_task(5, 1, 5))),
        ),
    ];
    for (i, (spec, inner, make)) in cases.into_iter().enumerate() {
        seeded(200 + i as i64);
        let theta: Vec<Tensor> = params(&spec, 7).iter().map(|p| p.to_kind(Kind::Float)).collect();
        let tasks: Vec<TaskTensors> = (0..8).map(|_| make()).collect();
        let grads = |batch: &[TaskTensors]| -> Vec<Vec<f32>> {
            meta_gradients(
                &spec,
                AlgoKind::Maml,
                &theta,
                &TaskBatch::stack(batch).expect("stack"),
                &inner,
                ComputeDtype::F32,
            )
            .iter()
            .map(|o| crate::tensors::flat_from_tensors(o.meta_gradient.as_ref().expect("gradient")).expect("flat"))
            .collect()
        };
        let all = grads(&tasks);
        let alone = grads(&tasks[5..6]);
        let three = grads(&tasks[4..7]);
        let pairs = [
            ("task 5 alone", &alone[0], &all[5]),
            ("task 5 in 3", &three[1], &all[5]),
            ("task 4 in 3", &three[0], &all[4]),
        ];
        if spec.kind == ModelKind::Conv4 {
            for (what, a, b) in pairs {
                let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = a.iter().zip(b.iter()).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale;
                assert!(worst < 1e-5, "Conv4: {what} differs from its batch of 8 by {worst:e} relative");
                println!("Conv4: {what} vs in 8: max rel diff {worst:.1e}{}", if a == b { " (bitwise)" } else { "" });
            }
        } else {
            for (what, a, b) in pairs {
                assert_eq!(a, b, "{:?}: {what} differs from its batch of 8", spec.kind);
            }
            println!("{:?}: results bitwise equal alone, in 3 and in 8", spec.kind);
        }
    }
}

#[test]
fn stacking_refuses_mismatched_tasks() {
    seeded(301);
    assert!(matches!(TaskBatch::stack(&[]), Err(BatchError::Empty)));
    let a = regression_task(2, 10, 5);
    let b = regression_task(2, 11, 5);
    assert!(matches!(TaskBatch::stack(&[a, b]), Err(BatchError::Mismatch { index: 1, what: "support inputs", .. })));
    let c = regression_task(2, 5, 5);
    let mut d = regression_task(2, 5, 5);
    d.support_y = TargetTensor::Class(Tensor::zeros([5], (Kind::Int64, tch::Device::Cpu)));
    assert!(matches!(TaskBatch::stack(&[c, d]), Err(BatchError::MixedTargets { index: 1 })));
}

/// Batched evaluation equals the per-task one (f64), for regression and classification, and a task's
/// f32 figures are bitwise the same alone and in a batch.
#[test]
fn batched_evaluation_equals_per_task_evaluation() {
    let cases: Vec<(ModelSpec, InnerLoop, Box<dyn Fn() -> TaskTensors>)> = vec![
        (
            ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 },
            InnerLoop { steps: 5, lr: 0.1, clamp: 10.0 },
            Box::new(|| regression_task(2, 12, 9)),
        ),
        (
            ModelSpec { kind: ModelKind::Conv4, in_features: 784, outputs: 3 },
            InnerLoop { steps: 3, lr: 0.4, clamp: 10.0 },
            Box::new(|| image_task(3, 1, 2)),
        ),
    ];
    tch::set_num_threads(1);
    for (i, (spec, inner, make)) in cases.into_iter().enumerate() {
        seeded(400 + i as i64);
        let theta = params(&spec, 7);
        let tasks: Vec<TaskTensors> = (0..4).map(|_| make()).collect();
        let batched = evaluate(&spec, &theta, &TaskBatch::stack(&tasks).expect("stack"), &inner, ComputeDtype::F32);
        for (t, b) in tasks.iter().zip(&batched) {
            let one = evaluate_task(&spec, AlgoKind::Maml, &theta, t, &inner);
            assert!(b.meta_gradient.is_none());
            for (x, y) in [(b.pre_loss, one.pre_loss), (b.post_loss, one.post_loss)] {
                assert!((x - y).abs() <= 1e-10 * y.abs().max(1.0), "{:?}: loss {x} batched, {y} per task", spec.kind);
            }
            assert_eq!(b.post_accuracy, one.post_accuracy);
        }
        let theta32: Vec<Tensor> = theta.iter().map(|p| p.to_kind(Kind::Float)).collect();
        let tasks32: Vec<TaskTensors> = tasks.iter().map(to_f32).collect();
        let all = evaluate(&spec, &theta32, &TaskBatch::stack(&tasks32).expect("stack"), &inner, ComputeDtype::F32);
        let alone =
            evaluate(&spec, &theta32, &TaskBatch::stack(&tasks32[2..3]).expect("stack"), &inner, ComputeDtype::F32);
        assert_eq!((all[2].pre_loss, all[2].post_loss), (alone[0].pre_loss, alone[0].post_loss), "{:?}", spec.kind);
    }
}

/// `algo.compute_dtype = "bf16"` (matrix products and convolutions in bf16, the rest f32) against f32,
/// with f32 against f64 beside it for scale: within 5% for one-step MLP inner loops; measured (printed)
/// for a 5-step second-order loop with LayerNorm and for conv4; the casts are real (results differ).
#[test]
fn bf16_mixed_precision_against_f32() {
    tch::set_num_threads(1);
    let cases: Vec<(ModelSpec, InnerLoop, Box<dyn Fn() -> TaskTensors>)> = vec![
        (
            ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 },
            InnerLoop { steps: 5, lr: 0.1, clamp: 10.0 },
            Box::new(|| to_f32(&regression_task(2, 30, 20))),
        ),
        (
            ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 },
            InnerLoop { steps: 1, lr: 0.1, clamp: 10.0 },
            Box::new(|| to_f32(&regression_task(2, 30, 20))),
        ),
        (
            ModelSpec { kind: ModelKind::Mlp, in_features: 1, outputs: 1 },
            InnerLoop { steps: 1, lr: 0.01, clamp: 10.0 },
            Box::new(|| to_f32(&regression_task(1, 10, 10))),
        ),
        (
            ModelSpec { kind: ModelKind::Conv4, in_features: 784, outputs: 5 },
            InnerLoop { steps: 1, lr: 0.4, clamp: 10.0 },
            Box::new(|| to_f32(&image_task(5, 1, 5))),
        ),
    ];
    for (i, (spec, inner, make)) in cases.into_iter().enumerate() {
        seeded(501 + i as i64);
        let theta: Vec<Tensor> = params(&spec, 7).iter().map(|p| p.to_kind(Kind::Float)).collect();
        let tasks: Vec<TaskTensors> = (0..4).map(|_| make()).collect();
        let batch = TaskBatch::stack(&tasks).expect("stack");
        let run = |precision| -> Vec<f32> {
            meta_gradients(&spec, AlgoKind::Maml, &theta, &batch, &inner, precision)
                .iter()
                .flat_map(|o| {
                    crate::tensors::flat_from_tensors(o.meta_gradient.as_ref().expect("gradient")).expect("flat")
                })
                .collect()
        };
        let (full, half) = (run(ComputeDtype::F32), run(ComputeDtype::Bf16));
        let diff: f64 = full.iter().zip(&half).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt();
        let norm: f64 = full.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let rel = diff / norm;
        println!(
            "{:?} MAML K={}: bf16 mixed precision vs f32 meta-gradient, relative L2 difference {rel:.2e}",
            spec.kind, inner.steps
        );
        assert!(half.iter().all(|v| v.is_finite()));
        // f32 against f64 on the same tasks: how sensitive this meta-gradient is to rounding at all.
        let theta64: Vec<Tensor> = theta.iter().map(|p| p.to_kind(Kind::Double)).collect();
        let tasks64: Vec<TaskTensors> = tasks.iter().map(|t| cast(t, Kind::Double)).collect();
        let exact: Vec<f64> = meta_gradients(
            &spec,
            AlgoKind::Maml,
            &theta64,
            &TaskBatch::stack(&tasks64).expect("stack"),
            &inner,
            ComputeDtype::F32,
        )
        .iter()
        .flat_map(|o| {
            o.meta_gradient
                .as_ref()
                .expect("gradient")
                .iter()
                .flat_map(|g| Vec::<f64>::try_from(g.flatten(0, -1)).expect("f64"))
                .collect::<Vec<_>>()
        })
        .collect();
        let e32: f64 = full.iter().zip(&exact).map(|(a, b)| (*a as f64 - b).powi(2)).sum::<f64>().sqrt() / norm;
        println!("   (f32 vs f64: {e32:.2e})");
        // Sound where the inner loop is one step of an MLP (measured ~1%); deeper second-order loops and
        // conv4's batch-normalised ReLUs amplify bf16's rounding (measured 32% and 23%: documented, not
        // asserted small).
        if inner.steps == 1 && spec.kind != ModelKind::Conv4 {
            assert!(rel < 0.05, "{:?}: bf16 meta-gradient off by {rel:e}", spec.kind);
        }
        assert!(rel > 1e-5, "{:?}: bf16 must actually round (got {rel:e})", spec.kind);
    }
}

fn cast(task: &TaskTensors, kind: Kind) -> TaskTensors {
    let y = |y: &TargetTensor| match y {
        TargetTensor::Real(t) => TargetTensor::Real(t.to_kind(kind)),
        TargetTensor::Class(t) => TargetTensor::Class(t.shallow_clone()),
    };
    TaskTensors {
        support_x: task.support_x.to_kind(kind),
        support_y: y(&task.support_y),
        query_x: task.query_x.to_kind(kind),
        query_y: y(&task.query_y),
    }
}
