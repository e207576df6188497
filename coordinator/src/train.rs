//! `metatrain train`: options, set-up (endpoint, metrics, local workers, output directory) and the loop
//! over meta-steps and evaluations. The binary's `main` only parses and calls [`run`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use metatrain_common::config::Config;
use metatrain_common::layout::{params_sha256, ParamLayout};
use metatrain_common::net::files::{read_text, MAX_TEXT_FILE};
use metatrain_common::net::{install_prometheus_labelled, load_or_init_coordinator, serve_metrics, server_endpoint};
use metatrain_common::task::Competence;
use tokio::sync::{mpsc, watch};

use crate::checkpoint::{self, Checkpoint};
use crate::local::{dial_address, find_worker_binary, shared_capacity, LocalSpec, LocalWorkers};
use crate::progress::Progress;
use crate::report::{
    config_json, write_json_atomic, write_params, CurriculumReport, DefenceReport, EvalReport, MetricsCsv, Report,
    WireReport,
};
use crate::run::{RunError, Trainer};
use crate::sampler;
use crate::server::{self, Quarantine, ServerContext};

/// Events buffered between the connections and the training loop (back-pressure beyond this).
const EVENT_QUEUE: usize = 4096;

#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Run configuration (TOML); see configs/ and the README's config reference. Default: built-in
    /// defaults (sinusoid, MAML, mlp).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Override a config value, e.g. `--set train.meta_lr=0.0005` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Shortcut for `--set train.steps=N`.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Shortcut for `--set seed=S`.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Output directory (default: runs/<config name>-<UTC time>). Must not hold an earlier report.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Worker processes to start on this machine for the run (0: wait for external workers).
    #[arg(long, default_value_t = 2)]
    pub local_workers: usize,
    /// Before the first meta-step, wait until this many workers have joined, for at most
    /// --wait-workers-secs (then start with those there). Default: the --local-workers count, so a
    /// short run is not done before its second local worker is up. Later joiners are always welcome.
    #[arg(long, value_name = "N")]
    pub wait_workers: Option<usize>,
    /// The longest --wait-workers waits, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 30.0)]
    pub wait_workers_secs: f64,
    /// libtorch threads per task on local workers. Default 1: each local worker instead computes
    /// cores / local-workers tasks at once, and results stay bitwise identical whatever the worker count.
    #[arg(long, default_value_t = 1)]
    pub worker_threads: usize,
    /// QUIC address to listen on. For a multi-machine cluster use e.g. 0.0.0.0:7070.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Where to serve Prometheus /metrics (`none` to disable; port 0 picks a free port, printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_addr: String,
    /// The cluster's TLS directory (`metatrain certs init`): CA, coordinator certificate and worker
    /// certificates. Created with a fresh CA if it holds none. Reuse it across runs so that issued worker
    /// certificates and the pinned fingerprint stay valid. Default: <out>/tls.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// DANGER: accept workers without a client certificate signed by the cluster CA. Anyone who can reach
    /// the port can then join and send results (which are still validated). For trusted networks only.
    #[arg(long)]
    pub insecure_no_worker_auth: bool,
    /// Data directory for Omniglot (passed to local workers).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The metatrain-worker binary for local workers (default: beside this binary, then PATH).
    #[arg(long)]
    pub worker_bin: Option<PathBuf>,
    /// Continue the run in DIR from its newest checkpoint (DIR/checkpoints). The checkpoint's config is
    /// used unless --config is given; --set/--steps may change only what does not alter the parameters'
    /// trajectory (train.steps, eval.*, cluster.*, checkpoint.*).
    #[arg(long, value_name = "DIR", conflicts_with = "out")]
    pub resume: Option<PathBuf>,
    /// Add `KEY=VALUE` as a label to every exported metric (`metatrain sweep` labels each run with
    /// `run=NAME`). Repeatable.
    #[arg(long = "metrics-label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub metrics_labels: Vec<(String, String)>,
}

/// A Prometheus label: a name of letters, digits and `_` (not starting with a digit or `__`) and a
/// value of at most 128 printable characters.
/// Label names a global `--metrics-label` may not take: Prometheus's own (`le` of histogram buckets,
/// `quantile` of summaries, `job`/`instance` set by the scraper) and those metatrain's metrics carry.
const RESERVED_LABELS: &[&str] =
    &["le", "quantile", "job", "instance", "mode", "reason", "worker", "bucket", "corrupted"];

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or_else(|| format!("expected KEY=VALUE, got {s:?}"))?;
    let name_ok = !k.is_empty()
        && !k.starts_with("__")
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !name_ok {
        return Err(format!("{k:?} is not a Prometheus label name (letters, digits, _)"));
    }
    if RESERVED_LABELS.contains(&k) {
        return Err(format!(
            "{k:?} is a label the metrics already use or Prometheus reserves ({}); choose another name",
            RESERVED_LABELS.join(", ")
        ));
    }
    if v.len() > 128 || v.chars().any(|c| c.is_control()) {
        return Err("label values must be at most 128 printable characters".into());
    }
    Ok((k.to_string(), v.to_string()))
}

impl TrainArgs {
    /// Loads and validates the config with all overrides applied.
    pub fn config(&self) -> Result<Config> {
        let text = match &self.config {
            Some(p) => read_text(p, MAX_TEXT_FILE).map_err(anyhow::Error::msg).context("cannot read the config")?,
            None => String::new(),
        };
        let mut overrides = self.overrides.clone();
        if let Some(s) = self.steps {
            overrides.push(format!("train.steps={s}"));
        }
        if let Some(s) = self.seed {
            overrides.push(format!("seed={s}"));
        }
        let cfg = Config::from_toml_with_overrides(&text, &overrides);
        let with_sets = if overrides.is_empty() { "" } else { " with the --set/--steps/--seed overrides" };
        match &self.config {
            Some(p) => cfg.with_context(|| format!("in {}{with_sets}", p.display())),
            None => cfg.with_context(|| format!("in the built-in default config{with_sets}")),
        }
    }

    fn out_dir(&self) -> PathBuf {
        if let Some(o) = &self.out {
            return o.clone();
        }
        let stem = self.config.as_ref().and_then(|p| p.file_stem()).and_then(|s| s.to_str()).unwrap_or("run");
        let base = PathBuf::from("runs").join(format!("{stem}-{}", utc_stamp()));
        // Two runs started in the same second get distinct directories.
        (1..)
            .map(|i| if i == 1 { base.clone() } else { PathBuf::from(format!("{}-{i}", base.display())) })
            .find(|p| !p.exists())
            .unwrap_or(base)
    }
}

/// `YYYYmmdd-HHMMSS` in UTC, from the system clock (civil-from-days, no time-zone database needed).
pub fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + (m <= 2) as i64;
    format!("{y:04}{m:02}{d:02}-{:02}{:02}{:02}", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Takes `out/.lock` (an exclusive `flock`, released when the process ends, however it ends), so two
/// processes never write one run directory.
pub(crate) fn lock_run_dir(out: &Path) -> Result<std::fs::File> {
    use std::os::unix::io::AsRawFd;
    let path = out.join(".lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        bail!("another metatrain process is using {}", out.display());
    }
    Ok(file)
}

/// LoRA: checks the base file against the model and records its SHA-256 in the config (which every
/// worker receives and checks its own copy against); a hash already in the config must match.
fn pin_lora_base(config: &mut Config) -> Result<()> {
    if !config.model.lora() {
        return Ok(());
    }
    let spec = metatrain_common::layout::ModelSpec::from_config(config);
    let path = config.model.lora_base.clone().unwrap_or_default();
    let base = metatrain_common::lora::load_base(Path::new(&path), &spec, config.model.lora_base_sha256.as_deref())?;
    config.model.lora_base_sha256 = Some(base.sha256);
    Ok(())
}

/// Refuses an output directory whose `params.safetensors` is the LoRA base: the run would overwrite the
/// base it was pinned to.
fn refuse_overwriting_base(config: &Config, out: &Path) -> Result<()> {
    let Some(base) = config.model.lora_base.as_deref().filter(|_| config.model.lora()) else { return Ok(()) };
    let (a, b) = (std::fs::canonicalize(base), std::fs::canonicalize(out.join("params.safetensors")));
    if let (Ok(a), Ok(b)) = (a, b) {
        if a == b {
            bail!("--out {} would overwrite the LoRA base {base}; choose another --out", out.display());
        }
    }
    Ok(())
}

/// A `cluster.spill_dir` the user named must take a spill file: an error now, not a warning per
/// gradient later. The default (the system's temporary folder) only gets a warning, since a run whose
/// gradients all fit in `cluster.reorder_memory_mb` never spills.
fn check_spill_folder(config: &Config) -> Result<()> {
    match (crate::spill::probe(&config.cluster.spill_folder()), &config.cluster.spill_dir) {
        (Ok(()), _) => Ok(()),
        (Err(e), Some(_)) => bail!("cluster.spill_dir: {e}"),
        (Err(e), None) => {
            tracing::warn!("gradients waiting beyond cluster.reorder_memory_mb will stay in memory: {e}");
            Ok(())
        }
    }
}

/// The config, output directory (locked) and, when resuming, the checkpoint to continue from.
fn prepare(args: &TrainArgs) -> Result<(Config, PathBuf, std::fs::File, Option<Checkpoint>)> {
    let Some(dir) = &args.resume else {
        let mut config = args.config()?;
        pin_lora_base(&mut config)?;
        let out = args.out_dir();
        refuse_overwriting_base(&config, &out)?;
        std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
        let lock = lock_run_dir(&out)?;
        if out.join("report.json").exists() || checkpoint::exists(&out) {
            bail!(
                "{} already holds a run; choose another --out, or continue it with --resume {}",
                out.display(),
                out.display()
            );
        }
        return Ok((config, out, lock, None));
    };
    if !checkpoint::dir_of(dir).is_dir() {
        bail!("cannot resume {}: it holds no checkpoints/ (not a metatrain run directory?)", dir.display());
    }
    if !checkpoint::exists(dir) && !dir.join("report.json").exists() {
        bail!(
            "cannot resume {}: the run stopped before its first checkpoint; start it again with --config … --out {}",
            dir.display(),
            dir.display()
        );
    }
    let lock = lock_run_dir(dir)?;
    let (ckpt, path) = checkpoint::load_latest(dir).with_context(|| format!("cannot resume {}", dir.display()))?;
    let saved = Config::from_toml(&ckpt.header.config_toml).context("the checkpoint's config is invalid")?;
    let config = if args.config.is_some() {
        args.config()?
    } else {
        let mut overrides = args.overrides.clone();
        overrides.extend(args.steps.map(|s| format!("train.steps={s}")));
        overrides.extend(args.seed.map(|s| format!("seed={s}")));
        Config::from_toml_with_overrides(&ckpt.header.config_toml, &overrides)?
    };
    let mut config = config;
    pin_lora_base(&mut config)?;
    refuse_overwriting_base(&config, dir)?;
    let conflicts = saved.resume_conflicts(&config);
    if !conflicts.is_empty() {
        bail!("cannot resume {} with a config that changes the run:\n  {}", dir.display(), conflicts.join("\n  "));
    }
    // A checkpoint at the last step of a run that stopped before its final evaluation resumes into it.
    let needs_final_eval = ckpt.header.step == config.train.steps && !report_is_final(dir);
    if ckpt.header.step >= config.train.steps && !needs_final_eval {
        bail!(
            "{} already has {} of {} meta-steps; pass --steps N (N > {}) to extend it",
            dir.display(),
            ckpt.header.step,
            config.train.steps,
            ckpt.header.step
        );
    }
    eprintln!("resuming {} from {} (step {})", dir.display(), path.display(), ckpt.header.step);
    Ok((config, dir.clone(), lock, Some(ckpt)))
}

/// Whether `dir/report.json` is a finished run's (not an interrupted one's).
pub(crate) fn report_is_final(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("report.json")) else { return false };
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("interrupted").and_then(|i| i.as_bool()))
        .is_some_and(|interrupted| !interrupted)
}

/// Serves workers on `endpoint` (a task on the current runtime) for a run of `config` whose parameters
/// are laid out as `layout`. Returns the events for the training loop and the quarantine it shares with
/// the server.
pub(crate) fn start_server(
    endpoint: &quinn::Endpoint,
    config: &Config,
    layout: &ParamLayout,
) -> (mpsc::Receiver<server::Event>, Arc<Quarantine>) {
    let (events_tx, events_rx) = mpsc::channel(EVENT_QUEUE);
    let quarantine = Arc::new(Quarantine::default());
    let ctx = Arc::new(ServerContext {
        events: events_tx,
        config_toml: config.to_toml(),
        layout_fingerprint: layout.fingerprint(),
        numel: layout.numel(),
        grad_dtype: config.cluster.grad_dtype,
        next_worker: AtomicU64::new(1),
        quarantine: quarantine.clone(),
        names: Arc::default(),
        receive_budget: server::ReceiveBudget::new(config.cluster.receive_memory_bytes()),
    });
    tokio::spawn(server::serve(endpoint.clone(), ctx));
    (events_rx, quarantine)
}

/// Most local worker processes `--local-workers` may start (each is a libtorch process).
const MAX_LOCAL_WORKERS: usize = 256;

/// Runs a whole training job; returns the output directory.
pub async fn run(args: TrainArgs) -> Result<PathBuf> {
    if !(0.0..=86_400.0).contains(&args.wait_workers_secs) {
        bail!("--wait-workers-secs must be in [0, 86400], got {}", args.wait_workers_secs);
    }
    if args.local_workers > MAX_LOCAL_WORKERS {
        bail!("--local-workers must be at most {MAX_LOCAL_WORKERS}, got {}", args.local_workers);
    }
    if args.worker_threads == 0 || args.worker_threads > 1024 {
        bail!("--worker-threads must be in 1..=1024, got {}", args.worker_threads);
    }
    let (config, out, _lock, resume) = prepare(&args)?;
    check_spill_folder(&config)?;
    let started = Instant::now();

    // Metrics first, so that everything after is observable.
    if args.metrics_addr != "none" {
        let addr: SocketAddr = args
            .metrics_addr
            .parse()
            .with_context(|| format!("--metrics-addr {:?}: expected HOST:PORT or none", args.metrics_addr))?;
        let handle = install_prometheus_labelled(&args.metrics_labels).map_err(anyhow::Error::msg)?;
        crate::metrics::describe();
        crate::metrics::init_counters();
        let bound = serve_metrics(addr, handle).await.with_context(|| format!("cannot serve metrics on {addr}"))?;
        eprintln!("metrics: http://{bound}/metrics");
    }

    let tls_dir = args.tls_dir.clone().unwrap_or_else(|| out.join("tls"));
    let tls = load_or_init_coordinator(&tls_dir).map_err(anyhow::Error::msg)?;
    let fingerprint = tls.identity.fingerprint();
    let mutual = !args.insecure_no_worker_auth;
    if !mutual {
        tracing::warn!(
            "--insecure-no-worker-auth: workers are NOT authenticated; anyone who reaches {} can join",
            args.listen
        );
    }
    let endpoint = server_endpoint(args.listen, &tls, mutual).map_err(anyhow::Error::msg)?;
    let bound = endpoint.local_addr()?;
    let spec = metatrain_common::layout::ModelSpec::from_config(&config);
    let layout = metatrain_common::layout::meta_layout(&spec, &config.model, &config.algo);
    let (events_rx, quarantine) = start_server(&endpoint, &config, &layout);
    eprintln!("coordinator listening on {bound} (QUIC), certificate fingerprint {fingerprint}");
    let host = if bound.ip().is_unspecified() { format!("<this-host>:{}", bound.port()) } else { bound.to_string() };
    if mutual {
        eprintln!(
            "  workers need a certificate from this cluster's CA: metatrain certs issue NAME --dir {}",
            tls_dir.display()
        );
        eprintln!(
            "  join with: metatrain-worker run --coordinator {host} --fingerprint {fingerprint} --cert {0}/workers/NAME.crt --key {0}/workers/NAME.key",
            tls_dir.display()
        );
    } else {
        eprintln!("  join with: metatrain-worker run --coordinator {host} --fingerprint {fingerprint}");
    }

    let local = if args.local_workers > 0 {
        let binary = find_worker_binary(args.worker_bin.as_deref())?;
        let threads = args.worker_threads.max(1);
        let capacity = shared_capacity(args.local_workers, threads);
        let spec = LocalSpec {
            binary: &binary,
            count: args.local_workers,
            coordinator: dial_address(bound),
            fingerprint: &fingerprint,
            tls_dir: &tls_dir,
            threads,
            capacity,
            data_dir: args.data_dir.as_deref(),
            stay: false,
        };
        eprintln!(
            "starting {} local worker(s) ({capacity} compute thread(s) each, batching training tasks; {threads} libtorch thread(s) per compute thread)",
            args.local_workers
        );
        Some(LocalWorkers::spawn(&spec)?)
    } else {
        None
    };

    let stop_rx = stop_on_signals()?;
    let mut trainer = Trainer::new(config.clone(), events_rx, local, quarantine);
    let start_step = match resume {
        Some(c) => {
            let step = c.header.step;
            trainer.restore(c).map_err(anyhow::Error::msg)?;
            step
        }
        None => 0,
    };
    let mut stop_rx = stop_rx;
    let wait_for = args.wait_workers.unwrap_or(args.local_workers);
    let waited =
        trainer.wait_for_workers(wait_for, Duration::from_secs_f64(args.wait_workers_secs), &mut stop_rx).await;
    let outcome = match waited {
        Ok(()) => train_loop(&mut trainer, &out, start_step, stop_rx).await,
        Err(e) => Err((start_step, e)),
    };
    trainer.shutdown_workers(if outcome.is_ok() { "run finished" } else { "run stopped" }).await;
    endpoint.close(0u32.into(), b"run over");
    let (final_step, eval, interrupted) = match outcome {
        Ok((step, eval)) => (step, eval, false),
        Err((step, RunError::Interrupted)) => {
            save_checkpoint(&trainer, &out, step)?;
            eprintln!("checkpoint at step {step} written; continue with: metatrain train --resume {}", out.display());
            (step, None, true)
        }
        Err((step, e)) => {
            // Keep what was computed: the state after `step` meta-steps is consistent.
            match save_checkpoint(&trainer, &out, step) {
                Ok(()) => eprintln!("checkpoint at step {step} written to {}", out.display()),
                Err(c) => eprintln!("could not write a checkpoint: {c}"),
            }
            return Err(anyhow::Error::new(e).context("training failed"));
        }
    };
    write_params(&out.join("params.safetensors"), &trainer.layout, &trainer.params, &trainer.config.to_toml())?;
    let report = Report {
        config: config_json(&config),
        final_step,
        interrupted,
        eval,
        params_sha256: params_sha256(&trainer.params),
        wall_seconds: started.elapsed().as_secs_f64(),
        tasks_completed: trainer.tasks_completed,
        tasks_reassigned: trainer.tasks_reassigned(),
        tasks_duplicated: trainer.tasks_duplicated(),
        gradients_spilled: trainer.gradients_spilled,
        results_rejected: trainer.results_rejected,
        max_workers: trainer.max_workers,
        wire: WireReport {
            params_sent_bytes: trainer.wire.params_sent,
            gradients_received_bytes: trainer.wire.gradients_received,
            bytes_per_meta_step: (trainer.wire.params_sent + trainer.wire.gradients_received) as f64
                / final_step.saturating_sub(start_step).max(1) as f64,
        },
        curriculum: CurriculumReport::of(&config, &trainer.curriculum, final_step),
        defence: DefenceReport::of(&config, trainer.defence_counts),
    };
    write_json_atomic(&out.join("report.json"), &report)?;
    let title = format!("{} · {} · {}", config.task.describe(), config.algo.name.name(), config.model.name.name());
    if let Err(e) = crate::plot::write_loss_plots(&out, &title) {
        tracing::warn!("could not draw the loss plots: {e:#}");
    }
    print_summary(&report, &out);
    tokio::time::timeout(std::time::Duration::from_secs(2), endpoint.wait_idle()).await.ok();
    Ok(out)
}

/// SIGINT or SIGTERM: stop after handing back the step in flight, checkpoint, report, exit 0. A second
/// signal aborts at once.
fn stop_on_signals() -> Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        eprintln!("stopping: writing a checkpoint and the report (signal again to abort)");
        let _ = stop_tx.send(true);
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        std::process::exit(130);
    });
    Ok(stop_rx)
}

fn save_checkpoint(trainer: &Trainer, out: &Path, step: u64) -> Result<(), RunError> {
    let t = Instant::now();
    checkpoint::save(out, &trainer.snapshot(step), trainer.config.checkpoint.keep)
        .map_err(|e| RunError::Io(e.to_string()))?;
    metrics::histogram!("metatrain_checkpoint_duration_seconds").record(t.elapsed().as_secs_f64());
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
    metrics::gauge!("metatrain_checkpoint_timestamp_seconds").set(now);
    metrics::gauge!("metatrain_checkpoint_step").set(step as f64);
    Ok(())
}

/// Meta-steps from `start`, periodic evaluations, checkpoints, final evaluation. On error, also says how
/// many meta-steps were completed.
async fn train_loop(
    trainer: &mut Trainer,
    out: &Path,
    start: u64,
    mut stop: watch::Receiver<bool>,
) -> Result<(u64, Option<EvalReport>), (u64, RunError)> {
    let config = trainer.config.clone();
    let mut csv =
        MetricsCsv::open(&out.join("metrics.csv"), start).map_err(|e| (start, RunError::Io(e.to_string())))?;
    let steps = config.train.steps;
    let mut progress = Progress::new(start, steps);
    let started = Instant::now();
    let mut last_eval = String::new();
    for step in start..steps {
        // The periodic evaluation after `step` meta-steps runs here, before meta-step `step`, so that a
        // checkpoint at `step` never includes it: a run stopped or killed during (or just after) it
        // evaluates again on resume, and an adaptive curriculum sees that evaluation exactly once.
        if config.eval.every > 0 && step > 0 && step % config.eval.every == 0 {
            let t = Instant::now();
            let e = trainer
                .evaluate(step, sampler::eval_batch(config.seed, config.eval.tasks), &mut stop)
                .await
                .map_err(|e| (step, e))?;
            let competence = Competence::from_fraction(trainer.curriculum.competence(step - 1)).fraction();
            csv.row("eval", step, &e, t.elapsed().as_secs_f64(), started.elapsed().as_secs_f64(), competence)
                .map_err(|e| (step, RunError::Io(e.to_string())))?;
            last_eval = describe_eval(&e);
            progress.println(&format!("step {step}: eval {last_eval}"));
            if trainer.curriculum.observe_eval(e.post_loss.mean) {
                let next = Competence::from_fraction(trainer.curriculum.competence(step)).fraction();
                progress.println(&format!("step {step}: held-out loss stopped improving; competence → {next:.2}"));
            }
        }
        let t = Instant::now();
        let competence = Competence::from_fraction(trainer.curriculum.competence(step));
        metrics::gauge!("metatrain_curriculum_competence").set(competence.fraction());
        let specs = sampler::train_batch(config.seed, step, config.train.meta_batch, competence);
        let s = trainer.train_step(step, specs, &mut stop).await.map_err(|e| (step, e))?;
        let secs = t.elapsed().as_secs_f64();
        metrics::histogram!("metatrain_step_duration_seconds").record(secs);
        csv.row("train", step + 1, &s, secs, started.elapsed().as_secs_f64(), competence.fraction())
            .map_err(|e| (step + 1, RunError::Io(e.to_string())))?;
        progress.update(
            step + 1,
            &format!(
                "train loss {:.4} → {:.4}{}",
                s.pre_loss.mean,
                s.post_loss.mean,
                if last_eval.is_empty() { String::new() } else { format!(" | eval {last_eval}") }
            ),
        );
        if config.checkpoint.every > 0 && (step + 1) % config.checkpoint.every == 0 {
            save_checkpoint(trainer, out, step + 1).map_err(|e| (step + 1, e))?;
        }
    }
    progress.finish();
    save_checkpoint(trainer, out, steps).map_err(|e| (steps, e))?;
    if config.eval.final_tasks == 0 {
        return Ok((steps, None));
    }
    eprintln!(
        "final evaluation on {} held-out tasks ({} inner steps)",
        config.eval.final_tasks,
        config.eval_inner_steps()
    );
    let t = Instant::now();
    let e = trainer
        .evaluate(steps, sampler::final_eval_batch(config.seed, config.eval.final_tasks), &mut stop)
        .await
        .map_err(|e| (steps, e))?;
    csv.row("eval", steps, &e, t.elapsed().as_secs_f64(), started.elapsed().as_secs_f64(), 1.0)
        .map_err(|e| (steps, RunError::Io(e.to_string())))?;
    Ok((steps, Some(EvalReport::from_summary(&e, config.eval_inner_steps()))))
}

fn describe_eval(e: &crate::aggregate::BatchSummary) -> String {
    let mut s = format!("loss {:.4} → {:.4}", e.pre_loss.mean, e.post_loss.mean);
    if let Some(a) = e.post_accuracy {
        s.push_str(&format!(", acc {:.1}%", 100.0 * a.mean));
    }
    s
}

fn print_summary(r: &Report, out: &Path) {
    let how = if r.interrupted { "run stopped (interrupted) after" } else { "run finished:" };
    println!("{how} {} meta-steps in {:.1}s, {} tasks", r.final_step, r.wall_seconds, r.tasks_completed);
    if let Some(e) = &r.eval {
        println!(
            "held-out ({} tasks, {} inner steps): pre-adaptation loss {:.4} ± {:.4}, post-adaptation loss {:.4} ± {:.4}",
            e.tasks, e.inner_steps, e.pre_adapt_loss, e.pre_adapt_loss_ci95, e.post_adapt_loss, e.post_adapt_loss_ci95
        );
        if let (Some(a), Some(ci)) = (e.accuracy, e.accuracy_ci95) {
            println!("held-out accuracy {:.2}% ± {:.2}%", 100.0 * a, 100.0 * ci);
        }
    }
    if let Some(d) = &r.defence {
        print!(
            "corrupted tasks {}, quarantined {} ({} of them corrupted",
            d.tasks_corrupted, d.tasks_quarantined, d.quarantined_corrupted
        );
        match (d.quarantine_precision, d.quarantine_recall) {
            (Some(p), Some(rc)) => println!("; precision {:.1}%, recall {:.1}%)", 100.0 * p, 100.0 * rc),
            _ => println!(")"),
        }
        let kinds: Vec<String> = d
            .by_kind
            .iter()
            .filter_map(|(name, k)| k.recall.map(|r| format!("{name} {:.1}% of {}", 100.0 * r, k.corrupted)))
            .collect();
        if !kinds.is_empty() {
            println!("recall by kind: {}", kinds.join(", "));
        }
    }
    if r.interrupted {
        println!("(interrupted: no final evaluation)");
    }
    println!("params_sha256 {}", r.params_sha256);
    let plots = if out.join("loss.png").exists() { ", loss.png, loss.svg" } else { "" };
    println!("wrote {}/report.json, metrics.csv, params.safetensors{plots}", out.display());
}

#[cfg(test)]
mod tests {
    #[test]
    fn metrics_labels_are_checked() {
        assert_eq!(super::parse_label("run=a-1"), Ok(("run".to_string(), "a-1".to_string())));
        for bad in ["le=x", "mode=y", "quantile=1", "__x=1", "1a=b", "a b=c", "novalue"] {
            assert!(super::parse_label(bad).is_err(), "{bad}");
        }
        assert!(super::parse_label(&format!("k={}", "v".repeat(200))).is_err());
    }
}
