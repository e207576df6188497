//! The I/O adapters both binaries share (feature `net`): framed messages over quinn streams, TLS set-up
//! with a pinned coordinator certificate, and the Prometheus `/metrics` endpoint.
//!
//! They are thin: framing rules live in [`crate::protocol`]; these functions only move bytes.

mod framed;
mod metrics_http;
mod tls;

pub use framed::{read_frame, write_frame, NetError};
pub use metrics_http::{install_prometheus, serve_metrics, HISTOGRAM_SECONDS_BUCKETS};
pub use tls::{
    client_endpoint, install_crypto_provider, load_or_create_identity, server_endpoint, server_name,
    sha256_fingerprint, Identity, ALPN,
};
