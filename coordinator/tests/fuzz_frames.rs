//! A fuzz harness that runs in the test command: 100,000+ generated inputs — random bytes, and valid
//! frames mutated by bit flips, truncation, splicing and length-field edits — through the frame decoder
//! and, when they decode, through the coordinator's handling of each message kind (hello checks, result
//! validation, the scheduler). It asserts no panic, and that nothing non-finite or mis-shaped is ever
//! accepted.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use metatrain_common::net::DecodedFrame;
use metatrain_common::protocol::{
    decode_frame, encode_frame, Assignment, Hello, Limits, Message, Mode, TaskResult, Welcome, PROTOCOL_VERSION,
};
use metatrain_common::rng::keyed_rng;
use metatrain_common::task::{Split, TaskSpec};
use metatrain_common::tensor::{encode_f32, Decoder, Dtype, TensorError};
use metatrain_coordinator::aggregate::{validate, validate_decoded};
use metatrain_coordinator::scheduler::{Scheduler, Verdict};
use metatrain_coordinator::server::{handlers, Quarantine, ServerContext};
use rand::Rng;

const INPUTS: usize = 120_000;
const NUMEL: usize = 16;

fn seeds() -> Vec<Vec<u8>> {
    let spec = TaskSpec::new(1, Split::Train, 0, 0);
    let result = |grad: &[f32], mode| {
        (
            Message::Result(TaskResult {
                id: 1,
                version: 0,
                mode,
                pre_loss: 1.0,
                post_loss: 0.5,
                pre_accuracy: Some(0.2),
                post_accuracy: Some(0.9),
                compute_seconds: 0.01,
                difficulty: 0.5,
                grad_dtype: Dtype::F32,
                grad_len: grad.len() as u64,
            }),
            encode_f32(grad),
        )
    };
    let msgs = [
        (
            Message::Hello(Hello {
                protocol_version: PROTOCOL_VERSION,
                worker_name: "w".into(),
                capacity: 2,
                device: "cpu".into(),
            }),
            vec![],
        ),
        (
            Message::Welcome(Welcome {
                protocol_version: 1,
                worker_id: 1,
                config_toml: "seed = 1".into(),
                layout_fingerprint: "x".into(),
            }),
            vec![],
        ),
        result(&[0.25; NUMEL], Mode::Train),
        result(&[], Mode::Eval),
        (Message::Params { version: 0, dtype: Dtype::F32, len: 2 }, encode_f32(&[1.0, 2.0])),
        (Message::Assign { tasks: vec![Assignment { id: 1, version: 0, spec, mode: Mode::Train }] }, vec![]),
        (Message::TaskFailed { id: 1, version: 0, reason: "x".into() }, vec![]),
        (Message::Shutdown { reason: "done".into() }, vec![]),
    ];
    msgs.iter().map(|(m, p)| encode_frame(m, p).expect("encode")).collect()
}

#[test]
fn frames_and_message_handling_never_panic() {
    let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
    let (tx, mut rx) = tokio::sync::mpsc::channel(1 << 16);
    let ctx = ServerContext {
        events: tx,
        config_toml: String::new(),
        layout_fingerprint: String::new(),
        numel: NUMEL,
        grad_dtype: Dtype::F32,
        next_worker: AtomicU64::new(1),
        quarantine: Arc::new(Quarantine::default()),
        names: Arc::default(),
        receive_budget: metatrain_coordinator::server::ReceiveBudget::new(1 << 30),
    };
    let limits = Limits::with_payload((NUMEL * 4) as u64);
    let seeds = seeds();
    let mut rng = keyed_rng(&[0xF022]);
    let t0 = Instant::now();
    let mut sched = Scheduler::new(Duration::from_secs(5));
    sched.worker_joined(1, 4, t0);
    let batch: Vec<Assignment> = (0..8)
        .map(|i| Assignment {
            id: i + 1,
            version: 0,
            spec: TaskSpec::new(1, Split::Train, 0, i as u32),
            mode: Mode::Train,
        })
        .collect();
    sched.start_batch(0, batch.clone(), t0);
    let (mut decoded, mut accepted) = (0usize, 0usize);
    for i in 0..INPUTS {
        let input: Vec<u8> = match i % 5 {
            0 => (0..rng.gen_range(0..200)).map(|_| rng.gen()).collect(),
            1 => {
                let mut b = seeds[rng.gen_range(0..seeds.len())].clone();
                for _ in 0..rng.gen_range(1..6) {
                    let j = rng.gen_range(0..b.len());
                    b[j] ^= 1 << rng.gen_range(0..8);
                }
                b
            }
            2 => {
                let b = &seeds[rng.gen_range(0..seeds.len())];
                b[..rng.gen_range(0..=b.len())].to_vec()
            }
            3 => {
                // Edit the length fields (header and payload) of a valid frame.
                let mut b = seeds[rng.gen_range(0..seeds.len())].clone();
                let field = if rng.gen() { 4..8 } else { 8..16 };
                let j = rng.gen_range(field);
                b[j] = rng.gen();
                b
            }
            _ => {
                // Splice two frames, or a frame and noise.
                let a = &seeds[rng.gen_range(0..seeds.len())];
                let b = &seeds[rng.gen_range(0..seeds.len())];
                let cut = rng.gen_range(0..=a.len());
                let mut v = a[..cut].to_vec();
                v.extend_from_slice(&b[rng.gen_range(0..=b.len())..]);
                v
            }
        };
        let Ok((frame, _)) = decode_frame(&input, &limits) else { continue };
        decoded += 1;
        match frame.message.clone() {
            Message::Hello(h) => {
                let _ = handlers::hello::handle(&ctx, &h, &h.worker_name);
            }
            Message::Result(r) => {
                // The server decodes gradients in chunks as they arrive: same verdict as all at once.
                let chunked = chunked_decode(&frame.payload, r.grad_dtype, &mut rng);
                assert_eq!(
                    validate(&r, &frame.payload, NUMEL).map_err(|e| e.reason()),
                    validate_decoded(&r, chunked).map_err(|e| e.reason()),
                    "chunked decoding changed a verdict"
                );
                if let Ok(o) = validate(&r, &frame.payload, NUMEL) {
                    if let Some(g) = &o.grad {
                        assert_eq!(g.len(), NUMEL, "a mis-shaped gradient was accepted");
                        assert!(g.iter().all(|v| v.is_finite()), "a non-finite gradient was accepted");
                    }
                    assert!(o.pre_loss.is_finite() && o.post_loss.is_finite());
                    if let (Verdict::Accepted { .. }, _) = sched.result(1, r.id, r.version, r.mode, t0) {
                        accepted += 1;
                        if sched.batch_done() {
                            sched.start_batch(0, batch.clone(), t0);
                        }
                    }
                }
            }
            Message::TaskFailed { id, .. } => {
                sched.retry(1, id, t0);
            }
            _ => {}
        }
        // The async handlers too (they only validate and forward).
        let gradient = match &frame.message {
            Message::Result(r) => chunked_decode(&frame.payload, r.grad_dtype, &mut rng),
            _ => None,
        };
        let is_result = matches!(frame.message, Message::Result(_) | Message::TaskFailed { .. });
        let frame = DecodedFrame { payload_len: frame.payload.len() as u64, message: frame.message, gradient };
        if is_result {
            let _ = rt.block_on(handlers::dispatch(&ctx, 1, frame, None));
            while rx.try_recv().is_ok() {}
        } else {
            assert!(
                rt.block_on(handlers::dispatch(&ctx, 1, frame, None)).is_err(),
                "only results may arrive on result streams"
            );
        }
    }
    println!("fuzzed {INPUTS} inputs: {decoded} decoded as frames, {accepted} results accepted, 0 panics");
    assert!(decoded > 1000 && accepted > 0, "the generator must reach the handlers");
}

/// What `read_result_frame` makes of `payload`: decoded in chunks of random sizes (inside elements too).
fn chunked_decode(payload: &[u8], dtype: Dtype, rng: &mut impl Rng) -> Option<Result<Vec<f32>, TensorError>> {
    if payload.is_empty() {
        return None;
    }
    let mut decoder = match Decoder::new(dtype, NUMEL, payload.len() as u64) {
        Ok(d) => d,
        Err(e) => return Some(Err(e)),
    };
    let mut rest = payload;
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rng.gen_range(1..=rest.len().min(9)));
        decoder.push(chunk);
        rest = tail;
    }
    Some(decoder.finish())
}
