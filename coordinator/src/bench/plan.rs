//! What a benchmark run measures, before anything runs: parameter-count sizes, the synthetic layout,
//! parameters and gradient of each size, the (layout, workers) cases, and why a case is skipped (its
//! estimated memory, or its wire volume per meta-step). No I/O.

use std::fmt;
use std::str::FromStr;

use metatrain_common::layout::{ParamLayout, ParamSpec};

/// Scalars per tensor of a synthetic layout: about the size of a large dense layer, so that a 100M
/// layout has ~100 tensors as a real model of that size would.
const TENSOR_NUMEL: usize = 1 << 20;

/// Largest layout accepted (1e9 f32 = 4 GB per copy; the coordinator keeps about ten copies).
pub const MAX_NUMEL: usize = 1_000_000_000;

/// Bytes per parameter on the wire and in memory (f32).
pub const BYTES_PER_PARAM: u64 = 4;

/// Copies of the parameter vector (in f32 units) the coordinator holds whatever the worker count:
/// parameters (1), Adam's two moments (2), the encoded parameter payload (1), the f64 gradient sum (2,
/// divided into the mean in place) and the clipped f32 mean (1); plus the benchmark's own shared
/// gradient (1). (The baseline's two copies are freed before the case starts.)
const FIXED_COPIES: f64 = 8.0;
/// Copies per gradient the coordinator holds while it is received: its decoded values (1), with room
/// for allocator slack.
const COPIES_PER_RECEIVED: f64 = 1.25;
/// QUIC buffers per connection, both sides: the coordinator's send buffer for parameters, its receive
/// buffer for gradients and the simulated worker's receive buffer, each bounded by the 32 MiB
/// connection window (see `metatrain_common::net`), or by the message when it is smaller.
const QUIC_BUFFERS_PER_WORKER: u64 = 3;
const CONNECTION_WINDOW: u64 = 32 << 20;
/// Per-connection state besides buffers (QUIC connection, TLS session, tasks, channels): a generous round figure.
const PER_WORKER_OVERHEAD: u64 = 512 << 10;

/// A parameter count, written `10k`, `1m`, `100m` or as a plain number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub usize);

impl FromStr for Size {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        let (digits, scale) = match t.as_bytes().last() {
            Some(b'k') => (&t[..t.len() - 1], 1_000),
            Some(b'm') => (&t[..t.len() - 1], 1_000_000),
            Some(b'g') => (&t[..t.len() - 1], 1_000_000_000),
            _ => (t.as_str(), 1),
        };
        let n: usize =
            digits.parse().map_err(|_| format!("{s:?} is not a parameter count (e.g. 10k, 1m, 100m, 250000)"))?;
        let numel = n.checked_mul(scale).filter(|&v| (1..=MAX_NUMEL).contains(&v));
        numel.map(Size).ok_or_else(|| format!("{s:?}: a layout must have 1..={MAX_NUMEL} parameters"))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        for (unit, suffix) in [(1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")] {
            // A whole number of units (without `is_multiple_of`, newer than the workspace's rust-version).
            if n >= unit && n / unit * unit == n {
                return write!(f, "{}{suffix}", n / unit);
            }
        }
        write!(f, "{n}")
    }
}

/// A layout of `numel` scalars in 1-D tensors of at most [`TENSOR_NUMEL`] (`block{i}.weight`).
pub fn synthetic_layout(numel: usize) -> ParamLayout {
    let params = (0..numel.div_ceil(TENSOR_NUMEL))
        .map(|i| ParamSpec {
            name: format!("block{i}.weight"),
            shape: vec![TENSOR_NUMEL.min(numel - i * TENSOR_NUMEL)],
        })
        .collect();
    ParamLayout { params }
}

/// Initial parameters: small, finite, not all equal (so Adam's update is not degenerate).
pub fn initial_params(numel: usize) -> Vec<f32> {
    (0..numel).map(|i| ((i % 101) as f32 - 50.0) * 1e-3).collect()
}

/// The gradient every simulated worker returns: finite, of mixed sign, mean-free over each period.
pub fn synthetic_gradient(numel: usize) -> Vec<f32> {
    (0..numel).map(|i| ((i % 97) as f32 - 48.0) * 1e-4).collect()
}

/// Fewest measured meta-steps per case when `--steps` is not given (measuring also goes on until
/// `--min-seconds` have passed): a rate needs a few steps, and a 100M step moves about a gigabyte.
pub fn default_steps(numel: usize) -> u64 {
    match numel {
        0..=100_000 => 5,
        100_001..=10_000_000 => 3,
        _ => 2,
    }
}

/// One measurement: a layout, a worker count, and what each meta-step holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Case {
    pub size: Size,
    pub workers: usize,
    /// Tasks each worker holds at once; the meta-batch is `workers × tasks_per_worker`, so every
    /// worker gets tasks (and the parameters) every step.
    pub tasks_per_worker: usize,
    /// Unmeasured meta-steps first (connections warm, buffers allocated).
    pub warmup: u64,
    /// Fewest measured meta-steps.
    pub steps: u64,
    /// Measuring goes on past `steps` until this many seconds have passed (short steps need many for
    /// a steady rate, and CPU time is read in 10 ms ticks).
    pub min_seconds: f64,
}

impl Case {
    pub fn numel(&self) -> usize {
        self.size.0
    }

    /// Tasks per meta-step.
    pub fn meta_batch(&self) -> usize {
        self.workers * self.tasks_per_worker
    }

    /// Bytes of one copy of the parameters (or of one gradient).
    pub fn vector_bytes(&self) -> u64 {
        self.numel() as u64 * BYTES_PER_PARAM
    }

    /// The least the coordinator can send per meta-step: the parameters once to each worker.
    pub fn ideal_sent_per_step(&self) -> u64 {
        self.workers as u64 * self.vector_bytes()
    }

    /// The least it can receive per meta-step: one gradient per task.
    pub fn ideal_received_per_step(&self) -> u64 {
        self.meta_batch() as u64 * self.vector_bytes()
    }

    /// Both directions.
    pub fn wire_per_step(&self) -> u64 {
        self.ideal_sent_per_step() + self.ideal_received_per_step()
    }

    /// Estimated peak memory of the whole process (coordinator and simulated workers), in bytes, when
    /// the coordinator runs with `budgets`.
    pub fn memory_estimate(&self, budgets: Budgets) -> u64 {
        let v = self.vector_bytes() as f64;
        // Received at once: the connections the receive budget admits (at least one), each with all its
        // tasks' streams (a simulated worker sends its results in parallel, and a connection already
        // receiving is not held back; see `server::ReceiveBudget`).
        let connections = ((budgets.receive_bytes as f64 / v).floor().max(1.0) as usize).min(self.workers);
        let receiving = (connections * self.tasks_per_worker).min(self.meta_batch()) as f64;
        // Waiting for their turn: within the reorder budget, the rest on disk.
        let waiting = (budgets.reorder_bytes as f64).min(v * self.meta_batch() as f64);
        let per_worker = QUIC_BUFFERS_PER_WORKER * self.vector_bytes().min(CONNECTION_WINDOW) + PER_WORKER_OVERHEAD;
        (v * (FIXED_COPIES + COPIES_PER_RECEIVED * receiving) + waiting) as u64 + self.workers as u64 * per_worker
    }
}

/// Why a case is not run.
#[derive(Clone, Debug, PartialEq)]
pub enum Skip {
    /// Its estimated peak memory is over the limit.
    Memory { need: u64, limit: u64 },
    /// It moves more bytes per meta-step than the limit (time, not memory).
    Wire { per_step: u64, limit: u64 },
}

impl fmt::Display for Skip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gb = |b: u64| b as f64 / 1e9;
        match self {
            Skip::Memory { need, limit } => write!(
                f,
                "needs ~{:.1} GB of memory (parameters, optimizer state, sums and in-flight gradients), over the {:.1} GB limit (--max-memory-gb)",
                gb(*need),
                gb(*limit)
            ),
            Skip::Wire { per_step, limit } => write!(
                f,
                "moves {:.2} GB per meta-step over loopback (parameters to every worker + every gradient), over the {:.2} GB limit (--max-step-gb) that keeps the run short",
                gb(*per_step),
                gb(*limit)
            ),
        }
    }
}

/// The coordinator's memory budgets in a case (`cluster.receive_memory_mb`, `cluster.reorder_memory_mb`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budgets {
    pub receive_bytes: u64,
    pub reorder_bytes: u64,
}

/// Limits a case must fit, and the coordinator's budgets its memory is estimated under.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub step_wire_bytes: u64,
    pub budgets: Budgets,
}

/// Every (size, workers) combination in the order given, each either to run or skipped with the reason.
pub fn cases(
    sizes: &[Size],
    workers: &[usize],
    tasks_per_worker: usize,
    warmup: u64,
    steps: Option<u64>,
    min_seconds: f64,
    limits: Limits,
) -> Vec<Result<Case, (Case, Skip)>> {
    let mut out = Vec::new();
    for &size in sizes {
        for &w in workers {
            let case = Case {
                size,
                workers: w,
                tasks_per_worker,
                warmup,
                steps: steps.unwrap_or_else(|| default_steps(size.0)),
                min_seconds,
            };
            let need = case.memory_estimate(limits.budgets);
            out.push(if need > limits.memory_bytes {
                Err((case, Skip::Memory { need, limit: limits.memory_bytes }))
            } else if case.wire_per_step() > limits.step_wire_bytes {
                Err((case, Skip::Wire { per_step: case.wire_per_step(), limit: limits.step_wire_bytes }))
            } else {
                Ok(case)
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        for (s, n, shown) in
            [("10k", 10_000, "10k"), ("1M", 1_000_000, "1M"), ("100m", 100_000_000, "100M"), ("1234", 1234, "1234")]
        {
            let size: Size = s.parse().unwrap();
            assert_eq!(size.0, n);
            assert_eq!(size.to_string(), shown);
        }
        for bad in ["", "k", "0", "-1", "2g", "1.5m", "ten"] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
    }

    #[test]
    fn layouts_have_the_size_asked_for() {
        for n in [1, 10_000, TENSOR_NUMEL, TENSOR_NUMEL + 1, 3 * TENSOR_NUMEL - 7] {
            let l = synthetic_layout(n);
            assert_eq!(l.numel(), n);
            assert!(l.params.iter().all(|p| p.numel() >= 1 && p.numel() <= TENSOR_NUMEL));
        }
        assert_eq!(synthetic_layout(100_000_000).params.len(), 96);
        assert!(synthetic_gradient(1000).iter().all(|v| v.is_finite()));
    }

    #[test]
    fn cases_over_a_limit_are_skipped_with_the_reason() {
        let budgets = Budgets { receive_bytes: 1_000_000_000, reorder_bytes: 1_000_000_000 };
        let limits = Limits { memory_bytes: 20_000_000_000, step_wire_bytes: 1_500_000_000, budgets };
        let sizes = [Size(10_000), Size(100_000_000)];
        let got = cases(&sizes, &[1, 1000], 2, 1, None, 0.0, limits);
        assert_eq!(got.len(), 4);
        let ok: Vec<(usize, usize)> = got.iter().flatten().map(|c| (c.numel(), c.workers)).collect();
        assert_eq!(ok, [(10_000, 1), (10_000, 1000), (100_000_000, 1)]);
        // 100M × 1000 workers: the budgets bound the gradients in memory, but not the buffers of 1000
        // connections.
        let Err((c, skip)) = &got[3] else { panic!("100M × 1000 must be skipped") };
        assert!(matches!(skip, Skip::Memory { .. }), "{skip}");
        let unbounded = Budgets { receive_bytes: u64::MAX, reorder_bytes: u64::MAX };
        assert!(c.memory_estimate(unbounded) > 2000 * 400_000_000, "without budgets every gradient counts");
        assert!(c.memory_estimate(budgets) * 5 < c.memory_estimate(unbounded));
        assert_eq!(c.meta_batch(), 2000);
        // The ideal counts the parameters once per worker and one gradient per task.
        assert_eq!(c.ideal_sent_per_step(), 1000 * 400_000_000);
        assert_eq!(c.ideal_received_per_step(), 2000 * 400_000_000);
        // A case within memory but over the wire limit says so.
        let tight = Limits { step_wire_bytes: 1_000_000, ..limits };
        let got = cases(&[Size(1_000_000)], &[1], 2, 1, Some(3), 0.0, tight);
        assert!(matches!(&got[0], Err((_, Skip::Wire { per_step: 12_000_000, .. }))));
    }
}
