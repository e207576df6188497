//! The model section of a run's config: which functional model, and LoRA meta-learning over a frozen
//! base.

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// Functional models with explicit, named parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// MAML's regression net: in → 40 → 40 → 1 with ReLU.
    Mlp,
    /// in → 64 → LayerNorm → ReLU → 64 → LayerNorm → ReLU → 1.
    MlpLn,
    /// MAML's Omniglot net: four 3×3 conv (64) + batch norm + ReLU blocks, stride 2, then a linear head.
    /// Takes 1-channel 28×28 images (`omniglot` and `images` tasks).
    Conv4,
}

impl ModelKind {
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Mlp => "mlp",
            ModelKind::MlpLn => "mlp-ln",
            ModelKind::Conv4 => "conv4",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `mlp`, `mlp-ln` or `conv4`. Default `mlp`.
    pub name: ModelKind,
    /// LoRA meta-learning: the rank r of low-rank adapters on every linear and conv weight of a frozen
    /// base model (`lora_base`); only the adapters are meta-learned and travel. 0 (default): off.
    pub lora_rank: usize,
    /// LoRA scale numerator: an adapted weight is W + (alpha / r)·B·A. Default: r (scale 1).
    pub lora_alpha: Option<f64>,
    /// The frozen base model (safetensors, the model's tensors under their names, f32), e.g. a run's
    /// `params.safetensors`. A relative path is taken from the directory the process starts in.
    pub lora_base: Option<String>,
    /// SHA-256 (hex) of the `lora_base` file. Set by the coordinator when absent; every worker checks
    /// its own copy against it, so no worker computes with another base.
    pub lora_base_sha256: Option<String>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { name: ModelKind::Mlp, lora_rank: 0, lora_alpha: None, lora_base: None, lora_base_sha256: None }
    }
}

/// Largest `model.lora_rank`.
pub const MAX_LORA_RANK: usize = 1024;

impl ModelConfig {
    /// Whether the run meta-learns LoRA adapters of a frozen base.
    pub fn lora(&self) -> bool {
        self.lora_rank > 0
    }

    /// The adapters' scale alpha / r.
    pub fn lora_scale(&self) -> f64 {
        self.lora_alpha.unwrap_or(self.lora_rank as f64) / self.lora_rank.max(1) as f64
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.lora_rank > MAX_LORA_RANK {
            return Err(invalid("model.lora_rank", format!("must be at most {MAX_LORA_RANK}, got {}", self.lora_rank)));
        }
        if !self.lora() {
            if self.lora_base.is_some() || self.lora_alpha.is_some() || self.lora_base_sha256.is_some() {
                return Err(invalid(
                    "model.lora_rank",
                    "model.lora_base/lora_alpha/lora_base_sha256 are set but lora_rank is 0",
                ));
            }
            return Ok(());
        }
        if self.lora_base.as_deref().is_none_or(str::is_empty) {
            return Err(invalid("model.lora_base", "LoRA (model.lora_rank > 0) needs the frozen base model's file"));
        }
        if let Some(a) = self.lora_alpha {
            if !(a.is_finite() && a > 0.0) {
                return Err(invalid("model.lora_alpha", format!("must be finite and > 0, got {a}")));
            }
        }
        if let Some(h) = &self.lora_base_sha256 {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid("model.lora_base_sha256", "must be 64 hex digits"));
            }
        }
        Ok(())
    }
}
