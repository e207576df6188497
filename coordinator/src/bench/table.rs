//! The printed table (one row per case, printed as each finishes) and the `--json` lines.

use serde_json::json;

use super::case::Outcome;
use super::plan::{Case, Skip};

/// Bytes per megabyte in the table (decimal, as network rates are usually given).
const MB: f64 = 1e6;

pub fn header() -> String {
    format!(
        "{:>6} {:>7} {:>6} {:>5} {:>8} {:>9} {:>9} {:>9} {:>6} {:>10} {:>6} {:>10} {:>6} {:>7} {:>5} {:>5} {:>7}",
        "layout",
        "workers",
        "tasks",
        "steps",
        "step/s",
        "results/s",
        "agg MB/s",
        "sum MB/s",
        "×sum",
        "sent MB/st",
        "×ideal",
        "recv MB/st",
        "×ideal",
        "drops",
        "coord",
        "sim",
        "peak GB"
    )
}

pub fn row(o: &Outcome) -> String {
    let c = &o.case;
    let agg = o.aggregation_bytes_per_second();
    format!(
        "{:>6} {:>7} {:>6} {:>5} {:>8} {:>9} {:>9.1} {:>9.1} {:>6.3} {:>10.3} {:>6.3} {:>10.3} {:>6.3} {:>7} {:>5.2} {:>5.2} {:>7}",
        c.size.to_string(),
        c.workers,
        c.meta_batch(),
        o.steps,
        sig(o.steps_per_second()),
        sig(o.results_per_second()),
        agg / MB,
        o.baseline_bytes_per_second / MB,
        agg / o.baseline_bytes_per_second,
        o.sent_per_step() / MB,
        o.sent_per_step() / c.ideal_sent_per_step() as f64,
        o.received_per_step() / MB,
        o.received_per_step() / c.ideal_received_per_step() as f64,
        o.kernel_drops.map_or("-".to_string(), |d| d.to_string()),
        o.coordinator_cpu_seconds / o.wall_seconds,
        o.workers_cpu_seconds / o.wall_seconds,
        o.peak_rss_bytes.map_or("-".to_string(), |b| format!("{:.2}", b as f64 / 1e9)),
    )
}

/// Three significant digits without exponent noise (0.123, 12.3, 1234).
fn sig(v: f64) -> String {
    match v {
        _ if !v.is_finite() => "-".into(),
        _ if v >= 100.0 => format!("{v:.0}"),
        _ if v >= 10.0 => format!("{v:.1}"),
        _ if v >= 1.0 => format!("{v:.2}"),
        _ => format!("{v:.3}"),
    }
}

/// Anything unusual about a case worth a line under the table (reassignments, duplicates, refusals).
pub fn remarks(o: &Outcome) -> Option<String> {
    let mut notes = Vec::new();
    if o.tasks_duplicated > 0 {
        notes.push(format!("{} straggler duplicates", o.tasks_duplicated));
    }
    if o.tasks_reassigned > 0 {
        notes.push(format!("{} tasks reassigned", o.tasks_reassigned));
    }
    if o.gradients_spilled > 0 {
        notes.push(format!("{} gradients waited on disk (--reorder-memory-mb)", o.gradients_spilled));
    }
    if o.results_rejected > 0 {
        notes.push(format!("{} results refused (duplicates included)", o.results_rejected));
    }
    if let Some(d) = o.worker_kernel_drops.filter(|&d| d > 0) {
        notes.push(format!("{d} datagrams dropped at the simulated workers' sockets"));
    }
    if !o.params_finite {
        notes.push("non-finite parameters after the last update".into());
    }
    (!notes.is_empty()).then(|| format!("{} × {} workers: {}", o.case.size, o.case.workers, notes.join(", ")))
}

pub fn json(o: &Outcome) -> serde_json::Value {
    let c = &o.case;
    let steps = o.steps as f64;
    json!({
        "layout": c.size.to_string(),
        "params": c.numel(),
        "workers": c.workers,
        "tasks_per_step": c.meta_batch(),
        "warmup_steps": c.warmup,
        "steps": o.steps,
        "join_seconds": o.join_seconds,
        "wall_seconds": o.wall_seconds,
        "meta_steps_per_second": o.steps_per_second(),
        "results_per_second": o.results_per_second(),
        "aggregation_bytes_per_second": o.aggregation_bytes_per_second(),
        "baseline_f32_sum_bytes_per_second": o.baseline_bytes_per_second,
        "aggregation_vs_baseline": o.aggregation_bytes_per_second() / o.baseline_bytes_per_second,
        "sent_bytes_per_step": o.sent_per_step(),
        "received_bytes_per_step": o.received_per_step(),
        "ideal_sent_bytes_per_step": c.ideal_sent_per_step(),
        "ideal_received_bytes_per_step": c.ideal_received_per_step(),
        "sent_vs_ideal": o.sent_per_step() / c.ideal_sent_per_step() as f64,
        "received_vs_ideal": o.received_per_step() / c.ideal_received_per_step() as f64,
        "kernel_drops": o.kernel_drops,
        "worker_kernel_drops": o.worker_kernel_drops,
        "frame_bytes_sent_per_step": o.frames.frame_bytes_in as f64 / steps,
        "frame_bytes_received_per_step": o.frames.frame_bytes_out as f64 / steps,
        "params_frames_per_step": o.frames.params_frames as f64 / steps,
        "coordinator_cpu_seconds_per_step": o.coordinator_cpu_seconds / steps,
        "workers_cpu_seconds_per_step": o.workers_cpu_seconds / steps,
        "tasks_accepted": o.tasks_accepted,
        "tasks_duplicated": o.tasks_duplicated,
        "tasks_reassigned": o.tasks_reassigned,
        "gradients_spilled": o.gradients_spilled,
        "results_rejected": o.results_rejected,
        "params_finite": o.params_finite,
        "peak_rss_bytes": o.peak_rss_bytes,
    })
}

pub fn skipped_line(c: &Case, why: &Skip) -> String {
    format!("{} × {} workers ({} tasks/step): {why}", c.size, c.workers, c.meta_batch())
}

pub fn skipped_json(c: &Case, why: &Skip) -> serde_json::Value {
    json!({
        "layout": c.size.to_string(),
        "params": c.numel(),
        "workers": c.workers,
        "tasks_per_step": c.meta_batch(),
        "skipped": why.to_string(),
    })
}

/// What the columns mean (printed under the table).
pub const LEGEND: &str = "\
columns: tasks = meta-batch (workers × --tasks-per-worker); step/s = meta-steps per second; results/s = task
  results accepted per second; agg MB/s = gradient bytes accepted and reduced per second; sum MB/s = the
  baseline, a plain in-memory f32 sum of the same meta-batch on one thread; ×sum = agg / sum; sent/recv MB/st =
  UDP payload bytes through the coordinator's socket per meta-step (QUIC headers, encryption, ACKs included);
  ×ideal = that over the parameters once per worker (sent) or one gradient per task (recv); drops = datagrams
  the kernel dropped at the coordinator's socket (receive buffer full; QUIC resends them after a loss timer);
  coord / sim = CPU cores busy in the coordinator's / the simulated workers' runtime (they share the cores);
  peak GB = the process's peak resident set during the case (coordinator and simulated workers together).";
