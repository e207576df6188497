//! The inner loop and the meta-gradient, one task at a time, for every algorithm: MAML (second order),
//! FOMAML, Reptile, ANIL and Meta-SGD. This is the plain reference implementation (checked against
//! finite differences in `gradcheck_tests`); the worker runs the batched equivalent in
//! [`crate::batched`] for MAML and FOMAML, tested equal to it, except where batching does not pay (see
//! [`crate::compute`]).
//!
//! Inner loop: `inner_steps` SGD steps on the support loss, each inner gradient clamped elementwise to
//! `[-c, c]`. Which parameters move, and at what rate, is the algorithm's [`Rule`]: all at `inner_lr`
//! (MAML, FOMAML, Reptile), the head only (ANIL), or each entry at its own learned rate (Meta-SGD).
//! Second-order algorithms compute the inner gradients with `create_graph`, so the final query loss
//! differentiates through the whole adaptation; first-order ones treat them as constants. Reptile
//! returns θ − θ′ instead of a derivative.
//!
//! `params` is the run's meta-parameter list ([`metatrain_common::layout::meta_layout`]): the model's
//! tensors, then Meta-SGD's learned rates; [`split`] separates them.

use metatrain_common::config::AlgoKind;
use metatrain_common::layout::ModelSpec;
use tch::Tensor;

use crate::model::{accuracy, forward, loss, TargetTensor};

/// One task's tensors (support and query), in the compute dtype.
pub struct TaskTensors {
    pub support_x: Tensor,
    pub support_y: TargetTensor,
    pub query_x: Tensor,
    pub query_y: TargetTensor,
}

impl TaskTensors {
    /// The same task on `device`.
    pub fn to_device(self, device: tch::Device) -> TaskTensors {
        let move_y = |y: TargetTensor| match y {
            TargetTensor::Real(t) => TargetTensor::Real(t.to_device(device)),
            TargetTensor::Class(t) => TargetTensor::Class(t.to_device(device)),
        };
        TaskTensors {
            support_x: self.support_x.to_device(device),
            support_y: move_y(self.support_y),
            query_x: self.query_x.to_device(device),
            query_y: move_y(self.query_y),
        }
    }
}

/// Inner-loop settings.
#[derive(Clone, Copy, Debug)]
pub struct InnerLoop {
    pub steps: usize,
    pub lr: f64,
    /// Elementwise clamp bound `c` (> 0); infinite turns clamping off.
    pub clamp: f64,
}

/// What one task yields.
pub struct TaskOutput {
    /// d(query loss after adaptation)/d(initial parameters), one tensor per parameter (train mode only).
    pub meta_gradient: Option<Vec<Tensor>>,
    pub pre_loss: f64,
    pub post_loss: f64,
    pub pre_accuracy: Option<f64>,
    pub post_accuracy: Option<f64>,
}

fn clamp(g: Tensor, c: f64) -> Tensor {
    if c.is_finite() {
        g.clamp(-c, c)
    } else {
        g
    }
}

/// Which parameters the inner loop moves, and at what rate.
#[derive(Clone, Copy)]
pub enum Rule<'a> {
    /// Every parameter at `inner.lr` (MAML, FOMAML, Reptile).
    All,
    /// Only the head, the model's last two tensors (last layer's weight and bias), at `inner.lr` (ANIL).
    Head,
    /// Every entry at its own learned rate (Meta-SGD): `rates[i]` is shaped like `params[i]`.
    Learned(&'a [Tensor]),
}

/// The model's tensors and the algorithm's extra meta-parameters (Meta-SGD's rates; empty otherwise).
pub fn split<'a>(spec: &ModelSpec, params: &'a [Tensor]) -> (&'a [Tensor], &'a [Tensor]) {
    params.split_at(spec.layout().params.len().min(params.len()))
}

/// The inner-loop rule of `algo`, given the extra meta-parameters [`split`] returned.
pub fn rule(algo: AlgoKind, extra: &[Tensor]) -> Rule<'_> {
    if algo.learns_inner_lr() {
        Rule::Learned(extra)
    } else if algo.head_only() {
        Rule::Head
    } else {
        Rule::All
    }
}

/// Indices of the tensors `rule` moves among `n` model tensors.
fn moving(rule: Rule, n: usize) -> std::ops::Range<usize> {
    match rule {
        Rule::Head => n.saturating_sub(2)..n,
        Rule::All | Rule::Learned(_) => 0..n,
    }
}

/// Adapts `params` (the model's tensors) on the support set, moving every one at `inner.lr`.
pub fn adapt(
    spec: &ModelSpec,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
    create_graph: bool,
) -> Vec<Tensor> {
    adapt_with(spec, params, task, inner, create_graph, Rule::All)
}

/// Adapts `params` (the model's tensors) on the support set by `rule`. With `create_graph` the result
/// stays differentiable (to second order) in `params` and the rates; without it, inner gradients are
/// constants (first order).
pub fn adapt_with(
    spec: &ModelSpec,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
    create_graph: bool,
    rule: Rule,
) -> Vec<Tensor> {
    let mut fast: Vec<Tensor> = params.iter().map(|p| p.shallow_clone()).collect();
    let moved = moving(rule, fast.len());
    for _ in 0..inner.steps {
        let support_loss = loss(&forward(spec, &fast, &task.support_x), &task.support_y);
        let grads = Tensor::run_backward(&[&support_loss], &fast[moved.clone()], create_graph, create_graph);
        for (i, g) in moved.clone().zip(grads) {
            let g = clamp(g, inner.clamp);
            fast[i] = match rule {
                Rule::Learned(rates) => &fast[i] - &rates[i] * g,
                Rule::All | Rule::Head => &fast[i] - g * inner.lr,
            };
        }
    }
    fast
}

/// Query loss (and accuracy) of parameters, without building a graph.
fn evaluate(spec: &ModelSpec, params: &[Tensor], task: &TaskTensors) -> (f64, Option<f64>) {
    tch::no_grad(|| {
        let out = forward(spec, params, &task.query_x);
        (loss(&out, &task.query_y).double_value(&[]), accuracy(&out, &task.query_y))
    })
}

/// Leaf copies of `params` that require grad (the initial parameters the meta-gradient is taken against).
pub fn leaves(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(|p| p.detach().set_requires_grad(true)).collect()
}

/// Meta-training: adapt, then differentiate the query loss with respect to the initial meta-parameters
/// (Reptile: return θ − θ′).
pub fn meta_gradient(
    spec: &ModelSpec,
    algo: AlgoKind,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
) -> TaskOutput {
    let theta = leaves(params);
    let (model, extra) = split(spec, &theta);
    let (pre_loss, pre_accuracy) = evaluate(spec, model, task);
    let rule = rule(algo, extra);
    if algo == AlgoKind::Reptile {
        let adapted = adapt_with(spec, model, task, inner, false, rule);
        let (post_loss, post_accuracy) = evaluate(spec, &adapted, task);
        let delta = model.iter().zip(&adapted).map(|(t, a)| (t - a).detach()).collect();
        return TaskOutput { meta_gradient: Some(delta), pre_loss, post_loss, pre_accuracy, post_accuracy };
    }
    let adapted = adapt_with(spec, model, task, inner, algo.second_order(), rule);
    let out = forward(spec, &adapted, &task.query_x);
    let query_loss = loss(&out, &task.query_y);
    let post_accuracy = tch::no_grad(|| accuracy(&out, &task.query_y));
    let post_loss = query_loss.double_value(&[]);
    let meta_gradient = Tensor::run_backward(&[&query_loss], &theta, false, false);
    TaskOutput { meta_gradient: Some(meta_gradient), pre_loss, post_loss, pre_accuracy, post_accuracy }
}

/// Meta-testing: losses and accuracy before and after first-order adaptation by `algo`'s rule; no
/// meta-gradient. The per-task reference that the worker's batched evaluation
/// ([`crate::batched::evaluate`]) is tested against.
pub fn evaluate_task(
    spec: &ModelSpec,
    algo: AlgoKind,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
) -> TaskOutput {
    let theta = leaves(params);
    let (model, extra) = split(spec, &theta);
    let rule = rule(algo, extra);
    let (pre_loss, pre_accuracy) = evaluate(spec, model, task);
    let mut fast: Vec<Tensor> = model.iter().map(|t| t.shallow_clone()).collect();
    let moved = moving(rule, fast.len());
    for _ in 0..inner.steps {
        let support_loss = loss(&forward(spec, &fast, &task.support_x), &task.support_y);
        let grads = Tensor::run_backward(&[&support_loss], &fast[moved.clone()], false, false);
        for (i, g) in moved.clone().zip(grads) {
            let g = clamp(g, inner.clamp);
            let step = match rule {
                Rule::Learned(rates) => &fast[i] - rates[i].detach() * g,
                Rule::All | Rule::Head => &fast[i] - g * inner.lr,
            };
            fast[i] = step.detach().set_requires_grad(true);
        }
    }
    let (post_loss, post_accuracy) = evaluate(spec, &fast, task);
    TaskOutput { meta_gradient: None, pre_loss, post_loss, pre_accuracy, post_accuracy }
}
