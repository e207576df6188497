//! `metatrain sweep --config SWEEP.toml`: many runs over hyper-parameters or task distributions, queued
//! one after another on one shared worker pool.
//!
//! - [`plan`]: the sweep file and the runs it expands to (no I/O).
//! - [`summary`]: summary.csv, summary.md and the comparison plot.
//!
//! Each run is a child `metatrain train` process with its own run directory (`<out>/<run>/`), all on
//! one QUIC address and one TLS directory (`<out>/tls`), so the pool's workers (`metatrain-worker run
//! --stay`, started once; or external ones given the printed address) move from run to run without
//! restarting. Every metric of a run carries the label `run=<name>` (bounded: at most
//! [`plan::MAX_RUNS`] values). Re-running the same sweep skips finished runs and resumes interrupted
//! ones from their checkpoints. Ctrl-C lets the current run checkpoint, then stops the sweep.

pub mod plan;
pub mod summary;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::{bail, Context, Result};
use clap::Args;
use metatrain_common::config::Config;
use metatrain_common::net::files::{read_text, MAX_TEXT_FILE};
use metatrain_common::net::load_or_init_coordinator;

use crate::local::{dial_address, find_worker_binary, shared_capacity, LocalSpec, LocalWorkers};
use crate::report::config_json;
use plan::SweepFile;
use summary::{Outcome, Row};

#[derive(Args, Debug)]
pub struct SweepArgs {
    /// The sweep file (TOML): `base` config, `[set]` overrides for every run, a `[grid]` of values
    /// and/or `[[runs]]` with names; see the README and configs/sweep-noisy-linear.toml.
    #[arg(long, short)]
    pub config: PathBuf,
    /// Sweep directory: one sub-directory per run, plus summary.csv, summary.md, comparison.png/.svg.
    /// Default: runs/<sweep file name> (prefixed `sweep-` unless it starts so). Re-running into it skips finished runs.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Worker processes on this machine, shared by all runs (0: only external workers).
    #[arg(long, default_value_t = 2)]
    pub local_workers: usize,
    /// QUIC address every run listens on (workers stay connected to it across runs). Default: a free
    /// loopback port; for external workers use e.g. 0.0.0.0:7070.
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// Where each run serves /metrics (port 0: a free port per run, printed).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub metrics_addr: String,
    /// Data directory for Omniglot (passed to the local workers).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Only print the runs the sweep expands to.
    #[arg(long)]
    pub dry_run: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);
/// The running child `metatrain train` (0: none). It runs in a process group of its own, so that a
/// signal reaches it exactly once: forwarded from here, whether it was sent to the sweep alone (as a
/// container runtime does to PID 1) or to the terminal's process group (Ctrl-C).
static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_interrupt(sig: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
    let child = CHILD.load(Ordering::SeqCst);
    if child > 0 {
        // SAFETY: kill(2) is async-signal-safe; the pid is our own child's.
        unsafe {
            libc::kill(child, sig);
        }
    }
}

pub async fn run(args: SweepArgs) -> Result<()> {
    let text = read_text(&args.config, MAX_TEXT_FILE)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot read sweep file {}", args.config.display()))?;
    let file = SweepFile::parse(&text).with_context(|| format!("in {}", args.config.display()))?;
    let runs = file.runs().with_context(|| format!("in {}", args.config.display()))?;
    let base = args.config.parent().unwrap_or(Path::new(".")).join(&file.base);
    let base_text =
        read_text(&base, MAX_TEXT_FILE).map_err(anyhow::Error::msg).context("cannot read the base config")?;
    // Every run's config is checked before anything starts.
    let mut names = Vec::new();
    let mut configs = Vec::new();
    for r in &runs {
        let c = Config::from_toml_with_overrides(&base_text, &r.overrides)
            .with_context(|| format!("run {} ({}) has an invalid config", r.name, r.overrides.join(" ")))?;
        names.push(format!("{} ({})", c.task.describe(), c.algo.name.name()));
        configs.push(c);
    }
    let stem = args.config.file_stem().and_then(|s| s.to_str()).unwrap_or("sweep").to_string();
    let dir_name = if stem.starts_with("sweep") { stem.clone() } else { format!("sweep-{stem}") };
    let out = args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(dir_name));
    eprintln!("sweep {}: {} run(s) into {}", args.config.display(), runs.len(), out.display());
    for (r, what) in runs.iter().zip(&names) {
        eprintln!("  {:<40} {what} {}", r.name, r.overrides.join(" "));
    }
    if args.dry_run {
        return Ok(());
    }
    if args.local_workers > 256 {
        bail!("--local-workers must be at most 256, got {}", args.local_workers);
    }
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let _lock = crate::train::lock_run_dir(&out)?;
    // A finished run is skipped only if it is the run the sweep file asks for now: one made from an
    // edited sweep or base file would otherwise be reported as if it were the new one.
    for (r, c) in runs.iter().zip(&configs) {
        let dir = out.join(&r.name);
        if let Some(done) = report(&dir).filter(|_| finished(&dir)) {
            let differs = changed_keys(&stored_config(&done["config"], c), &config_json(c));
            if !differs.is_empty() {
                bail!(
                    "{} holds a finished run made with another config ({}); move it away or use another --out",
                    dir.display(),
                    differs.join(", ")
                );
            }
        }
    }

    let tls_dir = out.join("tls");
    let tls = load_or_init_coordinator(&tls_dir).map_err(anyhow::Error::msg)?;
    let listen = match args.listen {
        Some(a) => a,
        None => free_loopback_port()?,
    };
    let mut pool = if args.local_workers > 0 {
        let binary = find_worker_binary(None)?;
        let fingerprint = tls.identity.fingerprint();
        let spec = LocalSpec {
            binary: &binary,
            count: args.local_workers,
            coordinator: dial_address(listen),
            fingerprint: &fingerprint,
            tls_dir: &tls_dir,
            threads: 1,
            capacity: shared_capacity(args.local_workers, 1),
            data_dir: args.data_dir.as_deref(),
            stay: true,
        };
        Some(LocalWorkers::spawn(&spec)?)
    } else {
        eprintln!("waiting for external workers at {listen} (fingerprint {})", tls.identity.fingerprint());
        None
    };

    // SIGINT/SIGTERM are forwarded to the running child (see `CHILD`): it checkpoints and exits; the
    // sweep then stops instead of starting the next run. A second signal makes the child abort.
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_interrupt as *const () as libc::sighandler_t);
    }
    let exe = std::env::current_exe().context("locating the metatrain binary")?;
    let mut outcomes = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let dir = out.join(&r.name);
        if STOP.load(Ordering::SeqCst) {
            outcomes.push(Outcome::Pending);
            continue;
        }
        if finished(&dir) {
            eprintln!("[{}/{}] {}: finished earlier, skipped", i + 1, runs.len(), r.name);
            outcomes.push(Outcome::Done);
            continue;
        }
        if let Some(p) = pool.as_mut() {
            if p.alive() == 0 {
                bail!("all {} local workers exited; see their messages above", p.count());
            }
        }
        eprintln!("[{}/{}] {}: {}", i + 1, runs.len(), r.name, r.overrides.join(" "));
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.arg("train");
        // Resuming with the planned config too: `train` refuses it if it would change the run.
        if crate::checkpoint::exists(&dir) {
            cmd.arg("--resume").arg(&dir);
        } else {
            cmd.arg("--out").arg(&dir);
        }
        cmd.arg("--config").arg(&base);
        for o in &r.overrides {
            cmd.arg("--set").arg(o);
        }
        cmd.arg("--listen")
            .arg(listen.to_string())
            .arg("--tls-dir")
            .arg(&tls_dir)
            .arg("--local-workers")
            .arg("0")
            .arg("--metrics-addr")
            .arg(&args.metrics_addr)
            .arg("--metrics-label")
            .arg(format!("run={}", r.name))
            // Every run starts once the pool is back (it reconnects after each run), so that a short
            // run is not over before its second worker joins.
            .arg("--wait-workers")
            .arg(pool.as_mut().map_or(0, |p| p.alive()).to_string());
        cmd.process_group(0);
        let mut child = cmd.spawn().with_context(|| format!("starting {}", exe.display()))?;
        CHILD.store(child.id().map_or(0, |p| p as i32), Ordering::SeqCst);
        let status = child.wait().await;
        CHILD.store(0, Ordering::SeqCst);
        let status = status.with_context(|| format!("waiting for run {}", r.name))?;
        let outcome = match (status.success(), finished(&dir)) {
            (true, true) => Outcome::Done,
            (true, false) => Outcome::Interrupted,
            (false, _) => {
                eprintln!("run {} failed ({status}); continuing with the next run", r.name);
                Outcome::Failed
            }
        };
        if outcome == Outcome::Interrupted {
            STOP.store(true, Ordering::SeqCst);
        }
        outcomes.push(outcome);
    }
    if let Some(p) = pool.take() {
        p.stop_now().await;
    }

    let rows: Vec<Row<'_>> = runs
        .iter()
        .zip(&outcomes)
        .map(|(r, &outcome)| Row { run: r, outcome, report: report(&out.join(&r.name)) })
        .collect();
    let title = if stem.starts_with("sweep") { stem.clone() } else { format!("sweep {stem}") };
    let md = summary::write(&out, &title, &rows)?;
    println!("{md}");
    println!("wrote {0}/summary.csv, {0}/summary.md, {0}/comparison.png and .svg", out.display());
    let failed = outcomes.iter().filter(|o| **o == Outcome::Failed).count();
    let stopped = outcomes.iter().filter(|o| matches!(o, Outcome::Interrupted | Outcome::Pending)).count();
    if stopped > 0 {
        println!("stopped with {stopped} run(s) unfinished; run the same command again to continue");
    }
    if failed > 0 {
        bail!("{failed} of {} runs failed", runs.len());
    }
    Ok(())
}

/// A loopback address whose UDP port was free a moment ago.
fn free_loopback_port() -> Result<SocketAddr> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(s.local_addr()?)
}

fn report(dir: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).ok()?).ok()
}

/// A finished run's config (report.json's `config`) read back through [`Config`]: keys added to the
/// config since that run, with their defaults, then do not count as changes. As stored if it no
/// longer parses.
fn stored_config(json: &serde_json::Value, planned: &metatrain_common::config::Config) -> serde_json::Value {
    serde_json::from_value::<metatrain_common::config::Config>(json.clone())
        .map(|mut old| {
            // The coordinator pins a LoRA base's hash itself; a sweep file that leaves it to it is the
            // same run (and one with another base file is refused by --resume's hash check).
            if planned.model.lora_base_sha256.is_none() {
                old.model.lora_base_sha256 = None;
            }
            config_json(&old)
        })
        .unwrap_or_else(|_| json.clone())
}

/// Dotted keys whose values differ between two configs' JSON forms (as in report.json).
fn changed_keys(a: &serde_json::Value, b: &serde_json::Value) -> Vec<String> {
    fn walk(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        match (a, b) {
            (serde_json::Value::Object(x), serde_json::Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    let null = serde_json::Value::Null;
                    walk(&key, x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), out);
                }
            }
            _ if a != b => out.push(prefix.to_string()),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk("", a, b, &mut out);
    out
}

fn finished(dir: &Path) -> bool {
    crate::train::report_is_final(dir)
}

#[cfg(test)]
mod stored_config_tests {
    use super::*;

    #[test]
    fn keys_added_since_a_run_with_their_defaults_are_not_changes() {
        let now = metatrain_common::config::Config::default();
        let mut old = config_json(&now);
        old["algo"].as_object_mut().unwrap().remove("multi_step_loss");
        old["train"].as_object_mut().unwrap().remove("lr_schedule");
        assert_eq!(changed_keys(&old, &config_json(&now)).len(), 2, "raw JSON sees the new keys");
        assert!(changed_keys(&stored_config(&old, &now), &config_json(&now)).is_empty());
        old["train"]["meta_lr"] = serde_json::json!(0.5);
        assert_eq!(changed_keys(&stored_config(&old, &now), &config_json(&now)), ["train.meta_lr"]);
        // A LoRA base's hash, pinned by the coordinator, is not a change the sweep file made.
        let mut lora = now.clone();
        lora.model.lora_rank = 2;
        lora.model.lora_base = Some("base.safetensors".into());
        let mut done = config_json(&lora);
        done["model"]["lora_base_sha256"] = serde_json::json!("ab".repeat(32));
        assert!(changed_keys(&stored_config(&done, &lora), &config_json(&lora)).is_empty());
    }
}
