//! Checking task results and reducing them, deterministically.
//!
//! [`validate`] refuses anything malformed before it touches shared state: non-finite losses, a gradient
//! of the wrong length or with NaN/Inf, a gradient where none belongs or none where one must be.
//! [`BatchCollector`] then reduces accepted results **in task-index order** (a result that arrives early
//! waits until every lower index is in), so the sum — and hence the parameters — is bitwise the same
//! whatever the arrival order, the number of workers or reassignments. Sums are taken in f64. With a
//! `[defence]` that needs every gradient at once (outlier quarantine, trimmed mean, median) the collector
//! holds the batch's gradients and hands them, in index order, to [`crate::defence`] at the end.
//!
//! Memory: a waiting (or held) gradient stays in memory while the waiting ones fit
//! `cluster.reorder_memory_mb`, and goes to a [`SpillStore`] (an unlinked file) beyond that; it is read
//! back a chunk at a time when its turn comes ([`crate::spill`]). The additions happen in the same order
//! either way, so spilling never changes a bit of the result. The collector does no I/O itself.

use std::collections::BTreeMap;

use metatrain_common::config::DefenceConfig;
use metatrain_common::protocol::{Mode, TaskResult};
use metatrain_common::tensor::{decode_f32, Dtype, TensorError};
use thiserror::Error;

use crate::defence::{self, Score, TaskStats, Window};
use crate::spill::{MemorySpill, SpillError, SpillStore, Ticket, SPILL_CHUNK};

/// A validated task result.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskOutcome {
    pub pre_loss: f64,
    pub post_loss: f64,
    pub pre_accuracy: Option<f64>,
    pub post_accuracy: Option<f64>,
    /// The task's difficulty in [0, 1], as the worker materialised it.
    pub difficulty: f64,
    /// The meta-gradient (train mode).
    pub grad: Option<Vec<f32>>,
}

#[derive(Debug, Error, PartialEq)]
pub enum Rejection {
    #[error("non-finite loss")]
    NonFiniteLoss,
    #[error("accuracy outside [0, 1]")]
    BadAccuracy,
    #[error("compute time not a finite number of seconds in [0, 1e7]")]
    BadTiming,
    #[error("task difficulty outside [0, 1]")]
    BadDifficulty,
    #[error("bad gradient: {0}")]
    Gradient(#[from] TensorError),
    #[error("a training result without a gradient")]
    MissingGradient,
    #[error("an evaluation result with a gradient")]
    UnexpectedGradient,
    #[error("a result claiming another parameter version or mode than its task was assigned in")]
    WrongVersionOrMode,
    #[error("a gradient sent as {got:?} where cluster.grad_dtype is {want:?}")]
    WrongDtype { got: Dtype, want: Dtype },
}

impl Rejection {
    /// Bounded label for `metatrain_results_rejected_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::NonFiniteLoss => "non_finite_loss",
            Rejection::BadAccuracy => "bad_accuracy",
            Rejection::BadTiming => "bad_timing",
            Rejection::BadDifficulty => "bad_difficulty",
            Rejection::Gradient(TensorError::NonFinite { .. }) => "non_finite_gradient",
            Rejection::Gradient(_) => "wrong_shape",
            Rejection::MissingGradient => "missing_gradient",
            Rejection::UnexpectedGradient => "unexpected_gradient",
            Rejection::WrongVersionOrMode => "wrong_version_or_mode",
            Rejection::WrongDtype { .. } => "wrong_dtype",
        }
    }

    /// Whether the result says the *task* cannot be computed (non-finite numbers: diverged training)
    /// rather than that the worker breaks the protocol.
    pub fn is_task_failure(&self) -> bool {
        matches!(self, Rejection::NonFiniteLoss | Rejection::Gradient(TensorError::NonFinite { .. }))
    }
}

/// Checks a result header and its payload bytes against what its mode and the layout (`numel`) require.
/// (That the mode is the one the task was assigned in is checked against the scheduler's record.)
pub fn validate(result: &TaskResult, payload: &[u8], numel: usize) -> Result<TaskOutcome, Rejection> {
    let gradient = (!payload.is_empty()).then(|| decode_f32(payload, result.grad_dtype, numel));
    validate_decoded(result, gradient)
}

/// Checks that a result's gradient travels as the run's `cluster.grad_dtype` (`want`): a worker is told
/// the dtype in `Welcome`, so another one is a broken or hostile worker, and a lower precision than the
/// run asked for must not slip into the mean.
pub fn check_wire_dtype(result: &TaskResult, want: Dtype) -> Result<(), Rejection> {
    if result.grad_len > 0 && result.grad_dtype != want {
        return Err(Rejection::WrongDtype { got: result.grad_dtype, want });
    }
    Ok(())
}

/// [`validate`] for a gradient already decoded as it arrived (`None`: the result carried no payload).
pub fn validate_decoded(
    result: &TaskResult,
    gradient: Option<Result<Vec<f32>, TensorError>>,
) -> Result<TaskOutcome, Rejection> {
    let mode = result.mode;
    if !(result.pre_loss.is_finite() && result.post_loss.is_finite()) {
        return Err(Rejection::NonFiniteLoss);
    }
    let acc_ok = |a: Option<f32>| a.is_none_or(|v| (0.0..=1.0).contains(&v));
    if !(acc_ok(result.pre_accuracy) && acc_ok(result.post_accuracy)) {
        return Err(Rejection::BadAccuracy);
    }
    // It feeds a histogram: a NaN would poison its sum for the rest of the run.
    if !(0.0..=1e7).contains(&result.compute_seconds) {
        return Err(Rejection::BadTiming);
    }
    if !(0.0..=1.0).contains(&result.difficulty) {
        return Err(Rejection::BadDifficulty);
    }
    let grad = match (mode, gradient) {
        (Mode::Train, None) => return Err(Rejection::MissingGradient),
        (Mode::Train, Some(g)) => Some(g?),
        (Mode::Eval, Some(_)) => return Err(Rejection::UnexpectedGradient),
        (Mode::Eval, None) => None,
    };
    Ok(TaskOutcome {
        pre_loss: result.pre_loss as f64,
        post_loss: result.post_loss as f64,
        pre_accuracy: result.pre_accuracy.map(f64::from),
        post_accuracy: result.post_accuracy.map(f64::from),
        difficulty: result.difficulty as f64,
        grad,
    })
}

/// Mean and 95 % confidence half-width (1.96 · sample std / √n) of a list.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct MeanCi {
    pub mean: f64,
    pub ci95: f64,
}

pub fn mean_ci(xs: &[f64]) -> MeanCi {
    let n = xs.len() as f64;
    if xs.is_empty() {
        return MeanCi { mean: f64::NAN, ci95: f64::NAN };
    }
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return MeanCi { mean, ci95: 0.0 };
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    MeanCi { mean, ci95: 1.96 * (var / n).sqrt() }
}

/// Two-sided 95 % quantiles of Student's t for 1..=30 degrees of freedom.
const T95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120,
    2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
];

/// Mean and 95 % CI half-width from Student's t with n − 1 degrees of freedom: for a handful of samples
/// (replicate runs over seeds), where the normal 1.96 of [`mean_ci`] would understate the spread. Beyond
/// 31 samples t is within 2 % of the normal quantile, which is used.
pub fn mean_ci_t(xs: &[f64]) -> MeanCi {
    let m = mean_ci(xs);
    let df = xs.len().saturating_sub(1);
    let t = if df == 0 { 0.0 } else { T95.get(df - 1).copied().unwrap_or(1.96) };
    MeanCi { mean: m.mean, ci95: m.ci95 / 1.96 * t }
}

/// Summary of a completed batch.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchSummary {
    pub pre_loss: MeanCi,
    pub post_loss: MeanCi,
    pub pre_accuracy: Option<MeanCi>,
    pub post_accuracy: Option<MeanCi>,
    /// Train mode: the mean (or robust reduction) of the meta-gradients after global-norm clipping;
    /// `None` also when the defence quarantined every task of the step (no update is applied).
    pub mean_grad: Option<Vec<f32>>,
    /// Its L2 norm before clipping.
    pub grad_norm: f64,
    /// Whether clipping rescaled it.
    pub clipped: bool,
    pub tasks: usize,
    /// Post-adaptation loss and difficulty of each task, in index order.
    pub task_post_loss: Vec<f64>,
    pub task_difficulty: Vec<f64>,
    /// The defence's verdict on each task, in index order (empty when nothing was scored).
    pub scores: Vec<Score>,
}

impl BatchSummary {
    /// Tasks the defence quarantined.
    pub fn quarantined(&self) -> usize {
        self.scores.iter().filter(|s| s.quarantined.is_some()).count()
    }
}

/// A gradient waiting in the collector: in memory, or in the spill store.
enum Stored {
    Memory(Vec<f32>),
    Spilled(Ticket),
}

/// A result waiting for its turn: its figures, and its gradient (train mode).
struct Entry {
    outcome: TaskOutcome,
    grad: Option<Stored>,
    /// The gradient's L2 norm, when the defence needs it (taken before it may be spilled).
    norm: f64,
}

/// How much of a batch's waiting gradients may stay in memory, and where the rest go.
pub struct Reorder {
    /// Bytes of gradients the collector may hold in memory (out-of-order results, and with a defence
    /// every gradient of the step); beyond this they go to `store`.
    pub memory_bytes: u64,
    pub store: Box<dyn SpillStore>,
}

impl Reorder {
    /// Everything in memory, nothing spilled.
    pub fn in_memory() -> Reorder {
        Reorder { memory_bytes: u64::MAX, store: Box::new(MemorySpill::default()) }
    }
}

/// Collects one batch's results and reduces gradients in index order as the prefix fills.
///
/// A result that arrives ahead of its turn waits; while the waiting gradients fit in
/// [`Reorder::memory_bytes`] they wait in memory, and beyond that in the [`SpillStore`], from which they
/// are added into the sum a chunk at a time. The order of the additions, hence the sum, is the same
/// either way. Should the store refuse a gradient (a full disk), the gradient stays in memory and
/// [`BatchCollector::take_spill_failure`] says why: memory is spent rather than a result lost.
pub struct BatchCollector {
    n: usize,
    next: usize,
    waiting: BTreeMap<usize, Entry>,
    grad_sum: Option<Vec<f64>>,
    /// Every gradient, in index order, when the defence needs them all (then `grad_sum` is unused).
    held: Option<Vec<Stored>>,
    reorder: Reorder,
    /// Bytes of gradients held in memory now.
    memory_bytes: u64,
    /// Gradients handed to the store in this batch.
    spilled: usize,
    spill_failure: Option<SpillError>,
    norms: Vec<f64>,
    difficulty: Vec<f64>,
    pre: Vec<f64>,
    post: Vec<f64>,
    pre_acc: Vec<f64>,
    post_acc: Vec<f64>,
}

impl BatchCollector {
    /// A batch of `n` tasks; `numel` > 0 for training batches (gradients are summed, or held when `hold`).
    pub fn new(n: usize, numel: Option<usize>, hold: bool, reorder: Reorder) -> Self {
        let hold = hold && numel.is_some();
        BatchCollector {
            n,
            next: 0,
            waiting: BTreeMap::new(),
            grad_sum: if hold { None } else { numel.map(|k| vec![0.0; k]) },
            held: hold.then(|| Vec::with_capacity(n)),
            reorder,
            memory_bytes: 0,
            spilled: 0,
            spill_failure: None,
            norms: Vec::new(),
            difficulty: Vec::with_capacity(n),
            pre: Vec::with_capacity(n),
            post: Vec::with_capacity(n),
            pre_acc: Vec::new(),
            post_acc: Vec::new(),
        }
    }

    /// Adds the result of task `index` (each index once; the scheduler guarantees it). Fails only when a
    /// spilled gradient cannot be read back.
    pub fn insert(&mut self, index: usize, mut outcome: TaskOutcome) -> Result<(), SpillError> {
        if index < self.next || index >= self.n {
            return Ok(());
        }
        let grad = outcome.grad.take();
        let norm = match (&grad, &self.held) {
            (Some(g), Some(_)) => g.iter().map(|&v| v as f64 * v as f64).sum::<f64>().sqrt(),
            _ => 0.0,
        };
        // The next in order is added to the sum at once, whatever the budget; anything else may wait long.
        let now = index == self.next && self.held.is_none();
        let grad = grad.map(|g| if now { self.keep(g) } else { self.park(g) });
        self.waiting.insert(index, Entry { outcome, grad, norm });
        while let Some(e) = self.waiting.remove(&self.next) {
            self.reduce(e)?;
            self.next += 1;
        }
        Ok(())
    }

    fn keep(&mut self, g: Vec<f32>) -> Stored {
        self.memory_bytes += g.len() as u64 * 4;
        Stored::Memory(g)
    }

    /// Keeps a waiting gradient in memory while it fits the budget, and spills it otherwise.
    fn park(&mut self, g: Vec<f32>) -> Stored {
        let bytes = g.len() as u64 * 4;
        if self.memory_bytes.saturating_add(bytes) <= self.reorder.memory_bytes {
            return self.keep(g);
        }
        match self.reorder.store.put(&g) {
            Ok(ticket) => {
                self.spilled += 1;
                Stored::Spilled(ticket)
            }
            Err(e) => {
                self.spill_failure.get_or_insert(e);
                self.keep(g)
            }
        }
    }

    fn reduce(&mut self, e: Entry) -> Result<(), SpillError> {
        let o = e.outcome;
        self.pre.push(o.pre_loss);
        self.post.push(o.post_loss);
        self.pre_acc.extend(o.pre_accuracy);
        self.post_acc.extend(o.post_accuracy);
        self.difficulty.push(o.difficulty);
        let Some(grad) = e.grad else { return Ok(()) };
        if let Some(held) = self.held.as_mut() {
            self.norms.push(e.norm);
            held.push(grad);
            return Ok(());
        }
        let Some(sum) = self.grad_sum.as_mut() else { return Ok(()) };
        match grad {
            Stored::Memory(g) => {
                self.memory_bytes -= g.len() as u64 * 4;
                add_into(sum, &g);
            }
            Stored::Spilled(ticket) => {
                let mut buf = vec![0.0f32; SPILL_CHUNK.min(ticket.len())];
                for start in (0..ticket.len()).step_by(SPILL_CHUNK) {
                    let n = SPILL_CHUNK.min(ticket.len() - start);
                    self.reorder.store.read(ticket, start, &mut buf[..n])?;
                    add_into(&mut sum[start..start + n], &buf[..n]);
                }
            }
        }
        Ok(())
    }

    pub fn is_complete(&self) -> bool {
        self.next == self.n
    }

    /// Gradients this batch handed to the spill store so far.
    pub fn spilled(&self) -> usize {
        self.spilled
    }

    /// Why the store refused a gradient (kept in memory instead), once.
    pub fn take_spill_failure(&mut self) -> Option<SpillError> {
        self.spill_failure.take()
    }

    /// Means, CIs, and (train mode) the reduced gradient clipped to `max_grad_norm`. A collector that
    /// holds its gradients scores them against `window` and reduces them as `defence` says. Fails only
    /// when a spilled gradient cannot be read back.
    pub fn finish(
        mut self,
        max_grad_norm: f64,
        defence: Option<(&DefenceConfig, &mut Window)>,
    ) -> Result<BatchSummary, SpillError> {
        let n = self.next.max(1) as f64;
        let (mut mean_grad, mut grad_norm, mut clipped) = (None, 0.0, false);
        let mut scores = Vec::new();
        let held = self.held.take();
        let reduced: Option<Vec<f64>> = match (self.grad_sum.take(), held, defence) {
            // In place: at 100M parameters another f64 vector would be 800 MB.
            (Some(mut sum), _, _) => {
                sum.iter_mut().for_each(|s| *s /= n);
                Some(sum)
            }
            (None, Some(held), Some((cfg, window))) => {
                let batch: Vec<TaskStats> = (self.pre.iter().zip(&self.post).zip(&self.norms))
                    .map(|((&pre_loss, &post_loss), &grad_norm)| TaskStats { pre_loss, post_loss, grad_norm })
                    .collect();
                scores = window.score_batch(&batch, cfg);
                let weights: Vec<f64> = scores.iter().map(|s| s.weight).collect();
                reduce_held(&held, self.reorder.store.as_mut(), &weights, cfg.aggregate, cfg.trim)?
            }
            (None, Some(held), None) => {
                let ones = vec![1.0; held.len()];
                reduce_held(
                    &held,
                    self.reorder.store.as_mut(),
                    &ones,
                    metatrain_common::config::Aggregation::Mean,
                    0.0,
                )?
            }
            (None, None, _) => None,
        };
        if let Some(mean) = reduced {
            grad_norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
            let scale = if grad_norm > max_grad_norm {
                clipped = true;
                max_grad_norm / grad_norm
            } else {
                1.0
            };
            mean_grad = Some(mean.iter().map(|v| (v * scale) as f32).collect());
        }
        let acc = |v: &[f64]| if v.is_empty() { None } else { Some(mean_ci(v)) };
        Ok(BatchSummary {
            pre_loss: mean_ci(&self.pre),
            post_loss: mean_ci(&self.post),
            pre_accuracy: acc(&self.pre_acc),
            post_accuracy: acc(&self.post_acc),
            mean_grad,
            grad_norm,
            clipped,
            tasks: self.next,
            task_post_loss: self.post,
            task_difficulty: self.difficulty,
            scores,
        })
    }
}

fn add_into(sum: &mut [f64], g: &[f32]) {
    for (s, v) in sum.iter_mut().zip(g) {
        *s += *v as f64;
    }
}

/// [`defence::reduce`] over held gradients, some of them spilled: element-wise, so it is taken over
/// ranges of [`SPILL_CHUNK`] elements (all in memory: one range), reading only that range of each
/// spilled gradient. The result is the same as over whole vectors.
fn reduce_held(
    held: &[Stored],
    store: &mut dyn SpillStore,
    weights: &[f64],
    how: metatrain_common::config::Aggregation,
    trim: f64,
) -> Result<Option<Vec<f64>>, SpillError> {
    let len = |s: &Stored| match s {
        Stored::Memory(g) => g.len(),
        Stored::Spilled(t) => t.len(),
    };
    let Some(numel) = held.first().map(len) else { return Ok(None) };
    let any_spilled = held.iter().any(|s| matches!(s, Stored::Spilled(_)));
    let step = if any_spilled { SPILL_CHUNK } else { numel.max(1) };
    let mut out = Vec::with_capacity(numel);
    let mut bufs: Vec<Vec<f32>> = held.iter().map(|_| Vec::new()).collect();
    let mut start = 0;
    loop {
        let end = (start + step).min(numel);
        for (s, buf) in held.iter().zip(bufs.iter_mut()) {
            if let Stored::Spilled(t) = s {
                buf.resize(end - start, 0.0);
                store.read(*t, start, buf)?;
            }
        }
        let slices: Vec<&[f32]> = held
            .iter()
            .zip(&bufs)
            .map(|(s, buf)| match s {
                Stored::Memory(g) => &g[start..end],
                Stored::Spilled(_) => buf.as_slice(),
            })
            .collect();
        let Some(part) = defence::reduce(&slices, weights, how, trim) else { return Ok(None) };
        out.extend(part);
        start = end;
        if start >= numel {
            return Ok(Some(out));
        }
    }
}

#[cfg(test)]
#[path = "aggregate_tests.rs"]
mod tests;
