//! The coordinator's QUIC endpoint: accepts workers, runs the handshake, and turns each worker's frames
//! into [`Event`]s for the training loop; carries the loop's [`Outbound`] messages back to the worker.
//!
//! One task per connection reads result streams; one task writes the control stream. Each message kind
//! has its own handler in [`handlers`]. A bad frame closes that worker's connection with a reason; it
//! never reaches the training loop's state.

mod connection;
pub mod handlers;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use metatrain_common::protocol::{Assignment, TaskId, TaskResult};
use metatrain_common::tensor::Dtype;
use tokio::sync::mpsc;

use crate::aggregate::{Rejection, TaskOutcome};
use crate::scheduler::WorkerId;

pub use connection::serve;

/// What the training loop hears from the server.
#[derive(Debug)]
pub enum Event {
    Joined {
        worker: WorkerId,
        name: String,
        capacity: u32,
        outbox: mpsc::UnboundedSender<Outbound>,
    },
    Left {
        worker: WorkerId,
        reason: String,
    },
    /// A result stream that did not hold one valid result frame (bad prefix, oversized or mismatched
    /// payload, undecodable header, another message kind). The connection is closed; this comes first
    /// so that the worker's name is struck before it leaves.
    Malformed {
        worker: WorkerId,
        reason: String,
    },
    /// A result that passed (or failed) validation.
    Result {
        worker: WorkerId,
        result: TaskResult,
        outcome: Result<TaskOutcome, Rejection>,
        /// The share of [`ReceiveBudget`] its gradient holds, given back when the training loop has taken
        /// the gradient in (reduced, or parked within `cluster.reorder_memory_mb`, or spilled).
        permit: Option<ReceivePermit>,
    },
    TaskFailed {
        worker: WorkerId,
        id: TaskId,
        version: u64,
        reason: String,
    },
}

/// What the training loop sends to one worker.
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Parameters of `version`, already encoded (shared by every worker's writer).
    Params {
        version: u64,
        len: u64,
        payload: Arc<Vec<u8>>,
    },
    Assign(Vec<Assignment>),
    Shutdown(String),
    /// Close this worker's connection with the reason (e.g. quarantine).
    Disconnect(String),
}

/// Worker names refused until a deadline (workers that kept sending malformed results). Names are
/// authenticated only as far as the transport authenticates workers.
#[derive(Default)]
pub struct Quarantine {
    until: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl Quarantine {
    pub fn add(&self, name: &str, for_: std::time::Duration) {
        if let Ok(mut m) = self.until.lock() {
            m.insert(name.to_string(), std::time::Instant::now() + for_);
        }
    }

    /// Seconds left for `name`, if it is quarantined now.
    pub fn remaining(&self, name: &str) -> Option<u64> {
        let mut m = self.until.lock().ok()?;
        let now = std::time::Instant::now();
        m.retain(|_, t| *t > now);
        m.get(name).map(|t| t.saturating_duration_since(now).as_secs().max(1))
    }
}

/// Live connections per worker name, so that one certificate cannot hold many connections' worth of
/// buffers (a worker has one; a reconnect briefly overlaps its old one). A worker killed with SIGKILL
/// leaves its connection open until QUIC's idle timeout; a process restarted under the same name
/// faster than that would pile them up, so a new connection over the limit closes the name's *oldest*
/// one instead of being refused (its tasks are reassigned as for any lost worker). The limit still
/// bounds what one name can hold.
#[derive(Default)]
pub struct NameSlots {
    live: std::sync::Mutex<std::collections::HashMap<String, std::collections::VecDeque<(u64, Closer)>>>,
    next: std::sync::atomic::AtomicU64,
}

/// Closes one connection (with a reason naming why); a closure so that the table needs no sockets.
pub type Closer = Box<dyn FnOnce() + Send>;

/// One connection's hold on its name; released on drop.
pub struct NameSlot {
    slots: Arc<NameSlots>,
    name: String,
    token: u64,
}

impl NameSlots {
    /// Takes a slot for `name` for a connection that `close` closes; when `max` connections already
    /// hold one, the oldest is closed and gives up its slot. `None` only if the table is poisoned.
    pub fn take(self: &Arc<Self>, name: &str, max: usize, close: Closer) -> Option<NameSlot> {
        let mut live = self.live.lock().ok()?;
        let held = live.entry(name.to_string()).or_default();
        while held.len() >= max.max(1) {
            if let Some((_, close_oldest)) = held.pop_front() {
                tracing::info!("worker {name:?}: a new connection supersedes its oldest of {max}");
                close_oldest();
            }
        }
        let token = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        held.push_back((token, close));
        Some(NameSlot { slots: self.clone(), name: name.to_string(), token })
    }
}

impl Drop for NameSlot {
    fn drop(&mut self) {
        if let Ok(mut live) = self.slots.live.lock() {
            if let Some(held) = live.get_mut(&self.name) {
                held.retain(|(t, _)| *t != self.token);
                if held.is_empty() {
                    live.remove(&self.name);
                }
            }
        }
    }
}

/// Fixed facts every connection needs.
pub struct ServerContext {
    pub events: mpsc::Sender<Event>,
    /// The run's config as TOML (sent in `Welcome`).
    pub config_toml: String,
    pub layout_fingerprint: String,
    /// Scalars in the parameter layout (bounds result payloads).
    pub numel: usize,
    /// `cluster.grad_dtype`: results whose gradient travels as another dtype are refused.
    pub grad_dtype: Dtype,
    pub next_worker: AtomicU64,
    pub quarantine: Arc<Quarantine>,
    pub names: Arc<NameSlots>,
    /// Memory for gradients being received, decoded, and queued for the training loop.
    pub receive_budget: ReceiveBudget,
}

/// A reservation in [`ReceiveBudget`].
pub type ReceivePermit = tokio::sync::OwnedSemaphorePermit;

/// Bytes per permit of [`ReceiveBudget`] (1 MB): a semaphore counts in `u32`s.
const BUDGET_UNIT: u64 = 1_000_000;

/// Bounds the memory that gradients take between their first byte and the training loop
/// (`cluster.receive_memory_mb`). A result stream reserves its decoded size before reading the payload;
/// while it waits its stream is not read, so QUIC's flow control stops the worker after one stream
/// window, and many workers returning 400 MB gradients at once do not hold 400 MB each in the
/// coordinator. A gradient larger than the whole budget reserves all of it (one at a time).
///
/// The unit of waiting is the connection, not the stream: unread streams of one connection share its
/// QUIC receive window (32 MiB), so a stream left waiting behind its own connection's active stream
/// could starve it. Once one stream of a connection holds a reservation, that connection's other
/// result streams are read at once, beyond the budget ([`Admission::Riding`]). The real worker sends
/// one result at a time, so this only lets a worker that sends several at once exceed the budget by
/// what it sends in parallel.
#[derive(Debug, Clone)]
pub struct ReceiveBudget {
    permits: Arc<tokio::sync::Semaphore>,
    units: u32,
}

/// One connection's result streams that are reading a payload now.
#[derive(Debug, Default)]
pub struct ConnectionReceiving {
    reading: std::sync::Mutex<usize>,
    admitted: tokio::sync::Notify,
}

impl ConnectionReceiving {
    fn count(&self) -> std::sync::MutexGuard<'_, usize> {
        // The count is a plain integer: a panic elsewhere cannot leave it half-written.
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
    /// Its connection is already reading another payload (see [`ReceiveBudget`]).
    Riding(Reading),
}

impl ReceiveBudget {
    pub fn new(bytes: u64) -> ReceiveBudget {
        let units = (bytes / BUDGET_UNIT).clamp(1, u32::MAX as u64) as u32;
        ReceiveBudget { permits: Arc::new(tokio::sync::Semaphore::new(units as usize)), units }
    }

    /// Waits until `bytes` (rounded up to whole units, at most the whole budget) are free, and holds them.
    /// `None` only if the budget were closed (it never is).
    pub async fn reserve(&self, bytes: u64) -> Option<ReceivePermit> {
        let want = bytes.div_ceil(BUDGET_UNIT).clamp(1, self.units as u64) as u32;
        self.permits.clone().acquire_many_owned(want).await.ok()
    }

    /// Lets a stream of `connection` read a payload of `bytes` (decoded): at once if the connection is
    /// reading another, else when the budget has room.
    pub async fn admit(&self, connection: &Arc<ConnectionReceiving>, bytes: u64) -> Option<Admission> {
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
                    return Some(Admission::Riding(reading()));
                }
            }
            tokio::select! {
                permit = self.reserve(bytes) => {
                    *connection.count() += 1;
                    connection.admitted.notify_waiters();
                    return Some(Admission::Reserved(permit?, reading()));
                }
                _ = &mut admitted => continue,
            }
        }
    }

    /// Units (MB) free now.
    pub fn available_mb(&self) -> usize {
        self.permits.available_permits()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_already_reading_is_not_left_waiting_behind_itself() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let mb = BUDGET_UNIT;
            let budget = ReceiveBudget::new(1000 * mb);
            let (a, b) = (Arc::new(ConnectionReceiving::default()), Arc::new(ConnectionReceiving::default()));
            let first = budget.admit(&a, 800 * mb).await.unwrap();
            assert!(matches!(first, Admission::Reserved(..)));
            // A's second stream rides along, beyond the budget; B's first waits for room.
            let second = budget.admit(&a, 800 * mb).await.unwrap();
            assert!(matches!(second, Admission::Riding(_)));
            let wait = std::time::Duration::from_millis(50);
            let waiting = budget.admit(&b, 800 * mb);
            tokio::pin!(waiting);
            assert!(tokio::time::timeout(wait, waiting.as_mut()).await.is_err(), "B must wait");
            drop(second);
            assert!(tokio::time::timeout(wait, waiting.as_mut()).await.is_err(), "A still holds the budget");
            // The permit travels with the gradient: only when it is given back does B get room.
            let Admission::Reserved(permit, reading) = first else { unreachable!() };
            drop(reading);
            assert!(tokio::time::timeout(wait, waiting.as_mut()).await.is_err(), "the gradient still holds it");
            drop(permit);
            let got = tokio::time::timeout(wait, waiting).await.expect("room now").unwrap();
            assert!(matches!(got, Admission::Reserved(..)));
            // Two of one connection waiting at once: when one is admitted, the other rides at once.
            let c = Arc::new(ConnectionReceiving::default());
            let (x, y, ()) = tokio::join!(
                async {
                    let r = budget.admit(&c, 800 * mb).await.unwrap();
                    tokio::time::sleep(wait).await;
                    r
                },
                async { budget.admit(&c, 800 * mb).await.unwrap() },
                async {
                    tokio::time::sleep(wait).await;
                    drop(got);
                }
            );
            let kinds = [&x, &y].map(|r| matches!(r, Admission::Reserved(..)));
            assert_eq!(kinds.iter().filter(|k| **k).count(), 1, "one reserves, the other rides: {x:?} {y:?}");
        });
    }

    #[test]
    fn the_receive_budget_gives_out_no_more_than_it_has() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        rt.block_on(async {
            let mb = BUDGET_UNIT;
            let budget = ReceiveBudget::new(1000 * mb);
            let first = budget.reserve(600 * mb).await.unwrap();
            assert_eq!(budget.available_mb(), 400);
            // One byte takes a whole unit.
            let small = budget.reserve(1).await.unwrap();
            assert_eq!(budget.available_mb(), 399);
            // A second large gradient waits until the first is given back.
            let wait = std::time::Duration::from_millis(50);
            assert!(tokio::time::timeout(wait, budget.reserve(600 * mb)).await.is_err(), "over the budget");
            drop(first);
            let second = tokio::time::timeout(wait, budget.reserve(600 * mb)).await.expect("room again").unwrap();
            drop((second, small));
            // One larger than the whole budget takes all of it, so it is received alone.
            let huge = budget.reserve(5000 * mb).await.unwrap();
            assert_eq!(budget.available_mb(), 0);
            drop(huge);
            assert_eq!(budget.available_mb(), 1000);
        });
    }

    #[test]
    fn a_name_over_its_limit_closes_its_oldest_connection() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let slots = Arc::new(NameSlots::default());
        let closed: Arc<Vec<AtomicUsize>> = Arc::new((0..6).map(|_| AtomicUsize::new(0)).collect());
        let closer = |i: usize| -> Closer {
            let closed = closed.clone();
            Box::new(move || {
                closed[i].fetch_add(1, Ordering::SeqCst);
            })
        };
        let mut held: Vec<NameSlot> = (0..4).map(|i| slots.take("w", 4, closer(i)).expect("slot")).collect();
        assert!(closed.iter().all(|c| c.load(Ordering::SeqCst) == 0));
        // A fifth closes the first (only), and is admitted.
        held.push(slots.take("w", 4, closer(4)).expect("slot"));
        let count = |i: usize| closed[i].load(Ordering::SeqCst);
        assert_eq!((0..5).map(count).collect::<Vec<_>>(), [1, 0, 0, 0, 0]);
        // Other names are counted apart.
        let _other = slots.take("other", 4, closer(5)).expect("slot");
        assert_eq!(count(1), 0);
        // A dropped slot frees its place: the next connection closes nobody.
        drop(held.remove(3));
        held.push(slots.take("w", 4, Box::new(|| {})).expect("slot"));
        assert_eq!((0..5).map(count).collect::<Vec<_>>(), [1, 0, 0, 0, 0]);
        // The first slot, whose connection was closed, leaves the table without disturbing others.
        drop(held.remove(0));
        held.push(slots.take("w", 4, Box::new(|| {})).expect("slot"));
        assert_eq!(count(1), 1, "now at the limit again: the oldest live one goes");
    }
}
