//! `Result`: validate the header and gradient payload (shape, dtype, finiteness) here, on the
//! connection's task, then hand the verdict to the training loop, which checks id, version and mode.

use metatrain_common::protocol::TaskResult;

use super::HandlerError;
use crate::aggregate::validate;
use crate::server::{Event, ServerContext};

pub async fn handle(ctx: &ServerContext, worker: u64, result: TaskResult, payload: &[u8]) -> Result<(), HandlerError> {
    let outcome = validate(&result, payload, ctx.numel);
    let event = Event::Result { worker, result, outcome };
    ctx.events.send(event).await.map_err(|_| HandlerError::Shutdown)
}
