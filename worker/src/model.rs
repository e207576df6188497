//! Functional models: `forward(spec, params, x)` over an explicit, ordered parameter list (the
//! [`ParamLayout`](metatrain_common::layout::ParamLayout) order), so that the inner loop can run the same
//! model on adapted parameters and autograd can differentiate through them.
//!
//! **Batch norm in `conv4`.** Every forward pass normalises with the statistics of the batch it is given
//! (the support set while adapting, the query set when evaluating) and keeps no running statistics, as in
//! MAML's reference implementation and learn2learn. The model therefore has no state besides its
//! parameters; the batch-norm scale and shift are ordinary parameters that adapt in the inner loop. At
//! meta-test time this is the transductive setting the published Omniglot numbers use.

use metatrain_common::config::ModelKind;
use metatrain_common::layout::{ModelSpec, CONV4_IMAGE_SIDE};
use tch::{Kind, Tensor};

/// LayerNorm and batch-norm epsilon (PyTorch's default).
pub const NORM_EPS: f64 = 1e-5;

/// Model outputs for inputs `x` (`[n, features]` for the MLPs, `[n, 1, 28, 28]` for conv4).
pub fn forward(spec: &ModelSpec, params: &[Tensor], x: &Tensor) -> Tensor {
    match spec.kind {
        ModelKind::Mlp => {
            let h = x.linear(&params[0], Some(&params[1])).relu();
            let h = h.linear(&params[2], Some(&params[3])).relu();
            h.linear(&params[4], Some(&params[5]))
        }
        ModelKind::MlpLn => {
            let width = params[1].size()[0];
            let h = x.linear(&params[0], Some(&params[1]));
            let h = h.layer_norm([width], Some(&params[2]), Some(&params[3]), NORM_EPS, false).relu();
            let h = h.linear(&params[4], Some(&params[5]));
            let h = h.layer_norm([width], Some(&params[6]), Some(&params[7]), NORM_EPS, false).relu();
            h.linear(&params[8], Some(&params[9]))
        }
        ModelKind::Conv4 => {
            let n = x.size()[0];
            let side = CONV4_IMAGE_SIDE as i64;
            let mut h = x.reshape([n, 1, side, side]);
            for block in 0..4 {
                let p = &params[4 * block..4 * block + 4];
                h = batch_norm_relu(&h.conv2d(&p[0], Some(&p[1]), [2, 2], [1, 1], [1, 1], 1), &p[2], &p[3]);
            }
            h.flatten(1, -1).linear(&params[16], Some(&params[17]))
        }
    }
}

/// Batch norm with the statistics of `h` itself (no running statistics), per-channel scale and shift,
/// then ReLU: conv4's block ending, for one task (`[n, C, H, W]`) or for tasks as channel groups.
pub fn batch_norm_relu(h: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
    Tensor::batch_norm(h, Some(weight), Some(bias), None::<&Tensor>, None::<&Tensor>, true, 0.0, NORM_EPS, false).relu()
}

/// Targets as tensors: regression values `[n, 1]` or class labels `[n]` (int64).
pub enum TargetTensor {
    Real(Tensor),
    Class(Tensor),
}

/// Mean loss of `outputs` against `targets`: MSE for regression, cross-entropy for classification.
pub fn loss(outputs: &Tensor, targets: &TargetTensor) -> Tensor {
    match targets {
        TargetTensor::Real(y) => (outputs - y).square().mean(outputs.kind()),
        // Not tch's `cross_entropy_for_logits`: it computes log-softmax in f32 whatever the input dtype.
        TargetTensor::Class(labels) => outputs.log_softmax(-1, outputs.kind()).nll_loss(labels),
    }
}

/// Fraction of correct predictions (classification only).
pub fn accuracy(outputs: &Tensor, targets: &TargetTensor) -> Option<f64> {
    match targets {
        TargetTensor::Real(_) => None,
        TargetTensor::Class(labels) => {
            let correct = outputs.argmax(-1, false).eq_tensor(labels).to_kind(Kind::Double).mean(Kind::Double);
            Some(correct.double_value(&[]))
        }
    }
}

/// What the algorithms adapt: a functional model over an ordered list of tensors (the run's model, or
/// LoRA adapters of a frozen base).
pub trait Net {
    /// Outputs for inputs `x` given the net's tensors `params`.
    fn forward(&self, params: &[Tensor], x: &Tensor) -> Tensor;
    /// How many leading meta-parameters are the net's own tensors (the rest are learned inner rates).
    fn n_tensors(&self) -> usize;
    /// Outputs at inner step `step` (0: before adapting, k: after k steps). The same at every step but
    /// for MAML++'s per-step batch norm ([`PerStepBn`]).
    fn forward_at(&self, params: &[Tensor], x: &Tensor, _step: usize) -> Tensor {
        self.forward(params, x)
    }
    /// Whether the inner loop may move tensor `i` (per-step batch-norm tensors are meta-learned only).
    fn adapts(&self, _i: usize) -> bool {
        true
    }
}

impl Net for ModelSpec {
    fn forward(&self, params: &[Tensor], x: &Tensor) -> Tensor {
        forward(self, params, x)
    }

    fn n_tensors(&self) -> usize {
        self.layout().params.len()
    }
}

/// LoRA: a frozen base model whose weights (every tensor of two or more dimensions) each get a
/// low-rank update: W + scale·(B·A) reshaped to W's shape, with A `[r, fan_in]` and B `[out, r]` the
/// net's tensors (in [`metatrain_common::layout::lora_layout`] order).
pub struct LoraNet {
    spec: ModelSpec,
    base: Vec<Tensor>,
    /// Indices of the base tensors that carry adapters, in adapter order.
    targets: Vec<usize>,
    scale: f64,
}

impl LoraNet {
    /// `base`: the model's tensors in layout order (constants: they are not differentiated).
    pub fn new(spec: ModelSpec, base: Vec<Tensor>, scale: f64) -> LoraNet {
        let targets = base.iter().enumerate().filter(|(_, t)| t.dim() >= 2).map(|(i, _)| i).collect();
        LoraNet { spec, base, targets, scale }
    }

    /// The model's tensors with the adapters `adapters` applied.
    pub fn compose(&self, adapters: &[Tensor]) -> Vec<Tensor> {
        let mut out: Vec<Tensor> = self.base.iter().map(|t| t.shallow_clone()).collect();
        for (j, &i) in self.targets.iter().enumerate() {
            let (a, b) = (&adapters[2 * j], &adapters[2 * j + 1]);
            out[i] = &self.base[i] + b.mm(a).reshape(self.base[i].size()) * self.scale;
        }
        out
    }
}

impl Net for LoraNet {
    fn forward(&self, params: &[Tensor], x: &Tensor) -> Tensor {
        forward(&self.spec, &self.compose(params), x)
    }

    fn n_tensors(&self) -> usize {
        2 * self.targets.len()
    }
}

/// MAML++'s per-step batch-norm weights and biases (BNWB) on conv4: each batch-norm scale and shift holds
/// one row per inner step, `[K + 1, C]`; row k is used at step k (row K after the last step). They are
/// meta-learned, not adapted by the inner loop (as in MAML++). Statistics are always the batch's own.
pub struct PerStepBn {
    spec: ModelSpec,
    /// Indices of the batch-norm tensors.
    bn: Vec<usize>,
    /// K: rows are 0..=K.
    steps: usize,
}

impl PerStepBn {
    pub fn new(spec: ModelSpec, steps: usize) -> PerStepBn {
        let bn =
            spec.layout().params.iter().enumerate().filter(|(_, p)| p.name.starts_with("bn")).map(|(i, _)| i).collect();
        PerStepBn { spec, bn, steps }
    }
}

impl Net for PerStepBn {
    fn forward(&self, params: &[Tensor], x: &Tensor) -> Tensor {
        self.forward_at(params, x, self.steps)
    }

    fn n_tensors(&self) -> usize {
        self.spec.layout().params.len()
    }

    fn forward_at(&self, params: &[Tensor], x: &Tensor, step: usize) -> Tensor {
        let row = step.min(self.steps) as i64;
        let at: Vec<Tensor> = params
            .iter()
            .enumerate()
            .map(|(i, t)| if self.bn.contains(&i) { t.get(row) } else { t.shallow_clone() })
            .collect();
        forward(&self.spec, &at, x)
    }

    fn adapts(&self, i: usize) -> bool {
        !self.bn.contains(&i)
    }
}
