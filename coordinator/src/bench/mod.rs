//! `metatrain bench`: benchmarks of the control plane.
//!
//! `metatrain bench coordinator` measures the coordinator alone. It runs the real thing in this process
//! — the QUIC endpoint and its handlers ([`crate::server`]), and the training loop ([`crate::run`]):
//! scheduling, result validation, in-order f64 reduction, global-norm clipping and Adam — against N
//! simulated workers ([`sim`]) that speak the real protocol over loopback QUIC and answer every task at
//! once with a precomputed gradient, so that the coordinator is the bottleneck. The parameter layout is
//! synthetic ([`plan::synthetic_layout`]: 10k, 1M, 100M parameters or any count), passed to
//! [`crate::run::Trainer::with_model`]; normal runs are untouched.
//!
//! - [`plan`]: sizes, cases, and why a case is skipped (estimated memory, or bytes per meta-step).
//! - [`case`]: one (layout, workers) measurement, start to shutdown.
//! - [`sim`]: the simulated worker.
//! - [`socket`]: the coordinator's UDP socket, counted (the wire figures are real datagram bytes).
//! - [`measure`]: the in-memory f32-sum baseline and per-runtime CPU time.
//! - [`table`]: the printed table and the `--json` lines.
//! - [`wire`]: `metatrain bench wire`, flow-control windows against round-trip time.
//!
//! The simulated workers share the machine's cores with the coordinator (the coordinator decrypts what
//! they encrypt and vice versa), so the table also shows how many cores each side kept busy.

pub mod case;
pub mod measure;
pub mod plan;
pub mod sim;
pub mod socket;
pub mod table;
pub mod wire;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use metatrain_common::net::{load_or_init_coordinator, CoordinatorTls};
use thiserror::Error;

use crate::run::RunError;
use plan::{Limits, Size};

/// Most simulated workers: the coordinator serves at most 1,024 connections at once.
const MAX_WORKERS: usize = 1000;
/// Most tasks a simulated worker holds: a worker may have 64 result streams open at once.
const MAX_TASKS_PER_WORKER: usize = 64;
/// Most measured (or warm-up) meta-steps per case.
const MAX_STEPS: u64 = 1_000_000;
/// Largest `--recv-buffer-kib`: the kernel takes the size as an `int` (bytes), and Linux doubles it.
const MAX_RECV_BUFFER_KIB: usize = 1 << 20;
/// Without `--max-memory-gb`, cases may use this share of the memory available at start.
const MEMORY_SHARE: f64 = 0.6;
/// Assumed available memory where /proc/meminfo cannot be read.
const FALLBACK_AVAILABLE: u64 = 8_000_000_000;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error("invalid option: {0}")]
    Invalid(String),
    #[error("the benchmark's configuration is invalid: {0}")]
    Config(String),
    #[error("TLS set-up: {0}")]
    Tls(String),
    #[error("socket or runtime: {0}")]
    Socket(#[source] std::io::Error),
    #[error("only {welcomed} of {workers} simulated workers joined within {after:?}")]
    Join { welcomed: u64, workers: usize, after: Duration },
    #[error("{0}")]
    Worker(String),
    #[error("the coordinator's training loop: {0}")]
    Run(#[from] RunError),
    #[error("a benchmark task: {0}")]
    Task(String),
    #[error("{failed} of {ran} cases failed (see above)")]
    CasesFailed { failed: usize, ran: usize },
    #[error("all {0} cases were skipped by the limits above, so nothing was measured (raise --max-memory-gb or --max-step-gb, or choose smaller --layouts / --workers)")]
    AllSkipped(usize),
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// The coordinator alone: its real QUIC server and training loop against simulated workers (no
    /// libtorch) over loopback; meta-steps/s, results/s, aggregation and wire bytes, against baselines.
    #[command(long_about = COORDINATOR_HELP)]
    Coordinator(CoordinatorArgs),
    /// QUIC flow-control windows against round-trip time: one large transfer through a delaying UDP
    /// proxy on loopback, MB/s per window against the largest window and against window / RTT.
    Wire(wire::WireArgs),
}

/// `metatrain bench coordinator --help`.
const COORDINATOR_HELP: &str = "Runs the real coordinator (QUIC server, handlers, scheduling, validation, in-order \
reduction, clipping, Adam) in this process against simulated workers: tokio tasks that speak the real protocol \
over loopback QUIC and answer each task at once with a precomputed gradient, so the coordinator is the \
bottleneck. Layouts are synthetic parameter vectors of the sizes given.

For every layout × worker count it prints meta-steps/s, results/s, gradient bytes aggregated per second (and \
the ratio to a plain in-memory f32 sum of the same gradients, measured in the same run), the bytes through the \
coordinator's UDP socket per meta-step (and the ratio to the ideal: the parameters once per worker plus one \
gradient per task), and the CPU cores the coordinator and the simulated workers kept busy. Cases that would \
not fit in memory, or that move more than --max-step-gb per meta-step, are skipped and listed with the reason.

The defaults take about three minutes on two cores.";

#[derive(Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// Parameter layouts, comma-separated: 10k, 1m, 100m, or any count (e.g. 250000).
    #[arg(long, value_delimiter = ',', default_value = "10k,1m,100m")]
    pub layouts: Vec<Size>,
    /// Simulated worker counts, comma-separated (each 1..=1000).
    #[arg(long, value_delimiter = ',', default_value = "1,10,100,1000")]
    pub workers: Vec<usize>,
    /// Tasks each worker holds per meta-step; the meta-batch is workers × this.
    #[arg(long, default_value_t = 2)]
    pub tasks_per_worker: usize,
    /// Fewest measured meta-steps per case. Default: 5 for layouts up to 100k parameters, 3 up to 10M,
    /// 2 above.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Measuring goes on past --steps until this many seconds have passed.
    #[arg(long, default_value_t = 2.0)]
    pub min_seconds: f64,
    /// Unmeasured meta-steps before each measurement.
    #[arg(long, default_value_t = 1)]
    pub warmup: u64,
    /// Skip cases that move more than this many GB per meta-step (parameters to every worker plus every
    /// gradient): on loopback with two cores a GB takes a few seconds.
    #[arg(long, default_value_t = 1.5)]
    pub max_step_gb: f64,
    /// Skip cases whose estimated peak memory is over this many GB. Default: 60% of the memory available.
    #[arg(long)]
    pub max_memory_gb: Option<f64>,
    /// Threads of the coordinator's runtime (default: the machine's cores).
    #[arg(long)]
    pub coordinator_threads: Option<usize>,
    /// Threads of the simulated workers' runtime (default: the machine's cores).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Receive buffer (KiB) to ask for on the coordinator's UDP socket. Default: what the real
    /// coordinator asks for (8192); 0 keeps the OS default, for comparison. Linux doubles the request and
    /// caps it at net.core.rmem_max.
    #[arg(long, value_name = "KIB")]
    pub recv_buffer_kib: Option<usize>,
    /// `cluster.reorder_memory_mb` of the benchmark's runs: MB of gradients that arrived ahead of their
    /// turn kept in memory; beyond it they wait in a temporary file (default: the run default, 1024).
    #[arg(long, value_name = "MB")]
    pub reorder_memory_mb: Option<u64>,
    /// `cluster.receive_memory_mb` of the benchmark's runs: MB of gradients received and decoded at
    /// once (default: the run default, 1024).
    #[arg(long, value_name = "MB")]
    pub receive_memory_mb: Option<u64>,
    /// One JSON object per line for each case (skipped ones carry `skipped`) instead of the table.
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: BenchCommand) -> Result<(), BenchError> {
    match command {
        BenchCommand::Coordinator(args) => coordinator(&args),
        BenchCommand::Wire(args) => wire::run(&args),
    }
}

/// A TLS directory made for one benchmark run in the system's temporary directory; removed on drop.
pub struct TempTls {
    dir: PathBuf,
    pub tls: CoordinatorTls,
}

impl TempTls {
    pub fn new() -> Result<TempTls, BenchError> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("metatrain-bench-{}-{nanos}", std::process::id()));
        let tls = load_or_init_coordinator(&dir).map_err(BenchError::Tls)?;
        Ok(TempTls { dir, tls })
    }
}

impl Drop for TempTls {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// `MemAvailable` from /proc/meminfo, in bytes.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

fn check(args: &CoordinatorArgs) -> Result<(), BenchError> {
    let bad = |s: String| Err(BenchError::Invalid(s));
    if args.layouts.is_empty() || args.workers.is_empty() {
        return bad("--layouts and --workers need at least one value each".into());
    }
    if let Some(w) = args.workers.iter().find(|w| !(1..=MAX_WORKERS).contains(*w)) {
        return bad(format!("--workers: each count must be in 1..={MAX_WORKERS}, got {w}"));
    }
    if !(1..=MAX_TASKS_PER_WORKER).contains(&args.tasks_per_worker) {
        return bad(format!("--tasks-per-worker must be in 1..={MAX_TASKS_PER_WORKER}, got {}", args.tasks_per_worker));
    }
    if args.steps.is_some_and(|s| !(1..=MAX_STEPS).contains(&s)) {
        return bad(format!("--steps must be in 1..={MAX_STEPS}"));
    }
    if args.warmup > MAX_STEPS {
        return bad(format!("--warmup must be in 0..={MAX_STEPS}"));
    }
    if args.recv_buffer_kib.is_some_and(|k| k > MAX_RECV_BUFFER_KIB) {
        return bad(format!("--recv-buffer-kib must be in 0..={MAX_RECV_BUFFER_KIB}"));
    }
    if !(args.min_seconds.is_finite() && (0.0..=3600.0).contains(&args.min_seconds)) {
        return bad(format!("--min-seconds must be in 0..=3600, got {}", args.min_seconds));
    }
    for (name, v) in [("--max-step-gb", Some(args.max_step_gb)), ("--max-memory-gb", args.max_memory_gb)] {
        if v.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            return bad(format!("{name} must be a positive number of GB"));
        }
    }
    for (name, v) in [("--reorder-memory-mb", args.reorder_memory_mb), ("--receive-memory-mb", args.receive_memory_mb)]
    {
        if v.is_some_and(|v| v > metatrain_common::config::MAX_REORDER_MEMORY_MB) {
            return bad(format!("{name} must be at most {}", metatrain_common::config::MAX_REORDER_MEMORY_MB));
        }
    }
    if args.receive_memory_mb == Some(0) {
        return bad("--receive-memory-mb must be at least 1".into());
    }
    for (name, v) in [("--coordinator-threads", args.coordinator_threads), ("--worker-threads", args.worker_threads)] {
        if v.is_some_and(|v| !(1..=1024).contains(&v)) {
            return bad(format!("{name} must be in 1..=1024"));
        }
    }
    Ok(())
}

/// `metatrain bench coordinator`: plans the cases, runs each, prints rows as they finish.
fn coordinator(args: &CoordinatorArgs) -> Result<(), BenchError> {
    check(args)?;
    let started = Instant::now();
    let available = available_memory().unwrap_or(FALLBACK_AVAILABLE);
    let opts = case::Options {
        coordinator_threads: args.coordinator_threads.unwrap_or_else(cores),
        worker_threads: args.worker_threads.unwrap_or_else(cores),
        recv_buffer: match args.recv_buffer_kib {
            None => Some(metatrain_common::net::UDP_RECV_BUFFER),
            Some(0) => None,
            Some(k) => Some(k * 1024),
        },
        reorder_memory_mb: args.reorder_memory_mb,
        receive_memory_mb: args.receive_memory_mb,
    };
    let defaults = metatrain_common::config::ClusterConfig::default();
    let budgets = plan::Budgets {
        reorder_bytes: args.reorder_memory_mb.unwrap_or(defaults.reorder_memory_mb).saturating_mul(1_000_000),
        receive_bytes: args.receive_memory_mb.unwrap_or(defaults.receive_memory_mb).saturating_mul(1_000_000),
    };
    let limits = Limits {
        memory_bytes: args.max_memory_gb.map_or((available as f64 * MEMORY_SHARE) as u64, |g| (g * 1e9) as u64),
        step_wire_bytes: (args.max_step_gb * 1e9) as u64,
        budgets,
    };
    let planned = plan::cases(
        &args.layouts,
        &args.workers,
        args.tasks_per_worker,
        args.warmup,
        args.steps,
        args.min_seconds,
        limits,
    );
    // The same recorder `metatrain train` installs (without serving it): metrics are part of the path.
    if metatrain_common::net::install_prometheus().is_ok() {
        crate::metrics::describe();
        crate::metrics::init_counters();
    }
    let temp = TempTls::new()?;
    if !args.json {
        println!(
            "metatrain bench coordinator: {} cores, {:.1} GB available; coordinator runtime {} threads, simulated workers {} threads",
            cores(),
            available as f64 / 1e9,
            opts.coordinator_threads,
            opts.worker_threads
        );
        println!("{}", table::header());
    }
    let (mut skipped, mut remarks, mut failed, mut ran) = (Vec::new(), Vec::new(), 0, 0);
    for planned in &planned {
        let case = match planned {
            Ok(c) => *c,
            Err((c, why)) => {
                if args.json {
                    println!("{}", table::skipped_json(c, why));
                }
                skipped.push(table::skipped_line(c, why));
                continue;
            }
        };
        ran += 1;
        match case::run(case, &temp.tls, &opts) {
            Ok(o) => {
                if args.json {
                    println!("{}", table::json(&o));
                } else {
                    println!("{}", table::row(&o));
                }
                remarks.extend(table::remarks(&o));
            }
            Err(e) => {
                failed += 1;
                eprintln!("{} × {} workers failed: {e}", case.size, case.workers);
            }
        }
    }
    if !args.json {
        println!("{}", table::LEGEND);
        for r in &remarks {
            println!("note: {r}");
        }
        if !skipped.is_empty() {
            println!("skipped:");
            for s in &skipped {
                println!("  {s}");
            }
        }
        println!("total {:.0} s", started.elapsed().as_secs_f64());
    }
    if failed > 0 {
        return Err(BenchError::CasesFailed { failed, ran });
    }
    if ran == 0 {
        return Err(BenchError::AllSkipped(skipped.len()));
    }
    Ok(())
}
