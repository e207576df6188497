//! The worker's session with a coordinator: connect over QUIC (pinning the coordinator's certificate),
//! say `Hello`, receive `Welcome` with the run's config, then serve: `Params` are kept by version,
//! `Assign`ed tasks go to the compute pool, and each outcome goes back on a stream of its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use metatrain_common::config::Config;
use metatrain_common::layout::{meta_layout, ModelSpec};
use metatrain_common::net::{client_endpoint, read_frame, server_name, write_frame, Identity, NetError, ServerTrust};
use metatrain_common::protocol::{Frame, Hello, Limits, Message, Mode, PROTOCOL_VERSION};
use metatrain_common::tensor::{decode_f32, encode};
use tch::Device;

use crate::compute::{spawn_pool, ComputeContext, Job, Outcome};
use crate::data::load_datasets;

/// How many parameter versions a worker keeps (the current step's, the next's, and an evaluation's).
const KEPT_VERSIONS: usize = 3;

pub struct ClientOptions {
    pub coordinator: SocketAddr,
    /// How to verify the coordinator.
    pub trust: ServerTrust,
    /// This worker's certificate, for mutual TLS.
    pub identity: Option<Identity>,
    pub name: String,
    /// Compute threads.
    pub capacity: usize,
    /// Most training tasks one compute thread computes as one batch.
    pub batch: usize,
    /// libtorch intra-op threads per compute thread.
    pub threads: usize,
    /// Devices for the compute threads (round robin).
    pub devices: Vec<Device>,
    pub data_dir: Option<PathBuf>,
    /// Keep trying to connect this long before giving up (at start and after a lost connection).
    pub connect_timeout: Duration,
    /// After a run ends, wait (up to `connect_timeout`) for the next one on the same address instead of
    /// exiting: a worker pool shared by the runs of a sweep.
    pub stay: bool,
}

/// How a session ended.
pub enum SessionEnd {
    /// The coordinator said the run is over.
    Shutdown(String),
}

/// Why a session stopped early.
enum SessionError {
    /// The connection was lost (coordinator killed or restarting, network cut): worth reconnecting.
    Lost(anyhow::Error),
    /// Refused, misconfigured or a protocol violation: reconnecting would not help.
    Fatal(anyhow::Error),
}

/// With `stay`, pause after a run ends before connecting to the next one.
const NEXT_RUN_PAUSE: Duration = Duration::from_secs(1);
/// Pause between connection attempts.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Shortest time one connection attempt is given, even when the deadline is nearer (a QUIC handshake
/// on loopback takes milliseconds; across a WAN well under a second).
const MIN_ATTEMPT: Duration = Duration::from_secs(1);

/// QUIC close codes the coordinator uses for a refusal or a protocol error (see its server module).
const CLOSE_PROTOCOL_ERROR: u32 = 1;
const CLOSE_REFUSED: u32 = 2;

/// Connects (retrying until `connect_timeout`) and serves until the coordinator shuts the run down. A
/// lost connection is re-established (again for up to `connect_timeout`); tasks in flight on the lost
/// one are reassigned by the coordinator.
pub async fn run(opts: ClientOptions) -> Result<SessionEnd> {
    let endpoint = client_endpoint(&opts.trust, opts.identity.as_ref()).map_err(|e| anyhow!(e))?;
    // Connection attempts (including sessions lost before they were welcomed) stop at this deadline;
    // each welcomed session that is later lost starts a new one.
    let mut deadline = Instant::now() + opts.connect_timeout;
    loop {
        let connection = connect(&endpoint, &opts, deadline).await?;
        let mut welcomed = false;
        let result = serve(&connection, &opts, &mut welcomed).await;
        let result = match result {
            Ok(end) => Ok(end),
            Err(e) => Err(classify(&connection, e)),
        };
        connection.close(0u32.into(), b"worker done");
        match result {
            Ok(SessionEnd::Shutdown(reason)) if opts.stay => {
                tracing::info!(
                    "the run ended ({reason}); waiting up to {}s for the next one",
                    opts.connect_timeout.as_secs()
                );
                deadline = Instant::now() + opts.connect_timeout;
                // Let the finished coordinator close its endpoint before knocking again.
                tokio::time::sleep(NEXT_RUN_PAUSE).await;
            }
            Ok(end) => {
                endpoint.wait_idle().await;
                return Ok(end);
            }
            Err(SessionError::Lost(e)) if welcomed => {
                metrics::counter!("metatrain_worker_reconnects_total").increment(1);
                tracing::warn!(
                    "lost the coordinator ({e:#}); reconnecting for up to {}s",
                    opts.connect_timeout.as_secs()
                );
                deadline = Instant::now() + opts.connect_timeout;
            }
            Err(SessionError::Lost(e)) if Instant::now() < deadline => {
                tracing::info!("connection to {} lost during the handshake ({e:#}); retrying", opts.coordinator);
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(SessionError::Lost(e)) => {
                endpoint.wait_idle().await;
                return Err(e.context(format!("cannot join the coordinator at {}", opts.coordinator)));
            }
            Err(SessionError::Fatal(e)) => {
                endpoint.wait_idle().await;
                return Err(e);
            }
        }
    }
}

async fn connect(endpoint: &quinn::Endpoint, opts: &ClientOptions, deadline: Instant) -> Result<quinn::Connection> {
    loop {
        let attempt = async { endpoint.connect(opts.coordinator, server_name())?.await.map_err(anyhow::Error::from) };
        // One attempt may not outlast the deadline by more than a moment (a silent address would
        // otherwise hold it for QUIC's whole idle timeout).
        let budget = deadline.saturating_duration_since(Instant::now()).max(MIN_ATTEMPT);
        let attempt = async {
            tokio::time::timeout(budget, attempt)
                .await
                .unwrap_or_else(|_| Err(anyhow!("no answer within {:.1}s", budget.as_secs_f64())))
        };
        match attempt.await {
            Ok(c) => return Ok(c),
            // Our verification of the coordinator's certificate failed: retrying cannot help.
            Err(e) if e.to_string().contains("invalid peer certificate") => {
                return Err(e.context(format!(
                    "the coordinator at {} presented a certificate this worker does not trust (check --ca or --fingerprint)",
                    opts.coordinator
                )))
            }
            Err(e) if Instant::now() < deadline => {
                tracing::info!("coordinator {} not reachable yet ({e}); retrying", opts.coordinator);
                tokio::time::sleep(RETRY_PAUSE).await;
            }
            Err(e) => return Err(e.context(format!("cannot connect to the coordinator at {}", opts.coordinator))),
        }
    }
}

/// A session error is worth a reconnect only when the connection itself failed, not when the
/// coordinator refused us or we broke the protocol.
fn classify(connection: &quinn::Connection, e: anyhow::Error) -> SessionError {
    match connection.close_reason() {
        Some(quinn::ConnectionError::ApplicationClosed(c))
            if c.error_code == CLOSE_REFUSED.into() || c.error_code == CLOSE_PROTOCOL_ERROR.into() =>
        {
            let why = String::from_utf8_lossy(&c.reason).into_owned();
            SessionError::Fatal(e.context(format!("the coordinator closed the connection: {why}")))
        }
        // A TLS alert (QUIC crypto error 0x100..=0x1ff): e.g. our certificate was not accepted.
        Some(quinn::ConnectionError::ConnectionClosed(c)) if (0x100..0x200).contains(&u64::from(c.error_code)) => {
            SessionError::Fatal(e.context(format!(
                "the coordinator refused the TLS handshake ({c}); does this worker have a certificate from the cluster's CA (--cert/--key)?"
            )))
        }
        Some(quinn::ConnectionError::TimedOut)
        | Some(quinn::ConnectionError::Reset)
        | Some(quinn::ConnectionError::ConnectionClosed(_))
        | Some(quinn::ConnectionError::ApplicationClosed(_)) => SessionError::Lost(e),
        _ => SessionError::Fatal(e),
    }
}

/// One session; sets `welcomed` once the coordinator accepted this worker.
async fn serve(connection: &quinn::Connection, opts: &ClientOptions, welcomed: &mut bool) -> Result<SessionEnd> {
    let (mut send, mut recv) = connection.open_bi().await.context("opening the control stream")?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        worker_name: opts.name.clone(),
        // Tasks this worker computes at once: every compute thread a full batch.
        capacity: (opts.capacity * opts.batch) as u32,
        device: opts.devices.iter().map(|d| format!("{d:?}").to_lowercase()).collect::<Vec<_>>().join(","),
    };
    write_frame(&mut send, &Message::Hello(hello.clone()), &[]).await?;
    let welcome = match read_frame(&mut recv, &Limits::CONTROL).await?.map(|f| f.message) {
        Some(Message::Welcome(w)) => w,
        Some(Message::Refused { reason }) => bail!("the coordinator refused this worker: {reason}"),
        Some(other) => bail!("expected Welcome, got {}", other.kind()),
        None => bail!("the coordinator closed the control stream during the handshake"),
    };
    *welcomed = true;
    let config = Config::from_toml(&welcome.config_toml).context("the coordinator sent an invalid config")?;
    let spec = ModelSpec::from_config(&config);
    let layout = meta_layout(&spec, &config.model, &config.algo);
    if layout.fingerprint() != welcome.layout_fingerprint {
        bail!(
            "parameter layout mismatch: the coordinator's model differs from what this worker builds (version skew?)"
        );
    }
    tracing::info!(
        "joined as worker {} ({} {} on {})",
        welcome.worker_id,
        config.algo.name.name(),
        config.model.name.name(),
        hello.device
    );
    let datasets = load_datasets(&config, opts.data_dir.as_deref())?;
    let lora_base = load_lora_base(&config, &spec)?;
    let numel = layout.numel();
    let ctx = Arc::new(ComputeContext {
        config,
        spec,
        layout,
        datasets,
        lora_base,
        devices: opts.devices.clone(),
        batch: opts.batch,
    });
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    // Dropped when the session ends, however it ends: stops and joins the compute threads.
    let pool = spawn_pool(ctx, opts.capacity, opts.threads, out_tx);
    // The control stream is read by a task of its own: a frame is never dropped half-read because an
    // outcome became ready (as it would be if `read_frame` raced `out_rx` in one `select!`).
    let control = ControlReader::spawn(recv, Limits::with_payload(numel as u64 * 4));
    let mut frames = control.frames;
    let mut versions: BTreeMap<u64, Arc<Vec<f32>>> = BTreeMap::new();
    loop {
        tokio::select! {
            frame = frames.recv() => {
                let Some(frame) = frame.transpose()? else { bail!("the coordinator closed the control stream") };
                match frame.message {
                    Message::Params { version, dtype, .. } => {
                        // The length is checked against this worker's own layout, not the header's claim.
                        let params = decode_f32(&frame.payload, dtype, numel).context("bad parameters from the coordinator")?;
                        versions.insert(version, Arc::new(params));
                        while versions.len() > KEPT_VERSIONS {
                            versions.pop_first();
                        }
                        metrics::counter!("metatrain_worker_params_received_total").increment(1);
                    }
                    Message::Assign { tasks } => {
                        // One message's tasks go to the pool together, so that they can be computed as a batch.
                        let jobs = tasks
                            .into_iter()
                            .map(|assignment| {
                                let params = versions.get(&assignment.version).cloned().ok_or_else(|| {
                                    anyhow!("task {} needs parameters v{} that were never sent", assignment.id, assignment.version)
                                })?;
                                Ok(Job { assignment, params })
                            })
                            .collect::<Result<Vec<_>>>()?;
                        pool.send(jobs).map_err(|_| anyhow!("compute pool stopped"))?;
                    }
                    Message::Shutdown { reason } => return Ok(SessionEnd::Shutdown(reason)),
                    other => bail!("unexpected {} message from the coordinator", other.kind()),
                }
            }
            Some(outcome) = out_rx.recv() => send_outcome(connection, outcome).await?,
        }
    }
}

/// Reads control frames on a task of its own and hands them over whole. `None` from `frames`: the
/// coordinator finished the stream cleanly. Dropping the reader stops its task.
struct ControlReader {
    frames: tokio::sync::mpsc::Receiver<Result<Frame, NetError>>,
}

impl ControlReader {
    fn spawn(mut recv: quinn::RecvStream, limits: Limits) -> ControlReader {
        // Two frames of look-ahead (Params then Assign) is all the pipelining the protocol has.
        let (tx, frames) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            loop {
                let next = read_frame(&mut recv, &limits).await.transpose();
                let Some(next) = next else { return };
                let failed = next.is_err();
                // The session ended (receiver dropped), or the stream failed: stop.
                if tx.send(next).await.is_err() || failed {
                    return;
                }
            }
        });
        ControlReader { frames }
    }
}

async fn send_outcome(connection: &quinn::Connection, outcome: Outcome) -> Result<()> {
    let a = &outcome.assignment;
    let mode = match a.mode {
        Mode::Train => "train",
        Mode::Eval => "eval",
    };
    let (message, payload) = match outcome.result {
        Ok((result, grad)) => {
            metrics::histogram!("metatrain_worker_task_duration_seconds", "mode" => mode)
                .record(result.compute_seconds as f64);
            metrics::counter!("metatrain_worker_tasks_completed_total", "mode" => mode).increment(1);
            {
                let payload = encode(&grad, result.grad_dtype);
                (Message::Result(result), payload)
            }
        }
        Err(reason) => {
            tracing::warn!("task {} failed: {reason}", a.id);
            metrics::counter!("metatrain_worker_tasks_failed_total").increment(1);
            (Message::TaskFailed { id: a.id, version: a.version, reason }, Vec::new())
        }
    };
    let mut stream = connection.open_uni().await.context("opening a result stream")?;
    write_frame(&mut stream, &message, &payload).await?;
    stream.finish()?;
    metrics::counter!("metatrain_worker_sent_bytes_total").increment(payload.len() as u64);
    Ok(())
}

/// LoRA's frozen base, from `model.lora_base` (relative to the directory this worker started in), checked
/// against the hash the coordinator put in the run's config. `None` without LoRA.
fn load_lora_base(config: &Config, spec: &ModelSpec) -> Result<Option<metatrain_common::lora::LoraBase>> {
    if !config.model.lora() {
        return Ok(None);
    }
    let (Some(path), Some(sha)) = (&config.model.lora_base, &config.model.lora_base_sha256) else {
        bail!("the coordinator's LoRA config names no base file or hash");
    };
    let base = metatrain_common::lora::load_base(std::path::Path::new(path), spec, Some(sha))
        .context("this worker needs the same LoRA base file as the coordinator, at the same path")?;
    tracing::info!("LoRA base {path} (sha256 {}…), rank {}", &base.sha256[..12], config.model.lora_rank);
    Ok(Some(base))
}
