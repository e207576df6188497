//! Task specs and task distributions.
//!
//! A [`TaskSpec`] is tiny and travels on the wire; the worker materialises the task's data from it with
//! [`generate`]. A task's data is a pure function of (config, spec): every random draw comes from a stream
//! keyed by (run seed, split, step, index) — never from a global RNG, never from which worker computes it.
//!
//! **Difficulty.** Every task has a difficulty in [0, 1], a function of its own parameters, and a spec
//! carries the hardest difficulty it may be materialised with (its [`Competence`], set by the sampler's
//! curriculum; 1 means the whole distribution):
//! - `sinusoid`: the amplitude's quantile, (A − 0.1)/4.9. A sets the scale of the targets and so of the
//!   losses (MSE ∝ A²); the phase only shifts the curve and leaves the difficulty alone. With competence c
//!   the amplitude is drawn from the first c of its range, A ~ U[0.1, 0.1 + 4.9c].
//! - `noisy-linear`: the noise level's quantile, (σ − 0.01)/0.09; with competence c, σ ~ U[0.01, 0.01 + 0.09c].
//! - `omniglot`: the share of the episode's classes that have an alphabet-mate in the episode,
//!   (N − distinct alphabets)/(N − 1): characters of one alphabet look alike and are harder to tell apart
//!   (Lake's one-shot runs are all within-alphabet). With `task.rotations` a class is a (character,
//!   rotation) pair and keeps its character's alphabet; with `task.split = "maml"` the background and
//!   evaluation sets' alphabets stay distinct groups. N-way and K-shot are fixed by the run (the model's
//!   head has N outputs), so they do not vary between tasks. With competence c the episode is drawn
//!   uniformly among those with difficulty ≤ c (by rejection, [`OMNIGLOT_DRAWS`] tries at most).
//! - `images`: the same with a class's parent folder as its alphabet (Omniglot's PNG layout
//!   `<alphabet>/<character>`); classes directly under the root each count as their own, so with that
//!   flat layout every episode has difficulty 0. Episodes are drawn by [`episode`] for both.
//!
//! At competence 1 every distribution draws exactly as without a curriculum (bit for bit).
//!
//! **Corruption** ([`corrupt`]): a configured fraction of *training* tasks is corrupted on purpose (wrong
//! labels, outliers, huge scales), chosen by the spec's own keyed stream, so that defences can be tested.

use rand::Rng;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{Config, ImagesTaskConfig, OmniglotSplit, OmniglotTaskConfig, RegressionTaskConfig, TaskConfig};
use crate::images::ImageSplits;
use crate::omniglot::classes::{Characters, OmniglotClasses};
use crate::omniglot::split::maml_split;
use crate::omniglot::OmniglotSet;
use crate::rng::{keyed_rng, normal, uniform};

pub mod corrupt;
pub mod episode;
#[cfg(test)]
mod tests_omniglot;

pub use episode::{episode_difficulty, EpisodeShape, EpisodeSource};

/// Meta-training tasks or held-out (meta-test) tasks. Held-out tasks come from separate random streams
/// and, for Omniglot, from the held-out characters (the evaluation split's, or the maml split's 423; for
/// images, from the held-out classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Split {
    Train,
    Eval,
}

impl Split {
    fn key(self) -> u64 {
        match self {
            Split::Train => 0x7472_6169_6e,
            Split::Eval => 0x6576_616c,
        }
    }
}

/// The hardest difficulty a task may be drawn with, in millionths: an integer, so that specs stay `Eq`
/// and hashable and every machine reads the same value. Values above 1 000 000 (from a peer) mean 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Competence(pub u32);

impl Competence {
    const ONE: u32 = 1_000_000;
    /// Every task of the distribution.
    pub const FULL: Competence = Competence(Self::ONE);

    /// The nearest representable competence to `c` (clamped to [0, 1]; NaN counts as 1).
    pub fn from_fraction(c: f64) -> Self {
        if c.is_nan() {
            return Self::FULL;
        }
        Competence((c.clamp(0.0, 1.0) * Self::ONE as f64).round() as u32)
    }

    /// As a fraction in [0, 1] (exactly 1.0 for [`Competence::FULL`]).
    pub fn fraction(self) -> f64 {
        self.0.min(Self::ONE) as f64 / Self::ONE as f64
    }
}

/// One task, identified by where it sits in the run: (seed, split, step, index), and the curriculum's
/// cap on its difficulty.
///
/// For training tasks `step` is the meta-step and `index` the position in its meta-batch. For evaluation
/// tasks `step` is the evaluation round's step and `index` the task's number in that round; the final
/// evaluation uses [`FINAL_EVAL_STEP`] so that its 600 tasks are the same whatever the run's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskSpec {
    pub seed: u64,
    pub split: Split,
    pub step: u64,
    pub index: u32,
    pub competence: Competence,
}

/// `step` of the final evaluation's tasks.
pub const FINAL_EVAL_STEP: u64 = u64::MAX;

/// Purposes of a spec's keyed streams (one stream each, so that adding a draw to one never shifts another).
const PURPOSE_PARAMS: u64 = 1;
const PURPOSE_SAMPLES: u64 = 2;
const PURPOSE_EPISODE: u64 = 3;
pub(crate) const PURPOSE_CORRUPT: u64 = 4;

/// Most episodes an Omniglot (or images) task draws looking for one within its competence; then the least
/// difficult drawn is used. At competence ≥ the share of distinct-alphabet episodes (about 0.7 of 5-way episodes)
/// one or two draws suffice.
pub const OMNIGLOT_DRAWS: u64 = 64;

impl TaskSpec {
    /// A spec of the whole distribution (no curriculum cap).
    pub fn new(seed: u64, split: Split, step: u64, index: u32) -> Self {
        TaskSpec { seed, split, step, index, competence: Competence::FULL }
    }

    pub(crate) fn rng(&self, purpose: u64) -> rand_chacha::ChaCha8Rng {
        keyed_rng(&[self.seed, self.split.key(), self.step, self.index as u64, purpose])
    }

    /// The stream of the `attempt`-th draw for `purpose` (attempt 0 is [`TaskSpec::rng`]'s stream).
    fn rng_attempt(&self, purpose: u64, attempt: u64) -> rand_chacha::ChaCha8Rng {
        if attempt == 0 {
            return self.rng(purpose);
        }
        keyed_rng(&[self.seed, self.split.key(), self.step, self.index as u64, purpose, attempt])
    }
}

/// Inputs and targets of one set (support or query).
#[derive(Clone, Debug, PartialEq)]
pub struct Examples {
    /// Row-major inputs, `[n, ..feature_shape]`.
    pub x: Vec<f32>,
    /// Shape of one input (`[1]`, `[2]`, or `[1, 28, 28]`).
    pub feature_shape: Vec<usize>,
    pub y: Targets,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Targets {
    /// Regression targets, one per example.
    Real(Vec<f32>),
    /// Class labels in `0..n_way`, one per example.
    Class(Vec<i64>),
}

impl Examples {
    pub fn len(&self) -> usize {
        match &self.y {
            Targets::Real(v) => v.len(),
            Targets::Class(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A task's data: adapt on `support`, evaluate on `query`.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskData {
    pub support: Examples,
    pub query: Examples,
    /// The task's difficulty in [0, 1] (see the module doc).
    pub difficulty: f64,
}

#[derive(Debug, Error)]
pub enum TaskError {
    #[error("omniglot tasks need the Omniglot {0:?} split loaded (see --data-dir)")]
    MissingDataset(Split),
    #[error("task.split = {0:?} is not an Omniglot split (\"standard\" or \"maml\")")]
    UnknownOmniglotSplit(String),
    #[error("the {split:?} split has {have} classes, an episode needs {need} (n_way)")]
    TooFewClasses { split: Split, have: usize, need: usize },
    #[error("images tasks need the image folder loaded (task.root)")]
    MissingImages,
    #[error("class `{class}` of the {split:?} split has {have} images, an episode needs {need} (k_shot + q_query)")]
    ClassTooSmall { split: Split, class: String, have: usize, need: usize },
}

/// The image sets a worker has loaded (only `omniglot` and `images` tasks need any). Omniglot runs with the
/// standard split read one set per side (background: meta-training, evaluation: held out); the maml split
/// reads both for either side.
#[derive(Default)]
pub struct Datasets {
    pub omniglot_background: Option<std::sync::Arc<OmniglotSet>>,
    pub omniglot_evaluation: Option<std::sync::Arc<OmniglotSet>>,
    /// `images` tasks: the folder's meta-training and held-out classes.
    pub images: Option<std::sync::Arc<ImageSplits>>,
}

/// Materialises the task `spec` of the run `config`: its distribution's draw, then the configured
/// corruption if this spec is one of the corrupted tasks.
pub fn generate(config: &Config, spec: &TaskSpec, data: &Datasets) -> Result<TaskData, TaskError> {
    let mut task = generate_clean(&config.task, spec, data)?;
    if let Some(kind) = corrupt::corruption(&config.corrupt, spec) {
        corrupt::apply(&config.corrupt, kind, spec, &mut task);
    }
    Ok(task)
}

/// The distribution's draw for `spec`, uncorrupted.
pub fn generate_clean(config: &TaskConfig, spec: &TaskSpec, data: &Datasets) -> Result<TaskData, TaskError> {
    match config {
        TaskConfig::Sinusoid(r) => Ok(sinusoid(r, spec)),
        TaskConfig::NoisyLinear(r) => Ok(noisy_linear(r, spec)),
        TaskConfig::Omniglot(o) => omniglot_task(o, spec, data),
        TaskConfig::Images(i) => images_episode(i, spec, data),
    }
}

/// A uniform draw from the first `cap` of `[lo, hi)`, and its quantile in the whole range (the
/// difficulty). With `cap` = 1 this is exactly [`uniform`].
fn capped_uniform(rng: &mut rand_chacha::ChaCha8Rng, lo: f64, hi: f64, cap: f64) -> (f64, f64) {
    let q = rng.gen::<f64>() * cap;
    (lo + (hi - lo) * q, q)
}

/// Sinusoid ranges from the MAML paper.
pub const SINUSOID_AMPLITUDE: (f64, f64) = (0.1, 5.0);
pub const SINUSOID_PHASE: (f64, f64) = (0.0, std::f64::consts::PI);
pub const SINUSOID_X: (f64, f64) = (-5.0, 5.0);

/// Task parameters of a sinusoid task: (amplitude, phase, difficulty).
pub fn sinusoid_params(spec: &TaskSpec) -> (f64, f64, f64) {
    let mut rng = spec.rng(PURPOSE_PARAMS);
    let (lo, hi) = SINUSOID_AMPLITUDE;
    let (a, difficulty) = capped_uniform(&mut rng, lo, hi, spec.competence.fraction());
    let phi = uniform(&mut rng, SINUSOID_PHASE.0, SINUSOID_PHASE.1);
    (a, phi, difficulty)
}

fn sinusoid(cfg: &RegressionTaskConfig, spec: &TaskSpec) -> TaskData {
    let (a, phi, difficulty) = sinusoid_params(spec);
    let mut rng = spec.rng(PURPOSE_SAMPLES);
    let mut set = |n: usize| {
        let x: Vec<f32> = (0..n).map(|_| uniform(&mut rng, SINUSOID_X.0, SINUSOID_X.1) as f32).collect();
        let y = x.iter().map(|&x| (a * (x as f64 + phi).sin()) as f32).collect();
        Examples { x, feature_shape: vec![1], y: Targets::Real(y) }
    };
    let support = set(cfg.support);
    let query = set(cfg.query);
    TaskData { support, query, difficulty }
}

/// Per-task noise range of noisy-linear.
pub const NOISY_LINEAR_SIGMA: (f64, f64) = (0.01, 0.1);

/// Task parameters of a noisy-linear task: (w, b, σ, difficulty).
pub fn noisy_linear_params(spec: &TaskSpec) -> ([f64; 2], f64, f64, f64) {
    let mut rng = spec.rng(PURPOSE_PARAMS);
    let w = [normal(&mut rng), normal(&mut rng)];
    let b = normal(&mut rng);
    let (lo, hi) = NOISY_LINEAR_SIGMA;
    let (sigma, difficulty) = capped_uniform(&mut rng, lo, hi, spec.competence.fraction());
    (w, b, sigma, difficulty)
}

fn noisy_linear(cfg: &RegressionTaskConfig, spec: &TaskSpec) -> TaskData {
    let (w, b, sigma, difficulty) = noisy_linear_params(spec);
    let mut rng = spec.rng(PURPOSE_SAMPLES);
    let n = cfg.support + cfg.query;
    let mut x = Vec::with_capacity(2 * n);
    let mut y = Vec::with_capacity(n);
    for _ in 0..n {
        let x0 = normal(&mut rng);
        let x1 = normal(&mut rng);
        let eps = normal(&mut rng);
        x.extend([x0 as f32, x1 as f32]);
        y.push((x0 * w[0] + x1 * w[1] + b + sigma * eps) as f32);
    }
    // The first `support` samples are the support set, the rest the query set.
    let query = Examples {
        x: x.split_off(2 * cfg.support),
        feature_shape: vec![2],
        y: Targets::Real(y.split_off(cfg.support)),
    };
    let support = Examples { x, feature_shape: vec![2], y: Targets::Real(y) };
    TaskData { support, query, difficulty }
}

/// The Omniglot episode of `spec`, from the classes of its side of the configured split.
fn omniglot_task(cfg: &OmniglotTaskConfig, spec: &TaskSpec, data: &Datasets) -> Result<TaskData, TaskError> {
    let split = cfg.split().ok_or_else(|| TaskError::UnknownOmniglotSplit(cfg.split.clone()))?;
    let background = data.omniglot_background.as_deref();
    let evaluation = data.omniglot_evaluation.as_deref();
    match split {
        OmniglotSplit::Standard => {
            let set = match spec.split {
                Split::Train => background,
                Split::Eval => evaluation,
            }
            .ok_or(TaskError::MissingDataset(spec.split))?;
            omniglot_episode(cfg, spec, &OmniglotClasses::new(Characters::All(set), cfg.rotations))
        }
        OmniglotSplit::Maml => {
            let background = background.ok_or(TaskError::MissingDataset(Split::Train))?;
            let evaluation = evaluation.ok_or(TaskError::MissingDataset(Split::Eval))?;
            let chars = maml_split(background.n_chars(), evaluation.n_chars());
            let chars = match spec.split {
                Split::Train => &chars.train,
                Split::Eval => &chars.eval,
            };
            let chars = Characters::Chosen { background, evaluation, chars };
            omniglot_episode(cfg, spec, &OmniglotClasses::new(chars, cfg.rotations))
        }
    }
}

/// An Omniglot N-way K-shot episode: N distinct classes (characters, or (character, rotation) pairs), and
/// for each K + Q distinct drawings (K support, Q query); see [`episode`].
fn omniglot_episode(
    cfg: &OmniglotTaskConfig,
    spec: &TaskSpec,
    classes: &OmniglotClasses<'_>,
) -> Result<TaskData, TaskError> {
    let shape = EpisodeShape { n_way: cfg.n_way, k_shot: cfg.k_shot, q_query: cfg.q_query };
    episode::episode(shape, spec, classes)
}

/// An N-way K-shot episode from an image folder's classes of `spec`'s split; see [`episode`].
fn images_episode(cfg: &ImagesTaskConfig, spec: &TaskSpec, data: &Datasets) -> Result<TaskData, TaskError> {
    let splits = data.images.as_deref().ok_or(TaskError::MissingImages)?;
    let folder = match spec.split {
        Split::Train => &splits.train,
        Split::Eval => &splits.eval,
    };
    let shape = EpisodeShape { n_way: cfg.n_way, k_shot: cfg.k_shot, q_query: cfg.q_query };
    episode::episode(shape, spec, folder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::omniglot::{DRAWERS, PIXELS};

    /// An episode over all of `set`'s characters (the standard split's classes for one side).
    fn omniglot_episode(cfg: &OmniglotTaskConfig, spec: &TaskSpec, set: &OmniglotSet) -> Result<TaskData, TaskError> {
        super::omniglot_episode(cfg, spec, &OmniglotClasses::new(Characters::All(set), cfg.rotations))
    }

    fn spec(step: u64, index: u32) -> TaskSpec {
        TaskSpec::new(1, Split::Train, step, index)
    }

    #[test]
    fn sinusoid_is_deterministic_and_in_range() {
        let cfg = RegressionTaskConfig::sinusoid_default();
        let d = sinusoid(&cfg, &spec(3, 4));
        assert_eq!(d, sinusoid(&cfg, &spec(3, 4)));
        assert_ne!(d, sinusoid(&cfg, &spec(3, 5)));
        assert_ne!(d, sinusoid(&cfg, &TaskSpec { split: Split::Eval, ..spec(3, 4) }));
        assert_eq!(d.support.len(), 10);
        assert_eq!(d.query.len(), 10);
        for i in 0..2000 {
            let (a, phi, _) = sinusoid_params(&spec(i, 0));
            assert!((0.1..5.0).contains(&a) && (0.0..std::f64::consts::PI).contains(&phi));
            let d = sinusoid(&cfg, &spec(i, 0));
            assert!(d.support.x.iter().all(|x| (-5.0..5.0).contains(x)));
            let Targets::Real(y) = &d.support.y else { panic!() };
            for (x, y) in d.support.x.iter().zip(y) {
                assert!(((a * (*x as f64 + phi).sin()) as f32 - y).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn noisy_linear_matches_its_definition() {
        let cfg = RegressionTaskConfig::noisy_linear_default();
        let mut resid = Vec::new();
        for i in 0..500 {
            let s = spec(i, 2);
            let (w, b, sigma, _) = noisy_linear_params(&s);
            assert!((0.01..0.1).contains(&sigma));
            let d = noisy_linear(&cfg, &s);
            assert_eq!((d.support.len(), d.query.len()), (30, 20));
            assert_eq!(d.support.x.len(), 60);
            for set in [&d.support, &d.query] {
                let Targets::Real(y) = &set.y else { panic!() };
                for (k, y) in y.iter().enumerate() {
                    let f = set.x[2 * k] as f64 * w[0] + set.x[2 * k + 1] as f64 * w[1] + b;
                    resid.push((*y as f64 - f) / sigma);
                }
            }
        }
        // Residuals divided by σ are standard normal.
        let n = resid.len() as f64;
        let mean = resid.iter().sum::<f64>() / n;
        let var = resid.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.05, "mean {mean} var {var}");
    }

    #[test]
    fn omniglot_episodes_are_n_way_k_shot() {
        // 30 synthetic characters whose images encode (character, drawer) / 100 in their first two pixels.
        let n = 30;
        let mut imgs = vec![0.0f32; n * DRAWERS * PIXELS];
        for c in 0..n {
            for d in 0..DRAWERS {
                let o = (c * DRAWERS + d) * PIXELS;
                imgs[o] = c as f32 / 100.0;
                imgs[o + 1] = d as f32 / 100.0;
            }
        }
        let set = OmniglotSet::from_images(n, imgs).unwrap();
        let cfg = OmniglotTaskConfig { n_way: 5, k_shot: 1, q_query: 15, ..Default::default() };
        let e = omniglot_episode(&cfg, &spec(0, 0), &set).unwrap();
        assert_eq!(e, omniglot_episode(&cfg, &spec(0, 0), &set).unwrap());
        assert_eq!((e.support.len(), e.query.len()), (5, 75));
        let (Targets::Class(ys), Targets::Class(yq)) = (&e.support.y, &e.query.y) else { panic!() };
        // Each label maps to one character, and no drawing appears twice.
        let mut seen = std::collections::HashSet::new();
        let mut char_of = std::collections::HashMap::new();
        for (set, labels) in [(&e.support, ys), (&e.query, yq)] {
            for (k, &l) in labels.iter().enumerate() {
                let c = (set.x[k * PIXELS] * 100.0).round() as i64;
                let d = (set.x[k * PIXELS + 1] * 100.0).round() as i64;
                assert_eq!(*char_of.entry(l).or_insert(c), c);
                assert!(seen.insert((c, d)));
            }
        }
        assert_eq!(char_of.len(), 5);
        let big = OmniglotTaskConfig { n_way: 31, k_shot: 1, q_query: 1, ..Default::default() };
        assert!(omniglot_episode(&big, &spec(0, 0), &set).is_err());
    }

    #[test]
    fn competence_caps_the_difficulty_and_full_competence_changes_nothing() {
        let sin = RegressionTaskConfig::sinusoid_default();
        let lin = RegressionTaskConfig::noisy_linear_default();
        let mut easy_a = Vec::new();
        for i in 0..2000 {
            let full = spec(i, 1);
            let capped = TaskSpec { competence: Competence::from_fraction(0.25), ..full };
            // Full competence is the plain distribution, bit for bit (what runs without a curriculum get).
            let (a, _, d) = sinusoid_params(&full);
            assert!(((a - 0.1) / 4.9 - d).abs() < 1e-12, "difficulty is the amplitude quantile");
            let (ac, phic, dc) = sinusoid_params(&capped);
            assert!(dc <= 0.25 && (0.1..=0.1 + 4.9 * 0.25).contains(&ac), "A {ac} d {dc}");
            assert_eq!(phic, sinusoid_params(&full).1, "the phase is not capped");
            easy_a.push(ac);
            let (_, _, sigma, d) = noisy_linear_params(&capped);
            assert!(d <= 0.25 && sigma <= 0.01 + 0.09 * 0.25 + 1e-12);
            let t = noisy_linear(&lin, &capped);
            assert_eq!(t.difficulty, d);
            assert_eq!(sinusoid(&sin, &full).difficulty, sinusoid_params(&full).2);
        }
        // Uniform over the allowed range: the mean amplitude is the range's midpoint.
        let mean = easy_a.iter().sum::<f64>() / easy_a.len() as f64;
        assert!((mean - (0.1 + 4.9 * 0.125)).abs() < 0.03, "mean amplitude {mean}");
        assert_eq!(Competence::from_fraction(1.0), Competence::FULL);
        assert_eq!(Competence(u32::MAX).fraction(), 1.0, "out-of-range values from a peer mean 1");
        assert_eq!(Competence::from_fraction(f64::NAN), Competence::FULL);
    }

    #[test]
    fn omniglot_difficulty_counts_alphabet_mates_and_competence_bounds_it() {
        // 40 characters in 4 alphabets of 10.
        let n = 40;
        let set = OmniglotSet::from_images(n, vec![0.0; n * DRAWERS * PIXELS])
            .unwrap()
            .with_alphabets((0..n as u32).map(|c| c / 10).collect())
            .unwrap();
        assert_eq!(episode_difficulty(&[0, 10, 20, 30], &set), 0.0);
        assert_eq!(episode_difficulty(&[0, 1, 2, 3], &set), 1.0);
        assert!((episode_difficulty(&[0, 1, 20, 30], &set) - 1.0 / 3.0).abs() < 1e-12);
        let cfg = OmniglotTaskConfig { n_way: 4, k_shot: 1, q_query: 1, ..Default::default() };
        let mut hard = 0;
        for i in 0..300 {
            let full = spec(i, 0);
            let e = omniglot_episode(&cfg, &full, &set).unwrap();
            hard += usize::from(e.difficulty > 0.0);
            let capped = TaskSpec { competence: Competence::from_fraction(0.0), ..full };
            let c = omniglot_episode(&cfg, &capped, &set).unwrap();
            assert_eq!(c.difficulty, 0.0, "an episode of four alphabets is always found");
            assert_eq!(c, omniglot_episode(&cfg, &capped, &set).unwrap());
        }
        // Four characters from four alphabets of ten: P(all distinct) = 30·20·10/(39·38·37) ≈ 0.11.
        assert!(hard > 220, "most uncapped episodes share an alphabet: {hard}/300");
    }
}
