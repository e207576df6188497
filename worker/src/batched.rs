//! Many tasks as one computation: the meta-gradients of T tasks from a single batched forward and
//! backward pass, instead of T passes of a per-task loop.
//!
//! **Why.** The models meta-learning uses are small (MAML's sinusoid MLP has 1,761 parameters), so a
//! per-task loop spends its time in libtorch's fixed cost per operation, not in arithmetic. Stacking the
//! tasks makes every operation T times larger and the number of operations T times smaller.
//!
//! **How.** Every parameter gets a leading task dimension: `θ` of shape `[...]` becomes `Θ` of shape
//! `[T, ...]`, T leaf copies of the same initial values. Inputs are `[T, n, ...]`. Linear layers become
//! batched matrix products, LayerNorm normalises without its affine part and then applies each task's
//! scale and shift, and conv4's convolutions become one grouped convolution with the tasks as groups
//! (`[n, T·C, H, W]`, `groups = T`); per-channel batch-norm statistics are then per task automatically.
//!
//! Each task's loss is its own mean, and the loop differentiates the *sum* of the T losses. The tasks
//! share no parameter and d(sum)/d(loss_t) = 1, so the gradient with respect to `Θ[t]` is exactly task
//! t's gradient: the inner loop adapts every task on its own support set, and the meta-gradient of the
//! summed query losses with respect to `Θ` is the stack of the per-task meta-gradients, to second order
//! for MAML. Tests check equality with the per-task loop ([`crate::algo`]) and, in f64, with finite
//! differences through it.
//!
//! **Reproducibility.** A task's result must not depend on which other tasks shared its batch (the
//! cluster is reproducible whatever the number of workers). With one intra-op thread, libtorch's CPU
//! kernels compute each task's slice of a batch of two or more the same way whatever the batch size and
//! position (measured over the matrix shapes of every model here, transposed operands included). A batch
//! of *one* is the exception: a batched matrix-vector product (a layer with one output) then takes a
//! different MKL path and rounds differently (by ~1e-6). So a lone task is computed in a batch of
//! [`MIN_BATCH`], padded with a copy of itself, and a test checks that a task's meta-gradient is bitwise
//! the same alone, in a batch of 3 and in a batch of 8, for every model.

use metatrain_common::config::{AlgoKind, ComputeDtype, ModelKind};
use metatrain_common::layout::{ModelSpec, CONV4_IMAGE_SIDE};
use tch::{Kind, Tensor};
use thiserror::Error;

use crate::algo::{InnerLoop, TaskOutput, TaskTensors};
use crate::model::{batch_norm_relu, TargetTensor, NORM_EPS};

#[derive(Debug, Error, PartialEq)]
pub enum BatchError {
    #[error("a batch needs at least one task")]
    Empty,
    #[error("task {index} has {what} of shape {got:?}, the batch's first task {expected:?}")]
    Mismatch { index: usize, what: &'static str, expected: Vec<i64>, got: Vec<i64> },
    #[error("task {index} mixes regression and classification targets with the batch's first task")]
    MixedTargets { index: usize },
}

/// T tasks stacked along a leading task dimension: inputs `[T, n, ...]`, targets `[T, n, 1]` (regression)
/// or `[T, n]` (class labels).
pub struct TaskBatch {
    pub support_x: Tensor,
    pub support_y: TargetTensor,
    pub query_x: Tensor,
    pub query_y: TargetTensor,
}

impl TaskBatch {
    /// Stacks tasks whose tensors all have the same shapes (true of every task of one run's distribution).
    pub fn stack(tasks: &[TaskTensors]) -> Result<TaskBatch, BatchError> {
        let first = tasks.first().ok_or(BatchError::Empty)?;
        let stack_x = |what: &'static str, get: &dyn Fn(&TaskTensors) -> &Tensor| {
            same_shapes(tasks, what, |t| get(t).size())?;
            Ok(Tensor::stack(&tasks.iter().map(get).collect::<Vec<_>>(), 0))
        };
        let stack_y = |what: &'static str, get: &dyn Fn(&TaskTensors) -> &TargetTensor| {
            let parts: Vec<&Tensor> = tasks
                .iter()
                .enumerate()
                .map(|(index, t)| match (get(first), get(t)) {
                    (TargetTensor::Real(_), TargetTensor::Real(y))
                    | (TargetTensor::Class(_), TargetTensor::Class(y)) => Ok(y),
                    _ => Err(BatchError::MixedTargets { index }),
                })
                .collect::<Result<_, _>>()?;
            same_shapes(tasks, what, |t| target(get(t)).size())?;
            let stacked = Tensor::stack(&parts, 0);
            Ok(match get(first) {
                TargetTensor::Real(_) => TargetTensor::Real(stacked),
                TargetTensor::Class(_) => TargetTensor::Class(stacked),
            })
        };
        Ok(TaskBatch {
            support_x: stack_x("support inputs", &|t| &t.support_x)?,
            support_y: stack_y("support targets", &|t| &t.support_y)?,
            query_x: stack_x("query inputs", &|t| &t.query_x)?,
            query_y: stack_y("query targets", &|t| &t.query_y)?,
        })
    }

    /// Number of tasks.
    pub fn len(&self) -> usize {
        self.support_x.size()[0] as usize
    }
}

/// Smallest batch computed: a lone task is padded with a copy of itself (see the module docs).
pub const MIN_BATCH: usize = 2;

impl TaskBatch {
    /// This batch with its tasks repeated up to [`MIN_BATCH`] (only a batch of one changes).
    fn padded(&self) -> Option<TaskBatch> {
        let missing = MIN_BATCH.saturating_sub(self.len());
        if missing == 0 {
            return None;
        }
        let pad = |t: &Tensor| {
            Tensor::cat(&[t.shallow_clone(), t.narrow(0, 0, 1).repeat_interleave_self_int(missing as i64, 0, None)], 0)
        };
        let pad_y = |y: &TargetTensor| match y {
            TargetTensor::Real(t) => TargetTensor::Real(pad(t)),
            TargetTensor::Class(t) => TargetTensor::Class(pad(t)),
        };
        Some(TaskBatch {
            support_x: pad(&self.support_x),
            support_y: pad_y(&self.support_y),
            query_x: pad(&self.query_x),
            query_y: pad_y(&self.query_y),
        })
    }
}

fn target(y: &TargetTensor) -> &Tensor {
    match y {
        TargetTensor::Real(t) | TargetTensor::Class(t) => t,
    }
}

fn same_shapes(
    tasks: &[TaskTensors],
    what: &'static str,
    shape: impl Fn(&TaskTensors) -> Vec<i64>,
) -> Result<(), BatchError> {
    let expected = shape(&tasks[0]);
    for (index, t) in tasks.iter().enumerate().skip(1) {
        let got = shape(t);
        if got != expected {
            return Err(BatchError::Mismatch { index, what, expected, got });
        }
    }
    Ok(())
}

/// `x @ wᵀ + b` per task: x `[T, n, in]`, w `[T, out, in]`, b `[T, out]` → `[T, n, out]`. The product
/// runs in `p`'s element type, the sum in the parameters'.
fn linear(x: &Tensor, w: &Tensor, b: &Tensor, p: ComputeDtype) -> Tensor {
    low(x, p).bmm(&low(w, p).transpose(1, 2)).to_kind(b.kind()) + b.unsqueeze(1)
}

/// Mixed precision as autocast does it: matrix products and convolutions take bf16 inputs (with
/// `compute_dtype = "bf16"`); parameters, normalisation, losses and the inner updates stay f32, and
/// gradients flow back through the casts. With f32 this is the identity.
fn low(t: &Tensor, p: ComputeDtype) -> Tensor {
    match p {
        ComputeDtype::F32 => t.shallow_clone(),
        ComputeDtype::Bf16 => t.to_kind(Kind::BFloat16),
    }
}

/// LayerNorm over the last dimension with per-task affine parameters `[T, width]`.
fn layer_norm(h: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
    let width = h.size()[2];
    h.layer_norm([width], None::<&Tensor>, None::<&Tensor>, NORM_EPS, false) * w.unsqueeze(1) + b.unsqueeze(1)
}

/// Outputs `[T, n, outputs]` of T models (parameters `[T, ...]`) on their own inputs `[T, n, ...]`.
pub fn forward(spec: &ModelSpec, params: &[Tensor], x: &Tensor, p: ComputeDtype) -> Tensor {
    match spec.kind {
        ModelKind::Mlp => {
            let h = linear(x, &params[0], &params[1], p).relu();
            let h = linear(&h, &params[2], &params[3], p).relu();
            linear(&h, &params[4], &params[5], p)
        }
        ModelKind::MlpLn => {
            let h = layer_norm(&linear(x, &params[0], &params[1], p), &params[2], &params[3]).relu();
            let h = layer_norm(&linear(&h, &params[4], &params[5], p), &params[6], &params[7]).relu();
            linear(&h, &params[8], &params[9], p)
        }
        ModelKind::Conv4 => conv4(params, x, p),
    }
}

/// conv4 with the tasks as convolution groups: activations are `[n, T·C, H, W]` throughout.
fn conv4(params: &[Tensor], x: &Tensor, precision: ComputeDtype) -> Tensor {
    let (tasks, n) = (x.size()[0], x.size()[1]);
    let side = CONV4_IMAGE_SIDE as i64;
    let kind = params[0].kind();
    // [T, n, 1, 28, 28] → [n, T, 28, 28]: task t's images are channel t.
    let mut h = x.reshape([tasks, n, side, side]).transpose(0, 1);
    for block in 0..4 {
        let p = &params[4 * block..4 * block + 4];
        h = if block == 0 {
            // One input channel per task: a grouped convolution would round differently depending on the
            // number of groups (measured: ~2e-6), making a task's result depend on its batch.
            conv_as_matmul(&h, &p[0], &p[1], precision)
        } else {
            // 64 channels per task: grouped convolution is 1.5× faster than patches × weights (measured
            // on conv4 MAML, 16 tasks). Batch-invariant on some CPUs, not all (a lone task ~6e-7 off on
            // AMD Zen, tested to tolerance); CPU workers compute conv4 per task, so only GPUs run this.
            let w = p[0].size(); // [T, out, in, 3, 3]
            low(&h, precision).conv2d(
                &low(&p[0].reshape([tasks * w[1], w[2], w[3], w[4]]), precision),
                Some(&low(&p[1].reshape([-1]), precision)),
                [2, 2],
                [1, 1],
                [1, 1],
                tasks,
            )
        }
        .to_kind(kind);
        h = batch_norm_relu(&h, &p[2].reshape([-1]), &p[3].reshape([-1]));
    }
    // [n, T·C, s, s] → [T, n, C·s·s], each task's features in the per-task model's flatten order.
    let features = h.reshape([n, tasks, -1]).transpose(0, 1);
    linear(&features, &params[16], &params[17], precision)
}

/// A 3×3, stride-2, padding-1 convolution per task as patches times weights: `x` `[n, T·C, H, W]`,
/// weights `[T, out, C, 3, 3]`, bias `[T, out]` → `[n, T·out, H', W']`.
fn conv_as_matmul(x: &Tensor, weight: &Tensor, bias: &Tensor, precision: ComputeDtype) -> Tensor {
    let (n, side) = (x.size()[0], x.size()[2]);
    let (tasks, out, cin) = (weight.size()[0], weight.size()[1], weight.size()[2]);
    let out_side = (side + 2 - 3) / 2 + 1;
    // [n, T·C·9, L] → [T, C·9, n·L]
    let patches = x
        .im2col([3, 3], [1, 1], [1, 1], [2, 2])
        .reshape([n, tasks, cin * 9, -1])
        .permute([1, 2, 0, 3])
        .reshape([tasks, cin * 9, -1]);
    let h = low(&weight.reshape([tasks, out, cin * 9]), precision).bmm(&low(&patches, precision)).to_kind(bias.kind())
        + bias.unsqueeze(2); // [T, out, n·L]
    h.reshape([tasks, out, n, out_side, out_side]).permute([2, 0, 1, 3, 4]).reshape([
        n,
        tasks * out,
        out_side,
        out_side,
    ])
}

/// Each task's mean loss, `[T]`: MSE for regression, cross-entropy for classification.
pub fn losses(outputs: &Tensor, targets: &TargetTensor) -> Tensor {
    match targets {
        TargetTensor::Real(y) => (outputs - y).square().mean_dim([1i64, 2].as_slice(), false, outputs.kind()),
        TargetTensor::Class(labels) => {
            let log_p = outputs.log_softmax(-1, outputs.kind());
            -log_p.gather(2, &labels.unsqueeze(-1), false).squeeze_dim(-1).mean_dim(
                [1i64].as_slice(),
                false,
                outputs.kind(),
            )
        }
    }
}

/// Each task's accuracy, `[T]` (classification only).
fn accuracies(outputs: &Tensor, targets: &TargetTensor) -> Option<Vec<f64>> {
    match targets {
        TargetTensor::Real(_) => None,
        TargetTensor::Class(labels) => {
            let correct = outputs.argmax(-1, false).eq_tensor(labels).to_kind(Kind::Double);
            Vec::<f64>::try_from(correct.mean_dim([1i64].as_slice(), false, Kind::Double)).ok()
        }
    }
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(t.detach().to_kind(Kind::Double)).unwrap_or_default()
}

/// `tasks` leaf copies of every parameter, stacked: `[...]` → `[tasks, ...]`, requiring grad.
fn stacked_leaves(params: &[Tensor], tasks: i64) -> Vec<Tensor> {
    params
        .iter()
        .map(|p| {
            let mut repeats = vec![tasks];
            repeats.extend(std::iter::repeat_n(1, p.dim()));
            p.detach().unsqueeze(0).repeat(repeats.as_slice()).set_requires_grad(true)
        })
        .collect()
}

fn clamp(g: Tensor, c: f64) -> Tensor {
    if c.is_finite() {
        g.clamp(-c, c)
    } else {
        g
    }
}

/// The meta-gradients of all tasks in `batch` at the shared initial parameters `params` (per-task
/// shapes): one [`TaskOutput`] per task, in batch order, as [`crate::algo::meta_gradient`] gives them.
pub fn meta_gradients(
    spec: &ModelSpec,
    algo: AlgoKind,
    params: &[Tensor],
    batch: &TaskBatch,
    inner: &InnerLoop,
    precision: ComputeDtype,
) -> Vec<TaskOutput> {
    let wanted = batch.len();
    let padded = batch.padded();
    let batch = padded.as_ref().unwrap_or(batch);
    let tasks = batch.len() as i64;
    let theta = stacked_leaves(params, tasks);
    let (pre_losses, pre_accuracies) = tch::no_grad(|| {
        let out = forward(spec, &theta, &batch.query_x, precision);
        (values(&losses(&out, &batch.query_y)), accuracies(&out, &batch.query_y))
    });
    let second_order = matches!(algo, AlgoKind::Maml);
    let mut fast: Vec<Tensor> = theta.iter().map(|p| p.shallow_clone()).collect();
    for _ in 0..inner.steps {
        let support_loss =
            losses(&forward(spec, &fast, &batch.support_x, precision), &batch.support_y).sum(fast[0].kind());
        let grads = Tensor::run_backward(&[&support_loss], &fast, second_order, second_order);
        fast = fast.iter().zip(grads).map(|(p, g)| p - clamp(g, inner.clamp) * inner.lr).collect();
    }
    let out = forward(spec, &fast, &batch.query_x, precision);
    let query_losses = losses(&out, &batch.query_y);
    let post_accuracies = tch::no_grad(|| accuracies(&out, &batch.query_y));
    let post_losses = values(&query_losses);
    let meta = Tensor::run_backward(&[&query_losses.sum(query_losses.kind())], &theta, false, false);
    let per_task = |t: i64| Some(meta.iter().map(|g| g.get(t)).collect());
    outputs(wanted, (pre_losses, pre_accuracies), (post_losses, post_accuracies), per_task)
}

/// Per-task losses and accuracies of the batch (accuracy for classification only).
type Figures = (Vec<f64>, Option<Vec<f64>>);

/// The first `wanted` tasks' outputs (the rest are padding).
fn outputs(
    wanted: usize,
    (pre_losses, pre_accuracies): Figures,
    (post_losses, post_accuracies): Figures,
    meta_gradient: impl Fn(i64) -> Option<Vec<Tensor>>,
) -> Vec<TaskOutput> {
    (0..wanted)
        .map(|t| TaskOutput {
            meta_gradient: meta_gradient(t as i64),
            pre_loss: pre_losses[t],
            post_loss: post_losses[t],
            pre_accuracy: pre_accuracies.as_ref().map(|a| a[t]),
            post_accuracy: post_accuracies.as_ref().map(|a| a[t]),
        })
        .collect()
}

/// Meta-testing for all tasks in `batch`: losses (and accuracy) before and after first-order adaptation,
/// no meta-gradient; one [`TaskOutput`] per task, as [`crate::algo::evaluate_task`] gives them.
pub fn evaluate(
    spec: &ModelSpec,
    params: &[Tensor],
    batch: &TaskBatch,
    inner: &InnerLoop,
    precision: ComputeDtype,
) -> Vec<TaskOutput> {
    let wanted = batch.len();
    let padded = batch.padded();
    let batch = padded.as_ref().unwrap_or(batch);
    let tasks = batch.len() as i64;
    let mut fast = stacked_leaves(params, tasks);
    let measure = |p: &[Tensor]| {
        tch::no_grad(|| {
            let out = forward(spec, p, &batch.query_x, precision);
            (values(&losses(&out, &batch.query_y)), accuracies(&out, &batch.query_y))
        })
    };
    let pre = measure(&fast);
    for _ in 0..inner.steps {
        let support_loss =
            losses(&forward(spec, &fast, &batch.support_x, precision), &batch.support_y).sum(fast[0].kind());
        let grads = Tensor::run_backward(&[&support_loss], &fast, false, false);
        fast = fast
            .iter()
            .zip(grads)
            .map(|(p, g)| (p - clamp(g, inner.clamp) * inner.lr).detach().set_requires_grad(true))
            .collect();
    }
    let post = measure(&fast);
    outputs(wanted, pre, post, |_| None)
}
