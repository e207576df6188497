//! N-way K-shot episodes over any set of image classes: Omniglot's characters or an image folder's classes.
//!
//! An episode draws N distinct classes, then for each K + Q distinct images (K support, Q query), every draw
//! from the spec's episode stream. Labels are the classes' positions in the draw, so they carry no
//! information across tasks. The difficulty is the share of the episode's classes that have a group-mate in
//! it (Omniglot: the alphabet; a folder: the parent directory), and a spec's competence caps it by rejection.
//!
//! Omniglot episodes draw from an [`OmniglotClasses`] (the run's characters, possibly rotated); drawing from
//! an [`OmniglotSet`] directly is the same as from all its characters without rotations.

use super::{Examples, Split, Targets, TaskData, TaskError, TaskSpec, OMNIGLOT_DRAWS, PURPOSE_EPISODE};
use crate::images::ImageFolder;
use crate::omniglot::classes::OmniglotClasses;
use crate::omniglot::{OmniglotSet, DRAWERS, PIXELS, SIDE};
use crate::rng::choose_distinct;

/// Classes of 28×28 images that episodes are drawn from.
pub trait EpisodeSource {
    /// Number of classes.
    fn n_classes(&self) -> usize;
    /// Images in class `class` (< `n_classes()`).
    fn class_len(&self, class: usize) -> usize;
    /// Appends image `index` (< `class_len(class)`) of class `class`, [`PIXELS`] values, to `out`.
    fn push_image(&self, class: usize, index: usize, out: &mut Vec<f32>);
    /// The class's group: classes of one group look alike (Omniglot's alphabets).
    fn group_of(&self, class: usize) -> u64;
    /// The class's name, for errors.
    fn class_name(&self, class: usize) -> String;
}

impl EpisodeSource for OmniglotSet {
    fn n_classes(&self) -> usize {
        self.n_chars()
    }
    fn class_len(&self, _class: usize) -> usize {
        DRAWERS
    }
    fn push_image(&self, class: usize, index: usize, out: &mut Vec<f32>) {
        out.extend_from_slice(self.image(class, index));
    }
    fn group_of(&self, class: usize) -> u64 {
        u64::from(self.alphabet_of(class))
    }
    fn class_name(&self, class: usize) -> String {
        format!("character row {class}")
    }
}

impl EpisodeSource for OmniglotClasses<'_> {
    fn n_classes(&self) -> usize {
        OmniglotClasses::n_classes(self)
    }
    fn class_len(&self, _class: usize) -> usize {
        OmniglotClasses::class_len(self)
    }
    fn push_image(&self, class: usize, index: usize, out: &mut Vec<f32>) {
        OmniglotClasses::push_image(self, class, index, out)
    }
    fn group_of(&self, class: usize) -> u64 {
        OmniglotClasses::group_of(self, class)
    }
    fn class_name(&self, class: usize) -> String {
        OmniglotClasses::class_name(self, class)
    }
}

impl EpisodeSource for ImageFolder {
    fn n_classes(&self) -> usize {
        ImageFolder::n_classes(self)
    }
    fn class_len(&self, class: usize) -> usize {
        self.images(class).len()
    }
    fn push_image(&self, class: usize, index: usize, out: &mut Vec<f32>) {
        out.extend_from_slice(&self.images(class)[index]);
    }
    fn group_of(&self, class: usize) -> u64 {
        u64::from(ImageFolder::group_of(self, class))
    }
    fn class_name(&self, class: usize) -> String {
        self.classes().get(class).cloned().unwrap_or_default()
    }
}

/// An episode's shape: N classes, K support and Q query images per class.
#[derive(Clone, Copy, Debug)]
pub struct EpisodeShape {
    pub n_way: usize,
    pub k_shot: usize,
    pub q_query: usize,
}

/// The episode of `spec` drawn from `set` (see the module doc).
pub fn episode<S: EpisodeSource + ?Sized>(
    shape: EpisodeShape,
    spec: &TaskSpec,
    set: &S,
) -> Result<TaskData, TaskError> {
    if set.n_classes() < shape.n_way {
        return Err(TaskError::TooFewClasses { split: spec.split, have: set.n_classes(), need: shape.n_way });
    }
    let per_class = shape.k_shot.saturating_add(shape.q_query);
    let (classes, difficulty, mut rng) = episode_classes(shape.n_way, spec, set);
    let mut support = (Vec::new(), Vec::new());
    let mut query = (Vec::new(), Vec::new());
    for (label, &class) in classes.iter().enumerate() {
        let have = set.class_len(class);
        if have < per_class {
            return Err(too_small(spec.split, set.class_name(class), have, per_class));
        }
        let picks = choose_distinct(&mut rng, have, per_class);
        for (j, &i) in picks.iter().enumerate() {
            let dst = if j < shape.k_shot { &mut support } else { &mut query };
            set.push_image(class, i, &mut dst.0);
            dst.1.push(label as i64);
        }
    }
    // Order within a set is class-major; it changes no loss or gradient (both are means over examples).
    let feature_shape = vec![1, SIDE, SIDE];
    debug_assert_eq!(support.0.len(), support.1.len() * PIXELS);
    Ok(TaskData {
        support: Examples { x: support.0, feature_shape: feature_shape.clone(), y: Targets::Class(support.1) },
        query: Examples { x: query.0, feature_shape, y: Targets::Class(query.1) },
        difficulty,
    })
}

fn too_small(split: Split, class: String, have: usize, need: usize) -> TaskError {
    TaskError::ClassTooSmall { split, class, have, need }
}

/// The episode's classes, its difficulty, and the stream to draw its images from: the first draw within the
/// spec's competence, else the least difficult of [`OMNIGLOT_DRAWS`].
fn episode_classes<S: EpisodeSource + ?Sized>(
    n_way: usize,
    spec: &TaskSpec,
    set: &S,
) -> (Vec<usize>, f64, rand_chacha::ChaCha8Rng) {
    let cap = spec.competence.fraction();
    let mut best: Option<(Vec<usize>, f64, rand_chacha::ChaCha8Rng)> = None;
    for attempt in 0..OMNIGLOT_DRAWS {
        let mut rng = spec.rng_attempt(PURPOSE_EPISODE, attempt);
        let classes = choose_distinct(&mut rng, set.n_classes(), n_way);
        let d = episode_difficulty(&classes, set);
        if d <= cap {
            return (classes, d, rng);
        }
        if best.as_ref().is_none_or(|b| d < b.1) {
            best = Some((classes, d, rng));
        }
    }
    best.unwrap_or_else(|| (Vec::new(), 0.0, spec.rng(PURPOSE_EPISODE)))
}

/// (N − distinct groups) / (N − 1) of an episode's classes: 0 when all groups differ, 1 when all share one.
/// An episode of one class has difficulty 0.
pub fn episode_difficulty<S: EpisodeSource + ?Sized>(classes: &[usize], set: &S) -> f64 {
    if classes.len() < 2 {
        return 0.0;
    }
    let groups: std::collections::BTreeSet<u64> = classes.iter().map(|&c| set.group_of(c)).collect();
    (classes.len() - groups.len()) as f64 / (classes.len() - 1) as f64
}
