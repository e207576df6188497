//! The coordinator refuses what it must, without falling over: a worker pinning the wrong certificate
//! cannot connect; a peer speaking another protocol version is refused with both versions named; a peer
//! sending garbage or an oversized frame is disconnected while the run carries on with a good worker.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use metatrain_common::net::{
    client_endpoint, install_crypto_provider, read_frame, server_name, write_frame, ServerTrust,
};
use metatrain_common::protocol::{Hello, Limits, Message, FRAME_MAGIC, PROTOCOL_VERSION};
use metatrain_tests::{
    binary, coordinator_address, issued_identity, read_report, root, scratch, worker, worker_cert_args, Proc,
};

fn start_coordinator(dir: &std::path::Path, steps: u32) -> (Proc, String, String) {
    start_coordinator_with(dir, steps, &[])
}

fn start_coordinator_with(dir: &std::path::Path, steps: u32, extra: &[&str]) -> (Proc, String, String) {
    let mut coord = Proc::spawn(
        Command::new(binary("metatrain"))
            .arg("train")
            .arg("--config")
            .arg(root().join("configs/sinusoid.toml"))
            .args([
                "--steps",
                &steps.to_string(),
                "--set",
                "eval.every=0",
                "--set",
                "eval.final_tasks=20",
                "--local-workers",
                "0",
            ])
            .args(extra)
            .arg("--out")
            .arg(dir.join("run")),
        "coordinator",
    );
    let (addr, fp) = coord.wait_for(Duration::from_secs(30), coordinator_address);
    (coord, addr, fp)
}

#[test]
fn wrong_fingerprint_is_refused_by_the_worker() {
    let dir = scratch("wrong-fp");
    let (_coord, addr, fp) = start_coordinator(&dir, 1000);
    let wrong: String = fp.chars().rev().collect();
    let out = Command::new(binary("metatrain-worker"))
        .args([
            "run",
            "--coordinator",
            &addr,
            "--fingerprint",
            &wrong,
            "--connect-timeout",
            "0",
            "--metrics-addr",
            "none",
        ])
        .output()
        .expect("run worker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "must not connect: {err}");
    assert!(err.contains("fingerprint"), "says why: {err}");
}

#[test]
fn hostile_peers_are_disconnected_and_the_run_completes() {
    install_crypto_provider();
    let dir = scratch("hostile");
    let (coord, addr, fp) = start_coordinator(&dir, 30);
    let sock: SocketAddr = addr.parse().expect("addr");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let identity = issued_identity(&dir.join("run/tls"), "prober");
    rt.block_on(async {
        let endpoint = client_endpoint(&ServerTrust::Fingerprint(fp.clone()), Some(&identity)).expect("endpoint");

        // 1. Another protocol version: refused, both versions named.
        let conn = endpoint.connect(sock, server_name()).expect("connect").await.expect("handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("bi");
        let hello = Hello { protocol_version: 99, worker_name: "old".into(), capacity: 1, device: "cpu".into() };
        write_frame(&mut send, &Message::Hello(hello), &[]).await.expect("send hello");
        match read_frame(&mut recv, &Limits::CONTROL).await.expect("reply").map(|f| f.message) {
            Some(Message::Refused { reason }) => {
                assert!(reason.contains("v99") && reason.contains(&format!("v{PROTOCOL_VERSION}")), "{reason}");
            }
            other => panic!("expected Refused, got {other:?}"),
        }

        // 2. Garbage instead of a frame: the connection is closed with a reason.
        let conn = endpoint.connect(sock, server_name()).expect("connect").await.expect("handshake");
        let (mut send, _recv) = conn.open_bi().await.expect("bi");
        send.write_all(b"GET / HTTP/1.1\r\n\r\n-----------------").await.expect("write");
        let closed = tokio::time::timeout(Duration::from_secs(15), conn.closed()).await.expect("closed in time");
        assert!(closed.to_string().contains("magic") || closed.to_string().contains("protocol"), "{closed}");

        // 3. A frame announcing a 1 TiB header: refused from the prefix, no allocation.
        let conn = endpoint.connect(sock, server_name()).expect("connect").await.expect("handshake");
        let (mut send, _recv) = conn.open_bi().await.expect("bi");
        let mut prefix = FRAME_MAGIC.to_vec();
        prefix.extend_from_slice(&u32::MAX.to_le_bytes());
        prefix.extend_from_slice(&u64::MAX.to_le_bytes());
        send.write_all(&prefix).await.expect("write");
        let closed = tokio::time::timeout(Duration::from_secs(15), conn.closed()).await.expect("closed in time");
        assert!(closed.to_string().contains("exceeds"), "{closed}");
    });

    // A good worker still completes the run.
    let (wstatus, _) =
        Proc::spawn(&mut worker(&addr, &fp, &dir.join("run/tls"), "good"), "worker").finish(Duration::from_secs(120));
    assert!(wstatus.success());
    let (status, _) = coord.finish(Duration::from_secs(60));
    assert!(status.success());
    let report = read_report(&dir.join("run"));
    assert_eq!(report["final_step"], 30);
}

/// Tries to join with `args` (besides address and fingerprint) and reports (success, stderr).
fn try_join(addr: &str, fp: &str, args: &[String]) -> (bool, String) {
    let out = Command::new(binary("metatrain-worker"))
        .args(["run", "--coordinator", addr, "--fingerprint", fp, "--connect-timeout", "0", "--metrics-addr", "none"])
        .args(args)
        .output()
        .expect("run worker");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn mutual_tls_refuses_workers_without_a_certificate_from_the_cluster_ca() {
    let dir = scratch("mtls");
    let (coord, addr, fp) = start_coordinator(&dir, 5);
    // No client certificate: the handshake fails.
    let (ok, err) = try_join(&addr, &fp, &[]);
    assert!(!ok, "a worker without a certificate joined: {err}");
    assert!(err.to_lowercase().contains("certificate"), "says why: {err}");
    // A certificate from another cluster's CA: refused too.
    let other = dir.join("other-ca");
    let init = Command::new(binary("metatrain")).args(["certs", "init", "--dir"]).arg(&other).output().expect("init");
    assert!(init.status.success());
    let (ok, err) = try_join(&addr, &fp, &worker_cert_args(&other, "intruder"));
    assert!(!ok, "a worker with a foreign certificate joined: {err}");
    // A certificate from this cluster's CA: joins, and the run completes.
    let (ok, err) = try_join(&addr, &fp, &worker_cert_args(&dir.join("run/tls"), "member"));
    assert!(ok, "{err}");
    let (status, lines) = coord.finish(Duration::from_secs(60));
    assert!(status.success());
    assert!(lines.iter().any(|l| l.contains("(member,")), "the certificate name is the worker's name in logs");
}

#[test]
fn insecure_mode_must_be_asked_for_by_name_and_says_so() {
    let dir = scratch("insecure");
    let (coord, addr, fp) = start_coordinator_with(&dir, 5, &["--insecure-no-worker-auth"]);
    let (ok, err) = try_join(&addr, &fp, &[]);
    assert!(ok, "{err}");
    let (status, lines) = coord.finish(Duration::from_secs(60));
    assert!(status.success());
    assert!(lines.iter().any(|l| l.contains("NOT authenticated")), "a loud warning");
}
