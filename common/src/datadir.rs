//! Where the data sets live when nothing says (one rule for the worker, the coordinator's local workers
//! and the tests): an explicit directory, else `$METATRAIN_DATA_DIR`, else the first `shared/data` or
//! `../shared/data` under one of the caller's roots that holds `omniglot/`. The one I/O here is checking
//! that a candidate is a directory.

use std::path::{Path, PathBuf};

/// The environment variable naming the data directory.
pub const ENV: &str = "METATRAIN_DATA_DIR";

/// Resolves the data directory: `flag`, else `$METATRAIN_DATA_DIR`, else `shared/data` or
/// `../shared/data` under each of `roots` in turn. `None` when nothing plausible exists.
pub fn resolve(flag: Option<&Path>, roots: &[PathBuf]) -> Option<PathBuf> {
    if let Some(p) = flag {
        return Some(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os(ENV) {
        return Some(PathBuf::from(p));
    }
    roots.iter().flat_map(|r| [r.join("shared/data"), r.join("../shared/data")]).find(|c| c.join("omniglot").is_dir())
}

/// This checkout's data directory, for tests: `$METATRAIN_DATA_DIR`, else `shared/data` inside the
/// checkout or `../shared` beside it.
pub fn for_tests() -> Option<PathBuf> {
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_default();
    resolve(None, &[checkout])
}

/// A file under the test data's `omniglot/`, or `None` with a note (the test then skips). Under `CI`
/// (set by `.ci/run`) missing data is a failure: CI always has the data, so a skip there would hide a
/// test that did not run.
pub fn omniglot_file_for_tests(name: &str) -> Option<PathBuf> {
    let found = for_tests().map(|d| d.join("omniglot").join(name)).filter(|p| p.is_file());
    if found.is_none() {
        let msg = format!(
            "the Omniglot file {name} was not found (${ENV}, shared/data in the checkout or ../shared/data beside it)"
        );
        assert!(std::env::var_os("CI").is_none(), "{msg}; CI must have the data");
        println!("SKIPPED: {msg}");
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_root_with_omniglot_wins_and_a_flag_wins_over_all() {
        let base = std::env::temp_dir().join(format!("metatrain-datadir-{}", std::process::id()));
        let (a, b) = (base.join("a"), base.join("b/inner"));
        std::fs::create_dir_all(a.join("shared/data")).unwrap(); // no omniglot/: not plausible
        std::fs::create_dir_all(base.join("b/shared/data/omniglot")).unwrap(); // ../shared/data of b/inner
        std::fs::create_dir_all(&b).unwrap();
        if std::env::var_os(ENV).is_none() {
            assert_eq!(resolve(None, &[a.clone(), b.clone()]), Some(b.join("../shared/data")));
            assert_eq!(resolve(None, std::slice::from_ref(&a)), None);
        }
        assert_eq!(resolve(Some(Path::new("/x")), &[b]), Some(PathBuf::from("/x")));
        std::fs::remove_dir_all(&base).unwrap();
    }
}
