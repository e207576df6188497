//! The I/O adapters both binaries share (feature `net`): framed messages over quinn streams, the
//! cluster's certificates and TLS set-up (mutual TLS by default), the Prometheus `/metrics` endpoint, and
//! size-limited reads of user-named files.
//!
//! They are thin: framing rules live in [`crate::protocol`]; these functions only move bytes.

pub mod files;
mod framed;
mod metrics_http;
pub mod pki;
mod tls;

pub use framed::{
    read_frame, read_result_frame, read_result_head, read_result_payload, write_frame, DecodedFrame, NetError,
};
pub use metrics_http::{install_prometheus, install_prometheus_labelled, serve_metrics, HISTOGRAM_SECONDS_BUCKETS};
pub use tls::{
    allow_result_streams, client_config, client_endpoint, install_crypto_provider, load_or_init_coordinator, peer_name,
    server_config, server_endpoint, server_name, set_recv_buffer, sha256_fingerprint, transport_with_windows,
    CoordinatorTls, Identity, ServerTrust, ALPN, MAX_UNI_STREAMS, UDP_RECV_BUFFER,
};
