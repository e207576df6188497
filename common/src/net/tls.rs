//! TLS for QUIC: the coordinator's identity (a self-signed certificate, kept in a directory so that its
//! fingerprint survives restarts) and the worker's verifier, which accepts exactly the certificate whose
//! SHA-256 fingerprint it was given (certificate pinning).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{Endpoint, IdleTimeout, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// ALPN protocol id; a peer speaking another protocol fails the handshake.
pub const ALPN: &[u8] = b"metatrain/1";
/// The name in the coordinator's certificate (workers pin the fingerprint, so the name is not checked).
const SERVER_NAME: &str = "metatrain-coordinator";
/// Flow-control windows. Gradients and parameters are the largest messages (4 bytes per parameter);
/// 64 MiB per stream lets a 16M-parameter model move in one window while bounding what a peer can make
/// us buffer; the connection window allows a few such streams at once.
const STREAM_WINDOW: u32 = 64 << 20;
const CONNECTION_WINDOW: u32 = 256 << 20;
/// Concurrent result streams a worker may open; bounds the coordinator's buffered results per worker.
const MAX_UNI_STREAMS: u32 = 64;
/// Keep-alive so idle connections survive NATs, and a peer that vanishes is noticed within the timeout.
const KEEP_ALIVE: Duration = Duration::from_secs(2);
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Installs ring as the process's rustls provider. Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The coordinator's certificate and key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    pub fn fingerprint(&self) -> String {
        sha256_fingerprint(&self.cert)
    }
}

/// Hex SHA-256 of a certificate's DER bytes.
pub fn sha256_fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(Sha256::digest(cert.as_ref()))
}

/// Loads `dir/coordinator.crt` and `dir/coordinator.key` (PEM), or creates them.
pub fn load_or_create_identity(dir: &Path) -> Result<Identity, String> {
    let crt = dir.join("coordinator.crt");
    let key = dir.join("coordinator.key");
    if crt.exists() && key.exists() {
        let cert = CertificateDer::from_pem_file(&crt).map_err(|e| format!("{}: {e}", crt.display()))?;
        let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("{}: {e}", key.display()))?;
        return Ok(Identity { cert, key });
    }
    let ck = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()]).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    std::fs::write(&crt, ck.cert.pem()).map_err(|e| format!("{}: {e}", crt.display()))?;
    write_private(&key, ck.key_pair.serialize_pem().as_bytes()).map_err(|e| format!("{}: {e}", key.display()))?;
    Ok(Identity { cert: ck.cert.der().clone(), key: PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into()) })
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    opts.open(path)?.write_all(bytes)
}

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.stream_receive_window(VarInt::from_u32(STREAM_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_WINDOW));
    t.send_window(CONNECTION_WINDOW as u64);
    t.max_concurrent_uni_streams(VarInt::from_u32(MAX_UNI_STREAMS));
    t.max_concurrent_bidi_streams(VarInt::from_u32(1));
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(IdleTimeout::try_from(IDLE_TIMEOUT).ok());
    Arc::new(t)
}

/// A QUIC endpoint listening on `addr` with the coordinator's identity.
pub fn server_endpoint(addr: SocketAddr, identity: &Identity) -> Result<Endpoint, String> {
    let mut tls = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(vec![identity.cert.clone()], identity.key.clone_key())
        .map_err(|e| e.to_string())?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(transport());
    Endpoint::server(cfg, addr).map_err(|e| format!("cannot listen on {addr}: {e}"))
}

/// A QUIC client endpoint that trusts exactly the certificate with SHA-256 `fingerprint` (hex).
pub fn client_endpoint(fingerprint: &str) -> Result<Endpoint, String> {
    let pinned = hex::decode(fingerprint.trim().replace(':', ""))
        .ok()
        .filter(|b| b.len() == 32)
        .ok_or_else(|| format!("fingerprint must be 64 hex digits (SHA-256), got {fingerprint:?}"))?;
    let provider =
        CryptoProvider::get_default().cloned().unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let verifier = PinnedCert { sha256: pinned, provider };
    let mut tls = rustls::ClientConfig::builder()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| e.to_string())?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(transport());
    let bind: SocketAddr = "[::]:0".parse().map_err(|e| format!("{e}"))?;
    let mut endpoint = Endpoint::client(bind)
        .or_else(|_| Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0))))
        .map_err(|e| e.to_string())?;
    endpoint.set_default_client_config(cfg);
    Ok(endpoint)
}

/// The server name to use in `Endpoint::connect`.
pub fn server_name() -> &'static str {
    SERVER_NAME
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
