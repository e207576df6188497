//! `metatrain adapt` (run by `metatrain-worker adapt`): personalise an exported meta-initialisation from
//! a handful of labelled examples. It loads a run's `params.safetensors` (which carries the run's config,
//! so it knows the model, the algorithm and the task shape), adapts on the user's support examples by
//! the algorithm's own inner loop (all parameters at the inner learning rate; ANIL the head only;
//! Meta-SGD at its learned rates), predicts the query inputs and writes them as CSV, scored when the
//! query examples carry labels. The pre-adaptation score is printed beside the adapted one, so the
//! user sees what adaptation bought.
//!
//! - Regression (`mlp`, `mlp-ln`): CSV files with a header row; the column named `y` is the target,
//!   every other column an input (as many as the model takes). Query rows may leave `y` empty (or
//!   the file may have no `y` column): those rows are predicted but not scored.
//! - Classification (`conv4`): the support set is a folder `<class>/<image>.png` with at most N classes
//!   (N: the run's `task.n_way`; with fewer, the head's first outputs are used). The query set is a
//!   folder of PNGs, either sorted into `<class>/` folders named as in the support set (scored) or
//!   directly in it (not scored). The query images are predicted together, as one batch: conv4's
//!   batch norm uses the statistics of the batch it is given, as in meta-training's evaluation.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use metatrain_common::config::{Config, ModelKind};
use metatrain_common::layout::{meta_layout, ModelSpec};
use tch::{Kind, Tensor};

use crate::algo::{adapt_each, rule, split, InnerLoop, TaskTensors};
use crate::model::{accuracy, loss, TargetTensor};

#[derive(Args, Debug)]
pub struct AdaptArgs {
    /// The meta-initialisation: a run's `params.safetensors` (it carries the run's config).
    #[arg(long)]
    pub params: PathBuf,
    /// The run's config (TOML), for a params file that does not carry one.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Labelled examples to adapt on: a CSV (regression: a header row, target column `y`) or a folder
    /// `<class>/<image>.png` (classification).
    #[arg(long)]
    pub support: PathBuf,
    /// Inputs to predict: a CSV with the same columns (`y` optional or empty: not scored) or a folder of
    /// PNGs, in `<class>/` folders named as in the support set (scored) or directly in it.
    #[arg(long)]
    pub query: PathBuf,
    /// Where to write the predictions (CSV).
    #[arg(long, default_value = "predictions.csv")]
    pub out: PathBuf,
    /// Adaptation steps. Default: the run's evaluation steps (`eval.inner_steps`; Meta-SGD:
    /// `algo.inner_steps`).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Inner learning rate. Default: the run's `eval.inner_lr`, else `algo.inner_lr` (Meta-SGD uses its
    /// learned rates and refuses this option).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Images: whether dark pixels are the foreground (drawings on white paper, like Omniglot's PNGs).
    /// The model sees foreground as 1.0, as it did in training.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub invert: bool,
    /// LoRA initialisations: the base model file, if not at the path the run used (it must be the same
    /// file: its SHA-256 is checked against the run's).
    #[arg(long)]
    pub lora_base: Option<PathBuf>,
}

/// Largest params file read (a 1B-parameter model in f32 is 4 GB).
const MAX_PARAMS_FILE: u64 = 8 << 30;
/// Largest CSV read, and most rows in it.
const MAX_CSV_BYTES: u64 = 256 << 20;
const MAX_CSV_ROWS: usize = 1_000_000;
/// Most columns a CSV may have.
const MAX_CSV_COLUMNS: usize = 10_000;
/// Largest magnitude accepted in a CSV: squares and sums of it stay finite in f32 (whose range ends
/// near 3.4e38).
const MAX_CSV_VALUE: f64 = 1e15;
/// Longest piece of the user's input repeated in an error message.
const SHOWN_CHARS: usize = 60;

/// `s` for an error message: at most [`SHOWN_CHARS`] characters, quoted.
fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(SHOWN_CHARS).collect();
    if s.chars().nth(SHOWN_CHARS).is_some() {
        out.push('…');
    }
    format!("{out:?}")
}

/// Most query images predicted in one call (they are one batch).
const MAX_QUERY_IMAGES: usize = 10_000;
/// Most adaptation steps (the config's bound on inner steps).
const MAX_STEPS: usize = 1000;

pub fn run(args: AdaptArgs) -> Result<()> {
    let (config, named) = load_params(&args.params, args.config.as_deref())?;
    let spec = ModelSpec::from_config(&config);
    let algo = config.algo.name;
    let steps = args.steps.unwrap_or_else(|| config.eval_inner_steps());
    if steps > MAX_STEPS {
        bail!("--steps must be at most {MAX_STEPS}, got {steps}");
    }
    let per_step = config.algo.per_step_lrs || config.algo.per_step_bn;
    if per_step && steps > config.algo.inner_steps {
        bail!(
            "--steps must be at most {}: this initialisation's per-step rates or batch norm were learned for {} steps",
            config.algo.inner_steps,
            config.algo.inner_steps
        );
    }
    refuse_overwrite(&args)?;
    if args.lr.is_some() && (algo.learns_inner_lr() || config.algo.per_step_lrs) {
        bail!("--lr does not apply: this initialisation adapts at its learned inner rates");
    }
    let lr = args.lr.unwrap_or_else(|| config.eval_inner_lr());
    if !(lr.is_finite() && lr >= 0.0) {
        bail!("--lr must be finite and ≥ 0, got {lr}");
    }
    let inner = InnerLoop { steps, lr, clamp: config.algo.inner_grad_clamp };
    let mut params = named;
    let examples = match spec.kind {
        ModelKind::Mlp | ModelKind::MlpLn => Examples::regression(&args.support, &args.query, spec.in_features)?,
        ModelKind::Conv4 => {
            let ex = Examples::images(&args.support, &args.query, args.invert, spec.outputs)?;
            if config.model.lora() && ex.classes.len() != spec.outputs {
                bail!(
                    "this LoRA initialisation adapts a {}-way base: give the support set exactly {} classes",
                    spec.outputs,
                    spec.outputs
                );
            }
            narrow_head(&spec, &mut params, ex.classes.len(), algo.learns_inner_lr());
            ex
        }
    };
    let spec = ModelSpec { outputs: examples.outputs(spec.outputs), ..spec };
    // LoRA: the parameters are adapters of the frozen base the run was pinned to.
    let base = match (&config.model.lora_base, &config.model.lora_base_sha256) {
        (Some(path), sha) if config.model.lora() => {
            let path = args.lora_base.clone().unwrap_or_else(|| PathBuf::from(path));
            Some(metatrain_common::lora::load_base(&path, &spec, sha.as_deref()).context(
                "adapting a LoRA initialisation needs its base model file (at the path the run used, or --lora-base)",
            )?)
        }
        _ => None,
    };
    let net = crate::compute::net_for(&config, &spec, base.as_ref(), tch::Device::Cpu);
    let net = net.as_ref();
    let theta: Vec<Tensor> = params.iter().map(|t| t.set_requires_grad(true)).collect();
    let (model, extra) = split(net, &theta);
    let rule = rule(algo, config.algo.per_step_lrs, extra);
    let adapted = adapt_each(net, model, &examples.task, &inner, false, rule, algo.head_only(), &mut |_, _| {});
    let (before, after) =
        tch::no_grad(|| (net.forward(model, &examples.task.query_x), net.forward(&adapted, &examples.task.query_x)));
    let support_loss = |p: &[Tensor], step: usize| {
        tch::no_grad(|| {
            loss(&net.forward_at(p, &examples.task.support_x, step), &examples.task.support_y).double_value(&[])
        })
    };
    let (s0, s1) = (support_loss(model, 0), support_loss(&adapted, steps));
    if !s1.is_finite() || after.isfinite().all().int64_value(&[]) != 1 {
        bail!("adaptation diverged (support loss {s0:.4} → {s1}); lower --lr or --steps");
    }
    let learned = algo.learns_inner_lr() || config.algo.per_step_lrs;
    let how = if learned { "learned rates".to_string() } else { format!("lr {lr}") };
    println!(
        "adapted {} ({}) on {} support examples: {steps} steps at {how}{}; support loss {s0:.4} → {s1:.4}",
        args.params.display(),
        algo.name(),
        examples.task.support_x.size()[0],
        if algo.head_only() { ", head only" } else { "" },
    );
    let csv = examples.predictions_csv(&before, &after, &mut std::io::stdout())?;
    std::fs::write(&args.out, csv).with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}

/// Refuses an `--out` that is one of the inputs (it would be destroyed before anyone notices).
fn refuse_overwrite(args: &AdaptArgs) -> Result<()> {
    let out = std::fs::canonicalize(&args.out).ok();
    let inputs =
        [Some(&args.params), Some(&args.support), Some(&args.query), args.config.as_ref(), args.lora_base.as_ref()];
    for input in inputs.into_iter().flatten() {
        if out.is_some() && std::fs::canonicalize(input).ok() == out {
            bail!("--out {} is one of the inputs; write the predictions elsewhere", args.out.display());
        }
    }
    Ok(())
}

/// The run's config and its meta-parameters (f32, in layout order), from a `params.safetensors`.
fn load_params(path: &Path, config_path: Option<&Path>) -> Result<(Config, Vec<Tensor>)> {
    metatrain_common::net::files::check_regular(path, MAX_PARAMS_FILE).map_err(anyhow::Error::msg)?;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let embedded = meta.metadata().as_ref().and_then(|m| m.get(CONFIG_METADATA_KEY).cloned());
    let text = match (config_path, embedded) {
        (Some(c), _) => metatrain_common::net::files::read_text(c, 1 << 20)
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("cannot read {}", c.display()))?,
        (None, Some(t)) => t,
        (None, None) => bail!(
            "{} carries no run config (written before metatrain embedded it?); pass the run's config with --config",
            path.display()
        ),
    };
    let config = Config::from_toml(&text).context("the run's config is invalid")?;
    let layout = meta_layout(&ModelSpec::from_config(&config), &config.model, &config.algo);
    let what = format!("a {} {} initialisation", config.model.name.name(), config.algo.name.name());
    let values = metatrain_common::lora::parse_tensors(&bytes, &layout)
        .with_context(|| format!("{} is not {what}", path.display()))?;
    let out = layout
        .params
        .iter()
        .zip(values)
        .map(|(p, v)| Tensor::from_slice(&v).reshape(p.shape.iter().map(|&d| d as i64).collect::<Vec<_>>()))
        .collect();
    Ok((config, out))
}

/// Metadata key under which `metatrain train` stores the run's config in `params.safetensors` (the
/// coordinator's `report::CONFIG_METADATA_KEY`; the worker does not link the coordinator).
const CONFIG_METADATA_KEY: &str = "metatrain.config";

/// Keeps the head's first `n` outputs (and, with Meta-SGD's per-entry rates, their rates): a support
/// set of fewer classes than the model was meta-trained for.
fn narrow_head(spec: &ModelSpec, params: &mut [Tensor], n: usize, per_entry_rates: bool) {
    let model_len = spec.layout().params.len();
    let heads = [model_len - 2, model_len - 1];
    let rate_heads = heads.map(|i| i + model_len).into_iter().filter(|_| per_entry_rates);
    for i in heads.into_iter().chain(rate_heads) {
        if let Some(t) = params.get(i) {
            params[i] = t.narrow(0, 0, n as i64).contiguous();
        }
    }
}

/// The user's examples as one task, and what the output needs to name and score each query.
struct Examples {
    task: TaskTensors,
    /// Regression: the query inputs as read, and `y` where given.
    rows: Vec<(Vec<f64>, Option<f64>)>,
    input_names: Vec<String>,
    /// Classification: class names (head output order), and each query image's file and label.
    classes: Vec<String>,
    images: Vec<(String, Option<usize>)>,
}

impl Examples {
    /// Outputs the model predicts: the support set's classes, or 1 for regression.
    fn outputs(&self, model_outputs: usize) -> usize {
        if self.classes.is_empty() {
            model_outputs
        } else {
            self.classes.len()
        }
    }

    fn regression(support: &Path, query: &Path, in_features: usize) -> Result<Examples> {
        let s = read_csv(support, in_features, true)?;
        let q = read_csv(query, in_features, false)?;
        if q.names != s.names {
            bail!("{} has input columns {:?}, {} has {:?}", query.display(), q.names, support.display(), s.names);
        }
        let x = |rows: &[(Vec<f64>, Option<f64>)]| {
            let flat: Vec<f32> = rows.iter().flat_map(|(x, _)| x.iter().map(|&v| v as f32)).collect();
            Tensor::from_slice(&flat).reshape([rows.len() as i64, in_features as i64])
        };
        let y = |rows: &[(Vec<f64>, Option<f64>)]| {
            let v: Vec<f32> = rows.iter().map(|(_, y)| y.unwrap_or(0.0) as f32).collect();
            TargetTensor::Real(Tensor::from_slice(&v).reshape([rows.len() as i64, 1]))
        };
        let task =
            TaskTensors { support_x: x(&s.rows), support_y: y(&s.rows), query_x: x(&q.rows), query_y: y(&q.rows) };
        Ok(Examples { task, rows: q.rows, input_names: s.names, classes: Vec::new(), images: Vec::new() })
    }

    fn images(support: &Path, query: &Path, invert: bool, n_way: usize) -> Result<Examples> {
        use metatrain_common::images::{load_image, ImageFolder};
        let folder =
            ImageFolder::load(support, invert).with_context(|| format!("support set {}", support.display()))?;
        let classes = folder.classes().to_vec();
        if classes.len() < 2 || classes.len() > n_way {
            bail!(
                "the support set {} has {} class{}; this model was meta-trained for {n_way}-way tasks and takes 2 to {n_way}",
                support.display(),
                classes.len(),
                if classes.len() == 1 { "" } else { "es" }
            );
        }
        let mut support_x = Vec::new();
        let mut support_y = Vec::new();
        for c in 0..classes.len() {
            for image in folder.images(c) {
                support_x.extend_from_slice(image);
                support_y.push(c as i64);
            }
        }
        let index: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
        let mut images = Vec::new();
        let mut query_x = Vec::new();
        for (file, label) in query_files(query)? {
            let label = match label {
                Some(name) => Some(*index.get(name.as_str()).with_context(|| {
                    format!("query folder {name:?} names no support class (classes: {})", classes.join(", "))
                })?),
                None => None,
            };
            query_x.extend(load_image(&file, invert).with_context(|| format!("query image {}", file.display()))?);
            images.push((file.display().to_string(), label));
        }
        if images.is_empty() {
            bail!("{} holds no .png images to predict", query.display());
        }
        let pixels = |v: Vec<f32>| {
            let n = v.len() / metatrain_common::omniglot::PIXELS;
            Tensor::from_slice(&v).reshape([n as i64, 1, 28, 28])
        };
        let labels = |v: Vec<i64>| TargetTensor::Class(Tensor::from_slice(&v));
        let query_y = labels(images.iter().map(|(_, l)| l.unwrap_or(0) as i64).collect());
        let task = TaskTensors {
            support_x: pixels(support_x),
            support_y: labels(support_y),
            query_x: pixels(query_x),
            query_y,
        };
        Ok(Examples { task, rows: Vec::new(), input_names: Vec::new(), classes, images })
    }

    /// The predictions as CSV; prints the scores (before and after adaptation) of the labelled queries.
    fn predictions_csv(&self, before: &Tensor, after: &Tensor, log: &mut impl std::io::Write) -> Result<String> {
        let mut csv = String::new();
        if self.classes.is_empty() {
            writeln!(csv, "{},prediction,y,squared_error", self.input_names.join(","))?;
            let pred = Vec::<f32>::try_from(after.flatten(0, -1))?;
            let pre = Vec::<f32>::try_from(before.flatten(0, -1))?;
            let (mut se, mut se0, mut n) = (0.0, 0.0, 0usize);
            for (((x, y), p), p0) in self.rows.iter().zip(&pred).zip(&pre) {
                let xs: Vec<String> = x.iter().map(|v| v.to_string()).collect();
                match y {
                    Some(y) => {
                        let e = (*p as f64 - y).powi(2);
                        (se, se0, n) = (se + e, se0 + (*p0 as f64 - y).powi(2), n + 1);
                        writeln!(csv, "{},{p},{y},{e}", xs.join(","))?;
                    }
                    None => writeln!(csv, "{},{p},,", xs.join(","))?,
                }
            }
            if n > 0 {
                writeln!(
                    log,
                    "query MSE on {n} labelled rows: {:.4} before adaptation → {:.4} after",
                    se0 / n as f64,
                    se / n as f64
                )?;
            } else {
                writeln!(log, "{} query rows predicted (no labels: not scored)", self.rows.len())?;
            }
        } else {
            writeln!(csv, "file,prediction,confidence,label,correct")?;
            let probs = after.softmax(-1, Kind::Float);
            let pred = Vec::<i64>::try_from(probs.argmax(-1, false))?;
            let conf = Vec::<f32>::try_from(probs.amax(-1, false))?;
            let labelled: Vec<usize> =
                self.images.iter().enumerate().filter(|(_, (_, l))| l.is_some()).map(|(i, _)| i).collect();
            for (((file, label), p), c) in self.images.iter().zip(&pred).zip(&conf) {
                let name = &self.classes[*p as usize];
                match label {
                    Some(l) => writeln!(
                        csv,
                        "{},{},{c:.4},{},{}",
                        quote(file),
                        quote(name),
                        quote(&self.classes[*l]),
                        *l as i64 == *p
                    )?,
                    None => writeln!(csv, "{},{},{c:.4},,", quote(file), quote(name))?,
                }
            }
            if labelled.is_empty() {
                writeln!(log, "{} query images predicted (no labels: not scored)", self.images.len())?;
            } else {
                let idx = Tensor::from_slice(&labelled.iter().map(|&i| i as i64).collect::<Vec<_>>());
                let TargetTensor::Class(all) = &self.task.query_y else { unreachable!("classification targets") };
                let y = TargetTensor::Class(all.index_select(0, &idx));
                let acc = |out: &Tensor| accuracy(&out.index_select(0, &idx), &y).unwrap_or(0.0);
                let (a0, a1, n) = (acc(before), acc(after), labelled.len() as f64);
                let ci = 1.96 * (a1 * (1.0 - a1) / n).sqrt();
                writeln!(
                    log,
                    "query accuracy on {n} labelled images ({}-way): {:.2}% before adaptation → {:.2}% ± {:.2}% after",
                    self.classes.len(),
                    100.0 * a0,
                    100.0 * a1,
                    100.0 * ci
                )?;
            }
        }
        Ok(csv)
    }
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn quote(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The query folder's PNG files, sorted, each with its class: the path of its folder relative to `root`
/// (`/`-separated, as [`ImageFolder`](metatrain_common::images::ImageFolder) names classes), or `None`
/// for an image directly in `root`.
fn query_files(root: &Path) -> Result<Vec<(PathBuf, Option<String>)>> {
    const MAX_DEPTH: usize = 32;
    let mut out = Vec::new();
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read the folder {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
            .collect();
        entries.sort();
        let class = (depth > 0).then(|| {
            let rel = dir.strip_prefix(root).unwrap_or(&dir);
            rel.components().map(|c| c.as_os_str().to_string_lossy()).collect::<Vec<_>>().join("/")
        });
        for path in entries {
            if path.is_dir() {
                if depth + 1 > MAX_DEPTH {
                    bail!("{} is nested more than {MAX_DEPTH} folders deep", path.display());
                }
                stack.push((path, depth + 1));
            } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) {
                out.push((path, class.clone()));
                if out.len() > MAX_QUERY_IMAGES {
                    bail!("{} holds more than {MAX_QUERY_IMAGES} query images", root.display());
                }
            }
        }
    }
    out.sort();
    Ok(out)
}

/// A regression CSV: input column names (header order, without `y`) and rows of (inputs, y).
struct Csv {
    names: Vec<String>,
    rows: Vec<(Vec<f64>, Option<f64>)>,
}

/// Reads a regression CSV with `inputs` input columns and an optional (`need_y`: required, and set on
/// every row) target column `y`.
fn read_csv(path: &Path, inputs: usize, need_y: bool) -> Result<Csv> {
    let text = metatrain_common::net::files::read_text(path, MAX_CSV_BYTES)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("cannot read {}", path.display()))?;
    // A byte-order mark (spreadsheets write one) is not part of the first column's name.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut lines = text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().with_context(|| format!("{} is empty: it needs a header row", path.display()))?;
    let cols: Vec<String> = header.split(',').take(MAX_CSV_COLUMNS + 1).map(|c| c.trim().to_string()).collect();
    if cols.len() > MAX_CSV_COLUMNS {
        bail!("{}: more than {MAX_CSV_COLUMNS} columns in the header", path.display());
    }
    if let Some(dup) = cols.iter().enumerate().find_map(|(i, c)| cols[..i].contains(c).then_some(c)) {
        bail!("{}: the header names column {} twice", path.display(), shorten(dup));
    }
    let y_col = cols.iter().position(|c| c == "y");
    if need_y && y_col.is_none() {
        bail!("{}: the header {} has no column named y (the target)", path.display(), shorten(header));
    }
    let names: Vec<String> =
        cols.iter().enumerate().filter(|(i, _)| Some(*i) != y_col).map(|(_, c)| c.clone()).collect();
    if names.len() != inputs {
        bail!(
            "{}: {} input columns ({}), the model takes {inputs}",
            path.display(),
            names.len(),
            shorten(&names.join(", "))
        );
    }
    let mut rows = Vec::new();
    for (i, line) in lines {
        if rows.len() == MAX_CSV_ROWS {
            bail!("{}: more than {MAX_CSV_ROWS} rows", path.display());
        }
        // At most one field more than the header: a line of a million commas is refused, not split.
        let cells: Vec<&str> = line.split(',').take(cols.len() + 1).map(str::trim).collect();
        if cells.len() != cols.len() {
            let got = if cells.len() > cols.len() { "more".to_string() } else { cells.len().to_string() };
            bail!("{} line {}: {got} fields, the header has {}", path.display(), i + 1, cols.len());
        }
        // The model computes in f32: a value beyond its range would only surface as a divergence.
        let num = |c: &str, col: &str| -> Result<f64> {
            match c.parse::<f64>() {
                Ok(v) if v.is_finite() && v.abs() <= MAX_CSV_VALUE => Ok(v),
                Ok(v) if v.is_finite() => {
                    bail!("{} line {}: {} = {v:e} is beyond ±{MAX_CSV_VALUE:e}", path.display(), i + 1, shorten(col))
                }
                _ => {
                    bail!("{} line {}: {} = {} is not a finite number", path.display(), i + 1, shorten(col), shorten(c))
                }
            }
        };
        let mut x = Vec::with_capacity(inputs);
        let mut y = None;
        for (j, c) in cells.iter().enumerate() {
            if Some(j) == y_col {
                if !c.is_empty() {
                    y = Some(num(c, "y")?);
                } else if need_y {
                    bail!("{} line {}: y is empty (every support row needs its target)", path.display(), i + 1);
                }
            } else {
                x.push(num(c, &cols[j])?);
            }
        }
        rows.push((x, y));
    }
    if rows.is_empty() {
        bail!("{} has a header but no rows", path.display());
    }
    Ok(Csv { names, rows })
}
