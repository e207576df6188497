//! The parameters after a run depend only on (config, seed): not on how many workers computed the
//! tasks, nor on a worker being killed mid-run (its tasks are reassigned; reduction is in task order).

use std::process::Command;
use std::time::Duration;

use metatrain_tests::*;

const STEPS: u32 = 40;

fn train(out: &std::path::Path, local_workers: usize) -> Command {
    noisy_linear_run(out, STEPS, 11, local_workers)
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

    // With no memory for waiting gradients (every one that arrives ahead of its turn goes to disk) and
    // 1 MB for receiving (one connection's results at a time), the parameters are the same bits.
    let tight = dir.join("tight");
    let mut run = train(&tight, 3);
    run.args(["--set", "cluster.reorder_memory_mb=0", "--set", "cluster.receive_memory_mb=1"]);
    let (status, _) = Proc::spawn(&mut run, "metatrain").finish(Duration::from_secs(300));
    assert!(status.success());
    let r = read_report(&tight);
    assert_eq!(r["params_sha256"].as_str(), Some(one.as_str()), "spilling changes nothing");
    assert!(r["gradients_spilled"].as_u64().is_some_and(|n| n > 0), "three workers: some results wait: {r}");

    // Three external workers; one is killed with SIGKILL once the run is under way.
    let mut coord = Proc::spawn(&mut train(&dir.join("killed"), 0), "coordinator");
    let metrics = coord.wait_for(Duration::from_secs(30), metrics_address);
    let (addr, fp) = coord.wait_for(Duration::from_secs(30), coordinator_address);
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| Proc::spawn(&mut worker(&addr, &fp, &dir.join("killed/tls"), &format!("w{i}")), &format!("worker{i}")))
        .collect();
    wait_for_steps(&metrics, 5.0, Duration::from_secs(120));
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
