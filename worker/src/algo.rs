//! The inner loop and the meta-gradient, one task at a time: MAML (second order) and FOMAML. This is the
//! plain reference implementation (checked against finite differences); the worker runs the batched
//! equivalent in [`crate::batched`], tested equal to it, except where batching does not pay (see
//! [`crate::compute`]).
//!
//! Inner loop: `inner_steps` SGD steps on the support loss at `inner_lr`, each inner gradient clamped
//! elementwise to `[-c, c]`. For MAML the inner gradients are computed with `create_graph`, so the final
//! query loss differentiates through the whole adaptation; for FOMAML they are constants, so the
//! meta-gradient is the query gradient at the adapted parameters.

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

/// Adapts `params` on the support set. With `create_graph` the result stays differentiable (to second
/// order) in `params`; without it, inner gradients are constants (first order).
pub fn adapt(
    spec: &ModelSpec,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
    create_graph: bool,
) -> Vec<Tensor> {
    let mut fast: Vec<Tensor> = params.iter().map(|p| p.shallow_clone()).collect();
    for _ in 0..inner.steps {
        let support_loss = loss(&forward(spec, &fast, &task.support_x), &task.support_y);
        let grads = Tensor::run_backward(&[&support_loss], &fast, create_graph, create_graph);
        fast = fast.iter().zip(grads).map(|(p, g)| p - clamp(g, inner.clamp) * inner.lr).collect();
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

/// Meta-training: adapt, then differentiate the query loss with respect to the initial parameters.
pub fn meta_gradient(
    spec: &ModelSpec,
    algo: AlgoKind,
    params: &[Tensor],
    task: &TaskTensors,
    inner: &InnerLoop,
) -> TaskOutput {
    let theta = leaves(params);
    let (pre_loss, pre_accuracy) = evaluate(spec, &theta, task);
    let second_order = matches!(algo, AlgoKind::Maml);
    let adapted = adapt(spec, &theta, task, inner, second_order);
    let out = forward(spec, &adapted, &task.query_x);
    let query_loss = loss(&out, &task.query_y);
    let post_accuracy = tch::no_grad(|| accuracy(&out, &task.query_y));
    let post_loss = query_loss.double_value(&[]);
    let meta_gradient = Tensor::run_backward(&[&query_loss], &theta, false, false);
    TaskOutput { meta_gradient: Some(meta_gradient), pre_loss, post_loss, pre_accuracy, post_accuracy }
}

/// Meta-testing: losses and accuracy before and after first-order adaptation; no meta-gradient. The
/// per-task reference that the worker's batched evaluation ([`crate::batched::evaluate`]) is tested against.
pub fn evaluate_task(spec: &ModelSpec, params: &[Tensor], task: &TaskTensors, inner: &InnerLoop) -> TaskOutput {
    let theta = leaves(params);
    let (pre_loss, pre_accuracy) = evaluate(spec, &theta, task);
    let mut fast = theta;
    for _ in 0..inner.steps {
        let support_loss = loss(&forward(spec, &fast, &task.support_x), &task.support_y);
        let grads = Tensor::run_backward(&[&support_loss], &fast, false, false);
        fast = fast
            .iter()
            .zip(grads)
            .map(|(p, g)| (p - clamp(g, inner.clamp) * inner.lr).detach().set_requires_grad(true))
            .collect();
    }
    let (post_loss, post_accuracy) = evaluate(spec, &fast, task);
    TaskOutput { meta_gradient: None, pre_loss, post_loss, pre_accuracy, post_accuracy }
}
