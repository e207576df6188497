//! /metrics of a running coordinator and of a worker: the required metrics are there, with HELP text,
//! and `promtool check metrics` accepts both; docs/metrics.md lists exactly what they export, with the
//! right types; every query of the Grafana dashboard parses (`promtool check rules`) and names only
//! metrics they export. The run is then interrupted (SIGINT), which must still write a report.

use std::process::Command;
use std::time::{Duration, Instant};

use metatrain_tests::{binary, coordinator_address, metrics_address, read_report, root, scrape, scratch, worker, Proc};

const COORDINATOR_METRICS: &[&str] = &[
    "metatrain_meta_steps_total",
    "metatrain_tasks_completed_total",
    "metatrain_workers_connected",
    "metatrain_meta_train_loss",
    "metatrain_meta_test_loss",
    "metatrain_meta_grad_norm",
    "metatrain_step_duration_seconds_bucket",
    "metatrain_task_duration_seconds_bucket",
];
const WORKER_METRICS: &[&str] =
    &["metatrain_worker_task_duration_seconds_bucket", "metatrain_worker_tasks_completed_total"];

fn promtool(text: &str, who: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    else {
        if std::env::var_os("CI").is_some() {
            panic!("promtool is required in CI (Debian package `prometheus`; scripts/test.sh installs it)");
        }
        eprintln!("SKIPPED promtool check for {who}: promtool not installed (apt-get install prometheus)");
        return;
    };
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("promtool");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool on {who}'s metrics: {report}\n{text}");
}

fn has_help(text: &str, name: &str) -> bool {
    let base = name.trim_end_matches("_bucket");
    text.lines().any(|l| l.starts_with(&format!("# HELP {base} ")))
}

#[test]
fn coordinator_and_worker_metrics_pass_promtool() {
    let dir = scratch("metrics");
    let mut coord = Proc::spawn(
        Command::new(binary("metatrain"))
            .arg("train")
            .arg("--config")
            .arg(root().join("configs/sinusoid.toml"))
            .args(["--steps", "100000", "--set", "eval.every=20", "--set", "eval.tasks=10", "--local-workers", "0"])
            .args(["--set", "checkpoint.every=5", "--metrics-label", "run=probe-run"])
            .arg("--out")
            .arg(dir.join("run")),
        "coordinator",
    );
    let coord_metrics = coord.wait_for(Duration::from_secs(30), metrics_address);
    let (addr, fp) = coord.wait_for(Duration::from_secs(30), coordinator_address);
    let mut worker = Proc::spawn(&mut worker(&addr, &fp, &dir.join("run/tls"), "probe"), "worker");
    let worker_metrics = worker.wait_for(Duration::from_secs(30), metrics_address);

    // Poll until an evaluation has happened (every metric then has a value).
    let deadline = Instant::now() + Duration::from_secs(120);
    let coord_text = loop {
        let t = scrape(&coord_metrics);
        if t.contains("metatrain_meta_test_loss{") && COORDINATOR_METRICS.iter().all(|m| t.contains(m)) {
            break t;
        }
        assert!(Instant::now() < deadline, "coordinator metrics incomplete:\n{t}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let worker_text = scrape(&worker_metrics);
    for m in COORDINATOR_METRICS {
        assert!(has_help(&coord_text, m), "no HELP for {m}");
    }
    for m in WORKER_METRICS {
        assert!(worker_text.contains(m) && has_help(&worker_text, m), "worker lacks {m}:\n{worker_text}");
    }
    assert!(coord_text.contains("metatrain_workers_connected{run=\"probe-run\"} 1"), "labelled: {coord_text}");
    promtool(&coord_text, "the coordinator");
    promtool(&worker_text, "the worker");
    catalogue_matches(&[&coord_text, &worker_text]);
    dashboard_queries_parse_and_name_exported_metrics(&dir, &[&coord_text, &worker_text]);

    // `metatrain status` reads the same endpoint; pointed at a worker's, it says so.
    let out = Command::new(binary("metatrain")).args(["status", &coord_metrics]).output().expect("status");
    let status_text = String::from_utf8_lossy(&out.stdout);
    println!("{status_text}");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(status_text.contains("1 connected") && status_text.contains("probe"), "{status_text}");
    assert!(status_text.contains("meta-test loss"), "{status_text}");
    let out = Command::new(binary("metatrain")).args(["status", &worker_metrics]).output().expect("status");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not a metatrain coordinator"));

    // Ctrl-C: the coordinator stops, tells the worker, and still writes its report.
    coord.signal("INT");
    let (status, _) = coord.finish(Duration::from_secs(30));
    assert!(status.success(), "interrupted run exits 0: {status}");
    let report = read_report(&dir.join("run"));
    assert_eq!(report["interrupted"], true);
    assert!(report["final_step"].as_u64().unwrap_or(0) >= 20);
    let (wstatus, _) = worker.finish(Duration::from_secs(30));
    assert!(wstatus.success(), "worker exits cleanly on Shutdown: {wstatus}");
}

/// `# TYPE name kind` lines of metatrain metrics in scrapes.
fn exported_types(texts: &[&str]) -> std::collections::BTreeMap<String, String> {
    texts
        .iter()
        .flat_map(|t| t.lines())
        .filter_map(|l| l.strip_prefix("# TYPE metatrain_"))
        .filter_map(|rest| rest.split_once(' ').map(|(n, k)| (format!("metatrain_{n}"), k.trim().to_string())))
        .collect()
}

/// Metrics that exist only in some runs (classification runs export accuracy).
const RUN_DEPENDENT: &[&str] = &["metatrain_meta_test_accuracy"];

fn catalogue_matches(texts: &[&str]) {
    let doc = std::fs::read_to_string(root().join("docs/metrics.md")).expect("docs/metrics.md");
    let documented: std::collections::BTreeMap<String, String> = doc
        .lines()
        .filter_map(|l| l.strip_prefix("| `metatrain_"))
        .filter_map(|rest| {
            let (name, rest) = rest.split_once('`')?;
            let kind = rest.split('|').nth(1)?.trim().to_string();
            Some((format!("metatrain_{name}"), kind))
        })
        .collect();
    assert!(documented.len() > 30, "the catalogue's tables were not found: {}", documented.len());
    let exported = exported_types(texts);
    for (name, kind) in &exported {
        assert_eq!(documented.get(name), Some(kind), "{name} ({kind}) is exported but not documented as such");
    }
    for name in documented.keys() {
        assert!(
            exported.contains_key(name) || RUN_DEPENDENT.contains(&name.as_str()),
            "docs/metrics.md lists {name}, which neither process exports"
        );
    }
}

fn dashboard_queries_parse_and_name_exported_metrics(dir: &std::path::Path, texts: &[&str]) {
    let text = std::fs::read_to_string(root().join("deploy/grafana/dashboards/metatrain.json")).expect("dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_string))
        .collect();
    assert!(exprs.len() >= 20, "{} queries", exprs.len());
    // Grafana's variables, as Grafana would substitute them.
    let concrete: Vec<String> = exprs
        .iter()
        .map(|e| {
            e.replace("$__rate_interval", "1m")
                .replace("$worker_job", ".*")
                .replace("$job", ".*")
                .replace("$instance", ".*")
        })
        .collect();
    let rules = serde_json::json!({"groups": [{"name": "dashboard", "rules": concrete.iter().enumerate()
        .map(|(i, e)| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": e})).collect::<Vec<_>>()}]});
    let path = dir.join("dashboard-rules.yml");
    std::fs::write(&path, rules.to_string()).expect("write rules");
    if let Ok(out) = Command::new("promtool").arg("check").arg("rules").arg(&path).output() {
        let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "a dashboard query does not parse: {report}");
        println!("promtool check rules: {} dashboard queries parse", concrete.len());
    } else if std::env::var_os("CI").is_some() {
        panic!("promtool is required in CI");
    }
    let exported: Vec<&str> = texts.iter().flat_map(|t| t.lines()).collect();
    for e in &exprs {
        for (i, _) in e.match_indices("metatrain_") {
            let name: String =
                e[i..].chars().take_while(|c| c.is_ascii_lowercase() || *c == '_' || c.is_ascii_digit()).collect();
            let present =
                exported.iter().any(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")));
            assert!(
                present || RUN_DEPENDENT.contains(&name.as_str()),
                "the dashboard queries {name}, which neither process exports ({e})"
            );
        }
    }
}
