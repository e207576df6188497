//! The training loop: owns the parameters, the optimizer and the scheduler, and drives meta-steps and
//! evaluations by feeding server [`Event`]s and clock ticks to the I/O-free cores ([`crate::scheduler`],
//! [`crate::aggregate`], [`crate::optim`]).
//!
//! One meta-step: sample B specs → `start_batch` (parameters go once to each worker that gets a task) →
//! collect one validated result per task → reduce in index order, clip → Adam. Every `eval.every` steps
//! (and at the end) the same machinery runs held-out tasks in eval mode.
//!
//! The handlers of what workers send are in [`events`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metatrain_common::config::Config;
use metatrain_common::layout::{meta_init, meta_layout, ModelSpec, ParamLayout};
use metatrain_common::protocol::{Assignment, Mode, TaskId, MAX_TASKS_PER_ASSIGN};
use metatrain_common::task::TaskSpec;
use metatrain_common::tensor::encode_f32;
use thiserror::Error;
use tokio::sync::{mpsc, watch};

use metatrain_common::config::Corruption;
use metatrain_common::layout::params_sha256;

use crate::aggregate::{BatchCollector, BatchSummary, Rejection, Reorder};
use crate::checkpoint::{Checkpoint, Header, SamplerState};
use crate::curriculum::Curriculum;
use crate::defence::Window;
use crate::local::LocalWorkers;
use crate::optim::Adam;
use crate::scheduler::{Action, Scheduler, SchedulerStats, Verdict, WorkerId};
use crate::server::{Event, Outbound, Quarantine};
use crate::spill::{FileSpill, MemorySpill, SpillError};

mod events;

/// A task whose results are refused (or which fails) on this many different workers (or on two, if the
/// run has had only two) aborts the run: the failure is deterministic (diverged training, missing
/// data), and retrying forever would hang.
const MAX_TASK_FAILURES: usize = 3;
/// Malformed results after which a worker is disconnected and quarantined.
const QUARANTINE_STRIKES: u32 = 3;
/// Worker names whose strikes are remembered at once (far more than a cluster has workers).
const MAX_STRIKE_NAMES: usize = 4096;
/// Distinct worker names used as metrics label values before further ones are labelled `other`.
const MAX_WORKER_LABELS: usize = 64;
/// How long a quarantined worker's name is refused.
const QUARANTINE: Duration = Duration::from_secs(60);
/// How often deadlines and local workers are checked.
const TICK: Duration = Duration::from_millis(500);
/// Say so when a batch has waited this long without any worker.
const NO_WORKER_WARNING: Duration = Duration::from_secs(10);
/// After the first, one warning per this many gradients that could not be spilled.
const SPILL_FAILURE_LOG_EVERY: u64 = 100;

#[derive(Debug, Error)]
pub enum RunError {
    #[error("interrupted")]
    Interrupted,
    #[error("task {id} (step {step}, index {index}) failed on {workers} different workers ({reasons}); diverged? lower train.meta_lr or algo.inner_lr")]
    TaskKeepsFailing { id: TaskId, step: u64, index: u32, workers: usize, reasons: String },
    #[error("all {0} local workers exited and no other worker is connected; see their messages above{1}")]
    LocalWorkersGone(usize, String),
    #[error("the server stopped")]
    ServerGone,
    #[error("writing run output: {0}")]
    Io(String),
    #[error("meta-step {step}: {why}")]
    Diverged { step: u64, why: String },
    #[error("a gradient waiting for its turn: {0}")]
    Spill(#[from] SpillError),
}

struct WorkerEntry {
    name: String,
    outbox: mpsc::UnboundedSender<Outbound>,
    /// This connection is being closed for quarantine: its in-flight results strike no more.
    quarantined: bool,
}

/// The state of a run that the loop mutates.
pub struct Trainer {
    pub config: Config,
    pub layout: ParamLayout,
    pub params: Vec<f32>,
    adam: Adam,
    /// Competence per step ([`crate::curriculum`]).
    pub curriculum: Curriculum,
    /// Recent training tasks' statistics for outlier scoring ([`crate::defence`]).
    window: Window,
    scheduler: Scheduler,
    workers: BTreeMap<WorkerId, WorkerEntry>,
    events: mpsc::Receiver<Event>,
    local: Option<LocalWorkers>,
    next_task: TaskId,
    /// Strikes so far, by worker name (see [`Trainer::strike`]).
    strikes: HashMap<String, u32>,
    /// Distinct worker names seen, up to [`MAX_TASK_FAILURES`] (all that the failure limit needs).
    names_seen: BTreeSet<String>,
    /// Names of the workers on which each task failed or had its result refused.
    failures: HashMap<TaskId, BTreeMap<String, String>>,
    quarantine: Arc<Quarantine>,
    last_rejection: Option<String>,
    /// Worker names in use as metrics labels.
    labels: BTreeSet<String>,
    /// Scheduler counters already exported as metrics.
    exported: SchedulerStats,
    pub tasks_completed: u64,
    pub results_rejected: u64,
    pub max_workers: usize,
    /// Payload bytes this process queued to workers (parameters) and accepted from them (gradients of
    /// accepted results): what the run puts on the wire, without frame and QUIC overhead.
    pub wire: WireBytes,
    /// Reassignments counted before a resume.
    reassigned_before: u64,
    /// Dirty tasks and the defence's record (carried across resumes).
    pub defence_counts: DefenceCounts,
    /// Gradients that waited on disk rather than in memory (see `cluster.reorder_memory_mb`).
    pub gradients_spilled: u64,
    /// Gradients that should have been spilled but could not be (kept in memory).
    spill_failures: u64,
}

/// What the `[corrupt]` option did and what the defence caught, over the whole run.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DefenceCounts {
    /// Training tasks corrupted on purpose (their steps completed).
    pub tasks_corrupted: u64,
    /// Training tasks the defence quarantined.
    pub tasks_quarantined: u64,
    /// Of those, how many were corrupted ones.
    pub quarantined_corrupted: u64,
    /// Meta-steps left without an update because every task was quarantined.
    pub steps_skipped: u64,
    /// Corrupted and quarantined tasks per kind of corruption (in `Corruption::ALL` order).
    #[serde(default)]
    pub by_kind: [KindCounts; 3],
}

/// One kind of corruption's record.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct KindCounts {
    pub corrupted: u64,
    pub quarantined: u64,
}

/// Label values of `metatrain_*_loss_by_difficulty{bucket}`: five equal bins of [0, 1].
pub const DIFFICULTY_BUCKETS: [&str; 5] = ["0.0-0.2", "0.2-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0"];

fn bucket_of(difficulty: f64) -> usize {
    ((difficulty * DIFFICULTY_BUCKETS.len() as f64) as usize).min(DIFFICULTY_BUCKETS.len() - 1)
}

/// Sets `gauge{bucket}` to the mean post-adaptation loss of the summary's tasks in each bucket (buckets
/// without a task keep their last value).
fn export_loss_by_difficulty(gauge: &'static str, s: &BatchSummary) {
    let mut sums = [(0.0f64, 0usize); DIFFICULTY_BUCKETS.len()];
    for (&loss, &d) in s.task_post_loss.iter().zip(&s.task_difficulty) {
        let b = &mut sums[bucket_of(d)];
        b.0 += loss;
        b.1 += 1;
    }
    for (label, (sum, n)) in DIFFICULTY_BUCKETS.iter().zip(sums) {
        if n > 0 {
            metrics::gauge!(gauge, "bucket" => *label).set(sum / n as f64);
        }
    }
}

/// Payload bytes on the wire (see [`Trainer::wire`]); in `report.json` as `wire`.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct WireBytes {
    pub params_sent: u64,
    pub gradients_received: u64,
}

impl Trainer {
    /// A trainer for the model `config` names, with its initial parameters from (model, seed).
    pub fn new(
        config: Config,
        events: mpsc::Receiver<Event>,
        local: Option<LocalWorkers>,
        quarantine: Arc<Quarantine>,
    ) -> Self {
        let spec = ModelSpec::from_config(&config);
        let layout = meta_layout(&spec, &config.model, &config.algo);
        let params = meta_init(&spec, &config.model, &config.algo, config.seed);
        Self::with_model(config, layout, params, events, local, quarantine)
    }

    /// A trainer over parameters of a given layout instead of the model `config` names (`metatrain
    /// bench` uses synthetic layouts of sizes no model kind has). `params` must have `layout.numel()`
    /// values. Checkpoints of such a run do not resume under `config` alone (their layout differs).
    pub fn with_model(
        config: Config,
        layout: ParamLayout,
        params: Vec<f32>,
        events: mpsc::Receiver<Event>,
        local: Option<LocalWorkers>,
        quarantine: Arc<Quarantine>,
    ) -> Self {
        debug_assert_eq!(params.len(), layout.numel());
        let adam = Adam::new(&config.train, layout.numel());
        let curriculum = Curriculum::new(&config.curriculum);
        let scheduler = Scheduler::new(Duration::from_secs_f64(config.cluster.task_timeout_secs));
        Trainer {
            config,
            layout,
            params,
            adam,
            curriculum,
            window: Window::default(),
            scheduler,
            workers: BTreeMap::new(),
            events,
            local,
            next_task: 0,
            strikes: HashMap::new(),
            names_seen: BTreeSet::new(),
            failures: HashMap::new(),
            quarantine,
            last_rejection: None,
            labels: BTreeSet::new(),
            exported: SchedulerStats::default(),
            tasks_completed: 0,
            wire: WireBytes::default(),
            results_rejected: 0,
            max_workers: 0,
            reassigned_before: 0,
            defence_counts: DefenceCounts::default(),
            gradients_spilled: 0,
            spill_failures: 0,
        }
    }

    pub fn tasks_reassigned(&self) -> u64 {
        self.scheduler.stats.reassigned + self.reassigned_before
    }

    pub fn tasks_duplicated(&self) -> u64 {
        self.scheduler.stats.duplicated
    }

    /// Everything that determines the rest of the run after `step` completed meta-steps.
    pub fn snapshot(&self, step: u64) -> Checkpoint {
        let (adam_t, m, v) = self.adam.state();
        Checkpoint {
            header: Header {
                format: 1,
                config_toml: self.config.to_toml(),
                config_sha256: metatrain_common::layout::sha256_hex(self.config.to_toml().as_bytes()),
                step,
                layout_fingerprint: self.layout.fingerprint(),
                numel: self.layout.numel() as u64,
                adam_t,
                sampler: SamplerState::Keyed { seed: self.config.seed, next_step: step },
                params_sha256: params_sha256(&self.params),
                tasks_completed: self.tasks_completed,
                tasks_reassigned: self.tasks_reassigned(),
                results_rejected: self.results_rejected,
                next_task: self.next_task,
                curriculum: Some(self.curriculum.state()),
                defence_window: Some(self.window.state()),
                defence_counts: self.defence_counts,
            },
            params: self.params.clone(),
            adam_m: m.to_vec(),
            adam_v: v.to_vec(),
        }
    }

    /// Continues from a checkpoint (already checked for compatibility with this run's config).
    pub fn restore(&mut self, c: Checkpoint) -> Result<(), String> {
        if c.header.layout_fingerprint != self.layout.fingerprint() || c.params.len() != self.layout.numel() {
            return Err("the checkpoint's parameter layout differs from this config's model".into());
        }
        self.adam.restore(c.header.adam_t, c.adam_m, c.adam_v)?;
        self.params = c.params;
        self.tasks_completed = c.header.tasks_completed;
        self.reassigned_before = c.header.tasks_reassigned;
        self.results_rejected = c.header.results_rejected;
        self.next_task = c.header.next_task;
        if let Some(state) = &c.header.curriculum {
            self.curriculum.restore(state)?;
        }
        if let Some(w) = &c.header.defence_window {
            self.window = Window::restore(w)?;
        }
        self.defence_counts = c.header.defence_counts;
        Ok(())
    }

    /// One meta-step on parameter version `step`: returns the summary (mean gradient already applied).
    pub async fn train_step(
        &mut self,
        step: u64,
        specs: Vec<TaskSpec>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<BatchSummary, RunError> {
        let corrupted: Vec<Option<Corruption>> =
            specs.iter().map(|s| metatrain_common::task::corrupt::corruption(&self.config.corrupt, s)).collect();
        let summary = self.run_batch(step, specs, Mode::Train, stop).await?;
        match &summary.mean_grad {
            Some(g) => {
                self.adam.set_lr(self.config.train.meta_lr_at(step));
                self.adam.step(&mut self.params, g).map_err(|e| RunError::Diverged { step, why: e.to_string() })?
            }
            None => {
                self.defence_counts.steps_skipped += 1;
                metrics::counter!("metatrain_meta_steps_skipped_total").increment(1);
                tracing::warn!("step {step}: every task was quarantined; no update applied");
            }
        }
        self.count_defence(&summary, &corrupted);
        export_loss_by_difficulty("metatrain_meta_train_loss_by_difficulty", &summary);
        metrics::counter!("metatrain_meta_steps_total").increment(1);
        metrics::gauge!("metatrain_params_version").set((step + 1) as f64);
        metrics::gauge!("metatrain_meta_train_loss").set(summary.post_loss.mean);
        metrics::gauge!("metatrain_meta_train_pre_adapt_loss").set(summary.pre_loss.mean);
        metrics::gauge!("metatrain_meta_grad_norm").set(summary.grad_norm);
        if summary.clipped {
            metrics::counter!("metatrain_meta_grad_clipped_total").increment(1);
        }
        Ok(summary)
    }

    /// Evaluates the current parameters (version `version`) on held-out `specs`.
    pub async fn evaluate(
        &mut self,
        version: u64,
        specs: Vec<TaskSpec>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<BatchSummary, RunError> {
        let s = self.run_batch(version, specs, Mode::Eval, stop).await?;
        export_loss_by_difficulty("metatrain_meta_test_loss_by_difficulty", &s);
        metrics::gauge!("metatrain_meta_test_loss").set(s.post_loss.mean);
        metrics::gauge!("metatrain_meta_test_pre_adapt_loss").set(s.pre_loss.mean);
        if let Some(a) = s.post_accuracy {
            metrics::gauge!("metatrain_meta_test_accuracy").set(a.mean);
        }
        Ok(s)
    }

    /// Before the first meta-step: waits until `n` workers have joined, or `max_wait` has passed (then
    /// the run starts with those there, saying so; with none it waits on as every batch does). Joins,
    /// leaves and anything else a worker sends are handled as during a batch (with no task to take).
    pub async fn wait_for_workers(
        &mut self,
        n: usize,
        max_wait: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), RunError> {
        let deadline = tokio::time::Instant::now() + max_wait;
        let no_tasks = HashMap::new();
        let reorder = Reorder { memory_bytes: 0, store: Box::new(MemorySpill::refusing()) };
        let mut collector = BatchCollector::new(0, None, false, reorder);
        let mut tick = tokio::time::interval(TICK);
        while self.workers.len() < n {
            tokio::select! {
                ev = self.events.recv() => {
                    let ev = ev.ok_or(RunError::ServerGone)?;
                    // No batch has started, so the scheduler has nothing to hand out.
                    let _ = self.handle(ev, 0, Mode::Train, &no_tasks, &mut collector)?;
                }
                _ = tick.tick() => self.check_local_workers()?,
                _ = tokio::time::sleep_until(deadline) => {
                    if !self.workers.is_empty() {
                        tracing::warn!(
                            "{} of the {n} workers to wait for joined within {}s; starting with them",
                            self.workers.len(),
                            max_wait.as_secs_f64()
                        );
                    }
                    return Ok(());
                }
                _ = stop.changed() => return Err(RunError::Interrupted),
            }
        }
        Ok(())
    }

    async fn run_batch(
        &mut self,
        version: u64,
        specs: Vec<TaskSpec>,
        mode: Mode,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<BatchSummary, RunError> {
        let numel = self.layout.numel();
        let payload = Arc::new(encode_f32(&self.params));
        let assignments: Vec<Assignment> = specs
            .into_iter()
            .map(|spec| {
                self.next_task += 1;
                Assignment { id: self.next_task, version, spec, mode }
            })
            .collect();
        let by_id: HashMap<TaskId, TaskSpec> = assignments.iter().map(|a| (a.id, a.spec)).collect();
        let hold = mode == Mode::Train && self.config.defence.holds_gradients();
        let reorder = Reorder {
            memory_bytes: self.config.cluster.reorder_memory_bytes(),
            store: Box::new(FileSpill::new(&self.config.cluster.spill_folder())),
        };
        let mut collector =
            BatchCollector::new(assignments.len(), (mode == Mode::Train).then_some(numel), hold, reorder);
        let actions = self.scheduler.start_batch(version, assignments, Instant::now());
        self.dispatch(actions, version, &payload);
        let mut tick = tokio::time::interval(TICK);
        let waiting_since = Instant::now();
        let mut warned = false;
        while !collector.is_complete() {
            tokio::select! {
                ev = self.events.recv() => {
                    let ev = ev.ok_or(RunError::ServerGone)?;
                    let actions = self.handle(ev, version, mode, &by_id, &mut collector)?;
                    self.export_scheduler_stats();
                    self.dispatch(actions, version, &payload);
                }
                _ = tick.tick() => {
                    let actions = self.scheduler.tick(Instant::now());
                    self.export_scheduler_stats();
                    self.dispatch(actions, version, &payload);
                    self.check_local_workers()?;
                    if self.workers.is_empty() {
                        if !warned && waiting_since.elapsed() > NO_WORKER_WARNING {
                            warned = true;
                            tracing::warn!("no worker connected after {}s; waiting (start workers with `metatrain-worker run`)", NO_WORKER_WARNING.as_secs());
                        }
                    }
                }
                _ = stop.changed() => return Err(RunError::Interrupted),
            }
        }
        self.note_spills(&collector);
        let defence = hold.then_some((&self.config.defence, &mut self.window));
        Ok(collector.finish(self.config.train.max_grad_norm, defence)?)
    }

    /// With no worker connected and every local worker exited, nothing will ever compute a task: an
    /// error naming the last refused result, if any (it is often why they exited).
    fn check_local_workers(&mut self) -> Result<(), RunError> {
        let Some(local) = self.local.as_mut().filter(|l| !l.is_empty()) else { return Ok(()) };
        if self.workers.is_empty() && local.alive() == 0 {
            let why = self.last_rejection.as_ref().map(|r| format!(" (last refused result: {r})"));
            return Err(RunError::LocalWorkersGone(local.count(), why.unwrap_or_default()));
        }
        Ok(())
    }

    /// Says that a gradient could not be spilled (it stays in memory): the first time, then every
    /// [`SPILL_FAILURE_LOG_EVERY`]th, so a folder that fills up does not flood the log.
    fn note_spill_failure(&mut self, e: &SpillError) {
        self.spill_failures += 1;
        if self.spill_failures == 1 || self.spill_failures.is_multiple_of(SPILL_FAILURE_LOG_EVERY) {
            tracing::warn!(
                "could not spill a waiting gradient, keeping it in memory ({} so far this run): {e}",
                self.spill_failures
            );
        }
    }

    /// Counts the gradients a finished batch spilled, and says the first time a run spills at all.
    fn note_spills(&mut self, collector: &BatchCollector) {
        let n = collector.spilled() as u64;
        if n > 0 && self.gradients_spilled == 0 {
            tracing::info!(
                "gradients waiting for their turn in the reduction exceeded cluster.reorder_memory_mb ({} MB); the rest wait in {}",
                self.config.cluster.reorder_memory_mb,
                self.config.cluster.spill_folder().display()
            );
        }
        self.gradients_spilled += n;
        metrics::counter!("metatrain_gradients_spilled_total").increment(n);
    }

    /// Counts corrupted and quarantined tasks of a finished training step.
    fn count_defence(&mut self, s: &BatchSummary, corrupted: &[Option<Corruption>]) {
        let c = &mut self.defence_counts;
        let n_corrupted = corrupted.iter().flatten().count() as u64;
        c.tasks_corrupted += n_corrupted;
        for kind in corrupted.iter().flatten() {
            c.by_kind[kind.index()].corrupted += 1;
        }
        metrics::counter!("metatrain_tasks_corrupted_total").increment(n_corrupted);
        for (score, dirty) in s.scores.iter().zip(corrupted) {
            let Some(reason) = score.quarantined else { continue };
            c.tasks_quarantined += 1;
            if let Some(kind) = dirty {
                c.quarantined_corrupted += 1;
                c.by_kind[kind.index()].quarantined += 1;
            }
            let dirty = if dirty.is_some() { "true" } else { "false" };
            metrics::counter!("metatrain_tasks_quarantined_total", "reason" => reason.label(), "corrupted" => dirty)
                .increment(1);
        }
    }

    /// Exports the scheduler's counters as they grew since the last call.
    fn export_scheduler_stats(&mut self) {
        let now = self.scheduler.stats;
        metrics::counter!("metatrain_tasks_reassigned_total").increment(now.reassigned - self.exported.reassigned);
        metrics::counter!("metatrain_tasks_duplicated_total").increment(now.duplicated - self.exported.duplicated);
        self.exported = now;
    }

    fn dispatch(&mut self, actions: Vec<Action>, version: u64, payload: &Arc<Vec<u8>>) {
        let len = self.layout.numel() as u64;
        for action in actions {
            let (worker, msg) = match action {
                Action::SendParams { worker, version: v } => {
                    debug_assert_eq!(v, version);
                    self.wire.params_sent += payload.len() as u64;
                    (worker, Outbound::Params { version: v, len, payload: payload.clone() })
                }
                Action::Assign { worker, tasks } => {
                    // The protocol caps one Assign; a worker with many slots gets several.
                    if let Some(w) = self.workers.get(&worker) {
                        for chunk in tasks.chunks(MAX_TASKS_PER_ASSIGN) {
                            let _ = w.outbox.send(Outbound::Assign(chunk.to_vec()));
                        }
                    }
                    continue;
                }
            };
            if let Some(w) = self.workers.get(&worker) {
                // A closed outbox means the connection is ending; its Left event requeues the tasks.
                let _ = w.outbox.send(msg);
            }
        }
    }

    /// Tells every worker the run is over and waits (briefly) for them to disconnect.
    pub async fn shutdown_workers(&mut self, reason: &str) {
        for w in self.workers.values() {
            let _ = w.outbox.send(Outbound::Shutdown(reason.to_string()));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !self.workers.is_empty() {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(Event::Left { worker, .. })) => {
                    self.workers.remove(&worker);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        metrics::gauge!("metatrain_workers_connected").set(self.workers.len() as f64);
        if let Some(local) = self.local.take() {
            local.stop().await;
        }
    }
}
