//! A simulated worker: the real protocol over QUIC (connect, `Hello`, `Welcome`, then `Params` and
//! `Assign` on the control stream, one `Result` per task on a stream of its own), with no model. Each
//! assignment is answered at once with the same precomputed gradient, so the coordinator is the
//! bottleneck.
//!
//! To stay cheap at 1,000 workers and 100M parameters, a simulated worker keeps nothing per version:
//! it reads each `Params` payload and drops it chunk by chunk (a real worker decodes and keeps it), and
//! every worker sends the one shared gradient ([`Bytes`], reference-counted, never copied). It counts
//! the frames it receives and sends, byte for byte, into [`SimCounters`] shared by all of them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use metatrain_common::net::{client_endpoint, server_name, write_frame, ServerTrust};
use metatrain_common::protocol::{
    decode_header, decode_prefix, encode_head, Assignment, Hello, Limits, Message, Mode, TaskResult, PREFIX_LEN,
    PROTOCOL_VERSION,
};
use metatrain_common::tensor::Dtype;
use quinn::RecvStream;
use thiserror::Error;

use metatrain_common::net::set_recv_buffer;

/// Receive buffer each simulated worker asks for (Linux caps it at `net.core.rmem_max`, then doubles
/// it): with the default (~208 KiB) a worker that shares the cores with the coordinator drops parameter
/// datagrams whenever it is not scheduled, and the coordinator then waits on QUIC's loss recovery for
/// the simulation's sake. Real workers drain their socket from a runtime of their own.
pub const RECV_BUFFER: usize = 8 << 20;

/// Simulated workers in their handshake at once. A thousand Initial packets at the same instant
/// overflow the coordinator's socket buffer, and QUIC's handshake retransmission backs off for
/// seconds; real workers start at different times. (Joining is not part of the measurement.)
pub const JOIN_CONCURRENCY: usize = 64;
/// Connection attempts before a simulated worker gives up (a real worker retries until its timeout).
const CONNECT_ATTEMPTS: u32 = 3;

/// Tasks one simulated worker says it computes at once (`Hello.capacity`); its in-flight limit is this
/// times `cluster.tasks_in_flight`, which the benchmark sets to its tasks per worker.
pub const CAPACITY: u32 = 1;

#[derive(Debug, Error)]
pub enum SimError {
    #[error("cannot make the client endpoint: {0}")]
    Endpoint(String),
    #[error("socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("stream: {0}")]
    Stream(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("refused by the coordinator: {0}")]
    Refused(String),
}

fn stream_err(e: impl std::fmt::Display) -> SimError {
    SimError::Stream(e.to_string())
}

/// What every simulated worker needs; shared by all of them.
pub struct SimShared {
    pub coordinator: SocketAddr,
    /// The coordinator certificate's SHA-256 (pinned, as real workers do).
    pub fingerprint: String,
    pub numel: usize,
    /// The gradient every train-mode result carries, encoded once.
    pub gradient: Bytes,
    pub counters: SimCounters,
    /// Admits [`JOIN_CONCURRENCY`] handshakes at once.
    pub join_gate: tokio::sync::Semaphore,
    /// The local UDP port of each simulated worker (to read the kernel's drops at its socket).
    pub ports: Mutex<Vec<u16>>,
    /// The first error any simulated worker met.
    pub error: Mutex<Option<String>>,
}

/// Frames as the simulated workers saw them (the coordinator's side of each stream, exactly: QUIC
/// streams are reliable and ordered). Bytes count prefix, header and payload. A frame received is
/// counted once read; a frame sent, before it is written; so a reading taken between meta-steps holds
/// exactly the frames of the steps before it.
#[derive(Debug, Default)]
pub struct SimCounters {
    pub welcomed: AtomicU64,
    /// Frames the coordinator sent (after `Welcome`): `Params`, `Assign`, `Shutdown`.
    pub frame_bytes_in: AtomicU64,
    pub params_frames: AtomicU64,
    pub params_payload_bytes: AtomicU64,
    pub assign_frames: AtomicU64,
    pub assign_frame_bytes: AtomicU64,
    pub assignments: AtomicU64,
    /// `Result` frames sent.
    pub frame_bytes_out: AtomicU64,
    pub results: AtomicU64,
    pub result_payload_bytes: AtomicU64,
}

/// A reading of [`SimCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SimReading {
    pub frame_bytes_in: u64,
    pub params_frames: u64,
    pub params_payload_bytes: u64,
    pub assign_frames: u64,
    pub assign_frame_bytes: u64,
    pub assignments: u64,
    pub frame_bytes_out: u64,
    pub results: u64,
    pub result_payload_bytes: u64,
}

impl SimCounters {
    /// Workers welcomed so far.
    pub fn read_welcomed(&self) -> u64 {
        self.welcomed.load(Ordering::Relaxed)
    }

    pub fn read(&self) -> SimReading {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SimReading {
            frame_bytes_in: r(&self.frame_bytes_in),
            params_frames: r(&self.params_frames),
            params_payload_bytes: r(&self.params_payload_bytes),
            assign_frames: r(&self.assign_frames),
            assign_frame_bytes: r(&self.assign_frame_bytes),
            assignments: r(&self.assignments),
            frame_bytes_out: r(&self.frame_bytes_out),
            results: r(&self.results),
            result_payload_bytes: r(&self.result_payload_bytes),
        }
    }
}

impl std::ops::Sub for SimReading {
    type Output = SimReading;
    fn sub(self, e: SimReading) -> SimReading {
        SimReading {
            frame_bytes_in: self.frame_bytes_in - e.frame_bytes_in,
            params_frames: self.params_frames - e.params_frames,
            params_payload_bytes: self.params_payload_bytes - e.params_payload_bytes,
            assign_frames: self.assign_frames - e.assign_frames,
            assign_frame_bytes: self.assign_frame_bytes - e.assign_frame_bytes,
            assignments: self.assignments - e.assignments,
            frame_bytes_out: self.frame_bytes_out - e.frame_bytes_out,
            results: self.results - e.results,
            result_payload_bytes: self.result_payload_bytes - e.result_payload_bytes,
        }
    }
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Runs simulated worker `index` until the coordinator shuts the run down; records its error, if any.
pub async fn run(shared: Arc<SimShared>, index: usize) {
    if let Err(e) = serve(&shared, index).await {
        if let Ok(mut first) = shared.error.lock() {
            first.get_or_insert_with(|| format!("simulated worker {index}: {e}"));
        }
    }
}

async fn serve(shared: &Arc<SimShared>, index: usize) -> Result<(), SimError> {
    // One endpoint (UDP socket) per worker, as separate worker processes have.
    let endpoint =
        client_endpoint(&ServerTrust::Fingerprint(shared.fingerprint.clone()), None).map_err(SimError::Endpoint)?;
    let socket = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0)).map_err(SimError::Socket)?;
    set_recv_buffer(&socket, RECV_BUFFER).map_err(SimError::Socket)?;
    let port = socket.local_addr().map_err(SimError::Socket)?.port();
    endpoint.rebind(socket).map_err(SimError::Socket)?;
    if let Ok(mut ports) = shared.ports.lock() {
        ports.push(port);
    }
    let gate = shared.join_gate.acquire().await.map_err(|e| SimError::Connect(e.to_string()))?;
    let conn = connect(&endpoint, shared.coordinator).await?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(stream_err)?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        worker_name: format!("sim-{index}"),
        capacity: CAPACITY,
        device: "simulated".into(),
    };
    write_frame(&mut send, &Message::Hello(hello), &[]).await.map_err(stream_err)?;
    match read_drained(&mut recv, &Limits::CONTROL).await?.map(|(m, _)| m) {
        Some(Message::Welcome(_)) => {
            add(&shared.counters.welcomed, 1);
            drop(gate);
        }
        Some(Message::Refused { reason }) => return Err(SimError::Refused(reason)),
        other => return Err(SimError::Protocol(format!("expected Welcome, got {other:?}"))),
    }
    let limits = Limits::with_payload(shared.numel as u64 * Dtype::F32.size() as u64);
    let c = &shared.counters;
    let outcome = loop {
        let Some((message, bytes)) = read_drained(&mut recv, &limits).await? else {
            break Err(SimError::Protocol("the coordinator closed the control stream without Shutdown".into()));
        };
        add(&c.frame_bytes_in, bytes);
        match message {
            Message::Params { len, .. } => {
                if len != shared.numel as u64 {
                    break Err(SimError::Protocol(format!("Params of {len} values, the layout has {}", shared.numel)));
                }
                add(&c.params_frames, 1);
                add(&c.params_payload_bytes, len * Dtype::F32.size() as u64);
            }
            Message::Assign { tasks } => {
                add(&c.assign_frames, 1);
                add(&c.assign_frame_bytes, bytes);
                add(&c.assignments, tasks.len() as u64);
                for a in tasks {
                    // Each result on its own stream, concurrently, as a worker with free slots sends them.
                    let (conn, shared) = (conn.clone(), shared.clone());
                    tokio::spawn(async move {
                        if let Err(e) = send_result(&conn, &shared, &a).await {
                            if let Ok(mut first) = shared.error.lock() {
                                first.get_or_insert_with(|| format!("simulated worker {index}: {e}"));
                            }
                        }
                    });
                }
            }
            Message::Shutdown { .. } => break Ok(()),
            other => break Err(SimError::Protocol(format!("unexpected {} from the coordinator", other.kind()))),
        }
    };
    conn.close(0u32.into(), b"simulated worker done");
    endpoint.wait_idle().await;
    outcome
}

async fn connect(endpoint: &quinn::Endpoint, coordinator: SocketAddr) -> Result<quinn::Connection, SimError> {
    let mut attempt = 1;
    loop {
        let connecting = endpoint.connect(coordinator, server_name()).map_err(|e| SimError::Connect(e.to_string()))?;
        match connecting.await {
            Ok(conn) => return Ok(conn),
            Err(e) if attempt >= CONNECT_ATTEMPTS => {
                return Err(SimError::Connect(format!("{e} (after {attempt} attempts)")));
            }
            Err(_) => attempt += 1,
        }
    }
}

/// Answers one assignment: plausible losses and, in train mode, the shared gradient.
async fn send_result(conn: &quinn::Connection, shared: &SimShared, a: &Assignment) -> Result<(), SimError> {
    let payload = match a.mode {
        Mode::Train => shared.gradient.clone(),
        Mode::Eval => Bytes::new(),
    };
    // Losses that vary by task and fall with adaptation, like a regression task's.
    let pre_loss = 1.0 + (a.spec.index % 7) as f32 * 0.1;
    let result = TaskResult {
        id: a.id,
        version: a.version,
        mode: a.mode,
        pre_loss,
        post_loss: 0.5 * pre_loss,
        pre_accuracy: None,
        post_accuracy: None,
        compute_seconds: 0.0,
        difficulty: 0.5,
        grad_dtype: Dtype::F32,
        grad_len: payload.len() as u64 / Dtype::F32.size() as u64,
    };
    let head = encode_head(&Message::Result(result), payload.len() as u64).map_err(stream_err)?;
    let mut stream = conn.open_uni().await.map_err(stream_err)?;
    // Counted before it is written, so that a reading taken after the coordinator accepted the result
    // includes it (a count after the write could lag behind a reading the result has already ended).
    add(&shared.counters.frame_bytes_out, (head.len() + payload.len()) as u64);
    add(&shared.counters.result_payload_bytes, payload.len() as u64);
    add(&shared.counters.results, 1);
    stream.write_all_chunks(&mut [Bytes::from(head), payload]).await.map_err(stream_err)?;
    stream.finish().map_err(stream_err)?;
    Ok(())
}

/// Reads one frame within `limits` and discards its payload as it arrives. Returns the message and the
/// frame's size in bytes; `None` if the stream ended cleanly between frames.
async fn read_drained(recv: &mut RecvStream, limits: &Limits) -> Result<Option<(Message, u64)>, SimError> {
    let mut prefix = [0u8; PREFIX_LEN];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(stream_err(e)),
    }
    let (header_len, payload_len) = decode_prefix(&prefix, limits).map_err(|e| SimError::Protocol(e.to_string()))?;
    let mut header = vec![0u8; header_len];
    recv.read_exact(&mut header).await.map_err(stream_err)?;
    let message = decode_header(&header, payload_len).map_err(|e| SimError::Protocol(e.to_string()))?;
    let mut left = payload_len;
    while left > 0 {
        let want = left.min(usize::MAX as u64) as usize;
        match recv.read_chunk(want, true).await.map_err(stream_err)? {
            Some(chunk) => left -= chunk.bytes.len() as u64,
            None => return Err(SimError::Protocol("the stream ended inside a payload".into())),
        }
    }
    Ok(Some((message, (PREFIX_LEN + header_len) as u64 + payload_len)))
}
