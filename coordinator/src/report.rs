//! What a run leaves in its output directory: `report.json`, `metrics.csv` (one row per meta-step and one
//! per evaluation), and `params.safetensors` (the final meta-parameters under the model's names).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use metatrain_common::config::{Config, QuarantineMode, Schedule};
use metatrain_common::layout::ParamLayout;
use safetensors::tensor::{Dtype as StDtype, TensorView};
use serde::Serialize;

use crate::aggregate::BatchSummary;

/// The `eval` section of `report.json`: the final evaluation on held-out tasks.
#[derive(Clone, Debug, Serialize)]
pub struct EvalReport {
    pub tasks: usize,
    pub inner_steps: usize,
    pub pre_adapt_loss: f64,
    pub pre_adapt_loss_ci95: f64,
    pub post_adapt_loss: f64,
    pub post_adapt_loss_ci95: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pre_adapt_accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accuracy_ci95: Option<f64>,
}

impl EvalReport {
    pub fn from_summary(s: &BatchSummary, inner_steps: usize) -> Self {
        EvalReport {
            tasks: s.tasks,
            inner_steps,
            pre_adapt_loss: s.pre_loss.mean,
            pre_adapt_loss_ci95: s.pre_loss.ci95,
            post_adapt_loss: s.post_loss.mean,
            post_adapt_loss_ci95: s.post_loss.ci95,
            pre_adapt_accuracy: s.pre_accuracy.map(|a| a.mean),
            accuracy: s.post_accuracy.map(|a| a.mean),
            accuracy_ci95: s.post_accuracy.map(|a| a.ci95),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub config: serde_json::Value,
    pub final_step: u64,
    pub interrupted: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<EvalReport>,
    pub params_sha256: String,
    pub wall_seconds: f64,
    pub tasks_completed: u64,
    pub tasks_reassigned: u64,
    /// Duplicate copies of straggling tasks launched (this process only; not carried across a resume).
    pub tasks_duplicated: u64,
    /// Gradients that waited for their turn on disk, beyond `cluster.reorder_memory_mb` (this process only).
    pub gradients_spilled: u64,
    pub results_rejected: u64,
    pub max_workers: usize,
    /// Payload bytes sent (parameters) and received (accepted gradients), and their sum per meta-step
    /// (this process only; not carried across a resume).
    pub wire: WireReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub curriculum: Option<CurriculumReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub defence: Option<DefenceReport>,
}

/// `wire` in `report.json`.
#[derive(Clone, Debug, Serialize)]
pub struct WireReport {
    pub params_sent_bytes: u64,
    pub gradients_received_bytes: u64,
    pub bytes_per_meta_step: f64,
}

/// `curriculum` in `report.json` (runs with a schedule).
#[derive(Clone, Debug, Serialize)]
pub struct CurriculumReport {
    pub schedule: &'static str,
    /// Competence of the last meta-step.
    pub final_competence: f64,
}

impl CurriculumReport {
    pub fn of(config: &Config, c: &crate::curriculum::Curriculum, final_step: u64) -> Option<Self> {
        let schedule = config.curriculum.schedule;
        (schedule != Schedule::None).then(|| CurriculumReport {
            schedule: schedule.name(),
            final_competence: c.competence(final_step.saturating_sub(1)),
        })
    }
}

/// `defence` in `report.json` (runs with corrupted tasks or a quarantine).
#[derive(Clone, Debug, Serialize)]
pub struct DefenceReport {
    pub tasks_corrupted: u64,
    pub tasks_quarantined: u64,
    pub quarantined_corrupted: u64,
    pub steps_skipped: u64,
    /// Share of quarantined tasks that were corrupted ones (when any was quarantined).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine_precision: Option<f64>,
    /// Share of corrupted tasks that were quarantined (when any was corrupted and quarantine is on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quarantine_recall: Option<f64>,
    /// Per kind of corruption that occurred: tasks corrupted, quarantined, and the recall.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub by_kind: std::collections::BTreeMap<&'static str, KindReport>,
}

#[derive(Clone, Debug, Serialize)]
pub struct KindReport {
    pub corrupted: u64,
    pub quarantined: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recall: Option<f64>,
}

impl DefenceReport {
    pub fn of(config: &Config, c: crate::run::DefenceCounts) -> Option<Self> {
        let quarantine = config.defence.quarantine != QuarantineMode::Off;
        if config.corrupt.fraction <= 0.0 && !quarantine {
            return None;
        }
        let ratio = |a: u64, b: u64| (b > 0).then(|| a as f64 / b as f64);
        Some(DefenceReport {
            tasks_corrupted: c.tasks_corrupted,
            tasks_quarantined: c.tasks_quarantined,
            quarantined_corrupted: c.quarantined_corrupted,
            steps_skipped: c.steps_skipped,
            quarantine_precision: ratio(c.quarantined_corrupted, c.tasks_quarantined),
            quarantine_recall: if quarantine { ratio(c.quarantined_corrupted, c.tasks_corrupted) } else { None },
            by_kind: metatrain_common::config::Corruption::ALL
                .iter()
                .zip(c.by_kind)
                .filter(|(_, k)| k.corrupted > 0)
                .map(|(kind, k)| {
                    let recall = if quarantine { ratio(k.quarantined, k.corrupted) } else { None };
                    (kind.name(), KindReport { corrupted: k.corrupted, quarantined: k.quarantined, recall })
                })
                .collect(),
        })
    }
}

/// Builds the config's JSON form (infinite floats become the string "inf", which JSON cannot hold).
pub fn config_json(config: &Config) -> serde_json::Value {
    let mut v = serde_json::to_value(config).unwrap_or(serde_json::Value::Null);
    if config.algo.inner_grad_clamp.is_infinite() {
        v["algo"]["inner_grad_clamp"] = serde_json::Value::String("inf".into());
    }
    if config.train.max_grad_norm.is_infinite() {
        v["train"]["max_grad_norm"] = serde_json::Value::String("inf".into());
    }
    v
}

/// `metrics.csv`, written row by row as the run goes (flushed each row so a crash keeps what was done).
pub struct MetricsCsv {
    out: BufWriter<File>,
}

pub const CSV_HEADER: &str = "kind,step,pre_adapt_loss,post_adapt_loss,post_adapt_loss_ci95,accuracy,accuracy_ci95,grad_norm,clipped,step_seconds,wall_seconds,competence,quarantined";

impl MetricsCsv {
    /// Opens `metrics.csv` for a run that has completed `step` meta-steps (its checkpoint's step): a new file with a header at 0;
    /// when resuming, the rows up to `step` are kept and later ones (written after the checkpoint by the
    /// interrupted process) are dropped, so the file matches the resumed run.
    pub fn open(path: &Path, step: u64) -> Result<Self> {
        let mut kept = format!("{CSV_HEADER}\n");
        if step > 0 {
            // A missing file starts afresh; one that cannot be read is an error, never silently
            // replaced (that would lose the run's history).
            let text = match std::fs::read(path) {
                Ok(bytes) => Some(String::from_utf8(bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "{} is not UTF-8 text (byte {}): move it away to resume without it",
                        path.display(),
                        e.utf8_error().valid_up_to()
                    )
                })?),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(anyhow::Error::new(e).context(format!("cannot read {}", path.display()))),
            };
            if let Some(text) = text {
                for line in text.lines().skip(1) {
                    let mut fields = line.split(',');
                    let kind = fields.next();
                    let row_step = fields.next().and_then(|s| s.parse::<u64>().ok());
                    // Evaluations at `step` are not in its checkpoint (they run before meta-step
                    // `step`): the resumed run writes them again.
                    let kept_up_to = if kind == Some("eval") { step.saturating_sub(1) } else { step };
                    if row_step.is_some_and(|s| s <= kept_up_to) {
                        kept.push_str(line);
                        kept.push('\n');
                    }
                }
            }
        }
        write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        Ok(MetricsCsv { out: BufWriter::new(file) })
    }

    /// `kind` is `train` or `eval`; `step` counts meta-steps done; `competence` is the curriculum's at
    /// that step (training rows) or 1.
    pub fn row(
        &mut self,
        kind: &str,
        step: u64,
        s: &BatchSummary,
        step_seconds: f64,
        wall_seconds: f64,
        competence: f64,
    ) -> Result<()> {
        let opt = |v: Option<f64>| v.map(|x| format!("{x:.6}")).unwrap_or_default();
        let (gn, clipped) = if kind == "train" {
            (format!("{:.6}", s.grad_norm), (s.clipped as u8).to_string())
        } else {
            (String::new(), String::new())
        };
        writeln!(
            self.out,
            "{kind},{step},{:.6},{:.6},{:.6},{},{},{gn},{clipped},{step_seconds:.4},{wall_seconds:.3},{competence:.6},{}",
            s.pre_loss.mean,
            s.post_loss.mean,
            s.post_loss.ci95,
            opt(s.post_accuracy.map(|a| a.mean)),
            opt(s.post_accuracy.map(|a| a.ci95)),
            s.quarantined(),
        )?;
        self.out.flush()?;
        Ok(())
    }
}

/// Writes `value` as JSON to `path` atomically (temporary file, fsync, rename).
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)?;
    write_atomic(path, &bytes)
}

pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    {
        let mut f = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Metadata key of `params.safetensors` holding the run's config (TOML), so that the file alone says
/// which model, algorithm and task shape its tensors are for (`metatrain adapt` reads it).
pub const CONFIG_METADATA_KEY: &str = "metatrain.config";

/// `params.safetensors`: each layout tensor under its name, f32, and the run's config as metadata.
pub fn write_params(path: &Path, layout: &ParamLayout, params: &[f32], config_toml: &str) -> Result<()> {
    let bytes: Vec<Vec<u8>> = layout
        .ranges()
        .iter()
        .map(|&(off, len)| params[off..off + len].iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::new();
    for (p, b) in layout.params.iter().zip(&bytes) {
        views.push((p.name.clone(), TensorView::new(StDtype::F32, p.shape.clone(), b)?));
    }
    let meta: HashMap<String, String> =
        [("format".to_string(), "metatrain".to_string()), (CONFIG_METADATA_KEY.to_string(), config_toml.to_string())]
            .into();
    let data = safetensors::serialize(views, &Some(meta))?;
    write_atomic(path, &data)
}
