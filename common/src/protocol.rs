//! Every message between coordinator and worker, and the framing that turns them into bytes and back.
//!
//! This module knows no sockets ([`crate::net`] adapts it to QUIC streams). A frame is
//!
//! ```text
//! magic "MTR1" | header_len: u32 LE | payload_len: u64 LE | header (bincode) | payload (raw bytes)
//! ```
//!
//! The 16-byte prefix is checked against the receiver's [`Limits`] *before* anything is allocated; the
//! header is decoded with a byte limit; the header must declare exactly the payload length that follows.
//! Tensors (parameters, meta-gradients) are the payload, raw little-endian, never serde.
//!
//! Conversation: the worker opens a bidirectional *control* stream and sends [`Hello`]; the coordinator
//! answers [`Welcome`] (or `Refused`) and from then on writes `Params` and `Assign` on that stream, in
//! order, so parameters always precede the tasks that use them. The worker sends each `Result` (or
//! `TaskFailed`) on a unidirectional stream of its own, so one large gradient never blocks another.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::task::TaskSpec;
use crate::tensor::Dtype;

/// Bumped on any incompatible change to [`Message`] or the framing.
pub const PROTOCOL_VERSION: u32 = 2;
/// First bytes of every frame; catches a peer speaking something else entirely.
pub const FRAME_MAGIC: [u8; 4] = *b"MTR1";
/// magic (4) + header length (4) + payload length (8).
pub const PREFIX_LEN: usize = 16;
/// Control headers are small (the largest is `Welcome` with the config text, or `Assign` with a few
/// hundred specs); 1 MiB leaves room without letting a peer make us allocate much.
pub const MAX_HEADER_BYTES: usize = 1 << 20;
/// Headers on a worker's result streams: a `TaskResult` is under 200 bytes and a `TaskFailed` reason is
/// a sentence; 16 KiB keeps 64 concurrent streams per connection to 1 MiB of headers.
pub const MAX_RESULT_HEADER_BYTES: usize = 16 << 10;
/// Longest worker name accepted in `Hello` (it appears in logs and as a metrics label).
pub const MAX_NAME_LEN: usize = 128;
/// Most tasks in one `Assign`.
pub const MAX_TASKS_PER_ASSIGN: usize = 4096;

/// Identifies one assignment of one task within a run (unique across steps and evaluations).
pub type TaskId = u64;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// Human-readable name (host, pod, slot); at most [`MAX_NAME_LEN`] bytes.
    pub worker_name: String,
    /// Tasks this worker computes concurrently.
    pub capacity: u32,
    /// `cpu` or `cuda:N`.
    pub device: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u32,
    pub worker_id: u64,
    /// The run's validated configuration as TOML; the worker validates it again.
    pub config_toml: String,
    /// [`crate::layout::ParamLayout::fingerprint`] of the model the config implies.
    pub layout_fingerprint: String,
}

/// What a worker is asked to do with a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    /// Adapt with `algo.inner_steps`, return the meta-gradient and losses.
    Train,
    /// Adapt with `eval.inner_steps`, return losses (and accuracy); no gradient.
    Eval,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Assignment {
    pub id: TaskId,
    /// Parameter version to start from (sent earlier on the same stream).
    pub version: u64,
    pub spec: TaskSpec,
    pub mode: Mode,
}

/// One task's outcome. The meta-gradient (train mode) is the frame's payload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub id: TaskId,
    pub version: u64,
    /// The mode the task was assigned in (checked against the assignment).
    pub mode: Mode,
    /// Query loss before adaptation.
    pub pre_loss: f32,
    /// Query loss after adaptation.
    pub post_loss: f32,
    /// Query accuracy before/after adaptation (classification only).
    pub pre_accuracy: Option<f32>,
    pub post_accuracy: Option<f32>,
    /// Seconds the worker spent computing the task (data, inner loop, meta-gradient).
    pub compute_seconds: f32,
    /// The task's difficulty in [0, 1] as materialised (see `task`); for metrics only.
    pub difficulty: f32,
    pub grad_dtype: Dtype,
    /// Elements in the gradient payload (0 in eval mode).
    pub grad_len: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    Welcome(Welcome),
    Refused {
        reason: String,
    },
    /// Parameters of `version`; payload: `len` elements of `dtype` in layout order.
    Params {
        version: u64,
        dtype: Dtype,
        len: u64,
    },
    Assign {
        tasks: Vec<Assignment>,
    },
    Result(TaskResult),
    /// The worker could not compute a task (e.g. its data set is missing); not retried elsewhere.
    TaskFailed {
        id: TaskId,
        version: u64,
        reason: String,
    },
    Shutdown {
        reason: String,
    },
}

impl Message {
    /// Payload bytes this header says follow it.
    pub fn payload_len(&self) -> Option<u64> {
        match self {
            Message::Params { dtype, len, .. } => len.checked_mul(dtype.size() as u64),
            Message::Result(r) => r.grad_len.checked_mul(r.grad_dtype.size() as u64),
            _ => Some(0),
        }
    }

    /// Short name for logs and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Refused { .. } => "refused",
            Message::Params { .. } => "params",
            Message::Assign { .. } => "assign",
            Message::Result(_) => "result",
            Message::TaskFailed { .. } => "task_failed",
            Message::Shutdown { .. } => "shutdown",
        }
    }

    /// Structural checks beyond what decoding guarantees.
    fn check(&self) -> Result<(), ProtocolError> {
        match self {
            Message::Hello(h) if h.worker_name.len() > MAX_NAME_LEN => {
                Err(ProtocolError::Invalid(format!("worker name longer than {MAX_NAME_LEN} bytes")))
            }
            Message::Assign { tasks } if tasks.len() > MAX_TASKS_PER_ASSIGN => {
                Err(ProtocolError::Invalid(format!("{} tasks in one Assign (max {MAX_TASKS_PER_ASSIGN})", tasks.len())))
            }
            _ => Ok(()),
        }
    }
}

/// What a receiver accepts; set per stream from what it expects (e.g. a gradient's exact byte size).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub max_header: usize,
    pub max_payload: u64,
}

impl Limits {
    /// Control messages only: no payload.
    pub const CONTROL: Limits = Limits { max_header: MAX_HEADER_BYTES, max_payload: 0 };
    pub fn with_payload(max_payload: u64) -> Limits {
        Limits { max_header: MAX_HEADER_BYTES, max_payload }
    }
    /// A worker's result stream: a `Result` or `TaskFailed` header (a few hundred bytes) and at most a
    /// gradient of `max_payload` bytes.
    pub fn result_stream(max_payload: u64) -> Limits {
        Limits { max_header: MAX_RESULT_HEADER_BYTES, max_payload }
    }
}

#[derive(Debug, Error, PartialEq)]
pub enum ProtocolError {
    #[error("not a metatrain frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("frame header of {got} bytes exceeds the limit of {limit}")]
    HeaderTooLarge { got: u64, limit: usize },
    #[error("frame payload of {got} bytes exceeds the limit of {limit}")]
    PayloadTooLarge { got: u64, limit: u64 },
    #[error("frame header does not decode: {0}")]
    Decode(String),
    #[error("{kind} header declares {} but {actual} bytes follow", declared_payload(.declared))]
    PayloadMismatch { kind: &'static str, declared: Option<u64>, actual: u64 },
    #[error("invalid message: {0}")]
    Invalid(String),
    #[error("frame truncated: needed {needed} bytes, have {have}")]
    Truncated { needed: u64, have: u64 },
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// `PayloadMismatch`'s declared length in words.
fn declared_payload(declared: &Option<u64>) -> String {
    match declared {
        Some(n) => format!("a {n}-byte payload"),
        None => "a payload too large to count".into(),
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_HEADER_BYTES>()
}

/// The prefix and header of a frame carrying `message` and `payload_len` payload bytes.
pub fn encode_head(message: &Message, payload_len: u64) -> Result<Vec<u8>, ProtocolError> {
    if message.payload_len() != Some(payload_len) {
        return Err(ProtocolError::PayloadMismatch {
            kind: message.kind(),
            declared: message.payload_len(),
            actual: payload_len,
        });
    }
    let header =
        bincode::serde::encode_to_vec(message, bincode_config()).map_err(|e| ProtocolError::Encode(e.to_string()))?;
    if header.len() > MAX_HEADER_BYTES {
        return Err(ProtocolError::HeaderTooLarge { got: header.len() as u64, limit: MAX_HEADER_BYTES });
    }
    let mut out = Vec::with_capacity(PREFIX_LEN + header.len());
    out.extend_from_slice(&FRAME_MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&payload_len.to_le_bytes());
    out.extend_from_slice(&header);
    Ok(out)
}

/// A whole frame in one buffer (tests, fuzzing, small messages).
pub fn encode_frame(message: &Message, payload: &[u8]) -> Result<Vec<u8>, ProtocolError> {
    let mut out = encode_head(message, payload.len() as u64)?;
    out.extend_from_slice(payload);
    Ok(out)
}

/// Reads the prefix: `(header_len, payload_len)`, both within `limits`. Nothing is allocated.
pub fn decode_prefix(prefix: &[u8; PREFIX_LEN], limits: &Limits) -> Result<(usize, u64), ProtocolError> {
    let magic = [prefix[0], prefix[1], prefix[2], prefix[3]];
    if magic != FRAME_MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let header_len = u32::from_le_bytes([prefix[4], prefix[5], prefix[6], prefix[7]]) as u64;
    let mut p = [0u8; 8];
    p.copy_from_slice(&prefix[8..16]);
    let payload_len = u64::from_le_bytes(p);
    if header_len > limits.max_header.min(MAX_HEADER_BYTES) as u64 {
        return Err(ProtocolError::HeaderTooLarge { got: header_len, limit: limits.max_header });
    }
    if payload_len > limits.max_payload {
        return Err(ProtocolError::PayloadTooLarge { got: payload_len, limit: limits.max_payload });
    }
    Ok((header_len as usize, payload_len))
}

/// Decodes a header and checks it against the payload length the prefix announced.
pub fn decode_header(header: &[u8], payload_len: u64) -> Result<Message, ProtocolError> {
    let (message, used): (Message, usize) = bincode::serde::decode_from_slice(header, bincode_config())
        .map_err(|e| ProtocolError::Decode(e.to_string()))?;
    if used != header.len() {
        return Err(ProtocolError::Decode(format!("{} trailing bytes after the header", header.len() - used)));
    }
    if message.payload_len() != Some(payload_len) {
        return Err(ProtocolError::PayloadMismatch {
            kind: message.kind(),
            declared: message.payload_len(),
            actual: payload_len,
        });
    }
    message.check()?;
    Ok(message)
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq)]
pub struct Frame {
    pub message: Message,
    pub payload: Vec<u8>,
}

/// Decodes one frame from the front of `bytes`; returns it and the bytes consumed.
pub fn decode_frame(bytes: &[u8], limits: &Limits) -> Result<(Frame, usize), ProtocolError> {
    let prefix: &[u8; PREFIX_LEN] = bytes
        .get(..PREFIX_LEN)
        .and_then(|p| p.try_into().ok())
        .ok_or(ProtocolError::Truncated { needed: PREFIX_LEN as u64, have: bytes.len() as u64 })?;
    let (header_len, payload_len) = decode_prefix(prefix, limits)?;
    let total = PREFIX_LEN as u64 + header_len as u64 + payload_len;
    if (bytes.len() as u64) < total {
        return Err(ProtocolError::Truncated { needed: total, have: bytes.len() as u64 });
    }
    let header = &bytes[PREFIX_LEN..PREFIX_LEN + header_len];
    let message = decode_header(header, payload_len)?;
    let payload = bytes[PREFIX_LEN + header_len..total as usize].to_vec();
    Ok((Frame { message, payload }, total as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::Split;

    fn samples() -> Vec<(Message, Vec<u8>)> {
        let spec = TaskSpec::new(3, Split::Train, 9, 2);
        vec![
            (
                Message::Hello(Hello {
                    protocol_version: PROTOCOL_VERSION,
                    worker_name: "w0".into(),
                    capacity: 2,
                    device: "cpu".into(),
                }),
                vec![],
            ),
            (
                Message::Welcome(Welcome {
                    protocol_version: 1,
                    worker_id: 4,
                    config_toml: "seed = 1\n".into(),
                    layout_fingerprint: "ab".into(),
                }),
                vec![],
            ),
            (Message::Params { version: 7, dtype: Dtype::F32, len: 3 }, vec![0u8; 12]),
            (Message::Assign { tasks: vec![Assignment { id: 11, version: 7, spec, mode: Mode::Train }] }, vec![]),
            (
                Message::Result(TaskResult {
                    id: 11,
                    version: 7,
                    mode: Mode::Train,
                    pre_loss: 2.0,
                    post_loss: 1.0,
                    pre_accuracy: None,
                    post_accuracy: Some(0.5),
                    compute_seconds: 0.01,
                    difficulty: 0.5,
                    grad_dtype: Dtype::F32,
                    grad_len: 2,
                }),
                vec![1u8; 8],
            ),
            (Message::TaskFailed { id: 1, version: 0, reason: "x".into() }, vec![]),
            (Message::Refused { reason: "version".into() }, vec![]),
            (Message::Shutdown { reason: "done".into() }, vec![]),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for (m, payload) in samples() {
            let bytes = encode_frame(&m, &payload).unwrap();
            let (frame, used) = decode_frame(&bytes, &Limits::with_payload(1 << 20)).unwrap();
            assert_eq!(used, bytes.len());
            assert_eq!(frame, Frame { message: m, payload });
        }
    }

    #[test]
    fn oversized_frames_are_refused_from_the_prefix() {
        let m = Message::Params { version: 1, dtype: Dtype::F32, len: 1 << 30 };
        let head = encode_head(&m, 4 << 30).unwrap();
        let prefix: [u8; PREFIX_LEN] = head[..PREFIX_LEN].try_into().unwrap();
        assert_eq!(
            decode_prefix(&prefix, &Limits::with_payload(1 << 20)),
            Err(ProtocolError::PayloadTooLarge { got: 4 << 30, limit: 1 << 20 })
        );
        let mut big_header = prefix;
        big_header[4..8].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert!(matches!(decode_prefix(&big_header, &Limits::CONTROL), Err(ProtocolError::HeaderTooLarge { .. })));
        let mut bad = prefix;
        bad[0] = b'X';
        assert!(matches!(decode_prefix(&bad, &Limits::CONTROL), Err(ProtocolError::BadMagic(_))));
    }

    #[test]
    fn header_must_declare_the_payload_that_follows() {
        let m = Message::Params { version: 1, dtype: Dtype::F32, len: 2 };
        assert!(encode_frame(&m, &[0u8; 4]).is_err());
        // Forge a frame whose prefix announces 4 bytes while the header says 8.
        let mut bytes = encode_frame(&m, &[0u8; 8]).unwrap();
        bytes[8..16].copy_from_slice(&4u64.to_le_bytes());
        bytes.truncate(bytes.len() - 4);
        assert!(matches!(decode_frame(&bytes, &Limits::with_payload(64)), Err(ProtocolError::PayloadMismatch { .. })));
    }

    #[test]
    fn garbage_and_truncation_are_errors() {
        let good = encode_frame(&samples()[0].0, &[]).unwrap();
        for cut in 0..good.len() {
            assert!(decode_frame(&good[..cut], &Limits::CONTROL).is_err());
        }
        let mut g = good.clone();
        for b in g[PREFIX_LEN..].iter_mut() {
            *b = 0xff;
        }
        assert!(decode_frame(&g, &Limits::CONTROL).is_err());
    }

    #[test]
    fn long_names_are_refused() {
        let m = Message::Hello(Hello {
            protocol_version: 1,
            worker_name: "x".repeat(MAX_NAME_LEN + 1),
            capacity: 1,
            device: "cpu".into(),
        });
        let bytes = encode_frame(&m, &[]).unwrap();
        assert!(matches!(decode_frame(&bytes, &Limits::CONTROL), Err(ProtocolError::Invalid(_))));
    }
}
