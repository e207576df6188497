//! TLS for QUIC. The coordinator presents `coordinator.crt` from its TLS directory (see [`super::pki`])
//! and, by default, accepts only clients whose certificate the directory's CA signed (mutual TLS).
//! Workers verify the coordinator either against that CA (`--ca`) or by pinning its certificate's SHA-256
//! fingerprint (`--fingerprint`), and present their own certificate (`--cert`, `--key`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

use super::pki::{self, COORDINATOR_NAME};

/// ALPN protocol id; a peer speaking another protocol fails the handshake.
pub const ALPN: &[u8] = b"metatrain/1";
/// Flow-control windows: how much unread data a peer can make QUIC buffer for one stream and for one
/// connection. They pace large messages (gradients and parameters, 4 bytes per parameter) rather than
/// limit their size: 32 MiB in flight is 32 GB/s at 1 ms RTT, 640 MB/s at 50 ms. The connection window
/// bounds what any connection, authenticated or not, costs the coordinator in QUIC buffers.
const STREAM_WINDOW: u32 = 16 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Concurrent result streams a worker may open once welcomed (none before: see
/// [`allow_result_streams`]); bounds the coordinator's buffered results per connection.
pub const MAX_UNI_STREAMS: u32 = 64;
/// UDP receive buffer asked for on the coordinator's and workers' sockets. The OS default (208 KiB on
/// Linux) overflows when ten or more workers send gradients at once; the kernel then drops datagrams and
/// QUIC waits on loss-recovery timers. Measured with `metatrain bench coordinator` (10k parameters, 10
/// simulated workers): 44 meta-steps/s and 1,446 drops with the default, 377 and none with 8 MiB.
/// Linux doubles the request and caps it at `net.core.rmem_max` (raise that on coordinator hosts).
pub const UDP_RECV_BUFFER: usize = 8 << 20;

/// Keep-alive so idle connections survive NATs, and a peer that vanishes is noticed within the timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Installs ring as the process's rustls provider. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A certificate chain and its key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn fingerprint(&self) -> String {
        sha256_fingerprint(&self.cert)
    }

    /// Loads PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Identity, String> {
        Ok(Identity {
            cert: pem_cert(cert)?,
            key: PrivateKeyDer::from_pem_slice(pem_text(key)?.as_bytes())
                .map_err(|e| format!("{}: {e}", key.display()))?,
        })
    }
}

/// Hex SHA-256 of a certificate's DER bytes.
pub fn sha256_fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// The coordinator's side of a TLS directory: its identity and the CA that signs workers.
pub struct CoordinatorTls {
    pub identity: Identity,
    pub ca: CertificateDer<'static>,
    pub dir: PathBuf,
}

/// Loads `dir`'s CA and coordinator certificate, creating them (`pki::init`) when `dir` has no CA.
pub fn load_or_init_coordinator(dir: &Path) -> Result<CoordinatorTls, String> {
    if !dir.join("ca.crt").exists() {
        pki::init(dir, &[])?;
    }
    let tls = CoordinatorTls {
        identity: Identity::load(&dir.join("coordinator.crt"), &dir.join("coordinator.key"))?,
        ca: pem_cert(&dir.join("ca.crt"))?,
        dir: dir.to_path_buf(),
    };
    // Workers that verify by the CA (--ca) would refuse a coordinator certificate another CA signed, and
    // keep retrying: catch a mixed-up TLS directory here, where it can be named.
    let mut roots = RootCertStore::empty();
    roots.add(tls.ca.clone()).map_err(|e| format!("{}: {e}", dir.join("ca.crt").display()))?;
    let verifier = rustls::client::WebPkiServerVerifier::builder(Arc::new(roots)).build().map_err(|e| e.to_string())?;
    let name = ServerName::try_from(COORDINATOR_NAME).map_err(|e| e.to_string())?;
    verifier.verify_server_cert(&tls.identity.cert, &[], &name, &[], UnixTime::now()).map_err(|e| {
        format!(
            "{}: coordinator.crt does not verify against ca.crt ({e}); the TLS directory mixes files of two clusters",
            dir.display()
        )
    })?;
    Ok(tls)
}

/// A PEM file's text, size-limited (see [`super::files`]).
fn pem_text(path: &Path) -> Result<String, String> {
    super::files::read_text(path, super::files::MAX_TEXT_FILE)
}

/// The first certificate of a PEM file.
fn pem_cert(path: &Path) -> Result<CertificateDer<'static>, String> {
    CertificateDer::from_pem_slice(pem_text(path)?.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
}

/// `uni_streams`: how many streams the peer may open at first (the coordinator allows none until a
/// worker's Hello is accepted).
fn transport(uni_streams: u32) -> Arc<TransportConfig> {
    transport_with_windows(STREAM_WINDOW, CONNECTION_WINDOW, uni_streams)
}

/// [`transport`] with other flow-control windows (bytes), for `metatrain bench wire`, which measures
/// what they do.
pub fn transport_with_windows(stream: u32, connection: u32, uni_streams: u32) -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(stream));
    t.receive_window(VarInt::from_u32(connection));
    t.send_window(connection as u64);
    t.max_concurrent_uni_streams(VarInt::from_u32(uni_streams));
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    Arc::new(t)
}

/// A QUIC endpoint on `addr`. With `require_client_certs`, only clients with a certificate signed by
/// `tls.ca` complete the handshake.
pub fn server_endpoint(addr: SocketAddr, tls: &CoordinatorTls, require_client_certs: bool) -> Result<Endpoint, String> {
    let cfg = server_config(tls, require_client_certs)?;
    endpoint_on(addr, Some(cfg)).map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// A QUIC endpoint on a UDP socket bound to `addr` with a receive buffer of [`UDP_RECV_BUFFER`] (asked
/// for; a kernel that grants less is not an error).
fn endpoint_on(addr: SocketAddr, server: Option<quinn::ServerConfig>) -> std::io::Result<Endpoint> {
    let socket = std::net::UdpSocket::bind(addr)?;
    if let Err(e) = set_recv_buffer(&socket, UDP_RECV_BUFFER) {
        tracing::warn!("cannot raise the UDP receive buffer to {UDP_RECV_BUFFER} bytes: {e}");
    }
    let runtime = quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime found"))?;
    Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

/// Asks the kernel for an `SO_RCVBUF` of `bytes` on `socket` (Linux doubles it, capped by
/// `net.core.rmem_max`).
pub fn set_recv_buffer(socket: &std::net::UdpSocket, bytes: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let value = libc::c_int::try_from(bytes).map_err(|_| std::io::Error::other("receive buffer size too large"))?;
    // SAFETY: setsockopt on a descriptor this function borrows, with a pointer to a live c_int and its size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The coordinator's QUIC server configuration (TLS, ALPN, flow-control windows, stream limits), for an
/// endpoint built on a socket of the caller's choosing (`metatrain bench` counts the bytes of its own).
pub fn server_config(tls: &CoordinatorTls, require_client_certs: bool) -> Result<quinn::ServerConfig, String> {
    let builder = rustls::ServerConfig::builder();
    let builder = if require_client_certs {
        let mut roots = RootCertStore::empty();
        roots.add(tls.ca.clone()).map_err(|e| format!("CA certificate: {e}"))?;
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots)).build().map_err(|e| e.to_string())?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut server = builder
        .with_single_cert(vec![tls.identity.cert.clone()], tls.identity.key.clone_key())
        .map_err(|e| e.to_string())?;
    server.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(server).map_err(|e| e.to_string())?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport(0));
    Ok(cfg)
}

/// How a worker decides to trust the coordinator.
pub enum ServerTrust {
    /// Exactly the certificate with this SHA-256 fingerprint (hex).
    Fingerprint(String),
    /// Any certificate for `metatrain-coordinator` signed by this CA (PEM file).
    Ca(PathBuf),
}

/// A QUIC client endpoint that trusts the coordinator as `trust` says and presents `identity`.
pub fn client_endpoint(trust: &ServerTrust, identity: Option<&Identity>) -> Result<Endpoint, String> {
    let cfg = client_config(trust, identity)?;
    // Workers receive whole parameter versions: the same receive buffer as the coordinator.
    let mut endpoint = endpoint_on(SocketAddr::from(([0, 0, 0, 0], 0)), None).map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint)
}

/// The client configuration of [`client_endpoint`] (TLS, ALPN, transport).
pub fn client_config(trust: &ServerTrust, identity: Option<&Identity>) -> Result<quinn::ClientConfig, String> {
    let builder = match trust {
        ServerTrust::Fingerprint(fp) => {
            let pinned = hex::decode(fp.trim().replace(':', ""))
                .ok()
                .filter(|b| b.len() == 32)
                .ok_or_else(|| format!("fingerprint must be 64 hex digits (SHA-256), got {fp:?}"))?;
            let provider = CryptoProvider::get_default()
                .cloned()
                .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
            rustls::ClientConfig::builder()
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedCert { sha256: pinned, provider }))
        }
        ServerTrust::Ca(path) => {
            let ca = pem_cert(path)?;
            let mut roots = RootCertStore::empty();
            roots.add(ca).map_err(|e| format!("{}: {e}", path.display()))?;
            rustls::ClientConfig::builder().with_root_certificates(roots)
        }
    };
    let mut tls = match identity {
        Some(id) => {
            builder.with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key()).map_err(|e| e.to_string())?
        }
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    // The coordinator opens no streams to a worker besides answering on the control stream.
    cfg.transport_config(transport(0));
    Ok(cfg)
}

/// Lets a welcomed worker open its result streams.
pub fn allow_result_streams(conn: &quinn::Connection) {
    conn.set_max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS));
}

/// The server name to use in `Endpoint::connect`.
pub fn server_name() -> &'static str {
    COORDINATOR_NAME
}

/// The authenticated name of a connected worker: its certificate's common name, if it presented one.
pub fn peer_name(conn: &quinn::Connection) -> Option<String> {
    let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certs.first().and_then(pki::common_name)
}

#[derive(Debug)]
struct PinnedCert {
    sha256: Vec<u8>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref()).as_slice() == self.sha256.as_slice() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "coordinator certificate fingerprint {} does not match the pinned {}",
                sha256_fingerprint(end_entity),
                hex::encode(&self.sha256)
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}
