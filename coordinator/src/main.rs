//! `metatrain`: the user's entry point. Parses the command line and calls the sub-command's `run`.

use clap::{Parser, Subcommand};
use metatrain_coordinator::bench::{self, BenchCommand};
use metatrain_coordinator::certs::{self, CertsCommand};
use metatrain_coordinator::chaos;
use metatrain_coordinator::status::{self, StatusArgs};
use metatrain_coordinator::sweep::{self, SweepArgs};
use metatrain_coordinator::train::{self, TrainArgs};

#[derive(Parser)]
#[command(
    name = "metatrain",
    version,
    about = "Distributed meta-training: a coordinator farms MAML tasks to workers over QUIC",
    long_about = "Distributed meta-training. `metatrain train` samples meta-batches of tasks, farms them to \
metatrain-worker processes over QUIC (local ones by default), averages and clips their meta-gradients, \
applies Adam, evaluates on held-out tasks, and writes report.json, metrics.csv, params.safetensors and loss plots. \
`metatrain sweep` queues many such runs on one worker pool; `metatrain status` shows a running one."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Meta-train a model (with local workers by default, or workers that join over the network).
    Train(TrainArgs),
    /// Run a job twice, undisturbed and with a worker killed every ~10 s; check nothing is lost or changed.
    Chaos(chaos::ChaosArgs),
    /// Make the cluster's CA and certificates for mutual TLS.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Run many trainings over a grid or list of settings on one worker pool; summary table and plot.
    Sweep(SweepArgs),
    /// Show what a running coordinator is doing: step, losses, workers, tasks (from its /metrics).
    Status(StatusArgs),
    /// Benchmarks: `metatrain bench coordinator` measures the coordinator against simulated workers.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Adapt a run's params.safetensors to your few labelled examples and predict (runs
    /// `metatrain-worker adapt`, which links libtorch; `metatrain adapt --help` lists its options).
    #[command(disable_help_flag = true)]
    Adapt(AdaptArgs),
}

#[derive(clap::Args)]
struct AdaptArgs {
    /// Passed to `metatrain-worker adapt` unchanged.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<std::ffi::OsString>,
}

/// `metatrain adapt`: hands over to `metatrain-worker adapt` (beside this binary, else on PATH) and
/// exits with its status.
fn adapt(args: AdaptArgs) -> anyhow::Result<()> {
    let worker = metatrain_coordinator::local::find_worker_binary(None)?;
    let status = std::process::Command::new(&worker)
        .env("METATRAIN_INVOKED_AS", "metatrain")
        .arg("adapt")
        .args(&args.args)
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", worker.display()))?;
    if !status.success() {
        std::process::exit(status.code().unwrap_or(1));
    }
    Ok(())
}

/// Errors are printed as one line of causes (`error: outer: inner`), never with a backtrace, and exit 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // A benchmark logs only what goes wrong: a line per joining simulated worker would bury its table.
    let default_log = if matches!(cli.command, Command::Bench(_)) { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_log.into()))
        .with_writer(|| metatrain_coordinator::progress::LogWriter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    metatrain_common::net::install_crypto_provider();
    let rt = tokio::runtime::Runtime::new()?;
    match cli.command {
        Command::Train(args) => {
            rt.block_on(train::run(args))?;
        }
        Command::Certs(cmd) => certs::run(cmd)?,
        Command::Chaos(args) => chaos::run(args)?,
        Command::Status(args) => status::run(args)?,
        Command::Sweep(args) => rt.block_on(sweep::run(args))?,
        // The benchmark makes runtimes of its own (one for the coordinator, one for simulated workers).
        Command::Bench(cmd) => bench::run(cmd)?,
        Command::Adapt(args) => adapt(args)?,
    }
    Ok(())
}
