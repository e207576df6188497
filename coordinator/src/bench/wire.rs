//! `metatrain bench wire`: what QUIC's flow-control windows do to one large transfer (a parameter
//! version or a gradient, 4 bytes per parameter) at a given round-trip time. The kernel here has no
//! `tc netem`, so the delay is added in user space: a UDP proxy on loopback holds every datagram for
//! half the RTT in each direction. A sender may have at most one window of unacknowledged data in flight,
//! so a transfer cannot beat window / RTT; the table shows each window's MB/s against the largest
//! window's in the same run, and against that bound.
//!
//! The proxy costs CPU on the same cores as both endpoints, so at small RTTs the figures measure this
//! machine, not the windows; what matters is where a window stops limiting.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use metatrain_common::net::{
    client_config, server_config, server_name, set_recv_buffer, transport_with_windows, ServerTrust,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use super::BenchError;

#[derive(Args, Debug)]
pub struct WireArgs {
    /// Round-trip times to add, in milliseconds, comma-separated (each 0..=1000).
    #[arg(long, value_delimiter = ',', default_value = "1,10,50")]
    pub rtt_ms: Vec<u64>,
    /// Per-stream receive windows to try, MiB, comma-separated (the connection window is twice each).
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,64")]
    pub windows_mib: Vec<u32>,
    /// Bytes sent per transfer, MiB (a 16M-parameter model is 64 MiB).
    #[arg(long, default_value_t = 64)]
    pub mib: u32,
}

/// Largest window accepted (the connection window, twice it, must fit QUIC's u32 setting here).
const MAX_WINDOW_MIB: u32 = 1024;
/// Largest transfer accepted.
const MAX_TRANSFER_MIB: u32 = 4096;
/// Socket buffers of the proxy (it holds a whole RTT of traffic in flight).
const PROXY_SOCKET_BUFFER: usize = 32 << 20;

pub fn run(args: &WireArgs) -> Result<(), BenchError> {
    let bad = |s: String| Err(BenchError::Invalid(s));
    if args.rtt_ms.is_empty() || args.rtt_ms.iter().any(|r| *r > 1000) {
        return bad("--rtt-ms: one or more values in 0..=1000".into());
    }
    if args.windows_mib.is_empty() || args.windows_mib.iter().any(|w| !(1..=MAX_WINDOW_MIB).contains(w)) {
        return bad(format!("--windows-mib: one or more values in 1..={MAX_WINDOW_MIB}"));
    }
    if !(1..=MAX_TRANSFER_MIB).contains(&args.mib) {
        return bad(format!("--mib must be in 1..={MAX_TRANSFER_MIB}"));
    }
    let rt = tokio::runtime::Runtime::new().map_err(BenchError::Socket)?;
    rt.block_on(async {
        let temp = super::TempTls::new()?;
        let tls = &temp.tls;
        let fingerprint = tls.identity.fingerprint();
        println!("transfer of {} MiB on one QUIC stream through a delaying UDP proxy on loopback", args.mib);
        println!("{:>7} {:>10} {:>10} {:>12} {:>16}", "RTT ms", "window MiB", "MB/s", "vs largest", "vs window/RTT");
        for &rtt in &args.rtt_ms {
            let mut rows = Vec::new();
            for &w in &args.windows_mib {
                let secs = transfer(tls, &fingerprint, w, Duration::from_millis(rtt), args.mib).await?;
                rows.push((w, args.mib as f64 * 1048576.0 / secs / 1e6));
            }
            let best = rows.iter().map(|r| r.1).fold(0.0, f64::max);
            for (w, mbs) in rows {
                let bound = (w as f64 * 1048576.0 / 1e6) / (rtt.max(1) as f64 / 1000.0);
                println!("{rtt:>7} {w:>10} {mbs:>10.1} {:>11.2}× {:>15.2}×", mbs / best, mbs / bound);
            }
        }
        Ok(())
    })
}

/// Seconds for the server to send `mib` MiB on one stream to a client through the proxy, both ends with
/// `window_mib` stream windows.
async fn transfer(
    tls: &metatrain_common::net::CoordinatorTls,
    fingerprint: &str,
    window_mib: u32,
    rtt: Duration,
    mib: u32,
) -> Result<f64, BenchError> {
    let window = window_mib << 20;
    let mut server_cfg = server_config(tls, false).map_err(BenchError::Tls)?;
    server_cfg.transport_config(transport_with_windows(window, window.saturating_mul(2), 1));
    let server = endpoint(Some(server_cfg))?;
    let server_addr = server.local_addr().map_err(BenchError::Socket)?;
    let proxy = DelayProxy::start(server_addr, rtt / 2).await?;
    let mut client_cfg = client_config(&ServerTrust::Fingerprint(fingerprint.into()), None).map_err(BenchError::Tls)?;
    client_cfg.transport_config(transport_with_windows(window, window.saturating_mul(2), 1));
    let mut client = endpoint(None)?;
    client.set_default_client_config(client_cfg);
    let total = (mib as usize) << 20;
    let sender = tokio::spawn(async move {
        let incoming = server.accept().await.ok_or("no connection")?;
        let conn = incoming.await.map_err(|e| e.to_string())?;
        let mut s = conn.open_uni().await.map_err(|e| e.to_string())?;
        let chunk = vec![7u8; 1 << 20];
        for _ in 0..total >> 20 {
            s.write_all(&chunk).await.map_err(|e| e.to_string())?;
        }
        s.finish().map_err(|e| e.to_string())?;
        let _ = s.stopped().await;
        Ok::<_, String>(())
    });
    let conn = client
        .connect(proxy.addr, server_name())
        .map_err(|e| BenchError::Worker(e.to_string()))?
        .await
        .map_err(|e| BenchError::Worker(e.to_string()))?;
    let mut recv = conn.accept_uni().await.map_err(|e| BenchError::Worker(e.to_string()))?;
    let started = Instant::now();
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 20];
    while let Some(n) = recv.read(&mut buf).await.map_err(|e| BenchError::Worker(e.to_string()))? {
        got += n;
    }
    let secs = started.elapsed().as_secs_f64();
    if got != total {
        return Err(BenchError::Worker(format!("received {got} of {total} bytes")));
    }
    sender.await.map_err(|e| BenchError::Task(e.to_string()))?.map_err(BenchError::Worker)?;
    conn.close(0u32.into(), b"done");
    proxy.stop();
    Ok(secs)
}

/// A QUIC endpoint on loopback whose socket has the receive buffer the real endpoints ask for (the
/// proxy delivers a round trip's worth of datagrams in bursts; the OS default drops some of them).
fn endpoint(server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint, BenchError> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(BenchError::Socket)?;
    let _ = set_recv_buffer(&socket, metatrain_common::net::UDP_RECV_BUFFER);
    let runtime = quinn::default_runtime().ok_or_else(|| BenchError::Task("no async runtime".into()))?;
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime).map_err(BenchError::Socket)
}

/// A UDP proxy that delays every datagram by `one_way` in each direction (one client).
struct DelayProxy {
    addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl DelayProxy {
    async fn start(server: SocketAddr, one_way: Duration) -> Result<DelayProxy, BenchError> {
        let bind = |_: ()| -> Result<UdpSocket, BenchError> {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").map_err(BenchError::Socket)?;
            let _ = set_recv_buffer(&s, PROXY_SOCKET_BUFFER);
            s.set_nonblocking(true).map_err(BenchError::Socket)?;
            UdpSocket::from_std(s).map_err(BenchError::Socket)
        };
        let front = Arc::new(bind(())?);
        let back = Arc::new(bind(())?);
        back.connect(server).await.map_err(BenchError::Socket)?;
        let addr = front.local_addr().map_err(BenchError::Socket)?;
        let (to_server, mut to_server_rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let (to_client, mut to_client_rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
        let (client_tx, client_rx) = tokio::sync::watch::channel::<Option<SocketAddr>>(None);
        let mut tasks = Vec::new();
        let f = front.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok((n, from)) = f.recv_from(&mut buf).await {
                let _ = client_tx.send(Some(from));
                if to_server.send((Instant::now() + one_way, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }));
        let b = back.clone();
        tasks.push(tokio::spawn(async move {
            while let Some((at, bytes)) = to_server_rx.recv().await {
                tokio::time::sleep_until(at.into()).await;
                let _ = b.send(&bytes).await;
            }
        }));
        let b = back.clone();
        tasks.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 65536];
            while let Ok(n) = b.recv(&mut buf).await {
                if to_client.send((Instant::now() + one_way, buf[..n].to_vec())).is_err() {
                    return;
                }
            }
        }));
        tasks.push(tokio::spawn(async move {
            while let Some((at, bytes)) = to_client_rx.recv().await {
                tokio::time::sleep_until(at.into()).await;
                let client = *client_rx.borrow();
                if let Some(client) = client {
                    let _ = front.send_to(&bytes, client).await;
                }
            }
        }));
        Ok(DelayProxy { addr, tasks })
    }

    fn stop(self) {
        for t in self.tasks {
            t.abort();
        }
    }
}
