//! One worker connection: handshake, then a writer for the control stream and a reader per result stream.

use std::sync::Arc;
use std::time::Duration;

use metatrain_common::net::{read_frame, read_result_head, read_result_payload, write_frame, NetError};
use metatrain_common::protocol::{Limits, Message};
use metatrain_common::tensor::Dtype;
use tokio::sync::mpsc;

use super::handlers::{self, HandlerError};
use super::{Admission, ConnectionReceiving, Event, Outbound, ServerContext};

/// A worker must say Hello this soon after connecting.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A result stream must deliver its whole frame this soon after opening (bounds slow-loris streams; a
/// 400 MB gradient at 100 MB/s takes 4 s).
const RESULT_STREAM_TIMEOUT: Duration = Duration::from_secs(120);

/// Connections (workers, and peers still in their handshake) served at once. Each may buffer up to 64
/// result streams; this bounds the coordinator's memory and descriptors against connection floods
/// while leaving room for far more workers than a run uses.
const MAX_CONNECTIONS: usize = 1024;

/// Connections one worker name may hold at once: its own, plus room for reconnects that overlap old
/// connections' timeouts; beyond it the name's oldest connection is closed (see `NameSlots`).
const MAX_CONNECTIONS_PER_NAME: usize = 4;

/// How often each connection's QUIC round-trip time (kept fresh by keep-alives) is recorded.
const RTT_SAMPLE: Duration = Duration::from_secs(5);

/// QUIC application close codes.
const CLOSE_DONE: u32 = 0;
const CLOSE_PROTOCOL_ERROR: u32 = 1;
const CLOSE_REFUSED: u32 = 2;

/// Accepts connections until the endpoint closes; beyond [`MAX_CONNECTIONS`] new ones are refused.
pub async fn serve(endpoint: quinn::Endpoint, ctx: Arc<ServerContext>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::warn!("refused a connection from {}: {MAX_CONNECTIONS} already open", incoming.remote_address());
            incoming.refuse();
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => handle(conn, ctx).await,
                Err(e) => tracing::warn!("connection from {remote} failed during TLS: {e}"),
            }
        });
    }
}

async fn handle(conn: quinn::Connection, ctx: Arc<ServerContext>) {
    let remote = conn.remote_address();
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let (send, mut recv) = conn.accept_bi().await.map_err(|e| HandlerError::Protocol(e.to_string()))?;
        let frame = read_frame(&mut recv, &Limits::CONTROL).await.map_err(|e| HandlerError::Protocol(e.to_string()))?;
        match frame.map(|f| f.message) {
            Some(Message::Hello(hello)) => Ok((send, recv, hello)),
            Some(other) => Err(HandlerError::Protocol(format!("expected Hello, got {}", other.kind()))),
            None => Err(HandlerError::Protocol("stream closed before Hello".into())),
        }
    })
    .await
    .unwrap_or_else(|_| Err(HandlerError::Protocol("no Hello within the handshake timeout".into())));
    let (mut send, mut control_recv, hello) = match handshake {
        Ok(h) => h,
        Err(e) => {
            tracing::warn!("worker at {remote}: {e}");
            conn.close(CLOSE_PROTOCOL_ERROR.into(), e.to_string().as_bytes());
            return;
        }
    };
    // The authenticated name (certificate common name) wins over the name the worker claims.
    let name = metatrain_common::net::peer_name(&conn).unwrap_or_else(|| hello.worker_name.clone());
    let admitted = handlers::hello::handle(&ctx, &hello, &name).and_then(|w| {
        let slot = ctx
            .names
            .take(&name, MAX_CONNECTIONS_PER_NAME, {
                let conn = conn.clone();
                Box::new(move || {
                    conn.close(
                        CLOSE_REFUSED.into(),
                        b"superseded by a newer connection under this worker name (a restarted process?)",
                    )
                })
            })
            .ok_or_else(|| "the coordinator's connection table is unavailable".to_string())?;
        Ok((w, slot))
    });
    let (welcome, _name_slot) = match admitted {
        Ok(w) => w,
        Err(reason) => {
            tracing::warn!("refused worker {name:?} at {remote}: {reason}");
            let _ = write_frame(&mut send, &Message::Refused { reason: reason.clone() }, &[]).await;
            let _ = send.finish();
            let _ = tokio::time::timeout(Duration::from_secs(2), send.stopped()).await;
            conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
            return;
        }
    };
    // A worker sends nothing more on the control stream: tell it to stop, and buffer nothing it sends.
    let _ = control_recv.stop(CLOSE_DONE.into());
    // Only now may it open result streams (none were allowed during the handshake).
    metatrain_common::net::allow_result_streams(&conn);
    let worker = welcome.worker_id;
    if let Err(e) = write_frame(&mut send, &Message::Welcome(welcome), &[]).await {
        tracing::warn!("worker {worker} at {remote}: {e}");
        return;
    }
    let (outbox, mut rx) = mpsc::unbounded_channel::<Outbound>();
    let joined = Event::Joined { worker, name: name.clone(), capacity: hello.capacity, outbox };
    if ctx.events.send(joined).await.is_err() {
        return;
    }
    tracing::info!("worker {worker} ({}, {}, capacity {}) joined from {remote}", name, hello.device, hello.capacity);

    let rtt_conn = conn.clone();
    let rtt = tokio::spawn(async move {
        let mut every = tokio::time::interval(RTT_SAMPLE);
        loop {
            every.tick().await;
            if rtt_conn.close_reason().is_some() {
                return;
            }
            metrics::histogram!("metatrain_heartbeat_rtt_seconds").record(rtt_conn.rtt().as_secs_f64());
        }
    });
    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        while let Some(out) = rx.recv().await {
            let sent = match &out {
                Outbound::Params { version, len, payload } => {
                    let m = Message::Params { version: *version, dtype: Dtype::F32, len: *len };
                    metrics::counter!("metatrain_sent_bytes_total").increment(payload.len() as u64);
                    write_frame(&mut send, &m, payload).await
                }
                Outbound::Assign(tasks) => write_frame(&mut send, &Message::Assign { tasks: tasks.clone() }, &[]).await,
                Outbound::Disconnect(reason) => {
                    writer_conn.close(CLOSE_REFUSED.into(), reason.as_bytes());
                    return Ok(());
                }
                Outbound::Shutdown(reason) => {
                    let r = write_frame(&mut send, &Message::Shutdown { reason: reason.clone() }, &[]).await;
                    let _ = send.finish();
                    r
                }
            };
            if let Err(e) = sent {
                writer_conn.close(CLOSE_PROTOCOL_ERROR.into(), b"control stream write failed");
                return Err::<(), NetError>(e);
            }
        }
        Ok(())
    });

    let reason = read_results(&conn, &ctx, worker).await;
    writer.abort();
    rtt.abort();
    match &reason {
        Ok(why) => tracing::info!("worker {worker} left: {why}"),
        Err(e) => {
            tracing::warn!("worker {worker} disconnected: {e}");
            conn.close(CLOSE_PROTOCOL_ERROR.into(), e.to_string().as_bytes());
        }
    }
    let reason = match reason {
        Ok(r) => r,
        Err(e) => {
            let _ = ctx.events.send(Event::Malformed { worker, reason: e.to_string() }).await;
            e.to_string()
        }
    };
    let _ = ctx.events.send(Event::Left { worker, reason }).await;
}

/// Reads one frame per result stream until the connection ends. `Ok(reason)`: a clean end.
async fn read_results(conn: &quinn::Connection, ctx: &Arc<ServerContext>, worker: u64) -> Result<String, HandlerError> {
    let limits = Limits::result_stream(ctx.numel as u64 * 4);
    let (errors_tx, mut errors_rx) = mpsc::channel::<HandlerError>(1);
    let receiving = Arc::new(ConnectionReceiving::default());
    loop {
        tokio::select! {
            stream = conn.accept_uni() => {
                let mut stream = match stream {
                    Ok(s) => s,
                    Err(quinn::ConnectionError::ApplicationClosed(c)) if c.error_code == CLOSE_DONE.into() => {
                        return Ok("closed by the worker".into())
                    }
                    Err(e) => return Ok(e.to_string()),
                };
                let (ctx, errors_tx, receiving) = (ctx.clone(), errors_tx.clone(), receiving.clone());
                tokio::spawn(async move {
                    if let Err(e) = read_result_stream(&mut stream, &limits, &ctx, &receiving, worker).await {
                        let _ = errors_tx.try_send(e);
                    }
                });
            }
            Some(e) = errors_rx.recv() => return Err(e),
        }
    }
}

/// One result stream: its header, then (within the receive budget) its payload, then its handler.
async fn read_result_stream(
    stream: &mut quinn::RecvStream,
    limits: &Limits,
    ctx: &ServerContext,
    receiving: &Arc<ConnectionReceiving>,
    worker: u64,
) -> Result<(), HandlerError> {
    let too_slow = |_| HandlerError::Protocol("result stream too slow".into());
    let protocol = |e: NetError| HandlerError::Protocol(e.to_string());
    let head = tokio::time::timeout(RESULT_STREAM_TIMEOUT, read_result_head(stream, limits)).await.map_err(too_slow)?;
    let (message, payload_len) =
        head.map_err(protocol)?.ok_or_else(|| HandlerError::Protocol("empty result stream".into()))?;
    // Reserved before the payload is read, for the gradient as decoded (f32), whatever the wire dtype.
    // The wait is not the worker's doing, so it is not timed.
    // Only a `Result` may carry a payload (`read_result_head` checked that).
    let task = match &message {
        Message::Result(r) if payload_len > 0 => Some(r.id),
        _ => None,
    };
    let admission = match task {
        None => None,
        Some(task) => {
            let waiting = metrics::gauge!("metatrain_result_streams_waiting");
            waiting.increment(1.0);
            let admission = ctx.receive_budget.admit(receiving, task, ctx.numel as u64 * 4).await;
            waiting.decrement(1.0);
            Some(admission)
        }
    };
    let frame =
        tokio::time::timeout(RESULT_STREAM_TIMEOUT, read_result_payload(stream, message, payload_len, ctx.numel))
            .await
            .map_err(too_slow)?
            .map_err(protocol)?;
    // The stream is read: its connection's other streams wait for the budget again.
    let permit = match admission {
        Some(Admission::Reserved(permit, reading)) => {
            drop(reading);
            Some(permit)
        }
        Some(Admission::Riding(reading)) => {
            drop(reading);
            None
        }
        None => None,
    };
    handlers::dispatch(ctx, worker, frame, permit).await
}
