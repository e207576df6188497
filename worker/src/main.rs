//! `metatrain-worker`: the compute plane, and the only crate that links libtorch.
//!
//! - `model`: functional models over explicit parameters (`mlp`, `mlp-ln`, `conv4`).
//! - `algo`: the inner loop and meta-gradients (MAML, FOMAML), checked against finite differences.
//! - `tensors`: wire vectors and task data ↔ tensors.
//! - `compute`: the thread pool that runs tasks off the async runtime.
//! - `client`: the QUIC session with the coordinator.
//! - `data`: finding and loading Omniglot.
//! - `grad_cmd`: `metatrain-worker grad`, one meta-gradient from files, for cross-checking.
//! - `adapt_cmd`: `metatrain-worker adapt` (`metatrain adapt`): adapt an exported initialisation to a
//!   user's few examples and predict.
//!
//! Flow: client receives Params + Assign → compute builds the task from its spec (common::task), runs
//! algo on model → client sends the Result with the meta-gradient payload.

mod adapt_cmd;
mod algo;
mod batched;
#[cfg(test)]
mod batched_tests;
mod bench;
mod client;
mod compute;
mod data;
mod grad_cmd;
#[cfg(test)]
mod gradcheck_tests;
mod model;
mod tensors;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use metatrain_common::net::{Identity, ServerTrust};
use tch::Device;

#[derive(Parser)]
#[command(
    name = "metatrain-worker",
    version,
    about = "metatrain compute worker: adapts the model to each task it is sent and returns the meta-gradient"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Join a coordinator and compute tasks until the run ends.
    Run(RunArgs),
    /// Compute one meta-gradient from files (for checking against PyTorch or finite differences).
    Grad(grad_cmd::GradArgs),
    /// Measure meta-gradient tasks/s on this machine: the per-task loop against the batched path.
    Bench(bench::BenchArgs),
    /// Adapt a meta-trained initialisation (a run's params.safetensors) to your few labelled examples,
    /// predict the query inputs (CSV out), and score them when they carry labels.
    Adapt(adapt_cmd::AdaptArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The coordinator's QUIC address, HOST:PORT (printed by `metatrain train`).
    #[arg(long, env = "METATRAIN_COORDINATOR")]
    coordinator: String,
    /// SHA-256 fingerprint (hex) of the coordinator's certificate, printed by `metatrain train`; the worker
    /// accepts no other certificate. Either this or --ca is required.
    #[arg(long, env = "METATRAIN_FINGERPRINT")]
    fingerprint: Option<String>,
    /// Verify the coordinator against this cluster CA certificate (ca.crt from `metatrain certs init`).
    #[arg(long, env = "METATRAIN_CA")]
    ca: Option<PathBuf>,
    /// This worker's certificate (from `metatrain certs issue NAME`); required unless the coordinator runs
    /// with --insecure-no-worker-auth.
    #[arg(long, env = "METATRAIN_CERT", requires = "key")]
    cert: Option<PathBuf>,
    /// The key of --cert.
    #[arg(long, env = "METATRAIN_KEY", requires = "cert")]
    key: Option<PathBuf>,
    /// Name in the coordinator's logs (default: hostname-pid).
    #[arg(long)]
    name: Option<String>,
    /// Compute threads (default: one per device). Each computes up to --batch tasks as one batched
    /// computation. Several threads per GPU keep it busy while one thread prepares its next batch.
    #[arg(long)]
    capacity: Option<usize>,
    /// Most tasks one compute thread computes as one batch (a task's result does not depend on its
    /// batch). Larger batches amortise libtorch's cost per operation; memory grows with the batch.
    #[arg(long, default_value_t = DEFAULT_BATCH)]
    batch: usize,
    /// libtorch intra-op threads per compute thread. Default: 1, which keeps results bitwise identical
    /// across workers; raise it for large models.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// `cpu`, `cuda:N`, or a comma-separated list of devices (`cuda:0,cuda:1`): compute threads are spread
    /// over them round robin, so one process can drive several GPUs.
    #[arg(long, default_value = "cpu", value_parser = parse_device, value_delimiter = ',')]
    device: Vec<Device>,
    /// Directory holding `omniglot/` (default: $METATRAIN_DATA_DIR, then shared/data or ../shared/data
    /// under the current directory or the binary's checkout).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where to serve Prometheus /metrics (`none` to disable). Port 0 picks a free port, printed at start.
    #[arg(long, default_value = "127.0.0.1:0")]
    metrics_addr: String,
    /// Keep trying to connect this many seconds: at start, after losing the coordinator, and (with
    /// --stay) between runs.
    #[arg(long, default_value_t = 30)]
    connect_timeout: u64,
    /// Serve run after run: when a run ends, wait for the next coordinator on the same address (as
    /// `metatrain sweep` does with its worker pool) instead of exiting.
    #[arg(long)]
    stay: bool,
}

pub(crate) fn parse_device(s: &str) -> Result<Device, String> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
        return Ok(Device::Cuda(n));
    }
    if s == "cuda" {
        return Ok(Device::Cuda(0));
    }
    Err(format!("expected cpu or cuda:N, got {s:?}"))
}

/// Default `--batch`: the sinusoid MLP reaches 8× the per-task loop's tasks/s at 32 tasks on one core
/// (`metatrain-worker bench`), and a meta-batch of 25–32 then fits in one batch per worker.
const DEFAULT_BATCH: usize = 32;
/// Set by `metatrain adapt` to the program name help and usage messages should show.
const INVOKED_AS_ENV: &str = "METATRAIN_INVOKED_AS";

/// Most libtorch intra-op threads `--threads` accepts (worker and bench).
const MAX_THREADS: usize = 1024;

/// Largest `--batch` (and the most tasks a worker may claim at once, over all its threads).
const MAX_BATCH: usize = 256;
const MAX_TASKS_AT_ONCE: usize = 4096;

/// Longest `--connect-timeout` accepted: a week is beyond any restart a worker should wait out, and
/// deadlines computed from it never overflow a clock.
const MAX_CONNECT_TIMEOUT_SECS: u64 = 7 * 24 * 3600;

/// Errors are printed as one line of causes (`error: outer: inner`), never with a backtrace, and exit 1.
fn main() -> std::process::ExitCode {
    match run_cli() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run_cli() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // `metatrain adapt` runs this binary: then help and usage name the command the user typed.
    let mut command = <Cli as clap::CommandFactory>::command();
    if let Ok(name) = std::env::var(INVOKED_AS_ENV) {
        command = command.bin_name(name);
    }
    let cli = <Cli as clap::FromArgMatches>::from_arg_matches(&command.get_matches()).unwrap_or_else(|e| e.exit());
    match cli.command {
        Command::Grad(args) => {
            tch::set_num_threads(1);
            grad_cmd::run(args)
        }
        Command::Run(args) => run(args),
        Command::Bench(args) => bench::run(args),
        Command::Adapt(args) => {
            tch::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()) as i32);
            adapt_cmd::run(args)
        }
    }
}

/// Refuses a CUDA device that libtorch does not see (a CPU-only build, or a wrong index).
pub(crate) fn check_devices(devices: &[Device]) -> Result<()> {
    for d in devices {
        if let Device::Cuda(n) = d {
            let have = tch::Cuda::device_count() as usize;
            if *n >= have {
                bail!("--device cuda:{n} requested but libtorch sees {have} CUDA device(s) (CPU-only build? see README: METATRAIN_CUDA=1)");
            }
        }
    }
    Ok(())
}

fn run(args: RunArgs) -> Result<()> {
    metatrain_common::net::install_crypto_provider();
    if args.device.is_empty() || args.device.len() > 64 {
        bail!("--device must name 1 to 64 devices, got {}", args.device.len());
    }
    let capacity = args.capacity.unwrap_or(args.device.len());
    if capacity == 0 || capacity > 256 {
        bail!("--capacity must be in 1..=256, got {capacity}");
    }
    if args.batch == 0 || args.batch > MAX_BATCH {
        bail!("--batch must be in 1..={MAX_BATCH}, got {}", args.batch);
    }
    if capacity * args.batch > MAX_TASKS_AT_ONCE {
        bail!(
            "--capacity × --batch must be at most {MAX_TASKS_AT_ONCE} (the coordinator's limit), got {capacity} × {}",
            args.batch
        );
    }
    if !(1..=MAX_THREADS).contains(&args.threads) {
        bail!("--threads must be in 1..={MAX_THREADS}, got {}", args.threads);
    }
    check_devices(&args.device)?;
    if args.connect_timeout > MAX_CONNECT_TIMEOUT_SECS {
        bail!(
            "--connect-timeout must be at most {MAX_CONNECT_TIMEOUT_SECS} seconds (a week), got {}",
            args.connect_timeout
        );
    }
    tch::set_num_threads(args.threads as i32);
    let coordinator: SocketAddr = resolve(&args.coordinator)?;
    let trust = match (&args.fingerprint, &args.ca) {
        (Some(fp), None) => ServerTrust::Fingerprint(fp.clone()),
        (None, Some(ca)) => ServerTrust::Ca(ca.clone()),
        (Some(_), Some(_)) => bail!("pass either --fingerprint or --ca, not both"),
        (None, None) => bail!("pass --fingerprint (printed by the coordinator) or --ca (the cluster's ca.crt) so the worker can verify the coordinator"),
    };
    let identity = match (&args.cert, &args.key) {
        (Some(c), Some(k)) => Some(Identity::load(c, k).map_err(anyhow::Error::msg)?),
        _ => None,
    };
    let name = args.name.clone().unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    rt.block_on(async move {
        if args.metrics_addr != "none" {
            let addr: SocketAddr =
                args.metrics_addr.parse().with_context(|| format!("--metrics-addr {:?}", args.metrics_addr))?;
            let handle = metatrain_common::net::install_prometheus().map_err(anyhow::Error::msg)?;
            describe_metrics();
            let bound = metatrain_common::net::serve_metrics(addr, handle)
                .await
                .with_context(|| format!("cannot serve metrics on {addr}"))?;
            tracing::info!("metrics: http://{bound}/metrics");
        }
        let opts = client::ClientOptions {
            coordinator,
            trust,
            identity,
            name,
            capacity,
            batch: args.batch,
            threads: args.threads,
            devices: args.device,
            data_dir: args.data_dir,
            connect_timeout: Duration::from_secs(args.connect_timeout),
            stay: args.stay,
        };
        match client::run(opts).await? {
            client::SessionEnd::Shutdown(reason) => tracing::info!("coordinator ended the run: {reason}"),
        }
        Ok(())
    })
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .with_context(|| format!("--coordinator {addr:?}: expected HOST:PORT"))?
        .next()
        .with_context(|| format!("--coordinator {addr:?} resolves to no address"))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "worker".into())
}

fn describe_metrics() {
    use metrics::{describe_counter, describe_histogram, Unit};
    describe_histogram!(
        "metatrain_worker_task_duration_seconds",
        Unit::Seconds,
        "Time to compute one task (data, inner loop, meta-gradient), by mode."
    );
    describe_counter!("metatrain_worker_tasks_completed_total", "Tasks this worker computed and returned, by mode.");
    describe_counter!(
        "metatrain_worker_tasks_failed_total",
        "Tasks this worker could not compute (reported to the coordinator)."
    );
    describe_counter!("metatrain_worker_params_received_total", "Parameter versions received from the coordinator.");
    describe_counter!(
        "metatrain_worker_sent_bytes_total",
        Unit::Bytes,
        "Gradient payload bytes sent to the coordinator."
    );
    describe_counter!("metatrain_worker_reconnects_total", "Sessions re-established after losing the coordinator.");
    for name in [
        "metatrain_worker_tasks_failed_total",
        "metatrain_worker_params_received_total",
        "metatrain_worker_sent_bytes_total",
        "metatrain_worker_reconnects_total",
    ] {
        metrics::counter!(name).absolute(0);
    }
    for mode in ["train", "eval"] {
        metrics::counter!("metatrain_worker_tasks_completed_total", "mode" => mode).absolute(0);
    }
}
