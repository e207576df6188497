//! The run configuration: one struct the whole run reads, loaded from TOML, overridable key by key
//! (`--set train.meta_lr=0.0005`), and checked by [`Config::validate`], which names the field at fault.
//!
//! Every field documents its unit and default. The coordinator sends the validated TOML text to each
//! worker in its `Welcome`, and the worker validates it again before use.

use serde::{Deserialize, Serialize};
use thiserror::Error;

mod curriculum;
mod images;
mod model;
mod omniglot;
mod schedule;
pub use curriculum::{
    Aggregation, CorruptConfig, Corruption, CurriculumConfig, DefenceConfig, QuarantineMode, Schedule,
    MAX_DEFENCE_WINDOW,
};
pub use images::{ImagesTaskConfig, DEFAULT_EVAL_FRACTION, MAX_EPISODE_IMAGES, MAX_IMAGES_N_WAY};
pub use model::{ModelConfig, ModelKind, MAX_LORA_RANK};
pub use omniglot::{OmniglotSplit, OmniglotTaskConfig, OMNIGLOT_BACKGROUND_CHARACTERS};

#[derive(Debug, Error, PartialEq)]
pub enum ConfigError {
    #[error("config is not valid TOML or has a wrong field: {0}")]
    Parse(String),
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
    #[error("--set {0}: expected KEY=VALUE, e.g. train.meta_lr=0.001")]
    BadOverride(String),
}

pub(crate) fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.to_string(), message: message.into() }
}

/// A whole run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Run seed; every random choice of the run (initial parameters, tasks) derives from it. Default 0.
    pub seed: u64,
    /// The task distribution. Default: sinusoid.
    pub task: TaskConfig,
    pub model: ModelConfig,
    pub algo: AlgoConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
    pub cluster: ClusterConfig,
    pub checkpoint: CheckpointConfig,
    /// Which task difficulties the sampler draws as the run goes. Default: none (all from the start).
    pub curriculum: CurriculumConfig,
    /// Training tasks corrupted on purpose (experiments, tests). Default: none.
    pub corrupt: CorruptConfig,
    /// Outlier quarantine and robust aggregation of meta-gradients. Default: off, plain mean.
    pub defence: DefenceConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            seed: 0,
            task: TaskConfig::Sinusoid(RegressionTaskConfig::sinusoid_default()),
            model: ModelConfig::default(),
            algo: AlgoConfig::default(),
            train: TrainConfig::default(),
            eval: EvalConfig::default(),
            cluster: ClusterConfig::default(),
            checkpoint: CheckpointConfig::default(),
            curriculum: CurriculumConfig::default(),
            corrupt: CorruptConfig::default(),
            defence: DefenceConfig::default(),
        }
    }
}

/// Which task distribution, and its shape. `distribution` selects the variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "distribution", rename_all = "kebab-case")]
pub enum TaskConfig {
    /// y = A·sin(x + φ), A ~ U[0.1, 5], φ ~ U[0, π], x ~ U[−5, 5] (MAML's regression benchmark).
    Sinusoid(RegressionTaskConfig),
    /// y = x·w + b + σ·ε with x, w ~ N(0, I₂), b ~ N(0, 1), σ ~ U[0.01, 0.1] per task.
    NoisyLinear(RegressionTaskConfig),
    /// N-way K-shot episodes from the real Omniglot images (28×28, ink = 1.0).
    Omniglot(OmniglotTaskConfig),
    /// N-way K-shot episodes from a folder of the user's own PNG images (28×28, foreground = 1.0).
    Images(ImagesTaskConfig),
}

impl TaskConfig {
    /// A short description: `sinusoid`, `noisy-linear`, `omniglot 5-way 1-shot`.
    pub fn describe(&self) -> String {
        match self {
            TaskConfig::Sinusoid(_) => "sinusoid".into(),
            TaskConfig::NoisyLinear(_) => "noisy-linear".into(),
            TaskConfig::Omniglot(o) => format!("omniglot {}-way {}-shot", o.n_way, o.k_shot),
            TaskConfig::Images(i) => format!("images {}-way {}-shot", i.n_way, i.k_shot),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegressionTaskConfig {
    /// Support points per task. Default: 10 (sinusoid), 30 (noisy-linear).
    pub support: usize,
    /// Query points per task. Default: 10 (sinusoid), 20 (noisy-linear).
    pub query: usize,
}

impl RegressionTaskConfig {
    pub fn sinusoid_default() -> Self {
        RegressionTaskConfig { support: 10, query: 10 }
    }
    pub fn noisy_linear_default() -> Self {
        RegressionTaskConfig { support: 30, query: 20 }
    }
}

pub(crate) fn default_n_way() -> usize {
    5
}
pub(crate) fn default_k_shot() -> usize {
    1
}
pub(crate) fn default_q_query() -> usize {
    15
}

/// Meta-learning algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AlgoKind {
    /// Second-order MAML: the graph is kept through the inner loop.
    Maml,
    /// First-order MAML: the query gradient at the adapted parameters.
    Fomaml,
    /// Reptile (Nichol et al., 2018): the worker returns θ − θ′, the move *away from* the weights
    /// adapted on the support set, so that the coordinator's descent step moves the initialisation
    /// towards them. No second-order terms; the query set only scores the adaptation.
    Reptile,
    /// ANIL (Raghu et al., 2020): only the head (the last layer) adapts in the inner loop; the
    /// meta-gradient is second order and reaches the body through the head's adaptation.
    Anil,
    /// Meta-SGD (Li et al., 2017): every parameter has its own inner learning rate, a meta-parameter
    /// learned with the initialisation (second order). The rates start at `algo.inner_lr` and travel
    /// in the parameter layout as `inner_lr.<parameter>`.
    MetaSgd,
}

impl AlgoKind {
    pub fn name(self) -> &'static str {
        match self {
            AlgoKind::Maml => "maml",
            AlgoKind::Fomaml => "fomaml",
            AlgoKind::Reptile => "reptile",
            AlgoKind::Anil => "anil",
            AlgoKind::MetaSgd => "meta-sgd",
        }
    }

    /// Whether the meta-gradient differentiates through the inner loop's gradients.
    pub fn second_order(self) -> bool {
        matches!(self, AlgoKind::Maml | AlgoKind::Anil | AlgoKind::MetaSgd)
    }

    /// Whether the inner learning rates are meta-parameters (Meta-SGD).
    pub fn learns_inner_lr(self) -> bool {
        self == AlgoKind::MetaSgd
    }

    /// Whether only the head adapts in the inner loop (ANIL).
    pub fn head_only(self) -> bool {
        self == AlgoKind::Anil
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlgoConfig {
    /// `maml`, `fomaml`, `reptile`, `anil` or `meta-sgd` (see [`AlgoKind`]). Default `maml`.
    pub name: AlgoKind,
    /// SGD steps on the support loss during meta-training (K). Default 1.
    pub inner_steps: usize,
    /// Inner-loop SGD learning rate. Default 0.01.
    pub inner_lr: f64,
    /// Each inner gradient is clamped elementwise to [−c, c]. Default 10; `inf` turns clamping off.
    pub inner_grad_clamp: f64,
    /// Element type the workers compute in: `f32` (default) or `bf16` (mixed precision for GPUs with
    /// bf16 units: parameters and data are cast to bf16 for the inner loop and the meta-gradient, which
    /// is returned as f32). A run-wide setting, so every worker computes alike.
    pub compute_dtype: ComputeDtype,
    /// MAML++ multi-step loss: the meta-objective is a weighted sum of the query losses after every
    /// inner step, the weights annealed towards the final step's over `msl_anneal_steps` meta-steps
    /// ([`AlgoConfig::step_loss_weights`]). Default false.
    pub multi_step_loss: bool,
    /// Meta-steps over which the multi-step loss anneals to (almost) the final step alone. Default 1000.
    pub msl_anneal_steps: u64,
    /// MAML++ per-layer per-step learned inner rates (LSLR): one rate per parameter tensor and inner
    /// step, meta-learned with the initialisation (starting at `inner_lr`; in the layout as
    /// `inner_lr.<parameter>`, shape `[inner_steps]`). Evaluation then adapts `inner_steps` steps at the
    /// learned rates. Default false.
    pub per_step_lrs: bool,
    /// MAML++ derivative-order annealing: the first this many meta-steps are first order, the rest as
    /// the algorithm says (second order for maml, anil, meta-sgd). Default 0.
    pub first_order_steps: u64,
    /// MAML++ per-step batch norm (BNWB), conv4 only: each batch-norm scale and shift has one row per
    /// inner step (`[inner_steps + 1, C]` in the layout; row k used at step k), meta-learned and kept
    /// out of the inner loop; evaluation then adapts `inner_steps` steps. Statistics are always the
    /// batch's own (no running statistics to keep per step). Default false.
    pub per_step_bn: bool,
}

/// See [`AlgoConfig::compute_dtype`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
}

impl Default for AlgoConfig {
    fn default() -> Self {
        AlgoConfig {
            name: AlgoKind::Maml,
            inner_steps: 1,
            inner_lr: 0.01,
            inner_grad_clamp: 10.0,
            compute_dtype: ComputeDtype::F32,
            multi_step_loss: false,
            msl_anneal_steps: 1000,
            per_step_lrs: false,
            first_order_steps: 0,
            per_step_bn: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Meta-steps (outer updates). Default 1000.
    pub steps: u64,
    /// Tasks per meta-step (B). Default 25.
    pub meta_batch: usize,
    /// Adam learning rate of the outer update. Default 0.001.
    pub meta_lr: f64,
    /// Adam β₁. Default 0.9.
    pub adam_beta1: f64,
    /// Adam β₂. Default 0.999.
    pub adam_beta2: f64,
    /// Adam ε. Default 1e-8.
    pub adam_eps: f64,
    /// The averaged meta-gradient is rescaled to this global L2 norm when larger. Default 10.
    pub max_grad_norm: f64,
    /// `constant` (default) or `cosine`: the meta learning rate decays from `meta_lr` to `min_meta_lr`
    /// along a half cosine over `steps` (MAML++; [`TrainConfig::meta_lr_at`]).
    pub lr_schedule: LrSchedule,
    /// Final meta learning rate of the cosine schedule. Default 0.
    pub min_meta_lr: f64,
}

/// See [`TrainConfig::lr_schedule`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LrSchedule {
    #[default]
    Constant,
    Cosine,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            steps: 1000,
            meta_batch: 25,
            meta_lr: 0.001,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_eps: 1e-8,
            max_grad_norm: 10.0,
            lr_schedule: LrSchedule::Constant,
            min_meta_lr: 0.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Evaluate on held-out tasks every this many meta-steps; 0 = only at the end. Default 100.
    pub every: u64,
    /// Held-out tasks per periodic evaluation. Default 100.
    pub tasks: usize,
    /// Held-out tasks of the final evaluation (the report's `eval`). Default 600.
    pub final_tasks: usize,
    /// Inner steps when adapting at evaluation. Default 10. (Meta-SGD evaluates with `algo.inner_steps`
    /// steps at its learned rates: see [`Config::eval_inner_steps`].)
    pub inner_steps: usize,
    /// Inner learning rate at evaluation; absent = `algo.inner_lr`.
    pub inner_lr: Option<f64>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig { every: 100, tasks: 100, final_tasks: 600, inner_steps: 10, inner_lr: None }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Tasks a worker may hold at once (assigned, not yet returned). Default 4: enough to hide a round trip.
    pub tasks_in_flight: usize,
    /// A task not returned this many seconds after assignment is reassigned. Default 120.
    pub task_timeout_secs: f64,
    /// Element type of meta-gradients on the wire: `f32` (default, exact), `bf16` or `f16` (half the
    /// bytes; rounding error at most 2^-8 resp. 2^-11 relative per element in f16's normal range, f16
    /// flushing magnitudes below about 6e-8 to 0 and saturating at 65504).
    /// Parameters always travel as f32.
    pub grad_dtype: crate::tensor::Dtype,
    /// MB (10^6 bytes) of gradients the coordinator keeps in memory while they wait for their turn in
    /// the in-order reduction (results that arrive before a lower task index; with a `[defence]` that
    /// holds gradients, every gradient of the step). Beyond it they wait in a file in `spill_dir` and are
    /// read back a chunk at a time. Default 1024; 0 spills every waiting gradient. The parameters do not
    /// depend on it.
    pub reorder_memory_mb: u64,
    /// Folder of that file (created, unlinked at once, freed after each step). Default: the system's
    /// temporary folder (`$TMPDIR`, else /tmp).
    pub spill_dir: Option<std::path::PathBuf>,
    /// MB of gradients the coordinator receives and decodes at once (and queues for the training loop).
    /// A result stream waits for room before its payload is read, and QUIC's flow control then holds
    /// the worker, so many workers returning large gradients at once do not each take a copy's worth of
    /// memory. A gradient larger than this is received alone. Default 1024.
    pub receive_memory_mb: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            tasks_in_flight: 4,
            task_timeout_secs: 120.0,
            grad_dtype: crate::tensor::Dtype::F32,
            reorder_memory_mb: DEFAULT_REORDER_MEMORY_MB,
            spill_dir: None,
            receive_memory_mb: DEFAULT_RECEIVE_MEMORY_MB,
        }
    }
}

/// Default `cluster.reorder_memory_mb`: two waiting gradients of a 500M-parameter model, or thousands of
/// a small one (which then never touch the disk).
pub const DEFAULT_REORDER_MEMORY_MB: u64 = 1024;
/// Default `cluster.receive_memory_mb`: two 100M-parameter gradients in flight at once, thousands of
/// small ones.
pub const DEFAULT_RECEIVE_MEMORY_MB: u64 = 1024;
/// Largest `cluster.reorder_memory_mb` and `cluster.receive_memory_mb` (about 1 PB): keeps byte counts
/// far from overflow, and the receive budget's count of MB within a `u32`.
pub const MAX_REORDER_MEMORY_MB: u64 = 1 << 30;

impl ClusterConfig {
    /// `reorder_memory_mb` in bytes.
    pub fn reorder_memory_bytes(&self) -> u64 {
        self.reorder_memory_mb.saturating_mul(1_000_000)
    }

    /// `receive_memory_mb` in bytes.
    pub fn receive_memory_bytes(&self) -> u64 {
        self.receive_memory_mb.saturating_mul(1_000_000)
    }

    /// Where waiting gradients beyond the budget are spilled.
    pub fn spill_folder(&self) -> std::path::PathBuf {
        self.spill_dir.clone().unwrap_or_else(std::env::temp_dir)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Write a checkpoint every this many meta-steps (0: only when the run stops). Default 100.
    pub every: u64,
    /// Checkpoints kept in `<out>/checkpoints` (older ones are deleted). Default 3.
    pub keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig { every: 100, keep: 3 }
    }
}

/// Characters in the smaller Omniglot split (the evaluation split has 659, the background split 964): an
/// N-way episode needs N distinct characters from either.
pub const OMNIGLOT_MIN_SPLIT_CHARACTERS: usize = 659;
/// Shortest task timeout accepted: below a few milliseconds every task would expire before a worker
/// could answer, and reassignment would never end.
pub const MIN_TASK_TIMEOUT_SECS: f64 = 0.01;
/// Longest task timeout accepted (about 11.6 days): far beyond any real task, and small enough that
/// deadlines computed from it never overflow a clock.
pub const MAX_TASK_TIMEOUT_SECS: f64 = 1e6;

/// Config keys that may change when a run is resumed: they do not change the parameters' trajectory.
/// (With an adaptive curriculum the periodic evaluations do, and only `eval.final_tasks` may change.)
pub const RESUMABLE_PREFIXES: &[&str] = &["train.steps", "eval.", "cluster.", "checkpoint."];
/// Keys under [`RESUMABLE_PREFIXES`] that do change the trajectory: the gradients' wire precision.
pub const NOT_RESUMABLE: &[&str] = &["cluster.grad_dtype"];

impl Config {
    /// Keys whose values differ between `self` (e.g. a checkpoint's config) and `other` and that a resumed
    /// run may not change, as `key: old vs new` lines. Empty: `other` can continue `self`'s run.
    pub fn resume_conflicts(&self, other: &Config) -> Vec<String> {
        let (a, b) = (flatten(self), flatten(other));
        let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
        // An adaptive curriculum advances on the periodic evaluations' losses: then they steer the run.
        let adaptive = [self, other].iter().any(|c| c.curriculum.schedule == Schedule::Adaptive);
        // A cosine schedule spans train.steps: then the run's length shapes every update.
        let cosine = [self, other].iter().any(|c| c.train.lr_schedule == LrSchedule::Cosine);
        let steers =
            |k: &str| (adaptive && k.starts_with("eval.") && k != "eval.final_tasks") || (cosine && k == "train.steps");
        keys.into_iter()
            .filter(|k| {
                steers(k) || NOT_RESUMABLE.contains(&k.as_str()) || !RESUMABLE_PREFIXES.iter().any(|p| k.starts_with(p))
            })
            .filter(|k| a.get(*k) != b.get(*k))
            .map(|k| {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
                format!("{k}: {} in the checkpoint, {} now", show(a.get(k)), show(b.get(k)))
            })
            .collect()
    }

    /// Parses TOML text, applies `KEY=VALUE` overrides, and validates.
    pub fn from_toml_with_overrides(text: &str, overrides: &[String]) -> Result<Config, ConfigError> {
        let mut value: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse(e.to_string()))?;
        for o in overrides {
            apply_override(&mut value, o)?;
        }
        fill_task_defaults(&mut value);
        let config: Config =
            toml::Value::Table(value).try_into().map_err(|e: toml::de::Error| ConfigError::Parse(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Self::from_toml_with_overrides(text, &[])
    }

    /// The TOML form (what workers receive and reports hold).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }

    /// Checks fields against their ranges and against each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.task {
            TaskConfig::Sinusoid(r) | TaskConfig::NoisyLinear(r) => {
                if r.support == 0 || r.support > 100_000 {
                    return Err(invalid("task.support", format!("must be in 1..=100000, got {}", r.support)));
                }
                if r.query == 0 || r.query > 100_000 {
                    return Err(invalid("task.query", format!("must be in 1..=100000, got {}", r.query)));
                }
                if self.model.name == ModelKind::Conv4 {
                    return Err(invalid("model.name", "conv4 takes images: use it with task.distribution = \"omniglot\" or \"images\"; regression tasks take \"mlp\" or \"mlp-ln\""));
                }
            }
            TaskConfig::Omniglot(o) => o.validate(self.model.name)?,
            TaskConfig::Images(i) => i.validate(self.model.name)?,
        }
        self.model.validate()?;
        if self.model.lora() && (self.algo.name.learns_inner_lr() || self.algo.compute_dtype == ComputeDtype::Bf16) {
            return Err(invalid(
                "model.lora_rank",
                "LoRA meta-learning runs with maml, fomaml, reptile or anil in f32",
            ));
        }
        let a = &self.algo;
        if a.inner_steps > 1000 {
            return Err(invalid("algo.inner_steps", format!("must be at most 1000, got {}", a.inner_steps)));
        }
        if !(a.inner_lr.is_finite() && a.inner_lr >= 0.0) {
            return Err(invalid("algo.inner_lr", format!("must be finite and ≥ 0, got {}", a.inner_lr)));
        }
        if a.inner_grad_clamp.is_nan() || a.inner_grad_clamp <= 0.0 {
            return Err(invalid("algo.inner_grad_clamp", format!("must be > 0 (or inf), got {}", a.inner_grad_clamp)));
        }
        if a.name == AlgoKind::Reptile && a.inner_steps == 0 {
            return Err(invalid(
                "algo.inner_steps",
                "reptile moves towards adapted weights: needs at least 1 inner step",
            ));
        }
        if a.name.learns_inner_lr() && a.inner_steps == 0 {
            return Err(invalid(
                "algo.inner_steps",
                "meta-sgd learns inner learning rates: needs at least 1 inner step",
            ));
        }
        schedule::validate(a, &self.train)?;
        if a.per_step_bn && (self.model.name != ModelKind::Conv4 || self.model.lora()) {
            return Err(invalid("algo.per_step_bn", "applies to conv4's batch norm, without LoRA"));
        }
        if a.compute_dtype == ComputeDtype::Bf16 && !matches!(a.name, AlgoKind::Maml | AlgoKind::Fomaml) {
            return Err(invalid(
                "algo.compute_dtype",
                format!("bf16 is implemented for maml and fomaml, not {}", a.name.name()),
            ));
        }
        let t = &self.train;
        if t.meta_batch == 0 || t.meta_batch > 1_000_000 {
            return Err(invalid("train.meta_batch", format!("must be in 1..=1000000, got {}", t.meta_batch)));
        }
        if !(t.meta_lr.is_finite() && t.meta_lr > 0.0) {
            return Err(invalid("train.meta_lr", format!("must be finite and > 0, got {}", t.meta_lr)));
        }
        if !(0.0..1.0).contains(&t.adam_beta1) {
            return Err(invalid("train.adam_beta1", format!("must be in [0, 1), got {}", t.adam_beta1)));
        }
        if !(0.0..1.0).contains(&t.adam_beta2) {
            return Err(invalid("train.adam_beta2", format!("must be in [0, 1), got {}", t.adam_beta2)));
        }
        if !(t.adam_eps.is_finite() && t.adam_eps > 0.0) {
            return Err(invalid("train.adam_eps", format!("must be finite and > 0, got {}", t.adam_eps)));
        }
        if t.max_grad_norm.is_nan() || t.max_grad_norm <= 0.0 {
            return Err(invalid("train.max_grad_norm", format!("must be > 0 (or inf), got {}", t.max_grad_norm)));
        }
        let e = &self.eval;
        if e.final_tasks > 1_000_000 || e.tasks > 1_000_000 {
            return Err(invalid("eval.tasks", "eval.tasks and eval.final_tasks must be at most 1000000"));
        }
        if e.every > 0 && e.tasks == 0 {
            return Err(invalid("eval.tasks", "must be ≥ 1 when eval.every > 0"));
        }
        if e.inner_steps > 1000 {
            return Err(invalid("eval.inner_steps", format!("must be at most 1000, got {}", e.inner_steps)));
        }
        if let Some(lr) = e.inner_lr {
            if !(lr.is_finite() && lr >= 0.0) {
                return Err(invalid("eval.inner_lr", format!("must be finite and ≥ 0, got {lr}")));
            }
        }
        if self.checkpoint.keep == 0 || self.checkpoint.keep > 1000 {
            return Err(invalid("checkpoint.keep", format!("must be in 1..=1000, got {}", self.checkpoint.keep)));
        }
        let c = &self.cluster;
        if c.tasks_in_flight == 0 || c.tasks_in_flight > 4096 {
            return Err(invalid("cluster.tasks_in_flight", format!("must be in 1..=4096, got {}", c.tasks_in_flight)));
        }
        if c.reorder_memory_mb > MAX_REORDER_MEMORY_MB {
            return Err(invalid(
                "cluster.reorder_memory_mb",
                format!("must be in 0..={MAX_REORDER_MEMORY_MB}, got {}", c.reorder_memory_mb),
            ));
        }
        if c.receive_memory_mb == 0 || c.receive_memory_mb > MAX_REORDER_MEMORY_MB {
            return Err(invalid(
                "cluster.receive_memory_mb",
                format!("must be in 1..={MAX_REORDER_MEMORY_MB}, got {}", c.receive_memory_mb),
            ));
        }
        if c.spill_dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
            return Err(invalid(
                "cluster.spill_dir",
                "must not be empty (leave it out for the system's temporary folder)",
            ));
        }
        if !(MIN_TASK_TIMEOUT_SECS..=MAX_TASK_TIMEOUT_SECS).contains(&c.task_timeout_secs) {
            return Err(invalid(
                "cluster.task_timeout_secs",
                format!(
                    "must be in [{MIN_TASK_TIMEOUT_SECS}, {MAX_TASK_TIMEOUT_SECS}] seconds, got {}",
                    c.task_timeout_secs
                ),
            ));
        }
        curriculum::validate(&self.curriculum, &self.corrupt, &self.defence, self.eval.every)?;
        Ok(())
    }

    /// Inner learning rate used at evaluation (Meta-SGD uses its learned rates instead).
    pub fn eval_inner_lr(&self) -> f64 {
        self.eval.inner_lr.unwrap_or(self.algo.inner_lr)
    }

    /// Inner steps used at evaluation: `eval.inner_steps`, except with learned inner rates (Meta-SGD,
    /// `algo.per_step_lrs`), which are tuned for `algo.inner_steps` steps (ten steps at rates learned for
    /// one diverge).
    pub fn eval_inner_steps(&self) -> usize {
        if self.algo.name.learns_inner_lr() || self.algo.per_step_lrs || self.algo.per_step_bn {
            self.algo.inner_steps
        } else {
            self.eval.inner_steps
        }
    }

    /// Whether the tasks are classification (accuracy is reported).
    pub fn is_classification(&self) -> bool {
        matches!(self.task, TaskConfig::Omniglot(_) | TaskConfig::Images(_))
    }
}

/// `section.key` → value as TOML text, for every leaf of the config.
fn flatten(config: &Config) -> std::collections::BTreeMap<String, String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    if let Ok(v) = toml::Value::try_from(config) {
        walk("", &v, &mut out);
    }
    out
}

/// Regression sections may leave `support`/`query` out; their defaults depend on the distribution.
fn fill_task_defaults(table: &mut toml::Table) {
    let Some(toml::Value::Table(task)) = table.get_mut("task") else { return };
    // `--set task.support=20` on the built-in default names no distribution: it is the default's.
    let dist = task
        .entry("distribution")
        .or_insert_with(|| toml::Value::String("sinusoid".into()))
        .as_str()
        .map(str::to_string);
    let defaults = match dist.as_deref() {
        Some("sinusoid") => RegressionTaskConfig::sinusoid_default(),
        Some("noisy-linear") => RegressionTaskConfig::noisy_linear_default(),
        _ => return,
    };
    task.entry("support").or_insert(toml::Value::Integer(defaults.support as i64));
    task.entry("query").or_insert(toml::Value::Integer(defaults.query as i64));
}

/// Applies one `a.b.c=value` override. The value is read as TOML (`0.1`, `true`, `"x"`, `inf`); anything
/// that is not valid TOML is taken as a string, so `--set model.name=mlp-ln` works without quotes.
pub fn apply_override(table: &mut toml::Table, spec: &str) -> Result<(), ConfigError> {
    let (key, raw) = spec.split_once('=').ok_or_else(|| ConfigError::BadOverride(spec.to_string()))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        return Err(ConfigError::BadOverride(spec.to_string()));
    }
    let raw = raw.trim();
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let parts: Vec<&str> = key.split('.').collect();
    let mut cur = table;
    for p in &parts[..parts.len() - 1] {
        let entry = cur.entry(p.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(invalid(key, format!("`{p}` is not a section"))),
        };
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests;
