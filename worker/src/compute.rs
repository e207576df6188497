//! Tensor work on dedicated threads (never on the async runtime): a pool of `capacity` threads takes
//! groups of [`Job`]s (one `Assign` message's tasks) from a channel and sends back one [`Outcome`] per
//! job. Each thread builds the tasks' data from their specs, runs the inner loop and the meta-gradient,
//! and flattens the results for the wire.
//!
//! Tasks are computed as batches ([`crate::batched`]): a thread takes everything queued, up to `batch`
//! tasks, and computes the tasks that share a mode and a parameter version as one batched computation.
//! A task's result does not depend on the batch it lands in (tested), so a run stays reproducible
//! whatever the number of workers and their batch sizes.
//!
//! **Except** Reptile, ANIL and Meta-SGD meta-gradients, MAML++'s options (and ANIL, Meta-SGD and
//! per-step-rate evaluation), which the batched path does not implement, and **conv4 on CPU**, which runs one task at a time ([`crate::algo`]): its convolutions already keep
//! a core busy, and the grouped convolutions of the batched path were measured slower there (0.85× the
//! per-task loop for MAML, 0.7× for FOMAML, `bench/run.sh worker`). The choice depends only on the model
//! and the kind of device, never on timing, so results stay independent of batching.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use metatrain_common::config::Config;
use metatrain_common::config::{AlgoKind, ComputeDtype, ModelKind};
use metatrain_common::layout::{ModelSpec, ParamLayout};
use metatrain_common::lora::LoraBase;
use metatrain_common::protocol::{Assignment, Mode, TaskResult};
use metatrain_common::task::{generate, Datasets};
use metatrain_common::tensor::Dtype;
use tch::{Device, Kind, Tensor};

use crate::algo::{evaluate_task_with, meta_gradient_with, InnerLoop, Plan, TaskOutput, TaskTensors};
use crate::batched::{evaluate, meta_gradients, TaskBatch};
use crate::model::{LoraNet, Net, PerStepBn};
use crate::tensors::{flat_from_tensors, params_from_flat, task_tensors};

/// Everything a compute thread needs besides the job itself; fixed for a session.
pub struct ComputeContext {
    pub config: Config,
    pub spec: ModelSpec,
    pub layout: ParamLayout,
    pub datasets: Datasets,
    /// LoRA meta-learning's frozen base (checked against the run's hash); `None` without LoRA.
    pub lora_base: Option<LoraBase>,
    /// Devices the compute threads use, thread i on `devices[i % len]` (one or more GPUs, or the CPU).
    pub devices: Vec<Device>,
    /// Most training tasks computed as one batch.
    pub batch: usize,
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

/// The compute threads of one session. Dropping it stops them: queued jobs are dropped, a thread
/// finishes at most the task it is computing, and all are joined, so that no thread is still inside
/// libtorch when the process exits (libtorch's static destructors would pull the ground from under it).
pub struct Pool {
    jobs: Option<Sender<Vec<Job>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Pool {
    /// Queues one `Assign` message's jobs. `Err`: the threads are gone.
    pub fn send(&self, jobs: Vec<Job>) -> Result<(), ()> {
        self.jobs.as_ref().ok_or(())?.send(jobs).map_err(|_| ())
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.jobs.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Starts `threads` compute threads, each using `intra_op_threads` libtorch threads. They stop when the
/// [`Pool`] is dropped or `out` is.
pub fn spawn_pool(
    ctx: Arc<ComputeContext>,
    threads: usize,
    intra_op_threads: usize,
    out: tokio::sync::mpsc::UnboundedSender<Outcome>,
) -> Pool {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<Job>>();
    let jobs = Arc::new(Mutex::new(rx));
    let stop = Arc::new(AtomicBool::new(false));
    let threads = (0..threads)
        .map(|i| {
            let (ctx, jobs, out, stop) = (ctx.clone(), jobs.clone(), out.clone(), stop.clone());
            std::thread::Builder::new()
                .name(format!("compute-{i}"))
                .spawn(move || {
                    // OpenMP's thread count is per calling thread: set it here, not only in main, or each
                    // compute thread runs a full-width team (3× slower for small models on 2 cores).
                    if tch::get_num_threads() != intra_op_threads as i32 {
                        tch::set_num_threads(intra_op_threads as i32);
                    }
                    let device = ctx.devices[i % ctx.devices.len().max(1)];
                    // Once per thread: a LoRA base is copied to the device here, not for every batch.
                    let net = net_for(&ctx.config, &ctx.spec, ctx.lora_base.as_ref(), device);
                    loop {
                        let Some(taken) = take_jobs(&jobs, ctx.batch) else { return };
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        for outcome in run_jobs(&ctx, device, net.as_ref(), taken, &stop) {
                            if out.send(outcome).is_err() {
                                return;
                            }
                        }
                    }
                })
                .expect("spawning a compute thread")
        })
        .collect();
    Pool { jobs: Some(tx), threads, stop }
}

/// Waits for a group of jobs, then takes every further group already queued while fewer than `batch`
/// jobs are in hand. `None`: the channel closed (or a thread panicked holding it).
fn take_jobs(jobs: &Mutex<Receiver<Vec<Job>>>, batch: usize) -> Option<Vec<Job>> {
    let rx = jobs.lock().ok()?;
    let mut taken = rx.recv().ok()?;
    while taken.len() < batch {
        match rx.try_recv() {
            Ok(more) => taken.extend(more),
            Err(_) => break,
        }
    }
    Some(taken)
}

/// Computes `jobs` in batches of at most `ctx.batch` tasks that share a mode and a parameter version.
fn run_jobs(ctx: &ComputeContext, device: Device, net: &dyn Net, jobs: Vec<Job>, stop: &AtomicBool) -> Vec<Outcome> {
    let mut groups: Vec<Vec<Job>> = Vec::new();
    for job in jobs {
        let key = (job.assignment.mode, job.assignment.version);
        match groups.iter_mut().find(|g| (g[0].assignment.mode, g[0].assignment.version) == key) {
            Some(group) => group.push(job),
            None => groups.push(vec![job]),
        }
    }
    let mut outcomes = Vec::new();
    for group in groups {
        let mut group = group.into_iter().peekable();
        while group.peek().is_some() {
            let chunk: Vec<Job> = group.by_ref().take(ctx.batch.max(1)).collect();
            if stop.load(Ordering::SeqCst) {
                return outcomes;
            }
            outcomes.extend(run_batch(ctx, device, net, chunk, stop));
        }
    }
    outcomes
}

/// Computes tasks that share a mode and a parameter version as one batch: meta-gradients for training,
/// first-order adaptation for evaluation. A task whose data cannot be made fails alone; the others are
/// computed.
fn run_batch(ctx: &ComputeContext, device: Device, net: &dyn Net, jobs: Vec<Job>, stop: &AtomicBool) -> Vec<Outcome> {
    let started = Instant::now();
    let mut outcomes = Vec::new();
    let mut ready: Vec<(Job, f64, TaskTensors)> = Vec::new();
    for job in jobs {
        match generate(&ctx.config, &job.assignment.spec, &ctx.datasets) {
            Ok(data) => {
                let tensors = task_tensors(&data, Kind::Float).to_device(device);
                ready.push((job, data.difficulty, tensors));
            }
            Err(e) => outcomes.push(Outcome { assignment: job.assignment, result: Err(e.to_string()) }),
        }
    }
    let Some((first, _, _)) = ready.first() else { return outcomes };
    let params: Vec<_> =
        params_from_flat(&ctx.layout, &first.params, Kind::Float).into_iter().map(|t| t.to_device(device)).collect();
    let (jobs, rest): (Vec<(Job, f64)>, Vec<TaskTensors>) = ready.into_iter().map(|(j, d, t)| ((j, d), t)).unzip();
    let algo = &ctx.config.algo;
    let mode = jobs[0].0.assignment.mode;
    let inner = match mode {
        Mode::Train => InnerLoop { steps: algo.inner_steps, lr: algo.inner_lr, clamp: algo.inner_grad_clamp },
        Mode::Eval => InnerLoop {
            steps: ctx.config.eval_inner_steps(),
            lr: ctx.config.eval_inner_lr(),
            clamp: algo.inner_grad_clamp,
        },
    };
    let outputs = if batching_pays(&ctx.config, &ctx.spec, device, mode) {
        let batch = match TaskBatch::stack(&rest) {
            Ok(batch) => batch,
            Err(e) => {
                let reason = format!("cannot batch this run's tasks: {e}");
                outcomes.extend(
                    jobs.into_iter().map(|(j, _)| Outcome { assignment: j.assignment, result: Err(reason.clone()) }),
                );
                return outcomes;
            }
        };
        match mode {
            Mode::Train => meta_gradients(&ctx.spec, algo.name, &params, &batch, &inner, algo.compute_dtype),
            Mode::Eval => evaluate(&ctx.spec, &params, &batch, &inner, algo.compute_dtype),
        }
    } else {
        // One task at a time: a stopping pool finishes only the task in hand (the rest would not be sent).
        rest.iter()
            .zip(&jobs)
            .take_while(|_| !stop.load(Ordering::SeqCst))
            .map(|(task, (job, _))| match mode {
                Mode::Train => {
                    let plan = Plan::at(algo, job.assignment.spec.step);
                    meta_gradient_with(net, algo.name, &plan, &params, task, &inner)
                }
                Mode::Eval => evaluate_task_with(net, algo.name, algo.per_step_lrs, &params, task, &inner),
            })
            .collect()
    };
    // The batch's time, shared equally by its tasks.
    let seconds = started.elapsed().as_secs_f32() / jobs.len() as f32;
    let wire = ctx.config.cluster.grad_dtype;
    for ((job, difficulty), output) in jobs.into_iter().zip(outputs) {
        let result = flatten(&output)
            .map(|grad| (task_result(&job.assignment, &output, difficulty, seconds, &grad, wire), grad));
        outcomes.push(Outcome { assignment: job.assignment, result });
    }
    outcomes
}

/// What the algorithms adapt for this run: LoRA adapters of the frozen `lora_base`, conv4 with MAML++'s
/// per-step batch norm, or the model itself.
pub fn net_for(config: &Config, spec: &ModelSpec, lora_base: Option<&LoraBase>, device: Device) -> Box<dyn Net> {
    if let Some(base) = lora_base {
        let tensors = spec
            .layout()
            .params
            .iter()
            .zip(&base.tensors)
            .map(|(p, v)| {
                let shape: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
                Tensor::from_slice(v).reshape(shape).to_device(device)
            })
            .collect();
        return Box::new(LoraNet::new(spec.clone(), tensors, config.model.lora_scale()));
    }
    if config.algo.per_step_bn {
        return Box::new(PerStepBn::new(spec.clone(), config.algo.inner_steps));
    }
    Box::new(spec.clone())
}

/// Whether tasks of `mode` are computed as batches on `device` (see the module docs).
fn batching_pays(config: &Config, spec: &ModelSpec, device: Device, mode: Mode) -> bool {
    // The batched path implements MAML and FOMAML meta-gradients, and evaluation that moves every
    // parameter at the inner learning rate (MAML, FOMAML, Reptile).
    // None of MAML++'s options is batched, nor LoRA.
    if config.model.lora() || config.algo.per_step_bn {
        return false;
    }
    let a = &config.algo;
    let algo = a.name;
    let implemented = match mode {
        Mode::Train => {
            matches!(algo, AlgoKind::Maml | AlgoKind::Fomaml)
                && !(a.multi_step_loss || a.per_step_lrs || a.first_order_steps > 0)
        }
        Mode::Eval => matches!(algo, AlgoKind::Maml | AlgoKind::Fomaml | AlgoKind::Reptile) && !a.per_step_lrs,
    };
    // Mixed precision is implemented in the batched path only (and the config allows it only there).
    implemented
        && (config.algo.compute_dtype == ComputeDtype::Bf16
            || !(spec.kind == ModelKind::Conv4 && device == Device::Cpu))
}

fn flatten(output: &TaskOutput) -> Result<Vec<f32>, String> {
    match &output.meta_gradient {
        Some(g) => flat_from_tensors(g).map_err(|e| e.to_string()),
        None => Ok(Vec::new()),
    }
}

/// The result header; the gradient travels as `wire` (see `cluster.grad_dtype`).
fn task_result(
    a: &Assignment,
    output: &TaskOutput,
    difficulty: f64,
    seconds: f32,
    grad: &[f32],
    wire: Dtype,
) -> TaskResult {
    TaskResult {
        id: a.id,
        version: a.version,
        mode: a.mode,
        pre_loss: output.pre_loss as f32,
        post_loss: output.post_loss as f32,
        pre_accuracy: output.pre_accuracy.map(|v| v as f32),
        post_accuracy: output.post_accuracy.map(|v| v as f32),
        compute_seconds: seconds,
        difficulty: difficulty as f32,
        grad_dtype: wire,
        grad_len: grad.len() as u64,
    }
}
