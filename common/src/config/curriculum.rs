//! The config sections for dirty task distributions and the defences against them: `[curriculum]` (which
//! task difficulties the sampler may draw, step by step), `[corrupt]` (a fraction of training tasks
//! deliberately corrupted, for experiments and tests) and `[defence]` (per-task outlier quarantine and
//! robust aggregation). All default to off, so a config without them is the plain MAML run.

use serde::{Deserialize, Serialize};

use super::{invalid, ConfigError};

/// How competence — the hardest task difficulty the sampler draws — grows over the run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Schedule {
    /// Competence 1 from the start: every task of the distribution.
    None,
    /// c(t) = min(1, start + (1 − start)·t/duration).
    Linear,
    /// `levels` equal jumps from `start` to 1, one every duration/levels meta-steps.
    Step,
    /// Platanios et al. 2019: c(t) = min(1, sqrt(t·(1 − start²)/duration + start²)).
    Competence,
    /// From `start`, add `increment` whenever the held-out (meta-test) loss has not improved by
    /// `min_improvement` (relative) for `patience` periodic evaluations.
    Adaptive,
}

impl Schedule {
    pub fn name(self) -> &'static str {
        match self {
            Schedule::None => "none",
            Schedule::Linear => "linear",
            Schedule::Step => "step",
            Schedule::Competence => "competence",
            Schedule::Adaptive => "adaptive",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CurriculumConfig {
    /// `none`, `linear`, `step`, `competence` or `adaptive`. Default `none`.
    pub schedule: Schedule,
    /// Competence at meta-step 0 (c₀), in (0, 1]. Default 0.2.
    pub start: f64,
    /// Meta-steps until competence reaches 1 (`linear`, `step`, `competence`). Default 500. Not derived
    /// from `train.steps`, so that extending a run on resume does not change its curriculum.
    pub duration: u64,
    /// `step`: number of equal jumps from `start` to 1. Default 4.
    pub levels: u32,
    /// `adaptive`: periodic evaluations without improvement before competence advances. Default 2.
    pub patience: u32,
    /// `adaptive`: competence added at each advance. Default 0.2.
    pub increment: f64,
    /// `adaptive`: relative decrease of the held-out loss that counts as improving. Default 0.01.
    pub min_improvement: f64,
}

impl Default for CurriculumConfig {
    fn default() -> Self {
        CurriculumConfig {
            schedule: Schedule::None,
            start: 0.2,
            duration: 500,
            levels: 4,
            patience: 2,
            increment: 0.2,
            min_improvement: 0.01,
        }
    }
}

/// Ways a corrupted task is corrupted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Corruption {
    /// Targets (regression values or class labels) permuted among the examples of each set.
    ShuffledLabels,
    /// A quarter of the targets replaced: regression values by ±`outlier_magnitude`, class labels by
    /// another class.
    OutlierTargets,
    /// Regression targets multiplied by `huge_scale`; for images the inputs are (there are no real
    /// targets to scale).
    HugeScale,
}

impl Corruption {
    /// Every kind, in a fixed order (indices of per-kind counts).
    pub const ALL: [Corruption; 3] = [Corruption::ShuffledLabels, Corruption::OutlierTargets, Corruption::HugeScale];

    /// This kind's position in [`Corruption::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            Corruption::ShuffledLabels => "shuffled-labels",
            Corruption::OutlierTargets => "outlier-targets",
            Corruption::HugeScale => "huge-scale",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CorruptConfig {
    /// Fraction of *training* tasks corrupted, in [0, 1]; held-out tasks are never corrupted. Default 0.
    pub fraction: f64,
    /// Which corruptions, each corrupted task drawing one uniformly. Default: all three.
    pub kinds: Vec<Corruption>,
    /// `outlier-targets`: magnitude of a replaced regression target. Default 50.
    pub outlier_magnitude: f64,
    /// `huge-scale`: factor on the targets (inputs for images). Default 100.
    pub huge_scale: f64,
}

impl Default for CorruptConfig {
    fn default() -> Self {
        CorruptConfig {
            fraction: 0.0,
            kinds: vec![Corruption::ShuffledLabels, Corruption::OutlierTargets, Corruption::HugeScale],
            outlier_magnitude: 50.0,
            huge_scale: 100.0,
        }
    }
}

/// What happens to a task whose robust z-score exceeds the threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum QuarantineMode {
    /// No outlier scoring.
    Off,
    /// The task's meta-gradient is left out of the step (counted).
    Skip,
    /// The task's meta-gradient is weighted by threshold / z (< 1) in the mean (counted).
    DownWeight,
}

/// How the accepted meta-gradients of a step are reduced to one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Aggregation {
    /// The (weighted) mean.
    Mean,
    /// Per coordinate, the mean after dropping the `trim` fraction of smallest and of largest values.
    TrimmedMean,
    /// Per coordinate, the median.
    Median,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefenceConfig {
    /// `off`, `skip` or `down-weight`. Default `off`.
    pub quarantine: QuarantineMode,
    /// Training tasks (most recent, in task order) the robust statistics are taken over, besides the
    /// current meta-batch. Default 500.
    pub window: usize,
    /// Robust z-score (0.6745·(x − median)/MAD of log post-adaptation loss, and of log meta-gradient norm)
    /// above which a task is an outlier (Iglewicz and Hoaglin's 3.5). Default 3.5.
    pub threshold: f64,
    /// `mean`, `trimmed-mean` or `median`. Default `mean`.
    pub aggregate: Aggregation,
    /// `trimmed-mean`: fraction dropped at each end, in [0, 0.5). Default 0.1.
    pub trim: f64,
}

impl Default for DefenceConfig {
    fn default() -> Self {
        DefenceConfig {
            quarantine: QuarantineMode::Off,
            window: 500,
            threshold: 3.5,
            aggregate: Aggregation::Mean,
            trim: 0.1,
        }
    }
}

impl DefenceConfig {
    /// Whether the step needs every task's gradient at once (scoring or a robust reduction); otherwise
    /// gradients are summed as they arrive.
    pub fn holds_gradients(&self) -> bool {
        self.quarantine != QuarantineMode::Off || self.aggregate != Aggregation::Mean
    }
}

/// Longest window accepted: the statistics sort it every step.
pub const MAX_DEFENCE_WINDOW: usize = 100_000;

pub(super) fn validate(
    c: &CurriculumConfig,
    k: &CorruptConfig,
    d: &DefenceConfig,
    eval_every: u64,
) -> Result<(), ConfigError> {
    if c.schedule != Schedule::None {
        if !(c.start.is_finite() && c.start > 0.0 && c.start <= 1.0) {
            return Err(invalid("curriculum.start", format!("must be in (0, 1], got {}", c.start)));
        }
        if matches!(c.schedule, Schedule::Linear | Schedule::Step | Schedule::Competence) && c.duration == 0 {
            return Err(invalid("curriculum.duration", "must be ≥ 1 meta-step"));
        }
        if c.schedule == Schedule::Step && !(1..=1000).contains(&c.levels) {
            return Err(invalid("curriculum.levels", format!("must be in 1..=1000, got {}", c.levels)));
        }
        if c.schedule == Schedule::Adaptive {
            if eval_every == 0 {
                return Err(invalid(
                    "curriculum.schedule",
                    "`adaptive` advances on the periodic held-out evaluations: set eval.every ≥ 1",
                ));
            }
            if c.patience == 0 {
                return Err(invalid("curriculum.patience", "must be ≥ 1"));
            }
            if !(c.increment.is_finite() && c.increment > 0.0 && c.increment <= 1.0) {
                return Err(invalid("curriculum.increment", format!("must be in (0, 1], got {}", c.increment)));
            }
            if !(c.min_improvement.is_finite() && (0.0..1.0).contains(&c.min_improvement)) {
                return Err(invalid(
                    "curriculum.min_improvement",
                    format!("must be in [0, 1), got {}", c.min_improvement),
                ));
            }
        }
    }
    if !(0.0..=1.0).contains(&k.fraction) {
        return Err(invalid("corrupt.fraction", format!("must be in [0, 1], got {}", k.fraction)));
    }
    if k.fraction > 0.0 && k.kinds.is_empty() {
        return Err(invalid(
            "corrupt.kinds",
            "must name at least one of \"shuffled-labels\", \"outlier-targets\", \"huge-scale\"",
        ));
    }
    if !(k.outlier_magnitude.is_finite() && k.outlier_magnitude > 0.0 && k.outlier_magnitude <= 1e6) {
        return Err(invalid("corrupt.outlier_magnitude", format!("must be in (0, 1e6], got {}", k.outlier_magnitude)));
    }
    if !(k.huge_scale.is_finite() && k.huge_scale > 0.0 && k.huge_scale <= 1e6) {
        return Err(invalid("corrupt.huge_scale", format!("must be in (0, 1e6], got {}", k.huge_scale)));
    }
    if d.window > MAX_DEFENCE_WINDOW {
        return Err(invalid("defence.window", format!("must be at most {MAX_DEFENCE_WINDOW}, got {}", d.window)));
    }
    if !(d.threshold.is_finite() && d.threshold > 0.0) {
        return Err(invalid("defence.threshold", format!("must be finite and > 0, got {}", d.threshold)));
    }
    if !(d.trim.is_finite() && (0.0..0.5).contains(&d.trim)) {
        return Err(invalid("defence.trim", format!("must be in [0, 0.5), got {}", d.trim)));
    }
    if d.quarantine == QuarantineMode::DownWeight && d.aggregate != Aggregation::Mean {
        return Err(invalid(
            "defence.quarantine",
            "`down-weight` weights the mean; with a trimmed mean or median use \"skip\" (or \"off\")",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    #[test]
    fn sections_default_off_and_parse() {
        let c = Config::from_toml("").unwrap();
        assert_eq!(c.curriculum.schedule, super::Schedule::None);
        assert!(!c.defence.holds_gradients());
        let c = Config::from_toml(
            "[curriculum]\nschedule = \"competence\"\nstart = 0.1\nduration = 300\n[corrupt]\nfraction = 0.2\nkinds = [\"huge-scale\"]\n[defence]\nquarantine = \"skip\"\naggregate = \"median\"\n",
        )
        .unwrap();
        assert_eq!(c.curriculum.duration, 300);
        assert_eq!(c.corrupt.kinds, vec![super::Corruption::HugeScale]);
        assert!(c.defence.holds_gradients());
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn bad_values_name_their_field() {
        for (set, field) in [
            ("curriculum.schedule=linear", "curriculum.start"),
            ("corrupt.fraction=1.5", "corrupt.fraction"),
            ("defence.trim=0.5", "defence.trim"),
            ("defence.threshold=0", "defence.threshold"),
            ("defence.window=1000000", "defence.window"),
        ] {
            let mut sets = vec![set.to_string()];
            if field == "curriculum.start" {
                sets.push("curriculum.start=0".into());
            }
            let e = Config::from_toml_with_overrides("", &sets).unwrap_err();
            assert!(e.to_string().contains(field), "{set}: {e}");
        }
        let e = Config::from_toml_with_overrides("", &["curriculum.schedule=sometimes".into()]).unwrap_err();
        assert!(e.to_string().contains("competence"), "allowed values listed: {e}");
        let e = Config::from_toml_with_overrides("", &["curriculum.schedule=adaptive".into(), "eval.every=0".into()])
            .unwrap_err();
        assert!(e.to_string().contains("eval.every"), "{e}");
        let e = Config::from_toml_with_overrides(
            "",
            &["defence.quarantine=down-weight".into(), "defence.aggregate=median".into()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("defence.quarantine"), "{e}");
        let e = Config::from_toml_with_overrides("", &["corrupt.fraction=0.2".into(), "corrupt.kinds=[]".into()])
            .unwrap_err();
        assert!(e.to_string().contains("corrupt.kinds"), "{e}");
    }
}
