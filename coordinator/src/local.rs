//! The embedded default: `--local-workers N` spawns `metatrain-worker` processes on loopback for this run
//! and stops them at the end (they are killed if the coordinator dies first: `kill_on_drop`, and each
//! worker exits when its connection drops).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};

pub struct LocalWorkers {
    children: Vec<Child>,
}

/// `metatrain-worker` beside the current executable, else on PATH.
pub fn find_worker_binary(flag: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = flag {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--worker-bin {}: no such file", p.display());
    }
    let exe = std::env::current_exe().context("locating the metatrain binary")?;
    if let Some(dir) = exe.parent() {
        let beside = dir.join("metatrain-worker");
        if beside.is_file() {
            return Ok(beside);
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("metatrain-worker");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    bail!(
        "cannot find metatrain-worker beside {} or on PATH; build it (scripts/setup.sh) or pass --worker-bin",
        exe.display()
    )
}

/// The address local workers dial: the coordinator's listen address, an unspecified IP made loopback.
pub fn dial_address(listen: SocketAddr) -> SocketAddr {
    if listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    }
}

/// Tasks each of `count` local workers computes at once when each task uses `threads` libtorch threads:
/// this machine's cores shared out (at least one).
pub fn shared_capacity(count: usize, threads: usize) -> usize {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    (cores / count.max(1) / threads.max(1)).max(1)
}

pub struct LocalSpec<'a> {
    pub binary: &'a Path,
    pub count: usize,
    pub coordinator: SocketAddr,
    pub fingerprint: &'a str,
    /// The cluster TLS directory: each local worker gets a certificate `local-<i>` issued from its CA.
    pub tls_dir: &'a Path,
    /// libtorch threads per compute thread.
    pub threads: usize,
    /// Compute threads per worker (`--capacity`); each batches the training tasks it holds.
    pub capacity: usize,
    pub data_dir: Option<&'a Path>,
    /// Keep serving run after run on the same address (`metatrain-worker run --stay`): the worker pool
    /// of a sweep.
    pub stay: bool,
}

/// How long a sweep's workers wait for the next run's coordinator.
const STAY_CONNECT_TIMEOUT_SECS: u64 = 300;

impl LocalWorkers {
    pub fn spawn(spec: &LocalSpec<'_>) -> Result<Self> {
        let mut children = Vec::new();
        for i in 0..spec.count {
            let name = format!("local-{i}");
            let (cert, key) = metatrain_common::net::pki::issue(spec.tls_dir, &name).map_err(anyhow::Error::msg)?;
            let mut cmd = Command::new(spec.binary);
            cmd.arg("run")
                .arg("--coordinator")
                .arg(spec.coordinator.to_string())
                .arg("--fingerprint")
                .arg(spec.fingerprint)
                .arg("--name")
                .arg(&name)
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key)
                .arg("--threads")
                .arg(spec.threads.to_string())
                .arg("--capacity")
                .arg(spec.capacity.to_string())
                .arg("--metrics-addr")
                .arg("127.0.0.1:0")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .kill_on_drop(true);
            // Die with the coordinator even if it is killed outright (SIGKILL skips kill_on_drop).
            #[cfg(target_os = "linux")]
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                    Ok(())
                });
            }
            if let Some(d) = spec.data_dir {
                cmd.arg("--data-dir").arg(d);
            }
            if spec.stay {
                cmd.arg("--stay").arg("--connect-timeout").arg(STAY_CONNECT_TIMEOUT_SECS.to_string());
            }
            // Local workers' routine logs would interleave with the coordinator's; warnings still show.
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "warn");
            }
            children.push(cmd.spawn().with_context(|| format!("starting {}", spec.binary.display()))?);
        }
        Ok(LocalWorkers { children })
    }

    /// How many local workers are still running.
    pub fn alive(&mut self) -> usize {
        self.children.iter_mut().map(|c| matches!(c.try_wait(), Ok(None)) as usize).sum()
    }

    pub fn count(&self) -> usize {
        self.children.len()
    }

    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Waits briefly for the workers to exit after Shutdown, then kills what is left.
    pub async fn stop(mut self) {
        for c in &mut self.children {
            if tokio::time::timeout(std::time::Duration::from_secs(5), c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }

    /// Kills the workers at once (a sweep's `--stay` workers never exit by themselves).
    pub async fn stop_now(mut self) {
        for c in &mut self.children {
            let _ = c.kill().await;
        }
    }
}
