//! Where gradients wait when they may not stay in memory.
//!
//! The reduction is taken in task-index order (see [`crate::aggregate`]), so a result that arrives before
//! a lower index must wait. For a 100M-parameter model each waiting gradient is 400 MB; beyond
//! `cluster.reorder_memory_mb` the collector hands them to a [`SpillStore`] and reads them back, a chunk
//! at a time, when their turn comes. The collector only sees the trait; [`FileSpill`] is the one that
//! does I/O, [`MemorySpill`] is for tests.
//!
//! A spilled gradient was validated before it was stored. It is checked again when it is read back,
//! before any of it is used: each [`SPILL_CHUNK`] block against a checksum taken when it was written
//! (so a block lost to truncation, which reads back as zeros, or overwritten is caught), and every value
//! finite. A failing disk cannot put garbage into the mean: the run stops with the error instead.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Values read or written per call: 1 MiB of f32, large enough for sequential disk speed, small enough
/// that reading back a gradient never holds more than this besides the sum.
pub const SPILL_CHUNK: usize = 1 << 18;

/// A stored gradient: where it is, how many values it has, and (for a file) the index of its first
/// block's checksum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket {
    offset: u64,
    len: usize,
    block: usize,
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
    #[error(
        "values {start}..{end} of a spilled gradient read back other than written (checksum mismatch): the spill \
         file in {dir} is damaged"
    )]
    Corrupted { dir: PathBuf, start: usize, end: usize },
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
    /// One checksum per block written, in order; a ticket knows where its own start.
    sums: Vec<u64>,
}

impl FileSpill {
    /// A store in `dir` (created if missing); nothing touches the disk before the first `put`.
    pub fn new(dir: &Path) -> FileSpill {
        FileSpill { dir: dir.to_path_buf(), file: None, end: 0, bytes: Vec::new(), sums: Vec::new() }
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

/// A fast 64-bit checksum of a block's bytes (four independent multiply-rotate lanes; not
/// cryptographic: it guards against a damaged disk or file, not against an attacker with access to it).
fn checksum(bytes: &[u8]) -> u64 {
    const K: [u64; 4] = [0x9E37_79B9_7F4A_7C15, 0xC2B2_AE3D_27D4_EB4F, 0x1656_67B1_9E37_79F9, 0xFF51_AFD7_ED55_8CCD];
    let mut lanes = K;
    let mut words = bytes.chunks_exact(32);
    for w in &mut words {
        for (l, (lane, k)) in lanes.iter_mut().zip(K).enumerate() {
            let v = u64::from_le_bytes(w[8 * l..8 * l + 8].try_into().unwrap_or_default());
            *lane = (*lane ^ v).wrapping_mul(k).rotate_left(31);
        }
    }
    let mut h = bytes.len() as u64;
    for b in words.remainder() {
        h = (h ^ u64::from(*b)).wrapping_mul(K[0]).rotate_left(31);
    }
    for lane in lanes {
        h = (h ^ lane).wrapping_mul(K[1]).rotate_left(27);
    }
    h ^ (h >> 29)
}

/// A number that differs between stores of one process.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl SpillStore for FileSpill {
    fn put(&mut self, values: &[f32]) -> Result<Ticket, SpillError> {
        let (offset, block) = (self.end, self.sums.len());
        let dir = self.dir.clone();
        let mut bytes = std::mem::take(&mut self.bytes);
        let mut sums = std::mem::take(&mut self.sums);
        let mut written = offset;
        let result = (|| {
            let file = self.file()?;
            for chunk in values.chunks(SPILL_CHUNK) {
                bytes.clear();
                bytes.extend(chunk.iter().flat_map(|v| v.to_le_bytes()));
                file.write_all_at(&bytes, written).map_err(|source| SpillError::Write { dir: dir.clone(), source })?;
                sums.push(checksum(&bytes));
                written += bytes.len() as u64;
            }
            Ok(())
        })();
        self.bytes = bytes;
        self.sums = sums;
        // After a failed write `end` and the checksums stay put: the next `put` overwrites this one.
        if result.is_err() {
            self.sums.truncate(block);
        }
        result?;
        self.end = written;
        Ok(Ticket { offset, len: values.len(), block })
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
            // Whole blocks are read and checked before any value is used (the collector reads whole
            // blocks anyway; a range inside a block costs the rest of the block).
            let end = start + out.len();
            let mut at = start;
            while at < end {
                let b = at / SPILL_CHUNK;
                let (b_start, b_end) = (b * SPILL_CHUNK, ((b + 1) * SPILL_CHUNK).min(ticket.len));
                bytes.resize((b_end - b_start) * 4, 0);
                file.read_exact_at(&mut bytes, ticket.offset + b_start as u64 * 4)
                    .map_err(|source| SpillError::Read { dir: dir.clone(), source })?;
                if self.sums.get(ticket.block + b) != Some(&checksum(&bytes)) {
                    return Err(SpillError::Corrupted { dir: dir.clone(), start: b_start, end: b_end });
                }
                let take = end.min(b_end) - at;
                let from = (at - b_start) * 4;
                let dst = &mut out[at - start..at - start + take];
                for (j, (v, b)) in dst.iter_mut().zip(bytes[from..].chunks_exact(4)).enumerate() {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    if !v.is_finite() {
                        return Err(SpillError::Damaged { dir: dir.clone(), index: at + j });
                    }
                }
                at += take;
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
        Ok(Ticket { offset, len: values.len(), block: 0 })
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
        // Damage the second value behind the store's back: a finite change, then a NaN.
        store.file.as_ref().unwrap().write_all_at(&5.0f32.to_le_bytes(), 4).unwrap();
        let err = store.read(t, 0, &mut [0.0; 3]).unwrap_err();
        assert!(matches!(err, SpillError::Corrupted { start: 0, end: 3, .. }), "{err}");
        store.file.as_ref().unwrap().write_all_at(&f32::NAN.to_le_bytes(), 4).unwrap();
        assert!(store.read(t, 0, &mut [0.0; 3]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What a truncated file looks like once the next gradient re-extends it: a hole of zeros, every
    /// value finite. The block's checksum catches it, before any value of the block is handed out.
    #[test]
    fn a_block_lost_to_truncation_is_caught_not_read_as_zeros() {
        let dir = temp_dir("truncated");
        let mut store = FileSpill::new(&dir);
        let a: Vec<f32> = (0..SPILL_CHUNK * 2 + 5).map(|i| 1.0 + i as f32).collect();
        let ta = store.put(&a).unwrap();
        let file = store.file.as_ref().unwrap();
        file.set_len(SPILL_CHUNK as u64 * 4 + 8).unwrap(); // keeps the first block and 2 values
        let tb = store.put(&[7.0; 3]).unwrap(); // writes past the old end: the gap reads as zeros
        let mut out = vec![0.0; SPILL_CHUNK];
        store.read(ta, 0, &mut out).unwrap(); // the first block is intact
        assert_eq!(out[..], a[..SPILL_CHUNK]);
        let err = store.read(ta, SPILL_CHUNK, &mut out).unwrap_err();
        assert!(matches!(err, SpillError::Corrupted { .. }), "{err}");
        assert!(out.iter().all(|v| *v >= 1.0), "nothing of a bad block is written into the output");
        let mut b = [0.0; 3];
        store.read(tb, 0, &mut b).unwrap();
        assert_eq!(b, [7.0; 3]);
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
