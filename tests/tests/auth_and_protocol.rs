//! The coordinator refuses what it must, without falling over: a worker pinning the wrong certificate
//! cannot connect; a peer speaking another protocol version is refused with both versions named; a peer
//! sending garbage or an oversized frame is disconnected while the run carries on with a good worker.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use metatrain_common::net::{client_endpoint, install_crypto_provider, read_frame, server_name, write_frame};
use metatrain_common::protocol::{Hello, Limits, Message, FRAME_MAGIC};
use metatrain_tests::{binary, coordinator_address, read_report, root, scratch, Proc};

fn start_coordinator(dir: &std::path::Path, steps: u32) -> (Proc, String, String) {
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
    rt.block_on(async {
        let endpoint = client_endpoint(&fp).expect("endpoint");

        // 1. Another protocol version: refused, both versions named.
        let conn = endpoint.connect(sock, server_name()).expect("connect").await.expect("handshake");
        let (mut send, mut recv) = conn.open_bi().await.expect("bi");
        let hello = Hello { protocol_version: 99, worker_name: "old".into(), capacity: 1, device: "cpu".into() };
        write_frame(&mut send, &Message::Hello(hello), &[]).await.expect("send hello");
        match read_frame(&mut recv, &Limits::CONTROL).await.expect("reply").map(|f| f.message) {
            Some(Message::Refused { reason }) => {
                assert!(reason.contains("v99") && reason.contains("v1"), "{reason}");
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
    let (wstatus, _) = Proc::spawn(
        Command::new(binary("metatrain-worker")).args([
            "run",
            "--coordinator",
            &addr,
            "--fingerprint",
            &fp,
            "--metrics-addr",
            "none",
        ]),
        "worker",
    )
    .finish(Duration::from_secs(120));
    assert!(wstatus.success());
    let (status, _) = coord.finish(Duration::from_secs(60));
    assert!(status.success());
    let report = read_report(&dir.join("run"));
    assert_eq!(report["final_step"], 30);
}
