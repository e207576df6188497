//! Atomic save and load of everything that determines the rest of a run.
//!
//! A checkpoint holds the config (so a resumed run can refuse an incompatible one), the number of
//! completed meta-steps, the parameters, Adam's moments and step count, and the sampler's state. The
//! sampler and every task draw are keyed by (seed, split, step, index), so `(seed, step)` *is* the whole
//! random state: no generator state needs saving, and the record says so explicitly. Besides it, the
//! curriculum's state (an adaptive schedule's competence and best held-out loss) and the defence's
//! sliding window are saved, as f64 bits, so that a resumed run draws and scores exactly as before.
//!
//! File layout (`<out>/checkpoints/step-<NNNNNNNNNN>.ckpt`):
//! `magic "MTCKPT01" | header_len u32 LE | header (JSON) | params | adam_m | adam_v (f32 LE) | SHA-256 of all before`.
//! Written to a temporary file, fsynced, renamed into place, and the directory fsynced, so a crash leaves
//! either the old or the new checkpoint, never half of one. The newest `keep` are kept. On load the
//! checksum, lengths and finiteness are verified; a damaged newest checkpoint falls back to the previous.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use metatrain_common::layout::{params_sha256, sha256_hex};
use metatrain_common::tensor::{decode_f32, encode_f32, Dtype};
use serde::{Deserialize, Serialize};
use thiserror::Error;

const MAGIC: &[u8; 8] = b"MTCKPT01";
/// Bumped when the header or layout changes incompatibly.
const FORMAT: u32 = 1;
/// A header is a config plus a few numbers; anything larger is not ours.
const MAX_HEADER: usize = 1 << 20;

#[derive(Debug, Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}: not a metatrain checkpoint")]
    BadMagic(PathBuf),
    #[error("{path}: damaged ({why})")]
    Damaged { path: PathBuf, why: String },
    #[error("{path}: checkpoint format {got}, this build reads {FORMAT}")]
    Format { path: PathBuf, got: u32 },
    #[error("no checkpoint in {0}")]
    None(PathBuf),
}

/// How tasks are drawn; `Keyed` means (seed, step) determines every draw.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum SamplerState {
    Keyed { seed: u64, next_step: u64 },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: u32,
    pub config_toml: String,
    /// SHA-256 of `config_toml` (a quick identity for tools; compatibility is checked key by key).
    pub config_sha256: String,
    /// Completed meta-steps (= the parameters' version).
    pub step: u64,
    pub layout_fingerprint: String,
    pub numel: u64,
    pub adam_t: u64,
    pub sampler: SamplerState,
    pub params_sha256: String,
    /// Counters carried into the resumed run's report.
    pub tasks_completed: u64,
    pub tasks_reassigned: u64,
    pub results_rejected: u64,
    pub next_task: u64,
    /// The curriculum's state (absent in checkpoints of runs from before curricula: then none).
    #[serde(default)]
    pub curriculum: Option<crate::curriculum::CurriculumState>,
    /// The defence's sliding window of recent tasks.
    #[serde(default)]
    pub defence_window: Option<crate::defence::WindowState>,
    #[serde(default)]
    pub defence_counts: crate::run::DefenceCounts,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub header: Header,
    pub params: Vec<f32>,
    pub adam_m: Vec<f32>,
    pub adam_v: Vec<f32>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io { path: path.to_path_buf(), source }
}

/// `<out>/checkpoints`.
pub fn dir_of(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn file_name(step: u64) -> String {
    format!("step-{step:010}.ckpt")
}

/// Encodes a checkpoint into bytes (see the module doc for the layout).
pub fn encode(c: &Checkpoint) -> Vec<u8> {
    let header = serde_json::to_vec(&c.header).unwrap_or_default();
    let mut out = Vec::with_capacity(16 + header.len() + 12 * c.params.len() + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    for v in [&c.params, &c.adam_m, &c.adam_v] {
        out.extend_from_slice(&encode_f32(v));
    }
    let digest = hex::decode(sha256_hex(&out)).unwrap_or_default();
    out.extend_from_slice(&digest);
    out
}

/// Decodes and verifies checkpoint bytes.
pub fn decode(bytes: &[u8], path: &Path) -> Result<Checkpoint, CheckpointError> {
    let damaged = |why: &str| CheckpointError::Damaged { path: path.to_path_buf(), why: why.to_string() };
    if bytes.len() < MAGIC.len() + 4 + 32 || &bytes[..8] != MAGIC {
        return Err(CheckpointError::BadMagic(path.to_path_buf()));
    }
    let (body, digest) = bytes.split_at(bytes.len() - 32);
    if hex::encode(digest) != sha256_hex(body) {
        return Err(damaged("checksum mismatch"));
    }
    let header_len = u32::from_le_bytes([body[8], body[9], body[10], body[11]]) as usize;
    if header_len > MAX_HEADER || 12 + header_len > body.len() {
        return Err(damaged("header length out of range"));
    }
    let header: Header = serde_json::from_slice(&body[12..12 + header_len]).map_err(|e| damaged(&e.to_string()))?;
    if header.format != FORMAT {
        return Err(CheckpointError::Format { path: path.to_path_buf(), got: header.format });
    }
    let n = header.numel as usize;
    let tensors = &body[12 + header_len..];
    if tensors.len() as u64 != 12 * header.numel {
        return Err(damaged("tensor bytes do not match the parameter count"));
    }
    let part =
        |i: usize| decode_f32(&tensors[4 * n * i..4 * n * (i + 1)], Dtype::F32, n).map_err(|e| damaged(&e.to_string()));
    let c = Checkpoint { params: part(0)?, adam_m: part(1)?, adam_v: part(2)?, header };
    if sha256_hex(c.header.config_toml.as_bytes()) != c.header.config_sha256 {
        return Err(damaged("config does not match its recorded hash"));
    }
    if params_sha256(&c.params) != c.header.params_sha256 {
        return Err(damaged("parameters do not match their recorded hash"));
    }
    Ok(c)
}

/// Writes `c` atomically into `<out>/checkpoints` and deletes all but the newest `keep`.
pub fn save(out: &Path, c: &Checkpoint, keep: usize) -> Result<PathBuf, CheckpointError> {
    let dir = dir_of(out);
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = dir.join(file_name(c.header.step));
    let tmp = dir.join(format!(".{}.tmp", file_name(c.header.step)));
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&encode(c)).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io(&dir))?;
    let mut all = list(&dir)?;
    while all.len() > keep.max(1) {
        let old = all.remove(0);
        let _ = std::fs::remove_file(&old);
    }
    Ok(path)
}

/// Checkpoint files in `dir`, oldest first.
fn list(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("step-") && n.ends_with(".ckpt"))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Whether `out` holds at least one checkpoint file (a run killed while writing its first one holds
/// only a temporary file, and counts as not started).
pub fn exists(out: &Path) -> bool {
    list(&dir_of(out)).is_ok_and(|v| !v.is_empty())
}

/// The newest valid checkpoint of the run in `out`; damaged or unreadable newer ones are skipped with a
/// warning.
pub fn load_latest(out: &Path) -> Result<(Checkpoint, PathBuf), CheckpointError> {
    let dir = dir_of(out);
    if !dir.is_dir() {
        return Err(CheckpointError::None(dir));
    }
    let mut last_err = None;
    for path in list(&dir)?.into_iter().rev() {
        let decoded = std::fs::read(&path).map_err(io(&path)).and_then(|bytes| decode(&bytes, &path));
        match decoded {
            Ok(c) => return Ok((c, path)),
            Err(e) => {
                tracing::warn!("skipping checkpoint: {e}");
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or(CheckpointError::None(dir)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(step: u64) -> Checkpoint {
        let params = vec![0.5f32, -1.25, 3.0];
        Checkpoint {
            header: Header {
                format: FORMAT,
                config_toml: "seed = 1\n".into(),
                config_sha256: sha256_hex(b"seed = 1\n"),
                step,
                layout_fingerprint: "ab".into(),
                numel: 3,
                adam_t: step,
                sampler: SamplerState::Keyed { seed: 1, next_step: step },
                params_sha256: params_sha256(&params),
                tasks_completed: 7,
                tasks_reassigned: 1,
                results_rejected: 2,
                next_task: 70,
                curriculum: Some(crate::curriculum::CurriculumState {
                    competence_bits: 0.4f64.to_bits(),
                    best_loss_bits: 0.123456789f64.to_bits(),
                    evals_without_improvement: 1,
                }),
                defence_window: Some(crate::defence::WindowState {
                    log_pre_bits: vec![0.5f64.to_bits(), 2.5f64.to_bits()],
                    log_loss_bits: vec![(-0.1f64).to_bits(), std::f64::consts::PI.to_bits()],
                    log_norm_bits: vec![1.5f64.to_bits(), 1e-300f64.to_bits()],
                }),
                defence_counts: crate::run::DefenceCounts {
                    tasks_corrupted: 3,
                    tasks_quarantined: 2,
                    quarantined_corrupted: 2,
                    steps_skipped: 0,
                    by_kind: [
                        crate::run::KindCounts { corrupted: 3, quarantined: 2 },
                        Default::default(),
                        Default::default(),
                    ],
                },
            },
            params,
            adam_m: vec![0.1, 0.2, 0.3],
            adam_v: vec![0.01, 0.02, 0.03],
        }
    }

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let c = sample(5);
        let bytes = encode(&c);
        let p = Path::new("x");
        assert_eq!(decode(&bytes, p).unwrap(), c);
        for i in (0..bytes.len()).step_by(7) {
            let mut b = bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b, p).is_err(), "flipped byte {i} went unnoticed");
        }
        for cut in [0, 10, bytes.len() / 2, bytes.len() - 1] {
            assert!(decode(&bytes[..cut], p).is_err());
        }
    }

    #[test]
    fn save_keeps_the_newest_and_load_skips_a_damaged_one() {
        let out = std::env::temp_dir().join(format!("metatrain-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        for s in [10, 20, 30, 40] {
            save(&out, &sample(s), 2).unwrap();
        }
        let names: Vec<_> = list(&dir_of(&out)).unwrap();
        assert_eq!(names.len(), 2);
        let (c, _) = load_latest(&out).unwrap();
        assert_eq!(c.header.step, 40);
        // Damage the newest: the previous one is used.
        let newest = dir_of(&out).join(file_name(40));
        let mut b = std::fs::read(&newest).unwrap();
        let mid = b.len() / 2;
        b[mid] ^= 1;
        std::fs::write(&newest, b).unwrap();
        assert_eq!(load_latest(&out).unwrap().0.header.step, 30);
        let _ = std::fs::remove_dir_all(&out);
    }
}
