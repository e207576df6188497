//! The curriculum: competence c(t) ∈ [0, 1], the hardest task difficulty the sampler may draw at meta-step
//! t (see `metatrain_common::task` for each distribution's difficulty). I/O-free; deterministic in the
//! config and, for `adaptive`, in the held-out losses it has been shown (themselves deterministic), and
//! saved in checkpoints so that a resumed run continues on the same schedule.
//!
//! - `none`: c = 1.
//! - `linear`: c(t) = min(1, c₀ + (1 − c₀)·t/T).
//! - `step`: c(t) = c₀ + (1 − c₀)·min(L, ⌊t·L/T⌋)/L — L equal jumps, the last at t = T.
//! - `competence` (Platanios et al. 2019, "square root"): c(t) = min(1, √(t·(1 − c₀²)/T + c₀²)).
//! - `adaptive`: c starts at c₀; after each periodic evaluation, if the held-out post-adaptation loss is
//!   not below (1 − min_improvement) × the best so far for `patience` evaluations in a row, c grows by
//!   `increment` (to at most 1) and the count starts again.

use metatrain_common::config::{CurriculumConfig, Schedule};
use serde::{Deserialize, Serialize};

/// What an adaptive curriculum remembers (checkpoints store f64s as bits, so resume is exact).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CurriculumState {
    pub competence_bits: u64,
    pub best_loss_bits: u64,
    pub evals_without_improvement: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Curriculum {
    cfg: CurriculumConfig,
    /// Adaptive only: current competence, best held-out loss, evaluations since it improved.
    competence: f64,
    best_loss: f64,
    stale: u32,
}

impl Curriculum {
    pub fn new(cfg: &CurriculumConfig) -> Self {
        Curriculum { cfg: cfg.clone(), competence: cfg.start.clamp(0.0, 1.0), best_loss: f64::INFINITY, stale: 0 }
    }

    /// Competence for the meta-batch of step `step` (0-based).
    pub fn competence(&self, step: u64) -> f64 {
        let c0 = self.cfg.start.clamp(0.0, 1.0);
        let t = step as f64;
        let total = self.cfg.duration.max(1) as f64;
        match self.cfg.schedule {
            Schedule::None => 1.0,
            Schedule::Linear => (c0 + (1.0 - c0) * t / total).min(1.0),
            Schedule::Step => {
                let levels = self.cfg.levels.max(1) as u64;
                let done = (step.saturating_mul(levels) / self.cfg.duration.max(1)).min(levels);
                c0 + (1.0 - c0) * done as f64 / levels as f64
            }
            Schedule::Competence => (t * (1.0 - c0 * c0) / total + c0 * c0).sqrt().min(1.0),
            Schedule::Adaptive => self.competence,
        }
    }

    /// Shows an adaptive curriculum a periodic evaluation's held-out post-adaptation loss.
    /// Returns whether competence advanced.
    pub fn observe_eval(&mut self, loss: f64) -> bool {
        if self.cfg.schedule != Schedule::Adaptive || !loss.is_finite() {
            return false;
        }
        if loss < self.best_loss * (1.0 - self.cfg.min_improvement) {
            self.best_loss = self.best_loss.min(loss);
            self.stale = 0;
            return false;
        }
        self.best_loss = self.best_loss.min(loss);
        self.stale += 1;
        if self.stale < self.cfg.patience || self.competence >= 1.0 {
            return false;
        }
        self.stale = 0;
        self.competence = (self.competence + self.cfg.increment).min(1.0);
        true
    }

    pub fn state(&self) -> CurriculumState {
        CurriculumState {
            competence_bits: self.competence.to_bits(),
            best_loss_bits: self.best_loss.to_bits(),
            evals_without_improvement: self.stale,
        }
    }

    pub fn restore(&mut self, s: &CurriculumState) -> Result<(), String> {
        let c = f64::from_bits(s.competence_bits);
        let best = f64::from_bits(s.best_loss_bits);
        if !(0.0..=1.0).contains(&c) || best.is_nan() {
            return Err(format!("the checkpoint's curriculum state is invalid (competence {c}, best loss {best})"));
        }
        self.competence = c;
        self.best_loss = best;
        self.stale = s.evals_without_improvement;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(schedule: Schedule) -> CurriculumConfig {
        CurriculumConfig { schedule, start: 0.2, duration: 100, levels: 4, ..CurriculumConfig::default() }
    }

    #[test]
    fn fixed_schedules_follow_their_formulas() {
        let none = Curriculum::new(&cfg(Schedule::None));
        assert!((0..300).all(|t| none.competence(t) == 1.0));
        let lin = Curriculum::new(&cfg(Schedule::Linear));
        assert_eq!(lin.competence(0), 0.2);
        assert!((lin.competence(50) - 0.6).abs() < 1e-12);
        assert_eq!(lin.competence(100), 1.0);
        assert_eq!(lin.competence(1000), 1.0);
        let step = Curriculum::new(&cfg(Schedule::Step));
        let s: Vec<f64> = [0, 24, 25, 49, 50, 75, 99, 100, 500].iter().map(|&t| step.competence(t)).collect();
        let want = [0.2, 0.2, 0.4, 0.4, 0.6, 0.8, 0.8, 1.0, 1.0];
        assert!(s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{s:?}");
        let comp = Curriculum::new(&cfg(Schedule::Competence));
        assert!((comp.competence(0) - 0.2).abs() < 1e-12);
        // Platanios et al.: c(t) = sqrt(t (1 - c0²) / T + c0²).
        assert!((comp.competence(50) - (50.0 * 0.96 / 100.0 + 0.04f64).sqrt()).abs() < 1e-12);
        assert_eq!(comp.competence(100), 1.0);
        for c in [&lin, &step, &comp] {
            assert!((1..300).all(|t| c.competence(t) >= c.competence(t - 1)), "non-decreasing");
        }
        // The square-root schedule front-loads: ahead of linear in between.
        assert!((1..100).all(|t| comp.competence(t) > lin.competence(t)));
    }

    #[test]
    fn adaptive_advances_when_the_held_out_loss_stops_improving() {
        let mut a = Curriculum::new(&CurriculumConfig { patience: 2, increment: 0.3, ..cfg(Schedule::Adaptive) });
        assert_eq!(a.competence(0), 0.2);
        assert!(!a.observe_eval(1.0));
        assert!(!a.observe_eval(0.9), "improved by 10 %");
        assert!(!a.observe_eval(0.895), "< 1 % better: first stale evaluation");
        assert!(a.observe_eval(0.95), "second stale evaluation: advance");
        assert!((a.competence(999) - 0.5).abs() < 1e-12);
        assert!(!a.observe_eval(0.5), "improving again");
        let saved = a.state();
        assert!(!a.observe_eval(0.6));
        assert!(a.observe_eval(0.6));
        assert!((a.competence(0) - 0.8).abs() < 1e-12);
        assert!(!a.observe_eval(0.6));
        assert!(a.observe_eval(0.6));
        assert_eq!(a.competence(0), 1.0, "capped at 1");
        assert!(!a.observe_eval(0.6) && !a.observe_eval(0.6), "nothing left to advance");
        // Restoring the saved state replays identically.
        let mut b = Curriculum::new(&CurriculumConfig { patience: 2, increment: 0.3, ..cfg(Schedule::Adaptive) });
        b.restore(&saved).unwrap();
        assert!(!b.observe_eval(0.6) && b.observe_eval(0.6));
        assert!((b.competence(0) - 0.8).abs() < 1e-12);
        assert!(b.restore(&CurriculumState { competence_bits: 2.0f64.to_bits(), ..saved }).is_err());
        // Non-adaptive schedules ignore evaluations.
        let mut lin = Curriculum::new(&cfg(Schedule::Linear));
        assert!(!lin.observe_eval(5.0) && !lin.observe_eval(5.0) && !lin.observe_eval(5.0));
        assert_eq!(lin.competence(0), 0.2);
    }
}
