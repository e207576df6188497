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

/// The attack helper's case: a worker holding a task is SIGKILLed and restarts under its name while
/// the dead connection lingers (QUIC's idle timeout). Before retirement, the straggler's copy went to a
/// second dead, idle connection (lowest id first) and a live idle worker waited 15 s for the timeouts.
#[test]
fn a_superseded_worker_gets_nothing_and_its_tasks_go_to_a_live_worker_at_once() {
    let t0 = Instant::now();
    let mut s = Scheduler::new(Duration::from_secs(120));
    s.worker_joined(1, 1, t0);
    let a = s.start_batch(0, batch(0, 1, 200), t0);
    assert_eq!(assigned(&a, 1), vec![200]);
    s.worker_joined(2, 1, t0); // another connection, idle (dead too, in the attack's run)
                               // Worker 1 restarts as worker 3: worker 1 is retired, its task is queued and goes to the newcomer.
    let t1 = t0 + Duration::from_millis(100);
    let mut a = s.worker_retired(1, t1);
    a.extend(s.worker_joined(3, 1, t1));
    let to_new: Vec<TaskId> = [assigned(&a, 2), assigned(&a, 3)].concat();
    assert_eq!(to_new, vec![200], "the task is running again on an active worker: {a:?}");
    assert_eq!(s.stats.reassigned, 1);
    assert!(assigned(&a, 1).is_empty());
    // Worker 2 is retired too (its name restarted as worker 4); worker 4 picks up what 2 held.
    let mut a = s.worker_retired(2, t1);
    a.extend(s.worker_joined(4, 1, t1));
    if !assigned(&a, 4).is_empty() {
        assert_eq!(assigned(&a, 4), vec![200]);
    }
    // Much later, stragglers are copied only to active workers, never to the retired 1 and 2.
    for t in 1..200 {
        let a = s.tick(t1 + Duration::from_millis(100 * t));
        assert!(assigned(&a, 1).is_empty() && assigned(&a, 2).is_empty(), "{a:?}");
    }
    // A late answer from the retired original is still accepted (it stayed a holder).
    let (v, _) = s.result(1, 200, 0, Mode::Train, t1 + Duration::from_secs(20));
    assert_eq!(v, Verdict::Accepted { index: 0 });
    assert!(s.batch_done());
}

#[test]
fn a_retired_worker_does_not_take_new_batches() {
    let t0 = Instant::now();
    let mut s = Scheduler::new(Duration::from_secs(10));
    s.worker_joined(1, 4, t0);
    s.worker_joined(2, 4, t0);
    s.worker_retired(1, t0);
    let a = s.start_batch(0, batch(0, 6, 100), t0);
    assert!(assigned(&a, 1).is_empty());
    assert_eq!(assigned(&a, 2), vec![100, 101, 102, 103]);
}
