//! Finding the classes under a root: the one place that lists directories.
//!
//! A class is a directory that holds `.png` files (extension in any case) and has no class below it. Names
//! starting with `.` are skipped (hidden files, macOS `._*` resource forks). Symbolic links are followed;
//! a directory reached twice (a link loop, or two links to one place) is read once, at its first place in
//! name order. Every limit ([`MAX_DEPTH`], [`MAX_ENTRIES`], [`MAX_CLASSES`], [`MAX_IMAGES`]) is checked
//! while listing, before any image is decoded.

use std::collections::HashSet;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use super::{ImagesError, MAX_CLASSES, MAX_DEPTH, MAX_ENTRIES, MAX_IMAGES};

/// A class found by [`find_classes`]: its name (the relative path, `/`-separated) and its PNG files sorted
/// by file name.
pub(crate) struct FoundClass {
    pub name: String,
    pub files: Vec<PathBuf>,
}

/// The classes under `root`, sorted by name.
pub(crate) fn find_classes(root: &Path) -> Result<Vec<FoundClass>, ImagesError> {
    match fs::metadata(root) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(ImagesError::RootNotDirectory { path: root.to_path_buf() }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ImagesError::RootMissing { path: root.to_path_buf() })
        }
        Err(e) => return Err(unreadable(root, &e)),
    }
    let mut walk = Walk { root, visited: HashSet::new(), entries: 0, images: 0, classes: Vec::new() };
    walk.dir(root, &[], 0)?;
    let mut classes = walk.classes;
    if classes.is_empty() {
        return Err(ImagesError::NoClasses { root: root.to_path_buf() });
    }
    classes.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(classes)
}

fn unreadable(path: &Path, e: &io::Error) -> ImagesError {
    ImagesError::Unreadable { path: path.to_path_buf(), reason: e.to_string() }
}

struct Walk<'a> {
    root: &'a Path,
    /// Canonical paths of the directories read so far.
    visited: HashSet<PathBuf>,
    /// Directory entries seen so far (bounded by [`MAX_ENTRIES`]).
    entries: usize,
    /// PNG files in the classes found so far (bounded by [`MAX_IMAGES`]).
    images: usize,
    classes: Vec<FoundClass>,
}

impl Walk<'_> {
    /// Reads `dir` (at `rel` below the root, `depth` levels down) and everything below it; returns whether
    /// a class was found at or below it.
    fn dir(&mut self, dir: &Path, rel: &[OsString], depth: usize) -> Result<bool, ImagesError> {
        if depth > MAX_DEPTH {
            return Err(ImagesError::TooDeep { path: dir.to_path_buf(), max: MAX_DEPTH });
        }
        let canonical = fs::canonicalize(dir).map_err(|e| unreadable(dir, &e))?;
        if !self.visited.insert(canonical) {
            return Ok(false);
        }
        let mut pngs = Vec::new();
        let mut subdirs = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| unreadable(dir, &e))? {
            let entry = entry.map_err(|e| unreadable(dir, &e))?;
            self.entries += 1;
            if self.entries > MAX_ENTRIES {
                return Err(ImagesError::TooManyEntries { root: self.root.to_path_buf(), max: MAX_ENTRIES });
            }
            let name = entry.file_name();
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let path = entry.path();
            let mut kind = entry.file_type().map_err(|e| unreadable(&path, &e))?;
            if kind.is_symlink() {
                kind = fs::metadata(&path).map_err(|e| unreadable(&path, &e))?.file_type();
            }
            if kind.is_dir() {
                subdirs.push(name);
            } else if kind.is_file() && is_png_name(&name) {
                pngs.push(name);
            }
        }
        subdirs.sort();
        let mut below = false;
        for sub in subdirs {
            let mut sub_rel = rel.to_vec();
            sub_rel.push(sub.clone());
            below |= self.dir(&dir.join(&sub), &sub_rel, depth + 1)?;
        }
        if pngs.is_empty() {
            return Ok(below);
        }
        if rel.is_empty() {
            return Err(ImagesError::ImagesAtRoot { root: self.root.to_path_buf() });
        }
        if below {
            return Err(ImagesError::MixedDirectory { dir: dir.to_path_buf() });
        }
        let name = class_name(rel).ok_or_else(|| ImagesError::NonUtf8Name { path: dir.to_path_buf() })?;
        if self.classes.len() >= MAX_CLASSES {
            return Err(ImagesError::TooManyClasses { root: self.root.to_path_buf(), max: MAX_CLASSES });
        }
        self.images += pngs.len();
        if self.images > MAX_IMAGES {
            return Err(ImagesError::TooManyImages { root: self.root.to_path_buf(), max: MAX_IMAGES });
        }
        pngs.sort();
        self.classes.push(FoundClass { name, files: pngs.into_iter().map(|n| dir.join(n)).collect() });
        Ok(true)
    }
}

/// Whether a file name ends in `.png` (any case).
pub(crate) fn is_png_name(name: &std::ffi::OsStr) -> bool {
    Path::new(name).extension().is_some_and(|e| e.eq_ignore_ascii_case("png"))
}

/// The relative path's components joined by `/`; `None` if one is not UTF-8.
fn class_name(rel: &[OsString]) -> Option<String> {
    let parts: Option<Vec<&str>> = rel.iter().map(|p| p.to_str()).collect();
    parts.map(|p| p.join("/"))
}
