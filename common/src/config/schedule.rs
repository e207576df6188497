//! MAML++'s schedules (Antoniou et al., "How to train your MAML", 2019) as pure functions of the
//! meta-step, so that every worker computes a task the same way whatever machine it runs on: the
//! multi-step loss weights, the derivative-order annealing, and the cosine meta learning rate.

use super::{invalid, AlgoConfig, AlgoKind, ConfigError, LrSchedule, TrainConfig};

/// Floor of a non-final step's weight in the multi-step loss, times the number of steps (MAML++'s
/// `0.03 / K`).
const MSL_MIN_NON_FINAL: f64 = 0.03;

impl AlgoConfig {
    /// Weights of the query loss after inner steps 1..=K at meta-step `step` (`None`: the final step
    /// alone, i.e. no multi-step loss). As MAML++'s code: every weight starts at 1/K; the non-final
    /// ones fall linearly to 0.03/K over `msl_anneal_steps` meta-steps while the final one rises to
    /// 1 − (K − 1)·0.03/K. The weights always sum to 1.
    pub fn step_loss_weights(&self, step: u64) -> Option<Vec<f64>> {
        let k = self.inner_steps;
        if !self.multi_step_loss || k < 2 {
            return None;
        }
        let kf = k as f64;
        let progress = (step as f64 / self.msl_anneal_steps.max(1) as f64).min(1.0);
        let floor = MSL_MIN_NON_FINAL / kf;
        let non_final = (1.0 / kf - progress / kf).max(floor);
        let mut w = vec![non_final; k];
        w[k - 1] = 1.0 - (kf - 1.0) * non_final;
        Some(w)
    }

    /// Whether meta-step `step` differentiates through the inner gradients: the algorithm's order,
    /// after `first_order_steps` first-order meta-steps.
    pub fn second_order_at(&self, step: u64) -> bool {
        self.name.second_order() && step >= self.first_order_steps
    }
}

impl TrainConfig {
    /// The meta learning rate of meta-step `step` (0-based): `meta_lr`, or with the cosine schedule
    /// `min + (meta_lr − min)·(1 + cos(π·step/steps))/2`, from `meta_lr` at step 0 towards `min_meta_lr`.
    pub fn meta_lr_at(&self, step: u64) -> f64 {
        match self.lr_schedule {
            LrSchedule::Constant => self.meta_lr,
            LrSchedule::Cosine => {
                let t = (step as f64 / self.steps.max(1) as f64).min(1.0);
                self.min_meta_lr + (self.meta_lr - self.min_meta_lr) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

/// Checks the MAML++ options against the algorithm they modify.
pub(super) fn validate(a: &AlgoConfig, t: &TrainConfig) -> Result<(), ConfigError> {
    if a.multi_step_loss && a.name == AlgoKind::Reptile {
        return Err(invalid("algo.multi_step_loss", "reptile has no query loss to weight"));
    }
    if a.per_step_lrs && matches!(a.name, AlgoKind::Reptile | AlgoKind::MetaSgd) {
        return Err(invalid(
            "algo.per_step_lrs",
            format!(
                "applies to maml, fomaml and anil, not {} (meta-sgd learns a rate per entry already)",
                a.name.name()
            ),
        ));
    }
    if a.per_step_lrs && a.inner_steps == 0 {
        return Err(invalid("algo.inner_steps", "per-step learned rates need at least 1 inner step"));
    }
    if a.first_order_steps > 0 && !a.name.second_order() {
        return Err(invalid("algo.first_order_steps", format!("{} is first order already", a.name.name())));
    }
    if a.per_step_bn && a.name == AlgoKind::Reptile {
        return Err(invalid(
            "algo.per_step_bn",
            "reptile moves only what the inner loop adapts; per-step batch norm is not adapted",
        ));
    }
    let maml_pp = a.multi_step_loss || a.per_step_lrs || a.first_order_steps > 0 || a.per_step_bn;
    if maml_pp && a.compute_dtype == super::ComputeDtype::Bf16 {
        return Err(invalid(
            "algo.compute_dtype",
            "bf16 runs on the batched path only, and MAML++'s options take the per-task path: use f32",
        ));
    }
    if !(t.min_meta_lr.is_finite() && t.min_meta_lr >= 0.0 && t.min_meta_lr <= t.meta_lr) {
        return Err(invalid("train.min_meta_lr", format!("must be in [0, train.meta_lr], got {}", t.min_meta_lr)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_step_weights_follow_maml_plus_plus() {
        let a = AlgoConfig { inner_steps: 5, multi_step_loss: true, msl_anneal_steps: 100, ..AlgoConfig::default() };
        assert!(a.step_loss_weights(0).unwrap().iter().all(|w| (w - 0.2).abs() < 1e-15));
        let mid = a.step_loss_weights(50).unwrap();
        assert!((mid[0] - 0.1).abs() < 1e-12 && (mid[4] - 0.6).abs() < 1e-12, "{mid:?}");
        let end = a.step_loss_weights(1000).unwrap();
        assert!((end[0] - 0.006).abs() < 1e-12 && (end[4] - 0.976).abs() < 1e-12, "{end:?}");
        for s in [0, 7, 50, 99, 100, 10_000] {
            let w = a.step_loss_weights(s).unwrap();
            assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12 && w.iter().all(|v| *v > 0.0));
        }
        assert_eq!(AlgoConfig { multi_step_loss: false, ..a.clone() }.step_loss_weights(5), None);
        assert_eq!(AlgoConfig { inner_steps: 1, ..a }.step_loss_weights(5), None);
    }

    #[test]
    fn derivative_order_anneals_from_first_to_second() {
        let a = AlgoConfig { first_order_steps: 10, ..AlgoConfig::default() };
        assert!(!a.second_order_at(0) && !a.second_order_at(9) && a.second_order_at(10));
        let fo = AlgoConfig { name: AlgoKind::Fomaml, ..AlgoConfig::default() };
        assert!(!fo.second_order_at(1000));
    }

    #[test]
    fn cosine_meta_lr_runs_from_meta_lr_to_its_floor() {
        let t = TrainConfig {
            steps: 100,
            meta_lr: 1e-3,
            min_meta_lr: 1e-5,
            lr_schedule: LrSchedule::Cosine,
            ..TrainConfig::default()
        };
        assert_eq!(t.meta_lr_at(0), 1e-3);
        assert!((t.meta_lr_at(50) - (1e-5 + (1e-3 - 1e-5) * 0.5)).abs() < 1e-15);
        assert!((t.meta_lr_at(100) - 1e-5).abs() < 1e-18 && (t.meta_lr_at(5000) - 1e-5).abs() < 1e-18);
        assert!((1..100).all(|s| t.meta_lr_at(s) < t.meta_lr_at(s - 1)));
        assert_eq!(TrainConfig::default().meta_lr_at(500), 1e-3);
    }

    #[test]
    fn options_that_do_not_fit_the_algorithm_are_refused() {
        let t = TrainConfig::default();
        let bad = [
            AlgoConfig { name: AlgoKind::Reptile, multi_step_loss: true, ..AlgoConfig::default() },
            AlgoConfig { name: AlgoKind::MetaSgd, per_step_lrs: true, ..AlgoConfig::default() },
            AlgoConfig { name: AlgoKind::Fomaml, first_order_steps: 5, ..AlgoConfig::default() },
            AlgoConfig { per_step_lrs: true, compute_dtype: super::super::ComputeDtype::Bf16, ..AlgoConfig::default() },
        ];
        for a in bad {
            assert!(validate(&a, &t).is_err(), "{a:?}");
        }
        assert!(
            validate(&AlgoConfig { multi_step_loss: true, per_step_lrs: true, ..AlgoConfig::default() }, &t).is_ok()
        );
        assert!(validate(&AlgoConfig::default(), &TrainConfig { min_meta_lr: 1.0, ..t }).is_err());
    }
}
