use super::*;
use std::io::{Cursor, Write};
use std::time::Instant;

/// The real background split (found by [`crate::datadir::for_tests`]).
const BACKGROUND: &str = "images_background.npz";
/// The real evaluation split.
const EVALUATION: &str = "images_evaluation.npz";
/// The official PNGs of a small background subset.
const SMALL1: &str = "images_background_small1.zip";

/// A tiny deterministic generator (xorshift64*), so the tests need no rand dependency.
struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// The straightforward reference: for each output pixel, integrate the overlap of its 3.75×3.75 square with
/// every source pixel, in f64.
fn resize_reference(ink: &[bool]) -> Vec<f64> {
    let scale = SOURCE_SIDE as f64 / SIDE as f64;
    let overlap = |a0: f64, a1: f64, b0: f64, b1: f64| (a1.min(b1) - a0.max(b0)).max(0.0);
    let mut out = vec![0.0; PIXELS];
    for oy in 0..SIDE {
        for ox in 0..SIDE {
            let (y0, y1) = (oy as f64 * scale, (oy + 1) as f64 * scale);
            let (x0, x1) = (ox as f64 * scale, (ox + 1) as f64 * scale);
            let mut sum = 0.0;
            for sy in 0..SOURCE_SIDE {
                for sx in 0..SOURCE_SIDE {
                    if ink[sy * SOURCE_SIDE + sx] {
                        let (fy, fx) = (sy as f64, sx as f64);
                        sum += overlap(y0, y1, fy, fy + 1.0) * overlap(x0, x1, fx, fx + 1.0);
                    }
                }
            }
            out[oy * SIDE + ox] = sum / (scale * scale);
        }
    }
    out
}

#[test]
fn taps_are_sparse_and_sum_to_the_scale() {
    for (o, t) in TAPS.iter().enumerate() {
        assert!(t.len >= 1 && t.len <= 5, "output {o} touches {} sources", t.len);
        assert!(t.start + t.len <= SOURCE_SIDE);
        assert_eq!(t.weight[..t.len].iter().sum::<u32>(), SOURCE_SIDE as u32, "output {o}");
        assert!(t.weight[..t.len].iter().all(|&w| w > 0));
    }
    assert_eq!(TAPS[0].start, 0);
    assert_eq!(TAPS[SIDE - 1].start + TAPS[SIDE - 1].len, SOURCE_SIDE);
}

#[test]
fn resize_matches_reference_on_random_images() {
    let mut rng = XorShift(0x5EED_0F0A_1100);
    let mut worst = 0.0f64;
    for trial in 0..24 {
        // Densities from sparse to dense, plus blobby images (random rectangles) like real strokes.
        let density = (trial % 8) as f64 / 7.0;
        let mut ink: Vec<bool> = (0..SOURCE_PIXELS).map(|_| rng.unit() < density).collect();
        if trial >= 16 {
            ink.fill(false);
            for _ in 0..12 {
                let (y, x) = ((rng.next() % 105) as usize, (rng.next() % 105) as usize);
                let (h, w) = ((rng.next() % 20 + 1) as usize, (rng.next() % 20 + 1) as usize);
                for yy in y..(y + h).min(SOURCE_SIDE) {
                    for xx in x..(x + w).min(SOURCE_SIDE) {
                        ink[yy * SOURCE_SIDE + xx] = true;
                    }
                }
            }
        }
        let fast = resize_area(&ink);
        let slow = resize_reference(&ink);
        assert_eq!(fast.len(), PIXELS);
        for (i, (&f, &s)) in fast.iter().zip(&slow).enumerate() {
            let d = (f as f64 - s).abs();
            worst = worst.max(d);
            assert!(d < 1e-5, "trial {trial}, pixel {i}: fast {f} vs reference {s}");
        }
    }
    println!("resize_area vs f64 reference: 24 random images, max abs diff {worst:.3e}");
}

#[test]
fn resize_extremes() {
    assert!(resize_area(&vec![true; SOURCE_PIXELS]).iter().all(|&v| v == 1.0));
    assert!(resize_area(&vec![false; SOURCE_PIXELS]).iter().all(|&v| v == 0.0));
    // One source pixel lying wholly inside output pixel (0, 0) contributes 1/3.75² to it alone.
    let mut ink = vec![false; SOURCE_PIXELS];
    ink[SOURCE_SIDE + 1] = true;
    let out = resize_area(&ink);
    assert!((out[0] - 1.0 / 14.0625).abs() < 1e-7);
    assert!(out[1..].iter().all(|&v| v == 0.0));
    // Source pixel (3, 3) straddles outputs 0 and 1 on each axis: 3/4 and 1/4 of it on each side.
    let mut ink = vec![false; SOURCE_PIXELS];
    ink[3 * SOURCE_SIDE + 3] = true;
    let out = resize_area(&ink);
    let unit = 1.0 / 14.0625;
    for (i, w) in [(0, 0.75 * 0.75), (1, 0.75 * 0.25), (SIDE, 0.25 * 0.75), (SIDE + 1, 0.25 * 0.25)] {
        assert!((out[i] - w * unit).abs() < 1e-7, "pixel {i}: {}", out[i]);
    }
}

#[test]
#[should_panic(expected = "105×105")]
fn resize_rejects_wrong_length() {
    resize_area(&[true; 10]);
}

#[test]
fn from_images_validates() {
    let one = vec![0.5f32; DRAWERS * PIXELS];
    let set = OmniglotSet::from_images(1, one.clone()).expect("valid");
    assert_eq!(set.n_chars(), 1);
    assert_eq!(set.image(0, DRAWERS - 1), &one[..PIXELS]);
    assert_eq!(OmniglotSet::from_images(0, vec![]), Err(OmniglotError::NoCharacters));
    assert!(matches!(OmniglotSet::from_images(2, one.clone()), Err(OmniglotError::WrongImageCount { .. })));
    assert!(matches!(OmniglotSet::from_images(usize::MAX, one.clone()), Err(OmniglotError::WrongImageCount { .. })));
    let mut bad = one.clone();
    bad[7] = f32::NAN;
    assert!(matches!(OmniglotSet::from_images(1, bad), Err(OmniglotError::ValueOutOfRange { index: 7, .. })));
    let mut bad = one;
    bad[3] = 1.5;
    assert!(matches!(OmniglotSet::from_images(1, bad), Err(OmniglotError::ValueOutOfRange { index: 3, .. })));
}

#[test]
#[should_panic(expected = "out of range")]
fn image_panics_out_of_range() {
    let set = OmniglotSet::from_images(1, vec![0.0; DRAWERS * PIXELS]).expect("valid");
    set.image(0, DRAWERS);
}

// --- synthetic .npz files --------------------------------------------------------------------------------

/// A version 1.0 .npy file with the given header dict and data (header padded like NumPy's).
fn npy(dict: &str, data: &[u8]) -> Vec<u8> {
    let mut header = dict.to_string();
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut out = NPY_MAGIC.to_vec();
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn images_dict(descr: &str, shape: &str) -> String {
    format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}")
}

/// Raw image bytes for `n` characters: drawing (c, d) is all background except a solid ink square of side
/// `5 * (d + 1)` (capped) at the top-left, offset by c.
fn synthetic_images(n: usize) -> Vec<u8> {
    let mut out = vec![0xFFu8; n * DRAWERS * SOURCE_PIXELS];
    for c in 0..n {
        for d in 0..DRAWERS {
            let img = &mut out[(c * DRAWERS + d) * SOURCE_PIXELS..][..SOURCE_PIXELS];
            let side = (5 * (d + 1)).min(SOURCE_SIDE - c);
            for y in c..c + side {
                for x in c..c + side {
                    img[y * SOURCE_SIDE + x] = 0;
                }
            }
        }
    }
    out
}

fn labels_bytes(n: usize) -> Vec<u8> {
    (0..n).flat_map(|c| std::iter::repeat_n(c as i64, DRAWERS)).flat_map(i64::to_le_bytes).collect()
}

fn labels_npy(n: usize) -> Vec<u8> {
    npy(&format!("{{'descr': '<i8', 'fortran_order': False, 'shape': ({n}, {DRAWERS}), }}"), &labels_bytes(n))
}

fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for (name, data) in entries {
        w.start_file(*name, opts).expect("start entry");
        w.write_all(data).expect("write entry");
    }
    w.finish().expect("finish zip").into_inner()
}

fn load(bytes: Vec<u8>) -> Result<OmniglotSet, OmniglotError> {
    OmniglotSet::from_npz(Cursor::new(bytes))
}

fn valid_npz(n: usize) -> Vec<u8> {
    let images = npy(&images_dict("|b1", &format!("({n}, 20, 105, 105)")), &synthetic_images(n));
    zip_of(&[("images.npy", &images), ("labels.npy", &labels_npy(n))])
}

#[test]
fn synthetic_npz_loads_and_resizes() {
    let set = load(valid_npz(3)).expect("valid synthetic npz");
    assert_eq!(set.n_chars(), 3);
    let raw = synthetic_images(3);
    for c in 0..3 {
        for d in 0..DRAWERS {
            let ink: Vec<bool> =
                raw[(c * DRAWERS + d) * SOURCE_PIXELS..][..SOURCE_PIXELS].iter().map(|&b| b == 0).collect();
            assert_eq!(set.image(c, d), &resize_area(&ink)[..], "image ({c}, {d})");
        }
    }
    // Drawing (0, 2) is a 15×15 ink square at the origin = exactly 4×4 output pixels of full ink.
    let img = set.image(0, 2);
    for y in 0..SIDE {
        for x in 0..SIDE {
            assert_eq!(img[y * SIDE + x], if y < 4 && x < 4 { 1.0 } else { 0.0 }, "({y}, {x})");
        }
    }
    // Without labels.npy, u1 dtype, version 2.0 and 3.0 headers: still fine.
    let data = synthetic_images(1);
    let mut v1 = npy(&images_dict("<u1", "(1, 20, 105, 105)"), &data);
    assert!(load(zip_of(&[("images.npy", &v1)])).is_ok());
    for major in [2u8, 3] {
        let header_len = u16::from_le_bytes([v1[8], v1[9]]) as u32;
        let mut v = NPY_MAGIC.to_vec();
        v.extend_from_slice(&[major, 0]);
        v.extend_from_slice(&header_len.to_le_bytes());
        v.extend_from_slice(&v1[10..]);
        let set = load(zip_of(&[("images.npy", &v)])).unwrap_or_else(|e| panic!("version {major}: {e}"));
        assert_eq!(set.n_chars(), 1);
    }
    v1[6] = 4;
    assert!(matches!(
        load(zip_of(&[("images.npy", &v1)])),
        Err(OmniglotError::UnsupportedVersion { major: 4, minor: 0, .. })
    ));
}

#[test]
fn malformed_inputs_are_errors() {
    let data1 = synthetic_images(1);
    let good_images = npy(&images_dict("|b1", "(1, 20, 105, 105)"), &data1);
    let with_images = |images: &[u8]| load(zip_of(&[("images.npy", images), ("labels.npy", &labels_npy(1))]));
    // A header dict with data; one with the images dtype and a given shape; a labels header for 2 characters.
    let dict = |d: &str| with_images(&npy(d, &data1));
    let shaped = |shape: &str| with_images(&npy(&images_dict("|b1", shape), &data1));
    let labels_header = |descr: &str| format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': (2, 20), }}");
    let images2 = npy(&images_dict("|b1", "(2, 20, 105, 105)"), &synthetic_images(2));
    let with_labels = |labels: &[u8]| load(zip_of(&[("images.npy", &images2), ("labels.npy", labels)]));

    let mut bad_magic = good_images.clone();
    bad_magic[1] = b'X';
    // Version 2.0 with a 4-byte header length of 0xFFFFFFFF.
    let mut too_long = good_images[..6].to_vec();
    too_long.extend_from_slice(&[2, 0, 0xFF, 0xFF, 0xFF, 0xFF]);
    let mut extra = data1.clone();
    extra.push(0xFF);
    let mut inconsistent = labels_bytes(2);
    inconsistent[(DRAWERS + 3) * 8] = 0; // labels[1, 3] = 0

    let cases: Vec<(&str, Result<OmniglotSet, OmniglotError>)> = vec![
        ("not a zip", load(b"this is not a zip archive at all".to_vec())),
        ("empty input", load(Vec::new())),
        ("zip without images.npy", load(zip_of(&[("labels.npy", &labels_npy(1))]))),
        ("wrong magic", with_images(&bad_magic)),
        ("empty entry", with_images(b"")),
        ("short magic", with_images(b"\x93NUM")),
        ("no header length", with_images(b"\x93NUMPY\x01\x00\x10")),
        ("header length 4 GiB", with_images(&too_long)),
        ("header cut short", with_images(&good_images[..40])),
        ("header not a dict", dict("[1, 2, 3]")),
        ("header unknown key", dict("{'descr': '|b1', 'fortran_order': False, 'shape': (1, 20, 105, 105), 'x': 1}")),
        ("header missing key", dict("{'descr': '|b1', 'shape': (1, 20, 105, 105)}")),
        ("header duplicate key", dict("{'descr': '|b1', 'descr': '|b1', 'fortran_order': False, 'shape': ()}")),
        ("wrong dtype", dict(&images_dict("<f4", "(1, 20, 105, 105)"))),
        ("structured dtype", dict("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (1, 20)}")),
        ("fortran order", dict("{'descr': '|b1', 'fortran_order': True, 'shape': (1, 20, 105, 105)}")),
        ("wrong shape (28×28)", shaped("(1, 20, 28, 28)")),
        ("wrong shape (19 drawers)", shaped("(1, 19, 105, 105)")),
        ("wrong shape (3-d)", shaped("(20, 105, 105)")),
        ("zero characters", shaped("(0, 20, 105, 105)")),
        ("huge N (100001)", shaped("(100001, 20, 105, 105)")),
        ("huge N (2^63)", shaped("(9223372036854775808, 20, 105, 105)")),
        ("N beyond u64", shaped("(123456789012345678901234567890, 20, 105, 105)")),
        ("N = 100000, one character of data", shaped("(100000, 20, 105, 105)")),
        ("truncated data", with_images(&npy(&images_dict("|b1", "(1, 20, 105, 105)"), &data1[..215_500]))),
        ("trailing data", with_images(&npy(&images_dict("|b1", "(1, 20, 105, 105)"), &extra))),
        ("labels inconsistent", with_labels(&npy(&labels_header("<i8"), &inconsistent))),
        ("labels wrong shape", with_labels(&labels_npy(3))),
        ("labels wrong dtype", with_labels(&npy(&labels_header("<i4"), &labels_bytes(2)))),
        ("labels truncated", with_labels(&npy(&labels_header("<i8"), &labels_bytes(2)[..100]))),
    ];
    let n = cases.len();
    let mut errors = std::collections::HashMap::new();
    for (name, result) in cases {
        match result {
            Ok(set) => panic!("{name}: expected an error, got {set:?}"),
            Err(e) => {
                println!("{name:>40}: {e}");
                errors.insert(name, e);
            }
        }
    }
    println!("{n} malformed inputs, all rejected");
    // The variants say what went wrong.
    let kind = |name: &str| &errors[name];
    assert!(matches!(kind("not a zip"), OmniglotError::NotZip { .. }));
    assert!(matches!(kind("empty input"), OmniglotError::NotZip { .. }));
    assert_eq!(kind("zip without images.npy"), &OmniglotError::MissingEntry { entry: "images.npy" });
    assert!(matches!(kind("wrong magic"), OmniglotError::BadMagic { .. }));
    assert!(matches!(kind("short magic"), OmniglotError::BadMagic { .. }));
    assert!(matches!(kind("header length 4 GiB"), OmniglotError::HeaderTooLong { len: 0xFFFF_FFFF, .. }));
    assert!(matches!(kind("header cut short"), OmniglotError::Truncated { part: "header", .. }));
    assert!(matches!(kind("header not a dict"), OmniglotError::BadHeader { .. }));
    assert!(matches!(kind("wrong dtype"), OmniglotError::WrongDtype { .. }));
    assert!(matches!(kind("fortran order"), OmniglotError::FortranOrder { .. }));
    assert!(matches!(kind("huge N (100001)"), OmniglotError::WrongShape { .. }));
    assert!(matches!(kind("N beyond u64"), OmniglotError::BadHeader { .. }));
    assert_eq!(
        kind("N = 100000, one character of data"),
        &OmniglotError::Truncated {
            entry: "images.npy",
            part: "image data",
            expected: 100_000 * 20 * 11025,
            found: 20 * 11025
        }
    );
    assert!(matches!(kind("trailing data"), OmniglotError::TrailingData { .. }));
    assert_eq!(kind("labels inconsistent"), &OmniglotError::LabelsInconsistent { character: 1, drawer: 3, found: 0 });
    assert!(matches!(kind("labels wrong shape"), OmniglotError::WrongShape { entry: "labels.npy", .. }));
    assert!(matches!(kind("labels truncated"), OmniglotError::Truncated { part: "label data", .. }));
}

#[test]
fn corrupted_bytes_never_panic() {
    let npz = valid_npz(1);
    let mut rng = XorShift(42);
    let mut errors = 0;
    // Every truncation of the archive.
    for len in (0..npz.len()).step_by(7) {
        errors += usize::from(load(npz[..len].to_vec()).is_err());
    }
    // Random byte corruption of the archive.
    for _ in 0..300 {
        let mut bytes = npz.clone();
        for _ in 0..1 + rng.next() % 4 {
            let i = (rng.next() % bytes.len() as u64) as usize;
            bytes[i] = rng.next() as u8;
        }
        errors += usize::from(load(bytes).is_err());
    }
    // Every byte of the .npy preamble and header set to a few values (inside a valid zip).
    let images = npy(&images_dict("|b1", "(1, 20, 105, 105)"), &synthetic_images(1));
    for i in 0..128 {
        for v in [0u8, b' ', b'(', b')', b'\'', b',', b'9', 0xFF] {
            let mut bad = images.clone();
            bad[i] = v;
            errors += usize::from(load(zip_of(&[("images.npy", &bad)])).is_err());
        }
    }
    println!("corruption fuzz: {errors} errors, no panics");
}

// --- the real data -----------------------------------------------------------------------------------------

fn open_or_skip(name: &str) -> Option<std::fs::File> {
    let path = crate::datadir::omniglot_file_for_tests(name)?;
    Some(std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// Checks a loaded real split: value range, ink fraction, and that characters differ.
fn check_real_split(set: &OmniglotSet) {
    let n = set.n_chars();
    let mut means = Vec::with_capacity(n * DRAWERS);
    for c in 0..n {
        for d in 0..DRAWERS {
            let img = set.image(c, d);
            assert!(img.iter().all(|v| (0.0..=1.0).contains(v)), "image ({c}, {d}) has values outside [0, 1]");
            means.push(img.iter().sum::<f32>() / PIXELS as f32);
        }
    }
    let min = means.iter().copied().fold(f32::INFINITY, f32::min);
    let max = means.iter().copied().fold(0.0, f32::max);
    let avg = means.iter().sum::<f32>() / means.len() as f32;
    println!("  mean ink per image: min {min:.4}, mean {avg:.4}, max {max:.4}");
    assert!(min > 0.001, "an image is (nearly) blank: mean ink {min}");
    assert!(max < 0.5, "an image is mostly ink: mean ink {max}");
    assert!((0.03..0.3).contains(&avg), "average ink {avg} is implausible for pen strokes");
    // Different characters differ, and drawings of one character are closer to each other than to others.
    let dist = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f32>();
    let (mut within, mut between) = (0.0f64, 0.0f64);
    for c in 0..n {
        let other = (c + 1) % n;
        if n > 1 {
            assert_ne!(set.image(c, 0), set.image(other, 0), "characters {c} and {other} have the same image");
        }
        for d in 0..DRAWERS {
            within += dist(set.image(c, d), set.image(c, (d + 1) % DRAWERS)) as f64;
            between += dist(set.image(c, d), set.image(other, d)) as f64;
        }
    }
    println!(
        "  mean squared distance: same character {:.2}, next character {:.2}",
        within / (n * DRAWERS) as f64,
        between / (n * DRAWERS) as f64
    );
    assert!(within < between, "drawings of one character should be closer than drawings of different ones");
}

#[test]
fn loads_real_background_split() {
    let Some(file) = open_or_skip(BACKGROUND) else { return };
    let start = Instant::now();
    let set = OmniglotSet::from_npz(io::BufReader::new(file)).expect("images_background.npz loads");
    let elapsed = start.elapsed();
    println!(
        "images_background.npz: {} characters, {} images, loaded in {elapsed:.2?}",
        set.n_chars(),
        set.n_chars() * DRAWERS
    );
    assert_eq!(set.n_chars(), 964);
    check_real_split(&set);
}

#[test]
fn loads_real_evaluation_split() {
    let Some(file) = open_or_skip(EVALUATION) else { return };
    let start = Instant::now();
    let set = OmniglotSet::from_npz(io::BufReader::new(file)).expect("images_evaluation.npz loads");
    println!("images_evaluation.npz: {} characters, loaded in {:.2?}", set.n_chars(), start.elapsed());
    assert_eq!(set.n_chars(), 659);
    check_real_split(&set);
}

/// The official PNGs of `images_background_small1.zip` equal the npz's raw images (before resizing), and
/// resizing them gives the set's images.
#[test]
fn official_pngs_match_npz() {
    let (Some(pngs), Some(_)) = (open_or_skip(SMALL1), open_or_skip(BACKGROUND)) else {
        return;
    };
    let mut archive = zip::ZipArchive::new(io::BufReader::new(pngs)).expect("small1 zip");
    // (character row, drawer) -> background flags as stored (true = white).
    let mut expected = std::collections::HashMap::new();
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).expect("entry");
        let name = entry.name().to_string();
        let Some(stem) = name.strip_suffix(".png").and_then(|n| n.rsplit('/').next()) else {
            continue;
        };
        let (id, drawer) = stem.split_once('_').expect("XXXX_YY.png");
        let (id, drawer): (usize, usize) = (id.parse().expect("id"), drawer.parse().expect("drawer"));
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).expect("read png");
        let mut decoder = png::Decoder::new(Cursor::new(bytes));
        decoder.set_transformations(png::Transformations::EXPAND);
        let mut reader = decoder.read_info().expect("png header");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("png frame");
        assert_eq!((info.width, info.height), (SOURCE_SIDE as u32, SOURCE_SIDE as u32), "{name}");
        assert_eq!((info.color_type, info.bit_depth), (png::ColorType::Grayscale, png::BitDepth::Eight), "{name}");
        let white: Vec<bool> = buf[..info.buffer_size()].iter().map(|&b| b != 0).collect();
        expected.insert((id - 1, drawer - 1), white);
    }
    assert_eq!(expected.len(), 2720, "136 characters × 20 drawers");
    let Some(file) = open_or_skip(BACKGROUND) else { return };
    let mut compared = 0;
    let mut mismatched = Vec::new();
    stream_raw_images(io::BufReader::new(file), |index, raw| {
        if let Some(white) = expected.get(&(index / DRAWERS, index % DRAWERS)) {
            compared += 1;
            if raw.iter().zip(white).any(|(&b, &w)| (b != 0) != w) {
                mismatched.push(index);
            }
        }
    })
    .expect("background npz streams");
    println!("official PNGs: {compared} compared with images_background.npz, {} mismatched", mismatched.len());
    assert_eq!(compared, expected.len());
    assert!(mismatched.is_empty(), "images differing from their PNG: {mismatched:?}");
}
