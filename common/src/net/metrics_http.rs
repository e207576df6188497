//! A minimal `/metrics` endpoint over a Prometheus recorder.
//!
//! We serve the text ourselves (rather than the exporter's built-in listener) so that the address can be
//! `127.0.0.1:0` and the bound port read back, which tests and local clusters need, and so that no HTTP
//! stack or second TLS provider is pulled in.

use std::net::SocketAddr;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Buckets for every `*_seconds` histogram: 1 ms to 5 min, roughly ×2.5 apart, which spans a tiny
/// sinusoid task (~1 ms) up to a large meta-step on a slow cluster.
pub const HISTOGRAM_SECONDS_BUCKETS: &[f64] =
    &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// A scrape request is one short line plus headers; anything longer is not Prometheus.
const MAX_REQUEST_BYTES: usize = 8192;
/// Scrapes served at once (Prometheus needs one; a few dashboards and curls fit).
const MAX_CONNECTIONS: usize = 32;
/// Pause after a failed accept (e.g. out of descriptors) instead of spinning on the error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// A client that has not sent its whole request by then is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs the global Prometheus recorder (once per process) and returns its handle.
pub fn install_prometheus() -> Result<PrometheusHandle, String> {
    install_prometheus_labelled(&[])
}

/// As [`install_prometheus`], with labels added to every metric (e.g. `run` for the runs of a sweep).
pub fn install_prometheus_labelled(labels: &[(String, String)]) -> Result<PrometheusHandle, String> {
    let mut builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), HISTOGRAM_SECONDS_BUCKETS)
        .map_err(|e| e.to_string())?;
    for (k, v) in labels {
        builder = builder.add_global_label(k, v);
    }
    builder.install_recorder().map_err(|e| e.to_string())
}

/// Binds `addr` and serves `GET /metrics` until the task is dropped. Returns the bound address.
pub async fn serve_metrics(addr: SocketAddr, handle: PrometheusHandle) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let mut sock = match listener.accept().await {
                Ok((sock, _)) => sock,
                Err(_) => {
                    // Out of descriptors (or similar): back off instead of spinning on the error.
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            // Beyond the cap, connections are closed at once: idle clients cannot exhaust file descriptors.
            let Ok(permit) = slots.clone().try_acquire_owned() else { continue };
            let handle = handle.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let mut buf = Vec::with_capacity(512);
                let mut chunk = [0u8; 1024];
                let read = tokio::time::timeout(REQUEST_TIMEOUT, async {
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_REQUEST_BYTES {
                        match sock.read(&mut chunk).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    true
                })
                .await;
                if !matches!(read, Ok(true)) {
                    return;
                }
                let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
                let response = if line.starts_with(b"GET /metrics") {
                    let body = handle.render();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        body.len(),
                        body
                    )
                } else {
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string()
                };
                let _ = sock.write_all(response.as_bytes()).await;
                let _ = sock.shutdown().await;
            });
        }
    });
    Ok(bound)
}
