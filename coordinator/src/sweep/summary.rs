//! The sweep's summary: one row per run from its `report.json`, written as `summary.csv` and
//! `summary.md`, and a comparison plot of the held-out post-adaptation loss (or accuracy).
//!
//! A sweep with `seeds` also compares its replicate groups: per group, the mean over its finished seeds
//! of each run's held-out figures with a 95 % CI from Student's t over those seeds (the spread between
//! seeds, which is what decides whether one configuration beats another). That table is appended to
//! `summary.md`, written as `summary-groups.csv`, and the comparison plot shows the groups.

use std::path::Path;

use anyhow::Result;

use super::plan::PlannedRun;
use crate::aggregate::{mean_ci_t, MeanCi};
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

    let (key, ci) =
        if classification { ("accuracy", "accuracy_ci95") } else { ("post_adapt_loss", "post_adapt_loss_ci95") };
    let mut bars: Vec<(String, f64, f64)> =
        rows.iter().filter_map(|r| Some((r.run.name.clone(), r.num(&["eval", key])?, r.num(&["eval", ci])?))).collect();
    let mut x_desc = if classification { "held-out accuracy" } else { "held-out post-adaptation loss" }.to_string();
    let groups = groups(rows);
    if !groups.is_empty() {
        md.push_str(&groups_markdown(&groups, classification));
        write_atomic(&dir.join("summary-groups.csv"), groups_csv(&groups).as_bytes())?;
        let pick = |g: &Group| if classification { g.accuracy } else { Some(g.post) };
        bars = groups.iter().filter_map(|g| Some((g.name.clone(), pick(g)?.mean, pick(g)?.ci95))).collect();
        x_desc.push_str(", mean over seeds ± 95 % CI (t)");
    }
    write_atomic(&dir.join("summary.md"), md.as_bytes())?;
    crate::plot::write_comparison_plot(&dir.join("comparison"), title, &x_desc, &bars)?;
    Ok(md)
}

/// One replicate group's figures over its finished seeds.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    pub name: String,
    /// Seeds with a final report, and seeds planned.
    pub finished: usize,
    pub planned: usize,
    pub pre: MeanCi,
    pub post: MeanCi,
    pub accuracy: Option<MeanCi>,
}

/// Groups replicate runs (in plan order); empty when the sweep has no `seeds`.
pub fn groups(rows: &[Row<'_>]) -> Vec<Group> {
    let mut order: Vec<&str> = Vec::new();
    for r in rows {
        if let Some((g, _)) = &r.run.replicate {
            if !order.contains(&g.as_str()) {
                order.push(g);
            }
        }
    }
    order
        .into_iter()
        .map(|name| {
            let members: Vec<&Row<'_>> =
                rows.iter().filter(|r| r.run.replicate.as_ref().is_some_and(|(g, _)| g == name)).collect();
            let done: Vec<&&Row<'_>> = members.iter().filter(|r| r.outcome == Outcome::Done).collect();
            let series = |path: &[&str]| -> Vec<f64> { done.iter().filter_map(|r| r.num(path)).collect() };
            let acc = series(&["eval", "accuracy"]);
            Group {
                name: name.to_string(),
                finished: done.len(),
                planned: members.len(),
                pre: mean_ci_t(&series(&["eval", "pre_adapt_loss"])),
                post: mean_ci_t(&series(&["eval", "post_adapt_loss"])),
                accuracy: (!acc.is_empty()).then(|| mean_ci_t(&acc)),
            }
        })
        .collect()
}

fn groups_markdown(groups: &[Group], classification: bool) -> String {
    let mut md = String::from(
        "\n## Over seeds\n\nMean over each group's finished seeds, ± the 95 % confidence half-width from Student's t over those seeds.\n\n| group | seeds | held-out loss before adaptation | after adaptation |",
    );
    md.push_str(if classification { " accuracy |\n|---|---|---|---|---|\n" } else { "\n|---|---|---|---|\n" });
    for g in groups {
        md.push_str(&format!("| {} | {}/{} |", g.name, g.finished, g.planned));
        if g.finished == 0 {
            md.push_str(if classification { " – | – | – |\n" } else { " – | – |\n" });
            continue;
        }
        md.push_str(&format!(" {:.4} ± {:.4} | {:.4} ± {:.4} |", g.pre.mean, g.pre.ci95, g.post.mean, g.post.ci95));
        if classification {
            match g.accuracy {
                Some(a) => md.push_str(&format!(" {:.2}% ± {:.2}% |", 100.0 * a.mean, 100.0 * a.ci95)),
                None => md.push_str(" – |"),
            }
        }
        md.push('\n');
    }
    md
}

fn groups_csv(groups: &[Group]) -> String {
    let mut csv = String::from(
        "group,seeds_finished,seeds_planned,pre_adapt_loss,pre_adapt_loss_ci95,post_adapt_loss,post_adapt_loss_ci95,accuracy,accuracy_ci95\n",
    );
    for g in groups {
        let (a, aci) = g.accuracy.map(|a| (format!("{:.6}", a.mean), format!("{:.6}", a.ci95))).unwrap_or_default();
        csv.push_str(&format!(
            "{},{},{},{:.6},{:.6},{:.6},{:.6},{a},{aci}\n",
            g.name, g.finished, g.planned, g.pre.mean, g.pre.ci95, g.post.mean, g.post.ci95
        ));
    }
    csv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(group: &str, seed: u64) -> PlannedRun {
        PlannedRun {
            name: format!("{group}-seed={seed}"),
            overrides: vec![format!("seed={seed}")],
            varies: vec![],
            replicate: Some((group.to_string(), seed)),
        }
    }

    fn report(post: f64, acc: f64) -> serde_json::Value {
        serde_json::json!({ "eval": { "pre_adapt_loss": 2.0, "post_adapt_loss": post, "accuracy": acc } })
    }

    #[test]
    fn groups_average_finished_seeds_with_a_t_interval() {
        let runs = [run("a", 0), run("a", 1), run("a", 2), run("b", 0), run("b", 1), run("b", 2)];
        let outcome = [Outcome::Done, Outcome::Done, Outcome::Done, Outcome::Done, Outcome::Failed, Outcome::Done];
        let posts = [1.0, 2.0, 3.0, 0.5, 99.0, 0.7];
        let rows: Vec<Row<'_>> = runs
            .iter()
            .zip(outcome)
            .zip(posts)
            .map(|((run, outcome), p)| Row { run, outcome, report: Some(report(p, p / 10.0)) })
            .collect();
        let g = groups(&rows);
        assert_eq!(g.len(), 2);
        assert_eq!((g[0].name.as_str(), g[0].finished, g[0].planned), ("a", 3, 3));
        assert_eq!(g[0].post.mean, 2.0);
        assert!((g[0].post.ci95 - 4.303 / 3f64.sqrt()).abs() < 1e-9);
        // The failed replicate is left out, not averaged in.
        assert_eq!((g[1].finished, g[1].planned), (2, 3));
        assert!((g[1].post.mean - 0.6).abs() < 1e-12);
        assert!((g[1].accuracy.unwrap().mean - 0.06).abs() < 1e-12);
        let md = groups_markdown(&g, true);
        assert!(md.contains("| a | 3/3 | 2.0000 ± 0.0000 | 2.0000 ± 2.4843 | 20.00% ± 24.84% |"), "{md}");
        let none = [Row { run: &runs[0], outcome: Outcome::Pending, report: None }];
        assert!(groups_markdown(&groups(&none), false).contains("| a | 0/1 | – | – |"));
        // Runs without seeds form no groups.
        let plain = PlannedRun { replicate: None, ..run("c", 0) };
        assert!(groups(&[Row { run: &plain, outcome: Outcome::Done, report: Some(report(1.0, 0.1)) }]).is_empty());
    }
}
