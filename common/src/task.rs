//! Task specs and task distributions.
//!
//! A [`TaskSpec`] is tiny and travels on the wire; the worker materialises the task's data from it with
//! [`generate`]. A task's data is a pure function of (config, spec): every random draw comes from a stream
//! keyed by (run seed, split, step, index) — never from a global RNG, never from which worker computes it.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{OmniglotTaskConfig, RegressionTaskConfig, TaskConfig};
use crate::omniglot::{OmniglotSet, DRAWERS, PIXELS, SIDE};
use crate::rng::{choose_distinct, keyed_rng, normal, uniform};

/// Meta-training tasks or held-out (meta-test) tasks. Held-out tasks come from separate random streams
/// and, for Omniglot, from the evaluation split's characters.
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

/// One task, identified by where it sits in the run: (seed, split, step, index).
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
}

/// `step` of the final evaluation's tasks.
pub const FINAL_EVAL_STEP: u64 = u64::MAX;

impl TaskSpec {
    fn rng(&self, purpose: u64) -> rand_chacha::ChaCha8Rng {
        keyed_rng(&[self.seed, self.split.key(), self.step, self.index as u64, purpose])
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
}

#[derive(Debug, Error)]
pub enum TaskError {
    #[error("omniglot tasks need the Omniglot {0:?} split loaded (see --data-dir)")]
    MissingDataset(Split),
    #[error("omniglot {split:?} split has {have} characters, an episode needs {need} (n_way)")]
    TooFewClasses { split: Split, have: usize, need: usize },
}

/// The image sets a worker has loaded (only Omniglot needs any).
#[derive(Default)]
pub struct Datasets {
    pub omniglot_background: Option<std::sync::Arc<OmniglotSet>>,
    pub omniglot_evaluation: Option<std::sync::Arc<OmniglotSet>>,
}

/// Materialises the task `spec` of the distribution `config`.
pub fn generate(config: &TaskConfig, spec: &TaskSpec, data: &Datasets) -> Result<TaskData, TaskError> {
    match config {
        TaskConfig::Sinusoid(r) => Ok(sinusoid(r, spec)),
        TaskConfig::NoisyLinear(r) => Ok(noisy_linear(r, spec)),
        TaskConfig::Omniglot(o) => {
            let set = match spec.split {
                Split::Train => data.omniglot_background.as_deref(),
                Split::Eval => data.omniglot_evaluation.as_deref(),
            }
            .ok_or(TaskError::MissingDataset(spec.split))?;
            omniglot_episode(o, spec, set)
        }
    }
}

/// Sinusoid ranges from the MAML paper.
pub const SINUSOID_AMPLITUDE: (f64, f64) = (0.1, 5.0);
pub const SINUSOID_PHASE: (f64, f64) = (0.0, std::f64::consts::PI);
pub const SINUSOID_X: (f64, f64) = (-5.0, 5.0);

/// Task parameters of a sinusoid task: (amplitude, phase).
pub fn sinusoid_params(spec: &TaskSpec) -> (f64, f64) {
    let mut rng = spec.rng(1);
    let a = uniform(&mut rng, SINUSOID_AMPLITUDE.0, SINUSOID_AMPLITUDE.1);
    let phi = uniform(&mut rng, SINUSOID_PHASE.0, SINUSOID_PHASE.1);
    (a, phi)
}

fn sinusoid(cfg: &RegressionTaskConfig, spec: &TaskSpec) -> TaskData {
    let (a, phi) = sinusoid_params(spec);
    let mut rng = spec.rng(2);
    let mut set = |n: usize| {
        let x: Vec<f32> = (0..n).map(|_| uniform(&mut rng, SINUSOID_X.0, SINUSOID_X.1) as f32).collect();
        let y = x.iter().map(|&x| (a * (x as f64 + phi).sin()) as f32).collect();
        Examples { x, feature_shape: vec![1], y: Targets::Real(y) }
    };
    let support = set(cfg.support);
    let query = set(cfg.query);
    TaskData { support, query }
}

/// Per-task noise range of noisy-linear.
pub const NOISY_LINEAR_SIGMA: (f64, f64) = (0.01, 0.1);

/// Task parameters of a noisy-linear task: (w, b, σ).
pub fn noisy_linear_params(spec: &TaskSpec) -> ([f64; 2], f64, f64) {
    let mut rng = spec.rng(1);
    let w = [normal(&mut rng), normal(&mut rng)];
    let b = normal(&mut rng);
    let sigma = uniform(&mut rng, NOISY_LINEAR_SIGMA.0, NOISY_LINEAR_SIGMA.1);
    (w, b, sigma)
}

fn noisy_linear(cfg: &RegressionTaskConfig, spec: &TaskSpec) -> TaskData {
    let (w, b, sigma) = noisy_linear_params(spec);
    let mut rng = spec.rng(2);
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
    TaskData { support, query }
}

/// An N-way K-shot episode: N distinct characters, and for each K + Q distinct drawings (K support, Q
/// query). Labels are the characters' positions in the draw, so they carry no information across tasks.
fn omniglot_episode(cfg: &OmniglotTaskConfig, spec: &TaskSpec, set: &OmniglotSet) -> Result<TaskData, TaskError> {
    if set.n_chars() < cfg.n_way {
        return Err(TaskError::TooFewClasses { split: spec.split, have: set.n_chars(), need: cfg.n_way });
    }
    let mut rng = spec.rng(3);
    let chars = choose_distinct(&mut rng, set.n_chars(), cfg.n_way);
    let mut support = (Vec::new(), Vec::new());
    let mut query = (Vec::new(), Vec::new());
    for (label, &ch) in chars.iter().enumerate() {
        let drawers = choose_distinct(&mut rng, DRAWERS, cfg.k_shot + cfg.q_query);
        for (j, &d) in drawers.iter().enumerate() {
            let dst = if j < cfg.k_shot { &mut support } else { &mut query };
            dst.0.extend_from_slice(set.image(ch, d));
            dst.1.push(label as i64);
        }
    }
    // Order within a set is class-major; it changes no loss or gradient (both are means over examples).
    let shape = vec![1, SIDE, SIDE];
    debug_assert_eq!(support.0.len(), support.1.len() * PIXELS);
    Ok(TaskData {
        support: Examples { x: support.0, feature_shape: shape.clone(), y: Targets::Class(support.1) },
        query: Examples { x: query.0, feature_shape: shape, y: Targets::Class(query.1) },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(step: u64, index: u32) -> TaskSpec {
        TaskSpec { seed: 1, split: Split::Train, step, index }
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
            let (a, phi) = sinusoid_params(&spec(i, 0));
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
            let (w, b, sigma) = noisy_linear_params(&s);
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
        let cfg = OmniglotTaskConfig { n_way: 5, k_shot: 1, q_query: 15 };
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
        let big = OmniglotTaskConfig { n_way: 31, k_shot: 1, q_query: 1 };
        assert!(omniglot_episode(&big, &spec(0, 0), &set).is_err());
    }
}
