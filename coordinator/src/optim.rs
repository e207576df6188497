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

    /// The state a checkpoint needs: (step count, first moments, second moments).
    pub fn state(&self) -> (u64, &[f32], &[f32]) {
        (self.t, &self.m, &self.v)
    }

    /// Restores a checkpointed state; the lengths must match the parameter count.
    pub fn restore(&mut self, t: u64, m: Vec<f32>, v: Vec<f32>) -> Result<(), String> {
        if m.len() != self.m.len() || v.len() != self.v.len() {
            return Err(format!("optimizer state has {} values, the model {}", m.len(), self.m.len()));
        }
        (self.t, self.m, self.v) = (t, m, v);
        Ok(())
    }

    /// One update `params -= lr · m̂ / (√v̂ + ε)` with bias-corrected moments (torch.optim.Adam).
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        for i in 0..params.len() {
            let g = grad[i] as f64;
            let m = self.beta1 * self.m[i] as f64 + (1.0 - self.beta1) * g;
            let v = self.beta2 * self.v[i] as f64 + (1.0 - self.beta2) * g * g;
            self.m[i] = m as f32;
            self.v[i] = v as f32;
            let update = self.lr * (m / bc1) / ((v / bc2).sqrt() + self.eps);
            params[i] = (params[i] as f64 - update) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_by_lr_against_the_sign() {
        let cfg = TrainConfig { meta_lr: 0.01, ..TrainConfig::default() };
        let mut adam = Adam::new(&cfg, 3);
        let mut p = vec![1.0f32, 1.0, 1.0];
        adam.step(&mut p, &[0.5, -2.0, 0.0]);
        assert!((p[0] - 0.99).abs() < 1e-6 && (p[1] - 1.01).abs() < 1e-6 && p[2] == 1.0, "{p:?}");
    }

    #[test]
    fn matches_a_hand_computed_second_step() {
        let cfg = TrainConfig { meta_lr: 0.1, ..TrainConfig::default() };
        let mut adam = Adam::new(&cfg, 1);
        let mut p = vec![0.0f32];
        adam.step(&mut p, &[1.0]);
        adam.step(&mut p, &[3.0]);
        // m = 0.9·0.1 + 0.1·3 = 0.39, v = 0.999·0.001 + 0.001·9 = 0.009999; m̂ = 0.39/0.19, v̂ = 0.009999/0.001999
        let m_hat = 0.39 / 0.19;
        let v_hat = 0.009999 / (1.0 - 0.999f64.powi(2));
        let expected = -0.1 - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        assert!((p[0] as f64 - expected).abs() < 1e-6, "{} vs {expected}", p[0]);
    }

    #[test]
    fn minimises_a_quadratic() {
        let cfg = TrainConfig { meta_lr: 0.05, ..TrainConfig::default() };
        let mut adam = Adam::new(&cfg, 2);
        let mut p = vec![3.0f32, -2.0];
        for _ in 0..2000 {
            let g = vec![2.0 * (p[0] - 1.0), 2.0 * (p[1] + 0.5)];
            adam.step(&mut p, &g);
        }
        assert!((p[0] - 1.0).abs() < 1e-2 && (p[1] + 0.5).abs() < 1e-2, "{p:?}");
    }
}
