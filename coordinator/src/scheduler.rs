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
        self.workers.insert(worker, Worker { limit: limit.max(1), in_flight: BTreeMap::new(), version: None });
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
        let connected: Vec<WorkerId> = self.workers.keys().copied().collect();
        let mut suspects = self.suspects(now);
        if suspects.len() == self.workers.len() {
            suspects.clear(); // nobody looks healthy: use everyone
        }
        let free_of = |wid: &WorkerId, w: &Worker| {
            if suspects.contains(wid) {
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
        if suspects.len() == self.workers.len() {
            suspects.clear(); // nobody looks healthy: use everyone
        }
        let mut actions = Vec::new();
        for (&wid, w) in self.workers.iter_mut() {
            let free = w.limit.saturating_sub(w.in_flight.len());
            if free == 0 || suspects.contains(&wid) {
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
mod tests {
    use super::*;
    use metatrain_common::protocol::Mode;
    use metatrain_common::task::{Split, TaskSpec};

    fn batch(version: u64, n: usize, first_id: u64) -> Vec<Assignment> {
        (0..n)
            .map(|i| Assignment {
                id: first_id + i as u64,
                version,
                spec: TaskSpec::new(0, Split::Train, version, i as u32),
                mode: Mode::Train,
            })
            .collect()
    }

    fn assigned(actions: &[Action], worker: WorkerId) -> Vec<TaskId> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Assign { worker: w, tasks } if *w == worker => Some(tasks.iter().map(|t| t.id)),
                _ => None,
            })
            .flatten()
            .collect()
    }

    fn params_sent(actions: &[Action]) -> usize {
        actions.iter().filter(|a| matches!(a, Action::SendParams { .. })).count()
    }

    #[test]
    fn parameters_once_per_worker_per_version_and_limits_respected() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10));
        s.worker_joined(1, 2, t0);
        s.worker_joined(2, 2, t0);
        let a = s.start_batch(0, batch(0, 5, 100), t0);
        assert_eq!(params_sent(&a), 2);
        assert_eq!(assigned(&a, 1), vec![100, 101]);
        assert_eq!(assigned(&a, 2), vec![102, 103]);
        let (v, a) = s.result(1, 100, 0, Mode::Train, t0);
        assert_eq!(v, Verdict::Accepted { index: 0 });
        assert_eq!(params_sent(&a), 0, "worker 1 already has version 0");
        assert_eq!(assigned(&a, 1), vec![104]);
        for id in [101, 102, 103, 104] {
            let w = if id == 102 || id == 103 { 2 } else { 1 };
            assert!(matches!(s.result(w, id, 0, Mode::Train, t0).0, Verdict::Accepted { .. }));
        }
        assert!(s.batch_done());
        let a = s.start_batch(1, batch(1, 4, 200), t0);
        assert_eq!(params_sent(&a), 2, "new version goes to each worker once");
        assert_eq!(assigned(&a, 1), vec![200, 201]);
    }

    #[test]
    fn a_lost_worker_loses_no_task() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10));
        s.worker_joined(1, 2, t0);
        s.worker_joined(2, 2, t0);
        s.start_batch(0, batch(0, 4, 0), t0);
        let a = s.worker_left(1, t0);
        assert!(assigned(&a, 2).is_empty(), "worker 2 is full");
        assert_eq!(s.stats.reassigned, 2);
        // As worker 2 frees slots it receives worker 1's tasks, in index order.
        let (_, a) = s.result(2, 2, 0, Mode::Train, t0);
        assert_eq!(assigned(&a, 2), vec![0]);
        let (_, a) = s.result(2, 3, 0, Mode::Train, t0);
        assert_eq!(assigned(&a, 2), vec![1]);
        s.result(2, 0, 0, Mode::Train, t0);
        assert!(!s.batch_done());
        s.result(2, 1, 0, Mode::Train, t0);
        assert!(s.batch_done());
    }

    #[test]
    fn requeued_tasks_go_to_the_next_free_worker() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(10));
        s.worker_joined(1, 1, t0);
        s.worker_joined(2, 1, t0);
        s.start_batch(0, batch(0, 3, 0), t0);
        s.worker_left(1, t0);
        let (_, a) = s.result(2, 1, 0, Mode::Train, t0);
        assert_eq!(assigned(&a, 2), vec![0], "task 0 (lower index) before task 2");
        let (_, a) = s.result(2, 0, 0, Mode::Train, t0);
        assert_eq!(assigned(&a, 2), vec![2]);
        s.result(2, 2, 0, Mode::Train, t0);
        assert!(s.batch_done());
    }

    #[test]
    fn deadlines_reassign_and_first_result_wins() {
        let t0 = Instant::now();
        let s_ = Duration::from_secs;
        let mut s = Scheduler::new(s_(5));
        s.worker_joined(1, 1, t0);
        s.start_batch(0, batch(0, 1, 7), t0);
        s.worker_joined(2, 1, t0);
        // No latency known yet: after a quarter of the timeout the idle worker 2 runs a copy.
        assert!(s.tick(t0 + s_(1)).is_empty());
        assert_eq!(assigned(&s.tick(t0 + s_(2)), 2), vec![7]);
        // Two copies run: a third worker gets nothing until the deadline passes.
        s.worker_joined(3, 1, t0 + s_(3));
        assert!(s.tick(t0 + s_(4)).is_empty());
        let a = s.tick(t0 + s_(6));
        assert_eq!(assigned(&a, 3), vec![7], "expired task goes to the idle worker");
        assert_eq!(s.stats.reassigned, 1);
        // The slow original answers first: accepted; the other copies are then duplicates.
        assert_eq!(s.result(1, 7, 0, Mode::Train, t0).0, Verdict::Accepted { index: 0 });
        assert_eq!(s.result(2, 7, 0, Mode::Train, t0).0, Verdict::Duplicate);
        assert_eq!(s.result(3, 7, 0, Mode::Train, t0).0, Verdict::Duplicate);
        assert!(s.batch_done());
    }

    #[test]
    fn a_stalled_worker_gets_no_new_work() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(5));
        s.worker_joined(1, 1, t0);
        s.worker_joined(2, 1, t0);
        s.start_batch(0, batch(0, 3, 0), t0);
        // Worker 1 stalls on task 0; worker 2 finishes task 1 and gets task 2.
        let (_, a) = s.result(2, 1, 0, Mode::Train, t0);
        assert_eq!(assigned(&a, 2), vec![2]);
        s.result(2, 2, 0, Mode::Train, t0);
        // Task 0 expires: it goes to worker 2, not back to the stalled worker 1.
        let a = s.tick(t0 + Duration::from_secs(6));
        assert_eq!(assigned(&a, 2), vec![0]);
        assert!(assigned(&a, 1).is_empty());
        s.result(2, 0, 0, Mode::Train, t0);
        assert!(s.batch_done());
        // Next batch: worker 1 still holds its unreturned task, so everything goes to worker 2.
        let a = s.start_batch(1, batch(1, 2, 10), t0);
        assert!(assigned(&a, 1).is_empty());
        assert_eq!(assigned(&a, 2), vec![10]);
        // When worker 1's stale result finally arrives, its slot is free again.
        let (v, a) = s.result(1, 0, 0, Mode::Train, t0);
        assert_eq!(v, Verdict::Stale);
        assert_eq!(assigned(&a, 1), vec![11]);
    }

    #[test]
    fn results_are_taken_only_from_the_worker_given_the_task_in_its_version_and_mode() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(5));
        s.worker_joined(1, 4, t0);
        s.start_batch(3, batch(3, 2, 0), t0);
        s.worker_joined(2, 4, t0);
        // Worker 2 was given nothing: a result from it is refused and changes nothing.
        assert_eq!(s.result(2, 1, 3, Mode::Train, t0).0, Verdict::NotAssigned);
        assert_eq!(s.result(1, 55, 3, Mode::Train, t0).0, Verdict::NotAssigned);
        assert!(s.holds(1, 1), "worker 1 still computes task 1");
        // Worker 1 claims the wrong version, then the wrong mode: its copy is dropped and the tasks go to
        // the other worker.
        let (v, a) = s.result(1, 0, 2, Mode::Train, t0);
        assert_eq!(v, Verdict::Mismatch);
        assert_eq!(assigned(&a, 2), vec![0]);
        let (v, a) = s.result(1, 1, 3, Mode::Eval, t0);
        assert_eq!(v, Verdict::Mismatch);
        assert_eq!(assigned(&a, 2), vec![1]);
        // A result already returned cannot be replayed.
        assert!(matches!(s.result(2, 0, 3, Mode::Train, t0).0, Verdict::Accepted { .. }));
        assert_eq!(s.result(2, 0, 3, Mode::Train, t0).0, Verdict::NotAssigned);
        assert!(!s.batch_done());
    }

    #[test]
    fn a_late_copy_from_an_earlier_batch_on_the_same_version_is_stale_not_malformed() {
        // An evaluation after step s and the training step s + 1 share parameter version s + 1.
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Scheduler::new(Duration::from_secs(60));
        s.worker_joined(1, 1, t0);
        s.worker_joined(2, 1, t0);
        let eval: Vec<Assignment> = batch(5, 2, 0).into_iter().map(|a| Assignment { mode: Mode::Eval, ..a }).collect();
        s.start_batch(5, eval, t0);
        s.result(2, 1, 5, Mode::Eval, t0 + ms(100));
        let a = s.tick(t0 + ms(1000));
        assert_eq!(assigned(&a, 2), vec![0], "straggler duplicated");
        s.result(2, 0, 5, Mode::Eval, t0 + ms(1100));
        assert!(s.batch_done());
        s.start_batch(5, batch(5, 2, 10), t0 + ms(1200));
        // Worker 1's slow evaluation copy arrives during the training batch.
        assert_eq!(s.result(1, 0, 5, Mode::Eval, t0 + ms(1300)).0, Verdict::Stale);
    }

    #[test]
    fn retry_requeues_a_running_task() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(5));
        s.worker_joined(1, 1, t0);
        s.start_batch(0, batch(0, 1, 0), t0);
        let a = s.retry(1, 0, t0);
        assert_eq!(assigned(&a, 1), vec![0], "the only worker gets it again");
        assert_eq!(s.stats.reassigned, 1);
    }

    #[test]
    fn a_failed_task_goes_to_another_worker_when_there_is_one() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(5));
        s.worker_joined(1, 1, t0);
        s.worker_joined(2, 1, t0);
        s.start_batch(0, batch(0, 3, 0), t0);
        // Worker 1 fails task 0: it gets task 2 instead, and task 0 waits for worker 2.
        let a = s.retry(1, 0, t0);
        assert_eq!(assigned(&a, 1), vec![2]);
        let (_, a) = s.result(2, 1, 0, Mode::Train, t0);
        assert_eq!(assigned(&a, 2), vec![0]);
        assert!(assigned(&a, 1).is_empty());
    }

    #[test]
    fn a_worker_holding_a_straggler_gets_no_new_tasks_while_another_can_take_them() {
        let t0 = Instant::now();
        let s_ = Duration::from_secs;
        let mut s = Scheduler::new(s_(40));
        s.worker_joined(1, 8, t0);
        s.worker_joined(2, 8, t0);
        let a = s.start_batch(0, batch(0, 4, 0), t0);
        assert_eq!((assigned(&a, 1), assigned(&a, 2)), (vec![0, 1], vec![2, 3]), "shared out in proportion");
        // Worker 2 answers; worker 1 (say, killed) does not. Step 0's tasks 0 and 1 go to worker 2 as
        // stragglers; the next meta-batch goes to worker 2 alone while worker 1 holds stragglers.
        for id in [2, 3] {
            s.result(2, id, 0, Mode::Train, t0);
        }
        let a = s.tick(t0 + s_(10));
        assert_eq!(assigned(&a, 2), vec![0, 1]);
        for id in [0, 1] {
            s.result(2, id, 0, Mode::Train, t0 + s_(10));
        }
        let a = s.start_batch(1, batch(1, 4, 10), t0 + s_(10));
        assert!(assigned(&a, 1).is_empty());
        assert_eq!(assigned(&a, 2), vec![10, 11, 12, 13]);
    }

    #[test]
    fn before_any_latency_is_known_a_silent_worker_is_duplicated_after_a_quarter_timeout() {
        let t0 = Instant::now();
        let s_ = Duration::from_secs;
        let mut s = Scheduler::new(s_(40));
        s.worker_joined(1, 8, t0);
        s.start_batch(0, batch(0, 2, 0), t0);
        s.worker_joined(2, 8, t0);
        assert!(s.tick(t0 + s_(9)).is_empty());
        // Every straggler an idle worker has room for, oldest first, in one assignment (one batch).
        let a = s.tick(t0 + s_(10));
        assert_eq!(assigned(&a, 2), vec![0, 1]);
        assert!(s.tick(t0 + s_(11)).is_empty(), "at most MAX_COPIES copies");
        assert_eq!(s.stats.duplicated, 2);
    }

    #[test]
    fn idle_workers_duplicate_stragglers_and_the_first_result_wins() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Scheduler::new(Duration::from_secs(60));
        s.worker_joined(1, 1, t0);
        s.worker_joined(2, 1, t0);
        s.start_batch(0, batch(0, 3, 0), t0);
        // Worker 2 returns quickly (latency 100 ms) and takes task 2; worker 1 is slow on task 0.
        let (_, a) = s.result(2, 1, 0, Mode::Train, t0 + ms(100));
        assert_eq!(assigned(&a, 2), vec![2]);
        let (_, a) = s.result(2, 2, 0, Mode::Train, t0 + ms(200));
        assert!(a.is_empty());
        // Not a straggler yet (age 250 ms < max(3 × 100 ms, 200 ms)).
        assert!(s.tick(t0 + ms(250)).is_empty());
        let a = s.tick(t0 + ms(400));
        assert_eq!(assigned(&a, 2), vec![0], "idle worker 2 duplicates the straggler");
        assert_eq!(s.stats.duplicated, 1);
        assert!(s.tick(t0 + ms(900)).is_empty(), "at most one duplicate, and worker 2 is busy");
        assert_eq!(s.result(2, 0, 0, Mode::Train, t0 + ms(500)).0, Verdict::Accepted { index: 0 });
        assert_eq!(s.result(1, 0, 0, Mode::Train, t0 + ms(5000)).0, Verdict::Duplicate);
        assert!(s.batch_done());
        assert_eq!(s.stats.reassigned, 0);
    }

    #[test]
    fn a_failed_copy_is_requeued_only_when_no_other_copy_runs() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Scheduler::new(Duration::from_secs(60));
        s.worker_joined(1, 1, t0);
        s.worker_joined(2, 1, t0);
        s.start_batch(0, batch(0, 2, 0), t0);
        s.result(2, 1, 0, Mode::Train, t0 + ms(100));
        let a = s.tick(t0 + ms(1000));
        assert_eq!(assigned(&a, 2), vec![0]);
        // Worker 2's copy is refused: worker 1 still computes task 0, so nothing is queued.
        let a = s.retry(2, 0, t0 + ms(1100));
        assert!(a.is_empty());
        assert_eq!(s.stats.reassigned, 0);
        // Then worker 1 leaves: now the task is queued and goes to worker 2.
        let a = s.worker_left(1, t0 + ms(1200));
        assert_eq!(assigned(&a, 2), vec![0]);
        assert_eq!(s.stats.reassigned, 1);
    }

    #[test]
    fn a_suspect_gets_no_copies_while_a_healthy_worker_can_take_them() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut s = Scheduler::new(Duration::from_secs(60));
        s.worker_joined(1, 2, t0);
        s.worker_joined(2, 2, t0);
        s.start_batch(0, batch(0, 4, 0), t0);
        // Worker 2 answers task 2 quickly (latency 100 ms) and stalls on task 3; worker 1 stalls on both.
        s.result(2, 2, 0, Mode::Train, t0 + ms(100));
        s.worker_joined(3, 1, t0 + ms(100));
        // At 1 s every holder is overdue: workers 1 and 2 are suspects, the newcomer 3 is not. Only worker
        // 3 gets a copy (the oldest straggler), although worker 2 has a free slot too.
        let a = s.tick(t0 + ms(1000));
        assert!(assigned(&a, 2).is_empty(), "a suspect takes no copy");
        assert_eq!(assigned(&a, 3), vec![0]);
        // When every worker is a suspect (worker 3 now too), copies go to whoever has room: worker 2 takes
        // task 1 (task 0 already runs twice, task 3 is its own).
        let a = s.tick(t0 + ms(5000));
        assert_eq!(assigned(&a, 2), vec![1]);
    }

    #[test]
    fn tasks_wait_for_a_first_worker() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(5));
        assert!(s.start_batch(0, batch(0, 3, 0), t0).is_empty());
        let a = s.worker_joined(9, 8, t0);
        assert_eq!(params_sent(&a), 1);
        assert_eq!(assigned(&a, 9), vec![0, 1, 2]);
    }
}
