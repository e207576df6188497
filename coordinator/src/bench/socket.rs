//! The coordinator's UDP socket, counted: every datagram byte it sends or receives (QUIC packets with
//! their headers, encryption tags, acknowledgements, retransmissions and handshakes; not the IP/UDP
//! headers), so the benchmark's wire figures are what actually crossed the socket.

use metatrain_common::net::set_recv_buffer;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Endpoint, EndpointConfig, Runtime, TokioRuntime, UdpPoller};

/// Datagram payload bytes through one socket, both ways.
#[derive(Debug, Default)]
pub struct WireCounters {
    sent: AtomicU64,
    received: AtomicU64,
}

/// A reading of [`WireCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Wire {
    pub sent: u64,
    pub received: u64,
}

impl WireCounters {
    pub fn read(&self) -> Wire {
        Wire { sent: self.sent.load(Ordering::Relaxed), received: self.received.load(Ordering::Relaxed) }
    }
}

impl std::ops::Sub for Wire {
    type Output = Wire;
    fn sub(self, earlier: Wire) -> Wire {
        Wire { sent: self.sent - earlier.sent, received: self.received - earlier.received }
    }
}

/// Passes everything to the runtime's own socket (GSO/GRO included) and counts what went through.
struct CountingSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    counters: Arc<WireCounters>,
}

impl fmt::Debug for CountingSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CountingSocket").field("inner", &self.inner).field("counters", &self.counters).finish()
    }
}

impl AsyncUdpSocket for CountingSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)?;
        // `contents` holds every segment of a GSO batch.
        self.counters.sent.fetch_add(transmit.contents.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let polled = self.inner.poll_recv(cx, bufs, meta);
        if let Poll::Ready(Ok(n)) = &polled {
            // `len` covers every segment of a GRO batch.
            let bytes: usize = meta[..*n].iter().map(|m| m.len).sum();
            self.counters.received.fetch_add(bytes as u64, Ordering::Relaxed);
        }
        polled
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// A QUIC server endpoint on `addr` as `server_endpoint` makes it, on a counted socket. Call within a
/// tokio runtime (the endpoint's driver is spawned on it). `recv_buffer`: the `SO_RCVBUF` to ask for
/// (the real coordinator asks for `UDP_RECV_BUFFER`); `None` keeps the OS default, for comparison.
pub fn counting_server(
    addr: SocketAddr,
    config: quinn::ServerConfig,
    recv_buffer: Option<usize>,
) -> io::Result<(Endpoint, Arc<WireCounters>)> {
    let socket = std::net::UdpSocket::bind(addr)?;
    if let Some(bytes) = recv_buffer {
        set_recv_buffer(&socket, bytes)?;
    }
    let runtime = Arc::new(TokioRuntime);
    let counters = Arc::new(WireCounters::default());
    let socket = Arc::new(CountingSocket { inner: runtime.wrap_udp_socket(socket)?, counters: counters.clone() });
    let endpoint = Endpoint::new_with_abstract_socket(EndpointConfig::default(), Some(config), socket, runtime)?;
    Ok((endpoint, counters))
}

/// Datagrams the kernel has dropped so far at each IPv4 UDP socket, by local port (their receive buffer
/// was full when they arrived): the `drops` column of Linux's `/proc/net/udp`. `None` elsewhere.
pub fn kernel_drops() -> Option<HashMap<u16, u64>> {
    let table = std::fs::read_to_string("/proc/net/udp").ok()?;
    let row = |line: &str| -> Option<(u16, u64)> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (_, port) = fields.get(1)?.split_once(':')?;
        Some((u16::from_str_radix(port, 16).ok()?, fields.last()?.parse().ok()?))
    };
    Some(table.lines().skip(1).filter_map(row).collect())
}
