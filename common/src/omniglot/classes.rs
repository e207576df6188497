//! The classes an Omniglot run draws episodes from: a list of characters (one set's, or chosen from both
//! sets for MAML's split) and, with rotation augmentation, each character four times.
//!
//! **Rotations** (MAML's setup): with `rotations`, class `4c + r` is character `c` with every drawing rotated
//! by `r` quarter turns counter-clockwise (0°, 90°, 180°, 270°; the direction of NumPy's `rot90` and
//! TensorFlow's `image.rot90`, which MAML's code uses). A rotation is a pure permutation of the 28×28
//! pixels, so it is exact and four quarter turns give the image back. A rotated class keeps its character's
//! alphabet as its group, so the curriculum's difficulty counts (character, rotation) classes of one
//! alphabet — including two rotations of one character — as alphabet-mates.
//!
//! Without rotations and over one whole set the classes are that set's rows in order, exactly as drawing
//! from the [`OmniglotSet`] itself.

use super::split::{CharRef, SetId};
use super::{OmniglotSet, DRAWERS, SIDE};

/// Rotations per character with rotation augmentation (0°, 90°, 180°, 270°).
pub const ROTATIONS: usize = 4;

/// Appends the `side`×`side` row-major `image` rotated by `quarter_turns` × 90° counter-clockwise (taken
/// mod 4) to `out`: output pixel `(y, x)` is source pixel `(x, side−1−y)` for one quarter turn,
/// `(side−1−y, side−1−x)` for two and `(side−1−x, y)` for three. Panics if `image.len() != side * side` (a
/// caller's bug).
pub fn rotate_into(image: &[f32], side: usize, quarter_turns: usize, out: &mut Vec<f32>) {
    assert_eq!(image.len(), side * side, "rotate_into expects a {side}×{side} image");
    let last = side.saturating_sub(1);
    let turns = quarter_turns % ROTATIONS;
    if turns == 0 {
        out.extend_from_slice(image);
        return;
    }
    out.reserve(image.len());
    for y in 0..side {
        for x in 0..side {
            let (sy, sx) = match turns {
                1 => (x, last - y),
                2 => (last - y, last - x),
                _ => (last - x, y),
            };
            out.push(image[sy * side + sx]);
        }
    }
}

/// The characters classes are made of.
#[derive(Clone, Copy, Debug)]
pub enum Characters<'a> {
    /// Every character of one set, in row order (the standard split: background or evaluation).
    All(&'a OmniglotSet),
    /// The listed characters of the background and evaluation sets (MAML's split).
    Chosen {
        background: &'a OmniglotSet,
        evaluation: &'a OmniglotSet,
        /// Every entry's row must lie in its set ([`super::split::MamlSplit`]'s do).
        chars: &'a [CharRef],
    },
}

/// Episode classes over [`Characters`], optionally rotated (see the module doc).
#[derive(Clone, Copy, Debug)]
pub struct OmniglotClasses<'a> {
    chars: Characters<'a>,
    rotations: bool,
}

impl<'a> OmniglotClasses<'a> {
    pub fn new(chars: Characters<'a>, rotations: bool) -> Self {
        OmniglotClasses { chars, rotations }
    }

    /// Number of characters (classes without rotations).
    pub fn n_chars(&self) -> usize {
        match self.chars {
            Characters::All(set) => set.n_chars(),
            Characters::Chosen { chars, .. } => chars.len(),
        }
    }

    /// Number of classes: characters, times [`ROTATIONS`] with rotations.
    pub fn n_classes(&self) -> usize {
        self.n_chars() * self.per_char()
    }

    fn per_char(&self) -> usize {
        if self.rotations {
            ROTATIONS
        } else {
            1
        }
    }

    /// The character of class `class` (its set, row and the set's id) and the class's quarter turns.
    /// Panics only on an out-of-range class (a caller's bug).
    pub fn character(&self, class: usize) -> (&'a OmniglotSet, CharRef, usize) {
        let (c, turns) = (class / self.per_char(), class % self.per_char());
        match self.chars {
            Characters::All(set) => (set, CharRef { set: SetId::Background, row: c }, turns),
            Characters::Chosen { background, evaluation, chars } => {
                let r = chars[c];
                (if r.set == SetId::Background { background } else { evaluation }, r, turns)
            }
        }
    }

    /// Drawings per class.
    pub fn class_len(&self) -> usize {
        DRAWERS
    }

    /// Appends drawing `drawer` of class `class`, rotated as the class is, to `out`.
    pub fn push_image(&self, class: usize, drawer: usize, out: &mut Vec<f32>) {
        let (set, r, turns) = self.character(class);
        rotate_into(set.image(r.row, drawer), SIDE, turns, out);
    }

    /// The class's group: its character's alphabet, told apart by set when characters come from both
    /// (alphabet numbers restart at 0 in each set, and no alphabet is in both).
    pub fn group_of(&self, class: usize) -> u64 {
        let (set, r, _) = self.character(class);
        let alphabet = u64::from(set.alphabet_of(r.row));
        match (self.chars, r.set) {
            (Characters::Chosen { .. }, SetId::Evaluation) => alphabet | 1 << 32,
            _ => alphabet,
        }
    }

    /// The class's name, for errors: `background row 12`, `evaluation row 3 rotated 90°`.
    pub fn class_name(&self, class: usize) -> String {
        let (_, r, turns) = self.character(class);
        let set = match (self.chars, r.set) {
            (Characters::All(_), _) => "character",
            (_, SetId::Background) => "background character",
            (_, SetId::Evaluation) => "evaluation character",
        };
        let rotated = if self.rotations { format!(" rotated {}°", 90 * turns) } else { String::new() };
        format!("{set} row {}{rotated}", r.row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::omniglot::PIXELS;

    #[test]
    fn a_quarter_turn_of_a_known_image_is_the_hand_computed_one() {
        // 1 2 3        3 6 9
        // 4 5 6   ->   2 5 8   (np.rot90 of the left matrix)
        // 7 8 9        1 4 7
        let img = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0];
        let turn = |t| {
            let mut out = Vec::new();
            rotate_into(&img, 3, t, &mut out);
            out
        };
        assert_eq!(turn(1), [3.0, 6.0, 9.0, 2.0, 5.0, 8.0, 1.0, 4.0, 7.0]);
        assert_eq!(turn(2), [9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]);
        assert_eq!(turn(3), [7.0, 4.0, 1.0, 8.0, 5.0, 2.0, 9.0, 6.0, 3.0]);
        assert_eq!(turn(0), img);
        assert_eq!(turn(5), turn(1));

        // An asymmetric 28×28 "L" in the top-left corner: a vertical bar down column 0 (rows 0..10) and a
        // foot along row 9 (columns 0..6, value 0.5, the corner included). Turned 90° counter-clockwise, the
        // bar lies along the bottom row (row 27, columns 0..10) and the foot rises up column 9 (rows 22..28).
        let mut l = vec![0.0f32; PIXELS];
        for y in 0..10 {
            l[y * SIDE] = 1.0;
        }
        for x in 0..6 {
            l[9 * SIDE + x] = 0.5;
        }
        let mut want = vec![0.0f32; PIXELS];
        for x in 0..10 {
            want[27 * SIDE + x] = 1.0;
        }
        for y in 22..28 {
            want[y * SIDE + 9] = 0.5;
        }
        let mut got = Vec::new();
        rotate_into(&l, SIDE, 1, &mut got);
        assert_eq!(got, want);
    }

    #[test]
    fn rotation_is_a_permutation_and_four_turns_are_the_identity() {
        // Every pixel a distinct value: a permutation keeps the multiset, and the identity comes back.
        let img: Vec<f32> = (0..PIXELS).map(|i| i as f32).collect();
        for t in 0..ROTATIONS {
            let mut once = Vec::new();
            rotate_into(&img, SIDE, t, &mut once);
            let mut sorted = once.clone();
            sorted.sort_by(f32::total_cmp);
            assert_eq!(sorted, img, "{t} quarter turns permute the pixels");
            // t turns then 4 − t turns, and t single turns composed, give the image back / the same result.
            let mut back = Vec::new();
            rotate_into(&once, SIDE, ROTATIONS - t, &mut back);
            assert_eq!(back, img);
            let mut stepwise = img.clone();
            for _ in 0..t {
                let mut next = Vec::new();
                rotate_into(&stepwise, SIDE, 1, &mut next);
                stepwise = next;
            }
            assert_eq!(stepwise, once);
        }
        let mut four = img.clone();
        for _ in 0..4 {
            let mut next = Vec::new();
            rotate_into(&four, SIDE, 1, &mut next);
            assert_ne!(next, four);
            four = next;
        }
        assert_eq!(four, img);
    }

    #[test]
    fn classes_map_to_characters_rotations_and_groups() {
        let set = |n: usize| {
            OmniglotSet::from_images(n, vec![0.0; n * DRAWERS * PIXELS])
                .unwrap()
                .with_alphabets((0..n as u32).map(|c| c / 2).collect())
                .unwrap()
        };
        let (bg, ev) = (set(4), set(3));
        let all = OmniglotClasses::new(Characters::All(&bg), true);
        assert_eq!((all.n_chars(), all.n_classes()), (4, 16));
        assert_eq!(all.character(7).1.row, 1);
        assert_eq!(all.character(7).2, 3);
        assert_eq!(all.group_of(7), 0, "rotations keep the character's alphabet");
        assert_eq!(all.class_name(7), "character row 1 rotated 270°");
        let chars = [CharRef { set: SetId::Background, row: 3 }, CharRef { set: SetId::Evaluation, row: 0 }];
        let chosen =
            OmniglotClasses::new(Characters::Chosen { background: &bg, evaluation: &ev, chars: &chars }, false);
        assert_eq!(chosen.n_classes(), 2);
        assert_eq!((chosen.group_of(0), chosen.group_of(1)), (1, 1 << 32), "alphabet 0 of each set differ");
        assert_eq!(chosen.class_name(1), "evaluation character row 0");
    }
}
