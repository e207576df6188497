//! The Omniglot handwritten-character dataset, read from its `.npz` form and resized to 28×28.
//!
//! # Source format
//!
//! An Omniglot `.npz` (see `shared/data/omniglot/README.md`) is an ordinary zip archive holding two NumPy
//! `.npy` files:
//! - `images.npy`: dtype bool (`|b1`; `<u1`/`|u1` are accepted too), shape `(N, 20, 105, 105)`, C order.
//!   `images[c, d]` is drawing `d` of character `c`. **A true (non-zero) byte is the white background, a false
//!   (zero) byte is ink.** The bytes are 0x00 and 0xFF, so a pixel is read as `byte != 0`.
//! - `labels.npy` (optional here): `<i8`, shape `(N, 20)`, with `labels[c, d] == c`. When present it is checked.
//!
//! The `.npy` header (magic `\x93NUMPY`, format versions 1.0, 2.0 and 3.0) is validated — dtype, C order and
//! shape, with `1 <= N <= 100_000` — before anything sized by `N` is allocated, and the 212 MB of pixel data is
//! streamed from the zip entry one image (105 × 105 = 11,025 bytes) at a time, so only the resized output is
//! kept in memory. The output grows as images actually arrive, so a header that promises more characters than
//! the entry holds costs nothing but a [`OmniglotError::Truncated`] error. Malformed input of any kind gives an
//! [`OmniglotError`], never a panic.
//!
//! # Resize
//!
//! Each 105×105 image is inverted (ink = 1.0, background = 0.0) and reduced to 28×28 by *area averaging*, the
//! antialiased resize of OpenCV's `INTER_AREA` (and of TensorFlow's `area` method): output pixel `(y, x)` covers
//! the source square `[3.75·y, 3.75·(y+1)) × [3.75·x, 3.75·(x+1))` (scale 105 / 28 = 3.75) and its value is the
//! mean ink over that square, each source pixel weighted by the fraction of it that lies inside. (PIL's `BOX`
//! filter is the same idea but gives each source pixel a 0/1 weight by where its centre falls, so results differ
//! slightly on the boundary pixels.) The resize is separable with sparse weights — each output row or column
//! touches at most 5 source rows or columns — and is done in exact integer arithmetic: on a grid of 1/28 of a
//! source pixel every overlap is an integer, so every output is `k / 11025` for an integer `k`, correctly
//! rounded to `f32`.
//!
//! # Classes
//!
//! [`classes`] turns the loaded sets into the classes episodes are drawn from (optionally four rotations
//! per character), and [`split`] is MAML's split of the merged 1,623 characters (1,200 / 423).

use std::fmt;
use std::io::{self, Read, Seek};

/// Drawings per character: every Omniglot character was drawn once by each of 20 people.
pub const DRAWERS: usize = 20;
/// Side, in pixels, of the square source images in the `.npz`.
pub const SOURCE_SIDE: usize = 105;
/// Side, in pixels, of the square images an [`OmniglotSet`] holds after resizing.
pub const SIDE: usize = 28;
/// Pixels per resized image (`SIDE * SIDE`).
pub const PIXELS: usize = SIDE * SIDE;

/// Bytes of one source image in `images.npy` (one byte per pixel).
const SOURCE_PIXELS: usize = SOURCE_SIDE * SOURCE_SIDE;
/// The most characters a file may declare (Omniglot has 1,623 in all); bounds everything sized by `N`.
const MAX_CHARS: u64 = 100_000;
/// The longest `.npy` header accepted, in bytes (NumPy itself writes 118 for these files).
const MAX_HEADER_LEN: usize = 64 * 1024;
/// The zip entry holding the images.
const IMAGES_ENTRY: &str = "images.npy";
/// The zip entry holding the labels.
const LABELS_ENTRY: &str = "labels.npy";
/// The `.npy` magic string.
const NPY_MAGIC: &[u8; 6] = b"\x93NUMPY";
/// Image dtypes accepted: NumPy bool, or unsigned bytes read the same way (non-zero = background).
const IMAGE_DTYPES: &[&str] = &["|b1", "<u1", "|u1"];
/// The label dtype accepted: little-endian 64-bit signed integers.
const LABEL_DTYPE: &str = "<i8";

/// Why an Omniglot file could not be read, or images could not be accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OmniglotError {
    /// The input is not a readable zip archive (an `.npz` is a zip).
    #[error("expected an .npz (zip) archive, but it could not be read as a zip: {reason}")]
    NotZip {
        /// What the zip reader reported.
        reason: String,
    },
    /// A required entry is not in the archive.
    #[error("the .npz archive has no `{entry}` entry")]
    MissingEntry {
        /// The entry that was looked for.
        entry: &'static str,
    },
    /// The zip reader failed on an entry (unsupported compression, encryption, corrupt directory, ...).
    #[error("could not open `{entry}` in the .npz archive: {reason}")]
    Zip {
        /// The entry being opened.
        entry: &'static str,
        /// What the zip reader reported.
        reason: String,
    },
    /// Reading an entry failed (corrupt deflate stream, CRC mismatch, I/O error).
    #[error("reading `{entry}` failed: {reason}")]
    Io {
        /// The entry being read.
        entry: &'static str,
        /// The I/O error, as text.
        reason: String,
    },
    /// The entry does not start with the `.npy` magic string.
    #[error(
        "`{entry}` is not a .npy file: expected magic bytes 93 4E 55 4D 50 59 (\"\\x93NUMPY\"), found {found:02X?}"
    )]
    BadMagic {
        /// The entry being read.
        entry: &'static str,
        /// The first bytes found (up to 6).
        found: Vec<u8>,
    },
    /// The `.npy` format version is not 1.0, 2.0 or 3.0.
    #[error("`{entry}`: unsupported .npy format version {major}.{minor} (expected 1.0, 2.0 or 3.0)")]
    UnsupportedVersion {
        /// The entry being read.
        entry: &'static str,
        /// Major version byte found.
        major: u8,
        /// Minor version byte found.
        minor: u8,
    },
    /// The `.npy` header length field is larger than this reader accepts.
    #[error("`{entry}`: .npy header length {len} exceeds the maximum of {max} bytes")]
    HeaderTooLong {
        /// The entry being read.
        entry: &'static str,
        /// Header length declared.
        len: u64,
        /// Largest accepted.
        max: usize,
    },
    /// The `.npy` header dictionary is malformed.
    #[error("`{entry}`: malformed .npy header ({reason}): {header:?}")]
    BadHeader {
        /// The entry being read.
        entry: &'static str,
        /// What is wrong with it.
        reason: String,
        /// The header text (possibly cut short).
        header: String,
    },
    /// The array's dtype is not the one expected.
    #[error("`{entry}`: expected dtype {expected}, found {found:?}")]
    WrongDtype {
        /// The entry being read.
        entry: &'static str,
        /// The accepted dtype(s).
        expected: String,
        /// The `descr` found in the header.
        found: String,
    },
    /// The array is stored in Fortran (column-major) order.
    #[error("`{entry}`: expected C order ('fortran_order': False), found Fortran order")]
    FortranOrder {
        /// The entry being read.
        entry: &'static str,
    },
    /// The array's shape is not the one expected.
    #[error("`{entry}`: expected shape {expected}, found {found:?}")]
    WrongShape {
        /// The entry being read.
        entry: &'static str,
        /// The expected shape, described.
        expected: String,
        /// The shape found in the header.
        found: Vec<u64>,
    },
    /// The entry ended before the header or data it promised.
    #[error("`{entry}`: truncated {part}: expected {expected} bytes, found {found}")]
    Truncated {
        /// The entry being read.
        entry: &'static str,
        /// Which part was cut short (header, image data, label data).
        part: &'static str,
        /// Bytes expected.
        expected: u64,
        /// Bytes found before the end of the entry.
        found: u64,
    },
    /// The entry holds more bytes than its header accounts for.
    #[error("`{entry}`: unexpected data after the {expected} bytes the header accounts for")]
    TrailingData {
        /// The entry being read.
        entry: &'static str,
        /// Bytes of array data the header accounts for.
        expected: u64,
    },
    /// A label is not its row index (`labels[c, d]` must equal `c`).
    #[error("`labels.npy`: labels[{character}, {drawer}] should be {character}, found {found}")]
    LabelsInconsistent {
        /// Row (character) index.
        character: usize,
        /// Column (drawer) index.
        drawer: usize,
        /// The label found.
        found: i64,
    },
    /// [`OmniglotSet::from_images`] was given no characters.
    #[error("an Omniglot set needs at least one character, got 0")]
    NoCharacters,
    /// [`OmniglotSet::from_images`] was given the wrong number of values.
    #[error(
        "expected {expected} image values ({n_chars} characters × {DRAWERS} drawers × {PIXELS} pixels), got {found}"
    )]
    WrongImageCount {
        /// Characters declared.
        n_chars: usize,
        /// Values expected (`n_chars * DRAWERS * PIXELS`), saturated on overflow.
        expected: usize,
        /// Values given.
        found: usize,
    },
    /// [`OmniglotSet::from_images`] was given a value outside `[0, 1]` (or NaN).
    #[error("image value at index {index} is {value}, expected a number in [0, 1]")]
    ValueOutOfRange {
        /// Index into the flat image vector.
        index: usize,
        /// The offending value.
        value: f32,
    },
}

/// Why `alphabets.tsv` could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AlphabetError {
    #[error("alphabets.tsv is {0} bytes, more than the {max} accepted", max = alphabets::MAX_BYTES)]
    TooLarge(usize),
    #[error("alphabets.tsv line {line}: {why}")]
    Line { line: usize, why: String },
    #[error("alphabets.tsv assigns no alphabet to row {row} of the {set} split")]
    Uncovered { set: String, row: usize },
    #[error("{got} alphabet entries for a set of {n_chars} characters")]
    WrongLength { got: usize, n_chars: usize },
}

/// A split of Omniglot, resized: `n_chars` characters × [`DRAWERS`] drawings × [`PIXELS`] values in `[0, 1]`
/// (ink = 1.0, background = 0.0), row-major 28×28 images, and each character's alphabet.
#[derive(Clone, PartialEq)]
pub struct OmniglotSet {
    /// Number of characters (at least 1).
    n_chars: usize,
    /// Alphabet number of each character; without `alphabets.tsv`, each character is its own.
    alphabet: Vec<u32>,
    /// `n_chars * DRAWERS * PIXELS` values; image `(c, d)` starts at `(c * DRAWERS + d) * PIXELS`.
    images: Vec<f32>,
}

impl fmt::Debug for OmniglotSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OmniglotSet")
            .field("n_chars", &self.n_chars)
            .field("images", &format_args!("[{} f32 values]", self.images.len()))
            .finish()
    }
}

impl OmniglotSet {
    /// Reads an Omniglot .npz (zip with images.npy, labels.npy), resizes each 105×105 image to 28×28 by
    /// area averaging (antialiased, like PIL's BOX/area resize: each output pixel is the mean of the source
    /// area it covers, with fractional overlap weights, scale 105/28 = 3.75), ink = 1.0, background = 0.0.
    ///
    /// `images.npy` is required and streamed image by image; `labels.npy` is checked when present
    /// (`<i8`, shape `(N, 20)`, `labels[c, d] == c`). Any malformed input gives an [`OmniglotError`].
    pub fn from_npz<R: Read + Seek>(reader: R) -> Result<Self, OmniglotError> {
        let mut images: Vec<f32> = Vec::new();
        let mut ink = [0u8; SOURCE_PIXELS];
        let mut resized = [0f32; PIXELS];
        let n_chars = stream_raw_images(reader, |_, raw| {
            for (i, &b) in ink.iter_mut().zip(raw) {
                *i = u8::from(b == 0);
            }
            resize_ink_into(&ink, &mut resized);
            // Grows with the data actually read (amortised doubling), never with the header's promise alone.
            images.extend_from_slice(&resized);
        })?;
        images.shrink_to_fit();
        Ok(Self { n_chars, alphabet: (0..n_chars as u32).collect(), images })
    }

    /// The same set with each character's alphabet (from [`alphabets::parse`]).
    pub fn with_alphabets(mut self, alphabet: Vec<u32>) -> Result<Self, AlphabetError> {
        if alphabet.len() != self.n_chars {
            return Err(AlphabetError::WrongLength { got: alphabet.len(), n_chars: self.n_chars });
        }
        self.alphabet = alphabet;
        Ok(self)
    }

    /// Alphabet number of character `ch` (panics only on an out-of-range index, a caller's bug).
    pub fn alphabet_of(&self, ch: usize) -> u32 {
        self.alphabet[ch]
    }

    /// Number of characters (classes) in the set.
    pub fn n_chars(&self) -> usize {
        self.n_chars
    }

    /// The 28×28 image (row-major, [`PIXELS`] values in `[0, 1]`) of drawing `drawer` of character `ch`. Panics only
    /// on out-of-range indices (caller's bug).
    pub fn image(&self, ch: usize, drawer: usize) -> &[f32] {
        assert!(
            ch < self.n_chars && drawer < DRAWERS,
            "Omniglot image ({ch}, {drawer}) out of range: the set has {} characters × {DRAWERS} drawers",
            self.n_chars
        );
        let start = (ch * DRAWERS + drawer) * PIXELS;
        &self.images[start..start + PIXELS]
    }

    /// Build from already-resized images (for tests elsewhere): images.len() must equal n_chars*DRAWERS*PIXELS.
    ///
    /// `n_chars` must be at least 1 and every value must lie in `[0, 1]`, as [`OmniglotSet::from_npz`] guarantees.
    pub fn from_images(n_chars: usize, images: Vec<f32>) -> Result<Self, OmniglotError> {
        if n_chars == 0 {
            return Err(OmniglotError::NoCharacters);
        }
        let expected = n_chars.saturating_mul(DRAWERS).saturating_mul(PIXELS);
        if images.len() != expected {
            return Err(OmniglotError::WrongImageCount { n_chars, expected, found: images.len() });
        }
        if let Some((index, &value)) = images.iter().enumerate().find(|(_, v)| !(0.0..=1.0).contains(*v)) {
            return Err(OmniglotError::ValueOutOfRange { index, value });
        }
        Ok(Self { n_chars, alphabet: (0..n_chars as u32).collect(), images })
    }
}

/// Area-resize one 105×105 binary image (true = ink here, i.e. already inverted) to 28×28.
///
/// `ink` is row-major with `SOURCE_SIDE * SOURCE_SIDE` pixels; the result has [`PIXELS`] values in `[0, 1]`, each
/// the fraction of its 3.75×3.75 source square that is ink. Panics if `ink.len() != SOURCE_SIDE * SOURCE_SIDE`
/// (a caller's bug).
pub fn resize_area(ink: &[bool]) -> Vec<f32> {
    assert_eq!(ink.len(), SOURCE_PIXELS, "resize_area expects a {SOURCE_SIDE}×{SOURCE_SIDE} image");
    let mut src = [0u8; SOURCE_PIXELS];
    for (s, &i) in src.iter_mut().zip(ink) {
        *s = u8::from(i);
    }
    let mut out = vec![0f32; PIXELS];
    resize_ink_into(&src, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------------------------
// Resize
// ---------------------------------------------------------------------------------------------------------------

/// The most source rows (or columns) one output row (or column) overlaps: `ceil(105 / 28) + 1 = 5`.
const MAX_TAPS: usize = SOURCE_SIDE.div_ceil(SIDE) + 1;

/// The source pixels one output pixel overlaps along one axis, and by how much.
#[derive(Clone, Copy)]
struct Taps {
    /// First source index overlapped.
    start: usize,
    /// Number of source indices overlapped (at most `MAX_TAPS`).
    len: usize,
    /// Overlap of each, in units of 1/SIDE of a source pixel; they sum to `SOURCE_SIDE`.
    weight: [u32; MAX_TAPS],
}

// The area resize only shrinks.
const _: () = assert!(SOURCE_SIDE >= SIDE);

/// The per-axis taps of the 105 → 28 area resize, computed at compile time.
const TAPS: [Taps; SIDE] = area_taps();

/// Normaliser: the product of the two axes' weight sums (`SOURCE_SIDE²` = 11,025).
const NORM: f32 = (SOURCE_SIDE * SOURCE_SIDE) as f32;

/// Computes [`TAPS`]. On a grid of 1/SIDE of a source pixel, output pixel `o` covers
/// `[o * SOURCE_SIDE, (o + 1) * SOURCE_SIDE)` and source pixel `j` covers `[j * SIDE, (j + 1) * SIDE)`, so every
/// overlap is an exact integer.
const fn area_taps() -> [Taps; SIDE] {
    let mut taps = [Taps { start: 0, len: 0, weight: [0; MAX_TAPS] }; SIDE];
    let mut o = 0;
    while o < SIDE {
        let lo = o * SOURCE_SIDE;
        let hi = lo + SOURCE_SIDE;
        let first = lo / SIDE;
        let last = (hi - 1) / SIDE;
        let mut j = first;
        while j <= last {
            let s_lo = j * SIDE;
            let s_hi = s_lo + SIDE;
            let from = if lo > s_lo { lo } else { s_lo };
            let to = if hi < s_hi { hi } else { s_hi };
            taps[o].weight[j - first] = (to - from) as u32;
            j += 1;
        }
        taps[o].start = first;
        taps[o].len = last - first + 1;
        o += 1;
    }
    taps
}

/// Area-resizes one source image given as 0/1 ink bytes (`SOURCE_PIXELS` of them) into `out` (`PIXELS`).
fn resize_ink_into(ink: &[u8], out: &mut [f32]) {
    debug_assert_eq!(ink.len(), SOURCE_PIXELS);
    debug_assert_eq!(out.len(), PIXELS);
    // Horizontal pass: every source row reduced to SIDE weighted column sums (each at most SOURCE_SIDE).
    let mut rows = [0u32; SOURCE_SIDE * SIDE];
    for (src_row, dst_row) in ink.chunks_exact(SOURCE_SIDE).zip(rows.chunks_exact_mut(SIDE)) {
        for (t, d) in TAPS.iter().zip(dst_row.iter_mut()) {
            let src = &src_row[t.start..t.start + t.len];
            *d = src.iter().zip(&t.weight).map(|(&p, &w)| u32::from(p) * w).sum();
        }
    }
    // Vertical pass: SIDE weighted sums of those rows; the total is at most SOURCE_SIDE², exact in u32 and f32.
    for (t, out_row) in TAPS.iter().zip(out.chunks_exact_mut(SIDE)) {
        let mut acc = [0u32; SIDE];
        for k in 0..t.len {
            let w = t.weight[k];
            let row = &rows[(t.start + k) * SIDE..(t.start + k + 1) * SIDE];
            for (a, &r) in acc.iter_mut().zip(row) {
                *a += w * r;
            }
        }
        for (o, &a) in out_row.iter_mut().zip(&acc) {
            *o = a as f32 / NORM;
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Reading the .npz
// ---------------------------------------------------------------------------------------------------------------

/// Opens `reader` as an `.npz`, validates `images.npy`'s header, then calls `on_image(index, raw)` for every
/// image in order (`index = c * DRAWERS + d`; `raw` is the image's `SOURCE_PIXELS` bytes as stored, non-zero =
/// background), then checks `labels.npy` if present. Returns the number of characters.
fn stream_raw_images<R: Read + Seek>(
    reader: R,
    mut on_image: impl FnMut(usize, &[u8]),
) -> Result<usize, OmniglotError> {
    let mut archive = zip::ZipArchive::new(reader).map_err(|e| OmniglotError::NotZip { reason: e.to_string() })?;

    let n_chars = {
        let mut file =
            open_entry(&mut archive, IMAGES_ENTRY)?.ok_or(OmniglotError::MissingEntry { entry: IMAGES_ENTRY })?;
        let header = read_npy_header(&mut file, IMAGES_ENTRY)?;
        let n_chars = check_images_header(&header)?;
        let n_images = n_chars * DRAWERS;
        let expected = (n_images * SOURCE_PIXELS) as u64;
        let mut raw = [0u8; SOURCE_PIXELS];
        for index in 0..n_images {
            let got = read_full(&mut file, &mut raw, IMAGES_ENTRY)?;
            if got < SOURCE_PIXELS {
                let found = (index * SOURCE_PIXELS + got) as u64;
                return Err(OmniglotError::Truncated { entry: IMAGES_ENTRY, part: "image data", expected, found });
            }
            on_image(index, &raw);
        }
        expect_end(&mut file, IMAGES_ENTRY, expected)?;
        n_chars
    };

    if let Some(mut file) = open_entry(&mut archive, LABELS_ENTRY)? {
        let header = read_npy_header(&mut file, LABELS_ENTRY)?;
        check_labels_header(&header, n_chars)?;
        check_labels(&mut file, n_chars)?;
    }
    Ok(n_chars)
}

/// Opens entry `name` of the archive; `Ok(None)` if there is no such entry.
fn open_entry<'a, R: Read + Seek>(
    archive: &'a mut zip::ZipArchive<R>,
    name: &'static str,
) -> Result<Option<impl Read + 'a>, OmniglotError> {
    match archive.by_name(name) {
        Ok(file) => Ok(Some(file)),
        Err(zip::result::ZipError::FileNotFound) => Ok(None),
        Err(e) => Err(OmniglotError::Zip { entry: name, reason: e.to_string() }),
    }
}

/// Reads into `buf` until it is full or the entry ends; returns the number of bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8], entry: &'static str) -> Result<usize, OmniglotError> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(OmniglotError::Io { entry, reason: e.to_string() }),
        }
    }
    Ok(filled)
}

/// Checks that the entry has nothing after its array data. Reading to the end also makes the zip reader verify
/// the entry's CRC.
fn expect_end(r: &mut impl Read, entry: &'static str, expected: u64) -> Result<(), OmniglotError> {
    let mut probe = [0u8; 1];
    if read_full(r, &mut probe, entry)? != 0 {
        return Err(OmniglotError::TrailingData { entry, expected });
    }
    Ok(())
}

/// Validates `images.npy`'s dtype, order and shape `(N, 20, 105, 105)`; returns `N`.
fn check_images_header(h: &NpyHeader) -> Result<usize, OmniglotError> {
    if !IMAGE_DTYPES.contains(&h.descr.as_str()) {
        let expected = IMAGE_DTYPES.iter().map(|d| format!("'{d}'")).collect::<Vec<_>>().join(" or ");
        return Err(OmniglotError::WrongDtype { entry: h.entry, expected, found: h.descr.clone() });
    }
    if h.fortran_order {
        return Err(OmniglotError::FortranOrder { entry: h.entry });
    }
    match h.shape[..] {
        [n, d, y, x] if (1..=MAX_CHARS).contains(&n) && d == DRAWERS as u64 && y == SOURCE_SIDE as u64 && x == y => {
            Ok(n as usize)
        }
        _ => Err(OmniglotError::WrongShape {
            entry: h.entry,
            expected: format!("(N, {DRAWERS}, {SOURCE_SIDE}, {SOURCE_SIDE}) with 1 <= N <= {MAX_CHARS}"),
            found: h.shape.clone(),
        }),
    }
}

/// Validates `labels.npy`'s dtype, order and shape `(n_chars, 20)`.
fn check_labels_header(h: &NpyHeader, n_chars: usize) -> Result<(), OmniglotError> {
    if h.descr != LABEL_DTYPE {
        return Err(OmniglotError::WrongDtype {
            entry: h.entry,
            expected: format!("'{LABEL_DTYPE}'"),
            found: h.descr.clone(),
        });
    }
    if h.fortran_order {
        return Err(OmniglotError::FortranOrder { entry: h.entry });
    }
    if h.shape[..] != [n_chars as u64, DRAWERS as u64] {
        return Err(OmniglotError::WrongShape {
            entry: h.entry,
            expected: format!("({n_chars}, {DRAWERS}) to match images.npy"),
            found: h.shape.clone(),
        });
    }
    Ok(())
}

/// Streams the label rows and checks `labels[c, d] == c`, then that the entry ends there.
fn check_labels(r: &mut impl Read, n_chars: usize) -> Result<(), OmniglotError> {
    const ROW_BYTES: usize = DRAWERS * 8;
    let expected = (n_chars * ROW_BYTES) as u64;
    let mut row = [0u8; ROW_BYTES];
    for character in 0..n_chars {
        let got = read_full(r, &mut row, LABELS_ENTRY)?;
        if got < ROW_BYTES {
            let found = (character * ROW_BYTES + got) as u64;
            return Err(OmniglotError::Truncated { entry: LABELS_ENTRY, part: "label data", expected, found });
        }
        for (drawer, bytes) in row.chunks_exact(8).enumerate() {
            let mut le = [0u8; 8];
            le.copy_from_slice(bytes);
            let found = i64::from_le_bytes(le);
            if found != character as i64 {
                return Err(OmniglotError::LabelsInconsistent { character, drawer, found });
            }
        }
    }
    expect_end(r, LABELS_ENTRY, expected)
}

pub mod alphabets;
pub mod classes;
mod npy;
pub mod split;
#[cfg(test)]
mod tests;

use npy::*;
