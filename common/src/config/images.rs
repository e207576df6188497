//! `task.distribution = "images"`: N-way K-shot episodes from a folder of the user's own PNG images
//! (see [`crate::images`] for the folder layout, the decoding and the split of classes).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{default_k_shot, default_n_way, default_q_query, invalid, ConfigError, ModelKind};

/// Held-out share of `task.root`'s classes when no `task.eval_root` is given.
pub const DEFAULT_EVAL_FRACTION: f64 = 0.2;
/// Most classes an images episode may have (`task.n_way`): the model's head has this many outputs, and a
/// folder holds at most [`crate::images::MAX_CLASSES`] classes anyway.
pub const MAX_IMAGES_N_WAY: usize = 10_000;
/// Most images one episode may hold, `n_way × (k_shot + q_query)`, for `images` and `omniglot` tasks: 20,000
/// images of 28×28 f32 are 63 MB per task in memory, a little above Omniglot's largest episode without
/// rotations (659 × 20 = 13,180).
pub const MAX_EPISODE_IMAGES: usize = 20_000;

/// N-way K-shot episodes over the classes of an image folder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagesTaskConfig {
    /// The folder whose leaf directories holding `.png` files are the classes (`ROOT/<class>/*.png`, or
    /// deeper, e.g. Omniglot's `ROOT/<alphabet>/<character>/*.png`). Required. A relative path is taken
    /// from each worker's working directory (local workers share the coordinator's); on a cluster, give a
    /// path every worker machine can read, holding the same files on each.
    pub root: PathBuf,
    /// A separate folder of held-out classes for evaluation. Absent (default): `eval_fraction` of `root`'s
    /// classes are held out. Its classes must not share a name with `root`'s, and neither folder may
    /// lie inside the other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_root: Option<PathBuf>,
    /// Without `eval_root`: the share of `root`'s classes held out for evaluation, in (0, 1). Default 0.2.
    /// Which classes: the `round(fraction × classes)` ones whose names have the smallest SHA-256 (a
    /// rule by name alone: the same on every machine and for every run seed); see
    /// [`crate::images::ImageFolder::split_by_name`]. Not allowed together with `eval_root`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_fraction: Option<f64>,
    /// Whether dark pixels are the foreground (1.0): true (default) for dark drawings on light paper,
    /// like Omniglot's PNGs; false for light-on-dark images such as MNIST's.
    #[serde(default = "default_invert")]
    pub invert: bool,
    /// Classes per episode (N). Default 5.
    #[serde(default = "default_n_way")]
    pub n_way: usize,
    /// Support images per class (K). Default 1.
    #[serde(default = "default_k_shot")]
    pub k_shot: usize,
    /// Query images per class (Q). Default 15. Every class must have at least K + Q images.
    #[serde(default = "default_q_query")]
    pub q_query: usize,
}

fn default_invert() -> bool {
    true
}

impl ImagesTaskConfig {
    /// A config over `root` with every other field at its default.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ImagesTaskConfig {
            root: root.into(),
            eval_root: None,
            eval_fraction: None,
            invert: default_invert(),
            n_way: default_n_way(),
            k_shot: default_k_shot(),
            q_query: default_q_query(),
        }
    }

    /// The held-out fraction in effect when there is no `eval_root`.
    pub fn eval_fraction(&self) -> f64 {
        self.eval_fraction.unwrap_or(DEFAULT_EVAL_FRACTION)
    }

    /// Images per class an episode draws (K + Q).
    pub fn images_per_class(&self) -> usize {
        self.k_shot.saturating_add(self.q_query)
    }

    /// Checks the fields and that the model takes 28×28 grayscale images. The folder itself is checked
    /// when a worker loads it.
    pub(super) fn validate(&self, model: ModelKind) -> Result<(), ConfigError> {
        if self.root.as_os_str().is_empty() {
            return Err(invalid("task.root", "the image folder is required, e.g. root = \"data/my-classes\""));
        }
        if self.eval_root.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
            return Err(invalid("task.eval_root", "must not be empty (leave it out to split task.root)"));
        }
        if let Some(f) = self.eval_fraction {
            if self.eval_root.is_some() {
                return Err(invalid(
                    "task.eval_fraction",
                    "is only used without task.eval_root (the held-out classes are eval_root's); give one or the other",
                ));
            }
            if !(f > 0.0 && f < 1.0) {
                return Err(invalid("task.eval_fraction", format!("must be in (0, 1), got {f}")));
            }
        }
        if !(2..=MAX_IMAGES_N_WAY).contains(&self.n_way) {
            return Err(invalid("task.n_way", format!("must be in 2..={MAX_IMAGES_N_WAY}, got {}", self.n_way)));
        }
        if self.k_shot == 0 || self.q_query == 0 {
            return Err(invalid(
                "task.k_shot",
                format!("k_shot ≥ 1 and q_query ≥ 1; got {} + {}", self.k_shot, self.q_query),
            ));
        }
        let per_episode = self.n_way.saturating_mul(self.images_per_class());
        if per_episode > MAX_EPISODE_IMAGES {
            return Err(invalid(
                "task.q_query",
                format!(
                    "an episode of n_way × (k_shot + q_query) = {} × ({} + {}) = {per_episode} images exceeds the {MAX_EPISODE_IMAGES} allowed",
                    self.n_way, self.k_shot, self.q_query
                ),
            ));
        }
        if model != ModelKind::Conv4 {
            return Err(invalid("model.name", "images tasks take model \"conv4\" (1 channel, 28×28)"));
        }
        Ok(())
    }
}
