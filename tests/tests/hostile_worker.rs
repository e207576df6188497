//! A deliberately faulty worker — it speaks the protocol but forges a well-formed result for a task it
//! was never given, then answers every task with a NaN gradient or a wrongly shaped one — next to an honest worker: its results are refused and counted by reason, it is
//! disconnected and quarantined after repeated strikes, and the run still ends with exactly the
//! parameters of a clean run.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use metatrain_common::net::{
    client_endpoint, install_crypto_provider, read_frame, server_name, write_frame, Identity, ServerTrust,
};
use metatrain_common::protocol::{Assignment, Hello, Limits, Message, TaskResult, PROTOCOL_VERSION};
use metatrain_common::tensor::{encode, encode_f32, Dtype};
use metatrain_tests::*;

const STEPS: u32 = 20;

fn coordinator(out: &std::path::Path, local: usize) -> Command {
    noisy_linear_run(out, STEPS, 3, local)
}

/// A plausible result header for `a` with a gradient of `len` f32 values.
fn result_for(a: &Assignment, len: usize) -> TaskResult {
    TaskResult {
        id: a.id,
        version: a.version,
        mode: a.mode,
        pre_loss: 1.0,
        post_loss: 0.5,
        pre_accuracy: None,
        post_accuracy: None,
        compute_seconds: 0.001,
        difficulty: 0.5,
        grad_dtype: Dtype::F32,
        grad_len: len as u64,
    }
}

/// Connects to the coordinator at `addr` as `identity` (pinning its fingerprint) and says Hello; returns
/// the endpoint, the connection and the control stream's halves.
async fn say_hello(
    addr: SocketAddr,
    fingerprint: &str,
    identity: &Identity,
    name: &str,
    capacity: u32,
) -> (quinn::Endpoint, quinn::Connection, quinn::SendStream, quinn::RecvStream) {
    let endpoint = client_endpoint(&ServerTrust::Fingerprint(fingerprint.into()), Some(identity)).expect("endpoint");
    let conn = endpoint.connect(addr, server_name()).expect("connect").await.expect("handshake");
    let (mut send, recv) = conn.open_bi().await.expect("bi");
    let hello = Hello { protocol_version: PROTOCOL_VERSION, worker_name: name.into(), capacity, device: "cpu".into() };
    write_frame(&mut send, &Message::Hello(hello), &[]).await.expect("hello");
    (endpoint, conn, send, recv)
}

/// Plays a worker that corrupts every result; returns the reason its connection was closed.
async fn faulty_worker(addr: SocketAddr, fingerprint: &str, identity: &Identity) -> String {
    let (_endpoint, conn, _send, mut recv) = say_hello(addr, fingerprint, identity, "faulty", 4).await;
    let limits = Limits::with_payload(1 << 24);
    let mut numel = 0usize;
    let mut sent = 0u32;
    loop {
        let frame = match read_frame(&mut recv, &limits).await {
            Ok(Some(f)) => f,
            _ => break,
        };
        match frame.message {
            Message::Params { len, .. } => numel = len as usize,
            Message::Assign { tasks } => {
                for a in tasks {
                    if sent == 0 {
                        // A finite, well-shaped gradient for a task this worker was not given.
                        let forged = result_for(&Assignment { id: a.id + 1000, ..a.clone() }, numel);
                        let Ok(mut s) = conn.open_uni().await else { break };
                        let _ = write_frame(&mut s, &Message::Result(forged), &encode_f32(&vec![0.5f32; numel])).await;
                        let _ = s.finish();
                    }
                    // Alternate: NaN in the gradient, then a gradient one element short.
                    let mut grad = vec![0.01f32; numel];
                    if sent.is_multiple_of(2) {
                        grad[numel / 2] = f32::NAN;
                    } else {
                        grad.pop();
                    }
                    sent += 1;
                    let result = result_for(&a, grad.len());
                    let Ok(mut s) = conn.open_uni().await else { break };
                    let _ = write_frame(&mut s, &Message::Result(result), &encode_f32(&grad)).await;
                    let _ = s.finish();
                }
            }
            _ => {}
        }
    }
    tokio::time::timeout(Duration::from_secs(10), conn.closed()).await.map(|e| e.to_string()).unwrap_or_default()
}

fn counter(text: &str, needle: &str) -> f64 {
    text.lines().find(|l| l.starts_with(needle)).and_then(|l| l.rsplit(' ').next()?.parse().ok()).unwrap_or(0.0)
}

#[test]
fn a_faulty_worker_is_refused_counted_quarantined_and_changes_nothing() {
    install_crypto_provider();
    let dir = scratch("hostile-worker");
    let (status, _) = Proc::spawn(&mut coordinator(&dir.join("clean"), 1), "clean").finish(Duration::from_secs(300));
    assert!(status.success());
    let clean = read_report(&dir.join("clean"));

    let mut coord = Proc::spawn(&mut coordinator(&dir.join("attacked"), 0), "coordinator");
    let metrics = coord.wait_for(Duration::from_secs(30), metrics_address);
    let (addr, fp) = coord.wait_for(Duration::from_secs(30), coordinator_address);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // The faulty worker joins first, so it is sent tasks before the honest one exists.
    let identity = issued_identity(&dir.join("attacked/tls"), "faulty");
    let closed = rt.block_on(faulty_worker(addr.parse().expect("addr"), &fp, &identity));
    assert!(closed.contains("quarantined"), "closed with the reason: {closed}");
    let text = scrape(&metrics);
    let nan = counter(&text, "metatrain_results_rejected_total{reason=\"non_finite_gradient\"}");
    let shape = counter(&text, "metatrain_results_rejected_total{reason=\"wrong_shape\"}");
    let forged = counter(&text, "metatrain_results_rejected_total{reason=\"not_assigned\"}");
    let quarantined = counter(&text, "metatrain_workers_quarantined_total");
    println!(
        "rejected: not_assigned {forged}, non_finite_gradient {nan}, wrong_shape {shape}; quarantined {quarantined}"
    );
    assert!(forged >= 1.0 && nan >= 1.0 && shape >= 1.0 && quarantined == 1.0, "{text}");

    // Back during its quarantine: refused at the handshake.
    let again = rt.block_on(async {
        let (_endpoint, _conn, _send, mut recv) =
            say_hello(addr.parse().expect("addr"), &fp, &identity, "faulty", 1).await;
        read_frame(&mut recv, &Limits::CONTROL).await.ok().flatten().map(|f| f.message)
    });
    assert!(matches!(&again, Some(Message::Refused { reason }) if reason.contains("quarantined")), "{again:?}");

    let honest = Proc::spawn(&mut worker(&addr, &fp, &dir.join("attacked/tls"), "honest"), "honest");
    let (status, _) = coord.finish(Duration::from_secs(300));
    assert!(status.success());
    drop(honest);
    let attacked = read_report(&dir.join("attacked"));
    assert_eq!(attacked["final_step"].as_u64(), Some(20));
    assert_eq!(attacked["params_sha256"], clean["params_sha256"], "bad results never touched the parameters");
    assert!(attacked["results_rejected"].as_u64().unwrap_or(0) >= 3);
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

#[test]
fn a_stream_flood_is_bounded_and_the_run_goes_on() {
    install_crypto_provider();
    let dir = scratch("stream-flood");
    let mut coord = Proc::spawn(&mut coordinator(&dir.join("run"), 0), "coordinator");
    let (addr, fp) = coord.wait_for(Duration::from_secs(30), coordinator_address);
    let identity = issued_identity(&dir.join("run/tls"), "flooder");
    let before = rss_kib(coord.child.id());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (opened, _conn, _endpoint) = rt.block_on(async {
        let (endpoint, conn, _send, _recv) = say_hello(addr.parse().expect("addr"), &fp, &identity, "flooder", 1).await;
        // Open result streams and leave each hanging after a prefix that promises a header.
        let mut opened = 0;
        let mut streams = Vec::new();
        for _ in 0..500 {
            match tokio::time::timeout(Duration::from_millis(200), conn.open_uni()).await {
                Ok(Ok(mut s)) => {
                    let mut prefix = metatrain_common::protocol::FRAME_MAGIC.to_vec();
                    prefix.extend_from_slice(&1000u32.to_le_bytes());
                    prefix.extend_from_slice(&0u64.to_le_bytes());
                    let _ = s.write_all(&prefix).await;
                    streams.push(s);
                    opened += 1;
                }
                _ => break,
            }
        }
        std::mem::forget(streams);
        (opened, conn, endpoint)
    });
    let during = rss_kib(coord.child.id());
    println!("streams opened before the limit stopped the flood: {opened}; coordinator RSS {before} → {during} KiB");
    assert!(opened <= 64, "the concurrent-stream limit held ({opened} opened)");
    // An honest worker still completes the run, and memory stayed bounded.
    let honest = Proc::spawn(&mut worker(&addr, &fp, &dir.join("run/tls"), "honest"), "honest");
    let (status, _) = coord.finish(Duration::from_secs(300));
    assert!(status.success());
    drop(honest);
    let r = read_report(&dir.join("run"));
    assert_eq!(r["final_step"].as_u64(), Some(STEPS as u64));
    assert!(during < before + 100_000, "memory grew from {before} to {during} KiB under the flood");
}

/// Joins, sends one bad gradient for the first task it is given, and leaves: with a NaN, or (`bf16`)
/// finite and well shaped but as bf16 where the run says f32. Returns `Some(reason)` if the coordinator
/// closed the connection (e.g. quarantine) instead.
async fn one_bad_result(addr: SocketAddr, fingerprint: &str, identity: &Identity, bf16: bool) -> Option<String> {
    let (endpoint, conn, _send, mut recv) = say_hello(addr, fingerprint, identity, "flaky", 1).await;
    let mut numel = 0;
    while let Ok(Some(frame)) = read_frame(&mut recv, &Limits::with_payload(1 << 24)).await {
        match frame.message {
            Message::Params { len, .. } => numel = len as usize,
            Message::Assign { tasks } => {
                let mut grad = vec![0.01f32; numel];
                let mut result = result_for(&tasks[0], numel);
                if bf16 {
                    result.grad_dtype = Dtype::Bf16;
                } else {
                    grad[0] = f32::NAN;
                }
                let payload = encode(&grad, result.grad_dtype);
                let mut s = conn.open_uni().await.expect("uni");
                write_frame(&mut s, &Message::Result(result), &payload).await.ok();
                let _ = s.finish();
                break;
            }
            _ => {}
        }
    }
    // Give the coordinator time to judge the result before leaving.
    let closed = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await.ok().map(|e| e.to_string());
    conn.close(0u32.into(), b"bye");
    endpoint.wait_idle().await;
    closed
}

#[test]
fn strikes_follow_the_worker_name_across_reconnects() {
    install_crypto_provider();
    let dir = scratch("hostile-reconnect");
    let mut coord = Proc::spawn(&mut coordinator(&dir.join("run"), 0), "coordinator");
    let metrics = coord.wait_for(Duration::from_secs(30), metrics_address);
    let (addr, fp) = coord.wait_for(Duration::from_secs(30), coordinator_address);
    let identity = issued_identity(&dir.join("run/tls"), "flaky");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr: SocketAddr = addr.parse().expect("addr");
    assert_eq!(rt.block_on(one_bad_result(addr, &fp, &identity, false)), None, "one strike: not yet closed");
    assert_eq!(rt.block_on(one_bad_result(addr, &fp, &identity, true)), None, "two strikes: not yet closed");
    let third = rt.block_on(one_bad_result(addr, &fp, &identity, false));
    assert!(third.as_deref().is_some_and(|r| r.contains("quarantined")), "the third strike quarantines: {third:?}");
    let text = scrape(&metrics);
    assert_eq!(counter(&text, "metatrain_results_rejected_total{reason=\"wrong_dtype\"}"), 1.0, "{text}");
    assert_eq!(counter(&text, "metatrain_results_rejected_total{reason=\"non_finite_gradient\"}"), 2.0, "{text}");
}

/// Joins and answers the first task with a result frame whose payload is one value longer than the
/// parameter layout allows (refused from the frame's prefix, before any allocation). Returns how the
/// connection ended: `refused: …` when the coordinator refused the Hello, else its close reason.
async fn one_malformed_frame(addr: SocketAddr, fingerprint: &str, identity: &Identity) -> String {
    let (endpoint, conn, _send, mut recv) = say_hello(addr, fingerprint, identity, "garbler", 1).await;
    let mut numel = 0;
    while let Ok(Some(frame)) = read_frame(&mut recv, &Limits::with_payload(1 << 24)).await {
        match frame.message {
            Message::Refused { reason } => return format!("refused: {reason}"),
            Message::Params { len, .. } => numel = len as usize,
            Message::Assign { tasks } => {
                let grad = vec![0.01f32; numel + 1];
                let mut s = conn.open_uni().await.expect("uni");
                write_frame(&mut s, &Message::Result(result_for(&tasks[0], numel + 1)), &encode_f32(&grad)).await.ok();
                let _ = s.finish();
                break;
            }
            _ => {}
        }
    }
    let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed()).await;
    endpoint.wait_idle().await;
    closed.map(|e| e.to_string()).unwrap_or_else(|_| "not closed".into())
}

#[test]
fn malformed_frames_are_counted_and_strike_the_worker_name() {
    install_crypto_provider();
    let dir = scratch("hostile-malformed");
    let mut coord = Proc::spawn(&mut coordinator(&dir.join("run"), 0), "coordinator");
    let metrics = coord.wait_for(Duration::from_secs(30), metrics_address);
    let (addr, fp) = coord.wait_for(Duration::from_secs(30), coordinator_address);
    let identity = issued_identity(&dir.join("run/tls"), "garbler");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr: SocketAddr = addr.parse().expect("addr");
    for attempt in 1..=3 {
        let how = rt.block_on(one_malformed_frame(addr, &fp, &identity));
        assert!(how.contains("payload"), "attempt {attempt}: closed for the oversized payload: {how}");
    }
    let fourth = rt.block_on(one_malformed_frame(addr, &fp, &identity));
    assert!(fourth.starts_with("refused") && fourth.contains("quarantined"), "three strikes quarantine: {fourth}");
    let text = scrape(&metrics);
    assert_eq!(counter(&text, "metatrain_results_rejected_total{reason=\"malformed_frame\"}"), 3.0, "{text}");
    assert_eq!(counter(&text, "metatrain_workers_quarantined_total"), 1.0);
}

/// Says Hello as `identity`; returns the endpoint and connection once welcomed.
async fn joined(addr: SocketAddr, fingerprint: &str, identity: &Identity) -> (quinn::Endpoint, quinn::Connection) {
    let (endpoint, conn, send, mut recv) = say_hello(addr, fingerprint, identity, "w", 1).await;
    match read_frame(&mut recv, &Limits::with_payload(1 << 24)).await.expect("reply").map(|f| f.message) {
        Some(Message::Welcome(_)) => {}
        other => panic!("expected Welcome, got {other:?}"),
    }
    // Keep the control stream's halves alive with the connection.
    std::mem::forget((send, recv));
    (endpoint, conn)
}

#[test]
fn a_fifth_connection_under_one_name_supersedes_the_oldest() {
    install_crypto_provider();
    let dir = scratch("hostile-per-name");
    let mut coord = Proc::spawn(&mut coordinator(&dir.join("run"), 0), "coordinator");
    let (addr, fp) = coord.wait_for(Duration::from_secs(30), coordinator_address);
    let identity = issued_identity(&dir.join("run/tls"), "restarter");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let addr: SocketAddr = addr.parse().expect("addr");
    rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..4 {
            conns.push(joined(addr, &fp, &identity).await);
        }
        // Like a process restarted after SIGKILL whose old connections have not timed out yet.
        let (_endpoint, fifth) = joined(addr, &fp, &identity).await;
        let closed = tokio::time::timeout(Duration::from_secs(10), conns[0].1.closed()).await.expect("oldest closed");
        assert!(closed.to_string().contains("superseded"), "{closed}");
        for (_, c) in &conns[1..] {
            assert!(c.close_reason().is_none(), "only the oldest is closed");
        }
        assert!(fifth.close_reason().is_none());
    });
}
