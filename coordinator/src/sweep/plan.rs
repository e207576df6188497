//! A sweep file and the runs it expands to. No I/O: [`SweepFile::parse`] takes the file's text and
//! [`SweepFile::runs`] returns the named runs with their `--set` overrides.
//!
//! ```toml
//! base = "noisy-linear.toml"        # the config every run starts from (relative to the sweep file)
//! [set]                             # overrides for every run
//! "train.steps" = 150
//! [grid]                            # every combination (axes in key order, values as written)
//! "algo.name" = ["maml", "fomaml"]
//! "algo.inner_lr" = [0.01, 0.1]
//! [[runs]]                          # and/or a list of named runs
//! name = "layernorm"
//! set = { "model.name" = "mlp-ln" }
//! # seeds = [0, 1, 2]               # optional: every run above once per seed, named `<run>-seed=S`
//! ```
//!
//! With `seeds`, each run of the grid or list is a *group* of replicates that differ only in `seed`;
//! the summary then also compares groups by their mean over seeds (see [`super::summary`]).

use std::collections::BTreeSet;

use serde::Deserialize;
use thiserror::Error;

/// Most runs one sweep may expand to (runs are queued; each also becomes a metrics label value).
pub const MAX_RUNS: usize = 256;
/// Longest run name (it is a directory name and a label value).
const MAX_NAME: usize = 80;

#[derive(Debug, Error, PartialEq)]
pub enum PlanError {
    #[error("the sweep file is not valid TOML for a sweep: {0}")]
    Parse(String),
    #[error("the sweep has no runs: give a [grid] with at least one key, or [[runs]]")]
    Empty,
    #[error("grid key {0:?} has no values")]
    EmptyAxis(String),
    #[error("the sweep expands to {0} runs; at most {MAX_RUNS} are allowed")]
    TooMany(usize),
    #[error("run name {0:?}: use 1..={MAX_NAME} characters from A-Z a-z 0-9 . _ - =")]
    BadName(String),
    #[error("run name {0:?} is taken by the sweep's own files (tls, summary*, comparison*); choose another")]
    ReservedName(String),
    #[error("key {0:?}: a config key is dotted words (letters, digits, _), e.g. \"train.meta_lr\"")]
    BadKey(String),
    #[error("two runs are named {0:?}")]
    DuplicateName(String),
    #[error("value of {0:?} must be a number, string or boolean")]
    BadValue(String),
    #[error("`seeds` repeats every run once per seed, so {0:?} may not also set `seed`")]
    SeedTwice(String),
    #[error("`seeds` lists {0} twice")]
    DuplicateSeed(u64),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SweepFile {
    /// The base config, relative to the sweep file.
    pub base: String,
    #[serde(default)]
    set: toml::Table,
    #[serde(default)]
    grid: toml::Table,
    #[serde(default)]
    runs: Vec<ListedRun>,
    /// Replicates: every run once per seed (empty: each run once, with the base config's seed).
    #[serde(default)]
    seeds: Vec<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListedRun {
    name: String,
    #[serde(default)]
    set: toml::Table,
}

/// One run of the sweep: its name (directory and `run` label) and its overrides, in order.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedRun {
    pub name: String,
    pub overrides: Vec<String>,
    /// The overrides that distinguish this run (grid values or the listed run's own), for the summary.
    pub varies: Vec<(String, String)>,
    /// With `seeds`: the replicate group's name (the run's name without `-seed=S`) and this run's seed.
    pub replicate: Option<(String, u64)>,
}

impl SweepFile {
    pub fn parse(text: &str) -> Result<SweepFile, PlanError> {
        toml::from_str(text).map_err(|e| PlanError::Parse(e.message().to_string()))
    }

    pub fn runs(&self) -> Result<Vec<PlannedRun>, PlanError> {
        let fixed = overrides(&self.set)?;
        let mut combos: Vec<Vec<(String, String)>> = Vec::new();
        if !self.grid.is_empty() {
            combos.push(Vec::new());
            for (key, values) in &self.grid {
                if !valid_key(key) {
                    return Err(PlanError::BadKey(key.clone()));
                }
                let values = match values {
                    toml::Value::Array(a) => a.clone(),
                    v => vec![v.clone()],
                };
                if values.is_empty() {
                    return Err(PlanError::EmptyAxis(key.clone()));
                }
                let n = combos.len() * values.len();
                if n > MAX_RUNS {
                    return Err(PlanError::TooMany(n));
                }
                let values: Vec<String> = values.iter().map(|v| render(key, v)).collect::<Result<_, _>>()?;
                combos = combos
                    .into_iter()
                    .flat_map(|c| {
                        values.iter().map(move |v| {
                            let mut c = c.clone();
                            c.push((key.clone(), v.clone()));
                            c
                        })
                    })
                    .collect();
            }
        }
        let total = (combos.len() + self.runs.len()) * self.seeds.len().max(1);
        if total == 0 {
            return Err(PlanError::Empty);
        }
        if total > MAX_RUNS {
            return Err(PlanError::TooMany(total));
        }
        let mut out = Vec::new();
        for (i, varies) in combos.into_iter().enumerate() {
            let mut name = format!("r{i:02}");
            for (k, v) in &varies {
                let short = k.rsplit('.').next().unwrap_or(k);
                name.push_str(&format!("-{short}={}", v.trim_matches('"')));
            }
            let name: String = name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() || "._-=".contains(c) { c } else { '_' })
                .take(MAX_NAME)
                .collect();
            out.push(planned(name, &fixed, varies));
        }
        for r in &self.runs {
            let ok = !r.name.is_empty()
                && r.name.len() <= MAX_NAME
                && r.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-=".contains(c))
                && !r.name.starts_with('.');
            if !ok {
                return Err(PlanError::BadName(r.name.clone()));
            }
            if is_reserved(&r.name) {
                return Err(PlanError::ReservedName(r.name.clone()));
            }
            out.push(planned(r.name.clone(), &fixed, overrides(&r.set)?));
        }
        if !self.seeds.is_empty() {
            out = self.replicate(out)?;
        }
        let mut seen = BTreeSet::new();
        for r in &out {
            if !seen.insert(r.name.clone()) {
                return Err(PlanError::DuplicateName(r.name.clone()));
            }
        }
        Ok(out)
    }
}

impl SweepFile {
    /// Every run once per seed, seeds in the order written (run-major, so each group's replicates sit together).
    fn replicate(&self, runs: Vec<PlannedRun>) -> Result<Vec<PlannedRun>, PlanError> {
        let mut seen = BTreeSet::new();
        if let Some(dup) = self.seeds.iter().find(|s| !seen.insert(**s)) {
            return Err(PlanError::DuplicateSeed(*dup));
        }
        let mut out = Vec::with_capacity(runs.len() * self.seeds.len());
        for r in runs {
            if r.overrides.iter().any(|o| o.split_once('=').is_some_and(|(k, _)| k == "seed")) {
                return Err(PlanError::SeedTwice(r.name));
            }
            for &seed in &self.seeds {
                let mut run = r.clone();
                run.name = format!("{}-seed={seed}", r.name);
                run.overrides.push(format!("seed={seed}"));
                run.replicate = Some((r.name.clone(), seed));
                out.push(run);
            }
        }
        Ok(out)
    }
}

fn planned(name: String, fixed: &[(String, String)], varies: Vec<(String, String)>) -> PlannedRun {
    let overrides = fixed.iter().chain(&varies).map(|(k, v)| format!("{k}={v}")).collect();
    PlannedRun { name, overrides, varies, replicate: None }
}

/// `[set]`-style tables as `(key, TOML value)`, nested tables flattened to dotted keys.
fn overrides(t: &toml::Table) -> Result<Vec<(String, String)>, PlanError> {
    let mut out = Vec::new();
    flatten("", t, &mut out)?;
    Ok(out)
}

/// Names the sweep directory already uses for itself.
fn is_reserved(name: &str) -> bool {
    name == "tls" || name.starts_with("summary") || name.starts_with("comparison")
}

/// A config key as `--set` takes it: dotted words of letters, digits and `_` (no `=`, spaces, quotes).
fn valid_key(key: &str) -> bool {
    key.split('.').all(|w| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
}

fn flatten(prefix: &str, t: &toml::Table, out: &mut Vec<(String, String)>) -> Result<(), PlanError> {
    for (k, v) in t {
        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        if !valid_key(&key) {
            return Err(PlanError::BadKey(key));
        }
        match v {
            toml::Value::Table(inner) => flatten(&key, inner, out)?,
            v => out.push((key.clone(), render(&key, v)?)),
        }
    }
    Ok(())
}

/// A value as `--set` reads it (TOML: `0.01`, `"maml"`, `true`).
fn render(key: &str, v: &toml::Value) -> Result<String, PlanError> {
    match v {
        toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) | toml::Value::String(_) => {
            Ok(v.to_string())
        }
        _ => Err(PlanError::BadValue(key.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grid_expands_to_every_combination_in_order() {
        let f = SweepFile::parse(
            r#"base = "b.toml"
[set]
"train.steps" = 100
[grid]
"algo.name" = ["maml", "fomaml"]
"algo.inner_lr" = [0.01, 0.1, 0.3]
"#,
        )
        .unwrap();
        let runs = f.runs().unwrap();
        assert_eq!(runs.len(), 6);
        // Axes in key order, values in the order written.
        assert_eq!(runs[0].name, "r00-inner_lr=0.01-name=maml");
        assert_eq!(runs[0].overrides, vec!["train.steps=100", "algo.inner_lr=0.01", "algo.name=\"maml\""]);
        assert_eq!(runs[5].name, "r05-inner_lr=0.3-name=fomaml");
    }

    #[test]
    fn listed_runs_follow_the_grid_and_names_are_checked() {
        let f = SweepFile::parse(
            "base = \"b.toml\"\n[[runs]]\nname = \"ln\"\nset = { model = { name = \"mlp-ln\" } }\n[[runs]]\nname = \"plain\"\n",
        )
        .unwrap();
        let runs = f.runs().unwrap();
        assert_eq!(runs[0].overrides, vec!["model.name=\"mlp-ln\""]);
        assert!(runs[1].overrides.is_empty());
        let bad = SweepFile::parse("base = \"b\"\n[[runs]]\nname = \"../x\"\n").unwrap();
        assert_eq!(bad.runs(), Err(PlanError::BadName("../x".into())));
        let dup = SweepFile::parse("base = \"b\"\n[[runs]]\nname = \"a\"\n[[runs]]\nname = \"a\"\n").unwrap();
        assert_eq!(dup.runs(), Err(PlanError::DuplicateName("a".into())));
        for reserved in ["tls", "summary.csv", "comparison.png"] {
            let f = SweepFile::parse(&format!("base = \"b\"\n[[runs]]\nname = \"{reserved}\"\n")).unwrap();
            assert_eq!(f.runs(), Err(PlanError::ReservedName(reserved.into())));
        }
        let spliced =
            SweepFile::parse("base = \"b\"\n[set]\n\"train.meta_lr=0.5 #\" = 1\n[[runs]]\nname = \"a\"\n").unwrap();
        assert!(matches!(spliced.runs(), Err(PlanError::BadKey(_))));
        let grid = SweepFile::parse("base = \"b\"\n[grid]\n\"a b\" = [1]\n").unwrap();
        assert!(matches!(grid.runs(), Err(PlanError::BadKey(_))));
    }

    #[test]
    fn seeds_replicate_every_run_and_may_not_be_set_twice() {
        let f = SweepFile::parse(
            "base = \"b\"\nseeds = [3, 1]\n[grid]\n\"algo.name\" = [\"maml\", \"fomaml\"]\n[[runs]]\nname = \"ln\"\n",
        )
        .unwrap();
        let runs = f.runs().unwrap();
        let names: Vec<&str> = runs.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "r00-name=maml-seed=3",
                "r00-name=maml-seed=1",
                "r01-name=fomaml-seed=3",
                "r01-name=fomaml-seed=1",
                "ln-seed=3",
                "ln-seed=1"
            ]
        );
        assert_eq!(runs[1].overrides, vec!["algo.name=\"maml\"", "seed=1"]);
        assert_eq!(runs[1].replicate, Some(("r00-name=maml".to_string(), 1)));
        assert_eq!(runs[4].overrides, vec!["seed=3"]);
        let twice = SweepFile::parse("base = \"b\"\nseeds = [1]\n[grid]\nseed = [1, 2]\n").unwrap();
        assert!(matches!(twice.runs(), Err(PlanError::SeedTwice(_))));
        let in_set = SweepFile::parse("base = \"b\"\nseeds = [1]\n[set]\nseed = 4\n[[runs]]\nname = \"a\"\n").unwrap();
        assert_eq!(in_set.runs(), Err(PlanError::SeedTwice("a".into())));
        let dup = SweepFile::parse("base = \"b\"\nseeds = [1, 1]\n[[runs]]\nname = \"a\"\n").unwrap();
        assert_eq!(dup.runs(), Err(PlanError::DuplicateSeed(1)));
        let many = SweepFile::parse("base = \"b\"\nseeds = [0,1,2,3,4,5,6,7,8,9]\n[grid]\na = [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26]\n").unwrap();
        assert_eq!(many.runs(), Err(PlanError::TooMany(260)));
    }

    #[test]
    fn empty_oversized_and_malformed_sweeps_are_refused() {
        assert_eq!(SweepFile::parse("base = \"b\"\n").unwrap().runs(), Err(PlanError::Empty));
        let big = SweepFile::parse("base = \"b\"\n[grid]\na = [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17]\nb = [1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17]\n").unwrap();
        assert_eq!(big.runs(), Err(PlanError::TooMany(289)));
        assert!(matches!(SweepFile::parse("base = \"b\"\nbogus = 1\n"), Err(PlanError::Parse(_))));
        let arr = SweepFile::parse("base = \"b\"\n[grid]\na = [[1]]\n").unwrap();
        assert_eq!(arr.runs(), Err(PlanError::BadValue("a".into())));
        let empty = SweepFile::parse("base = \"b\"\n[grid]\na = []\n").unwrap();
        assert_eq!(empty.runs(), Err(PlanError::EmptyAxis("a".into())));
    }
}
