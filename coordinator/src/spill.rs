//! Where gradients wait when they may not stay in memory.
//!
//! The reduction is taken in task-index order (see [`crate::aggregate`]), so a result that arrives before
//! a lower index must wait. For a 100M-parameter model each waiting gradient is 400 MB; beyond
//! `cluster.reorder_memory_mb` the collector hands them to a [`SpillStore`] and reads them back, a chunk
//! at a time, when their turn comes. The collector only sees the trait; [`FileSpill`] is the one that
//! does I/O, [`MemorySpill`] is for tests.
//!
//! A spilled gradient was validated before it was stored. It is checked again when it is read back
//! (every value finite, the length it was stored with), so a failing disk cannot put garbage into the
//! mean: the run stops with the error instead.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Values read or written per call: 1 MiB of f32, large enough for sequential disk speed, small enough
/// that reading back a gradient never holds more than this besides the sum.
pub const SPILL_CHUNK: usize = 1 << 18;

/// A stored gradient: where it is and how many values it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    offset: u64,
    len: usize,
}

impl Ticket {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

#[derive(Debug, Error)]
pub enum SpillError {
    #[error("could not create a spill file in {dir}: {source} (set cluster.spill_dir to a writable folder)")]
    Create { dir: PathBuf, source: std::io::Error },
    #[error("writing a gradient to the spill file in {dir}: {source}")]
    Write { dir: PathBuf, source: std::io::Error },
    #[error("reading a gradient back from the spill file in {dir}: {source}")]
    Read { dir: PathBuf, source: std::io::Error },
    #[error(
        "a spilled gradient read back with a non-finite value at index {index}: the spill file in {dir} is damaged"
    )]
    Damaged { dir: PathBuf, index: usize },
    #[error("read of values {start}..{end} of a spilled gradient of {len}")]
    OutOfRange { start: usize, end: usize, len: usize },
}

/// Stores gradients and reads ranges of them back.
pub trait SpillStore: Send {
    /// Stores `values` (finite, already validated); the ticket reads them back.
    fn put(&mut self, values: &[f32]) -> Result<Ticket, SpillError>;
    /// Reads values `start .. start + out.len()` of a stored gradient into `out`, checking each is finite.
    fn read(&mut self, ticket: Ticket, start: usize, out: &mut [f32]) -> Result<(), SpillError>;
}

fn check_range(ticket: Ticket, start: usize, n: usize) -> Result<(), SpillError> {
    match start.checked_add(n) {
        Some(end) if end <= ticket.len => Ok(()),
        _ => Err(SpillError::OutOfRange { start, end: start.saturating_add(n), len: ticket.len }),
    }
}

/// An anonymous file in a folder: created on the first `put`, unlinked at once (so nothing is left
/// behind, whatever ends the process), and freed when the store is dropped.
pub struct FileSpill {
    dir: PathBuf,
    file: Option<File>,
    end: u64,
    bytes: Vec<u8>,
}

impl FileSpill {
    /// A store in `dir` (created if missing); nothing touches the disk before the first `put`.
    pub fn new(dir: &Path) -> FileSpill {
        FileSpill { dir: dir.to_path_buf(), file: None, end: 0, bytes: Vec::new() }
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.end
    }

    fn file(&mut self) -> Result<&File, SpillError> {
        match &mut self.file {
            Some(f) => Ok(f),
            none => Ok(none.insert(create_unlinked(&self.dir)?)),
        }
    }
}

/// Checks at start that `dir` takes a spill file (creates one, unlinked, and drops it), so a folder
/// that cannot is reported before the run rather than at its first spilled gradient.
pub fn probe(dir: &Path) -> Result<(), SpillError> {
    create_unlinked(dir).map(drop)
}

/// A new file in `dir` (made if missing), unlinked as soon as it is open.
fn create_unlinked(dir: &Path) -> Result<File, SpillError> {
    let create = |source| SpillError::Create { dir: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(create)?;
    let mut attempt = 0u32;
    loop {
        let path = dir.join(format!(".metatrain-spill-{}-{}-{attempt}", std::process::id(), unique()));
        match OpenOptions::new().read(true).write(true).create_new(true).open(&path) {
            Ok(file) => {
                std::fs::remove_file(&path).map_err(create)?;
                return Ok(file);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempt < 100 => attempt += 1,
            Err(e) => return Err(create(e)),
        }
    }
}

/// A number that differs between stores of one process.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl SpillStore for FileSpill {
    fn put(&mut self, values: &[f32]) -> Result<Ticket, SpillError> {
        let offset = self.end;
        let dir = self.dir.clone();
        let mut bytes = std::mem::take(&mut self.bytes);
        let mut written = offset;
        let result = (|| {
            let file = self.file()?;
            for chunk in values.chunks(SPILL_CHUNK) {
                bytes.clear();
                bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
                file.write_all_at(&bytes, written).map_err(|source| SpillError::Write { dir: dir.clone(), source })?;
                written += bytes.len() as u64;
            }
            Ok(())
        })();
        self.bytes = bytes;
        // After a failed write `end` stays put: the next `put` overwrites what was written of this one.
        result?;
        self.end = written;
        Ok(Ticket { offset, len: values.len() })
    }

    fn read(&mut self, ticket: Ticket, start: usize, out: &mut [f32]) -> Result<(), SpillError> {
        check_range(ticket, start, out.len())?;
        let dir = self.dir.clone();
        let mut bytes = std::mem::take(&mut self.bytes);
        let result = (|| {
            let file = self.file.as_ref().ok_or_else(|| SpillError::Read {
                dir: dir.clone(),
                source: std::io::Error::other("nothing was spilled"),
            })?;
            for (i, chunk) in out.chunks_mut(SPILL_CHUNK).enumerate() {
                let first = start + i * SPILL_CHUNK;
                bytes.resize(chunk.len() * 4, 0);
                file.read_exact_at(&mut bytes, ticket.offset + first as u64 * 4)
                    .map_err(|source| SpillError::Read { dir: dir.clone(), source })?;
                for (j, (v, b)) in chunk.iter_mut().zip(bytes.chunks_exact(4)).enumerate() {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    if !v.is_finite() {
                        return Err(SpillError::Damaged { dir: dir.clone(), index: first + j });
                    }
                }
            }
            Ok(())
        })();
        self.bytes = bytes;
        result
    }
}

/// Keeps "spilled" gradients in memory: for tests of the collector's bookkeeping.
#[derive(Default)]
pub struct MemorySpill {
    values: Vec<f32>,
    /// Gradients stored so far.
    pub puts: usize,
    /// Refuse every `put` (a full disk).
    pub refuse: bool,
}

impl MemorySpill {
    /// A store whose every `put` fails, as on a full disk.
    pub fn refusing() -> MemorySpill {
        MemorySpill { refuse: true, ..MemorySpill::default() }
    }
}

impl SpillStore for MemorySpill {
    fn put(&mut self, values: &[f32]) -> Result<Ticket, SpillError> {
        if self.refuse {
            return Err(SpillError::Write { dir: PathBuf::from("(memory)"), source: std::io::Error::other("refused") });
        }
        let offset = self.values.len() as u64;
        self.values.extend_from_slice(values);
        self.puts += 1;
        Ok(Ticket { offset, len: values.len() })
    }

    fn read(&mut self, ticket: Ticket, start: usize, out: &mut [f32]) -> Result<(), SpillError> {
        check_range(ticket, start, out.len())?;
        let from = ticket.offset as usize + start;
        out.copy_from_slice(&self.values[from..from + out.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("metatrain-spill-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_file_store_gives_back_what_it_was_given_and_leaves_nothing_behind() {
        let dir = temp_dir("roundtrip");
        let mut store = FileSpill::new(&dir);
        // Larger than a chunk, and not a multiple of one, so reads cross chunk boundaries.
        let a: Vec<f32> = (0..SPILL_CHUNK * 2 + 17).map(|i| (i as f32).sin() * 1e-3).collect();
        let b: Vec<f32> = vec![f32::MIN_POSITIVE, -0.0, f32::MAX, 1e-45];
        let ta = store.put(&a).unwrap();
        let tb = store.put(&b).unwrap();
        assert_eq!(store.bytes_written(), (a.len() + b.len()) as u64 * 4);
        // The file is unlinked as soon as it exists.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let mut out = vec![0.0; b.len()];
        store.read(tb, 0, &mut out).unwrap();
        assert_eq!(
            out.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
        let mut whole = vec![0.0; a.len()];
        store.read(ta, 0, &mut whole).unwrap();
        assert_eq!(whole, a);
        let mut part = vec![0.0; 1000];
        store.read(ta, SPILL_CHUNK - 500, &mut part).unwrap();
        assert_eq!(part, a[SPILL_CHUNK - 500..SPILL_CHUNK + 500]);
        assert!(matches!(store.read(tb, 2, &mut [0.0; 3]), Err(SpillError::OutOfRange { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_value_is_refused_on_the_way_back() {
        let dir = temp_dir("damaged");
        let mut store = FileSpill::new(&dir);
        let t = store.put(&[1.0, 2.0, 3.0]).unwrap();
        // Damage the second value behind the store's back.
        store.file.as_ref().unwrap().write_all_at(&f32::NAN.to_le_bytes(), 4).unwrap();
        let err = store.read(t, 0, &mut [0.0; 3]).unwrap_err();
        assert!(matches!(err, SpillError::Damaged { index: 1, .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_folder_that_cannot_be_made_is_a_clear_error() {
        let file = temp_dir("not-a-dir");
        std::fs::write(&file, b"x").unwrap();
        let err = FileSpill::new(&file.join("sub")).put(&[1.0]).unwrap_err();
        assert!(err.to_string().contains("cluster.spill_dir"), "{err}");
        std::fs::remove_file(&file).unwrap();
    }
}
