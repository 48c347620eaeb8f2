//! Download progress that survives a restart: which blocks are written, and what for.
//!
//! The C agent keeps its bitmap in RAM only, so a reboot mid-download starts over
//! (reference §0.17, §4.10). This agent checkpoints a [`ResumeState`] through a
//! [`ResumeStore`] before every block request — after the PAL has made the blocks durable
//! ([`crate::pal::Pal::flush`]) — so a restart continues from the last checkpoint and fetches
//! again at most the blocks of one request. A checkpoint that matches the job delivered after
//! the restart (same job, stream, file, size, block size, signature) is used; any other is
//! discarded.
//!
//! [`FileResumeStore`] writes atomically: a temporary file, `fsync`, `rename`, then `fsync`
//! of the directory, so a power cut leaves either the old or the new checkpoint.

use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::StoreError;
use crate::pal::FileContext;

/// Which blocks are still missing: bit `i` (byte `i / 8`, mask `1 << (i % 8)`, the Streams
/// bitmap layout) is set while block `i` is missing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    bits: Vec<u8>,
    len: u64,
}

impl Bitmap {
    /// `len` blocks, all missing.
    pub fn all_missing(len: u64) -> Self {
        let bytes = usize::try_from(len.div_ceil(8)).unwrap_or(0);
        let mut bits = vec![0xff; bytes];
        if !len.is_multiple_of(8)
            && let Some(last) = bits.last_mut()
        {
            *last = (1u8 << (len % 8)) - 1;
        }
        Bitmap { bits, len }
    }

    /// From stored bytes; `None` if they do not describe exactly `len` blocks.
    pub fn from_bytes(bits: Vec<u8>, len: u64) -> Option<Self> {
        if bits.len() as u64 != len.div_ceil(8) {
            return None;
        }
        if !len.is_multiple_of(8) && bits.last().is_some_and(|b| b >> (len % 8) != 0) {
            return None;
        }
        Some(Bitmap { bits, len })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// The number of blocks.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_missing(&self, block: u64) -> bool {
        block < self.len
            && usize::try_from(block / 8)
                .ok()
                .and_then(|i| self.bits.get(i))
                .is_some_and(|b| b & (1 << (block % 8)) != 0)
    }

    /// Marks a block received; `true` if it was missing.
    pub fn mark_received(&mut self, block: u64) -> bool {
        if !self.is_missing(block) {
            return false;
        }
        if let Some(b) = usize::try_from(block / 8)
            .ok()
            .and_then(|i| self.bits.get_mut(i))
        {
            *b &= !(1 << (block % 8));
        }
        true
    }

    /// How many blocks are missing.
    pub fn missing(&self) -> u64 {
        self.bits.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// The missing blocks, in order.
    pub fn missing_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.bits.iter().enumerate().flat_map(|(i, &b)| {
            (0..8u64)
                .filter(move |k| b & (1 << k) != 0)
                .map(move |k| i as u64 * 8 + k)
        })
    }
}

/// Where the download of a checkpointed job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Blocks are being received.
    Downloading,
    /// Every block is written, the signature verified, `self_test: ready` reported; the
    /// image waits for activation.
    Verified,
}

/// One checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeState {
    /// Format version of this record.
    pub format: u32,
    pub job_id: String,
    pub stream_name: String,
    pub file_id: u32,
    pub file_path: String,
    pub file_size: u64,
    pub file_type: u32,
    pub block_size: u32,
    pub cert_file: String,
    /// base64 of the DER signature.
    pub signature: String,
    pub phase: Phase,
    /// base64 of the missing-blocks bitmap.
    pub missing: String,
}

impl ResumeState {
    pub const FORMAT: u32 = 1;

    pub fn new(file: &FileContext, stream_name: &str, missing: &Bitmap, phase: Phase) -> Self {
        ResumeState {
            format: Self::FORMAT,
            job_id: file.job_id.clone(),
            stream_name: stream_name.to_owned(),
            file_id: file.file_id,
            file_path: file.file_path.clone(),
            file_size: file.file_size,
            file_type: file.file_type,
            block_size: file.block_size,
            cert_file: file.cert_file.clone(),
            signature: updraft_protocol::streams::base64_encode(&file.signature),
            phase,
            missing: updraft_protocol::streams::base64_encode(missing.as_bytes()),
        }
    }

    /// Whether this checkpoint is for exactly this file of this job.
    pub fn matches(&self, file: &FileContext, stream_name: &str) -> bool {
        self.format == Self::FORMAT
            && self.job_id == file.job_id
            && self.stream_name == stream_name
            && self.file_id == file.file_id
            && self.file_path == file.file_path
            && self.file_size == file.file_size
            && self.file_type == file.file_type
            && self.block_size == file.block_size
            && self.cert_file == file.cert_file
            && self.signature == updraft_protocol::streams::base64_encode(&file.signature)
    }

    /// The stored bitmap, if it is well-formed for the file.
    pub fn bitmap(&self) -> Option<Bitmap> {
        let blocks = self.file_size.div_ceil(u64::from(self.block_size.max(1)));
        updraft_protocol::streams::base64_decode(&self.missing)
            .and_then(|b| Bitmap::from_bytes(b, blocks))
    }
}

/// Where checkpoints live. One checkpoint at a time: the active job's.
pub trait ResumeStore: Send {
    fn load(&mut self) -> Result<Option<ResumeState>, StoreError>;
    fn save(&mut self, state: &ResumeState) -> Result<(), StoreError>;
    fn clear(&mut self) -> Result<(), StoreError>;
}

/// Checkpoints in one JSON file, replaced atomically.
#[derive(Debug, Clone)]
pub struct FileResumeStore {
    path: PathBuf,
}

impl FileResumeStore {
    /// Stores at `path` (its directory must exist); `path` + `.tmp` is the scratch file.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        FileResumeStore { path: path.into() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    #[cfg(test)]
    fn tmp_path(&self) -> PathBuf {
        crate::durable::tmp_path(&self.path)
    }

    fn failed(&self, f: crate::durable::Failed) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            action: f.action,
            source: f.source,
        }
    }
}

impl ResumeStore for FileResumeStore {
    fn load(&mut self) -> Result<Option<ResumeState>, StoreError> {
        let bytes = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    path: self.path.clone(),
                    action: "reading",
                    source,
                });
            }
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| StoreError::Corrupt {
                path: self.path.clone(),
                detail: e.to_string(),
            })
    }

    fn save(&mut self, state: &ResumeState) -> Result<(), StoreError> {
        let json = serde_json::to_vec(state).map_err(|e| StoreError::Corrupt {
            path: self.path.clone(),
            detail: e.to_string(),
        })?;
        crate::durable::replace(&self.path, &json).map_err(|f| self.failed(f))
    }

    fn clear(&mut self) -> Result<(), StoreError> {
        crate::durable::remove(&self.path).map_err(|f| self.failed(f))
    }
}

/// Checkpoints in memory, shared between clones (tests, the simulator, devices whose
/// platform has no persistent storage).
#[derive(Debug, Clone, Default)]
pub struct MemoryResumeStore {
    state: Arc<Mutex<Option<ResumeState>>>,
    saves: Arc<Mutex<u64>>,
}

impl MemoryResumeStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// The current checkpoint.
    pub fn get(&self) -> Option<ResumeState> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// How many checkpoints were saved.
    pub fn saves(&self) -> u64 {
        *self.saves.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ResumeStore for MemoryResumeStore {
    fn load(&mut self) -> Result<Option<ResumeState>, StoreError> {
        Ok(self.get())
    }

    fn save(&mut self, state: &ResumeState) -> Result<(), StoreError> {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = Some(state.clone());
        *self.saves.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        Ok(())
    }

    fn clear(&mut self) -> Result<(), StoreError> {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner) = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> FileContext {
        FileContext {
            job_id: "AFR_OTA-1".into(),
            file_path: "fw.bin".into(),
            file_size: 10_000,
            file_id: 0,
            file_type: 0,
            cert_file: "/c.pem".into(),
            signature: vec![0x30, 0x45, 1, 2],
            block_size: 1024,
        }
    }

    #[test]
    fn bitmap_layout_and_counts() {
        let mut b = Bitmap::all_missing(10);
        assert_eq!(b.as_bytes(), &[0xff, 0x03]);
        assert_eq!((b.len(), b.missing()), (10, 10));
        assert!(b.mark_received(0));
        assert!(!b.mark_received(0));
        assert!(b.mark_received(9));
        assert!(!b.mark_received(10));
        assert!(!b.is_missing(10));
        assert_eq!(b.as_bytes(), &[0xfe, 0x01]);
        assert_eq!(
            b.missing_blocks().collect::<Vec<_>>(),
            (1..9).collect::<Vec<_>>()
        );
        assert_eq!(Bitmap::all_missing(16).as_bytes(), &[0xff, 0xff]);
        assert_eq!(Bitmap::all_missing(0).missing(), 0);
        assert!(Bitmap::from_bytes(vec![0xff, 0x07], 10).is_none());
        assert!(Bitmap::from_bytes(vec![0xff], 10).is_none());
        assert_eq!(Bitmap::from_bytes(vec![0xfe, 0x01], 10), Some(b.clone()));
    }

    #[test]
    fn state_matches_only_its_file() {
        let c = ctx();
        let mut missing = Bitmap::all_missing(10);
        missing.mark_received(3);
        let s = ResumeState::new(&c, "AFR_OTA-s", &missing, Phase::Downloading);
        assert!(s.matches(&c, "AFR_OTA-s"));
        assert_eq!(s.bitmap(), Some(missing));
        assert!(!s.matches(&c, "AFR_OTA-other"));
        let changes: [fn(&mut FileContext); 6] = [
            |c: &mut FileContext| c.job_id.push('x'),
            |c: &mut FileContext| c.file_size += 1,
            |c: &mut FileContext| c.block_size = 2048,
            |c: &mut FileContext| c.signature.push(0),
            |c: &mut FileContext| c.file_id = 1,
            |c: &mut FileContext| c.cert_file.push('x'),
        ];
        for change in changes {
            let mut other = ctx();
            change(&mut other);
            assert!(!s.matches(&other, "AFR_OTA-s"));
        }
    }

    #[test]
    fn file_store_is_atomic_and_survives_reopen() {
        let dir = std::env::temp_dir().join(format!("updraft-agent-resume-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("resume.json");
        let mut store = FileResumeStore::new(&path);
        store.clear().expect("clear nothing");
        assert_eq!(store.load().expect("load"), None);
        let s = ResumeState::new(&ctx(), "s", &Bitmap::all_missing(10), Phase::Downloading);
        store.save(&s).expect("save");
        assert!(!store.tmp_path().exists());
        assert_eq!(
            FileResumeStore::new(&path).load().expect("load"),
            Some(s.clone())
        );
        let mut s2 = s.clone();
        s2.phase = Phase::Verified;
        store.save(&s2).expect("save again");
        assert_eq!(store.load().expect("load"), Some(s2));
        fs::write(&path, b"{torn").expect("corrupt");
        assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
        store.clear().expect("clear");
        assert_eq!(store.load().expect("load"), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn memory_store_is_shared() {
        let a = MemoryResumeStore::new();
        let mut b = a.clone();
        let s = ResumeState::new(&ctx(), "s", &Bitmap::all_missing(10), Phase::Downloading);
        b.save(&s).expect("save");
        assert_eq!(a.get(), Some(s));
        assert_eq!(a.saves(), 1);
        b.clear().expect("clear");
        assert_eq!(a.get(), None);
    }
}
