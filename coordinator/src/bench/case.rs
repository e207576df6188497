//! One measurement: the real coordinator (QUIC server, handlers, [`Trainer`]: scheduling, validation,
//! in-order reduction, clipping, Adam) against `workers` simulated workers for a layout of `numel`
//! parameters, both in this process on runtimes of their own, talking over loopback QUIC.
//!
//! Order: baseline sum → coordinator endpoint (counted socket) and server → simulated workers join →
//! warm-up meta-steps → measured meta-steps (counters read before and after) → shutdown. Everything of
//! the case (runtimes, trainer, buffers) is dropped before the next case starts.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use metatrain_common::config::Config;
use metatrain_common::net::{server_config, CoordinatorTls};
use metatrain_common::task::Competence;
use metatrain_common::tensor::encode_f32;
use tokio::sync::watch;

use super::measure::{f32_sum_rate, thread_cpu_seconds};
use super::plan::{self, Case};
use super::sim::{self, SimCounters, SimReading, SimShared};
use super::socket::{counting_server, kernel_drops, Wire, WireCounters};
use super::BenchError;
use crate::run::Trainer;
use crate::sampler;

/// Thread-name prefixes of the two runtimes, to split CPU time between them.
pub const COORDINATOR_THREADS: &str = "mt-coord";
pub const WORKER_THREADS: &str = "mt-sim";
/// All simulated workers must be welcomed within this (1,000 TLS handshakes take a few seconds on
/// two cores; a minute means something is wrong).
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the join is checked while waiting for it.
const JOIN_POLL: Duration = Duration::from_millis(5);
/// How often the coordinator's side checks whether a simulated worker failed.
const WATCHDOG: Duration = Duration::from_millis(100);
/// Simulated workers must have closed their connections this soon after the coordinator's Shutdown.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// Task deadline of the benchmark's runs: far beyond a step's time, so that no task is reassigned for
/// being slow (a 100M step on two cores takes seconds); a reassignment would still show in the output.
const TASK_TIMEOUT_SECS: f64 = 600.0;

/// How the case runs.
#[derive(Clone, Copy, Debug)]
pub struct Options {
    /// Threads of the coordinator's tokio runtime.
    pub coordinator_threads: usize,
    /// Threads of the simulated workers' runtime.
    pub worker_threads: usize,
    /// `SO_RCVBUF` to ask for on the coordinator's socket (an experiment; `None`: the OS default, as
    /// the real coordinator has).
    pub recv_buffer: Option<usize>,
    /// `cluster.reorder_memory_mb` and `cluster.receive_memory_mb` (`None`: the run defaults).
    pub reorder_memory_mb: Option<u64>,
    pub receive_memory_mb: Option<u64>,
}

/// What one case measured. Byte and CPU figures cover the measured meta-steps only.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub case: Case,
    /// From the first connection attempt to the last worker's Welcome.
    pub join_seconds: f64,
    /// Meta-steps measured (at least `case.steps`).
    pub steps: u64,
    /// Wall time of the measured meta-steps.
    pub wall_seconds: f64,
    /// Results accepted and reduced in the measured meta-steps.
    pub tasks_accepted: u64,
    /// Over the whole case (warm-up included): refused results, reassigned and duplicated tasks.
    pub results_rejected: u64,
    pub tasks_reassigned: u64,
    pub tasks_duplicated: u64,
    /// Gradients that waited for their turn on disk (beyond `cluster.reorder_memory_mb`), warm-up included.
    pub gradients_spilled: u64,
    /// Datagram bytes through the coordinator's socket.
    pub wire: Wire,
    /// Datagrams the kernel dropped because the coordinator's socket buffer was full (Linux).
    pub kernel_drops: Option<u64>,
    /// ... and at the simulated workers' sockets.
    pub worker_kernel_drops: Option<u64>,
    /// Frames as the simulated workers counted them.
    pub frames: SimReading,
    pub coordinator_cpu_seconds: f64,
    pub workers_cpu_seconds: f64,
    /// The in-memory f32 sum of the same meta-batch, bytes per second.
    pub baseline_bytes_per_second: f64,
    /// Whether the parameters were all finite after the last update.
    pub params_finite: bool,
    /// The process's peak resident set during the case (coordinator and simulated workers; Linux).
    pub peak_rss_bytes: Option<u64>,
}

impl Outcome {
    pub fn steps_per_second(&self) -> f64 {
        self.steps as f64 / self.wall_seconds
    }

    pub fn results_per_second(&self) -> f64 {
        self.tasks_accepted as f64 / self.wall_seconds
    }

    /// Gradient bytes accepted and reduced per second.
    pub fn aggregation_bytes_per_second(&self) -> f64 {
        (self.tasks_accepted * self.case.vector_bytes()) as f64 / self.wall_seconds
    }

    pub fn sent_per_step(&self) -> f64 {
        self.wire.sent as f64 / self.steps as f64
    }

    pub fn received_per_step(&self) -> f64 {
        self.wire.received as f64 / self.steps as f64
    }
}

/// What the coordinator side measured.
struct Measured {
    steps: u64,
    wall: Duration,
    accepted: u64,
    rejected: u64,
    reassigned: u64,
    duplicated: u64,
    spilled: u64,
    wire: Wire,
    kernel_drops: Option<u64>,
    worker_kernel_drops: Option<u64>,
    frames: SimReading,
    coordinator_cpu: f64,
    workers_cpu: f64,
    params_finite: bool,
}

/// Runs one case. `tls` is the coordinator's identity (workers pin its fingerprint; they present no
/// certificate, which changes only the handshake, outside the measurement).
pub fn run(case: Case, tls: &CoordinatorTls, opts: &Options) -> Result<Outcome, BenchError> {
    let peak_reset = reset_peak_rss();
    let numel = case.numel();
    let values = plan::synthetic_gradient(numel);
    let baseline_bytes_per_second = f32_sum_rate(&values, case.meta_batch());
    let gradient = Bytes::from(encode_f32(&values));
    drop(values);
    let coordinator_rt = runtime(COORDINATOR_THREADS, opts.coordinator_threads)?;
    let workers_rt = runtime(WORKER_THREADS, opts.worker_threads)?;

    let config = config_for(&case, opts)?;
    let layout = plan::synthetic_layout(numel);
    let server = server_config(tls, false).map_err(BenchError::Tls)?;
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let (endpoint, wire) = {
        let _rt = coordinator_rt.enter();
        counting_server(loopback, server, opts.recv_buffer).map_err(BenchError::Socket)?
    };
    let coordinator = endpoint.local_addr().map_err(BenchError::Socket)?;
    let (events, quarantine) = {
        let _rt = coordinator_rt.enter();
        crate::train::start_server(&endpoint, &config, &layout)
    };
    let trainer = Trainer::with_model(config, layout, plan::initial_params(numel), events, None, quarantine);

    let shared = Arc::new(SimShared {
        coordinator,
        fingerprint: tls.identity.fingerprint(),
        numel,
        gradient,
        counters: SimCounters::default(),
        join_gate: tokio::sync::Semaphore::new(sim::JOIN_CONCURRENCY),
        ports: Default::default(),
        error: Default::default(),
    });
    let joining = Instant::now();
    let sims: Vec<_> = (0..case.workers).map(|i| workers_rt.spawn(sim::run(shared.clone(), i))).collect();
    wait_joined(&shared, case.workers)?;
    let join_seconds = joining.elapsed().as_secs_f64();

    let driver = coordinator_rt.spawn(drive(trainer, case, endpoint, wire, shared.clone()));
    let measured = coordinator_rt.block_on(driver).map_err(|e| BenchError::Task(e.to_string()))?;
    // A simulated worker's failure stops the training loop (`Interrupted`); its own error says more.
    sim_error(&shared)?;
    let measured = measured?;
    workers_rt.block_on(async {
        let all = async {
            for s in sims {
                let _ = s.await;
            }
        };
        tokio::time::timeout(EXIT_TIMEOUT, all)
            .await
            .map_err(|_| BenchError::Task("simulated workers did not exit".into()))
    })?;
    sim_error(&shared)?;
    coordinator_rt.shutdown_timeout(Duration::from_secs(1));
    workers_rt.shutdown_timeout(Duration::from_secs(1));
    Ok(Outcome {
        case,
        join_seconds,
        steps: measured.steps,
        wall_seconds: measured.wall.as_secs_f64(),
        tasks_accepted: measured.accepted,
        results_rejected: measured.rejected,
        tasks_reassigned: measured.reassigned,
        tasks_duplicated: measured.duplicated,
        gradients_spilled: measured.spilled,
        wire: measured.wire,
        kernel_drops: measured.kernel_drops,
        worker_kernel_drops: measured.worker_kernel_drops,
        frames: measured.frames,
        coordinator_cpu_seconds: measured.coordinator_cpu,
        workers_cpu_seconds: measured.workers_cpu,
        baseline_bytes_per_second,
        params_finite: measured.params_finite,
        peak_rss_bytes: peak_reset.then(peak_rss).flatten(),
    })
}

/// Resets the kernel's record of this process's peak resident set (Linux ≥ 4.0), so that each case's
/// peak is its own. False where it cannot.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// `VmHWM`, the peak resident set since the last reset, in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A multi-threaded runtime whose threads are named `name`.
fn runtime(name: &str, threads: usize) -> Result<tokio::runtime::Runtime, BenchError> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name(name)
        .enable_all()
        .build()
        .map_err(BenchError::Socket)
}

/// The run's configuration: the defaults, with the case's meta-batch, every worker holding
/// `tasks_per_worker` tasks (so each gets tasks, and the parameters, every step), and no evaluation.
fn config_for(case: &Case, opts: &Options) -> Result<Config, BenchError> {
    let mut c = Config::default();
    if let Some(mb) = opts.reorder_memory_mb {
        c.cluster.reorder_memory_mb = mb;
    }
    if let Some(mb) = opts.receive_memory_mb {
        c.cluster.receive_memory_mb = mb;
    }
    c.train.steps = case.warmup + case.steps;
    c.train.meta_batch = case.meta_batch();
    c.cluster.tasks_in_flight = case.tasks_per_worker;
    c.cluster.task_timeout_secs = TASK_TIMEOUT_SECS;
    c.eval.every = 0;
    c.validate().map_err(|e| BenchError::Config(e.to_string()))?;
    Ok(c)
}

/// Polls (with a deadline) until every simulated worker was welcomed; fails at once on a worker's error.
fn wait_joined(shared: &SimShared, workers: usize) -> Result<(), BenchError> {
    let deadline = Instant::now() + JOIN_TIMEOUT;
    loop {
        sim_error(shared)?;
        let welcomed = shared.counters.read_welcomed();
        if welcomed as usize >= workers {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::Join { welcomed, workers, after: JOIN_TIMEOUT });
        }
        std::thread::sleep(JOIN_POLL);
    }
}

fn sim_error(shared: &SimShared) -> Result<(), BenchError> {
    match shared.error.lock().ok().and_then(|e| e.clone()) {
        Some(e) => Err(BenchError::Worker(e)),
        None => Ok(()),
    }
}

/// The coordinator's side, on its runtime: warm-up, measured meta-steps, shutdown.
async fn drive(
    mut trainer: Trainer,
    case: Case,
    endpoint: quinn::Endpoint,
    wire: Arc<WireCounters>,
    shared: Arc<SimShared>,
) -> Result<Measured, BenchError> {
    let (stop_tx, mut stop) = watch::channel(false);
    let watchdog = tokio::spawn(stop_on_worker_error(shared.clone(), stop_tx));
    let measured = measure(&mut trainer, case, &wire, &shared, &mut stop).await;
    watchdog.abort();
    trainer.shutdown_workers("benchmark over").await;
    endpoint.close(0u32.into(), b"benchmark over");
    let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    measured
}

/// Stops the training loop when a simulated worker fails (its tasks would otherwise wait for the task
/// deadline).
async fn stop_on_worker_error(shared: Arc<SimShared>, stop: watch::Sender<bool>) {
    let mut every = tokio::time::interval(WATCHDOG);
    loop {
        every.tick().await;
        if shared.error.lock().map_or(true, |e| e.is_some()) {
            let _ = stop.send(true);
            return;
        }
    }
}

/// Warm-up, then the measured meta-steps with every counter read before and after.
async fn measure(
    trainer: &mut Trainer,
    case: Case,
    wire: &WireCounters,
    shared: &SimShared,
    stop: &mut watch::Receiver<bool>,
) -> Result<Measured, BenchError> {
    let seed = trainer.config.seed;
    for step in 0..case.warmup {
        let specs = sampler::train_batch(seed, step, case.meta_batch(), Competence::FULL);
        trainer.train_step(step, specs, stop).await?;
    }
    let (wire0, frames0, accepted0) = (wire.read(), shared.counters.read(), trainer.tasks_completed);
    let drops0 = Drops::read(shared);
    let (coord0, workers0) = (thread_cpu_seconds(COORDINATOR_THREADS), thread_cpu_seconds(WORKER_THREADS));
    let started = Instant::now();
    let min_time = Duration::from_secs_f64(case.min_seconds);
    let mut step = case.warmup;
    while step < case.warmup + case.steps || started.elapsed() < min_time {
        let specs = sampler::train_batch(seed, step, case.meta_batch(), Competence::FULL);
        trainer.train_step(step, specs, stop).await?;
        step += 1;
    }
    let wall = started.elapsed();
    let drops1 = Drops::read(shared);
    let measured = Measured {
        steps: step - case.warmup,
        wall,
        accepted: trainer.tasks_completed - accepted0,
        rejected: trainer.results_rejected,
        reassigned: trainer.tasks_reassigned(),
        duplicated: trainer.tasks_duplicated(),
        spilled: trainer.gradients_spilled,
        wire: wire.read() - wire0,
        kernel_drops: drops0.zip(drops1).map(|(d0, d1)| d1.coordinator.saturating_sub(d0.coordinator)),
        worker_kernel_drops: drops0.zip(drops1).map(|(d0, d1)| d1.workers.saturating_sub(d0.workers)),
        frames: shared.counters.read() - frames0,
        coordinator_cpu: thread_cpu_seconds(COORDINATOR_THREADS) - coord0,
        workers_cpu: thread_cpu_seconds(WORKER_THREADS) - workers0,
        params_finite: trainer.params.iter().all(|v| v.is_finite()),
    };
    Ok(measured)
}

/// Kernel drops so far at the coordinator's socket and, summed, at the simulated workers'.
#[derive(Clone, Copy)]
struct Drops {
    coordinator: u64,
    workers: u64,
}

impl Drops {
    fn read(shared: &SimShared) -> Option<Drops> {
        let table = kernel_drops()?;
        let at = |port: &u16| table.get(port).copied().unwrap_or(0);
        let workers = shared.ports.lock().ok()?.iter().map(at).sum();
        Some(Drops { coordinator: at(&shared.coordinator.port()), workers })
    }
}
