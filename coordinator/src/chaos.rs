//! `metatrain chaos`: a local cluster under fire. It runs the same job twice — once undisturbed with
//! local workers, once with external workers of which a random one is killed (SIGKILL) about every
//! `--kill-every` seconds and restarted — then prints the tasks lost (must be 0) and whether the final
//! parameters are bitwise equal. Exit status 0 only if both hold.
//!
//! A task is lost when the run needed it (its count follows from the config: meta-steps × meta-batch
//! plus every evaluation's tasks) and no accepted result covers it. A coordinator waits for every task
//! of a step, so a lost task shows as a run that stalls: when no meta-step has finished (no new row in
//! the chaos run's `metrics.csv`) for [`STALL_FACTOR`] times the reference run's wall time (at least
//! [`MIN_DEADLINE`]), the run is stopped and its missing tasks are counted as lost. A run that is slow
//! but moving (kills so frequent that workers barely start) is not cut short.
//!
//! A kill counts only if its worker had joined the run (the coordinator logged it); a chaos run with no
//! such kill — it finished first, or every kill hit a worker still starting — tested nothing: the
//! command says so and fails.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use metatrain_common::net::pki;
use metatrain_common::rng::keyed_rng;
use rand::Rng;

use crate::local::find_worker_binary;

/// The chaos run may go this many times the reference run's wall time without finishing a meta-step
/// (restarts cost a libtorch start-up each, and a killed worker's tasks wait for their reassignment)
/// before it counts as stalled.
const STALL_FACTOR: f64 = 5.0;
/// ... but never less than this, so that short runs are not judged on start-up noise.
const MIN_DEADLINE: Duration = Duration::from_secs(120);
/// How often the chaos loop reads the coordinator's log, checks progress and decides on a kill.
const POLL: Duration = Duration::from_millis(100);

/// Tasks a finished run must have completed, from its report's config: every meta-step's meta-batch,
/// the periodic evaluations (after each `eval.every` steps, before the last) and the final evaluation.
pub fn tasks_needed(report: &serde_json::Value) -> Option<u64> {
    let c = &report["config"];
    let steps = c["train"]["steps"].as_u64()?;
    let every = c["eval"]["every"].as_u64()?;
    let periodic = steps.saturating_sub(1).checked_div(every).unwrap_or(0);
    Some(
        steps * c["train"]["meta_batch"].as_u64()?
            + periodic * c["eval"]["tasks"].as_u64()?
            + c["eval"]["final_tasks"].as_u64()?,
    )
}

#[derive(Args, Debug)]
pub struct ChaosArgs {
    /// Run configuration (as for `train`). Default: configs/sinusoid.toml settings built in.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Config overrides (as for `train`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Meta-steps of each run.
    #[arg(long, default_value_t = 3000)]
    pub steps: u64,
    /// Workers in the chaos run.
    #[arg(long, default_value_t = 3)]
    pub workers: usize,
    /// Mean seconds between kills (each gap is drawn uniformly from 0.5× to 1.5× this).
    #[arg(long, default_value_t = 10.0, allow_negative_numbers = true)]
    pub kill_every: f64,
    /// Seed of the chaos (which worker, when).
    #[arg(long, default_value_t = 0)]
    pub chaos_seed: u64,
    /// Output directory (holds reference/ and chaos/). Default: runs/chaos-<UTC time>.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn train_command(args: &ChaosArgs, out: &Path, local_workers: usize) -> Result<Command> {
    let mut cmd = Command::new(std::env::current_exe().context("locating metatrain")?);
    cmd.arg("train");
    if let Some(c) = &args.config {
        cmd.arg("--config").arg(c);
    }
    for o in &args.overrides {
        cmd.arg("--set").arg(o);
    }
    cmd.args(["--steps", &args.steps.to_string(), "--local-workers", &local_workers.to_string()])
        .args(["--metrics-addr", "none", "--out"])
        .arg(out)
        .stdin(Stdio::null());
    Ok(cmd)
}

fn report(out: &Path) -> Result<serde_json::Value> {
    let p = out.join("report.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    Ok(serde_json::from_str(&text)?)
}

fn spawn_worker(binary: &Path, addr: &str, fingerprint: &str, tls: &Path, name: &str) -> Result<Child> {
    let w = tls.join("workers");
    Command::new(binary)
        .args(["run", "--coordinator", addr, "--fingerprint", fingerprint, "--name", name, "--metrics-addr", "none"])
        .arg("--cert")
        .arg(w.join(format!("{name}.crt")))
        .arg("--key")
        .arg(w.join(format!("{name}.key")))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("starting a worker")
}

pub fn run(args: ChaosArgs) -> Result<()> {
    if args.workers < 2 {
        bail!("--workers must be at least 2 (one is always being killed)");
    }
    // Kills are checked every POLL, so shorter gaps would only mean one kill per check.
    if !(POLL.as_secs_f64()..=86_400.0).contains(&args.kill_every) {
        bail!("--kill-every must be a number of seconds in [{}, 86400], got {}", POLL.as_secs_f64(), args.kill_every);
    }
    let out =
        args.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(format!("chaos-{}", crate::train::utc_stamp())));
    let worker_bin = find_worker_binary(None)?;

    eprintln!("chaos: reference run (no failures) in {}", out.join("reference").display());
    let t = Instant::now();
    let status = train_command(&args, &out.join("reference"), args.workers)?.stderr(Stdio::null()).status()?;
    if !status.success() {
        bail!("the reference run failed ({status}); run it with `metatrain train` to see why");
    }
    let allowed = MIN_DEADLINE.max(t.elapsed().mul_f64(STALL_FACTOR));

    let chaos_out = out.join("chaos");
    eprintln!(
        "chaos: run with {} workers, one killed about every {}s, in {}",
        args.workers,
        args.kill_every,
        chaos_out.display()
    );
    // Info level whatever RUST_LOG says: the kills are judged by the coordinator's "joined" lines.
    let mut coord = train_command(&args, &chaos_out, 0)?.env("RUST_LOG", "info").stderr(Stdio::piped()).spawn()?;
    let stderr = coord.stderr.take().context("coordinator stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let (addr, fp) = loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .context("the coordinator did not start")?;
        if let Some(rest) = line.split("listening on ").nth(1) {
            let addr = rest.split_whitespace().next().unwrap_or_default().to_string();
            let fp = line.split("fingerprint ").nth(1).unwrap_or_default().trim().to_string();
            break (addr, fp);
        }
    };
    let tls = chaos_out.join("tls");
    let names: Vec<String> = (0..args.workers).map(|i| format!("chaos-{i}")).collect();
    for n in &names {
        pki::issue(&tls, n).map_err(anyhow::Error::msg)?;
    }
    let mut workers: Vec<Child> =
        names.iter().map(|n| spawn_worker(&worker_bin, &addr, &fp, &tls, n)).collect::<Result<_>>()?;
    let mut rng = keyed_rng(&[args.chaos_seed, 0xC4A05]);
    let mut kills = 0u64;
    // Whether each worker has joined since it was last (re)started, from the coordinator's log.
    let mut joined = vec![false; names.len()];
    let mut effective = 0u64;
    let mut next_kill = Instant::now() + Duration::from_secs_f64(args.kill_every * rng.gen_range(0.5..1.5));
    let started = Instant::now();
    let progress_file = chaos_out.join("metrics.csv");
    let (mut progress, mut last_progress) = (0u64, Instant::now());
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            if line.contains(" joined from ") {
                for (i, n) in names.iter().enumerate() {
                    joined[i] |= line.contains(&format!("({n},"));
                }
            }
        }
        if let Some(s) = coord.try_wait()? {
            break Some(s);
        }
        let rows = std::fs::metadata(&progress_file).map(|m| m.len()).unwrap_or(0);
        if rows != progress {
            (progress, last_progress) = (rows, Instant::now());
        }
        if last_progress.elapsed() > allowed {
            eprintln!(
                "chaos: no meta-step finished within {:.0}s (a task was lost, or workers killed every ~{}s cannot \
                 start and finish one); stopping it",
                allowed.as_secs_f64(),
                args.kill_every
            );
            let _ = coord.kill();
            let _ = coord.wait();
            break None;
        }
        if Instant::now() >= next_kill {
            let i = rng.gen_range(0..workers.len());
            let _ = workers[i].kill();
            let _ = workers[i].wait();
            kills += 1;
            effective += u64::from(std::mem::take(&mut joined[i]));
            eprintln!("chaos: t={:.0}s killed {} (SIGKILL), restarting it", started.elapsed().as_secs_f64(), names[i]);
            workers[i] = spawn_worker(&worker_bin, &addr, &fp, &tls, &names[i])?;
            next_kill = Instant::now() + Duration::from_secs_f64(args.kill_every * rng.gen_range(0.5..1.5));
        }
        std::thread::sleep(POLL);
    };
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    let reference = report(&out.join("reference"))?;
    let expected = tasks_needed(&reference).context("the reference report has no config")?;
    let Some(status) = status else {
        println!(
            "chaos run: {kills} workers killed ({effective} after they had joined); it stalled: no meta-step finished \
             for {:.0}s (a task was lost, or kills came faster than workers could start)",
            allowed.as_secs_f64()
        );
        bail!("chaos check failed");
    };
    if !status.success() {
        bail!("the chaos run failed ({status})");
    }
    if effective == 0 {
        bail!(
            "the chaos run finished in {:.1}s with {kills} kill(s), none of a worker that had joined, so nothing \
             was tested: {}",
            started.elapsed().as_secs_f64(),
            if kills == 0 {
                format!("lower --kill-every (now {}s) or raise --steps", args.kill_every)
            } else {
                format!("raise --kill-every (now {}s): workers need time to start", args.kill_every)
            }
        );
    }
    let chaos = report(&chaos_out)?;
    let completed = chaos["tasks_completed"].as_u64().unwrap_or(0);
    let lost = expected.saturating_sub(completed);
    let equal = reference["params_sha256"] == chaos["params_sha256"] && chaos["params_sha256"].is_string();
    println!(
        "chaos run: {kills} workers killed in {:.0}s ({effective} after they had joined)",
        started.elapsed().as_secs_f64()
    );
    println!(
        "tasks: {completed} completed of the {expected} the run needs ({lost} lost); {} reassigned, {} duplicated, {} results refused",
        chaos["tasks_reassigned"], chaos["tasks_duplicated"], chaos["results_rejected"]
    );
    println!(
        "final parameters {} the failure-free run's (params_sha256 {})",
        if equal { "EQUAL to" } else { "DIFFER from" },
        chaos["params_sha256"].as_str().unwrap_or("?")
    );
    if lost > 0 || !equal {
        bail!("chaos check failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tasks_needed_counts_steps_and_evaluations() {
        let r = serde_json::json!({"config": {"train": {"steps": 30, "meta_batch": 4},
            "eval": {"every": 10, "tasks": 7, "final_tasks": 100}}});
        // 30 × 4 training tasks, evaluations after steps 10 and 20 (30 is the final one's).
        assert_eq!(super::tasks_needed(&r), Some(120 + 2 * 7 + 100));
        let r = serde_json::json!({"config": {"train": {"steps": 5, "meta_batch": 2},
            "eval": {"every": 0, "tasks": 7, "final_tasks": 0}}});
        assert_eq!(super::tasks_needed(&r), Some(10));
        assert_eq!(super::tasks_needed(&serde_json::json!({})), None);
    }
}
