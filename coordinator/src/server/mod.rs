//! The coordinator's QUIC endpoint: accepts workers, runs the handshake, and turns each worker's frames
//! into [`Event`]s for the training loop; carries the loop's [`Outbound`] messages back to the worker.
//!
//! One task per connection reads result streams; one task writes the control stream. Each message kind
//! has its own handler in [`handlers`]. A bad frame closes that worker's connection with a reason; it
//! never reaches the training loop's state.

mod budget;
mod connection;
pub mod handlers;

pub use budget::{Admission, ConnectionReceiving, ReceiveBudget, ReceivePermit};

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

#[cfg(test)]
mod tests {
    use super::*;

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
