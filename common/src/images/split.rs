//! Meta-training and held-out classes: two disjoint [`ImageFolder`]s for a task config.

use std::path::Path;

use sha2::{Digest, Sha256};

use super::{ImageFolder, ImagesError};
use crate::config::ImagesTaskConfig;

/// The classes of an `images` run: episodes of meta-training tasks draw from `train`, held-out (evaluation)
/// tasks from `eval`. No class is in both.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageSplits {
    pub train: ImageFolder,
    pub eval: ImageFolder,
}

impl ImageSplits {
    /// Loads `cfg.root` (and `cfg.eval_root` if given), splits it when there is no `eval_root`, and checks
    /// that each split has at least `n_way` classes and every class at least `k_shot + q_query` images.
    pub fn load(cfg: &ImagesTaskConfig) -> Result<Self, ImagesError> {
        let (train, eval) = match &cfg.eval_root {
            Some(eval_root) => {
                check_apart(&cfg.root, eval_root)?;
                let train = ImageFolder::load(&cfg.root, cfg.invert)?;
                let eval = ImageFolder::load(eval_root, cfg.invert)?;
                if let Some(class) = train.classes().iter().find(|c| eval.classes().binary_search(c).is_ok()) {
                    return Err(ImagesError::SharedClass {
                        class: class.clone(),
                        root: cfg.root.clone(),
                        eval_root: eval_root.clone(),
                    });
                }
                (train, eval)
            }
            None => ImageFolder::load(&cfg.root, cfg.invert)?.split_by_name(cfg.eval_fraction())?,
        };
        let splits = ImageSplits { train, eval };
        splits.check(cfg.n_way, cfg.k_shot, cfg.q_query)?;
        Ok(splits)
    }

    /// Checks that each split can make `n_way`-way episodes of `k_shot + q_query` images per class.
    pub fn check(&self, n_way: usize, k_shot: usize, q_query: usize) -> Result<(), ImagesError> {
        for (split, folder) in [("meta-training", &self.train), ("held-out", &self.eval)] {
            if folder.n_classes() < n_way {
                return Err(ImagesError::TooFewClasses {
                    split,
                    root: folder.root().to_path_buf(),
                    have: folder.n_classes(),
                    need: n_way,
                });
            }
            let need = k_shot.saturating_add(q_query);
            for (c, class) in folder.classes().iter().enumerate() {
                let have = folder.images(c).len();
                if have < need {
                    return Err(ImagesError::TooFewImages {
                        class: class.clone(),
                        root: folder.root().to_path_buf(),
                        have,
                        k_shot,
                        q_query,
                    });
                }
            }
        }
        Ok(())
    }
}

impl ImageFolder {
    /// Splits the classes into (meta-training, held-out): the `round(fraction × n)` classes (at least one,
    /// and at least one left for training) whose names have the smallest SHA-256 digests are held out. The
    /// rule looks at names only, so it is the same on every machine and for every run seed, holds out
    /// classes from across the folder rather than its last ones in name order, and moves few classes when
    /// classes are added. Both parts keep name order. `fraction` must lie in (0, 1) and the folder must have
    /// at least two classes.
    pub fn split_by_name(self, fraction: f64) -> Result<(ImageFolder, ImageFolder), ImagesError> {
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(ImagesError::InvalidFraction { fraction });
        }
        let n = self.n_classes();
        if n < 2 {
            return Err(ImagesError::TooFewClasses { split: "whole", root: self.root.clone(), have: n, need: 2 });
        }
        let n_eval = ((fraction * n as f64).round() as usize).clamp(1, n - 1);
        let mut by_digest: Vec<([u8; 32], usize)> =
            self.classes().iter().enumerate().map(|(c, name)| (Sha256::digest(name.as_bytes()).into(), c)).collect();
        by_digest.sort();
        let mut held_out = vec![false; n];
        for &(_, c) in &by_digest[..n_eval] {
            held_out[c] = true;
        }
        Ok(self.partition(&held_out))
    }
}

/// Refuses an `eval_root` that is `root`, or lies inside it, or holds it.
fn check_apart(root: &Path, eval_root: &Path) -> Result<(), ImagesError> {
    let canonical = |p: &Path| {
        std::fs::canonicalize(p).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ImagesError::RootMissing { path: p.to_path_buf() },
            _ => ImagesError::Unreadable { path: p.to_path_buf(), reason: e.to_string() },
        })
    };
    let (a, b) = (canonical(root)?, canonical(eval_root)?);
    if a.starts_with(&b) || b.starts_with(&a) {
        return Err(ImagesError::RootsOverlap { root: root.to_path_buf(), eval_root: eval_root.to_path_buf() });
    }
    Ok(())
}
