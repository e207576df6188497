//! Dirty tasks on purpose: `[corrupt]` makes a fraction of the *training* tasks wrong, the way real task
//! pools are (mislabelled examples, outliers, a task recorded in other units), so that a defence can be
//! tested against a known truth.
//!
//! Whether a spec is corrupted, and how, is a pure function of (config, spec) drawn from the spec's own
//! stream (purpose [`PURPOSE_CORRUPT`]): the coordinator knows which tasks are corrupted without seeing
//! their data (for the quarantine's precision and recall), and every worker corrupts a task identically.
//! Held-out tasks are never corrupted: they measure the clean distribution.
//!
//! - `shuffled-labels`: the targets of the support set, and separately of the query set, are permuted
//!   among its examples (a random permutation; for regression the values, for images the class labels).
//! - `outlier-targets`: a quarter (rounded up) of each set's targets are replaced — regression values by
//!   ±`outlier_magnitude`, class labels by another class.
//! - `huge-scale`: regression targets are multiplied by `huge_scale`; images have no real-valued targets,
//!   so their pixels are (a task recorded in other units).

use rand::Rng;
use rand_chacha::ChaCha8Rng;

use super::{Examples, Split, Targets, TaskData, TaskSpec, PURPOSE_CORRUPT};
use crate::config::{CorruptConfig, Corruption};
use crate::rng::choose_distinct;

/// Whether `spec` is one of the corrupted tasks, and how.
pub fn corruption(cfg: &CorruptConfig, spec: &TaskSpec) -> Option<Corruption> {
    if spec.split != Split::Train || cfg.fraction <= 0.0 || cfg.kinds.is_empty() {
        return None;
    }
    let mut rng = spec.rng(PURPOSE_CORRUPT);
    if rng.gen::<f64>() >= cfg.fraction {
        return None;
    }
    Some(cfg.kinds[rng.gen_range(0..cfg.kinds.len())])
}

/// Corrupts `task` (drawn for `spec`) in the way `kind`.
pub fn apply(cfg: &CorruptConfig, kind: Corruption, spec: &TaskSpec, task: &mut TaskData) {
    // A stream of its own, after the one `corruption` used to decide.
    let mut rng = spec.rng_attempt(PURPOSE_CORRUPT, 1);
    let n_classes = class_count(task);
    for set in [&mut task.support, &mut task.query] {
        match kind {
            Corruption::ShuffledLabels => shuffle_targets(set, &mut rng),
            Corruption::OutlierTargets => outliers(set, cfg.outlier_magnitude, n_classes, &mut rng),
            Corruption::HugeScale => scale(set, cfg.huge_scale),
        }
    }
}

/// Classes in a classification task (the largest label + 1); 0 for regression.
fn class_count(task: &TaskData) -> i64 {
    let max = |e: &Examples| match &e.y {
        Targets::Class(v) => v.iter().copied().max().map_or(0, |m| m + 1),
        Targets::Real(_) => 0,
    };
    max(&task.support).max(max(&task.query))
}

fn shuffle_targets(set: &mut Examples, rng: &mut ChaCha8Rng) {
    let n = set.len();
    let perm = choose_distinct(rng, n, n);
    match &mut set.y {
        Targets::Real(v) => *v = perm.iter().map(|&i| v[i]).collect(),
        Targets::Class(v) => *v = perm.iter().map(|&i| v[i]).collect(),
    }
}

fn outliers(set: &mut Examples, magnitude: f64, n_classes: i64, rng: &mut ChaCha8Rng) {
    let n = set.len();
    let k = n.div_ceil(4);
    let which = choose_distinct(rng, n, k);
    match &mut set.y {
        Targets::Real(v) => {
            for i in which {
                let sign = if rng.gen::<bool>() { 1.0 } else { -1.0 };
                v[i] = (sign * magnitude) as f32;
            }
        }
        Targets::Class(v) if n_classes >= 2 => {
            for i in which {
                // Another class, uniformly among the other n − 1.
                v[i] = (v[i] + rng.gen_range(1..n_classes)) % n_classes;
            }
        }
        Targets::Class(_) => {}
    }
}

fn scale(set: &mut Examples, factor: f64) {
    match &mut set.y {
        Targets::Real(v) => v.iter_mut().for_each(|y| *y = (*y as f64 * factor) as f32),
        Targets::Class(_) => set.x.iter_mut().for_each(|x| *x = (*x as f64 * factor) as f32),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, RegressionTaskConfig, TaskConfig};
    use crate::task::{generate, generate_clean, Datasets};

    fn config(fraction: f64, kinds: Vec<Corruption>) -> Config {
        let mut c = Config::default();
        c.task = TaskConfig::NoisyLinear(RegressionTaskConfig::noisy_linear_default());
        c.corrupt.fraction = fraction;
        c.corrupt.kinds = kinds;
        c
    }

    fn real(e: &Examples) -> Vec<f32> {
        match &e.y {
            Targets::Real(v) => v.clone(),
            Targets::Class(_) => panic!("regression expected"),
        }
    }

    #[test]
    fn the_fraction_corrupted_is_the_configured_one_and_only_in_training() {
        let c = config(0.2, CorruptConfig::default().kinds);
        let n = 20_000;
        let mut by_kind = std::collections::BTreeMap::new();
        for i in 0..n {
            if let Some(k) = corruption(&c.corrupt, &TaskSpec::new(3, Split::Train, i / 25, (i % 25) as u32)) {
                *by_kind.entry(k).or_insert(0usize) += 1;
            }
            assert_eq!(corruption(&c.corrupt, &TaskSpec::new(3, Split::Eval, i, 0)), None);
        }
        let total: usize = by_kind.values().sum();
        let frac = total as f64 / n as f64;
        // 20 000 Bernoulli(0.2) draws: the standard error is 0.0028.
        assert!((frac - 0.2).abs() < 0.012, "corrupted fraction {frac}");
        assert_eq!(by_kind.len(), 3, "every kind drawn: {by_kind:?}");
        assert!(by_kind.values().all(|&k| (k as f64 / total as f64 - 1.0 / 3.0).abs() < 0.04), "{by_kind:?}");
        assert_eq!(
            corruption(&config(0.0, CorruptConfig::default().kinds).corrupt, &TaskSpec::new(3, Split::Train, 0, 0)),
            None
        );
    }

    #[test]
    fn each_corruption_does_what_it_says() {
        let data = Datasets::default();
        let spec = TaskSpec::new(5, Split::Train, 2, 7);
        let clean = generate_clean(&config(0.0, vec![]).task, &spec, &data).unwrap();
        for kind in [Corruption::ShuffledLabels, Corruption::OutlierTargets, Corruption::HugeScale] {
            let c = config(1.0, vec![kind]);
            let dirty = generate(&c, &spec, &data).unwrap();
            assert_eq!(dirty.support.x, clean.support.x, "{kind:?} leaves regression inputs alone");
            assert_eq!(dirty, generate(&c, &spec, &data).unwrap(), "deterministic");
            for (d, k) in [(&dirty.support, &clean.support), (&dirty.query, &clean.query)] {
                let (d, k) = (real(d), real(k));
                match kind {
                    Corruption::ShuffledLabels => {
                        let (mut a, mut b) = (d.clone(), k.clone());
                        a.sort_by(f32::total_cmp);
                        b.sort_by(f32::total_cmp);
                        assert_eq!(a, b, "a permutation");
                        assert_ne!(d, k, "that moved something");
                    }
                    Corruption::OutlierTargets => {
                        let replaced = d.iter().zip(&k).filter(|(a, b)| a != b).count();
                        assert_eq!(replaced, k.len().div_ceil(4));
                        assert!(d.iter().zip(&k).all(|(a, b)| a == b || a.abs() == 50.0));
                    }
                    Corruption::HugeScale => {
                        assert!(d.iter().zip(&k).all(|(a, b)| *a == (*b as f64 * 100.0) as f32));
                    }
                }
            }
        }
    }

    #[test]
    fn class_labels_are_corrupted_into_other_valid_classes() {
        let mut e =
            Examples { x: vec![0.5; 8], feature_shape: vec![1], y: Targets::Class(vec![0, 1, 2, 3, 0, 1, 2, 3]) };
        let mut rng = crate::rng::keyed_rng(&[1]);
        outliers(&mut e, 50.0, 4, &mut rng);
        let Targets::Class(v) = &e.y else { panic!() };
        let changed = v.iter().zip([0, 1, 2, 3, 0, 1, 2, 3]).filter(|(a, b)| **a != *b).count();
        assert_eq!(changed, 2);
        assert!(v.iter().all(|l| (0..4).contains(l)));
        scale(&mut e, 100.0);
        assert!(e.x.iter().all(|&x| x == 50.0), "images scale their pixels");
    }
}
