//! Reading user-named files with a size limit: a path may name a FIFO, a device such as `/dev/zero`, or
//! a huge file by mistake, and an unbounded read would exhaust memory before any validation ran.

use std::io::Read;
use std::path::Path;

/// Longest config, sweep or certificate file read (TOML and PEM files are a few KB).
pub const MAX_TEXT_FILE: u64 = 16 << 20;

/// Checks that `path` is a regular file of at most `max` bytes.
pub fn check_regular(path: &Path, max: u64) -> Result<u64, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    if meta.len() > max {
        return Err(format!("{} is {} bytes; at most {max} are read", path.display(), meta.len()));
    }
    Ok(meta.len())
}

/// Reads a regular UTF-8 text file of at most `max` bytes (also if it grows while being read).
pub fn read_text(path: &Path, max: u64) -> Result<String, String> {
    check_regular(path, max)?;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut text = String::new();
    file.take(max + 1).read_to_string(&mut text).map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > max {
        return Err(format!("{} grew beyond {max} bytes while being read", path.display()));
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_big_files_are_refused() {
        assert!(read_text(Path::new("/dev/zero"), MAX_TEXT_FILE).unwrap_err().contains("not a regular file"));
        assert!(read_text(Path::new("/"), MAX_TEXT_FILE).is_err());
        let dir = std::env::temp_dir().join(format!("metatrain-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.toml");
        std::fs::write(&f, "seed = 1\n").unwrap();
        assert_eq!(read_text(&f, 100).unwrap(), "seed = 1\n");
        assert!(read_text(&f, 4).unwrap_err().contains("at most 4"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
