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
    /// A result that passed (or failed) validation.
    Result {
        worker: WorkerId,
        result: TaskResult,
        outcome: Result<TaskOutcome, Rejection>,
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

/// Fixed facts every connection needs.
pub struct ServerContext {
    pub events: mpsc::Sender<Event>,
    /// The run's config as TOML (sent in `Welcome`).
    pub config_toml: String,
    pub layout_fingerprint: String,
    /// Scalars in the parameter layout (bounds result payloads).
    pub numel: usize,
    pub next_worker: AtomicU64,
    pub quarantine: Arc<Quarantine>,
}
