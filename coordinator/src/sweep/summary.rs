//! The sweep's summary: one row per run from its `report.json`, written as `summary.csv` and
//! `summary.md`, and a comparison plot of the held-out post-adaptation loss (or accuracy).

use std::path::Path;

use anyhow::Result;

use super::plan::PlannedRun;
use crate::report::write_atomic;

/// How a run of the sweep ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Finished now or in an earlier invocation.
    Done,
    Interrupted,
    Failed,
    /// Not started (the sweep stopped first).
    Pending,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Interrupted => "interrupted",
            Outcome::Failed => "failed",
            Outcome::Pending => "pending",
        }
    }
}

pub struct Row<'a> {
    pub run: &'a PlannedRun,
    pub outcome: Outcome,
    /// The run's report.json, if it wrote one.
    pub report: Option<serde_json::Value>,
}

impl Row<'_> {
    fn num(&self, path: &[&str]) -> Option<f64> {
        let mut v = self.report.as_ref()?;
        for p in path {
            v = v.get(p)?;
        }
        v.as_f64()
    }
}

fn fmt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_default()
}

/// Writes summary.csv, summary.md and comparison.{png,svg} into `dir`; returns the Markdown table.
pub fn write(dir: &Path, title: &str, rows: &[Row<'_>]) -> Result<String> {
    let keys: Vec<String> = {
        let mut k: Vec<String> = Vec::new();
        for r in rows {
            for (key, _) in &r.run.varies {
                if !k.contains(key) {
                    k.push(key.clone());
                }
            }
        }
        k
    };
    let classification = rows.iter().any(|r| r.num(&["eval", "accuracy"]).is_some());
    let value_of = |r: &Row<'_>, key: &str| {
        r.run.varies.iter().find(|(k, _)| k == key).map(|(_, v)| v.trim_matches('"').to_string()).unwrap_or_default()
    };

    let mut csv = String::from("run,");
    for k in &keys {
        csv.push_str(&format!("{k},"));
    }
    csv.push_str("status,final_step,pre_adapt_loss,post_adapt_loss,post_adapt_loss_ci95,accuracy,accuracy_ci95,wall_seconds,params_sha256\n");
    for r in rows {
        csv.push_str(&format!("{},", r.run.name));
        for k in &keys {
            csv.push_str(&format!("{},", value_of(r, k).replace(',', ";")));
        }
        let sha = r.report.as_ref().and_then(|v| v["params_sha256"].as_str()).unwrap_or_default();
        csv.push_str(&format!(
            "{},{},{},{},{},{},{},{},{}\n",
            r.outcome.name(),
            fmt(r.num(&["final_step"]), 0),
            fmt(r.num(&["eval", "pre_adapt_loss"]), 6),
            fmt(r.num(&["eval", "post_adapt_loss"]), 6),
            fmt(r.num(&["eval", "post_adapt_loss_ci95"]), 6),
            fmt(r.num(&["eval", "accuracy"]), 6),
            fmt(r.num(&["eval", "accuracy_ci95"]), 6),
            fmt(r.num(&["wall_seconds"]), 1),
            sha
        ));
    }
    write_atomic(&dir.join("summary.csv"), csv.as_bytes())?;

    let mut md = format!("# {title}\n\n| run |");
    for k in &keys {
        md.push_str(&format!(" `{k}` |"));
    }
    md.push_str(" held-out loss before → after adaptation (± 95 % CI) |");
    if classification {
        md.push_str(" accuracy (± 95 % CI) |");
    }
    md.push_str(" steps | wall s | status |\n|---|");
    md.push_str(&"---|".repeat(keys.len() + 4 + classification as usize));
    md.push('\n');
    for r in rows {
        md.push_str(&format!("| {} |", r.run.name));
        for k in &keys {
            md.push_str(&format!(" {} |", value_of(r, k)));
        }
        let loss = match (r.num(&["eval", "pre_adapt_loss"]), r.num(&["eval", "post_adapt_loss"])) {
            (Some(pre), Some(post)) => {
                format!("{pre:.4} → {post:.4} ± {}", fmt(r.num(&["eval", "post_adapt_loss_ci95"]), 4))
            }
            _ => "–".into(),
        };
        md.push_str(&format!(" {loss} |"));
        if classification {
            let acc = match (r.num(&["eval", "accuracy"]), r.num(&["eval", "accuracy_ci95"])) {
                (Some(a), Some(ci)) => format!("{:.2}% ± {:.2}%", 100.0 * a, 100.0 * ci),
                _ => "–".into(),
            };
            md.push_str(&format!(" {acc} |"));
        }
        md.push_str(&format!(
            " {} | {} | {} |\n",
            fmt(r.num(&["final_step"]), 0),
            fmt(r.num(&["wall_seconds"]), 0),
            r.outcome.name()
        ));
    }
    write_atomic(&dir.join("summary.md"), md.as_bytes())?;

    let bars: Vec<(String, f64, f64)> = rows
        .iter()
        .filter_map(|r| {
            let (key, ci) = if classification {
                ("accuracy", "accuracy_ci95")
            } else {
                ("post_adapt_loss", "post_adapt_loss_ci95")
            };
            Some((r.run.name.clone(), r.num(&["eval", key])?, r.num(&["eval", ci])?))
        })
        .collect();
    let x_desc = if classification { "held-out accuracy" } else { "held-out post-adaptation loss" };
    crate::plot::write_comparison_plot(&dir.join("comparison"), title, x_desc, &bars)?;
    Ok(md)
}
