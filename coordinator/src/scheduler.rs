//! Who computes which task: an I/O-free state machine fed with events and the current time.
//!
//! The coordinator starts a *batch* (a meta-step's tasks, or an evaluation's) for one parameter version;
//! the scheduler answers with [`Action`]s: send parameters to a worker (once per worker per version),
//! assign tasks to it (up to its in-flight limit, lowest task index first). Workers join and leave at any
//! time; a leaving worker's tasks go back to the queue, and so do tasks whose deadline passes. A result is
//! accepted once per task, from whichever worker returns it first, and only for the current batch's
//! version; everything else gets a [`Verdict`] saying why it was dropped.
//!
//! Nothing here reads a clock or a socket, so tests drive it by hand (see the tests below).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use metatrain_common::protocol::{Assignment, TaskId};

pub type WorkerId = u64;

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
    /// A result for a task that already has one (a late original after a reassignment).
    Duplicate,
    /// A result computed on another parameter version than the current batch's.
    Stale,
    /// No such task in the current batch.
    Unknown,
}

#[derive(Debug)]
struct Worker {
    limit: usize,
    in_flight: BTreeSet<TaskId>,
    version: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum TaskState {
    Pending,
    Running { worker: WorkerId, deadline: Instant },
    Done,
}

#[derive(Debug)]
struct Task {
    index: usize,
    assignment: Assignment,
    state: TaskState,
}

/// Counters the caller exports as metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    /// Tasks put back in the queue because their worker left or their deadline passed.
    pub reassigned: u64,
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
            stats: SchedulerStats::default(),
        }
    }

    /// A worker that may hold `limit` tasks at once joined.
    pub fn worker_joined(&mut self, worker: WorkerId, limit: usize, now: Instant) -> Vec<Action> {
        self.workers.insert(worker, Worker { limit: limit.max(1), in_flight: BTreeSet::new(), version: None });
        self.fill(now)
    }

    /// A worker left (closed, crashed, timed out): its tasks go back to the queue.
    pub fn worker_left(&mut self, worker: WorkerId, now: Instant) -> Vec<Action> {
        if let Some(w) = self.workers.remove(&worker) {
            for id in w.in_flight {
                self.requeue(id, false);
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
            self.tasks.insert(assignment.id, Task { index, assignment, state: TaskState::Pending });
        }
        self.fill(now)
    }

    /// Whether every task of the current batch has an accepted result.
    pub fn batch_done(&self) -> bool {
        self.remaining == 0
    }

    /// A result for `task` computed on `version` arrived from `worker`.
    pub fn result(&mut self, worker: WorkerId, task: TaskId, version: u64, now: Instant) -> (Verdict, Vec<Action>) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.in_flight.remove(&task);
        }
        let verdict = match self.tasks.get_mut(&task) {
            None if version != self.version => Verdict::Stale,
            None => Verdict::Unknown,
            Some(_) if version != self.version => Verdict::Stale,
            Some(t) if t.state == TaskState::Done => Verdict::Duplicate,
            Some(t) => {
                if let TaskState::Running { worker: holder, .. } = t.state {
                    if let Some(w) = self.workers.get_mut(&holder) {
                        w.in_flight.remove(&task);
                    }
                }
                if t.state == TaskState::Pending {
                    self.queue.remove(&t.index);
                }
                t.state = TaskState::Done;
                self.remaining -= 1;
                Verdict::Accepted { index: t.index }
            }
        };
        (verdict, self.fill(now))
    }

    /// A task could not be used (failed on the worker, or its result was invalid): run it again.
    pub fn retry(&mut self, worker: WorkerId, task: TaskId, now: Instant) -> Vec<Action> {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.in_flight.remove(&task);
        }
        if matches!(self.tasks.get(&task).map(|t| t.state), Some(TaskState::Running { .. })) {
            self.requeue(task, true);
        }
        self.fill(now)
    }

    /// Reassigns tasks whose deadline has passed.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        let expired: Vec<TaskId> = self
            .tasks
            .iter()
            .filter(|(_, t)| matches!(t.state, TaskState::Running { deadline, .. } if deadline <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            // The slow worker keeps the slot: it is presumably still computing (or stopped), and
            // should not be handed the task back or given more work until it answers.
            self.requeue(id, false);
        }
        self.fill(now)
    }

    /// Puts a running task back in the queue; `release` frees its worker's slot.
    fn requeue(&mut self, id: TaskId, release: bool) {
        if let Some(t) = self.tasks.get_mut(&id) {
            if let TaskState::Running { worker, .. } = t.state {
                if release {
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.in_flight.remove(&id);
                    }
                }
                t.state = TaskState::Pending;
                self.queue.insert(t.index, id);
                self.stats.reassigned += 1;
            }
        }
    }

    /// Hands pending tasks to workers with room, lowest worker id first, lowest task index first.
    fn fill(&mut self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        for (&wid, w) in self.workers.iter_mut() {
            let mut batch = Vec::new();
            while w.in_flight.len() < w.limit {
                let Some((_, id)) = self.queue.pop_first() else { break };
                let Some(t) = self.tasks.get_mut(&id) else { continue };
                t.state = TaskState::Running { worker: wid, deadline: now + self.timeout };
                w.in_flight.insert(id);
                batch.push(t.assignment.clone());
            }
            if batch.is_empty() {
                continue;
            }
            if w.version != Some(self.version) {
                w.version = Some(self.version);
                actions.push(Action::SendParams { worker: wid, version: self.version });
            }
            actions.push(Action::Assign { worker: wid, tasks: batch });
        }
        actions
    }
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
                spec: TaskSpec { seed: 0, split: Split::Train, step: version, index: i as u32 },
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
        let (v, a) = s.result(1, 100, 0, t0);
        assert_eq!(v, Verdict::Accepted { index: 0 });
        assert_eq!(params_sent(&a), 0, "worker 1 already has version 0");
        assert_eq!(assigned(&a, 1), vec![104]);
        for id in [101, 102, 103, 104] {
            let w = if id == 102 || id == 103 { 2 } else { 1 };
            assert!(matches!(s.result(w, id, 0, t0).0, Verdict::Accepted { .. }));
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
        let (_, a) = s.result(2, 2, 0, t0);
        assert_eq!(assigned(&a, 2), vec![0]);
        let (_, a) = s.result(2, 3, 0, t0);
        assert_eq!(assigned(&a, 2), vec![1]);
        s.result(2, 0, 0, t0);
        assert!(!s.batch_done());
        s.result(2, 1, 0, t0);
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
        let (_, a) = s.result(2, 1, 0, t0);
        assert_eq!(assigned(&a, 2), vec![0], "task 0 (lower index) before task 2");
        let (_, a) = s.result(2, 0, 0, t0);
        assert_eq!(assigned(&a, 2), vec![2]);
        s.result(2, 2, 0, t0);
        assert!(s.batch_done());
    }

    #[test]
    fn deadlines_reassign_and_first_result_wins() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(5));
        s.worker_joined(1, 1, t0);
        s.start_batch(0, batch(0, 1, 7), t0);
        s.worker_joined(2, 1, t0);
        assert!(s.tick(t0 + Duration::from_secs(4)).is_empty());
        let a = s.tick(t0 + Duration::from_secs(6));
        assert_eq!(assigned(&a, 2), vec![7], "expired task goes to the idle worker");
        // The slow original answers first: accepted; the reassigned copy is then a duplicate.
        assert_eq!(s.result(1, 7, 0, t0).0, Verdict::Accepted { index: 0 });
        assert_eq!(s.result(2, 7, 0, t0).0, Verdict::Duplicate);
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
        let (_, a) = s.result(2, 1, 0, t0);
        assert_eq!(assigned(&a, 2), vec![2]);
        s.result(2, 2, 0, t0);
        // Task 0 expires: it goes to worker 2, not back to the stalled worker 1.
        let a = s.tick(t0 + Duration::from_secs(6));
        assert_eq!(assigned(&a, 2), vec![0]);
        assert!(assigned(&a, 1).is_empty());
        s.result(2, 0, 0, t0);
        assert!(s.batch_done());
        // Next batch: worker 1 still holds its unreturned task, so everything goes to worker 2.
        let a = s.start_batch(1, batch(1, 2, 10), t0);
        assert!(assigned(&a, 1).is_empty());
        assert_eq!(assigned(&a, 2), vec![10]);
        // When worker 1's stale result finally arrives, its slot is free again.
        let (v, a) = s.result(1, 0, 0, t0);
        assert_eq!(v, Verdict::Stale);
        assert_eq!(assigned(&a, 1), vec![11]);
    }

    #[test]
    fn stale_and_unknown_results_are_refused() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(5));
        s.worker_joined(1, 4, t0);
        s.start_batch(3, batch(3, 2, 0), t0);
        assert_eq!(s.result(1, 0, 2, t0).0, Verdict::Stale);
        assert_eq!(s.result(1, 55, 3, t0).0, Verdict::Unknown);
        assert!(!s.batch_done());
    }

    #[test]
    fn retry_requeues_a_running_task() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(Duration::from_secs(5));
        s.worker_joined(1, 1, t0);
        s.start_batch(0, batch(0, 1, 0), t0);
        let a = s.retry(1, 0, t0);
        assert_eq!(assigned(&a, 1), vec![0]);
        assert_eq!(s.stats.reassigned, 1);
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
