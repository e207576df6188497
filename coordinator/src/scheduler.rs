//! Who computes which task: an I/O-free state machine fed with events and the current time.
//!
//! The coordinator starts a *batch* (a meta-step's tasks, or an evaluation's) for one parameter version;
//! the scheduler answers with [`Action`]s: send parameters to a worker (once per worker per version),
//! assign tasks to it (up to its in-flight limit, lowest task index first). Workers join and leave at any
//! time; a leaving worker's tasks go back to the queue, and so do tasks whose deadline passes. When the
//! queue is empty and a batch waits only on slow tasks, a worker with a free slot gets a *duplicate* of
//! the oldest straggler (at most [`MAX_COPIES`] copies run at once). A result is accepted once per task,
//! from whichever worker returns it first, only from a worker that was given the task, and only for the
//! version and mode it was assigned in; everything else gets a [`Verdict`] saying why it was dropped.
//! A task whose copy failed (or was refused) on a worker goes to another worker when one is connected.
//! A worker *retired* by a newer connection under its name (a restarted process whose old connection
//! has not timed out) gets nothing more, and the tasks it runs are queued again at once.
//!
//! A worker's in-flight slots are truthful: a slot stays taken until that worker returns the task (or
//! leaves), even if the task was meanwhile reassigned or finished elsewhere. So a stalled worker is not
//! handed more work, and a task never goes back to the worker it expired on while that worker holds it.
//!
//! Nothing here reads a clock or a socket, so tests drive it by hand (see the tests below).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use metatrain_common::protocol::{Assignment, Mode, TaskId};

pub type WorkerId = u64;

/// Most workers computing the same task at once (the original plus one duplicate).
pub const MAX_COPIES: usize = 2;
/// A running task counts as a straggler once it is older than this many times the typical task latency.
const STRAGGLER_FACTOR: f64 = 3.0;
/// ... and at least this old (so that microsecond tasks are not duplicated on noise).
const STRAGGLER_MIN: Duration = Duration::from_millis(200);
/// Weight of the newest sample in the latency moving average.
const LATENCY_EWMA: f64 = 0.1;
/// Before any latency is known (no result yet in this run), a task counts as a straggler once it has
/// run this fraction of the task timeout: a silent worker that took tasks first does not stall the
/// batch for the whole timeout while other workers idle.
const NO_ESTIMATE_FRACTION: f64 = 0.25;

/// What the caller must do, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    /// Send parameters of `version` to `worker` (before the assignments that follow).
    SendParams {
        worker: WorkerId,
        version: u64,
    },
    Assign {
        worker: WorkerId,
        tasks: Vec<Assignment>,
    },
}

/// The fate of an incoming result.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// First result for this task in the current batch; `index` is its position in the batch.
    Accepted { index: usize },
    /// A result for a task that already has one (a late original after a reassignment or a duplicate).
    Duplicate,
    /// A task from an earlier batch that this worker was given and returns late (benign).
    Stale,
    /// The sender was never given this task (or already returned it): a forged or replayed result.
    NotAssigned,
    /// The sender was given this task, but the result claims another version or mode than the
    /// assignment's: malformed. The worker's copy is dropped (and the task requeued if nobody else runs it).
    Mismatch,
}

#[derive(Debug)]
struct Worker {
    limit: usize,
    /// Tasks held, with when each was assigned to this worker.
    in_flight: BTreeMap<TaskId, Instant>,
    version: Option<u64>,
    /// Superseded by a newer connection under its name: no new tasks or copies.
    retired: bool,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum TaskState {
    /// In the queue (possibly still held by a worker it expired on).
    Pending,
    /// Assigned; reassigned if no result comes by `deadline`.
    Running {
        started: Instant,
        deadline: Instant,
    },
    Done,
}

#[derive(Debug)]
struct Task {
    index: usize,
    assignment: Assignment,
    state: TaskState,
    /// Workers currently computing it (their slots are taken).
    holders: BTreeSet<WorkerId>,
    /// When it was first assigned in this batch (for latency).
    first_assigned: Option<Instant>,
    /// Copies started (a latency sample is taken only from tasks that ran once, so that rescued
    /// stragglers do not inflate the estimate).
    copies: u32,
    /// Workers whose copy failed or was refused; the task goes to them again only if no other worker
    /// is connected.
    failed_on: BTreeSet<WorkerId>,
}

/// Counters the caller exports as metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Tasks put back in the queue because their worker left, their deadline passed, or their result
    /// was refused.
    pub reassigned: u64,
    /// Duplicate copies of stragglers handed to idle workers.
    pub duplicated: u64,
}

#[derive(Debug)]
pub struct Scheduler {
    timeout: Duration,
    workers: BTreeMap<WorkerId, Worker>,
    version: u64,
    tasks: BTreeMap<TaskId, Task>,
    /// Pending tasks by batch index (so requeued tasks run before later ones).
    queue: BTreeMap<usize, TaskId>,
    remaining: usize,
    /// Moving average of assignment-to-result latency, seconds.
    latency: Option<f64>,
    pub stats: SchedulerStats,
}

impl Scheduler {
    /// `timeout`: how long a worker may hold a task before it is reassigned.
    pub fn new(timeout: Duration) -> Self {
        Scheduler {
            timeout,
            workers: BTreeMap::new(),
            version: 0,
            tasks: BTreeMap::new(),
            queue: BTreeMap::new(),
            remaining: 0,
            latency: None,
            stats: SchedulerStats::default(),
        }
    }

    /// A worker that may hold `limit` tasks at once joined.
    pub fn worker_joined(&mut self, worker: WorkerId, limit: usize, now: Instant) -> Vec<Action> {
        let w = Worker { limit: limit.max(1), in_flight: BTreeMap::new(), version: None, retired: false };
        self.workers.insert(worker, w);
        self.fill(now)
    }

    /// `worker` was superseded by a newer connection under its name: almost surely a process that died
    /// (SIGKILL, a lost machine) and restarted before QUIC's idle timeout closed its old connection. It
    /// gets no more tasks or copies, and every task it runs that no other active worker runs is queued
    /// again now rather than at its deadline. It stays their holder, so a late answer is still accepted.
    pub fn worker_retired(&mut self, worker: WorkerId, now: Instant) -> Vec<Action> {
        let Some(w) = self.workers.get_mut(&worker) else { return Vec::new() };
        w.retired = true;
        let held: Vec<TaskId> = w.in_flight.keys().copied().collect();
        for id in held {
            let covered = self.tasks.get(&id).is_some_and(|t| {
                t.holders.iter().any(|h| *h != worker && self.workers.get(h).is_some_and(|o| !o.retired))
            });
            if !covered {
                self.requeue(id);
            }
        }
        self.fill(now)
    }

    /// A worker left (closed, crashed, timed out): tasks only it was computing go back to the queue.
    pub fn worker_left(&mut self, worker: WorkerId, now: Instant) -> Vec<Action> {
        if let Some(w) = self.workers.remove(&worker) {
            for id in w.in_flight.into_keys() {
                self.release(worker, id);
            }
        }
        self.fill(now)
    }

    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// Starts a batch of tasks, all on parameter `version`. Replaces any unfinished batch.
    pub fn start_batch(&mut self, version: u64, assignments: Vec<Assignment>, now: Instant) -> Vec<Action> {
        self.version = version;
        self.tasks.clear();
        self.queue.clear();
        self.remaining = assignments.len();
        // Workers' in-flight sets are kept: a slow worker still holds the tasks it has not returned
        // (their stale results free the slots), so it is not handed more than it can take.
        for (index, assignment) in assignments.into_iter().enumerate() {
            self.queue.insert(index, assignment.id);
            let task = Task {
                index,
                assignment,
                state: TaskState::Pending,
                holders: BTreeSet::new(),
                first_assigned: None,
                copies: 0,
                failed_on: BTreeSet::new(),
            };
            self.tasks.insert(task.assignment.id, task);
        }
        self.fill(now)
    }

    /// Whether every task of the current batch has an accepted result.
    pub fn batch_done(&self) -> bool {
        self.remaining == 0
    }

    /// Whether `worker` was given `task` and has not returned it (its slot is taken).
    pub fn holds(&self, worker: WorkerId, task: TaskId) -> bool {
        self.workers.get(&worker).is_some_and(|w| w.in_flight.contains_key(&task))
    }

    /// Whether `task` belongs to the current batch.
    pub fn in_batch(&self, task: TaskId) -> bool {
        self.tasks.contains_key(&task)
    }

    /// A valid result for `task`, computed on `version` in `mode`, arrived from `worker`.
    pub fn result(
        &mut self,
        worker: WorkerId,
        task: TaskId,
        version: u64,
        mode: Mode,
        now: Instant,
    ) -> (Verdict, Vec<Action>) {
        let held = self.workers.get_mut(&worker).is_some_and(|w| w.in_flight.remove(&task).is_some());
        if !held {
            return (Verdict::NotAssigned, Vec::new());
        }
        let mismatch =
            self.tasks.get(&task).is_some_and(|t| t.assignment.version != version || t.assignment.mode != mode);
        if mismatch {
            return (Verdict::Mismatch, self.retry(worker, task, now));
        }
        let verdict = match self.tasks.get_mut(&task) {
            None => Verdict::Stale,
            Some(t) => {
                t.holders.remove(&worker);
                if t.state == TaskState::Done {
                    Verdict::Duplicate
                } else {
                    if t.state == TaskState::Pending {
                        self.queue.remove(&t.index);
                    }
                    t.state = TaskState::Done;
                    self.remaining -= 1;
                    if let (Some(at), 1) = (t.first_assigned, t.copies) {
                        let sample = now.saturating_duration_since(at).as_secs_f64();
                        self.latency = Some(match self.latency {
                            Some(l) => l + LATENCY_EWMA * (sample - l),
                            None => sample,
                        });
                    }
                    Verdict::Accepted { index: t.index }
                }
            }
        };
        (verdict, self.fill(now))
    }

    /// `worker`'s copy of `task` cannot be used (it failed there, or its result was refused): the worker's
    /// slot is freed and, unless another worker still computes it, the task is queued again.
    pub fn retry(&mut self, worker: WorkerId, task: TaskId, now: Instant) -> Vec<Action> {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.in_flight.remove(&task);
        }
        if let Some(t) = self.tasks.get_mut(&task) {
            t.failed_on.insert(worker);
        }
        self.release(worker, task);
        self.fill(now)
    }

    /// Reassigns tasks whose deadline has passed, then duplicates stragglers onto idle workers.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let expired: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| matches!(t.state, TaskState::Running { deadline, .. } if deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            // The slow worker keeps its slot and stays a holder: it may still answer first.
            self.requeue(id);
        }
        let mut actions = self.fill(now);
        actions.extend(self.duplicate_stragglers(now));
        actions
    }

    /// `worker` no longer computes `id`: drop it from the holders; requeue if nobody else does.
    fn release(&mut self, worker: WorkerId, id: TaskId) {
        let requeue = match self.tasks.get_mut(&id) {
            Some(t) => {
                t.holders.remove(&worker);
                matches!(t.state, TaskState::Running { .. }) && t.holders.is_empty()
            }
            None => false,
        };
        if requeue {
            self.requeue(id);
        }
    }

    fn requeue(&mut self, id: TaskId) {
        if let Some(t) = self.tasks.get_mut(&id) {
            if matches!(t.state, TaskState::Running { .. }) {
                t.state = TaskState::Pending;
                self.queue.insert(t.index, id);
                self.stats.reassigned += 1;
            }
        }
    }

    /// Hands pending tasks to workers with room, lowest task index first. The queue is shared out in
    /// proportion to each worker's free slots (rounded up, lowest worker id first), not poured into the
    /// first worker until it is full: a worker computes the tasks it holds as one batch, so a meta-batch
    /// smaller than one worker's room must still spread over every worker. A worker holding a straggler
    /// gets nothing while some worker does not ([`Self::suspects`]). A worker never gets a task it is
    /// still holding, nor one that failed on it while another worker could take it.
    fn fill(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        let connected: Vec<WorkerId> = self.workers.iter().filter(|(_, w)| !w.retired).map(|(&id, _)| id).collect();
        let mut suspects = self.suspects(now);
        if suspects.len() == connected.len() {
            suspects.clear(); // nobody looks healthy: use everyone
        }
        let free_of = |wid: &WorkerId, w: &Worker| {
            if w.retired || suspects.contains(wid) {
                0
            } else {
                w.limit.saturating_sub(w.in_flight.len())
            }
        };
        let mut free_total: usize = self.workers.iter().map(|(wid, w)| free_of(wid, w)).sum();
        let mut pending = self.queue.len();
        for (&wid, w) in self.workers.iter_mut() {
            let free = free_of(&wid, w);
            if free == 0 || free_total == 0 {
                continue;
            }
            let share = (pending * free).div_ceil(free_total).min(free);
            free_total -= free;
            let mut batch = Vec::new();
            let mut skipped = Vec::new();
            while batch.len() < share {
                let Some((index, id)) = self.queue.pop_first() else { break };
                let Some(t) = self.tasks.get_mut(&id) else { continue };
                let failed_here = t.failed_on.contains(&wid) && connected.iter().any(|c| !t.failed_on.contains(c));
                if t.holders.contains(&wid) || failed_here {
                    skipped.push((index, id));
                    continue;
                }
                t.state = TaskState::Running { started: now, deadline: now + self.timeout };
                t.first_assigned.get_or_insert(now);
                t.copies += 1;
                t.holders.insert(wid);
                w.in_flight.insert(id, now);
                batch.push(t.assignment.clone());
            }
            self.queue.extend(skipped);
            pending = pending.saturating_sub(batch.len());
            push_assign(&mut actions, wid, w, self.version, batch);
        }
        actions
    }

    /// With the queue empty, gives each worker with a free slot a copy of the oldest straggler it does not
    /// already hold. Suspects ([`Self::suspects`]) get no copies while some worker is not one: a copy on a
    /// probably dead worker would only use up one of the task's [`MAX_COPIES`].
    fn duplicate_stragglers(&mut self, now: Instant) -> Vec<Action> {
        if !self.queue.is_empty() {
            return Vec::new();
        }
        let threshold = self.straggler_threshold();
        let mut suspects = self.suspects(now);
        if suspects.len() == self.workers.values().filter(|w| !w.retired).count() {
            suspects.clear(); // nobody looks healthy: use everyone
        }
        let mut actions = Vec::new();
        for (&wid, w) in self.workers.iter_mut() {
            let free = w.limit.saturating_sub(w.in_flight.len());
            if free == 0 || w.retired || suspects.contains(&wid) {
                continue;
            }
            // Oldest first, as many as the worker has room for: it computes them as one batch.
            let mut stragglers: Vec<(Instant, TaskId)> = self
                .tasks
                .iter()
                .filter(|(_, t)| {
                    t.holders.len() < MAX_COPIES && !t.holders.contains(&wid) && !t.failed_on.contains(&wid)
                })
                .filter_map(|(id, t)| match t.state {
                    TaskState::Running { started, .. } if now.saturating_duration_since(started) >= threshold => {
                        Some((started, *id))
                    }
                    _ => None,
                })
                .collect();
            stragglers.sort();
            let mut batch = Vec::new();
            for (_, id) in stragglers.into_iter().take(free) {
                let Some(t) = self.tasks.get_mut(&id) else { continue };
                t.holders.insert(wid);
                t.copies += 1;
                w.in_flight.insert(id, now);
                self.stats.duplicated += 1;
                batch.push(t.assignment.clone());
            }
            push_assign(&mut actions, wid, w, self.version, batch);
        }
        actions
    }

    /// How long a task may run before it counts as a straggler.
    fn straggler_threshold(&self) -> Duration {
        match self.latency {
            Some(latency) => Duration::from_secs_f64(STRAGGLER_FACTOR * latency).max(STRAGGLER_MIN),
            None => self.timeout.mul_f64(NO_ESTIMATE_FRACTION).max(STRAGGLER_MIN),
        }
    }

    /// Workers holding a task (of this step or an earlier one) for longer than a straggler may run:
    /// probably dead (a killed worker's connection lingers until QUIC's idle timeout) or overloaded, so
    /// they get no new tasks while another worker can take them.
    fn suspects(&self, now: Instant) -> BTreeSet<WorkerId> {
        let threshold = self.straggler_threshold();
        self.workers
            .iter()
            .filter(|(_, w)| !w.retired)
            .filter(|(_, w)| w.in_flight.values().any(|&at| now.saturating_duration_since(at) >= threshold))
            .map(|(&wid, _)| wid)
            .collect()
    }
}

/// Appends `SendParams` (if the worker lacks `version`) and `Assign` for a non-empty batch.
fn push_assign(actions: &mut Vec<Action>, wid: WorkerId, w: &mut Worker, version: u64, batch: Vec<Assignment>) {
    if batch.is_empty() {
        return;
    }
    if w.version != Some(version) {
        w.version = Some(version);
        actions.push(Action::SendParams { worker: wid, version });
    }
    actions.push(Action::Assign { worker: wid, tasks: batch });
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
