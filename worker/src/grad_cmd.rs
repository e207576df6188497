//! `metatrain-worker grad`: one task's meta-gradient from files, so anyone can check our math against
//! PyTorch (or finite differences) on the same model, weights and data.
//!
//! Inputs: `--params P.safetensors` with the model's parameters under their layout names, and `--data
//! D.safetensors` with `support_x support_y query_x query_y` (f32 or f64: the computation runs in the
//! data's dtype). Output: `G.safetensors` with the meta-gradient under the parameter names, plus
//! `query_loss` (the post-adaptation query loss) and `pre_adapt_loss`. With `--loss-only` it writes just
//! the two losses (used by the finite-difference check).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use metatrain_common::config::{AlgoKind, ModelKind};
use metatrain_common::layout::ModelSpec;
use tch::{Kind, Tensor};

use crate::algo::{adapt, leaves, meta_gradient, InnerLoop, TaskTensors};
use crate::model::{forward, loss, TargetTensor};

#[derive(Args, Debug)]
pub struct GradArgs {
    /// Model: `mlp` or `mlp-ln` (input features are read from `support_x`).
    #[arg(long, value_parser = parse_model)]
    pub model: ModelKind,
    /// `maml` (second order) or `fomaml`.
    #[arg(long, value_parser = parse_algo)]
    pub algo: AlgoKind,
    /// Inner SGD steps on the support loss.
    #[arg(long)]
    pub inner_steps: usize,
    /// Inner learning rate.
    #[arg(long)]
    pub inner_lr: f64,
    /// Clamp each inner gradient elementwise to [-C, C] (default: no clamping).
    #[arg(long)]
    pub clamp: Option<f64>,
    /// Parameters (safetensors) under the model's names.
    #[arg(long)]
    pub params: PathBuf,
    /// Task data (safetensors): support_x [n, d], support_y [n] or [n, 1], query_x, query_y.
    #[arg(long)]
    pub data: PathBuf,
    /// Where to write the meta-gradient (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Write only `query_loss` and `pre_adapt_loss`, no gradient.
    #[arg(long)]
    pub loss_only: bool,
}

fn parse_model(s: &str) -> Result<ModelKind, String> {
    match s {
        "mlp" => Ok(ModelKind::Mlp),
        "mlp-ln" => Ok(ModelKind::MlpLn),
        _ => Err(format!("unknown model {s:?}; expected mlp or mlp-ln")),
    }
}

fn parse_algo(s: &str) -> Result<AlgoKind, String> {
    match s {
        "maml" => Ok(AlgoKind::Maml),
        "fomaml" => Ok(AlgoKind::Fomaml),
        _ => Err(format!("unknown algorithm {s:?}; expected maml or fomaml")),
    }
}

/// Largest --params/--data file read (a 1B-parameter model in f64 is 8 GB).
const MAX_TENSOR_FILE: u64 = 8 << 30;

fn read(path: &PathBuf) -> Result<Vec<(String, Tensor)>> {
    metatrain_common::net::files::check_regular(path, MAX_TENSOR_FILE).map_err(anyhow::Error::msg)?;
    Tensor::read_safetensors(path).with_context(|| format!("cannot read {} as safetensors", path.display()))
}

/// The tensor `name` of `path`, which must hold f32 or f64 values, all finite.
fn take(tensors: &[(String, Tensor)], name: &str, path: &Path) -> Result<Tensor> {
    let t = tensors
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, t)| t.shallow_clone())
        .with_context(|| format!("{} has no tensor named {name:?}", path.display()))?;
    if !matches!(t.kind(), Kind::Float | Kind::Double) {
        bail!("{}: {name} must be f32 or f64, got {:?}", path.display(), t.kind());
    }
    if !all_finite(&t) {
        bail!("{}: {name} contains NaN or infinite values", path.display());
    }
    Ok(t)
}

fn all_finite(t: &Tensor) -> bool {
    t.numel() == 0 || t.isfinite().all().int64_value(&[]) == 1
}

/// Most inner steps accepted (the same bound as the config's `algo.inner_steps`).
const MAX_INNER_STEPS: usize = 1000;

pub fn run(args: GradArgs) -> Result<()> {
    if let Some(c) = args.clamp {
        if c.is_nan() || c <= 0.0 {
            bail!("--clamp must be > 0, got {c}");
        }
    }
    if !args.inner_lr.is_finite() {
        bail!("--inner-lr must be finite");
    }
    if args.inner_steps > MAX_INNER_STEPS {
        bail!("--inner-steps must be at most {MAX_INNER_STEPS}, got {}", args.inner_steps);
    }
    let same = |a: &PathBuf| {
        a == &args.out
            || matches!((std::fs::canonicalize(a), std::fs::canonicalize(&args.out)), (Ok(x), Ok(y)) if x == y)
    };
    if same(&args.data) || same(&args.params) {
        bail!("--out {} would overwrite an input; write the gradient elsewhere", args.out.display());
    }
    let data = read(&args.data)?;
    let support_x = take(&data, "support_x", &args.data)?;
    let kind = support_x.kind();
    let sx = support_x.size();
    if sx.len() != 2 || sx[0] == 0 {
        bail!("support_x must be [n, features] with n > 0, got {sx:?}");
    }
    let spec = ModelSpec { kind: args.model, in_features: sx[1] as usize, outputs: 1 };
    let layout = spec.layout();
    let target = |name: &str, n: i64| -> Result<TargetTensor> {
        let t = take(&data, name, &args.data)?.to_kind(kind);
        if t.numel() as i64 != n {
            bail!("{name} has {} values, its inputs have {n} rows", t.numel());
        }
        Ok(TargetTensor::Real(t.reshape([n, 1])))
    };
    let query_x = take(&data, "query_x", &args.data)?.to_kind(kind);
    let qx = query_x.size();
    if qx.len() != 2 || qx[1] != sx[1] || qx[0] == 0 {
        bail!("query_x must be [m, {}] with m > 0, got {qx:?}", sx[1]);
    }
    let task =
        TaskTensors { support_y: target("support_y", sx[0])?, query_y: target("query_y", qx[0])?, support_x, query_x };
    let params_file = read(&args.params)?;
    let mut params = Vec::new();
    for p in &layout.params {
        let t = take(&params_file, &p.name, &args.params)?;
        let want: Vec<i64> = p.shape.iter().map(|&d| d as i64).collect();
        if t.size() != want {
            bail!(
                "{}: {} has shape {:?}, the {} model needs {want:?}",
                args.params.display(),
                p.name,
                t.size(),
                args.model.name()
            );
        }
        params.push(t.to_kind(kind));
    }
    let inner = InnerLoop { steps: args.inner_steps, lr: args.inner_lr, clamp: args.clamp.unwrap_or(f64::INFINITY) };
    let scalar = |v: f64| Tensor::from_slice(&[v]).to_kind(kind);
    let mut out: Vec<(String, Tensor)> = Vec::new();
    if args.loss_only {
        let adapted = adapt(&spec, &leaves(&params), &task, &inner, false);
        let q = loss(&forward(&spec, &adapted, &task.query_x), &task.query_y).double_value(&[]);
        let pre = tch::no_grad(|| loss(&forward(&spec, &params, &task.query_x), &task.query_y).double_value(&[]));
        out.push(("query_loss".into(), scalar(q)));
        out.push(("pre_adapt_loss".into(), scalar(pre)));
    } else {
        let r = meta_gradient(&spec, args.algo, &params, &task, &inner);
        for (p, g) in layout.params.iter().zip(r.meta_gradient.unwrap_or_default()) {
            out.push((p.name.clone(), g));
        }
        out.push(("query_loss".into(), scalar(r.post_loss)));
        out.push(("pre_adapt_loss".into(), scalar(r.pre_loss)));
    }
    if let Some((name, _)) = out.iter().find(|(_, t)| !all_finite(t)) {
        bail!("the result is not finite ({name} has NaN or infinite values): the inner loop diverged; lower --inner-lr or set --clamp");
    }
    let refs: Vec<(&str, &Tensor)> = out.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&refs, &args.out).with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("wrote {} ({} tensors, {:?})", args.out.display(), out.len(), kind);
    Ok(())
}
