//! MAML's split of Omniglot: both official splits merged (1,623 characters), 1,200 characters for
//! meta-training and the remaining 423 held out.
//!
//! MAML's code shuffles the merged character folders with Python's `random.seed(1)` and takes the first
//! 1,200; that shuffle cannot be reproduced outside CPython. The rule here is a keyed shuffle that anyone can
//! recompute: number the merged characters by their official id (background row `r` is id `r + 1`,
//! evaluation row `r` is id `r + 1 + n_background`, so 1..=1623 on the real data), rank them by the SHA-256
//! digest of the text `"{MAML_SPLIT_KEY}/{id}"`, and take the 1,200 with the smallest digests for
//! meta-training. Both parts are then listed in id order. The key is a fixed constant, not the run seed,
//! so the split is the same for every run, every seed and every machine. In Python:
//!
//! ```text
//! sorted(range(1, 1624), key=lambda i: hashlib.sha256(f"metatrain/omniglot-maml-split/v1/{i}".encode()).digest())[:1200]
//! ```

use std::sync::{Arc, Mutex, PoisonError};

use sha2::{Digest, Sha256};

/// Characters the maml split uses for meta-training, as in MAML's code (`num_train = 1200`).
pub const MAML_TRAIN_CHARACTERS: usize = 1200;
/// Characters in both official splits together (964 background + 659 evaluation).
pub const OMNIGLOT_CHARACTERS: usize = 1623;
/// The key of the maml split's ranking (see the module doc). Changing it changes every maml-split run.
pub const MAML_SPLIT_KEY: &str = "metatrain/omniglot-maml-split/v1";

/// Which of the two loaded `.npz` sets a character is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SetId {
    /// `images_background.npz`.
    Background,
    /// `images_evaluation.npz`.
    Evaluation,
}

/// One character of the merged data: its set and its row there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CharRef {
    pub set: SetId,
    pub row: usize,
}

/// The maml split of sets of `n_background` and `n_evaluation` characters (see the module doc).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MamlSplit {
    /// The sizes it was made for.
    pub sizes: (usize, usize),
    /// Meta-training characters, in id order.
    pub train: Vec<CharRef>,
    /// Held-out characters, in id order.
    pub eval: Vec<CharRef>,
}

impl MamlSplit {
    /// Splits `n_background + n_evaluation` characters: the `min(train, total)` with the smallest keyed
    /// digests are meta-training, the rest held out.
    pub fn with_train(n_background: usize, n_evaluation: usize, train: usize) -> Self {
        let total = n_background.saturating_add(n_evaluation);
        let mut ranked: Vec<([u8; 32], usize)> =
            (0..total).map(|i| (Sha256::digest(format!("{MAML_SPLIT_KEY}/{}", i + 1)).into(), i)).collect();
        ranked.sort_unstable();
        let mut is_train = vec![false; total];
        for &(_, i) in &ranked[..train.min(total)] {
            is_train[i] = true;
        }
        let char_ref = |i: usize| {
            if i < n_background {
                CharRef { set: SetId::Background, row: i }
            } else {
                CharRef { set: SetId::Evaluation, row: i - n_background }
            }
        };
        let (mut train_chars, mut eval_chars) = (Vec::new(), Vec::new());
        for (i, t) in is_train.into_iter().enumerate() {
            if t { &mut train_chars } else { &mut eval_chars }.push(char_ref(i));
        }
        MamlSplit { sizes: (n_background, n_evaluation), train: train_chars, eval: eval_chars }
    }
}

/// The maml split ([`MAML_TRAIN_CHARACTERS`] for meta-training) of sets of these sizes. Computing it costs
/// 1,623 SHA-256 digests, so the last split made is kept and shared (it depends on the sizes alone).
pub fn maml_split(n_background: usize, n_evaluation: usize) -> Arc<MamlSplit> {
    static LAST: Mutex<Option<Arc<MamlSplit>>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(split) = last.as_ref().filter(|s| s.sizes == (n_background, n_evaluation)) {
        return split.clone();
    }
    let split = Arc::new(MamlSplit::with_train(n_background, n_evaluation, MAML_TRAIN_CHARACTERS));
    *last = Some(split.clone());
    split
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maml_split_is_1200_and_423_disjoint_covering_and_fixed() {
        let s = maml_split(964, 659);
        assert_eq!((s.train.len(), s.eval.len()), (1200, 423));
        let mut all: Vec<CharRef> = s.train.iter().chain(&s.eval).copied().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), OMNIGLOT_CHARACTERS, "disjoint and covering all 1,623 characters");
        assert_eq!(all.iter().filter(|c| c.set == SetId::Background).count(), 964);
        assert!(all.iter().all(|c| c.row < if c.set == SetId::Background { 964 } else { 659 }));
        // The same on every call, computed afresh or not (and it takes no seed at all).
        assert_eq!(*s, MamlSplit::with_train(964, 659, MAML_TRAIN_CHARACTERS));
        assert!(Arc::ptr_eq(&s, &maml_split(964, 659)));
        let id = |c: &CharRef| c.row + 1 + if c.set == SetId::Evaluation { 964 } else { 0 };
        let held: Vec<usize> = s.eval.iter().map(id).collect();
        let from_bg = s.train.iter().filter(|c| c.set == SetId::Background).count();
        println!(
            "maml split: 1200 meta-training ({from_bg} background, {} evaluation), 423 held out: ids {:?} .. {:?}",
            1200 - from_bg,
            &held[..8],
            &held[415..]
        );
        // The rule recomputed independently with the module doc's Python line: the held-out ids and how many
        // meta-training characters come from the background set (both official splits feed both sides).
        assert_eq!(&held[..8], [12, 20, 24, 29, 30, 32, 35, 45]);
        assert_eq!(&held[415..], [1598, 1599, 1600, 1606, 1607, 1616, 1618, 1620]);
        assert_eq!(held.iter().sum::<usize>(), 362_106);
        assert_eq!(from_bg, 728);
    }

    #[test]
    fn small_sets_split_too() {
        let s = MamlSplit::with_train(3, 2, 4);
        assert_eq!((s.train.len(), s.eval.len()), (4, 1));
        let s = MamlSplit::with_train(3, 2, 10);
        assert_eq!((s.train.len(), s.eval.len()), (5, 0));
        assert_eq!(MamlSplit::with_train(0, 0, 1200).train, vec![]);
    }
}
