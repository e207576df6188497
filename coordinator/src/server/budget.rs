//! The receive budget: how much gradient memory may be between the network and the training loop.
//!
//! A result stream reserves its gradient's decoded size before its payload is read; while it waits,
//! its stream is not read, so QUIC's flow control stops the worker after one stream window, and many
//! workers returning 400 MB gradients at once do not hold 400 MB each in the coordinator
//! (`cluster.receive_memory_mb`). A reservation is given back when the training loop has taken the
//! gradient in (reduced, parked within `cluster.reorder_memory_mb`, or spilled).
//!
//! **Lowest task first.** Waiting streams are admitted in task-id order, not arrival order. Task ids
//! grow with the task index within a step, and the reduction takes results in index order, so the
//! result it waits for is never stuck behind results that would only have to wait (or be spilled) once
//! in.
//!
//! **A connection is not held back by itself.** Unread streams of one connection share its QUIC receive
//! window (32 MiB), so a stream left waiting behind its own connection's active stream could starve it.
//! Once one stream of a connection holds a reservation, that connection's other result streams are read
//! at once, beyond the budget ([`Admission::Riding`]). The real worker sends one result at a time, so
//! this only lets a worker that sends several at once exceed the budget by what it sends in parallel.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// Bytes per unit of the budget (1 MB).
const BUDGET_UNIT: u64 = 1_000_000;

/// The coordinator's receive budget (shared by every connection).
#[derive(Debug, Clone)]
pub struct ReceiveBudget {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    units: u64,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    free: u64,
    /// Waiting reservations by (task id, arrival), each with the units it wants.
    queue: BTreeMap<(u64, u64), (u64, oneshot::Sender<ReceivePermit>)>,
    arrivals: u64,
}

/// A reservation; its units return to the budget (and go to the next waiting stream) when dropped.
#[derive(Debug)]
pub struct ReceivePermit {
    shared: Arc<Shared>,
    units: u64,
}

impl Drop for ReceivePermit {
    fn drop(&mut self) {
        let refused = {
            let mut state = self.shared.lock();
            state.free += self.units;
            self.shared.grant(&mut state)
        };
        // Outside the lock: each one's own drop gives its units back again.
        drop(refused);
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is only counts and a queue, each left consistent at every step: a panic elsewhere
        // cannot leave it half-written.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands free units to the waiting reservations, lowest task first, while the first one fits.
    /// Returns the permits whose waiter had gone (to be dropped after the lock is released).
    fn grant(self: &Arc<Self>, state: &mut State) -> Vec<ReceivePermit> {
        let mut refused = Vec::new();
        while let Some(entry) = state.queue.first_entry() {
            let want = entry.get().0;
            if want > state.free {
                break;
            }
            let (_, tx) = entry.remove();
            state.free -= want;
            if let Err(permit) = tx.send(ReceivePermit { shared: self.clone(), units: want }) {
                refused.push(permit);
            }
        }
        refused
    }
}

impl ReceiveBudget {
    pub fn new(bytes: u64) -> ReceiveBudget {
        let units = (bytes / BUDGET_UNIT).max(1);
        let state = State { free: units, queue: BTreeMap::new(), arrivals: 0 };
        ReceiveBudget { shared: Arc::new(Shared { units, state: Mutex::new(state) }) }
    }

    /// Waits until `bytes` (rounded up to whole units, at most the whole budget) can be had, behind any
    /// waiting reservation for a lower `task` id, and holds them.
    pub async fn reserve(&self, task: u64, bytes: u64) -> ReceivePermit {
        let want = bytes.div_ceil(BUDGET_UNIT).clamp(1, self.shared.units);
        let rx = {
            let mut state = self.shared.lock();
            let first_in_line = state.queue.first_key_value().is_none_or(|(&(t, _), _)| task < t);
            if first_in_line && state.free >= want {
                state.free -= want;
                return ReceivePermit { shared: self.shared.clone(), units: want };
            }
            let (tx, rx) = oneshot::channel();
            state.arrivals += 1;
            let key = (task, state.arrivals);
            state.queue.insert(key, (want, tx));
            rx
        };
        match rx.await {
            Ok(permit) => permit,
            // The sender lives in the queue until it is granted, and the queue lives as long as `self`.
            Err(_) => std::future::pending().await,
        }
    }

    /// Lets a stream of `connection`, carrying the result of `task`, read a payload of `bytes` (decoded):
    /// at once if the connection is reading another, else when the budget has room for it.
    pub async fn admit(&self, connection: &Arc<ConnectionReceiving>, task: u64, bytes: u64) -> Admission {
        let reading = || Reading(connection.clone());
        loop {
            // Registered before the count is read, so that an admission in between is not missed.
            let admitted = connection.admitted.notified();
            tokio::pin!(admitted);
            admitted.as_mut().enable();
            {
                let mut n = connection.count();
                if *n > 0 {
                    *n += 1;
                    return Admission::Riding(reading());
                }
            }
            tokio::select! {
                permit = self.reserve(task, bytes) => {
                    *connection.count() += 1;
                    connection.admitted.notify_waiters();
                    return Admission::Reserved(permit, reading());
                }
                // A dropped reservation leaves its waiter in the queue; its units come back when granted.
                _ = &mut admitted => continue,
            }
        }
    }

    /// Units (MB) free now.
    pub fn available_mb(&self) -> u64 {
        self.shared.lock().free
    }
}

/// One connection's result streams that are reading a payload now.
#[derive(Debug, Default)]
pub struct ConnectionReceiving {
    reading: Mutex<usize>,
    admitted: tokio::sync::Notify,
}

impl ConnectionReceiving {
    fn count(&self) -> MutexGuard<'_, usize> {
        self.reading.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Marks a stream as reading its payload until dropped.
#[derive(Debug)]
pub struct Reading(Arc<ConnectionReceiving>);

impl Drop for Reading {
    fn drop(&mut self) {
        *self.0.count() -= 1;
    }
}

/// Why a result stream may read its payload now.
#[derive(Debug)]
pub enum Admission {
    /// Within the budget: the permit goes with the gradient to the training loop.
    Reserved(ReceivePermit, Reading),
    /// Its connection is already reading another payload (see the module's notes).
    Riding(Reading),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MB: u64 = BUDGET_UNIT;
    const WAIT: Duration = Duration::from_millis(50);

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
    }

    #[test]
    fn the_receive_budget_gives_out_no_more_than_it_has() {
        runtime().block_on(async {
            let budget = ReceiveBudget::new(1000 * MB);
            let first = budget.reserve(1, 600 * MB).await;
            assert_eq!(budget.available_mb(), 400);
            // One byte takes a whole unit.
            let small = budget.reserve(2, 1).await;
            assert_eq!(budget.available_mb(), 399);
            // A second large gradient waits until the first is given back.
            assert!(tokio::time::timeout(WAIT, budget.reserve(3, 600 * MB)).await.is_err(), "over the budget");
            drop(first);
            let second = tokio::time::timeout(WAIT, budget.reserve(3, 600 * MB)).await.expect("room again");
            drop((second, small));
            // One larger than the whole budget takes all of it, so it is received alone.
            let huge = budget.reserve(4, 5000 * MB).await;
            assert_eq!(budget.available_mb(), 0);
            drop(huge);
            assert_eq!(budget.available_mb(), 1000);
        });
    }

    #[test]
    fn waiting_streams_are_admitted_lowest_task_first() {
        runtime().block_on(async {
            let budget = ReceiveBudget::new(400 * MB);
            let held = budget.reserve(1, 400 * MB).await;
            let order = Arc::new(Mutex::new(Vec::new()));
            // Tasks 9, 5 and 7 queue up in that order.
            let waiters: Vec<_> = [9u64, 5, 7]
                .into_iter()
                .map(|task| {
                    let (budget, order) = (budget.clone(), order.clone());
                    tokio::spawn(async move {
                        let permit = budget.reserve(task, 400 * MB).await;
                        order.lock().unwrap().push(task);
                        tokio::time::sleep(WAIT).await;
                        drop(permit);
                    })
                })
                .collect();
            tokio::time::sleep(WAIT).await;
            drop(held);
            for w in waiters {
                w.await.unwrap();
            }
            assert_eq!(*order.lock().unwrap(), vec![5, 7, 9]);
            assert_eq!(budget.available_mb(), 400);
        });
    }

    #[test]
    fn a_reservation_given_up_while_waiting_loses_no_units() {
        runtime().block_on(async {
            let budget = ReceiveBudget::new(100 * MB);
            let held = budget.reserve(1, 100 * MB).await;
            assert!(tokio::time::timeout(WAIT, budget.reserve(2, 100 * MB)).await.is_err());
            drop(held);
            // The abandoned waiter was granted and its units came straight back.
            assert_eq!(budget.available_mb(), 100);
            let again = tokio::time::timeout(WAIT, budget.reserve(3, 100 * MB)).await.expect("not lost");
            drop(again);
        });
    }

    #[test]
    fn a_connection_already_reading_is_not_left_waiting_behind_itself() {
        runtime().block_on(async {
            let budget = ReceiveBudget::new(1000 * MB);
            let (a, b) = (Arc::new(ConnectionReceiving::default()), Arc::new(ConnectionReceiving::default()));
            let first = budget.admit(&a, 1, 800 * MB).await;
            assert!(matches!(first, Admission::Reserved(..)));
            // A's second stream rides along, beyond the budget; B's first waits for room.
            let second = budget.admit(&a, 2, 800 * MB).await;
            assert!(matches!(second, Admission::Riding(_)));
            let waiting = budget.admit(&b, 3, 800 * MB);
            tokio::pin!(waiting);
            assert!(tokio::time::timeout(WAIT, waiting.as_mut()).await.is_err(), "B must wait");
            drop(second);
            assert!(tokio::time::timeout(WAIT, waiting.as_mut()).await.is_err(), "A still holds the budget");
            // The permit travels with the gradient: only when it is given back does B get room.
            let Admission::Reserved(permit, reading) = first else { unreachable!() };
            drop(reading);
            assert!(tokio::time::timeout(WAIT, waiting.as_mut()).await.is_err(), "the gradient still holds it");
            drop(permit);
            let got = tokio::time::timeout(WAIT, waiting).await.expect("room now");
            assert!(matches!(got, Admission::Reserved(..)));
            // Two of one connection waiting at once: when one is admitted, the other rides at once.
            let c = Arc::new(ConnectionReceiving::default());
            let (x, y, ()) = tokio::join!(
                async {
                    let r = budget.admit(&c, 4, 800 * MB).await;
                    tokio::time::sleep(WAIT).await;
                    r
                },
                budget.admit(&c, 5, 800 * MB),
                async {
                    tokio::time::sleep(WAIT).await;
                    drop(got);
                }
            );
            let kinds = [&x, &y].map(|r| matches!(r, Admission::Reserved(..)));
            assert_eq!(kinds.iter().filter(|k| **k).count(), 1, "one reserves, the other rides: {x:?} {y:?}");
            drop((x, y));
            assert_eq!(budget.available_mb(), 1000, "every unit came back");
        });
    }
}
