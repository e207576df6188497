//! Omniglot episodes: fingerprints that pin today's default draws bit for bit, and the real data's episodes.

use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};

use super::*;
use crate::omniglot::{alphabets, DRAWERS, PIXELS};

/// The real data's directory: `$METATRAIN_DATA_DIR/omniglot`, else `<checkout>/../shared/data/omniglot`.
fn data_dir() -> std::path::PathBuf {
    match std::env::var_os("METATRAIN_DATA_DIR") {
        Some(d) => std::path::PathBuf::from(d).join("omniglot"),
        None => std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/omniglot")),
    }
}

/// Both real splits with their alphabets, loaded once for all tests; `None` (and the test skips) without the data.
fn real() -> Option<&'static Datasets> {
    static REAL: OnceLock<Option<Datasets>> = OnceLock::new();
    REAL.get_or_init(|| {
        let dir = data_dir();
        let tsv = std::fs::read_to_string(dir.join("alphabets.tsv")).ok()?;
        let load = |file: &str, split: &str| -> Option<Arc<OmniglotSet>> {
            let f = std::fs::File::open(dir.join(file)).ok()?;
            let set = OmniglotSet::from_npz(std::io::BufReader::new(f)).expect("the real .npz loads");
            let rows = alphabets::parse(&tsv, split, set.n_chars()).expect("alphabets.tsv parses");
            Some(Arc::new(set.with_alphabets(rows).expect("one alphabet per row")))
        };
        Some(Datasets {
            omniglot_background: Some(load("images_background.npz", "background")?),
            omniglot_evaluation: Some(load("images_evaluation.npz", "evaluation")?),
            ..Datasets::default()
        })
    })
    .as_ref()
    .or_else(|| {
        println!("SKIPPED: the Omniglot data is not in {}", data_dir().display());
        None
    })
}

/// `n` characters of pseudo-random images in [0, 1] (every image differs), in alphabets of 10.
fn synthetic(n: usize, salt: u64) -> Arc<OmniglotSet> {
    let mut s = 0x9E37_79B9_7F4A_7C15u64 ^ salt;
    let imgs = (0..n * DRAWERS * PIXELS)
        .map(|_| {
            s = s.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    let set = OmniglotSet::from_images(n, imgs).unwrap();
    Arc::new(set.with_alphabets((0..n as u32).map(|c| c / 10).collect()).unwrap())
}

fn synthetic_data() -> Datasets {
    Datasets {
        omniglot_background: Some(synthetic(40, 1)),
        omniglot_evaluation: Some(synthetic(30, 2)),
        ..Datasets::default()
    }
}

/// An omniglot run's config from TOML lines under `[task]` (conv4, everything else default).
pub(super) fn omniglot_config(task: &str) -> Config {
    Config::from_toml(&format!("[task]\ndistribution = \"omniglot\"\n{task}\n[model]\nname = \"conv4\"\n")).unwrap()
}

/// SHA-256 over the episodes of `specs`: every input and label of support and query, and the difficulty.
fn fingerprint(config: &Config, specs: &[TaskSpec], data: &Datasets) -> String {
    let mut h = Sha256::new();
    for spec in specs {
        let t = generate_clean(&config.task, spec, data).unwrap();
        for set in [&t.support, &t.query] {
            for v in &set.x {
                h.update(v.to_le_bytes());
            }
            let Targets::Class(y) = &set.y else { panic!("omniglot targets are classes") };
            for l in y {
                h.update(l.to_le_bytes());
            }
        }
        h.update(t.difficulty.to_bits().to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// Training and held-out specs over a few steps and indices, at full competence and capped at 0 and 0.3.
fn specs(seed: u64) -> Vec<TaskSpec> {
    let mut out = Vec::new();
    for split in [Split::Train, Split::Eval] {
        for step in [0, 1, 7, 1000, FINAL_EVAL_STEP] {
            for index in 0..4 {
                let full = TaskSpec::new(seed, split, step, index);
                out.push(full);
                for c in [0.0, 0.3] {
                    out.push(TaskSpec { competence: Competence::from_fraction(c), ..full });
                }
            }
        }
    }
    out
}

/// Fingerprints of the default draws, computed on the code before the rotation and split options existed:
/// the defaults must keep every episode bit for bit.
const SYNTHETIC_5W1S: &str = "d19b50f765e9fb6856fa825ec6d703fcfa7ff782ae65c6aa8676e27480332ab0";
const SYNTHETIC_20W5S: &str = "e317d1f274659dab6bf701290e47d6bd7332ac1d2e3ab818da8deac0a14582b8";
const REAL_5W1S: &str = "8dfd015ba63af00769372785ac346f66a4e43a94b15c362eebe337b12b8743e3";
const REAL_20W5S: &str = "b02e1a21481b752d15fc34749fd1e64b8f76ce9d2b08204f7bad3dd96bee08c7";

#[test]
fn default_episodes_are_unchanged_bit_for_bit() {
    let data = synthetic_data();
    let five = omniglot_config("");
    let twenty = omniglot_config("n_way = 20\nk_shot = 5\nq_query = 5");
    let got = [fingerprint(&five, &specs(3), &data), fingerprint(&twenty, &specs(4), &data)];
    println!("synthetic 5w1s {}\nsynthetic 20w5s {}", got[0], got[1]);
    let real = real().map(|data| [fingerprint(&five, &specs(0), data), fingerprint(&twenty, &specs(9), data)]);
    if let Some(r) = &real {
        println!("real 5w1s {}\nreal 20w5s {}", r[0], r[1]);
    }
    assert_eq!(got, [SYNTHETIC_5W1S, SYNTHETIC_20W5S]);
    if let Some(r) = real {
        assert_eq!(r, [REAL_5W1S, REAL_20W5S]);
    }
}
