//! `Result`: validate the header and the gradient (decoded while it arrived: shape, wire dtype, finiteness)
//! here, on the connection's task, then hand the verdict to the training loop, which checks id, version
//! and mode.

use metatrain_common::protocol::TaskResult;
use metatrain_common::tensor::TensorError;

use super::HandlerError;
use crate::aggregate::{check_wire_dtype, validate_decoded};
use crate::server::{Event, ReceivePermit, ServerContext};

pub async fn handle(
    ctx: &ServerContext,
    worker: u64,
    result: TaskResult,
    gradient: Option<Result<Vec<f32>, TensorError>>,
    permit: Option<ReceivePermit>,
) -> Result<(), HandlerError> {
    let outcome = check_wire_dtype(&result, ctx.grad_dtype).and_then(|()| validate_decoded(&result, gradient));
    // A refused gradient is dropped here, and its share of the budget with it.
    let permit = if outcome.as_ref().is_ok_and(|o| o.grad.is_some()) { permit } else { None };
    let event = Event::Result { worker, result, outcome, permit };
    ctx.events.send(event).await.map_err(|_| HandlerError::Shutdown)
}
