//! The official Omniglot PNGs (`images_background_small1.zip`, 136 characters of 5 alphabets) as an image
//! folder: the same images as the `.npz` background split, and episodes drawn from them.

use std::collections::HashMap;
use std::io::BufReader;

use super::tests::Scratch;
use super::*;
use crate::config::{Config, ImagesTaskConfig, ModelKind, TaskConfig};
use crate::omniglot::{OmniglotSet, DRAWERS, SIDE};
use crate::task::{generate, Datasets, Split, Targets, TaskSpec};

/// The official PNG subset (found by [`crate::datadir::for_tests`]).
const SMALL1: &str = "images_background_small1.zip";
/// The background split as arrays.
const BACKGROUND: &str = "images_background.npz";

/// Extracts the PNG subset into a scratch directory; returns it and the root of the classes, or `None`
/// (with a note) where the data is not available.
fn extract_small1(name: &str) -> Option<(Scratch, PathBuf)> {
    let file = File::open(crate::datadir::omniglot_file_for_tests(SMALL1)?).expect("small1 zip opens");
    let scratch = Scratch::new(name);
    zip::ZipArchive::new(BufReader::new(file)).expect("small1 zip").extract(&scratch.0).expect("extract");
    let root = scratch.path("images_background_small1");
    Some((scratch, root))
}

#[test]
fn omniglot_pngs_load_as_the_npz_images() {
    let Some((_scratch, root)) = extract_small1("small1-npz") else { return };
    let started = std::time::Instant::now();
    let folder = ImageFolder::load(&root, true).expect("the official PNGs load");
    println!("136 classes, 2720 PNGs loaded in {:.2?}", started.elapsed());
    assert_eq!(folder.n_classes(), 136);
    assert_eq!(folder.classes()[0], "Balinese/character01");
    assert!(folder.classes().iter().all(|c| c.split('/').count() == 2), "Alphabet/characterNN names");
    assert!(folder.classes().windows(2).all(|w| w[0] < w[1]), "sorted by name");
    let alphabets: std::collections::BTreeSet<u32> = (0..136).map(|c| folder.group_of(c)).collect();
    assert_eq!(alphabets.len(), 5, "one group per alphabet");
    let Some(path) = crate::datadir::omniglot_file_for_tests(BACKGROUND) else { return };
    let npz = OmniglotSet::from_npz(BufReader::new(File::open(path).expect("open"))).expect("background npz");
    let mut worst = 0.0f32;
    let mut compared = 0;
    for c in 0..folder.n_classes() {
        assert_eq!(folder.images(c).len(), DRAWERS, "class {}", folder.classes()[c]);
        for (file, img) in folder.files(c).iter().zip(folder.images(c)) {
            // XXXX_YY.png: official character id XXXX = background row + 1, drawer YY = column + 1.
            let stem = file.file_stem().and_then(|s| s.to_str()).expect("file name");
            let (id, drawer) = stem.split_once('_').expect("XXXX_YY.png");
            let (row, col) = (id.parse::<usize>().unwrap() - 1, drawer.parse::<usize>().unwrap() - 1);
            let expected = npz.image(row, col);
            let diff = img.iter().zip(expected).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
            assert!(diff <= 1e-6, "{}: max abs diff {diff} from the npz image ({row}, {col})", file.display());
            worst = worst.max(diff);
            compared += 1;
        }
    }
    println!("{compared} PNGs compared with images_background.npz: max abs diff {worst:.3e}");
    assert_eq!(compared, 2720);
}

#[test]
fn omniglot_png_episodes_are_n_way_k_shot_deterministic_and_held_out() {
    let Some((_scratch, root)) = extract_small1("small1-episodes") else { return };
    let mut config = Config::default();
    config.model.name = ModelKind::Conv4;
    config.task = TaskConfig::Images(ImagesTaskConfig::new(&root));
    config.validate().expect("valid config");
    let TaskConfig::Images(cfg) = &config.task else { unreachable!() };
    let splits = ImageSplits::load(cfg).expect("splits load");
    assert_eq!((splits.train.n_classes(), splits.eval.n_classes()), (109, 27), "round(0.2 × 136) held out");
    // Which split and class each image belongs to (images are identified by their bits).
    let key = |img: &[f32]| img.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
    let mut owner: HashMap<Vec<u32>, (Split, usize)> = HashMap::new();
    for (split, folder) in [(Split::Train, &splits.train), (Split::Eval, &splits.eval)] {
        for c in 0..folder.n_classes() {
            for img in folder.images(c) {
                owner.insert(key(img), (split, c));
            }
        }
    }
    let data = Datasets { images: Some(std::sync::Arc::new(splits)), ..Default::default() };
    for split in [Split::Train, Split::Eval] {
        for index in 0..20 {
            let spec = TaskSpec::new(3, split, 7, index);
            let task = generate(&config, &spec, &data).expect("episode");
            assert_eq!(task, generate(&config, &spec, &data).unwrap(), "a pure function of the spec");
            assert_eq!((task.support.len(), task.query.len()), (5, 75));
            assert_eq!(task.support.feature_shape, [1, SIDE, SIDE]);
            assert_eq!((task.support.x.len(), task.query.x.len()), (5 * PIXELS, 75 * PIXELS));
            let (Targets::Class(ys), Targets::Class(yq)) = (&task.support.y, &task.query.y) else { panic!() };
            assert_eq!(ys, &(0..5).collect::<Vec<i64>>());
            assert_eq!(yq, &(0..5).flat_map(|l| std::iter::repeat_n(l, 15)).collect::<Vec<i64>>());
            // Each label is one class of the spec's split; no image is drawn twice.
            let mut class_of_label = HashMap::new();
            let mut seen = std::collections::HashSet::new();
            for (set, labels) in [(&task.support, ys), (&task.query, yq)] {
                for (k, &label) in labels.iter().enumerate() {
                    let img = &set.x[k * PIXELS..(k + 1) * PIXELS];
                    let &(s, c) = owner.get(&key(img)).expect("an image of the folder");
                    assert_eq!(s, split, "a {split:?} task drew from the other split");
                    assert_eq!(*class_of_label.entry(label).or_insert(c), c);
                    assert!(seen.insert(key(img)), "an image drawn twice");
                }
            }
            assert_eq!(class_of_label.len(), 5);
        }
        let a = generate(&config, &TaskSpec::new(3, split, 7, 0), &data).unwrap();
        assert_ne!(a, generate(&config, &TaskSpec::new(3, split, 7, 1), &data).unwrap());
        assert_ne!(a, generate(&config, &TaskSpec::new(4, split, 7, 0), &data).unwrap());
    }
    // Without the loaded folder the task says what is missing.
    let e = generate(&config, &TaskSpec::new(0, Split::Train, 0, 0), &Datasets::default()).unwrap_err();
    assert!(e.to_string().contains("task.root"), "{e}");
}
