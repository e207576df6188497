//! Tensor work on dedicated threads (never on the async runtime): a pool of `capacity` threads takes
//! [`Job`]s from a channel and sends back [`Outcome`]s. Each thread builds the task's data from its spec,
//! runs the inner loop and the meta-gradient, and flattens the result for the wire.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metatrain_common::config::Config;
use metatrain_common::layout::{ModelSpec, ParamLayout};
use metatrain_common::protocol::{Assignment, Mode, TaskResult};
use metatrain_common::task::{generate, Datasets};
use metatrain_common::tensor::Dtype;
use tch::{Device, Kind};

use crate::algo::{evaluate_task, meta_gradient, InnerLoop};
use crate::tensors::{flat_from_tensors, params_from_flat, task_tensors};

/// Everything a compute thread needs besides the job itself; fixed for a session.
pub struct ComputeContext {
    pub config: Config,
    pub spec: ModelSpec,
    pub layout: ParamLayout,
    pub datasets: Datasets,
    pub device: Device,
}

pub struct Job {
    pub assignment: Assignment,
    pub params: Arc<Vec<f32>>,
}

/// A finished task: the result header and the gradient payload, or why it failed.
pub struct Outcome {
    pub assignment: Assignment,
    pub result: Result<(TaskResult, Vec<f32>), String>,
}

/// Starts `threads` compute threads, each using `intra_op_threads` libtorch threads. They stop when `jobs`
/// closes or `out` is dropped.
pub fn spawn_pool(
    ctx: Arc<ComputeContext>,
    threads: usize,
    intra_op_threads: usize,
    jobs: Receiver<Job>,
    out: tokio::sync::mpsc::UnboundedSender<Outcome>,
) -> Vec<std::thread::JoinHandle<()>> {
    let jobs = Arc::new(Mutex::new(jobs));
    (0..threads)
        .map(|i| {
            let (ctx, jobs, out) = (ctx.clone(), jobs.clone(), out.clone());
            std::thread::Builder::new()
                .name(format!("compute-{i}"))
                .spawn(move || loop {
                    // OpenMP's thread count is per calling thread: set it here, not only in main, or each
                    // compute thread runs a full-width team (3× slower for small models on 2 cores).
                    if tch::get_num_threads() != intra_op_threads as i32 {
                        tch::set_num_threads(intra_op_threads as i32);
                    }
                    let job = match jobs.lock() {
                        Ok(rx) => match rx.recv() {
                            Ok(job) => job,
                            Err(_) => return,
                        },
                        Err(_) => return,
                    };
                    let result = run_task(&ctx, &job);
                    if out.send(Outcome { assignment: job.assignment, result }).is_err() {
                        return;
                    }
                })
                .expect("spawning a compute thread")
        })
        .collect()
}

/// Computes one task.
pub fn run_task(ctx: &ComputeContext, job: &Job) -> Result<(TaskResult, Vec<f32>), String> {
    let started = Instant::now();
    let a = &job.assignment;
    let data = generate(&ctx.config, &a.spec, &ctx.datasets).map_err(|e| e.to_string())?;
    let task = task_tensors(&data, Kind::Float).to_device(ctx.device);
    let params: Vec<_> =
        params_from_flat(&ctx.layout, &job.params, Kind::Float).into_iter().map(|t| t.to_device(ctx.device)).collect();
    let algo = &ctx.config.algo;
    let (output, grad) = match a.mode {
        Mode::Train => {
            let inner = InnerLoop { steps: algo.inner_steps, lr: algo.inner_lr, clamp: algo.inner_grad_clamp };
            let out = meta_gradient(&ctx.spec, algo.name, &params, &task, &inner);
            let grad = match &out.meta_gradient {
                Some(g) => flat_from_tensors(g).map_err(|e| e.to_string())?,
                None => Vec::new(),
            };
            (out, grad)
        }
        Mode::Eval => {
            let inner = InnerLoop {
                steps: ctx.config.eval.inner_steps,
                lr: ctx.config.eval_inner_lr(),
                clamp: algo.inner_grad_clamp,
            };
            (evaluate_task(&ctx.spec, &params, &task, &inner), Vec::new())
        }
    };
    let result = TaskResult {
        id: a.id,
        version: a.version,
        mode: a.mode,
        pre_loss: output.pre_loss as f32,
        post_loss: output.post_loss as f32,
        pre_accuracy: output.pre_accuracy.map(|v| v as f32),
        post_accuracy: output.post_accuracy.map(|v| v as f32),
        compute_seconds: started.elapsed().as_secs_f32(),
        difficulty: data.difficulty as f32,
        grad_dtype: Dtype::F32,
        grad_len: grad.len() as u64,
    };
    Ok((result, grad))
}
