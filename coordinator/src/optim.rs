//! The outer optimizer over the meta-parameters: Adam with PyTorch's update rule, in plain Rust so the
//! control plane needs no libtorch and the update is bitwise reproducible.

use metatrain_common::config::TrainConfig;

/// Adam state: first and second moments and the step count.
#[derive(Clone, Debug, PartialEq)]
pub struct Adam {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    m: Vec<f32>,
    v: Vec<f32>,
    t: u64,
}

impl Adam {
    pub fn new(config: &TrainConfig, numel: usize) -> Self {
        Adam {
            lr: config.meta_lr,
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_eps,
            m: vec![0.0; numel],
            v: vec![0.0; numel],
            t: 0,
        }
    }

    /// The learning rate of the next [`Adam::step`] (`train.lr_schedule` sets it per meta-step).
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// The state a checkpoint needs: (step count, first moments, second moments).
    pub fn state(&self) -> (u64, &[f32], &[f32]) {
        (self.t, &self.m, &self.v)
    }

    /// Restores a checkpointed state: the lengths must match the parameter count, the moments be finite
    /// (second moments non-negative) and the step count fit the bias corrections.
    pub fn restore(&mut self, t: u64, m: Vec<f32>, v: Vec<f32>) -> Result<(), String> {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            return Err(format!("optimizer state has {} values, the model {}", m.len(), self.m.len()));
        }
        if t > MAX_STEPS {
            return Err(format!("optimizer step count {t} is beyond {MAX_STEPS}"));
        }
        if let Some(i) = m.iter().position(|x| !x.is_finite()) {
            return Err(format!("optimizer first moment {i} is {}", m[i]));
        }
        if let Some(i) = v.iter().position(|x| !(x.is_finite() && *x >= 0.0)) {
            return Err(format!("optimizer second moment {i} is {} (must be finite and ≥ 0)", v[i]));
        }
        (self.t, self.m, self.v) = (t, m, v);
        Ok(())
    }

    /// One update `params -= lr · m̂ / (√v̂ + ε)` with bias-corrected moments (torch.optim.Adam). If any
    /// updated parameter or moment would not be finite (the run diverged: e.g. a huge `meta_lr`), nothing
    /// changes and the first offending parameter is returned, so a non-finite value never reaches the
    /// parameters, a checkpoint or a worker.
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) -> Result<(), Diverged> {
        let t = self.t + 1;
        if t > MAX_STEPS {
            return Err(Diverged { index: 0, value: params.first().copied().unwrap_or(0.0) });
        }
        // `powi` (not `powf`): the results are bitwise those of every earlier run; t ≤ MAX_STEPS fits i32.
        let bc1 = 1.0 - self.beta1.powi(t as i32);
        let bc2 = 1.0 - self.beta2.powi(t as i32);
        let (b1, b2, lr, eps) = (self.beta1, self.beta2, self.lr, self.eps);
        let update = move |m: f32, v: f32, p: f32, g: f32| {
            let g = g as f64;
            let m = b1 * m as f64 + (1.0 - b1) * g;
            let v = b2 * v as f64 + (1.0 - b2) * g * g;
            // The moments are stored in f32 but the update uses their f64 values.
            let delta = lr * (m / bc1) / ((v / bc2).sqrt() + eps);
            (m as f32, v as f32, (p as f64 - delta) as f32)
        };
        // Check first, then apply: the same arithmetic twice, so the state is never half-updated.
        for i in 0..params.len() {
            let (m, v, p) = update(self.m[i], self.v[i], params[i], grad[i]);
            if !(m.is_finite() && v.is_finite() && p.is_finite()) {
                return Err(Diverged { index: i, value: p });
            }
        }
        for i in 0..params.len() {
            (self.m[i], self.v[i], params[i]) = update(self.m[i], self.v[i], params[i], grad[i]);
        }
        self.t = t;
        Ok(())
    }
}

/// Most optimizer steps (far beyond any run): the bias corrections' `powi` takes an i32.
const MAX_STEPS: u64 = i32::MAX as u64;

/// An update that would have made a parameter (or Adam's state) non-finite.
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
#[error("the update would make parameter {index} {value}: the run diverged (lower train.meta_lr, algo.inner_lr or train.max_grad_norm)")]
pub struct Diverged {
    pub index: usize,
    pub value: f32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_by_lr_against_the_sign() {
        let cfg = TrainConfig { meta_lr: 0.01, ..TrainConfig::default() };
        let mut adam = Adam::new(&cfg, 3);
        let mut p = vec![1.0f32, 1.0, 1.0];
        adam.step(&mut p, &[0.5, -2.0, 0.0]).unwrap();
        assert!((p[0] - 0.99).abs() < 1e-6 && (p[1] - 1.01).abs() < 1e-6 && p[2] == 1.0, "{p:?}");
    }

    #[test]
    fn matches_a_hand_computed_second_step() {
        let cfg = TrainConfig { meta_lr: 0.1, ..TrainConfig::default() };
        let mut adam = Adam::new(&cfg, 1);
        let mut p = vec![0.0f32];
        adam.step(&mut p, &[1.0]).unwrap();
        adam.step(&mut p, &[3.0]).unwrap();
        // m = 0.9·0.1 + 0.1·3 = 0.39, v = 0.999·0.001 + 0.001·9 = 0.009999; m̂ = 0.39/0.19, v̂ = 0.009999/0.001999
        let m_hat = 0.39 / 0.19;
        let v_hat = 0.009999 / (1.0 - 0.999f64.powi(2));
        let expected = -0.1 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((p[0] as f64 - expected).abs() < 1e-6, "{} vs {expected}", p[0]);
    }

    #[test]
    fn a_diverging_update_changes_nothing_and_bad_state_is_refused() {
        let cfg = TrainConfig { meta_lr: 1e39, ..TrainConfig::default() };
        let mut adam = Adam::new(&cfg, 2);
        let mut p = vec![1.0f32, 2.0];
        let before = adam.clone();
        let e = adam.step(&mut p, &[0.5, 0.0]).unwrap_err();
        assert_eq!(e.index, 0);
        assert_eq!((p, adam.clone()), (vec![1.0, 2.0], before), "nothing changed");
        let mut ok = Adam::new(&TrainConfig::default(), 2);
        assert!(ok.restore(1, vec![0.0, f32::NAN], vec![0.0, 0.0]).is_err());
        assert!(ok.restore(1, vec![0.0, 0.0], vec![0.0, -1.0]).is_err());
        assert!(ok.restore((1 << 31) + 5, vec![0.0; 2], vec![0.0; 2]).is_err(), "would wrap powi's i32");
        assert!(ok.restore(1000, vec![0.0; 2], vec![0.0; 2]).is_ok());
    }

    #[test]
    fn minimises_a_quadratic() {
        let cfg = TrainConfig { meta_lr: 0.05, ..TrainConfig::default() };
        let mut adam = Adam::new(&cfg, 2);
        let mut p = vec![3.0f32, -2.0];
        for _ in 0..2000 {
            let g = vec![2.0 * (p[0] - 1.0), 2.0 * (p[1] + 0.5)];
            adam.step(&mut p, &g).unwrap();
        }
        assert!((p[0] - 1.0).abs() < 1e-2 && (p[1] + 0.5).abs() < 1e-2, "{p:?}");
    }
}
