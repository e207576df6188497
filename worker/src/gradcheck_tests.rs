//! Meta-gradients against finite differences in f64 (an oracle that uses no second-order autograd).
//!
//! MAML: d/dθ of L_query(adapt(θ)) is compared with central differences of the scalar function
//! θ ↦ L_query(adapt(θ)) along random directions and along single coordinates (LayerNorm and batch-norm
//! affine parameters included, set to non-trivial values). FOMAML: the gradient is compared with central
//! differences of θ' ↦ L_query(θ') at the adapted parameters θ'. ANIL and Meta-SGD: as MAML, with the
//! head-only adaptation, and over (θ, α) with the learned rates α. Reptile: θ − θ′ is compared with
//! an adaptation whose support gradients are themselves central differences (no autograd at all). Steps are 1e-6 in f64: far below the
//! distance to the next ReLU kink for these fixed seeds, so the check is deterministic, not flaky.

use metatrain_common::config::{AlgoKind, ModelKind};
use metatrain_common::layout::ModelSpec;
use tch::{Kind, Tensor};

use crate::algo::{
    adapt, adapt_each, adapt_with, leaves, meta_gradient, meta_gradient_with, rule, split, InnerLoop, Plan, TaskTensors,
};
use crate::model::{forward, loss, TargetTensor};
use crate::tensors::params_from_flat;
use metatrain_common::rng::{keyed_rng, normal, uniform};

const EPS: f64 = 1e-6;
/// Agreement required between analytic and finite-difference directional derivatives (relative, f64).
const TOL: f64 = 1e-6;

thread_local! {
    /// Each test's own random stream (tests run on parallel threads; libtorch's generator is global).
    static RNG: std::cell::RefCell<rand_chacha::ChaCha8Rng> = std::cell::RefCell::new(keyed_rng(&[0]));
}

pub(crate) fn seeded(seed: i64) {
    RNG.with(|r| *r.borrow_mut() = keyed_rng(&[seed as u64]));
}

fn draw(shape: &[i64], f: impl Fn(&mut rand_chacha::ChaCha8Rng) -> f64) -> Tensor {
    let n: i64 = shape.iter().product();
    let v: Vec<f64> = RNG.with(|r| (0..n).map(|_| f(&mut r.borrow_mut())).collect());
    Tensor::from_slice(&v).reshape(shape)
}

/// Standard normal f64 tensor from the test's stream.
pub(crate) fn randn(shape: &[i64]) -> Tensor {
    draw(shape, normal)
}

/// Uniform [0, 1) f64 tensor from the test's stream.
fn rand01(shape: &[i64]) -> Tensor {
    draw(shape, |r| uniform(r, 0.0, 1.0))
}

/// Initial parameters with every tensor perturbed so that norm affine parameters are not 1/0.
pub(crate) fn params(spec: &ModelSpec, seed: i64) -> Vec<Tensor> {
    seeded(seed);
    let flat = spec.init_params(seed as u64);
    params_from_flat(&spec.layout(), &flat, Kind::Double).into_iter().map(|p| &p + randn(&p.size()) * 0.2).collect()
}

pub(crate) fn regression_task(in_features: i64, n_support: i64, n_query: i64) -> TaskTensors {
    TaskTensors {
        support_x: randn(&[n_support, in_features]),
        support_y: TargetTensor::Real(randn(&[n_support, 1])),
        query_x: randn(&[n_query, in_features]),
        query_y: TargetTensor::Real(randn(&[n_query, 1])),
    }
}

pub(crate) fn image_task(n_way: i64, shots: i64, queries: i64) -> TaskTensors {
    let labels = |k: i64| Tensor::arange(n_way, (Kind::Int64, tch::Device::Cpu)).repeat_interleave_self_int(k, 0, None);
    TaskTensors {
        support_x: rand01(&[n_way * shots, 1, 28, 28]),
        support_y: TargetTensor::Class(labels(shots)),
        query_x: rand01(&[n_way * queries, 1, 28, 28]),
        query_y: TargetTensor::Class(labels(queries)),
    }
}

fn adapted_query_loss(spec: &ModelSpec, theta: &[Tensor], task: &TaskTensors, inner: &InnerLoop) -> f64 {
    let adapted = adapt(spec, &leaves(theta), task, inner, false);
    let l = loss(&forward(spec, &adapted, &task.query_x), &task.query_y);
    l.double_value(&[])
}

fn dot(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x * y).sum(Kind::Double).double_value(&[])).sum()
}

fn shifted(theta: &[Tensor], v: &[Tensor], s: f64) -> Vec<Tensor> {
    theta.iter().zip(v).map(|(t, d)| t + d * s).collect()
}

/// Directions: `n` random unit directions plus one-hot directions on the named parameters' first entries.
fn directions(theta: &[Tensor], names: &[String], coords_of: &[&str], n: usize) -> Vec<Vec<Tensor>> {
    let mut dirs = Vec::new();
    for _ in 0..n {
        let v: Vec<Tensor> = theta.iter().map(|t| randn(&t.size())).collect();
        let norm = dot(&v, &v).sqrt();
        dirs.push(v.iter().map(|x| x / norm).collect());
    }
    for (i, name) in names.iter().enumerate() {
        if coords_of.iter().any(|c| name == c) {
            for k in 0..theta[i].numel().min(3) as i64 {
                let v: Vec<Tensor> = theta.iter().map(|t| t.zeros_like()).collect();
                let flat = v[i].view(-1);
                let _ = flat.get(k).fill_(1.0);
                dirs.push(v);
            }
        }
    }
    dirs
}

fn check_maml(spec: &ModelSpec, task: &TaskTensors, inner: InnerLoop, seed: i64, coords: &[&str]) {
    let theta = params(spec, seed);
    let names: Vec<String> = spec.layout().params.iter().map(|p| p.name.clone()).collect();
    let out = meta_gradient(spec, AlgoKind::Maml, &theta, task, &inner);
    let g = out.meta_gradient.expect("train mode returns a gradient");
    let fo = meta_gradient(spec, AlgoKind::Fomaml, &theta, task, &inner).meta_gradient.expect("gradient");
    let mut worst: f64 = 0.0;
    let mut fo_worst: f64 = 0.0;
    for v in directions(&theta, &names, coords, 4) {
        let analytic = dot(&g, &v);
        let fd = (adapted_query_loss(spec, &shifted(&theta, &v, EPS), task, &inner)
            - adapted_query_loss(spec, &shifted(&theta, &v, -EPS), task, &inner))
            / (2.0 * EPS);
        let err = (analytic - fd).abs() / fd.abs().max(1e-3);
        worst = worst.max(err);
        fo_worst = fo_worst.max((dot(&fo, &v) - fd).abs() / fd.abs().max(1e-3));
    }
    println!(
        "{:?} K={} MAML vs finite differences: max rel err {worst:.2e} (FOMAML would be {fo_worst:.2e})",
        spec.kind, inner.steps
    );
    assert!(worst < TOL, "MAML meta-gradient disagrees with finite differences: {worst:e}");
    // The oracle must be able to tell second order from first order, or the check above proves little.
    assert!(fo_worst > 100.0 * TOL.max(worst), "FOMAML indistinguishable from MAML here ({fo_worst:e})");
}

fn check_fomaml(spec: &ModelSpec, task: &TaskTensors, inner: InnerLoop, seed: i64) {
    let theta = params(spec, seed);
    let g = meta_gradient(spec, AlgoKind::Fomaml, &theta, task, &inner).meta_gradient.expect("gradient");
    let adapted: Vec<Tensor> = adapt(spec, &leaves(&theta), task, &inner, false).iter().map(|t| t.detach()).collect();
    let query = |p: &[Tensor]| loss(&forward(spec, p, &task.query_x), &task.query_y).double_value(&[]);
    let mut worst: f64 = 0.0;
    for v in directions(&theta, &[], &[], 4) {
        let fd = (query(&shifted(&adapted, &v, EPS)) - query(&shifted(&adapted, &v, -EPS))) / (2.0 * EPS);
        worst = worst.max((dot(&g, &v) - fd).abs() / fd.abs().max(1e-3));
    }
    println!(
        "{:?} K={} FOMAML vs finite differences at the adapted parameters: max rel err {worst:.2e}",
        spec.kind, inner.steps
    );
    assert!(worst < TOL, "FOMAML gradient disagrees with finite differences: {worst:e}");
}

const LN_COORDS: &[&str] = &["norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "layer1.weight"];

#[test]
fn maml_mlp_ln_one_and_several_steps() {
    let spec = ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 };
    for (steps, seed) in [(1, 11), (3, 12)] {
        seeded(seed);
        let task = regression_task(2, 10, 8);
        check_maml(&spec, &task, InnerLoop { steps, lr: 0.1, clamp: f64::INFINITY }, seed, LN_COORDS);
    }
}

#[test]
fn maml_mlp_with_clamping_that_bites() {
    let spec = ModelSpec { kind: ModelKind::Mlp, in_features: 1, outputs: 1 };
    seeded(21);
    let task = regression_task(1, 10, 10);
    check_maml(&spec, &task, InnerLoop { steps: 2, lr: 0.05, clamp: 0.05 }, 21, &["layer3.bias"]);
}

#[test]
fn maml_conv4_with_batch_norm() {
    let spec = ModelSpec { kind: ModelKind::Conv4, in_features: 784, outputs: 3 };
    seeded(31);
    let task = image_task(3, 2, 2);
    check_maml(
        &spec,
        &task,
        InnerLoop { steps: 2, lr: 0.4, clamp: 10.0 },
        31,
        &["bn1.weight", "bn4.bias", "head.bias"],
    );
}

#[test]
fn fomaml_mlp_ln_and_conv4() {
    let spec = ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 };
    seeded(41);
    let task = regression_task(2, 10, 8);
    check_fomaml(&spec, &task, InnerLoop { steps: 3, lr: 0.1, clamp: 10.0 }, 41);
    let spec = ModelSpec { kind: ModelKind::Conv4, in_features: 784, outputs: 3 };
    seeded(42);
    let task = image_task(3, 1, 2);
    check_fomaml(&spec, &task, InnerLoop { steps: 1, lr: 0.4, clamp: 10.0 }, 42);
}

#[test]
fn inner_clamp_is_symmetric() {
    // One inner step on a model whose gradients are large in both signs: every move is at most lr·c,
    // and both +lr·c and −lr·c occur (clamping only the upper side would leave large negative moves).
    let spec = ModelSpec { kind: ModelKind::Mlp, in_features: 1, outputs: 1 };
    seeded(51);
    let theta = params(&spec, 51);
    let mut task = regression_task(1, 10, 10);
    task.support_y = TargetTensor::Real(randn(&[10, 1]) * 100.0);
    let (lr, c) = (0.1, 0.5);
    let adapted = adapt(&spec, &leaves(&theta), &task, &InnerLoop { steps: 1, lr, clamp: c }, false);
    let moves: Vec<f64> = theta
        .iter()
        .zip(&adapted)
        .flat_map(|(a, b)| Vec::<f64>::try_from((b.detach() - a).flatten(0, -1)).unwrap_or_default())
        .collect();
    let max = moves.iter().cloned().fold(f64::MIN, f64::max);
    let min = moves.iter().cloned().fold(f64::MAX, f64::min);
    assert!((max - lr * c).abs() < 1e-12 && (min + lr * c).abs() < 1e-12, "moves in [{min}, {max}], bound {}", lr * c);
}

#[test]
fn a_small_inner_step_lowers_the_support_loss() {
    let spec = ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 };
    seeded(61);
    let theta = params(&spec, 61);
    let task = regression_task(2, 12, 9);
    let support = |p: &[Tensor]| loss(&forward(&spec, p, &task.support_x), &task.support_y).double_value(&[]);
    let before = support(&theta);
    let adapted = adapt(&spec, &leaves(&theta), &task, &InnerLoop { steps: 1, lr: 1e-3, clamp: f64::INFINITY }, false);
    let after = support(&adapted);
    println!("support loss {before} -> {after}");
    assert!(after < before, "gradient descent must descend: {before} -> {after}");
}

/// L_query after adapting by `algo`'s rule, first order (the finite differences supply the rest):
/// `meta` is the model's tensors, then any extra meta-parameters (Meta-SGD's rates).
fn adapted_query_loss_by(
    spec: &ModelSpec,
    algo: AlgoKind,
    meta: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
) -> f64 {
    let meta = leaves(meta);
    let (model, extra) = split(spec, &meta);
    let adapted = adapt_with(spec, model, task, inner, false, rule(algo, false, extra));
    loss(&forward(spec, &adapted, &task.query_x), &task.query_y).double_value(&[])
}

/// `algo`'s meta-gradient against central differences of the adapted query loss, over every
/// meta-parameter (`meta`, named `names`); returns the worst relative error.
fn check_against_fd(
    spec: &ModelSpec,
    algo: AlgoKind,
    meta: &[Tensor],
    names: &[String],
    task: &TaskTensors,
    inner: InnerLoop,
    coords: &[&str],
) -> f64 {
    let g = meta_gradient(spec, algo, meta, task, &inner).meta_gradient.expect("train mode returns a gradient");
    assert_eq!(g.len(), meta.len(), "one gradient per meta-parameter");
    let mut worst: f64 = 0.0;
    for v in directions(meta, names, coords, 4) {
        let fd = (adapted_query_loss_by(spec, algo, &shifted(meta, &v, EPS), task, &inner)
            - adapted_query_loss_by(spec, algo, &shifted(meta, &v, -EPS), task, &inner))
            / (2.0 * EPS);
        worst = worst.max((dot(&g, &v) - fd).abs() / fd.abs().max(1e-3));
    }
    worst
}

fn model_names(spec: &ModelSpec) -> Vec<String> {
    spec.layout().params.iter().map(|p| p.name.clone()).collect()
}

#[test]
fn anil_adapts_only_the_head_and_its_meta_gradient_matches_finite_differences() {
    for (spec, task, inner, seed, coords) in [
        (
            ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 },
            None,
            InnerLoop { steps: 3, lr: 0.02, clamp: f64::INFINITY },
            71,
            &["layer1.weight", "norm2.weight", "layer3.weight", "layer3.bias"][..],
        ),
        (
            ModelSpec { kind: ModelKind::Conv4, in_features: 784, outputs: 3 },
            Some(()),
            InnerLoop { steps: 2, lr: 0.4, clamp: 10.0 },
            72,
            &["conv1.weight", "bn3.weight", "head.bias"][..],
        ),
    ] {
        let theta = params(&spec, seed);
        let task = if task.is_some() { image_task(3, 2, 2) } else { regression_task(2, 10, 8) };
        // Head-only: the body leaves the inner loop exactly as it entered, the head moves.
        let adapted = adapt_with(&spec, &leaves(&theta), &task, &inner, false, crate::algo::Rule::Head);
        let n = theta.len();
        for (i, (a, t)) in adapted.iter().zip(&theta).enumerate() {
            let moved = (a.detach() - t).abs().max().double_value(&[]);
            if i < n - 2 {
                assert_eq!(moved, 0.0, "body tensor {i} moved");
            } else {
                assert!(moved > 0.0, "head tensor {i} did not move");
            }
        }
        let worst = check_against_fd(&spec, AlgoKind::Anil, &theta, &model_names(&spec), &task, inner, coords);
        // ANIL's meta-gradient is not MAML's: the oracle tells them apart.
        let maml = check_against_fd(&spec, AlgoKind::Maml, &theta, &model_names(&spec), &task, inner, &[]);
        let g_anil = meta_gradient(&spec, AlgoKind::Anil, &theta, &task, &inner).meta_gradient.expect("g");
        let g_maml = meta_gradient(&spec, AlgoKind::Maml, &theta, &task, &inner).meta_gradient.expect("g");
        let diff = g_anil.iter().zip(&g_maml).map(|(a, b)| (a - b).abs().max().double_value(&[])).fold(0.0, f64::max);
        let size = g_anil.iter().map(|a| a.abs().max().double_value(&[])).fold(0.0, f64::max);
        println!(
            "{:?} ANIL vs finite differences: max rel err {worst:.2e}; MAML's own check {maml:.2e}; \
             max |g_ANIL| {size:.2e}, max |g_ANIL − g_MAML| {diff:.2e}",
            spec.kind
        );
        assert!(worst < TOL, "ANIL meta-gradient disagrees with finite differences: {worst:e}");
        assert!(diff > 1e-6, "ANIL's gradient equals MAML's: the head-only path is not in effect");
    }
}

#[test]
fn meta_sgd_gradients_of_the_initialisation_and_of_the_learned_rates_match_finite_differences() {
    for (spec, image, inner, seed, coords) in [
        (
            ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 },
            false,
            InnerLoop { steps: 2, lr: 0.0, clamp: f64::INFINITY },
            81,
            &["inner_lr.layer1.weight", "inner_lr.norm1.weight", "inner_lr.layer3.bias", "norm2.bias"][..],
        ),
        (
            ModelSpec { kind: ModelKind::Mlp, in_features: 1, outputs: 1 },
            false,
            InnerLoop { steps: 1, lr: 0.0, clamp: 0.05 },
            82,
            &["inner_lr.layer3.bias", "inner_lr.layer2.weight"][..],
        ),
        (
            ModelSpec { kind: ModelKind::Conv4, in_features: 784, outputs: 3 },
            true,
            InnerLoop { steps: 1, lr: 0.0, clamp: 10.0 },
            83,
            &["inner_lr.bn2.weight", "inner_lr.head.weight", "inner_lr.conv1.weight"][..],
        ),
    ] {
        let theta = params(&spec, seed);
        // Rates in [0.01, 0.05), different for every entry (inner.lr is unused: the rates replace it).
        let rates: Vec<Tensor> = theta.iter().map(|t| rand01(&t.size()) * 0.04 + 0.01).collect();
        let meta: Vec<Tensor> = theta.iter().chain(&rates).map(|t| t.shallow_clone()).collect();
        let mut names = model_names(&spec);
        names.extend(model_names(&spec).iter().map(|n| format!("inner_lr.{n}")));
        seeded(seed);
        let task = if image { image_task(3, 2, 2) } else { regression_task(spec.in_features as i64, 10, 8) };
        let worst = check_against_fd(&spec, AlgoKind::MetaSgd, &meta, &names, &task, inner, coords);
        let g = meta_gradient(&spec, AlgoKind::MetaSgd, &meta, &task, &inner).meta_gradient.expect("g");
        let rate_norm: f64 =
            g[theta.len()..].iter().map(|t| t.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
        println!(
            "{:?} K={} Meta-SGD vs finite differences over (θ, α): max rel err {worst:.2e}; |dL/dα| {rate_norm:.3e}",
            spec.kind, inner.steps
        );
        assert!(worst < TOL, "Meta-SGD meta-gradient disagrees with finite differences: {worst:e}");
        assert!(rate_norm > 1e-6, "the learned rates get no gradient");
    }
}

/// dL/dθ by central differences, one coordinate at a time (f64; small models only).
fn fd_gradient(f: &dyn Fn(&[Tensor]) -> f64, theta: &[Tensor]) -> Vec<Tensor> {
    theta
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let mut values = Vec::with_capacity(t.numel());
            for k in 0..t.numel() as i64 {
                let v: Vec<Tensor> = theta.iter().map(|t| t.zeros_like()).collect();
                let _ = v[i].view(-1).get(k).fill_(1.0);
                values.push((f(&shifted(theta, &v, EPS)) - f(&shifted(theta, &v, -EPS))) / (2.0 * EPS));
            }
            Tensor::from_slice(&values).reshape(t.size())
        })
        .collect()
}

#[test]
fn reptile_returns_the_move_of_an_adaptation_made_without_autograd() {
    let spec = ModelSpec { kind: ModelKind::Mlp, in_features: 1, outputs: 1 };
    seeded(91);
    let theta = params(&spec, 91);
    let mut task = regression_task(1, 10, 10);
    task.support_y = TargetTensor::Real(randn(&[10, 1]) * 3.0);
    let inner = InnerLoop { steps: 2, lr: 0.05, clamp: 1.0 };
    let g = meta_gradient(&spec, AlgoKind::Reptile, &theta, &task, &inner).meta_gradient.expect("g");
    // The oracle: SGD on the support loss with finite-difference gradients, clamped alike.
    let support =
        |p: &[Tensor]| tch::no_grad(|| loss(&forward(&spec, p, &task.support_x), &task.support_y).double_value(&[]));
    let mut fast: Vec<Tensor> = theta.iter().map(|t| t.detach()).collect();
    for _ in 0..inner.steps {
        let grads = fd_gradient(&support, &fast);
        fast = fast.iter().zip(grads).map(|(p, d)| p - d.clamp(-inner.clamp, inner.clamp) * inner.lr).collect();
    }
    let want: Vec<Tensor> = theta.iter().zip(&fast).map(|(t, f)| t - f).collect();
    let err = g.iter().zip(&want).map(|(a, b)| (a - b).abs().max().double_value(&[])).fold(0.0, f64::max);
    let scale = want.iter().map(|t| t.abs().max().double_value(&[])).fold(0.0, f64::max);
    let clamped =
        want.iter().map(|t| t.abs().ge(inner.lr * inner.clamp * 0.999).sum(Kind::Int64).int64_value(&[])).sum::<i64>();
    println!("Reptile θ − θ′ vs the finite-difference adaptation: max abs err {err:.2e} (largest move {scale:.3e}; {clamped} entries at the clamp in some step)");
    assert!(scale > 1e-3, "the adaptation must move the parameters");
    assert!(err < 1e-7 * scale.max(1.0), "Reptile's move disagrees with the oracle: {err:e}");
}

/// MAML++'s objective by finite differences' lights: Σ_k w_k L_query(θ_k) after first-order adaptation
/// at per-step rates (`meta`: the model's tensors, then one `[K]` rate tensor per model tensor).
fn multi_step_objective(
    spec: &ModelSpec,
    algo: AlgoKind,
    meta: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
    w: &[f64],
) -> f64 {
    let meta = leaves(meta);
    let (model, extra) = split(spec, &meta);
    let mut total = 0.0;
    let q = |p: &[Tensor]| loss(&forward(spec, p, &task.query_x), &task.query_y).double_value(&[]);
    let last =
        adapt_each(spec, model, task, inner, false, rule(algo, true, extra), algo.head_only(), &mut |k, fast| {
            if k < inner.steps {
                total += w[k - 1] * q(fast);
            }
        });
    total + w[inner.steps - 1] * q(&last)
}

#[test]
fn maml_plus_plus_multi_step_loss_and_per_step_rates_match_finite_differences() {
    for (spec, algo, image, seed, coords) in [
        (
            ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 },
            AlgoKind::Maml,
            false,
            101,
            &["inner_lr.layer1.weight", "inner_lr.norm2.bias", "inner_lr.layer3.bias", "norm1.weight"][..],
        ),
        (
            ModelSpec { kind: ModelKind::Conv4, in_features: 784, outputs: 3 },
            AlgoKind::Maml,
            true,
            102,
            &["inner_lr.bn2.weight", "inner_lr.head.weight", "conv1.weight"][..],
        ),
        (
            ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 },
            AlgoKind::Anil,
            false,
            103,
            &["inner_lr.layer3.weight", "inner_lr.layer3.bias", "layer1.weight"][..],
        ),
    ] {
        let inner = InnerLoop { steps: 3, lr: 0.0, clamp: f64::INFINITY };
        let theta = params(&spec, seed);
        // Per-step rates in [0.025, 0.075), different for every tensor and step (larger ones make the
        // objective curved enough that central differences at 1e-6 lose digits on conv4).
        let scale = 0.05;
        // One rate tensor per adapting model tensor (ANIL: the head's two), as the layout has them.
        let adapting = if algo == AlgoKind::Anil { 2 } else { theta.len() };
        let rates: Vec<Tensor> = (0..adapting).map(|_| rand01(&[3]) * scale + scale * 0.5).collect();
        let meta: Vec<Tensor> = theta.iter().chain(&rates).map(|t| t.shallow_clone()).collect();
        let mut names = model_names(&spec);
        let rate_names: Vec<String> = model_names(&spec).iter().map(|n| format!("inner_lr.{n}")).collect();
        names.extend(rate_names[theta.len() - adapting..].iter().cloned());
        seeded(seed);
        let task = if image { image_task(3, 2, 2) } else { regression_task(2, 10, 8) };
        let w = [0.15, 0.25, 0.6];
        let plan = Plan { second_order: true, step_weights: Some(w.to_vec()), per_step_lrs: true };
        let g = meta_gradient_with(&spec, algo, &plan, &meta, &task, &inner).meta_gradient.expect("g");
        let mut worst: f64 = 0.0;
        for v in directions(&meta, &names, coords, 4) {
            let f = |h: f64| multi_step_objective(&spec, algo, &shifted(&meta, &v, h), &task, &inner, &w);
            let fd = (f(EPS) - f(-EPS)) / (2.0 * EPS);
            // Relative to at least 1e-2: conv4's three-step loss carries f64 round-off of ~1e-15, which
            // central differences at 1e-6 turn into ~1e-9 of noise (a larger step crosses ReLU kinks).
            worst = worst.max((dot(&g, &v) - fd).abs() / fd.abs().max(1e-2));
        }
        let rate_norm: f64 =
            g[theta.len()..].iter().map(|t| t.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
        println!(
            "{:?} {algo:?} K=3 MAML++ (multi-step loss {w:?}, per-step rates) vs finite differences: max rel err {worst:.2e}; |dL/dα| {rate_norm:.3e}",
            spec.kind
        );
        assert!(worst < TOL, "MAML++ meta-gradient disagrees with finite differences: {worst:e}");
        assert!(rate_norm > 1e-6, "the per-step rates get no gradient");
    }
}

#[test]
fn a_first_order_plan_is_fomaml_and_a_plain_plan_is_the_algorithm() {
    let spec = ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 };
    seeded(111);
    let theta = params(&spec, 111);
    let task = regression_task(2, 10, 8);
    let inner = InnerLoop { steps: 2, lr: 0.05, clamp: 10.0 };
    let max_diff = |a: &[Tensor], b: &[Tensor]| {
        a.iter().zip(b).map(|(x, y)| (x - y).abs().max().double_value(&[])).fold(0.0, f64::max)
    };
    let first = Plan { second_order: false, step_weights: None, per_step_lrs: false };
    let g_fo = meta_gradient_with(&spec, AlgoKind::Maml, &first, &theta, &task, &inner).meta_gradient.expect("g");
    let g_fomaml = meta_gradient(&spec, AlgoKind::Fomaml, &theta, &task, &inner).meta_gradient.expect("g");
    let g_maml = meta_gradient(&spec, AlgoKind::Maml, &theta, &task, &inner).meta_gradient.expect("g");
    assert_eq!(max_diff(&g_fo, &g_fomaml), 0.0, "MAML's first-order phase is FOMAML");
    assert!(max_diff(&g_fo, &g_maml) > 1e-6, "and differs from second-order MAML");
    // A one-hot multi-step weight on the last step is the plain objective.
    let last = Plan { second_order: true, step_weights: Some(vec![0.0, 1.0]), per_step_lrs: false };
    let g_last = meta_gradient_with(&spec, AlgoKind::Maml, &last, &theta, &task, &inner).meta_gradient.expect("g");
    assert!(max_diff(&g_last, &g_maml) < 1e-12);
}

#[test]
fn lora_meta_gradients_of_the_adapters_match_finite_differences() {
    use crate::algo::Rule;
    use crate::model::{LoraNet, Net};
    for (spec, image, seed) in [
        (ModelSpec { kind: ModelKind::MlpLn, in_features: 2, outputs: 1 }, false, 121),
        (ModelSpec { kind: ModelKind::Conv4, in_features: 784, outputs: 3 }, true, 122),
    ] {
        let base = params(&spec, seed);
        let net = LoraNet::new(spec.clone(), base.iter().map(|t| t.detach()).collect(), 0.5);
        let rank = 2;
        // A and B both non-zero, so that both get a gradient.
        let adapters: Vec<Tensor> = base
            .iter()
            .filter(|t| t.dim() >= 2)
            .flat_map(|w| {
                let (out, fan) = (w.size()[0], w.numel() as i64 / w.size()[0]);
                [randn(&[rank, fan]) * (0.5 / (fan as f64).sqrt()), randn(&[out, rank]) * 0.1]
            })
            .collect();
        assert_eq!(adapters.len(), net.n_tensors());
        seeded(seed);
        let task = if image { image_task(3, 2, 2) } else { regression_task(2, 10, 8) };
        // With B = 0 the adapted model is the base, exactly.
        let zero_b: Vec<Tensor> = adapters
            .iter()
            .enumerate()
            .map(|(i, t)| if i % 2 == 1 { t.zeros_like() } else { t.shallow_clone() })
            .collect();
        let same = (net.forward(&zero_b, &task.query_x) - forward(&spec, &base, &task.query_x)).abs().max();
        assert_eq!(same.double_value(&[]), 0.0);
        let inner = InnerLoop { steps: 2, lr: if image { 0.1 } else { 0.05 }, clamp: 10.0 };
        let g = meta_gradient(&net, AlgoKind::Maml, &adapters, &task, &inner).meta_gradient.expect("g");
        let f = |a: &[Tensor]| {
            let adapted = adapt_with(&net, &leaves(a), &task, &inner, false, Rule::All);
            loss(&net.forward(&adapted, &task.query_x), &task.query_y).double_value(&[])
        };
        let mut worst: f64 = 0.0;
        for v in directions(&adapters, &[], &[], 6) {
            let fd = (f(&shifted(&adapters, &v, EPS)) - f(&shifted(&adapters, &v, -EPS))) / (2.0 * EPS);
            worst = worst.max((dot(&g, &v) - fd).abs() / fd.abs().max(1e-2));
        }
        println!(
            "{:?} LoRA (rank {rank}) MAML K=2 vs finite differences over the adapters: max rel err {worst:.2e}",
            spec.kind
        );
        assert!(worst < TOL, "LoRA meta-gradient disagrees with finite differences: {worst:e}");
    }
}

#[test]
fn per_step_batch_norm_meta_gradient_matches_finite_differences() {
    use crate::algo::Rule;
    use crate::model::{Net, PerStepBn};
    let spec = ModelSpec { kind: ModelKind::Conv4, in_features: 784, outputs: 3 };
    let steps = 2;
    let net = PerStepBn::new(spec.clone(), steps);
    let theta = params(&spec, 131);
    // Every batch-norm tensor gets K + 1 different rows.
    let meta: Vec<Tensor> = theta
        .iter()
        .zip(spec.layout().params.iter())
        .map(|(t, p)| {
            if p.name.starts_with("bn") {
                Tensor::stack(&[t + randn(&t.size()) * 0.1, t + randn(&t.size()) * 0.1, t.shallow_clone()], 0)
            } else {
                t.shallow_clone()
            }
        })
        .collect();
    seeded(131);
    let task = image_task(3, 2, 2);
    let inner = InnerLoop { steps, lr: 0.2, clamp: 10.0 };
    let g = meta_gradient(&net, AlgoKind::Maml, &meta, &task, &inner).meta_gradient.expect("g");
    let f = |m: &[Tensor]| {
        let adapted = adapt_with(&net, &leaves(m), &task, &inner, false, Rule::All);
        loss(&net.forward_at(&adapted, &task.query_x, steps), &task.query_y).double_value(&[])
    };
    let names = model_names(&spec);
    let mut worst: f64 = 0.0;
    for v in directions(&meta, &names, &["bn1.weight", "bn3.bias", "conv2.weight"], 4) {
        let fd = (f(&shifted(&meta, &v, EPS)) - f(&shifted(&meta, &v, -EPS))) / (2.0 * EPS);
        worst = worst.max((dot(&g, &v) - fd).abs() / fd.abs().max(1e-2));
    }
    // Each step's row has its own gradient (row k is used at step k; row K on the query set).
    let bn1 = &g[2];
    let rows: Vec<f64> = (0..=steps as i64).map(|k| bn1.get(k).norm().double_value(&[])).collect();
    println!("Conv4 K={steps} per-step batch norm vs finite differences: max rel err {worst:.2e}; |dL/d bn1.weight[k]| {rows:?}");
    assert!(worst < TOL, "per-step batch-norm meta-gradient disagrees with finite differences: {worst:e}");
    assert!(rows.iter().all(|r| *r > 1e-8), "every row gets a gradient: {rows:?}");
    // The inner loop leaves the batch-norm rows where they are.
    let adapted = adapt_with(&net, &leaves(&meta), &task, &inner, false, Rule::All);
    assert_eq!((adapted[2].detach() - &meta[2]).abs().max().double_value(&[]), 0.0);
    assert!((adapted[0].detach() - &meta[0]).abs().max().double_value(&[]) > 0.0);
}
