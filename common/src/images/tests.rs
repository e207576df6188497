//! Image folders built on disk from small PNGs written with the `png` crate's encoder.

use super::*;
use crate::config::ImagesTaskConfig;
use crate::omniglot::SIDE;

/// A scratch directory removed when dropped.
pub(super) struct Scratch(pub PathBuf);

impl Scratch {
    pub(super) fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("metatrain-images-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
    pub(super) fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// PNG bytes of a `width`×`height` image with the given colour type, bit depth and samples (big-endian
/// for 16 bits, packed for fewer than 8).
fn png_bytes(width: u32, height: u32, color: png::ColorType, depth: png::BitDepth, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, width, height);
        enc.set_color(color);
        enc.set_depth(depth);
        let mut w = enc.write_header().expect("png header");
        w.write_image_data(data).expect("png data");
    }
    out
}

/// An 8-bit gray PNG of one value.
fn gray(width: u32, height: u32, value: u8) -> Vec<u8> {
    png_bytes(width, height, png::ColorType::Grayscale, png::BitDepth::Eight, &vec![value; (width * height) as usize])
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write file");
}

fn all_close(img: &[f32], value: f32) -> bool {
    img.len() == PIXELS && img.iter().all(|&v| (v - value).abs() < 1e-6)
}

#[test]
fn colour_becomes_luma_and_invert_chooses_the_foreground() {
    let s = Scratch::new("colour");
    // RGB (200, 100, 50): luma = (0.299·200 + 0.587·100 + 0.114·50) / 255 = 124.2 / 255.
    let rgb = png_bytes(30, 20, png::ColorType::Rgb, png::BitDepth::Eight, &[200, 100, 50].repeat(600));
    write(&s.path("rgb.png"), &rgb);
    let luma = 124.2f32 / 255.0;
    assert!(all_close(&load_image(&s.path("rgb.png"), false).unwrap(), luma));
    assert!(all_close(&load_image(&s.path("rgb.png"), true).unwrap(), 1.0 - luma));
    // White paper with a black left half, 56×28: ink (invert) is 1 in the left 14 columns.
    let mut data = vec![255u8; 56 * 28 * 3];
    for y in 0..28 {
        data[y * 56 * 3..y * 56 * 3 + 28 * 3].fill(0);
    }
    write(&s.path("half.png"), &png_bytes(56, 28, png::ColorType::Rgb, png::BitDepth::Eight, &data));
    let img = load_image(&s.path("half.png"), true).unwrap();
    for (i, &v) in img.iter().enumerate() {
        assert_eq!(v, if i % SIDE < SIDE / 2 { 1.0 } else { 0.0 }, "pixel {i}");
    }
    // RGBA: a transparent pixel is background whatever its colour; half-transparent black is half ink.
    let rgba: Vec<u8> = [[0u8, 0, 0, 0], [0, 0, 0, 128]].iter().flat_map(|p| p.repeat(28 * 14)).collect();
    write(&s.path("rgba.png"), &png_bytes(28, 28, png::ColorType::Rgba, png::BitDepth::Eight, &rgba));
    let img = load_image(&s.path("rgba.png"), true).unwrap();
    assert!(img[..PIXELS / 2].iter().all(|&v| v == 0.0));
    assert!(img[PIXELS / 2..].iter().all(|&v| (v - 128.0 / 255.0).abs() < 1e-6));
    // 16-bit gray, 1-bit gray (scaled to full range), gray + alpha.
    let g16: Vec<u8> = std::iter::repeat_n(16_384u16.to_be_bytes(), 100).flatten().collect();
    write(&s.path("g16.png"), &png_bytes(10, 10, png::ColorType::Grayscale, png::BitDepth::Sixteen, &g16));
    assert!(all_close(&load_image(&s.path("g16.png"), false).unwrap(), 16_384.0 / 65_535.0));
    write(&s.path("g1.png"), &png_bytes(8, 8, png::ColorType::Grayscale, png::BitDepth::One, &[0xFF; 8]));
    assert!(all_close(&load_image(&s.path("g1.png"), false).unwrap(), 1.0));
    assert!(all_close(&load_image(&s.path("g1.png"), true).unwrap(), 0.0));
    let ga = png_bytes(4, 4, png::ColorType::GrayscaleAlpha, png::BitDepth::Eight, &[0, 255].repeat(16));
    write(&s.path("ga.png"), &ga);
    assert!(all_close(&load_image(&s.path("ga.png"), true).unwrap(), 1.0));
    // From bytes in memory, the same as from the file.
    assert_eq!(decode_image(&rgb, true, Path::new("rgb")).unwrap(), load_image(&s.path("rgb.png"), true).unwrap());
}

#[test]
fn classes_are_leaf_folders_sorted_by_name_with_images_sorted_by_file_name() {
    let s = Scratch::new("layout");
    let root = s.path("root");
    for (rel, v) in [
        ("b/x.png", 10),
        ("a/2.png", 20),
        ("a/10.PNG", 30),
        ("alpha/c2/z.png", 40),
        ("alpha/c1/y.png", 50),
        ("alpha/c1/notes.txt", 0),
        ("a/.hidden.png", 0),
        (".git/objects/o.png", 0),
        ("__empty/readme.md", 0),
    ] {
        let bytes = if rel.ends_with(".png") || rel.ends_with(".PNG") {
            if rel.contains('.') && rel.split('/').any(|p| p.starts_with('.')) {
                b"not a png at all".to_vec()
            } else {
                gray(5, 5, v)
            }
        } else {
            b"text".to_vec()
        };
        write(&root.join(rel), &bytes);
    }
    let f = ImageFolder::load(&root, false).expect("loads");
    assert_eq!(f.classes(), ["a", "alpha/c1", "alpha/c2", "b"]);
    let names: Vec<_> = f.files(0).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["10.PNG", "2.png"], "file names in byte order, hidden files skipped");
    assert!(all_close(&f.images(0)[0], 30.0 / 255.0) && all_close(&f.images(0)[1], 20.0 / 255.0));
    assert!(all_close(&f.images(3)[0], 10.0 / 255.0));
    assert_eq!((f.n_classes(), f.n_images()), (4, 5));
    assert!(f.images(4).is_empty() && f.files(99).is_empty(), "out of range: empty, no panic");
    // alpha/c1 and alpha/c2 share a group; a and b are groups of their own.
    assert_eq!(f.group_of(1), f.group_of(2));
    assert_ne!(f.group_of(0), f.group_of(3));
    assert_ne!(f.group_of(0), f.group_of(1));
    assert_eq!(f.fingerprint(), ImageFolder::load(&root, false).unwrap().fingerprint());
    assert_ne!(f.fingerprint(), ImageFolder::load(&root, true).unwrap().fingerprint());
}

/// A PNG chunk with its CRC (for headers the encoder would not write).
fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut crc = !0u32;
    for &b in kind.iter().chain(data) {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&(!crc).to_be_bytes());
    out
}

#[test]
fn hostile_files_give_errors_that_name_them() {
    let s = Scratch::new("hostile");
    let good = gray(28, 28, 0);
    let root = s.path("root");
    write(&root.join("cat/1.png"), &good);
    write(&root.join("cat/2.png"), b"GIF89a this is not a png");
    match ImageFolder::load(&root, true) {
        Err(ImagesError::NotPng { path, .. }) => assert!(path.ends_with("cat/2.png"), "{path:?}"),
        other => panic!("expected NotPng, got {other:?}"),
    }
    // A truncated PNG: the header is fine, the image data is cut short.
    write(&root.join("cat/2.png"), &good[..good.len() / 2]);
    let e = ImageFolder::load(&root, true).unwrap_err();
    assert!(matches!(&e, ImagesError::NotPng { path, .. } if path.ends_with("cat/2.png")), "{e}");
    assert!(e.to_string().contains("2.png") && e.to_string().contains("not a decodable PNG"), "{e}");
    // A header that promises 100000 × 100000 pixels is refused before anything that size is allocated.
    let mut ihdr = 100_000u32.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 0, 0, 0, 0]);
    let mut bomb = b"\x89PNG\r\n\x1a\n".to_vec();
    bomb.extend(chunk(b"IHDR", &ihdr));
    bomb.extend(chunk(b"IEND", &[]));
    write(&root.join("cat/2.png"), &bomb);
    let e = ImageFolder::load(&root, true).unwrap_err();
    assert!(matches!(e, ImagesError::ImageTooLarge { width: 100_000, height: 100_000, .. }), "{e}");
    // An empty file, and a directory where a file was expected.
    write(&root.join("cat/2.png"), b"");
    assert!(matches!(ImageFolder::load(&root, true), Err(ImagesError::NotPng { .. })));
    assert!(matches!(load_image(&root, true), Err(ImagesError::NotPng { .. })));
    std::fs::remove_file(root.join("cat/2.png")).unwrap();
    assert!(ImageFolder::load(&root, true).is_ok());
}

#[test]
fn bad_folders_give_errors_that_say_what_to_do() {
    let s = Scratch::new("folders");
    let missing = s.path("nowhere");
    assert_eq!(ImageFolder::load(&missing, true), Err(ImagesError::RootMissing { path: missing.clone() }));
    assert!(ImageFolder::load(&missing, true).unwrap_err().to_string().contains("does not exist"));
    write(&s.path("file"), b"x");
    assert!(matches!(ImageFolder::load(&s.path("file"), true), Err(ImagesError::RootNotDirectory { .. })));
    std::fs::create_dir_all(s.path("empty/sub")).unwrap();
    assert!(matches!(ImageFolder::load(&s.path("empty"), true), Err(ImagesError::NoClasses { .. })));
    write(&s.path("flat/1.png"), &gray(3, 3, 0));
    assert!(matches!(ImageFolder::load(&s.path("flat"), true), Err(ImagesError::ImagesAtRoot { .. })));
    write(&s.path("mixed/a/1.png"), &gray(3, 3, 0));
    write(&s.path("mixed/a/b/2.png"), &gray(3, 3, 0));
    match ImageFolder::load(&s.path("mixed"), true) {
        Err(ImagesError::MixedDirectory { dir }) => assert!(dir.ends_with("mixed/a"), "{dir:?}"),
        other => panic!("expected MixedDirectory, got {other:?}"),
    }
    // A link loop is read once, not followed forever.
    #[cfg(unix)]
    {
        write(&s.path("loop/a/1.png"), &gray(3, 3, 0));
        std::os::unix::fs::symlink(s.path("loop"), s.path("loop/b")).unwrap();
        let f = ImageFolder::load(&s.path("loop"), true).expect("a loop is cut");
        assert_eq!(f.classes(), ["a"]);
    }
}

/// A folder of classes `c00`, `c01`, ... with `sizes[i]` images each (image j of class i is all
/// (i + 1) / 100 + j / 10000, so every image differs).
fn write_folder(root: &Path, sizes: &[usize]) {
    for (i, &n) in sizes.iter().enumerate() {
        for j in 0..n {
            write(&root.join(format!("c{i:02}/{j:03}.png")), &gray(28, 28, (i * 5 + j % 5) as u8));
        }
    }
}

#[test]
fn task_splits_check_the_episode_shape_and_keep_classes_apart() {
    let s = Scratch::new("splits");
    let root = s.path("train");
    write_folder(&root, &[6, 6, 6, 6, 6, 6, 6, 6, 6, 6]);
    let mut cfg = ImagesTaskConfig::new(&root);
    (cfg.n_way, cfg.k_shot, cfg.q_query) = (2, 1, 5);
    let splits = ImageSplits::load(&cfg).expect("10 classes of 6");
    assert_eq!((splits.train.n_classes(), splits.eval.n_classes()), (8, 2), "round(0.2 × 10) held out");
    // Too few images: the class and the counts are named.
    write_folder(&s.path("small"), &[6, 6, 6, 6, 6, 3, 6, 6, 6, 6]);
    cfg.root = s.path("small");
    let e = ImageSplits::load(&cfg).unwrap_err();
    assert!(
        matches!(&e, ImagesError::TooFewImages { class, have: 3, k_shot: 1, q_query: 5, .. } if class == "c05"),
        "{e}"
    );
    assert!(
        e.to_string().contains("`c05`") && e.to_string().contains("3 images") && e.to_string().contains("= 6"),
        "{e}"
    );
    // Too few classes for n_way in the held-out split.
    cfg.root = root.clone();
    cfg.n_way = 3;
    let e = ImageSplits::load(&cfg).unwrap_err();
    assert!(matches!(e, ImagesError::TooFewClasses { split: "held-out", have: 2, need: 3, .. }), "{e}");
    // A separate eval_root: its classes must not be the training classes, nor may the folders nest.
    cfg.n_way = 2;
    cfg.eval_root = Some(s.path("heldout"));
    write_folder(&s.path("heldout"), &[6, 6]);
    let e = ImageSplits::load(&cfg).unwrap_err();
    assert!(matches!(&e, ImagesError::SharedClass { class, .. } if class == "c00"), "{e}");
    std::fs::rename(s.path("heldout/c00"), s.path("heldout/x00")).unwrap();
    std::fs::rename(s.path("heldout/c01"), s.path("heldout/x01")).unwrap();
    let splits = ImageSplits::load(&cfg).expect("apart");
    assert_eq!((splits.train.n_classes(), splits.eval.classes()), (10, &["x00".to_string(), "x01".into()][..]));
    cfg.eval_root = Some(root.join("c00"));
    assert!(matches!(ImageSplits::load(&cfg), Err(ImagesError::RootsOverlap { .. })));
    cfg.eval_root = Some(s.path("none"));
    assert!(matches!(ImageSplits::load(&cfg), Err(ImagesError::RootMissing { .. })));
}

#[test]
fn split_by_name_is_disjoint_sized_and_a_function_of_the_names() {
    let blank = || vec![vec![0.0f32; PIXELS]];
    let classes: Vec<(String, Vec<Vec<f32>>)> = (0..50).map(|i| (format!("class{i:02}"), blank())).collect();
    let folder = ImageFolder::from_classes("mem", classes.clone()).unwrap();
    let (train, eval) = folder.clone().split_by_name(0.2).unwrap();
    assert_eq!((train.n_classes(), eval.n_classes()), (40, 10));
    let mut all: Vec<String> = train.classes().iter().chain(eval.classes()).cloned().collect();
    all.sort();
    assert_eq!(all, folder.classes(), "every class in exactly one part");
    assert!(train.classes().windows(2).all(|w| w[0] < w[1]) && eval.classes().windows(2).all(|w| w[0] < w[1]));
    // By name alone: the same classes held out from any subset that contains them.
    let (_, eval_again) = folder.clone().split_by_name(0.2).unwrap();
    assert_eq!(eval, eval_again);
    let mut digests: Vec<([u8; 32], &String)> =
        folder.classes().iter().map(|c| (Sha256::digest(c.as_bytes()).into(), c)).collect();
    digests.sort();
    let smallest: Vec<&String> = digests[..10].iter().map(|d| d.1).collect();
    assert!(eval.classes().iter().all(|c| smallest.contains(&c)));
    // Not the last classes in name order.
    assert!(eval.classes().iter().any(|c| c.as_str() < "class40"), "{:?}", eval.classes());
    // Edge cases: at least one class on each side, fraction and size checked.
    let two = ImageFolder::from_classes("mem", classes[..2].to_vec()).unwrap();
    let (t, e) = two.clone().split_by_name(0.01).unwrap();
    assert_eq!((t.n_classes(), e.n_classes()), (1, 1));
    assert!(matches!(two.clone().split_by_name(1.0), Err(ImagesError::InvalidFraction { .. })));
    assert!(matches!(two.split_by_name(f64::NAN), Err(ImagesError::InvalidFraction { .. })));
    let one = ImageFolder::from_classes("mem", classes[..1].to_vec()).unwrap();
    assert!(matches!(one.split_by_name(0.5), Err(ImagesError::TooFewClasses { have: 1, .. })));
    // from_classes refuses what load could never produce.
    let bad = vec![("b".to_string(), blank()), ("a".to_string(), blank())];
    assert!(matches!(ImageFolder::from_classes("mem", bad), Err(ImagesError::ClassOrder { .. })));
    let short = vec![("a".to_string(), vec![vec![0.0; 5]])];
    assert!(matches!(ImageFolder::from_classes("mem", short), Err(ImagesError::WrongImageLength { found: 5, .. })));
    let nan = vec![("a".to_string(), vec![vec![f32::NAN; PIXELS]])];
    assert!(matches!(ImageFolder::from_classes("mem", nan), Err(ImagesError::ValueOutOfRange { pixel: 0, .. })));
}

#[test]
fn config_parses_validates_and_round_trips() {
    use crate::config::{Config, TaskConfig};
    let base = "[task]\ndistribution = \"images\"\nroot = \"data/x\"\n[model]\nname = \"conv4\"\n";
    let c = Config::from_toml(base).unwrap();
    let TaskConfig::Images(i) = &c.task else { panic!("images config") };
    assert_eq!(i, &ImagesTaskConfig::new("data/x"));
    assert!(
        i.invert && i.eval_root.is_none() && i.eval_fraction() == 0.2 && (i.n_way, i.k_shot, i.q_query) == (5, 1, 15)
    );
    assert!(c.is_classification());
    assert_eq!(c.task.describe(), "images 5-way 1-shot");
    assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    let with =
        |o: &[&str]| Config::from_toml_with_overrides(base, &o.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let c = with(&["task.eval_root=data/y", "task.invert=false", "task.n_way=20"]).unwrap();
    assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    for (bad, field) in [
        (vec!["task.eval_fraction=0"], "task.eval_fraction"),
        (vec!["task.eval_fraction=1.5"], "task.eval_fraction"),
        (vec!["task.eval_root=y", "task.eval_fraction=0.3"], "task.eval_fraction"),
        (vec!["task.n_way=1"], "task.n_way"),
        (vec!["task.k_shot=0"], "task.k_shot"),
        (vec!["task.n_way=2000"], "task.q_query"),
        (vec!["task.root=\"\""], "task.root"),
        (vec!["model.name=mlp"], "model.name"),
    ] {
        let e = with(&bad).unwrap_err();
        assert!(e.to_string().contains(field), "{bad:?}: {e}");
    }
    let e = Config::from_toml("[task]\ndistribution = \"images\"\n[model]\nname = \"conv4\"\n").unwrap_err();
    assert!(e.to_string().contains("root"), "root is required: {e}");
    let example = Config::from_toml(include_str!("../../../configs/images-omniglot-small.toml")).expect("example");
    assert!(matches!(&example.task, TaskConfig::Images(i) if i.root.ends_with("images_background_small1")));
    let e = Config::from_toml(&format!("{base}[task.extra]\n")).unwrap_err();
    assert!(e.to_string().contains("extra"), "{e}");
}
