//! Helpers for the whole-system tests in `tests/`: locating the built binaries, starting processes,
//! reading the addresses they print, polling with deadlines (never sleeping for a condition).
//!
//! The binaries are built by `scripts/test.sh` (`cargo build --release --bins`) before `cargo test`;
//! a test that cannot find them fails and says how to build them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

/// Path of a built binary (`metatrain` or `metatrain-worker`), release build preferred.
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| root().join("target"));
    for profile in ["release", "debug"] {
        let p = target.join(profile).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is not built under {}: run scripts/test.sh (or cargo build --release --bins) first",
        target.display()
    );
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("metatrain-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating a scratch dir");
    dir
}

/// A child process whose stderr lines are collected (and echoed with a prefix, for failing tests).
pub struct Proc {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, tag: &str) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(Stdio::null());
        // The binaries look for the data near the working directory and near themselves; with
        // CARGO_TARGET_DIR outside the checkout neither is near it, so name the checkout's data.
        if let Some(data) = metatrain_common::datadir::for_tests() {
            if !cmd.get_envs().any(|(k, _)| k == metatrain_common::datadir::ENV) {
                cmd.env(metatrain_common::datadir::ENV, data);
            }
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("starting {tag}: {e}"));
        let (tx, rx) = channel();
        for stream in [
            child.stderr.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child.stdout.take().map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (tx, tag) = (tx.clone(), tag.to_string());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    eprintln!("[{tag}] {line}");
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Proc { child, lines: rx, seen: Vec::new() }
    }

    /// Waits for an output line satisfying `pick`, returning what it extracts.
    pub fn wait_for<T>(&mut self, timeout: Duration, mut pick: impl FnMut(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + timeout;
        for line in &self.seen {
            if let Some(v) = pick(line) {
                return v;
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let v = pick(&line);
                    self.seen.push(line);
                    if let Some(v) = v {
                        return v;
                    }
                }
                Err(_) => panic!("no matching output line within {timeout:?}; saw:\n{}", self.seen.join("\n")),
            }
        }
    }

    /// Waits for exit (killing after `timeout`) and returns the status and every output line.
    pub fn finish(mut self, timeout: Duration) -> (std::process::ExitStatus, Vec<String>) {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("process did not exit within {timeout:?}; output:\n{}", self.seen.join("\n"));
            }
            while let Ok(l) = self.lines.try_recv() {
                self.seen.push(l);
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Drain what the reader threads still hold.
        let drain_until = Instant::now() + Duration::from_secs(2);
        while let Ok(l) = self.lines.recv_timeout(drain_until.saturating_duration_since(Instant::now())) {
            self.seen.push(l);
        }
        (status, std::mem::take(&mut self.seen))
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill").arg(format!("-{sig}")).arg(self.child.id().to_string()).status();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses `... listening on ADDR (QUIC), certificate fingerprint HEX` from the coordinator's output.
pub fn coordinator_address(line: &str) -> Option<(String, String)> {
    let rest = line.split("listening on ").nth(1)?;
    let addr = rest.split_whitespace().next()?.to_string();
    let fp = line.split("fingerprint ").nth(1)?.trim().to_string();
    Some((addr, fp))
}

/// Parses `metrics: http://ADDR/metrics`.
pub fn metrics_address(line: &str) -> Option<String> {
    let rest = line.split("metrics: http://").nth(1)?;
    Some(rest.split('/').next()?.to_string())
}

/// GET http://addr/metrics over a plain TCP socket.
pub fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).ok();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("write");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read");
    body.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// The report.json of a finished run.
pub fn read_report(out: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(out.join("report.json"))
        .unwrap_or_else(|e| panic!("{}/report.json: {e}", out.display()));
    serde_json::from_str(&text).expect("report.json is JSON")
}

/// Issues a worker certificate `name` from the CA in `tls_dir` (the run's `<out>/tls`) and returns the
/// worker options that present it: `--cert FILE --key FILE`.
pub fn worker_cert_args(tls_dir: &Path, name: &str) -> Vec<String> {
    let out = Command::new(binary("metatrain"))
        .args(["certs", "issue", name, "--dir"])
        .arg(tls_dir)
        .output()
        .expect("run metatrain certs issue");
    assert!(out.status.success(), "certs issue failed: {}", String::from_utf8_lossy(&out.stderr));
    let dir = tls_dir.join("workers");
    vec![
        "--cert".into(),
        dir.join(format!("{name}.crt")).display().to_string(),
        "--key".into(),
        dir.join(format!("{name}.key")).display().to_string(),
    ]
}

/// A `metatrain-worker run` joining `addr` (pinning `fp`) with a certificate issued as `name`.
pub fn worker(addr: &str, fp: &str, tls_dir: &Path, name: &str) -> Command {
    let mut cmd = Command::new(binary("metatrain-worker"));
    cmd.args(["run", "--coordinator", addr, "--fingerprint", fp, "--name", name]);
    cmd.args(worker_cert_args(tls_dir, name));
    cmd
}

/// A worker identity (for tests that speak the protocol by hand), issued as `name` from `tls_dir`'s CA.
pub fn issued_identity(tls_dir: &Path, name: &str) -> metatrain_common::net::Identity {
    worker_cert_args(tls_dir, name);
    let dir = tls_dir.join("workers");
    metatrain_common::net::Identity::load(&dir.join(format!("{name}.crt")), &dir.join(format!("{name}.key")))
        .expect("load issued identity")
}

/// `metatrain train` on configs/noisy-linear.toml with `steps`, `seed`, `local` local workers, no
/// evaluations, metrics on a free loopback port, into `out`; callers add options.
pub fn noisy_linear_run(out: &Path, steps: u32, seed: u64, local: usize) -> Command {
    let mut cmd = Command::new(binary("metatrain"));
    cmd.arg("train")
        .arg("--config")
        .arg(root().join("configs/noisy-linear.toml"))
        .args(["--steps", &steps.to_string(), "--seed", &seed.to_string()])
        .args(["--set", "eval.every=0", "--set", "eval.final_tasks=0"])
        .args(["--local-workers", &local.to_string(), "--metrics-addr", "127.0.0.1:0", "--out"])
        .arg(out);
    cmd
}

/// The value of an unlabelled metric in a scrape (0 when absent).
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Polls the coordinator's /metrics until at least `n` meta-steps are done.
pub fn wait_for_steps(metrics_addr: &str, n: f64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while metric(&scrape(metrics_addr), "metatrain_meta_steps_total") < n {
        assert!(Instant::now() < deadline, "the run did not reach {n} meta-steps within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
