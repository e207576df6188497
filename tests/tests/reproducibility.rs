//! The parameters after a run depend only on (config, seed): not on how many workers computed the
//! tasks, nor on a worker being killed mid-run (its tasks are reassigned; reduction is in task order).

use std::process::Command;
use std::time::{Duration, Instant};

use metatrain_tests::{binary, coordinator_address, metrics_address, read_report, root, scrape, scratch, worker, Proc};

const STEPS: u32 = 40;

fn train(out: &std::path::Path, local_workers: usize) -> Command {
    let mut cmd = Command::new(binary("metatrain"));
    cmd.arg("train")
        .arg("--config")
        .arg(root().join("configs/noisy-linear.toml"))
        .args(["--steps", &STEPS.to_string(), "--seed", "11", "--set", "eval.every=0", "--set", "eval.final_tasks=0"])
        .args(["--local-workers", &local_workers.to_string()])
        .arg("--out")
        .arg(out);
    cmd
}

fn sha_of_run(out: &std::path::Path, local_workers: usize) -> String {
    let (status, _) = Proc::spawn(&mut train(out, local_workers), "metatrain").finish(Duration::from_secs(300));
    assert!(status.success());
    let r = read_report(out);
    assert_eq!(r["final_step"], STEPS);
    r["params_sha256"].as_str().expect("sha").to_string()
}

#[test]
fn same_parameters_with_one_or_three_workers_and_with_a_killed_worker() {
    let dir = scratch("repro");
    let one = sha_of_run(&dir.join("one"), 1);
    let three = sha_of_run(&dir.join("three"), 3);
    assert_eq!(one, three, "1 worker vs 3 workers");

    // Three external workers; one is killed with SIGKILL once the run is under way.
    let mut coord = Proc::spawn(train(&dir.join("killed"), 0).args(["--metrics-addr", "127.0.0.1:0"]), "coordinator");
    let metrics = coord.wait_for(Duration::from_secs(30), metrics_address);
    let (addr, fp) = coord.wait_for(Duration::from_secs(30), coordinator_address);
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| Proc::spawn(&mut worker(&addr, &fp, &dir.join("killed/tls"), &format!("w{i}")), &format!("worker{i}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let text = scrape(&metrics);
        let steps = text
            .lines()
            .find_map(|l| l.strip_prefix("metatrain_meta_steps_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0);
        if steps >= 5.0 {
            break;
        }
        assert!(Instant::now() < deadline, "run did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    workers[1].signal("KILL");
    let (status, _) = coord.finish(Duration::from_secs(300));
    assert!(status.success());
    let r = read_report(&dir.join("killed"));
    assert_eq!(r["final_step"], STEPS);
    assert_eq!(r["params_sha256"].as_str(), Some(one.as_str()), "a killed worker changes nothing");
    let covered = r["tasks_reassigned"].as_u64().unwrap_or(0) + r["tasks_duplicated"].as_u64().unwrap_or(0);
    assert!(covered > 0, "the killed worker's tasks were reassigned or duplicated: {r}");
    for w in workers.drain(..) {
        drop(w);
    }
}
