//! `metatrain-worker bench`: meta-gradient tasks per second on this machine, per-task loop against the
//! batched path, both measured in the same run on the same tasks.
//!
//! Tasks are the config's own (real sinusoid / noisy-linear / Omniglot episodes, materialised from their
//! specs as a worker does), converted to tensors before timing: the figures are the compute alone, which
//! is what `bench/pytorch_reference.py` times too. The cost of materialising a task from its spec is
//! measured separately and printed, so it can be compared with the compute.
//!
//! For each algorithm it also measures what `cluster.grad_dtype = "bf16"` / `"f16"` costs: the relative
//! L2 error of the batch's mean meta-gradient after rounding each task's gradient to the half type.
//!
//! Each measurement warms up, then repeats whole rounds (one pass over `--batch` tasks) until
//! `--seconds` have passed, and reports tasks/s over all rounds. The machine is shared and noisy: use
//! ratios from one run, not absolute numbers across runs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use metatrain_common::config::{AlgoKind, Config};
use metatrain_common::layout::ModelSpec;
use metatrain_common::task::{generate, Split, TaskSpec};
use tch::Kind;

use crate::algo::{meta_gradient, InnerLoop, TaskTensors};
use crate::batched::{meta_gradients, TaskBatch};
use crate::data::load_datasets;
use crate::tensors::{flat_from_tensors, params_from_flat, task_tensors};
use crate::MAX_THREADS;
use metatrain_common::tensor::{decode_f32, encode, max_relative_rounding, Dtype};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Run configuration (TOML) whose model, task distribution and inner loop are measured.
    #[arg(long)]
    pub config: PathBuf,
    /// `maml`, `fomaml` or `both`.
    #[arg(long, default_value = "both")]
    pub algo: String,
    /// Tasks per round, and the size of the batch the batched path computes at once.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    /// Seconds each measurement runs (after a warm-up round).
    #[arg(long, default_value_t = 3.0)]
    pub seconds: f64,
    /// libtorch intra-op threads (the worker's default is 1).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu", value_parser = crate::parse_device)]
    pub device: tch::Device,
    /// Directory holding `omniglot/` (as for `run`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Print one JSON object per measurement instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Most tasks per round: a round's tasks are all held in memory, as is the batched graph.
const MAX_BATCH: usize = 4096;
/// Longest measurement accepted (seconds).
const MAX_SECONDS: f64 = 600.0;

struct Measured {
    tasks_per_s: f64,
    rounds: usize,
}

/// Repeats `round` (which computes `tasks` tasks) for about `seconds`, after one warm-up round. On CUDA
/// each round ends with a synchronisation, so queued kernels count.
fn measure(tasks: usize, seconds: f64, device: tch::Device, mut round: impl FnMut()) -> Measured {
    let sync = || {
        if let tch::Device::Cuda(n) = device {
            tch::Cuda::synchronize(n as i64);
        }
    };
    round();
    sync();
    let started = Instant::now();
    let mut rounds = 0;
    while rounds == 0 || started.elapsed() < Duration::from_secs_f64(seconds) {
        round();
        sync();
        rounds += 1;
    }
    Measured { tasks_per_s: (rounds * tasks) as f64 / started.elapsed().as_secs_f64(), rounds }
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.batch == 0 || args.batch > MAX_BATCH {
        bail!("--batch must be 1..={MAX_BATCH}, got {}", args.batch);
    }
    if !(args.seconds > 0.0 && args.seconds <= MAX_SECONDS) {
        bail!("--seconds must be in (0, {MAX_SECONDS}], got {}", args.seconds);
    }
    if !(1..=MAX_THREADS).contains(&args.threads) {
        bail!("--threads must be in 1..={MAX_THREADS}, got {}", args.threads);
    }
    let algos = match args.algo.as_str() {
        "maml" => vec![AlgoKind::Maml],
        "fomaml" => vec![AlgoKind::Fomaml],
        "both" => vec![AlgoKind::Maml, AlgoKind::Fomaml],
        other => bail!("--algo must be maml, fomaml or both, got {other:?}"),
    };
    crate::check_devices(&[args.device])?;
    tch::set_num_threads(args.threads as i32);
    let text = metatrain_common::net::files::read_text(&args.config, 1 << 20)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot read {}", args.config.display()))?;
    let config = Config::from_toml(&text).with_context(|| format!("invalid config {}", args.config.display()))?;
    let spec = ModelSpec::from_config(&config);
    let datasets = load_datasets(&config, args.data_dir.as_deref())?;
    let device = args.device;
    let precision = config.algo.compute_dtype;
    let params: Vec<_> = params_from_flat(&spec.layout(), &spec.init_params(config.seed), Kind::Float)
        .into_iter()
        .map(|t| t.to_device(device))
        .collect();
    let inner =
        InnerLoop { steps: config.algo.inner_steps, lr: config.algo.inner_lr, clamp: config.algo.inner_grad_clamp };

    let started = Instant::now();
    let data: Vec<_> = (0..args.batch as u32)
        .map(|index| generate(&config, &TaskSpec::new(config.seed, Split::Train, 0, index), &datasets))
        .collect::<Result<_, _>>()
        .context("cannot make the benchmark's tasks")?;
    let generate_per_s = args.batch as f64 / started.elapsed().as_secs_f64();
    let tasks: Vec<TaskTensors> = data.iter().map(|d| task_tensors(d, Kind::Float).to_device(device)).collect();
    let batch = TaskBatch::stack(&tasks)?;

    let model = config.model.name.name();
    let distribution = config.task.describe();
    if !args.json {
        println!(
            "model {model} on {distribution}: {} parameters, inner steps {}, {precision:?} on {device:?}, {} intra-op thread(s), {} tasks per round",
            spec.layout().numel(),
            inner.steps,
            args.threads,
            args.batch
        );
        println!("materialising a task from its spec: {generate_per_s:.0} tasks/s (not included below)");
        println!("{:<8} {:>16} {:>16} {:>8}", "algo", "loop tasks/s", "batched tasks/s", "ratio");
    }
    for algo in algos {
        let looped = measure(args.batch, args.seconds, device, || {
            for t in &tasks {
                let out = meta_gradient(&spec, algo, &params, t, &inner);
                std::hint::black_box(out.meta_gradient);
            }
        });
        let batched = measure(args.batch, args.seconds, device, || {
            let out = meta_gradients(&spec, algo, &params, &batch, &inner, precision);
            std::hint::black_box(out);
        });
        let ratio = batched.tasks_per_s / looped.tasks_per_s;
        let algo_name = algo.name();
        let grads: Vec<Vec<f32>> = meta_gradients(&spec, algo, &params, &batch, &inner, precision)
            .iter()
            .map(|o| o.meta_gradient.as_deref().map(flat_from_tensors).transpose())
            .collect::<Result<Option<Vec<_>>, _>>()?
            .unwrap_or_default();
        let (bf16, f16) = (wire_error(&grads, Dtype::Bf16), wire_error(&grads, Dtype::F16));
        if args.json {
            println!(
                "{{\"model\":\"{model}\",\"distribution\":\"{distribution}\",\"algo\":\"{algo_name}\",\"device\":\"{device:?}\",\
\"threads\":{},\"tasks\":{},\"loop_tasks_per_s\":{:.3},\"batched_tasks_per_s\":{:.3},\"batched_over_loop\":{ratio:.3},\
\"loop_rounds\":{},\"batched_rounds\":{},\"generate_tasks_per_s\":{generate_per_s:.3},\
\"bf16_mean_grad_rel_l2\":{:.3e},\"bf16_max_rel\":{:.3e},\"f16_mean_grad_rel_l2\":{:.3e},\"f16_max_rel\":{:.3e}}}",
                args.threads, args.batch, looped.tasks_per_s, batched.tasks_per_s, looped.rounds, batched.rounds,
                bf16.mean_rel_l2, bf16.max_rel, f16.mean_rel_l2, f16.max_rel
            );
        } else {
            println!(
                "{algo_name:<8} {:>16.1} {:>16.1} {:>7.2}×   wire rounding of the mean gradient (rel. L2): bf16 {:.1e}, f16 {:.1e}",
                looped.tasks_per_s, batched.tasks_per_s, ratio, bf16.mean_rel_l2, f16.mean_rel_l2
            );
        }
    }
    Ok(())
}

struct WireError {
    /// ‖mean of the decoded gradients − mean of the f32 gradients‖ / ‖mean of the f32 gradients‖.
    mean_rel_l2: f64,
    /// Largest per-element relative rounding over all gradients.
    max_rel: f64,
}

/// What sending these meta-gradients as `dtype` costs in accuracy, measured on the real gradients.
fn wire_error(grads: &[Vec<f32>], dtype: Dtype) -> WireError {
    let n = grads.first().map_or(0, Vec::len);
    let (mut exact, mut rounded) = (vec![0f64; n], vec![0f64; n]);
    let mut max_rel: f64 = 0.0;
    for g in grads {
        let back = decode_f32(&encode(g, dtype), dtype, n).unwrap_or_else(|_| vec![f32::NAN; n]);
        for i in 0..n {
            exact[i] += g[i] as f64;
            rounded[i] += back[i] as f64;
        }
        max_rel = max_rel.max(max_relative_rounding(g, dtype));
    }
    let diff: f64 = exact.iter().zip(&rounded).map(|(a, b)| (a - b).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = exact.iter().map(|a| a * a).sum::<f64>().sqrt();
    WireError { mean_rel_l2: diff / norm.max(f64::MIN_POSITIVE), max_rel }
}
