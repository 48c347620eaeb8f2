//! Files that survive a power cut whole: a replacement is written to a temporary file next
//! to its target, synced, renamed over it, and the directory synced, so what a restart finds
//! is either the old or the new contents — never a torn mix. Shared by the resume
//! checkpoints ([`crate::resume::FileResumeStore`]) and the Linux PAL's slot state.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// A step of a durable write that failed, and why.
#[derive(Debug)]
pub(crate) struct Failed {
    pub action: &'static str,
    pub source: io::Error,
}

fn step<T>(action: &'static str, r: io::Result<T>) -> Result<T, Failed> {
    r.map_err(|source| Failed { action, source })
}

/// The scratch file of `path`: `path` + `.tmp`.
pub(crate) fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Makes renames, creations and removals in `dir` durable. Directories can be opened and
/// synced on Unix; elsewhere a rename is as durable as the platform makes it.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        fs::File::open(dir)?.sync_all()?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Syncs the directory holding `path`.
pub(crate) fn sync_parent(path: &Path) -> io::Result<()> {
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

/// Replaces `path` with `bytes`, atomically and durably (its directory must exist).
pub(crate) fn replace(path: &Path, bytes: &[u8]) -> Result<(), Failed> {
    let tmp = tmp_path(path);
    {
        let mut f = step("creating the temporary file", fs::File::create(&tmp))?;
        step("writing the temporary file", f.write_all(bytes))?;
        step("syncing the temporary file", f.sync_all())?;
    }
    step("renaming the temporary file", fs::rename(&tmp, path))?;
    step("syncing the directory", sync_parent(path))
}

/// Removes `path` durably; a missing file is not an error.
pub(crate) fn remove(path: &Path) -> Result<(), Failed> {
    match fs::remove_file(path) {
        Ok(()) => step("syncing the directory", sync_parent(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Failed {
            action: "removing",
            source,
        }),
    }
}
