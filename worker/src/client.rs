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
use metatrain_common::layout::ModelSpec;
use metatrain_common::net::{client_endpoint, read_frame, server_name, write_frame, Identity, ServerTrust};
use metatrain_common::protocol::{Hello, Limits, Message, Mode, PROTOCOL_VERSION};
use metatrain_common::tensor::{decode_f32, encode_f32};
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
    pub capacity: usize,
    /// libtorch intra-op threads per compute thread.
    pub threads: usize,
    pub device: Device,
    pub data_dir: Option<PathBuf>,
    /// Keep trying to connect this long before giving up.
    pub connect_timeout: Duration,
}

/// How a session ended.
pub enum SessionEnd {
    /// The coordinator said the run is over.
    Shutdown(String),
}

/// Connects (retrying until `connect_timeout`) and serves until the coordinator shuts the run down.
pub async fn run(opts: ClientOptions) -> Result<SessionEnd> {
    let endpoint = client_endpoint(&opts.trust, opts.identity.as_ref()).map_err(|e| anyhow!(e))?;
    let deadline = Instant::now() + opts.connect_timeout;
    let connection = loop {
        let attempt = async { endpoint.connect(opts.coordinator, server_name())?.await.map_err(anyhow::Error::from) };
        match attempt.await {
            Ok(c) => break c,
            Err(e) if Instant::now() < deadline => {
                tracing::info!("coordinator {} not reachable yet ({e}); retrying", opts.coordinator);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.context(format!("cannot connect to the coordinator at {}", opts.coordinator))),
        }
    };
    let result = serve(&connection, &opts).await;
    connection.close(0u32.into(), b"worker done");
    endpoint.wait_idle().await;
    result
}

async fn serve(connection: &quinn::Connection, opts: &ClientOptions) -> Result<SessionEnd> {
    let (mut send, mut recv) = connection.open_bi().await.context("opening the control stream")?;
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        worker_name: opts.name.clone(),
        capacity: opts.capacity as u32,
        device: format!("{:?}", opts.device).to_lowercase(),
    };
    write_frame(&mut send, &Message::Hello(hello.clone()), &[]).await?;
    let welcome = match read_frame(&mut recv, &Limits::CONTROL).await?.map(|f| f.message) {
        Some(Message::Welcome(w)) => w,
        Some(Message::Refused { reason }) => bail!("the coordinator refused this worker: {reason}"),
        Some(other) => bail!("expected Welcome, got {}", other.kind()),
        None => bail!("the coordinator closed the control stream during the handshake"),
    };
    let config = Config::from_toml(&welcome.config_toml).context("the coordinator sent an invalid config")?;
    let spec = ModelSpec::from_config(&config);
    let layout = spec.layout();
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
    let numel = layout.numel();
    let ctx = Arc::new(ComputeContext { config, spec, layout, datasets, device: opts.device });
    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let _threads = spawn_pool(ctx, opts.capacity, opts.threads, job_rx, out_tx);
    let limits = Limits::with_payload(numel as u64 * 4);
    let mut versions: BTreeMap<u64, Arc<Vec<f32>>> = BTreeMap::new();
    loop {
        tokio::select! {
            frame = read_frame(&mut recv, &limits) => {
                let Some(frame) = frame? else { bail!("the coordinator closed the control stream") };
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
                        for assignment in tasks {
                            let params = versions.get(&assignment.version).cloned().ok_or_else(|| {
                                anyhow!("task {} needs parameters v{} that were never sent", assignment.id, assignment.version)
                            })?;
                            job_tx.send(Job { assignment, params }).map_err(|_| anyhow!("compute pool stopped"))?;
                        }
                    }
                    Message::Shutdown { reason } => return Ok(SessionEnd::Shutdown(reason)),
                    other => bail!("unexpected {} message from the coordinator", other.kind()),
                }
            }
            Some(outcome) = out_rx.recv() => send_outcome(connection, outcome).await?,
        }
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
            (Message::Result(result), encode_f32(&grad))
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
