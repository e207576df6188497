//! `metatrain status ADDR`: what a running coordinator is doing, read from its `/metrics` (the address
//! `metatrain train` prints as `metrics: http://ADDR/metrics`). Two scrapes a second apart give rates.
//!
//! [`Scrape::parse`] and [`render`] are pure (tested below); only [`fetch`] touches the network.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The coordinator's metrics address, HOST:PORT (printed at start as `metrics: http://HOST:PORT/metrics`).
    pub addr: String,
    /// Keep refreshing every this many seconds (until Ctrl-C).
    #[arg(long, value_name = "SECS")]
    pub watch: Option<u64>,
}

/// Largest /metrics response read (a coordinator's is a few KiB).
const MAX_RESPONSE: u64 = 4 << 20;
const TIMEOUT: Duration = Duration::from_secs(5);

/// One scrape: sample name with its labels (as written, e.g. `x{mode="train"}`) → value.
#[derive(Debug, Default)]
pub struct Scrape {
    samples: BTreeMap<String, f64>,
}

impl Scrape {
    pub fn parse(text: &str) -> Scrape {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let (name, value) = l.rsplit_once(' ')?;
                Some((name.trim().to_string(), value.trim().parse::<f64>().ok()?))
            })
            .collect();
        Scrape { samples }
    }

    /// The sample of `name` (a gauge of one coordinator has one, with whatever global labels it carries).
    pub fn get(&self, name: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|(k, _)| k.strip_prefix(name).is_some_and(|rest| rest.is_empty() || rest.starts_with('{')))
            .map(|(_, v)| *v)
    }

    /// The sum over every label set of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.by_label(name, "").values().sum()
    }

    /// `name`'s samples keyed by the value of `label` (all label sets when `label` is empty).
    pub fn by_label(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (k, v) in &self.samples {
            let Some(rest) = k.strip_prefix(name) else { continue };
            if !(rest.is_empty() || rest.starts_with('{')) {
                continue;
            }
            let key = if label.is_empty() {
                rest.to_string()
            } else {
                let needle = format!("{label}=\"");
                let Some(start) = rest.find(&needle).map(|i| i + needle.len()) else { continue };
                rest[start..].split('"').next().unwrap_or_default().to_string()
            };
            *out.entry(key).or_insert(0.0) += v;
        }
        out
    }
}

/// The status report from two scrapes `dt` apart.
pub fn render(before: &Scrape, now: &Scrape, dt: f64) -> String {
    let rate = |name: &str| (now.sum(name) - before.sum(name)).max(0.0) / dt.max(1e-9);
    let opt = |v: Option<f64>| v.map(|x| format!("{x:.4}")).unwrap_or_else(|| "-".into());
    let mut s = String::new();
    let step = now.get("metatrain_params_version").unwrap_or(0.0);
    s.push_str(&format!("meta-step        {step:.0} ({:.2} steps/s)\n", rate("metatrain_meta_steps_total")));
    s.push_str(&format!(
        "meta-train loss  {} → {} (before → after adaptation, last meta-batch)\n",
        opt(now.get("metatrain_meta_train_pre_adapt_loss")),
        opt(now.get("metatrain_meta_train_loss"))
    ));
    if now.get("metatrain_meta_test_loss").is_some() {
        let acc = now.get("metatrain_meta_test_accuracy").map(|a| format!(", accuracy {:.1}%", 100.0 * a));
        s.push_str(&format!(
            "meta-test loss   {} → {}{} (last evaluation)\n",
            opt(now.get("metatrain_meta_test_pre_adapt_loss")),
            opt(now.get("metatrain_meta_test_loss")),
            acc.unwrap_or_default()
        ));
    }
    s.push_str(&format!("gradient norm    {} (before clipping)\n", opt(now.get("metatrain_meta_grad_norm"))));
    s.push_str(&format!(
        "workers          {:.0} connected ({:.0} joined, {:.0} lost, {:.0} quarantined)\n",
        now.get("metatrain_workers_connected").unwrap_or(0.0),
        now.sum("metatrain_workers_joined_total"),
        now.sum("metatrain_workers_lost_total"),
        now.sum("metatrain_workers_quarantined_total"),
    ));
    s.push_str(&format!(
        "tasks            {:.0} done ({:.1}/s), {:.0} reassigned, {:.0} duplicated, {:.0} failed\n",
        now.sum("metatrain_tasks_completed_total"),
        rate("metatrain_tasks_completed_total"),
        now.sum("metatrain_tasks_reassigned_total"),
        now.sum("metatrain_tasks_duplicated_total"),
        now.sum("metatrain_tasks_failed_total"),
    ));
    let per_worker = now.by_label("metatrain_worker_results_total", "worker");
    let before_worker = before.by_label("metatrain_worker_results_total", "worker");
    for (name, total) in &per_worker {
        let r = (total - before_worker.get(name).copied().unwrap_or(0.0)).max(0.0) / dt.max(1e-9);
        s.push_str(&format!("  {name:<24} {total:>10.0} results ({r:.1}/s)\n"));
    }
    let rejected: Vec<String> = now
        .by_label("metatrain_results_rejected_total", "reason")
        .into_iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(k, v)| format!("{k} {v:.0}"))
        .collect();
    s.push_str(&format!(
        "rejected results {}\n",
        if rejected.is_empty() { "none".to_string() } else { rejected.join(", ") }
    ));
    if let (Some(at), Some(step)) =
        (now.get("metatrain_checkpoint_timestamp_seconds"), now.get("metatrain_checkpoint_step"))
    {
        let unix =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(at);
        s.push_str(&format!("checkpoint       step {step:.0}, {:.0} s ago\n", (unix - at).max(0.0)));
    } else {
        s.push_str("checkpoint       none yet\n");
    }
    s
}

/// GET http://addr/metrics with a timeout and a size limit.
pub fn fetch(addr: &str) -> Result<String> {
    let sock = addr
        .to_socket_addrs()
        .with_context(|| format!("{addr:?}: expected HOST:PORT"))?
        .next()
        .with_context(|| format!("{addr:?} resolves to no address"))?;
    let mut s = TcpStream::connect_timeout(&sock, TIMEOUT).with_context(|| format!("cannot connect to {addr}"))?;
    s.set_read_timeout(Some(TIMEOUT))?;
    s.set_write_timeout(Some(TIMEOUT))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
        .with_context(|| format!("sending the request to {addr}"))?;
    // Read until the server closes, within one overall deadline (a server that drips a byte at a time
    // must not hold us beyond it), at most MAX_RESPONSE bytes.
    let deadline = Instant::now() + TIMEOUT;
    let mut raw = Vec::new();
    let mut chunk = [0u8; 16 << 10];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("{addr} did not finish answering within {}s", TIMEOUT.as_secs());
        }
        s.set_read_timeout(Some(left))?;
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                bail!("{addr} did not finish answering within {}s", TIMEOUT.as_secs())
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("reading from {addr}"))),
        }
        if raw.len() as u64 > MAX_RESPONSE {
            bail!("{addr} answered more than {MAX_RESPONSE} bytes");
        }
    }
    let body = String::from_utf8_lossy(&raw);
    let Some((head, text)) = body.split_once("\r\n\r\n") else { bail!("{addr} did not answer with HTTP") };
    let status = head.lines().next().unwrap_or_default();
    if !(status.starts_with("HTTP/1.1 200") || status.starts_with("HTTP/1.0 200")) {
        bail!("{addr} answered {status}");
    }
    if !text.contains("metatrain_meta_steps_total") {
        bail!("{addr} serves metrics, but not a metatrain coordinator's (a worker's? use the coordinator's metrics address)");
    }
    Ok(text.to_string())
}

pub fn run(args: StatusArgs) -> Result<()> {
    loop {
        let t = Instant::now();
        let before = Scrape::parse(&fetch(&args.addr)?);
        std::thread::sleep(Duration::from_secs(1));
        let now = Scrape::parse(&fetch(&args.addr)?);
        println!("coordinator {} — {}", args.addr, crate::train::utc_stamp());
        print!("{}", render(&before, &now, t.elapsed().as_secs_f64()));
        let Some(every) = args.watch else { return Ok(()) };
        println!();
        std::thread::sleep(Duration::from_secs(every.max(1)).saturating_sub(t.elapsed()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "# HELP metatrain_meta_steps_total x
# TYPE metatrain_meta_steps_total counter
metatrain_meta_steps_total 10
metatrain_params_version 10
metatrain_meta_train_loss 0.5
metatrain_workers_connected 2
metatrain_tasks_completed_total{mode=\"train\"} 100
metatrain_tasks_completed_total{mode=\"eval\"} 20
metatrain_worker_results_total{worker=\"local-0\"} 60
metatrain_worker_results_total{worker=\"local-1\"} 60
metatrain_results_rejected_total{reason=\"duplicate\"} 0
";
    const B: &str = "metatrain_meta_steps_total 14
metatrain_params_version{run=\"a\"} 14
metatrain_meta_train_loss 0.25
metatrain_meta_train_pre_adapt_loss 3
metatrain_workers_connected 2
metatrain_tasks_completed_total{mode=\"train\"} 140
metatrain_tasks_completed_total{mode=\"eval\"} 20
metatrain_worker_results_total{run=\"a\",worker=\"local-0\"} 90
metatrain_worker_results_total{worker=\"local-1\"} 70
metatrain_results_rejected_total{reason=\"duplicate\"} 3
";

    #[test]
    fn rates_per_worker_and_rejections_from_two_scrapes() {
        let (a, b) = (Scrape::parse(A), Scrape::parse(B));
        assert_eq!(b.sum("metatrain_tasks_completed_total"), 160.0);
        assert_eq!(b.by_label("metatrain_worker_results_total", "worker")["local-0"], 90.0);
        let text = render(&a, &b, 2.0);
        assert!(text.contains("meta-step        14 (2.00 steps/s)"), "{text}");
        assert!(text.contains("3.0000 → 0.2500"), "{text}");
        assert!(text.contains("160 done (20.0/s)"), "{text}");
        assert!(text.contains("local-0") && text.contains("(15.0/s)"), "{text}");
        assert!(text.contains("rejected results duplicate 3"), "{text}");
        assert!(!text.contains("meta-test"), "no evaluation yet: {text}");
    }
}
