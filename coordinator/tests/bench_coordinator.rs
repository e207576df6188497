//! `metatrain bench coordinator` in miniature: the real coordinator against 3 simulated workers, 10k
//! parameters, 3 measured meta-steps. Checks that every task's result was aggregated, that the
//! coordinator sent the parameters exactly once per worker per step, and that the bytes counted at its
//! socket are the ideal plus what frame headers and QUIC's packet overhead explain. No timing is asserted.

use metatrain_common::protocol::{encode_head, Message, Mode, TaskResult, PREFIX_LEN};
use metatrain_common::tensor::Dtype;
use metatrain_coordinator::bench::{case, plan, TempTls};

const NUMEL: usize = 10_000;
const WORKERS: usize = 3;
const TASKS_PER_WORKER: usize = 2;
const STEPS: u64 = 3;

/// QUIC's cost per byte of stream data: a 1200–1452-byte packet carries a short header (≤ 1 + 20 + 4
/// bytes), a 16-byte AEAD tag and a STREAM frame header (≤ 1 + 8 + 8 + 8): under 5 %.
const PACKET_OVERHEAD: f64 = 0.05;
/// Acknowledgements go the other way: about one ACK-only packet (≤ 60 bytes) per two data packets (≥ 1200
/// bytes each) received, under 5 % of the data acknowledged.
const ACK_OVERHEAD: f64 = 0.05;
/// Fixed extras per connection over the measured steps (stream-credit updates, pings, path probes).
const SLACK_PER_WORKER: u64 = 4096;

#[test]
fn a_tiny_benchmark_aggregates_every_result_and_accounts_for_its_bytes() {
    metatrain_common::net::install_crypto_provider();
    let temp = TempTls::new().expect("a TLS directory");
    let c = plan::Case {
        size: plan::Size(NUMEL),
        workers: WORKERS,
        tasks_per_worker: TASKS_PER_WORKER,
        warmup: 1,
        steps: STEPS,
        min_seconds: 0.0,
    };
    // Budgets far below the defaults, so that the path a 100M-parameter model takes is the one tested:
    // each result stream waits for room before it is read (one connection at a time, 1 MB), and every
    // result that arrives ahead of its turn waits on disk.
    let opts = case::Options {
        coordinator_threads: 2,
        worker_threads: 2,
        recv_buffer: None,
        reorder_memory_mb: Some(0),
        receive_memory_mb: Some(1),
    };
    let o = case::run(c, &temp.tls, &opts).expect("the benchmark case runs");
    let f = o.frames;
    let meta_batch = (WORKERS * TASKS_PER_WORKER) as u64;
    let vector = (NUMEL * 4) as u64;

    // Every task of every measured step was accepted and reduced, and the update stayed finite.
    assert_eq!(o.steps, STEPS);
    assert_eq!(o.tasks_accepted, STEPS * meta_batch);
    assert!(o.params_finite);
    // Three workers answer in parallel: some results arrive ahead of their turn, and wait on disk.
    println!("{} gradients spilled", o.gradients_spilled);
    assert!(o.gradients_spilled > 0, "nothing was spilled: {o:?}");
    // Results beyond those are only copies of stragglers (refused as duplicates), never anything else.
    assert!(f.results >= o.tasks_accepted);
    assert!(
        f.results - o.tasks_accepted <= o.tasks_duplicated,
        "{} results sent, {} accepted",
        f.results,
        o.tasks_accepted
    );
    assert!(o.results_rejected <= o.tasks_duplicated, "refused results that were not duplicates: {o:?}");
    assert_eq!(f.result_payload_bytes, f.results * vector);

    // The parameters went once to each worker per step, and nothing but them and the assignments.
    assert_eq!(f.params_frames, WORKERS as u64 * STEPS);
    assert_eq!(f.params_payload_bytes, c.ideal_sent_per_step() * STEPS);
    let params_head = encode_head(&Message::Params { version: 1, dtype: Dtype::F32, len: NUMEL as u64 }, vector)
        .expect("a Params header")
        .len() as u64;
    assert_eq!(f.frame_bytes_in, f.params_frames * (params_head + vector) + f.assign_frame_bytes);
    assert_eq!(f.assignments, f.results, "every assignment was answered once");
    assert!(f.assign_frame_bytes <= f.assign_frames * PREFIX_LEN as u64 + f.assignments * 64, "{f:?}");

    // Each result frame is its gradient plus one header (task ids and versions here fit one varint byte).
    let sample = TaskResult {
        id: 1,
        version: 1,
        mode: Mode::Train,
        pre_loss: 1.0,
        post_loss: 0.5,
        pre_accuracy: None,
        post_accuracy: None,
        compute_seconds: 0.0,
        difficulty: 0.5,
        grad_dtype: Dtype::F32,
        grad_len: NUMEL as u64,
    };
    let result_head = encode_head(&Message::Result(sample), vector).expect("a Result header").len() as u64;
    assert_eq!(f.frame_bytes_out, f.results * (result_head + vector));

    // At the socket: at least the frames, at most the frames plus QUIC's overhead both ways.
    let slack = WORKERS as u64 * SLACK_PER_WORKER;
    let bound =
        |data: u64, acked: u64| (data as f64 * (1.0 + PACKET_OVERHEAD) + acked as f64 * ACK_OVERHEAD) as u64 + slack;
    assert!(o.wire.sent >= f.frame_bytes_in, "{o:?}");
    assert!(o.wire.sent <= bound(f.frame_bytes_in, f.frame_bytes_out), "{o:?}");
    assert!(o.wire.received >= f.frame_bytes_out, "{o:?}");
    assert!(o.wire.received <= bound(f.frame_bytes_out, f.frame_bytes_in), "{o:?}");
    // ... so per step, against the ideal (parameters once per worker, one gradient per task):
    let sent_ratio = o.sent_per_step() / c.ideal_sent_per_step() as f64;
    assert!((1.0..1.12).contains(&sent_ratio), "sent {sent_ratio} × the ideal");
    if o.tasks_duplicated == 0 {
        let received_ratio = o.received_per_step() / c.ideal_received_per_step() as f64;
        assert!((1.0..1.12).contains(&received_ratio), "received {received_ratio} × the ideal");
    }
}
