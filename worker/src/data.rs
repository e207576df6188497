//! Finding and loading the data sets a run needs (only Omniglot and image-folder tasks read files).
//!
//! The data directory is `--data-dir`, else `$METATRAIN_DATA_DIR`, else `shared/data` or `../shared/data`
//! relative to the current directory or to the binary's checkout (`<repo>/target/<profile>/` → `<repo>/..`).
//! Each `.npz` is checked against `omniglot/SHA256SUMS` when that file lists it. `omniglot/alphabets.tsv`
//! gives each character its alphabet (for the episodes' difficulty); without it every character counts as
//! its own alphabet, which a curriculum cannot work with.
//!
//! `images` tasks read `task.root` (and `task.eval_root`) themselves, relative to the working directory,
//! through [`ImageSplits::load`]; `--data-dir` plays no part.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use metatrain_common::config::{Config, ImagesTaskConfig, Schedule, TaskConfig};
use metatrain_common::datadir;
use metatrain_common::images::ImageSplits;
use metatrain_common::layout::sha256_hex;
use metatrain_common::omniglot::{alphabets, OmniglotSet};
use metatrain_common::task::Datasets;

/// Resolves the data directory (see the module doc). `None` when nothing plausible exists.
pub fn resolve_data_dir(flag: Option<&Path>) -> Option<PathBuf> {
    let mut roots = vec![PathBuf::from(".")];
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).take(5).map(Path::to_path_buf));
    }
    datadir::resolve(flag, &roots)
}

/// Loads what `config`'s task distribution needs.
pub fn load_datasets(config: &Config, data_dir: Option<&Path>) -> Result<Datasets> {
    match &config.task {
        TaskConfig::Omniglot(_) => {}
        TaskConfig::Images(cfg) => return load_images(cfg),
        _ => return Ok(Datasets::default()),
    }
    let dir = resolve_data_dir(data_dir)
        .context("Omniglot tasks need the data directory: pass --data-dir DIR (holding omniglot/images_background.npz) or set METATRAIN_DATA_DIR")?;
    let omni = dir.join("omniglot");
    let tsv = omni.join("alphabets.tsv");
    let alphabets = match std::fs::metadata(&tsv) {
        Ok(m) if m.len() as usize <= alphabets::MAX_BYTES => {
            Some(std::fs::read_to_string(&tsv).with_context(|| format!("cannot read {}", tsv.display()))?)
        }
        Ok(m) => bail!("{} is {} bytes; an alphabets file is a few KB", tsv.display(), m.len()),
        Err(_) if config.curriculum.schedule != Schedule::None => {
            bail!("a curriculum on Omniglot needs {} (each character's alphabet)", tsv.display())
        }
        Err(_) => {
            tracing::warn!(
                "{} not found: every character counts as its own alphabet (episode difficulty 0)",
                tsv.display()
            );
            None
        }
    };
    let load = |file: &str, split: &str| -> Result<Arc<OmniglotSet>> {
        let mut set = load_npz(&omni, file)?;
        if let Some(text) = &alphabets {
            let rows = alphabets::parse(text, split, set.n_chars()).with_context(|| format!("in {}", tsv.display()))?;
            set = set.with_alphabets(rows)?;
        }
        Ok(Arc::new(set))
    };
    Ok(Datasets {
        omniglot_background: Some(load("images_background.npz", "background")?),
        omniglot_evaluation: Some(load("images_evaluation.npz", "evaluation")?),
        ..Datasets::default()
    })
}

/// Loads an `images` run's folder(s) and logs their classes and fingerprint (workers whose fingerprints
/// differ hold different files and would make different tasks from the same specs).
fn load_images(cfg: &ImagesTaskConfig) -> Result<Datasets> {
    let started = std::time::Instant::now();
    let splits = ImageSplits::load(cfg)
        .with_context(|| format!("cannot load the image folder task.root = {}", cfg.root.display()))?;
    tracing::info!(
        "loaded {} in {:.1}s: {} meta-training classes ({} images, fingerprint {}), {} held-out classes ({} images, fingerprint {})",
        cfg.root.display(),
        started.elapsed().as_secs_f64(),
        splits.train.n_classes(),
        splits.train.n_images(),
        &splits.train.fingerprint()[..16],
        splits.eval.n_classes(),
        splits.eval.n_images(),
        &splits.eval.fingerprint()[..16],
    );
    Ok(Datasets { images: Some(Arc::new(splits)), ..Datasets::default() })
}

fn load_npz(dir: &Path, name: &str) -> Result<OmniglotSet> {
    let path = dir.join(name);
    let started = std::time::Instant::now();
    let bytes = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
    if let Ok(sums) = std::fs::read_to_string(dir.join("SHA256SUMS")) {
        if let Some(expected) = sums.lines().find_map(|l| l.strip_suffix(name).map(|h| h.trim().to_string())) {
            let got = sha256_hex(&bytes);
            if got != expected {
                bail!("{} is corrupt: SHA-256 {got}, SHA256SUMS says {expected}", path.display());
            }
        }
    }
    let set = OmniglotSet::from_npz(std::io::Cursor::new(bytes))
        .with_context(|| format!("cannot load {}", path.display()))?;
    tracing::info!(
        "loaded {} ({} characters) in {:.1}s",
        path.display(),
        set.n_chars(),
        started.elapsed().as_secs_f64()
    );
    Ok(set)
}
