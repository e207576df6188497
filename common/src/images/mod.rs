//! A folder of the user's own PNG images as classes of 28×28 grayscale images (`task.distribution = "images"`,
//! and `metatrain adapt`'s support sets).
//!
//! # Layout
//!
//! The classes are the directories under a root that hold `.png` files and have no class below them, at any
//! depth: `ROOT/<class>/<image>.png`, or Omniglot's official `ROOT/<alphabet>/<character>/<image>.png`, where
//! the class is named by its path relative to the root with `/` separators (`Balinese/character01`). Classes
//! are sorted by name (byte order of the UTF-8 names) and each class's images by file name, so indices are the
//! same on every machine. A directory holding both PNGs and classes below it, or PNGs directly in the root, is
//! an error rather than a guess. Other files are ignored, and so are names starting with `.` (see
//! `scan` for links and limits).
//!
//! # Pixels
//!
//! Any PNG the `png` crate expands (gray, gray + alpha, RGB, RGBA, palette; 1 to 16 bits): colour becomes
//! luma `0.299 R + 0.587 G + 0.114 B`, the foreground is `1 − luma` when `invert` (dark drawings on light
//! paper, like Omniglot; the default of `task.invert`) or `luma`, times alpha, and the image is area-averaged
//! to 28×28 ([`resize_area`], the generic form of [`crate::omniglot::resize_area`]). Values lie in [0, 1], 1.0
//! the foreground: an Omniglot PNG gives exactly the `.npz` split's image.
//!
//! # Limits
//!
//! A hostile folder cannot exhaust memory or time: the listing stops at [`MAX_ENTRIES`] entries,
//! [`MAX_DEPTH`] levels, [`MAX_CLASSES`] classes and [`MAX_IMAGES`] images before decoding anything; a file
//! over [`MAX_FILE_BYTES`] or whose header declares more than [`MAX_IMAGE_PIXELS`] pixels is refused before
//! its pixels are allocated. Every failure is an [`ImagesError`] naming the file, class or folder.
//!
//! This is the one module of the crate that reads files (listing and opening them, in `scan` and
//! [`load_image`]); decoding (`decode`) and resizing ([`resize_area`]) work on bytes and numbers, so that
//! every binary reads a user's folder the same way.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::omniglot::PIXELS;

mod decode;
mod resize;
mod scan;
mod split;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_omniglot;

pub use resize::resize_area;
pub use split::ImageSplits;

/// Most classes a folder may hold: 100,000 is far above Omniglot's 1,623 characters or ImageNet-21k's
/// 21,841 classes, and bounds the names kept in memory.
pub const MAX_CLASSES: usize = 100_000;
/// Most images a folder may hold. Each is kept as 784 f32 values (3,136 bytes), so 200,000 images are at most
/// 627 MB; Omniglot has 32,460.
pub const MAX_IMAGES: usize = 200_000;
/// Most pixels one PNG's header may declare (4096 × 4096). The decoded frame of the largest, RGBA at 16 bits,
/// is 128 MiB and lives only while that image is resized.
pub const MAX_IMAGE_PIXELS: u64 = 4096 * 4096;
/// Largest PNG file read, in bytes: 64 MiB is far above any compressed image within [`MAX_IMAGE_PIXELS`] that
/// a user would train on, and bounds the time spent on one file.
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// Most directory entries (files and folders) listed under one root, so that a folder of millions of
/// unrelated files fails fast instead of being listed for minutes.
pub const MAX_ENTRIES: usize = 2_000_000;
/// Deepest directory level searched below the root: Omniglot needs 2; 32 is generous for any real layout and
/// bounds the recursion.
pub const MAX_DEPTH: usize = 32;
/// Memory the PNG decoder may allocate for its own buffers (chunks, metadata, one row), in bytes: the `png`
/// crate's default. The output frame is sized from the header, bounded by [`MAX_IMAGE_PIXELS`].
const DECODER_MEMORY_BYTES: usize = 64 << 20;

/// Why an image folder or image could not be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ImagesError {
    #[error("the image folder {} does not exist", path.display())]
    RootMissing { path: PathBuf },
    #[error("the image folder {} is not a directory", path.display())]
    RootNotDirectory { path: PathBuf },
    #[error("cannot read {}: {reason}", path.display())]
    Unreadable { path: PathBuf, reason: String },
    #[error("{} is not a decodable PNG image: {reason}", path.display())]
    NotPng { path: PathBuf, reason: String },
    #[error("{} is {width}×{height} pixels; an image may have at most {max} pixels", path.display())]
    ImageTooLarge { path: PathBuf, width: u32, height: u32, max: u64 },
    #[error("{} is {bytes} bytes; a PNG file may have at most {max} bytes", path.display())]
    FileTooLarge { path: PathBuf, bytes: u64, max: u64 },
    #[error(
        "{} holds .png images and also class folders below it: put images only in the class (leaf) folders",
        dir.display()
    )]
    MixedDirectory { dir: PathBuf },
    #[error(
        "{} holds .png images directly: put each class's images in a folder of its own, <root>/<class>/<image>.png",
        root.display()
    )]
    ImagesAtRoot { root: PathBuf },
    #[error("no classes under {}: expected folders of .png images, <root>/<class>/<image>.png", root.display())]
    NoClasses { root: PathBuf },
    #[error("{} holds more than {max} classes", root.display())]
    TooManyClasses { root: PathBuf, max: usize },
    #[error("{} holds more than {max} .png images", root.display())]
    TooManyImages { root: PathBuf, max: usize },
    #[error("{} holds more than {max} files and folders", root.display())]
    TooManyEntries { root: PathBuf, max: usize },
    #[error("{} lies more than {max} folders deep", path.display())]
    TooDeep { path: PathBuf, max: usize },
    #[error("the class folder {} has a name that is not UTF-8", path.display())]
    NonUtf8Name { path: PathBuf },
    #[error(
        "class `{class}` in {} has {have} images; an episode needs k_shot + q_query = {k_shot} + {q_query} = {}",
        root.display(), k_shot + q_query
    )]
    TooFewImages { class: String, root: PathBuf, have: usize, k_shot: usize, q_query: usize },
    #[error("the {split} classes ({}) number {have}; an episode needs {need}", root.display())]
    TooFewClasses { split: &'static str, root: PathBuf, have: usize, need: usize },
    #[error(
        "task.eval_root {} and task.root {} overlap (one lies inside the other): held-out classes must not be meta-training classes",
        eval_root.display(), root.display()
    )]
    RootsOverlap { root: PathBuf, eval_root: PathBuf },
    #[error(
        "class `{class}` is in both task.root {} and task.eval_root {}: held-out classes must not be meta-training classes",
        root.display(), eval_root.display()
    )]
    SharedClass { class: String, root: PathBuf, eval_root: PathBuf },
    #[error("the held-out fraction must be in (0, 1), got {fraction}")]
    InvalidFraction { fraction: f64 },
    #[error("class `{class}` image {index} has {found} values, expected {PIXELS} (28×28)")]
    WrongImageLength { class: String, index: usize, found: usize },
    #[error("class `{class}` image {index} has value {value} at pixel {pixel}, expected a number in [0, 1]")]
    ValueOutOfRange { class: String, index: usize, pixel: usize, value: f32 },
    #[error("class `{class}` appears twice or out of name order")]
    ClassOrder { class: String },
}

/// The classes of an image folder, each with its images as 28×28 row-major foreground values in [0, 1].
#[derive(Clone, PartialEq)]
pub struct ImageFolder {
    /// The folder the classes were read from (as given, not canonicalised).
    root: PathBuf,
    /// Class names, sorted, distinct.
    classes: Vec<String>,
    /// Each class's image files, sorted by file name (empty for folders built in memory).
    files: Vec<Vec<PathBuf>>,
    /// Each class's images, [`PIXELS`] values each, in the order of `files`.
    images: Vec<Vec<Vec<f32>>>,
    /// Each class's group (classes sharing a parent folder, e.g. an Omniglot alphabet, share one).
    groups: Vec<u32>,
}

impl std::fmt::Debug for ImageFolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageFolder")
            .field("root", &self.root)
            .field("classes", &self.classes.len())
            .field("images", &self.n_images())
            .finish()
    }
}

impl ImageFolder {
    /// Finds the classes under `root` (see the module doc) and decodes every image; `invert`: dark pixels
    /// are the foreground.
    pub fn load(root: &Path, invert: bool) -> Result<ImageFolder, ImagesError> {
        let found = scan::find_classes(root)?;
        let mut classes = Vec::with_capacity(found.len());
        let mut files = Vec::with_capacity(found.len());
        let mut images = Vec::with_capacity(found.len());
        for class in found {
            let decoded = class.files.iter().map(|f| load_image(f, invert)).collect::<Result<Vec<_>, _>>()?;
            classes.push(class.name);
            files.push(class.files);
            images.push(decoded);
        }
        let groups = groups_of(&classes);
        Ok(ImageFolder { root: root.to_path_buf(), classes, files, images, groups })
    }

    /// A folder built in memory (tests, synthetic data): `(name, images)` per class, names distinct and in
    /// sorted order, every image [`PIXELS`] values in [0, 1]. Classes may hold any number of images.
    pub fn from_classes(
        root: impl Into<PathBuf>,
        classes: Vec<(String, Vec<Vec<f32>>)>,
    ) -> Result<ImageFolder, ImagesError> {
        for (i, (class, imgs)) in classes.iter().enumerate() {
            if i > 0 && classes[i - 1].0 >= *class {
                return Err(ImagesError::ClassOrder { class: class.clone() });
            }
            for (index, img) in imgs.iter().enumerate() {
                if img.len() != PIXELS {
                    return Err(ImagesError::WrongImageLength { class: class.clone(), index, found: img.len() });
                }
                if let Some((pixel, &value)) = img.iter().enumerate().find(|(_, v)| !(0.0..=1.0).contains(*v)) {
                    return Err(ImagesError::ValueOutOfRange { class: class.clone(), index, pixel, value });
                }
            }
        }
        let files = vec![Vec::new(); classes.len()];
        let (classes, images): (Vec<String>, Vec<Vec<Vec<f32>>>) = classes.into_iter().unzip();
        let groups = groups_of(&classes);
        Ok(ImageFolder { root: root.into(), classes, files, images, groups })
    }

    /// The class names, sorted: relative paths with `/` separators.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// The images of class `class` (each [`PIXELS`] values, in file-name order); empty if there is no
    /// such class.
    pub fn images(&self, class: usize) -> &[Vec<f32>] {
        self.images.get(class).map_or(&[], Vec::as_slice)
    }

    /// The files the images of class `class` were read from, in the same order; empty if there is no such
    /// class or the folder was built in memory.
    pub fn files(&self, class: usize) -> &[PathBuf] {
        self.files.get(class).map_or(&[], Vec::as_slice)
    }

    /// The folder the classes were read from.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Number of classes.
    pub fn n_classes(&self) -> usize {
        self.classes.len()
    }

    /// Number of images in all classes.
    pub fn n_images(&self) -> usize {
        self.images.iter().map(Vec::len).sum()
    }

    /// The group of class `class`: classes in the same parent folder (an Omniglot alphabet) share a group;
    /// a class directly under the root is a group of its own. Groups number from 0 in class order.
    pub fn group_of(&self, class: usize) -> u32 {
        self.groups.get(class).copied().unwrap_or(u32::MAX)
    }

    /// SHA-256 (hex) of the class names and every pixel: equal on two machines iff they loaded the same
    /// classes and images, so the same task specs give the same tasks.
    pub fn fingerprint(&self) -> String {
        let mut h = Sha256::new();
        for (name, imgs) in self.classes.iter().zip(&self.images) {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((imgs.len() as u64).to_le_bytes());
            for img in imgs {
                for v in img {
                    h.update(v.to_le_bytes());
                }
            }
        }
        hex::encode(h.finalize())
    }

    /// (the classes not marked in `second`, those marked): both keep name order.
    fn partition(self, second: &[bool]) -> (ImageFolder, ImageFolder) {
        let empty = || ImageFolder {
            root: self.root.clone(),
            classes: Vec::new(),
            files: Vec::new(),
            images: Vec::new(),
            groups: Vec::new(),
        };
        let mut parts = [empty(), empty()];
        for (((c, class), files), images) in self.classes.into_iter().enumerate().zip(self.files).zip(self.images) {
            let part = &mut parts[usize::from(second[c])];
            part.classes.push(class);
            part.files.push(files);
            part.images.push(images);
        }
        let [mut first, mut second] = parts;
        first.groups = groups_of(&first.classes);
        second.groups = groups_of(&second.classes);
        (first, second)
    }
}

/// Group numbers for sorted class names: by parent path (the name up to its last `/`), numbered in order of
/// first appearance; a name without a parent is a group of its own.
fn groups_of(classes: &[String]) -> Vec<u32> {
    let mut ids: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
    let mut next = 0u32;
    classes
        .iter()
        .map(|name| {
            let mut fresh = || {
                next += 1;
                next - 1
            };
            match name.rsplit_once('/') {
                Some((parent, _)) => *ids.entry(parent).or_insert_with(fresh),
                None => fresh(),
            }
        })
        .collect()
}

/// Reads and decodes one PNG file to [`PIXELS`] foreground values in [0, 1] (see the module doc); `invert`:
/// dark pixels are the foreground.
pub fn load_image(path: &Path, invert: bool) -> Result<Vec<f32>, ImagesError> {
    let unreadable = |e: std::io::Error| ImagesError::Unreadable { path: path.to_path_buf(), reason: e.to_string() };
    // Checked before opening: opening a named pipe would block.
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if !meta.is_file() {
        return Err(ImagesError::NotPng { path: path.to_path_buf(), reason: "not a regular file".into() });
    }
    let file = File::open(path).map_err(unreadable)?;
    let bytes = file.metadata().map_err(unreadable)?.len();
    if bytes > MAX_FILE_BYTES {
        return Err(ImagesError::FileTooLarge { path: path.to_path_buf(), bytes, max: MAX_FILE_BYTES });
    }
    decode::decode_png(BufReader::new(file), invert).map_err(|p| p.named(path))
}

/// Decodes PNG bytes (already in memory) to [`PIXELS`] foreground values in [0, 1], as [`load_image`] does
/// for a file; `name` is only used in errors.
pub fn decode_image(bytes: &[u8], invert: bool, name: &Path) -> Result<Vec<f32>, ImagesError> {
    decode::decode_png(bytes, invert).map_err(|p| p.named(name))
}
