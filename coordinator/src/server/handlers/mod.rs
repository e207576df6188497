//! One handler per message kind a worker may send. `hello` runs during the handshake; the others handle
//! a frame read from a result stream and forward an [`Event`](super::Event) to the training loop.

pub mod hello;
pub mod result;
pub mod task_failed;

use metatrain_common::net::DecodedFrame;
use metatrain_common::protocol::Message;
use thiserror::Error;

use super::{ReceivePermit, ServerContext};

#[derive(Debug, Error)]
pub enum HandlerError {
    /// The peer broke the protocol; its connection is closed.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The training loop is gone (the run is ending).
    #[error("the run is shutting down")]
    Shutdown,
}

/// Routes a frame from a result stream to its handler.
/// `permit`: the receive budget a gradient payload holds (see [`super::ReceiveBudget`]).
pub async fn dispatch(
    ctx: &ServerContext,
    worker: u64,
    frame: DecodedFrame,
    permit: Option<ReceivePermit>,
) -> Result<(), HandlerError> {
    metrics::counter!("metatrain_received_bytes_total").increment(frame.payload_len);
    match frame.message {
        Message::Result(result) => result::handle(ctx, worker, result, frame.gradient, permit).await,
        Message::TaskFailed { id, version, reason } => task_failed::handle(ctx, worker, id, version, reason).await,
        other => Err(HandlerError::Protocol(format!("a worker may not send {} on a result stream", other.kind()))),
    }
}
