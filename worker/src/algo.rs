//! The inner loop and the meta-gradient, one task at a time, for every algorithm: MAML (second order),
//! FOMAML, Reptile, ANIL and Meta-SGD. This is the plain reference implementation (checked against
//! finite differences in `gradcheck_tests`); the worker runs the batched equivalent in
//! [`crate::batched`] for MAML and FOMAML, tested equal to it, except where batching does not pay (see
//! [`crate::compute`]).
//!
//! Inner loop: `inner_steps` SGD steps on the support loss, each inner gradient clamped elementwise to
//! `[-c, c]`. Which parameters move, and at what rate, is the algorithm's [`Rule`]: all at `inner_lr`
//! (MAML, FOMAML, Reptile), the head only (ANIL), each entry at its own learned rate (Meta-SGD), or each
//! tensor at a learned rate per step (MAML++'s LSLR). MAML++'s other options enter through a [`Plan`]:
//! a multi-step loss (weighted query losses after every step) and first-order meta-steps.
//! Second-order algorithms compute the inner gradients with `create_graph`, so the final query loss
//! differentiates through the whole adaptation; first-order ones treat them as constants. Reptile
//! returns θ − θ′ instead of a derivative.
//!
//! `params` is the run's meta-parameter list ([`metatrain_common::layout::meta_layout`]): the model's
//! tensors, then Meta-SGD's learned rates; [`split`] separates them.

use metatrain_common::config::{AlgoConfig, AlgoKind};
use tch::Tensor;

use crate::model::{accuracy, loss, Net, TargetTensor};

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
    /// Every adapting tensor at a learned rate per inner step (MAML++'s LSLR): `[inner_steps]` tensors
    /// for the last `rates.len()` model tensors (all of them; ANIL: the head's two).
    PerStep(&'a [Tensor]),
}

/// How one meta-step treats its tasks; MAML++'s schedules set it per meta-step
/// ([`AlgoConfig::second_order_at`], [`AlgoConfig::step_loss_weights`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// Differentiate through the inner gradients.
    pub second_order: bool,
    /// Weights of the query losses after inner steps 1..=K (multi-step loss); `None`: the final one alone.
    pub step_weights: Option<Vec<f64>>,
    /// The meta-parameters hold learned per-step rates (MAML++'s LSLR).
    pub per_step_lrs: bool,
}

impl Plan {
    /// The algorithm as such: its own order, the final query loss, fixed rates.
    pub fn plain(algo: AlgoKind) -> Plan {
        Plan { second_order: algo.second_order(), step_weights: None, per_step_lrs: false }
    }

    /// The plan of meta-step `step` under `algo`'s options.
    pub fn at(algo: &AlgoConfig, step: u64) -> Plan {
        Plan {
            second_order: algo.second_order_at(step),
            step_weights: algo.step_loss_weights(step),
            per_step_lrs: algo.per_step_lrs,
        }
    }
}

/// The model's tensors and the algorithm's extra meta-parameters (learned rates; empty otherwise).
pub fn split<'a>(spec: &dyn Net, params: &'a [Tensor]) -> (&'a [Tensor], &'a [Tensor]) {
    params.split_at(spec.n_tensors().min(params.len()))
}

/// The inner-loop rule of `algo` (with learned per-step rates when `per_step_lrs`), given the extra
/// meta-parameters [`split`] returned.
pub fn rule(algo: AlgoKind, per_step_lrs: bool, extra: &[Tensor]) -> Rule<'_> {
    if algo.learns_inner_lr() {
        Rule::Learned(extra)
    } else if per_step_lrs {
        Rule::PerStep(extra)
    } else if algo.head_only() {
        Rule::Head
    } else {
        Rule::All
    }
}

/// Indices of the tensors `rule` moves among `net`'s `n` tensors (ANIL: the head, even with per-step
/// rates; never a tensor the net keeps out of the inner loop).
fn moving(net: &dyn Net, rule: Rule, head_only: bool, n: usize) -> Vec<usize> {
    let range = match rule {
        Rule::Head => n.saturating_sub(2)..n,
        Rule::PerStep(_) if head_only => n.saturating_sub(2)..n,
        Rule::All | Rule::Learned(_) | Rule::PerStep(_) => 0..n,
    };
    range.filter(|&i| net.adapts(i)).collect()
}

/// Tensor `i` of `n` after inner step `k` (0-based) with clamped gradient `g`.
fn step_tensor(rule: Rule, p: &Tensor, g: Tensor, (i, n): (usize, usize), k: usize, lr: f64) -> Tensor {
    match rule {
        Rule::Learned(rates) => p - &rates[i] * g,
        Rule::PerStep(rates) => p - rates[i + rates.len() - n].get(k as i64) * g,
        Rule::All | Rule::Head => p - g * lr,
    }
}

/// Adapts `params` (the model's tensors) on the support set, moving every one at `inner.lr`.
pub fn adapt(
    spec: &dyn Net,
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
    spec: &dyn Net,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
    create_graph: bool,
    rule: Rule,
) -> Vec<Tensor> {
    adapt_each(spec, params, task, inner, create_graph, rule, false, &mut |_, _| {})
}

/// [`adapt_with`], calling `after_step(k, θ_k)` after every inner step k = 1..=K (the multi-step loss
/// scores each). `head_only` restricts per-step rates to the head (ANIL with MAML++'s LSLR).
#[allow(clippy::too_many_arguments)]
pub fn adapt_each(
    spec: &dyn Net,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
    create_graph: bool,
    rule: Rule,
    head_only: bool,
    after_step: &mut dyn FnMut(usize, &[Tensor]),
) -> Vec<Tensor> {
    let mut fast: Vec<Tensor> = params.iter().map(|p| p.shallow_clone()).collect();
    let n = fast.len();
    let moved = moving(spec, rule, head_only, n);
    for k in 0..inner.steps {
        let support_loss = loss(&spec.forward_at(&fast, &task.support_x, k), &task.support_y);
        let inputs: Vec<&Tensor> = moved.iter().map(|&i| &fast[i]).collect();
        let grads = Tensor::run_backward(&[&support_loss], &inputs, create_graph, create_graph);
        for (&i, g) in moved.iter().zip(grads) {
            fast[i] = step_tensor(rule, &fast[i], clamp(g, inner.clamp), (i, n), k, inner.lr);
        }
        after_step(k + 1, &fast);
    }
    fast
}

/// Query loss (and accuracy) of parameters after `step` inner steps, without building a graph.
fn evaluate(spec: &dyn Net, params: &[Tensor], task: &TaskTensors, step: usize) -> (f64, Option<f64>) {
    tch::no_grad(|| {
        let out = spec.forward_at(params, &task.query_x, step);
        (loss(&out, &task.query_y).double_value(&[]), accuracy(&out, &task.query_y))
    })
}

/// Leaf copies of `params` that require grad (the initial parameters the meta-gradient is taken against).
pub fn leaves(params: &[Tensor]) -> Vec<Tensor> {
    params.iter().map(|p| p.detach().set_requires_grad(true)).collect()
}

/// Meta-training: adapt, then differentiate the query loss with respect to the initial meta-parameters
/// (Reptile: return θ − θ′). The algorithm as such ([`Plan::plain`]).
pub fn meta_gradient(
    spec: &dyn Net,
    algo: AlgoKind,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
) -> TaskOutput {
    meta_gradient_with(spec, algo, &Plan::plain(algo), params, task, inner)
}

/// [`meta_gradient`] under a [`Plan`]: the order of differentiation, the multi-step loss's weights and
/// per-step rates that MAML++'s options give the meta-step.
pub fn meta_gradient_with(
    spec: &dyn Net,
    algo: AlgoKind,
    plan: &Plan,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
) -> TaskOutput {
    let theta = leaves(params);
    let (model, extra) = split(spec, &theta);
    let (pre_loss, pre_accuracy) = evaluate(spec, model, task, 0);
    let rule = rule(algo, plan.per_step_lrs, extra);
    if algo == AlgoKind::Reptile {
        let adapted = adapt_with(spec, model, task, inner, false, rule);
        let (post_loss, post_accuracy) = evaluate(spec, &adapted, task, inner.steps);
        let delta = model.iter().zip(&adapted).map(|(t, a)| (t - a).detach()).collect();
        return TaskOutput { meta_gradient: Some(delta), pre_loss, post_loss, pre_accuracy, post_accuracy };
    }
    // Multi-step loss: the weighted query losses of the intermediate steps (the final one is added below).
    let mut objective: Option<Tensor> = None;
    let weights = plan.step_weights.as_deref().filter(|w| w.len() == inner.steps && inner.steps > 1);
    let adapted = adapt_each(spec, model, task, inner, plan.second_order, rule, algo.head_only(), &mut |k, fast| {
        if let Some(w) = weights.filter(|_| k < inner.steps) {
            let l = loss(&spec.forward_at(fast, &task.query_x, k), &task.query_y) * w[k - 1];
            objective = Some(match objective.take() {
                Some(sum) => sum + l,
                None => l,
            });
        }
    });
    let out = spec.forward_at(&adapted, &task.query_x, inner.steps);
    let query_loss = loss(&out, &task.query_y);
    let post_accuracy = tch::no_grad(|| accuracy(&out, &task.query_y));
    let post_loss = query_loss.double_value(&[]);
    let objective = match (objective, weights) {
        (Some(sum), Some(w)) => sum + &query_loss * w[inner.steps - 1],
        _ => query_loss,
    };
    // A meta-parameter the objective does not reach (a learned rate of a tensor the inner loop keeps
    // fixed) gets an undefined gradient from autograd: it is zero.
    let meta_gradient = Tensor::run_backward(&[&objective], &theta, false, false)
        .into_iter()
        .zip(&theta)
        .map(|(g, t)| if g.defined() { g } else { t.zeros_like() })
        .collect();
    TaskOutput { meta_gradient: Some(meta_gradient), pre_loss, post_loss, pre_accuracy, post_accuracy }
}

/// Meta-testing: losses and accuracy before and after first-order adaptation by `algo`'s rule; no
/// meta-gradient. The per-task reference that the worker's batched evaluation
/// ([`crate::batched::evaluate`]) is tested against.
#[cfg(test)]
pub fn evaluate_task(
    spec: &dyn Net,
    algo: AlgoKind,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
) -> TaskOutput {
    evaluate_task_with(spec, algo, false, params, task, inner)
}

/// [`evaluate_task`], at learned per-step rates when `per_step_lrs`.
pub fn evaluate_task_with(
    spec: &dyn Net,
    algo: AlgoKind,
    per_step_lrs: bool,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
) -> TaskOutput {
    let theta = leaves(params);
    let (model, extra) = split(spec, &theta);
    let rule = rule(algo, per_step_lrs, extra);
    let (pre_loss, pre_accuracy) = evaluate(spec, model, task, 0);
    let mut fast: Vec<Tensor> = model.iter().map(|t| t.shallow_clone()).collect();
    let n = fast.len();
    let moved = moving(spec, rule, algo.head_only(), n);
    for k in 0..inner.steps {
        let support_loss = loss(&spec.forward_at(&fast, &task.support_x, k), &task.support_y);
        let inputs: Vec<&Tensor> = moved.iter().map(|&i| &fast[i]).collect();
        let grads = Tensor::run_backward(&[&support_loss], &inputs, false, false);
        for (&i, g) in moved.iter().zip(grads) {
            // Detached: evaluation builds no graph across steps.
            fast[i] = step_tensor(rule, &fast[i], clamp(g, inner.clamp), (i, n), k, inner.lr)
                .detach()
                .set_requires_grad(true);
        }
    }
    let (post_loss, post_accuracy) = evaluate(spec, &fast, task, inner.steps);
    TaskOutput { meta_gradient: None, pre_loss, post_loss, pre_accuracy, post_accuracy }
}
