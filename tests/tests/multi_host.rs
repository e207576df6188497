//! Multi-host: the coordinator and two workers in network namespaces of their own, joined by veth pairs
//! (made by this test, so only its own addresses receive traffic). One worker's link is cut mid-run and
//! restored; `tc netem` adds delay and loss to the other's where the kernel has it. The run completes
//! with the same parameters as on loopback. Needs root (CI runs as root); skipped with a message where
//! namespaces cannot be made.

use std::process::Command;
use std::time::{Duration, Instant};

use metatrain_tests::{binary, coordinator_address, read_report, root, scratch, worker_cert_args, Proc};

const STEPS: &str = "150";

fn ip(args: &[&str]) -> bool {
    Command::new("ip").args(args).status().map(|s| s.success()).unwrap_or(false)
}

/// Namespaces `<prefix>-c`, `-w0`, `-w1`; coordinator 10.201.{0,1}.1, workers 10.201.{0,1}.2. Deleted on drop.
struct Net {
    prefix: String,
}

impl Net {
    fn ns(&self, n: &str) -> String {
        format!("{}-{n}", self.prefix)
    }

    fn make() -> Option<Net> {
        let net = Net { prefix: format!("mt{}", std::process::id()) };
        if !ip(&["netns", "add", &net.ns("c")]) {
            return None;
        }
        let c = net.ns("c");
        ip(&["-n", &c, "link", "set", "lo", "up"]);
        for i in 0..2 {
            let w = net.ns(&format!("w{i}"));
            let (cv, wv) = (format!("c{i}"), format!("w{i}"));
            let ok = ip(&["netns", "add", &w])
                && ip(&["link", "add", &cv, "netns", &c, "type", "veth", "peer", "name", &wv, "netns", &w])
                && ip(&["-n", &c, "addr", "add", &format!("10.201.{i}.1/30"), "dev", &cv])
                && ip(&["-n", &w, "addr", "add", &format!("10.201.{i}.2/30"), "dev", &wv])
                && ip(&["-n", &c, "link", "set", &cv, "up"])
                && ip(&["-n", &w, "link", "set", &wv, "up"])
                && ip(&["-n", &w, "link", "set", "lo", "up"]);
            if !ok {
                return None;
            }
        }
        Some(net)
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for n in ["c", "w0", "w1"] {
            let _ = Command::new("ip").args(["netns", "del", &self.ns(n)]).status();
        }
    }
}

fn train(out: &std::path::Path, local: &str, listen: &str) -> Vec<String> {
    vec![
        binary("metatrain").display().to_string(),
        "train".into(),
        "--config".into(),
        root().join("configs/noisy-linear.toml").display().to_string(),
        "--steps".into(),
        STEPS.into(),
        "--seed".into(),
        "21".into(),
        "--set".into(),
        "eval.every=0".into(),
        "--set".into(),
        "eval.final_tasks=0".into(),
        "--local-workers".into(),
        local.into(),
        "--listen".into(),
        listen.into(),
        "--metrics-addr".into(),
        "none".into(),
        "--out".into(),
        out.display().to_string(),
    ]
}

#[test]
fn workers_in_other_namespaces_survive_a_cut_link() {
    let Some(net) = Net::make() else {
        eprintln!("SKIPPED multi-host test: cannot create network namespaces here (needs root and iproute2)");
        return;
    };
    let dir = scratch("multi-host");
    let local = train(&dir.join("loopback"), "2", "127.0.0.1:0");
    let (status, _) =
        Proc::spawn(Command::new(&local[0]).args(&local[1..]), "loopback").finish(Duration::from_secs(300));
    assert!(status.success());
    let reference = read_report(&dir.join("loopback"));

    let out = dir.join("netns");
    let mut coord = Proc::spawn(
        Command::new("ip").args(["netns", "exec", &net.ns("c")]).args(train(&out, "0", "0.0.0.0:0")),
        "coordinator",
    );
    let (addr, fp) = coord.wait_for(Duration::from_secs(30), coordinator_address);
    let port = addr.rsplit(':').next().expect("port").to_string();
    let netem = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.ns("w1"),
            "tc",
            "qdisc",
            "add",
            "dev",
            "w1",
            "root",
            "netem",
            "delay",
            "20ms",
            "loss",
            "1%",
        ])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !netem {
        eprintln!("NOTE: tc netem is not available in this kernel; running without added delay/loss");
    }
    let workers: Vec<Proc> = (0..2)
        .map(|i| {
            let name = format!("host{i}");
            Proc::spawn(
                Command::new("ip")
                    .args(["netns", "exec", &net.ns(&format!("w{i}"))])
                    .arg(binary("metatrain-worker"))
                    .args([
                        "run",
                        "--coordinator",
                        &format!("10.201.{i}.1:{port}"),
                        "--fingerprint",
                        &fp,
                        "--name",
                        &name,
                    ])
                    .args(["--metrics-addr", "none"])
                    .args(worker_cert_args(&out.join("tls"), &name)),
                &name,
            )
        })
        .collect();
    // Cut worker 0's link for 4 s once both workers are in, then restore it.
    coord.wait_for(Duration::from_secs(60), |l| l.contains("(host0,").then_some(()));
    coord.wait_for(Duration::from_secs(60), |l| l.contains("(host1,").then_some(()));
    let cut = Instant::now();
    assert!(ip(&["-n", &net.ns("c"), "link", "set", "c0", "down"]));
    std::thread::sleep(Duration::from_secs(4));
    assert!(ip(&["-n", &net.ns("c"), "link", "set", "c0", "up"]));
    let (status, _) = coord.finish(Duration::from_secs(300));
    assert!(status.success());
    drop(workers);
    let r = read_report(&out);
    println!(
        "netns run: finished {:.1}s after the cut; reassigned {}, duplicated {}, netem {}",
        cut.elapsed().as_secs_f64(),
        r["tasks_reassigned"],
        r["tasks_duplicated"],
        if netem { "on" } else { "unavailable" }
    );
    assert_eq!(r["final_step"].as_u64(), Some(150));
    assert_eq!(r["params_sha256"], reference["params_sha256"], "same parameters as on loopback");
}
