//! `TaskFailed`: the worker could not compute a task; the training loop decides whether to retry it.

use metatrain_common::protocol::{TaskId, MAX_NAME_LEN};

use super::HandlerError;
use crate::server::{Event, ServerContext};

pub async fn handle(
    ctx: &ServerContext,
    worker: u64,
    id: TaskId,
    version: u64,
    reason: String,
) -> Result<(), HandlerError> {
    // The reason is logged; keep a hostile peer from filling logs.
    let reason: String = reason.chars().filter(|c| !c.is_control()).take(4 * MAX_NAME_LEN).collect();
    ctx.events.send(Event::TaskFailed { worker, id, version, reason }).await.map_err(|_| HandlerError::Shutdown)
}
