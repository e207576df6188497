//! Defences against dirty tasks (`[defence]`): per-task outlier scoring over a sliding window, quarantine
//! (skip or down-weight), and robust reductions beside the mean. I/O-free and deterministic: everything
//! here is a function of the results in task-index order and of the window, which checkpoints carry.
//!
//! **Scoring.** For every training task three statistics are kept, each as a log (all are positive and
//! right-skewed: a task ten times harder than usual is unusual, one ten times easier is not): its
//! pre-adaptation query loss (the scale of its data: targets in other units or wild outliers show here
//! first, and it does not depend on how well the inner loop behaves, so it works from the first step,
//! when an untrained model's adapted losses still vary by orders of magnitude between clean tasks), its
//! post-adaptation query loss (a task the inner loop cannot fit) and its meta-gradient's L2 norm. A
//! task's robust z-score for each is `0.6745·(x − median)/MAD` (Iglewicz and Hoaglin's modified
//! z-score; 0.6745 makes it comparable with a normal z), with median and MAD taken over the window's
//! last `window` tasks *and* the current meta-batch, so the very first step is scored too. Only high
//! values are suspect. When the MAD is 0 the mean absolute deviation (×1.2533) stands in; when that is 0
//! too nothing is an outlier. A task whose largest z exceeds `threshold` is quarantined (the reason is
//! the statistic with the largest z): left out (`skip`) or weighted by `threshold / z` (`down-weight`).
//! Every task of the batch then enters the window, quarantined or not, so that the window keeps
//! describing the task distribution (leaving outliers out would shrink it and quarantine ever more).
//!
//! **Reduction.** `mean`: Σ wᵢ gᵢ / Σ wᵢ, summed in index order in f64 (with every weight 1 this is
//! bit for bit the plain mean of [`crate::aggregate`]). `trimmed-mean`: per coordinate, drop the ⌊trim·n⌋
//! smallest and largest values and average the rest. `median`: per coordinate, the middle value (mean of
//! the middle two for even n). Quarantined tasks (weight 0) take no part in any of them.

use std::collections::VecDeque;

use metatrain_common::config::{Aggregation, DefenceConfig, QuarantineMode};
use serde::{Deserialize, Serialize};

/// Scales a MAD to a normal distribution's standard deviation's units (Φ⁻¹(0.75)).
const MAD_TO_Z: f64 = 0.6745;
/// Scales a mean absolute deviation likewise (√(π/2)), the fallback when the MAD is 0.
const MEAN_AD_TO_SD: f64 = 1.253_314;
/// Floor under logged losses and norms (a loss of exactly 0 is possible; its log is not).
const LOG_FLOOR: f64 = 1e-30;

/// Why a task was quarantined (a bounded metrics label): the statistic with the largest z.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// Its pre-adaptation loss (the scale of its data) is an outlier.
    PreLoss,
    /// Its post-adaptation loss is an outlier.
    Loss,
    /// Its meta-gradient's norm is an outlier.
    GradNorm,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::PreLoss => "pre_loss",
            Reason::Loss => "loss",
            Reason::GradNorm => "grad_norm",
        }
    }
    pub const ALL: [Reason; 3] = [Reason::PreLoss, Reason::Loss, Reason::GradNorm];
}

/// What the defence sees of one task.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TaskStats {
    pub pre_loss: f64,
    pub post_loss: f64,
    pub grad_norm: f64,
}

/// One task's verdict.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Score {
    pub z_pre: f64,
    pub z_loss: f64,
    pub z_norm: f64,
    /// Weight in the reduction: 1 for ordinary tasks, 0 for skipped ones, in (0, 1) when down-weighted.
    pub weight: f64,
    pub quarantined: Option<Reason>,
}

/// The most recent training tasks' log pre-loss, log post-loss and log gradient norm, oldest first.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Window {
    log_pre: VecDeque<f64>,
    log_loss: VecDeque<f64>,
    log_norm: VecDeque<f64>,
}

/// A window as checkpoints store it: the f64 values' bits, so that a resumed run continues exactly.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowState {
    pub log_pre_bits: Vec<u64>,
    pub log_loss_bits: Vec<u64>,
    pub log_norm_bits: Vec<u64>,
}

impl Window {
    pub fn len(&self) -> usize {
        self.log_loss.len()
    }

    pub fn is_empty(&self) -> bool {
        self.log_loss.is_empty()
    }

    pub fn state(&self) -> WindowState {
        let bits = |q: &VecDeque<f64>| q.iter().map(|v| v.to_bits()).collect();
        WindowState {
            log_pre_bits: bits(&self.log_pre),
            log_loss_bits: bits(&self.log_loss),
            log_norm_bits: bits(&self.log_norm),
        }
    }

    /// Restores a saved window; refuses one whose series differ in length or hold non-finite values.
    pub fn restore(s: &WindowState) -> Result<Window, String> {
        let decode = |bits: &[u64]| -> Result<VecDeque<f64>, String> {
            bits.iter()
                .map(|&b| {
                    let v = f64::from_bits(b);
                    v.is_finite().then_some(v).ok_or_else(|| "the defence window holds a non-finite value".to_string())
                })
                .collect()
        };
        if s.log_loss_bits.len() != s.log_norm_bits.len() || s.log_pre_bits.len() != s.log_loss_bits.len() {
            return Err("the defence window's series differ in length".into());
        }
        Ok(Window {
            log_pre: decode(&s.log_pre_bits)?,
            log_loss: decode(&s.log_loss_bits)?,
            log_norm: decode(&s.log_norm_bits)?,
        })
    }

    /// Scores a batch (one [`TaskStats`] per task, in index order), then adds it to the window, which
    /// keeps the last `cfg.window` tasks.
    pub fn score_batch(&mut self, batch: &[TaskStats], cfg: &DefenceConfig) -> Vec<Score> {
        let log = |v: f64| v.max(LOG_FLOOR).ln();
        let logs: Vec<[f64; 3]> = batch.iter().map(|t| [log(t.pre_loss), log(t.post_loss), log(t.grad_norm)]).collect();
        let series = [&self.log_pre, &self.log_loss, &self.log_norm];
        let spreads: Vec<Spread> =
            (0..3).map(|k| Spread::of(series[k].iter().copied().chain(logs.iter().map(|l| l[k])).collect())).collect();
        let scores = logs
            .iter()
            .map(|l| {
                let z = [spreads[0].z(l[0]), spreads[1].z(l[1]), spreads[2].z(l[2])];
                let (worst, z_max) =
                    (0..3).map(|k| (k, z[k])).fold((0, f64::NEG_INFINITY), |a, b| if b.1 > a.1 { b } else { a });
                let quarantined =
                    (cfg.quarantine != QuarantineMode::Off && z_max > cfg.threshold).then_some(Reason::ALL[worst]);
                let weight = match (quarantined, cfg.quarantine) {
                    (None, _) => 1.0,
                    (Some(_), QuarantineMode::DownWeight) => cfg.threshold / z_max,
                    (Some(_), _) => 0.0,
                };
                Score { z_pre: z[0], z_loss: z[1], z_norm: z[2], weight, quarantined }
            })
            .collect();
        for l in logs {
            self.log_pre.push_back(l[0]);
            self.log_loss.push_back(l[1]);
            self.log_norm.push_back(l[2]);
        }
        while self.log_loss.len() > cfg.window {
            self.log_pre.pop_front();
            self.log_loss.pop_front();
            self.log_norm.pop_front();
        }
        scores
    }
}

/// Median and robust scale of a sample.
struct Spread {
    median: f64,
    /// Denominator of the z-score (0: no spread, nothing is an outlier).
    scale: f64,
}

impl Spread {
    fn of(mut xs: Vec<f64>) -> Spread {
        if xs.is_empty() {
            return Spread { median: 0.0, scale: 0.0 };
        }
        let median = median_in_place(&mut xs);
        let mut dev: Vec<f64> = xs.iter().map(|x| (x - median).abs()).collect();
        let mad = median_in_place(&mut dev);
        let scale = if mad > 0.0 { mad / MAD_TO_Z } else { MEAN_AD_TO_SD * dev.iter().sum::<f64>() / dev.len() as f64 };
        Spread { median, scale }
    }

    fn z(&self, x: f64) -> f64 {
        if self.scale > 0.0 {
            (x - self.median) / self.scale
        } else {
            0.0
        }
    }
}

/// The median of `xs` (sorted in place by total order; the mean of the middle two for even lengths).
fn median_in_place(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

/// Reduces gradients (index order) with weights to one, in f64. `None` when every weight is 0.
pub fn reduce(grads: &[&[f32]], weights: &[f64], how: Aggregation, trim: f64) -> Option<Vec<f64>> {
    let kept: Vec<(&[f32], f64)> = grads.iter().zip(weights).filter(|(_, &w)| w > 0.0).map(|(g, &w)| (*g, w)).collect();
    let numel = kept.first()?.0.len();
    match how {
        Aggregation::Mean => {
            let mut sum = vec![0.0f64; numel];
            let mut total = 0.0;
            for (g, w) in &kept {
                total += w;
                for (s, v) in sum.iter_mut().zip(g.iter()) {
                    *s += w * *v as f64;
                }
            }
            Some(sum.into_iter().map(|s| s / total).collect())
        }
        Aggregation::TrimmedMean | Aggregation::Median => {
            let n = kept.len();
            let drop = if how == Aggregation::TrimmedMean { (trim * n as f64).floor() as usize } else { 0 };
            let mut column = vec![0.0f64; n];
            Some(
                (0..numel)
                    .map(|j| {
                        for (c, (g, _)) in column.iter_mut().zip(&kept) {
                            *c = g[j] as f64;
                        }
                        if how == Aggregation::Median {
                            return median_in_place(&mut column);
                        }
                        column.sort_by(f64::total_cmp);
                        let middle = &column[drop..n - drop];
                        middle.iter().sum::<f64>() / middle.len() as f64
                    })
                    .collect(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mode: QuarantineMode) -> DefenceConfig {
        DefenceConfig { quarantine: mode, window: 100, ..DefenceConfig::default() }
    }

    fn stats(pre_loss: f64, post_loss: f64, grad_norm: f64) -> TaskStats {
        TaskStats { pre_loss, post_loss, grad_norm }
    }

    #[test]
    fn the_modified_z_score_matches_its_definition() {
        // log-values 0, 1, 2, 3, 10: median 2, |dev| 2,1,0,1,8 → MAD 1.
        let batch: Vec<TaskStats> = [0.0f64, 1.0, 2.0, 3.0, 10.0].iter().map(|&v| stats(2.0, v.exp(), 1.0)).collect();
        let mut w = Window::default();
        let s = w.score_batch(&batch, &cfg(QuarantineMode::Skip));
        for (k, want) in [0.0, 1.0, 2.0, 3.0, 10.0].iter().enumerate() {
            assert!((s[k].z_loss - 0.6745 * (want - 2.0)).abs() < 1e-9, "task {k}: {}", s[k].z_loss);
            // All norms and pre-losses equal: no spread, no outlier.
            assert_eq!((s[k].z_norm, s[k].z_pre), (0.0, 0.0));
        }
        assert_eq!(s.iter().filter(|s| s.quarantined.is_some()).count(), 1);
        assert_eq!(s[4].quarantined, Some(Reason::Loss));
        assert_eq!(s[4].weight, 0.0);
        assert_eq!(w.len(), 5);
    }

    #[test]
    fn scoring_uses_the_window_and_keeps_only_its_length() {
        let c = cfg(QuarantineMode::DownWeight);
        let mut w = Window::default();
        // A history of ordinary tasks: pre-losses around 3, losses around 1, norms around 2 (log ±0.2).
        for step in 0..10 {
            let batch: Vec<TaskStats> = (0..25)
                .map(|i| {
                    let wobble = (0.1 * ((i + step) % 5) as f64 - 0.2).exp();
                    stats(3.0 * wobble, wobble, 2.0 * wobble)
                })
                .collect();
            assert!(w.score_batch(&batch, &c).iter().all(|s| s.quarantined.is_none()));
        }
        assert_eq!(w.len(), 100);
        // One huge-scale task: pre-loss ×10⁴, adapted loss ×3000, gradient ×100. Alone in its batch it is found.
        let s = w.score_batch(&[stats(3e4, 3e3, 200.0), stats(3.0, 1.0, 2.0)], &c);
        assert_eq!(s[0].quarantined, Some(Reason::PreLoss));
        assert!(s[0].weight > 0.0 && s[0].weight < 0.1, "down-weighted by threshold / z: {}", s[0].weight);
        assert_eq!(s[1], Score { weight: 1.0, quarantined: None, ..s[1] });
        // A task whose data look ordinary but that adaptation cannot fit.
        let s = w.score_batch(&[stats(3.0, 50.0, 2.0)], &c);
        assert_eq!(s[0].quarantined, Some(Reason::Loss));
        // A task whose losses are ordinary but whose gradient is not.
        let s = w.score_batch(&[stats(3.0, 1.0, 5000.0)], &c);
        assert_eq!(s[0].quarantined, Some(Reason::GradNorm));
        // Off scores but never quarantines.
        let s = w.clone().score_batch(&[stats(1e9, 1e9, 1e9)], &cfg(QuarantineMode::Off));
        assert!(s[0].z_loss > 3.5 && s[0].quarantined.is_none() && s[0].weight == 1.0);
        // Save and restore are exact.
        let back = Window::restore(&w.state()).unwrap();
        assert_eq!(back, w);
        let state = |pre: Vec<u64>, loss: Vec<u64>, norm: Vec<u64>| WindowState {
            log_pre_bits: pre,
            log_loss_bits: loss,
            log_norm_bits: norm,
        };
        assert!(Window::restore(&state(vec![0], vec![f64::NAN.to_bits()], vec![0])).is_err());
        assert!(Window::restore(&state(vec![0], vec![0], vec![])).is_err());
        assert!(Window::restore(&state(vec![], vec![0], vec![0])).is_err());
    }

    #[test]
    fn robust_reductions_resist_an_outlier_and_the_weighted_mean_is_the_plain_one() {
        let g: Vec<Vec<f32>> =
            vec![vec![1.0, -2.0], vec![2.0, -1.0], vec![3.0, 0.0], vec![4.0, 1.0], vec![1000.0, -1000.0]];
        let refs: Vec<&[f32]> = g.iter().map(|v| v.as_slice()).collect();
        let ones = vec![1.0; 5];
        let mean = reduce(&refs, &ones, Aggregation::Mean, 0.0).unwrap();
        assert_eq!(mean, vec![1010.0 / 5.0, -1002.0 / 5.0]);
        assert_eq!(reduce(&refs, &ones, Aggregation::Median, 0.0).unwrap(), vec![3.0, -1.0]);
        // trim 0.2 of 5 drops one at each end: column 0 keeps 2, 3, 4.
        assert_eq!(reduce(&refs, &ones, Aggregation::TrimmedMean, 0.2).unwrap(), vec![3.0, -1.0]);
        assert_eq!(reduce(&refs[..4], &ones[..4], Aggregation::Median, 0.0).unwrap(), vec![2.5, -0.5]);
        // Skipping the outlier; down-weighting it.
        let skip = [1.0, 1.0, 1.0, 1.0, 0.0];
        assert_eq!(reduce(&refs, &skip, Aggregation::Mean, 0.0).unwrap(), vec![2.5, -0.5]);
        assert_eq!(reduce(&refs, &skip, Aggregation::Median, 0.0).unwrap(), vec![2.5, -0.5]);
        let half = [1.0, 1.0, 1.0, 1.0, 0.5];
        let m = reduce(&refs, &half, Aggregation::Mean, 0.0).unwrap();
        assert!((m[0] - (10.0 + 500.0) / 4.5).abs() < 1e-12);
        assert_eq!(reduce(&refs, &[0.0; 5], Aggregation::Mean, 0.0), None);
    }
}
