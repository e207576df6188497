//! Omniglot episodes: fingerprints that pin today's default draws bit for bit, and the real data's episodes.

use std::sync::{Arc, OnceLock};

use sha2::{Digest, Sha256};

use super::*;
use crate::omniglot::{alphabets, DRAWERS, PIXELS};

/// Both real splits with their alphabets, loaded once for all tests; `None` (and the test skips) without the data.
fn real() -> Option<&'static Datasets> {
    static REAL: OnceLock<Option<Datasets>> = OnceLock::new();
    REAL.get_or_init(|| {
        let tsv = std::fs::read_to_string(crate::datadir::omniglot_file_for_tests("alphabets.tsv")?).ok()?;
        let load = |file: &str, split: &str| -> Option<Arc<OmniglotSet>> {
            let f = std::fs::File::open(crate::datadir::omniglot_file_for_tests(file)?).ok()?;
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
        println!("SKIPPED: the Omniglot data was not found");
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

// --- rotations, the maml split and N-way K-shot shapes ------------------------------------------------------

use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};

use crate::omniglot::classes::{rotate_into, ROTATIONS};
use crate::omniglot::split::{maml_split, CharRef, SetId};
use crate::omniglot::SIDE;

/// Checks an episode's shapes and labels: N·K support and N·Q query 28×28 images, labels `0..N`, each K
/// (support) and Q (query) times.
fn check_shape(t: &TaskData, n: usize, k: usize, q: usize) {
    for (set, per) in [(&t.support, k), (&t.query, q)] {
        assert_eq!(set.feature_shape, [1, SIDE, SIDE]);
        assert_eq!(set.x.len(), n * per * PIXELS);
        let Targets::Class(y) = &set.y else { panic!("class targets") };
        assert_eq!(y.len(), n * per);
        for label in 0..n as i64 {
            assert_eq!(y.iter().filter(|&&l| l == label).count(), per, "label {label}");
        }
    }
}

/// Synthetic characters whose only non-zero pixel, at (0, 1), encodes (character, drawer): a quarter turn
/// moves it to (26, 0), two to (27, 26), three to (1, 27), so every image tells its class and rotation.
fn marked(n: usize) -> Arc<OmniglotSet> {
    let mut imgs = vec![0.0f32; n * DRAWERS * PIXELS];
    for c in 0..n {
        for d in 0..DRAWERS {
            imgs[(c * DRAWERS + d) * PIXELS + 1] = (c * DRAWERS + d + 1) as f32 / 65_536.0;
        }
    }
    Arc::new(
        OmniglotSet::from_images(n, imgs).unwrap().with_alphabets((0..n as u32).map(|c| c / 10).collect()).unwrap(),
    )
}

/// (character, drawer, quarter turns) of an image of [`marked`].
fn read_mark(img: &[f32]) -> (usize, usize, usize) {
    let spots = [(0, 1), (26, 0), (27, 26), (1, 27)];
    let nonzero: Vec<usize> = (0..PIXELS).filter(|&i| img[i] != 0.0).collect();
    assert_eq!(nonzero.len(), 1, "one marked pixel");
    let turns = spots.iter().position(|&(y, x)| y * SIDE + x == nonzero[0]).expect("a marker position");
    let code = (img[nonzero[0]] * 65_536.0).round() as usize - 1;
    (code / DRAWERS, code % DRAWERS, turns)
}

/// Each label's images as (character, drawer, turns), from an episode of [`marked`] sets.
fn marks_by_label(t: &TaskData) -> HashMap<i64, Vec<(usize, usize, usize)>> {
    let mut out: HashMap<i64, Vec<_>> = HashMap::new();
    for set in [&t.support, &t.query] {
        let Targets::Class(y) = &set.y else { panic!() };
        for (img, &l) in set.x.chunks_exact(PIXELS).zip(y) {
            out.entry(l).or_default().push(read_mark(img));
        }
    }
    out
}

#[test]
fn rotated_classes_are_distinct_character_rotation_pairs_sharing_their_rotation() {
    let data = Datasets {
        omniglot_background: Some(marked(40)),
        omniglot_evaluation: Some(marked(30)),
        ..Datasets::default()
    };
    let config = omniglot_config("rotations = true\nn_way = 20\nk_shot = 5\nq_query = 15");
    let (mut turns_seen, mut same_char_twice) = (BTreeSet::new(), 0);
    for spec in specs(5) {
        let t = generate_clean(&config.task, &spec, &data).unwrap();
        check_shape(&t, 20, 5, 15);
        let mut pairs = BTreeSet::new();
        for (label, images) in marks_by_label(&t) {
            let (c, _, r) = images[0];
            assert!(images.iter().all(|&(ci, _, ri)| (ci, ri) == (c, r)), "label {label}: one character, one rotation");
            let drawers: BTreeSet<usize> = images.iter().map(|m| m.1).collect();
            assert_eq!(drawers.len(), 20, "20 distinct drawings per class");
            assert!(pairs.insert((c, r)), "classes are distinct (character, rotation) pairs");
            turns_seen.insert(r);
        }
        let chars: BTreeSet<usize> = pairs.iter().map(|p| p.0).collect();
        same_char_twice += usize::from(chars.len() < pairs.len());
        // The rotated image is exactly the stored drawing turned.
        let (c, d, r) = read_mark(&t.support.x[..PIXELS]);
        let set = if spec.split == Split::Train { &data.omniglot_background } else { &data.omniglot_evaluation };
        let mut want = Vec::new();
        rotate_into(set.as_ref().unwrap().image(c, d), SIDE, r, &mut want);
        assert_eq!(&t.support.x[..PIXELS], want);
    }
    assert_eq!(turns_seen.len(), ROTATIONS, "all four rotations are drawn");
    println!("{same_char_twice} of {} episodes hold two rotations of one character", specs(5).len());
    assert!(same_char_twice > 0, "two rotations of one character are two classes");
}

#[test]
fn twenty_way_one_and_five_shot_episodes_have_their_shapes_and_labels() {
    let data = synthetic_data();
    for (task, k, q) in [
        ("n_way = 20\nk_shot = 1\nq_query = 19", 1, 19),
        ("n_way = 20\nk_shot = 5\nq_query = 15", 5, 15),
        ("n_way = 20\nk_shot = 1\nq_query = 5\nrotations = true", 1, 5),
        ("n_way = 20\nk_shot = 5\nq_query = 5\nrotations = true", 5, 5),
    ] {
        let config = omniglot_config(task);
        for spec in specs(2).iter().step_by(7) {
            let t = generate_clean(&config.task, spec, &data).unwrap();
            check_shape(&t, 20, k, q);
            // Class-major order: the first K support images are label 0.
            let Targets::Class(y) = &t.support.y else { panic!() };
            assert!(y[..k].iter().all(|&l| l == 0) && y[k * 19..].iter().all(|&l| l == 19));
        }
    }
    // The standard synthetic sets hold 40 and 30 characters: 31-way held-out episodes only exist rotated.
    let too_many = omniglot_config("n_way = 31");
    let eval = TaskSpec::new(0, Split::Eval, 0, 0);
    assert!(matches!(
        generate_clean(&too_many.task, &eval, &data),
        Err(TaskError::TooFewClasses { have: 30, need: 31, .. })
    ));
    let rotated = omniglot_config("n_way = 31\nrotations = true");
    check_shape(&generate_clean(&rotated.task, &eval, &data).unwrap(), 31, 1, 15);
}

#[test]
fn missing_sets_and_unknown_splits_are_errors_not_panics() {
    let config = omniglot_config("split = \"maml\"");
    let only_bg = Datasets { omniglot_background: Some(synthetic(40, 1)), ..Datasets::default() };
    let spec = TaskSpec::new(0, Split::Train, 0, 0);
    assert!(matches!(generate_clean(&config.task, &spec, &only_bg), Err(TaskError::MissingDataset(Split::Eval))));
    // Synthetic sets smaller than 1,200 characters leave the maml split nothing to hold out.
    let e = generate_clean(&config.task, &TaskSpec::new(0, Split::Eval, 0, 0), &synthetic_data()).unwrap_err();
    assert!(matches!(e, TaskError::TooFewClasses { have: 0, need: 5, .. }), "{e}");
    let bad = OmniglotTaskConfig { split: "mini".into(), ..OmniglotTaskConfig::default() };
    let e = generate_clean(&TaskConfig::Omniglot(bad), &spec, &synthetic_data()).unwrap_err();
    assert!(matches!(e, TaskError::UnknownOmniglotSplit(_)), "{e}");
}

/// Every real image (by a hash of its pixels) → the (character, drawer)s it is: identifies an episode's
/// images, un-rotating them first.
struct Lookup(HashMap<u64, Vec<(CharRef, usize)>>);

fn pixels_hash(img: &[f32]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for v in img {
        v.to_bits().hash(&mut h);
    }
    h.finish()
}

impl Lookup {
    fn of(data: &Datasets) -> Self {
        let mut map: HashMap<u64, Vec<(CharRef, usize)>> = HashMap::new();
        for (set, id) in
            [(&data.omniglot_background, SetId::Background), (&data.omniglot_evaluation, SetId::Evaluation)]
        {
            let set = set.as_ref().unwrap();
            for row in 0..set.n_chars() {
                for d in 0..DRAWERS {
                    map.entry(pixels_hash(set.image(row, d))).or_default().push((CharRef { set: id, row }, d));
                }
            }
        }
        Lookup(map)
    }

    /// Every (character, drawer, turns) the image could be.
    fn identify(&self, data: &Datasets, img: &[f32]) -> Vec<(CharRef, usize, usize)> {
        let mut out = Vec::new();
        for turns in 0..ROTATIONS {
            let mut back = Vec::new();
            rotate_into(img, SIDE, (ROTATIONS - turns) % ROTATIONS, &mut back);
            for &(c, d) in self.0.get(&pixels_hash(&back)).into_iter().flatten() {
                let set =
                    if c.set == SetId::Background { &data.omniglot_background } else { &data.omniglot_evaluation };
                if set.as_ref().unwrap().image(c.row, d) == &back[..] {
                    out.push((c, d, turns));
                }
            }
        }
        out
    }
}

#[test]
fn real_maml_split_with_rotations_draws_its_sides_characters_and_keeps_alphabets() {
    let Some(data) = real() else { return };
    let lookup = Lookup::of(data);
    let split = maml_split(964, 659);
    let alphabet = |c: CharRef| {
        let set = if c.set == SetId::Background { &data.omniglot_background } else { &data.omniglot_evaluation };
        (c.set, set.as_ref().unwrap().alphabet_of(c.row))
    };
    for (task, n, k, q) in [
        ("n_way = 5\nk_shot = 1\nq_query = 15", 5, 1, 15),
        ("n_way = 20\nk_shot = 1\nq_query = 5", 20, 1, 5),
        ("n_way = 20\nk_shot = 5\nq_query = 5", 20, 5, 5),
    ] {
        let config = omniglot_config(&format!("{task}\nsplit = \"maml\"\nrotations = true"));
        let (mut from_eval_set, mut episodes) = (0, 0);
        for seed in [0, 1] {
            for spec in specs(seed).iter().step_by(5) {
                let t = generate_clean(&config.task, spec, data).unwrap();
                check_shape(&t, n, k, q);
                let side = if spec.split == Split::Train { &split.train } else { &split.eval };
                // Each label: the (character, rotation) pairs all of its images can be; exactly one is left.
                let mut class_of: HashMap<i64, BTreeSet<(CharRef, usize)>> = HashMap::new();
                for set in [&t.support, &t.query] {
                    let Targets::Class(y) = &set.y else { panic!() };
                    for (img, &l) in set.x.chunks_exact(PIXELS).zip(y) {
                        let could: BTreeSet<(CharRef, usize)> =
                            lookup.identify(data, img).into_iter().map(|(c, _, r)| (c, r)).collect();
                        let e = class_of.entry(l).or_insert_with(|| could.clone());
                        *e = e.intersection(&could).copied().collect();
                    }
                }
                let pairs: Vec<(CharRef, usize)> = class_of
                    .values()
                    .map(|s| {
                        assert_eq!(s.len(), 1, "each class is one (character, rotation): {s:?}");
                        *s.first().unwrap()
                    })
                    .collect();
                let distinct: BTreeSet<_> = pairs.iter().collect();
                assert_eq!(distinct.len(), n, "distinct (character, rotation) classes");
                for (c, _) in &pairs {
                    assert!(
                        side.binary_search(c).is_ok(),
                        "{c:?} is not on the {:?} side of the maml split",
                        spec.split
                    );
                    from_eval_set += usize::from(c.set == SetId::Evaluation);
                }
                // The difficulty counts alphabet-mates, rotated classes keeping their character's alphabet.
                let groups: BTreeSet<_> = pairs.iter().map(|&(c, _)| alphabet(c)).collect();
                assert_eq!(t.difficulty, (n - groups.len()) as f64 / (n - 1) as f64);
                if spec.competence.fraction() == 0.0 && n == 5 {
                    assert_eq!(t.difficulty, 0.0, "competence 0 finds five alphabets");
                }
                episodes += 1;
            }
        }
        println!("{n}-way {k}-shot maml+rotations: {episodes} episodes checked, {from_eval_set} classes from images_evaluation");
        assert!(from_eval_set > 0, "the merged split draws from both sets");
    }
}
