//! `write_frame` / `read_frame`: one [`Message`] plus payload over a quinn stream.

use quinn::{ReadExactError, RecvStream, SendStream};
use thiserror::Error;

use crate::protocol::{decode_header, decode_prefix, encode_head, Frame, Limits, Message, ProtocolError, PREFIX_LEN};
use crate::tensor::{Decoder, TensorError};

/// Payload bytes reserved before any arrive; beyond this the buffer grows with what is received.
const PAYLOAD_PREALLOC: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum NetError {
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream ended in the middle of a frame")]
    FinishedEarly,
    #[error("stream closed: {0}")]
    Closed(#[from] quinn::ClosedStream),
    #[error("a {0} message carries no payload")]
    UnexpectedPayload(&'static str),
}

/// A frame from a result stream, its gradient (if any) decoded while it arrived.
pub struct DecodedFrame {
    pub message: Message,
    /// Payload bytes received.
    pub payload_len: u64,
    /// `None` without a payload; otherwise the `numel` values of the `Result`'s gradient, or why they
    /// are refused (wrong length, non-finite value).
    pub gradient: Option<Result<Vec<f32>, TensorError>>,
}

/// Reads one frame within `limits`, decoding a `Result`'s gradient payload chunk by chunk as it arrives
/// ([`Decoder`]): a gradient is never held as bytes and as values at once, which halves the memory a
/// large model's results take. Only a `Result` may carry a payload here.
pub async fn read_result_frame(
    stream: &mut RecvStream,
    limits: &Limits,
    numel: usize,
) -> Result<Option<DecodedFrame>, NetError> {
    let Some((message, payload_len)) = read_result_head(stream, limits).await? else { return Ok(None) };
    read_result_payload(stream, message, payload_len, numel).await.map(Some)
}

/// The first half of [`read_result_frame`]: the prefix and header of a frame on a result stream, and
/// its payload's length; the payload is not read yet (so a reader may wait, for memory say, while
/// QUIC's flow control holds the sender). `Ok(None)`: the stream ended before a frame.
pub async fn read_result_head(stream: &mut RecvStream, limits: &Limits) -> Result<Option<(Message, u64)>, NetError> {
    let Some((message, payload_len)) = read_head(stream, limits).await? else { return Ok(None) };
    if payload_len > 0 && !matches!(message, Message::Result(_)) {
        return Err(NetError::UnexpectedPayload(message.kind()));
    }
    Ok(Some((message, payload_len)))
}

/// The second half of [`read_result_frame`]: reads and decodes the `payload_len` bytes that follow
/// `message`'s header.
pub async fn read_result_payload(
    stream: &mut RecvStream,
    message: Message,
    payload_len: u64,
    numel: usize,
) -> Result<DecodedFrame, NetError> {
    if payload_len == 0 {
        return Ok(DecodedFrame { message, payload_len, gradient: None });
    }
    let Message::Result(result) = &message else { return Err(NetError::UnexpectedPayload(message.kind())) };
    let mut decoder = Decoder::new(result.grad_dtype, numel, payload_len);
    let mut received = 0u64;
    while received < payload_len {
        let want = (payload_len - received).min(usize::MAX as u64) as usize;
        match stream.read_chunk(want, true).await? {
            Some(chunk) => {
                received += chunk.bytes.len() as u64;
                if let Ok(d) = decoder.as_mut() {
                    d.push(&chunk.bytes);
                }
            }
            None => return Err(NetError::FinishedEarly),
        }
    }
    let gradient = Some(decoder.and_then(Decoder::finish));
    Ok(DecodedFrame { message, payload_len, gradient })
}

/// Reads a frame's prefix and header. `Ok(None)`: the peer finished the stream cleanly between frames.
async fn read_head(stream: &mut RecvStream, limits: &Limits) -> Result<Option<(Message, u64)>, NetError> {
    let mut prefix = [0u8; PREFIX_LEN];
    match stream.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(ReadExactError::FinishedEarly(_)) => return Err(NetError::FinishedEarly),
        Err(ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let (header_len, payload_len) = decode_prefix(&prefix, limits)?;
    let mut header = vec![0u8; header_len];
    read_exact(stream, &mut header).await?;
    Ok(Some((decode_header(&header, payload_len)?, payload_len)))
}

/// Writes one frame (prefix, header, payload) without copying the payload.
pub async fn write_frame(stream: &mut SendStream, message: &Message, payload: &[u8]) -> Result<(), NetError> {
    let head = encode_head(message, payload.len() as u64)?;
    stream.write_all(&head).await?;
    if !payload.is_empty() {
        stream.write_all(payload).await?;
    }
    Ok(())
}

/// Reads one frame within `limits`. `Ok(None)`: the peer finished the stream cleanly between frames.
pub async fn read_frame(stream: &mut RecvStream, limits: &Limits) -> Result<Option<Frame>, NetError> {
    let Some((message, payload_len)) = read_head(stream, limits).await? else { return Ok(None) };
    // payload_len passed the receiver's limit and matches the header's declaration; still, memory grows
    // only with bytes that actually arrive, so a peer cannot make us allocate by merely announcing.
    let mut payload = Vec::with_capacity(payload_len.min(PAYLOAD_PREALLOC) as usize);
    while (payload.len() as u64) < payload_len {
        let want = (payload_len - payload.len() as u64).min(usize::MAX as u64) as usize;
        match stream.read_chunk(want, true).await? {
            Some(chunk) => payload.extend_from_slice(&chunk.bytes),
            None => return Err(NetError::FinishedEarly),
        }
    }
    Ok(Some(Frame { message, payload }))
}

async fn read_exact(stream: &mut RecvStream, buf: &mut [u8]) -> Result<(), NetError> {
    stream.read_exact(buf).await.map_err(|e| match e {
        ReadExactError::FinishedEarly(_) => NetError::FinishedEarly,
        ReadExactError::ReadError(e) => NetError::Read(e),
    })
}
