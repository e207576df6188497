//! `Hello`: check the protocol version and the worker's claims, then welcome it with the run's config.

use std::sync::atomic::Ordering;

use metatrain_common::protocol::{Hello, Welcome, PROTOCOL_VERSION};

use crate::server::ServerContext;

/// Most tasks a worker may claim to run at once (bounds its share of in-flight tasks): 16 compute threads
/// with batches of 256 tasks.
const MAX_CAPACITY: u32 = 4096;

/// `Ok(Welcome)` or the reason for refusal (sent to the worker, so it names both sides' values). `name`
/// is the worker's authenticated name (its certificate's), or its claimed one without authentication.
pub fn handle(ctx: &ServerContext, hello: &Hello, name: &str) -> Result<Welcome, String> {
    if hello.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version mismatch: worker speaks v{}, coordinator speaks v{PROTOCOL_VERSION}; run the same metatrain release on both",
            hello.protocol_version
        ));
    }
    if hello.capacity == 0 || hello.capacity > MAX_CAPACITY {
        return Err(format!("capacity must be in 1..={MAX_CAPACITY}, got {}", hello.capacity));
    }
    if hello.worker_name.chars().any(|c| c.is_control()) {
        return Err("worker name contains control characters".into());
    }
    if let Some(secs) = ctx.quarantine.remaining(name) {
        return Err(format!("worker {name:?} is quarantined for {secs} more seconds after repeated malformed results"));
    }
    Ok(Welcome {
        protocol_version: PROTOCOL_VERSION,
        worker_id: ctx.next_worker.fetch_add(1, Ordering::Relaxed),
        config_toml: ctx.config_toml.clone(),
        layout_fingerprint: ctx.layout_fingerprint.clone(),
    })
}
