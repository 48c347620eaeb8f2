//! What the crate's unit tests share.

use std::path::{Path, PathBuf};

/// A directory of a test's own under the system's temporary directory, removed (with what
/// it holds) when dropped, also when the test fails.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// A new, empty directory whose name starts with `updraft-{tag}-`.
    pub fn new(tag: &str) -> ScratchDir {
        let dir = std::env::temp_dir().join(format!("updraft-{tag}-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        ScratchDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
