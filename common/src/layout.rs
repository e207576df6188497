//! Parameter layouts: which named tensors a model has, their shapes, and their order on the wire.
//!
//! Parameters travel and are stored as one flat `f32` vector, tensors concatenated in layout order. Both
//! sides build the layout from the run's config with [`meta_layout`] (the model's [`ModelSpec::layout`],
//! then any meta-parameters the algorithm adds); a payload is checked against it before use
//! ([`crate::tensor`]). Initial parameters are a pure function of (model spec, seed) so that
//! the coordinator makes them without libtorch, identically on every machine.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{AlgoConfig, Config, ModelConfig, ModelKind, TaskConfig};
use crate::rng::{keyed_rng, uniform};

/// One named tensor of a model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The ordered list of a model's parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamLayout {
    pub params: Vec<ParamSpec>,
}

impl ParamLayout {
    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.params.iter().map(ParamSpec::numel).sum()
    }

    /// `(offset, len)` of each tensor in the flat vector, in layout order.
    pub fn ranges(&self) -> Vec<(usize, usize)> {
        let mut off = 0;
        self.params
            .iter()
            .map(|p| {
                let r = (off, p.numel());
                off += p.numel();
                r
            })
            .collect()
    }

    /// SHA-256 over names and shapes: two sides agree on the layout iff this agrees.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for p in &self.params {
            h.update(p.name.as_bytes());
            h.update([0u8]);
            for d in &p.shape {
                h.update((*d as u64).to_le_bytes());
            }
            h.update([0xffu8]);
        }
        hex::encode(h.finalize())
    }
}

/// What a model looks like for one run: its kind and the shapes its task distribution implies.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    pub kind: ModelKind,
    /// Features per sample for the MLPs (1 for sinusoid, 2 for noisy-linear).
    pub in_features: usize,
    /// Outputs per sample: 1 for regression, N for N-way classification.
    pub outputs: usize,
}

/// Width of the hidden layers of `mlp` (MAML's 40) and `mlp-ln` (64).
pub const MLP_HIDDEN: usize = 40;
pub const MLP_LN_HIDDEN: usize = 64;
/// Filters per conv block of `conv4` (MAML's Omniglot net).
pub const CONV4_FILTERS: usize = 64;
/// Side of the square grayscale images `conv4` takes (Omniglot resized to 28×28).
pub const CONV4_IMAGE_SIDE: usize = 28;
/// Spatial side after four stride-2 3×3 convolutions with padding 1: 28 → 14 → 7 → 4 → 2.
pub const CONV4_FINAL_SIDE: usize = 2;

impl ModelSpec {
    pub fn from_config(config: &Config) -> Self {
        let (in_features, outputs) = match &config.task {
            TaskConfig::Sinusoid(_) => (1, 1),
            TaskConfig::NoisyLinear(_) => (2, 1),
            TaskConfig::Omniglot(o) => (CONV4_IMAGE_SIDE * CONV4_IMAGE_SIDE, o.n_way),
            TaskConfig::Images(i) => (CONV4_IMAGE_SIDE * CONV4_IMAGE_SIDE, i.n_way),
        };
        ModelSpec { kind: config.model.name, in_features, outputs }
    }

    pub fn layout(&self) -> ParamLayout {
        let p = |name: &str, shape: &[usize]| ParamSpec { name: name.to_string(), shape: shape.to_vec() };
        let params = match self.kind {
            ModelKind::Mlp => {
                let h = MLP_HIDDEN;
                vec![
                    p("layer1.weight", &[h, self.in_features]),
                    p("layer1.bias", &[h]),
                    p("layer2.weight", &[h, h]),
                    p("layer2.bias", &[h]),
                    p("layer3.weight", &[self.outputs, h]),
                    p("layer3.bias", &[self.outputs]),
                ]
            }
            ModelKind::MlpLn => {
                let h = MLP_LN_HIDDEN;
                vec![
                    p("layer1.weight", &[h, self.in_features]),
                    p("layer1.bias", &[h]),
                    p("norm1.weight", &[h]),
                    p("norm1.bias", &[h]),
                    p("layer2.weight", &[h, h]),
                    p("layer2.bias", &[h]),
                    p("norm2.weight", &[h]),
                    p("norm2.bias", &[h]),
                    p("layer3.weight", &[self.outputs, h]),
                    p("layer3.bias", &[self.outputs]),
                ]
            }
            ModelKind::Conv4 => {
                let f = CONV4_FILTERS;
                let mut v = Vec::new();
                for i in 1..=4 {
                    let cin = if i == 1 { 1 } else { f };
                    v.push(p(&format!("conv{i}.weight"), &[f, cin, 3, 3]));
                    v.push(p(&format!("conv{i}.bias"), &[f]));
                    v.push(p(&format!("bn{i}.weight"), &[f]));
                    v.push(p(&format!("bn{i}.bias"), &[f]));
                }
                let side = CONV4_FINAL_SIDE;
                v.push(p("head.weight", &[self.outputs, f * side * side]));
                v.push(p("head.bias", &[self.outputs]));
                v
            }
        };
        ParamLayout { params }
    }

    /// Initial meta-parameters, a pure function of (spec, seed).
    ///
    /// - `mlp`: PyTorch's `nn.Linear` default, U(−1/√fan_in, 1/√fan_in) for weights and biases (what the
    ///   PyTorch MAML re-implementations use; MAML's TF code used N(0, 0.01²) weights).
    /// - `mlp-ln`: Xavier-uniform weights with gain 0.01, zero biases, LayerNorm weight 1 and bias 0.
    /// - `conv4`: Xavier-uniform conv and head weights (gain 1), zero biases, batch-norm weight 1, bias 0.
    pub fn init_params(&self, seed: u64) -> Vec<f32> {
        /// Key that separates the initialisation stream from task streams.
        const INIT_STREAM: u64 = 0x1417;
        let layout = self.layout();
        let mut out = Vec::with_capacity(layout.numel());
        for (i, spec) in layout.params.iter().enumerate() {
            let mut rng = keyed_rng(&[seed, INIT_STREAM, i as u64]);
            let n = spec.numel();
            let leaf = spec.name.rsplit('.').next().unwrap_or("");
            let is_norm = spec.name.starts_with("norm") || spec.name.starts_with("bn");
            let (fan_in, fan_out) = fans(&spec.shape);
            let values: Vec<f32> = match (self.kind, is_norm, leaf) {
                (_, true, "weight") => vec![1.0; n],
                (_, true, _) => vec![0.0; n],
                (ModelKind::Mlp, false, "weight") => {
                    let b = 1.0 / (fan_in as f64).sqrt();
                    (0..n).map(|_| uniform(&mut rng, -b, b) as f32).collect()
                }
                (ModelKind::Mlp, false, _) => {
                    // A bias's fan-in is that of the weight before it: the previous tensor's second dim.
                    let w_fan_in = layout.params[i - 1].shape[1];
                    let b = 1.0 / (w_fan_in as f64).sqrt();
                    (0..n).map(|_| uniform(&mut rng, -b, b) as f32).collect()
                }
                (kind, false, "weight") => {
                    let gain = if kind == ModelKind::MlpLn { 0.01 } else { 1.0 };
                    let b = gain * (6.0 / (fan_in + fan_out) as f64).sqrt();
                    (0..n).map(|_| uniform(&mut rng, -b, b) as f32).collect()
                }
                (_, false, _) => vec![0.0; n],
            };
            out.extend(values);
        }
        out
    }
}

/// Name prefix of learned inner learning rates: `inner_lr.<parameter>`, shaped like the parameter
/// (Meta-SGD: a rate per entry) or `[inner_steps]` (MAML++'s per-step rates: one per tensor and step).
pub const LEARNED_LR_PREFIX: &str = "inner_lr.";

/// Whether a model tensor is a batch-norm scale or shift (conv4's `bn<i>.weight` / `bn<i>.bias`).
fn is_batch_norm(name: &str) -> bool {
    name.starts_with("bn")
}

/// Name prefix of LoRA adapters: `lora.<weight>.a` (`[r, fan_in]`) and `lora.<weight>.b` (`[out, r]`).
pub const LORA_PREFIX: &str = "lora.";

/// The LoRA adapters of `spec`'s weights (every tensor of two or more dimensions: linear and conv
/// weights), A then B per weight, in layout order. The adapted weight is W + scale·(B·A) reshaped to W.
pub fn lora_layout(spec: &ModelSpec, rank: usize) -> ParamLayout {
    let mut params = Vec::new();
    for p in spec.layout().params.into_iter().filter(|p| p.shape.len() >= 2) {
        let fan: usize = p.shape[1..].iter().product();
        params.push(ParamSpec { name: format!("{LORA_PREFIX}{}.a", p.name), shape: vec![rank, fan] });
        params.push(ParamSpec { name: format!("{LORA_PREFIX}{}.b", p.name), shape: vec![p.shape[0], rank] });
    }
    ParamLayout { params }
}

/// The meta-parameters a run learns: the model's parameters (LoRA: the adapters, of a frozen base),
/// then any learned inner rates (Meta-SGD, `algo.per_step_lrs`), one tensor per adapting tensor, in the
/// same order (ANIL adapts only the head, the last two tensors).
pub fn meta_layout(spec: &ModelSpec, model: &ModelConfig, algo: &AlgoConfig) -> ParamLayout {
    let mut layout = if model.lora() { lora_layout(spec, model.lora_rank) } else { spec.layout() };
    if algo.per_step_bn {
        for p in layout.params.iter_mut().filter(|p| is_batch_norm(&p.name)) {
            p.shape.insert(0, algo.inner_steps + 1);
        }
    }
    let n = layout.params.len();
    let adapts = |i: usize| !algo.name.head_only() || i + 2 >= n;
    let rate_shape = |p: &ParamSpec| {
        if algo.name.learns_inner_lr() {
            Some(p.shape.clone())
        } else if algo.per_step_lrs {
            Some(vec![algo.inner_steps])
        } else {
            None
        }
    };
    let rates: Vec<ParamSpec> = layout
        .params
        .iter()
        .enumerate()
        .filter(|(i, _)| adapts(*i))
        .filter_map(|(_, p)| {
            rate_shape(p).map(|shape| ParamSpec { name: format!("{LEARNED_LR_PREFIX}{}", p.name), shape })
        })
        .collect();
    layout.params.extend(rates);
    layout
}

/// Initial meta-parameters: [`ModelSpec::init_params`] (LoRA: A uniform in ±1/√fan_in, B zero, so the
/// adapted model starts as the base), then every learned rate at `algo.inner_lr`.
pub fn meta_init(spec: &ModelSpec, model: &ModelConfig, algo: &AlgoConfig, seed: u64) -> Vec<f32> {
    /// Key that separates LoRA's initialisation stream from the model's and the tasks'.
    const LORA_STREAM: u64 = 0x10_4A;
    let mut params = if model.lora() {
        let mut out = Vec::new();
        for (i, p) in lora_layout(spec, model.lora_rank).params.iter().enumerate() {
            if p.name.ends_with(".a") {
                let mut rng = keyed_rng(&[seed, LORA_STREAM, i as u64]);
                let b = 1.0 / (p.shape[1] as f64).sqrt();
                out.extend((0..p.numel()).map(|_| uniform(&mut rng, -b, b) as f32));
            } else {
                out.extend(std::iter::repeat_n(0.0f32, p.numel()));
            }
        }
        out
    } else if algo.per_step_bn {
        // Every step's row starts as the model's batch-norm initialisation.
        let init = spec.init_params(seed);
        let mut out = Vec::with_capacity(init.len());
        for (p, (off, len)) in spec.layout().params.iter().zip(spec.layout().ranges()) {
            let rows = if is_batch_norm(&p.name) { algo.inner_steps + 1 } else { 1 };
            for _ in 0..rows {
                out.extend_from_slice(&init[off..off + len]);
            }
        }
        out
    } else {
        spec.init_params(seed)
    };
    let rates = meta_layout(spec, model, algo).numel() - params.len();
    params.extend(std::iter::repeat_n(algo.inner_lr as f32, rates));
    params
}

/// PyTorch's fan computation: dims 0 and 1 times the receptive field.
fn fans(shape: &[usize]) -> (usize, usize) {
    if shape.len() < 2 {
        return (shape.first().copied().unwrap_or(1), shape.first().copied().unwrap_or(1));
    }
    let rf: usize = shape[2..].iter().product();
    (shape[1] * rf, shape[0] * rf)
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// SHA-256 of parameters as little-endian f32 bytes in layout order (the run's `params_sha256`).
pub fn params_sha256(params: &[f32]) -> String {
    let mut h = Sha256::new();
    for v in params {
        h.update(v.to_le_bytes());
    }
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: ModelKind, inf: usize, out: usize) -> ModelSpec {
        ModelSpec { kind, in_features: inf, outputs: out }
    }

    #[test]
    fn layouts_have_the_documented_names_and_sizes() {
        let l = spec(ModelKind::Mlp, 1, 1).layout();
        assert_eq!(l.numel(), 40 + 40 + 1600 + 40 + 40 + 1);
        let l = spec(ModelKind::MlpLn, 2, 1).layout();
        let names: Vec<_> = l.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "layer1.weight",
                "layer1.bias",
                "norm1.weight",
                "norm1.bias",
                "layer2.weight",
                "layer2.bias",
                "norm2.weight",
                "norm2.bias",
                "layer3.weight",
                "layer3.bias"
            ]
        );
        let l = spec(ModelKind::Conv4, 784, 5).layout();
        assert_eq!(l.params[l.params.len() - 2].shape, vec![5, 256]);
        assert_eq!(l.numel(), 4 * 64 * 3 + 64 * 9 + 3 * 64 * 64 * 9 + 5 * 256 + 5);
    }

    #[test]
    fn init_is_deterministic_and_follows_the_spec() {
        let s = spec(ModelKind::MlpLn, 2, 1);
        let a = s.init_params(3);
        assert_eq!(a, s.init_params(3));
        assert_ne!(a, s.init_params(4));
        let l = s.layout();
        let r = l.ranges();
        // layer1.weight: Xavier bound 0.01 * sqrt(6 / (2 + 64)).
        let bound = 0.01 * (6.0f64 / 66.0).sqrt();
        let w = &a[r[0].0..r[0].0 + r[0].1];
        assert!(w.iter().all(|v| (*v as f64).abs() <= bound));
        assert!(w.iter().any(|v| (*v as f64).abs() > bound * 0.5));
        assert!(a[r[1].0..r[1].0 + r[1].1].iter().all(|v| *v == 0.0));
        assert!(a[r[2].0..r[2].0 + r[2].1].iter().all(|v| *v == 1.0));
        assert!(a[r[3].0..r[3].0 + r[3].1].iter().all(|v| *v == 0.0));
    }

    #[test]
    fn meta_sgd_adds_one_rate_per_parameter_at_the_inner_lr() {
        use crate::config::AlgoKind;
        let s = spec(ModelKind::Mlp, 1, 1);
        let m = ModelConfig::default();
        let mut algo = AlgoConfig { inner_lr: 0.03, ..AlgoConfig::default() };
        assert_eq!(meta_layout(&s, &m, &algo), s.layout());
        assert_eq!(meta_init(&s, &m, &algo, 7), s.init_params(7));
        algo.name = AlgoKind::MetaSgd;
        let l = meta_layout(&s, &m, &algo);
        assert_eq!(l.numel(), 2 * s.layout().numel());
        assert_eq!(l.params[6].name, "inner_lr.layer1.weight");
        assert_eq!(l.params[6].shape, l.params[0].shape);
        let init = meta_init(&s, &m, &algo, 7);
        let n = s.layout().numel();
        assert_eq!(init[..n], s.init_params(7)[..]);
        assert!(init[n..].iter().all(|v| *v == 0.03f32));
        // MAML++'s per-step rates: one per tensor and inner step.
        let lslr = AlgoConfig { inner_lr: 0.4, inner_steps: 3, per_step_lrs: true, ..AlgoConfig::default() };
        let l = meta_layout(&s, &m, &lslr);
        assert_eq!(l.params.len(), 12);
        assert_eq!((l.params[11].name.as_str(), l.params[11].shape.as_slice()), ("inner_lr.layer3.bias", &[3][..]));
        let init = meta_init(&s, &m, &lslr, 7);
        assert_eq!(init.len(), n + 18);
        assert!(init[n..].iter().all(|v| *v == 0.4f32));
        // ANIL adapts the head only: rates for its two tensors.
        let anil = AlgoConfig { name: AlgoKind::Anil, ..lslr };
        let names: Vec<String> = meta_layout(&s, &m, &anil).params.iter().skip(6).map(|p| p.name.clone()).collect();
        assert_eq!(names, ["inner_lr.layer3.weight", "inner_lr.layer3.bias"]);
    }

    #[test]
    fn lora_learns_rank_r_adapters_of_every_weight_starting_at_the_base() {
        let s = spec(ModelKind::Conv4, 784, 5);
        let m =
            ModelConfig { name: ModelKind::Conv4, lora_rank: 4, lora_base: Some("b".into()), ..ModelConfig::default() };
        let l = meta_layout(&s, &m, &AlgoConfig::default());
        let names: Vec<&str> = l.params.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names[..2], ["lora.conv1.weight.a", "lora.conv1.weight.b"]);
        assert_eq!(names.len(), 10, "four convs and the head, A and B each");
        assert_eq!((l.params[2].shape.clone(), l.params[3].shape.clone()), (vec![4, 64 * 9], vec![64, 4]));
        assert_eq!((l.params[8].shape.clone(), l.params[9].shape.clone()), (vec![4, 256], vec![5, 4]));
        assert_eq!(l.numel(), 4 * (9 + 64) + 3 * 4 * (576 + 64) + 4 * (256 + 5));
        assert!(l.numel() * 10 < s.layout().numel(), "the adapters are under a tenth of the model");
        let init = meta_init(&s, &m, &AlgoConfig::default(), 1);
        let r = l.ranges();
        assert!(init[r[1].0..r[1].0 + r[1].1].iter().all(|v| *v == 0.0), "B starts at zero");
        let a = &init[r[0].0..r[0].0 + r[0].1];
        assert!(a.iter().all(|v| v.abs() <= 1.0 / 3.0) && a.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn per_step_batch_norm_has_a_row_per_step_starting_at_the_models_init() {
        let s = spec(ModelKind::Conv4, 784, 5);
        let algo = AlgoConfig { inner_steps: 2, per_step_bn: true, ..AlgoConfig::default() };
        let l = meta_layout(&s, &ModelConfig::default(), &algo);
        assert_eq!(l.params[2].name, "bn1.weight");
        assert_eq!(l.params[2].shape, vec![3, 64]);
        assert_eq!(l.params[0].shape, vec![64, 1, 3, 3]);
        assert_eq!(l.numel(), s.layout().numel() + 8 * 64 * 2);
        let init = meta_init(&s, &ModelConfig::default(), &algo, 4);
        let r = l.ranges();
        let bn1w = &init[r[2].0..r[2].0 + r[2].1];
        let bn1b = &init[r[3].0..r[3].0 + r[3].1];
        assert!(bn1w.iter().all(|v| *v == 1.0) && bn1b.iter().all(|v| *v == 0.0));
        assert_eq!(&init[r[0].0..r[0].0 + r[0].1], &s.init_params(4)[..576]);
    }

    #[test]
    fn fingerprint_tracks_shapes() {
        assert_ne!(
            spec(ModelKind::Mlp, 1, 1).layout().fingerprint(),
            spec(ModelKind::Mlp, 2, 1).layout().fingerprint()
        );
    }
}
