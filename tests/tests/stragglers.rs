//! A stopped worker (SIGSTOP) must not hang the run: its tasks are duplicated onto idle workers and,
//! once its connection times out, reassigned; the parameters equal those of an undisturbed run.

use std::process::Command;
use std::time::{Duration, Instant};

use metatrain_tests::*;

fn coordinator(out: &std::path::Path, local: usize) -> Command {
    noisy_linear_run(out, 40, 8, local)
}

#[test]
fn a_sigstopped_worker_does_not_hang_the_run() {
    let dir = scratch("sigstop");
    let (status, _) = Proc::spawn(&mut coordinator(&dir.join("clean"), 1), "clean").finish(Duration::from_secs(300));
    assert!(status.success());
    let clean = read_report(&dir.join("clean"));

    let mut coord = Proc::spawn(&mut coordinator(&dir.join("stopped"), 0), "coordinator");
    let metrics = coord.wait_for(Duration::from_secs(30), metrics_address);
    let (addr, fp) = coord.wait_for(Duration::from_secs(30), coordinator_address);
    let workers: Vec<Proc> = (0..3)
        .map(|i| {
            Proc::spawn(&mut worker(&addr, &fp, &dir.join("stopped/tls"), &format!("w{i}")), &format!("worker{i}"))
        })
        .collect();
    wait_for_steps(&metrics, 1.0, Duration::from_secs(60));
    workers[0].signal("STOP");
    let started = Instant::now();
    let (status, _) = coord.finish(Duration::from_secs(120));
    let took = started.elapsed();
    workers[0].signal("CONT");
    assert!(status.success());
    let r = read_report(&dir.join("stopped"));
    println!(
        "finished {:.1}s after SIGSTOP; reassigned {}, rejected {}",
        took.as_secs_f64(),
        r["tasks_reassigned"],
        r["results_rejected"]
    );
    assert_eq!(r["final_step"].as_u64(), Some(40));
    assert_eq!(r["params_sha256"], clean["params_sha256"]);
}
