//! A complete device in memory: a running image, a download slot, a bootloader that rolls
//! back uncommitted images on reset. For tests and the fleet simulator.
//!
//! [`MemoryPal`] is a cheap handle to a shared [`MemoryDevice`], so a test can keep one
//! handle to inspect the device while the agent owns another, and a "rebooted" agent can
//! be given the same device. Images may start with [`image_with_version`]'s header, from
//! which [`Pal::image_version`] reads the version (so downgrades are refused before
//! activation); images without it have an unknown version.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::error::{PalError, PalStatus};
use crate::pal::{FileContext, ImageState, Pal, PalImageState};
use crate::version::AppVersion;

/// The magic of the in-memory device's image header: `UPDRAFT` then format 1.
pub const IMAGE_MAGIC: [u8; 8] = *b"UPDRAFT\x01";

/// An image whose first 12 bytes carry its version: [`IMAGE_MAGIC`] and the big-endian
/// version word, then `payload`.
pub fn image_with_version(version: AppVersion, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + payload.len());
    v.extend_from_slice(&IMAGE_MAGIC);
    v.extend_from_slice(&version.to_u32().to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// The version in an image's header, if it has one.
pub fn version_of_image(bytes: &[u8]) -> Option<AppVersion> {
    let rest = bytes.strip_prefix(&IMAGE_MAGIC[..])?;
    let word: [u8; 4] = rest.get(..4)?.try_into().ok()?;
    Some(AppVersion::from_u32(u32::from_be_bytes(word)))
}

/// An installed image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub bytes: Vec<u8>,
    pub version: AppVersion,
}

/// The download slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staged {
    pub job_id: String,
    pub path: String,
    pub bytes: Vec<u8>,
    /// Open for writing.
    pub open: bool,
    /// Closed, verified and marked Testing: may be activated.
    pub ready: bool,
}

/// Failures to inject, for tests and the simulator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub fail_create: bool,
    /// Fail the write of the block at this offset.
    pub fail_write_at: Option<u64>,
    pub fail_activate: bool,
    pub fail_commit: bool,
}

/// The device's whole state.
#[derive(Debug, Clone)]
pub struct MemoryDevice {
    /// What runs now.
    pub running: Image,
    /// What a reset rolls back to while `running` is uncommitted.
    pub previous: Option<Image>,
    /// The download slot.
    pub staged: Option<Staged>,
    /// The running image's state.
    pub state: PalImageState,
    /// The largest file the slot holds.
    pub capacity: u64,
    /// Writes per block offset since the slot was last created (resume tests count these).
    pub writes: BTreeMap<u64, u32>,
    pub activations: u32,
    pub resets: u32,
    pub rollbacks: u32,
    pub commits: u32,
    pub faults: Faults,
}

impl MemoryDevice {
    /// Blocks written more than once since the slot was created.
    pub fn rewrites(&self) -> u32 {
        self.writes.values().map(|n| n.saturating_sub(1)).sum()
    }

    fn rollback(&mut self) {
        if let Some(prev) = self.previous.take() {
            self.running = prev;
            self.rollbacks += 1;
        }
        self.state = PalImageState::Valid;
    }
}

/// A handle to a shared [`MemoryDevice`].
#[derive(Debug, Clone)]
pub struct MemoryPal {
    device: Arc<Mutex<MemoryDevice>>,
}

impl MemoryPal {
    /// A device running `image` (committed), with a 24 MiB download slot.
    pub fn new(image: Vec<u8>) -> Self {
        let version = version_of_image(&image).unwrap_or_default();
        MemoryPal {
            device: Arc::new(Mutex::new(MemoryDevice {
                running: Image {
                    bytes: image,
                    version,
                },
                previous: None,
                staged: None,
                state: PalImageState::Valid,
                capacity: 24 * 1024 * 1024,
                writes: BTreeMap::new(),
                activations: 0,
                resets: 0,
                rollbacks: 0,
                commits: 0,
                faults: Faults::default(),
            })),
        }
    }

    /// A device running a header-only image of `version`.
    pub fn with_version(version: AppVersion) -> Self {
        Self::new(image_with_version(version, b"factory image"))
    }

    /// A copy of the device's state.
    pub fn snapshot(&self) -> MemoryDevice {
        self.lock_or_recover().clone()
    }

    /// Changes the device (to inject faults, set capacity, ...).
    pub fn update<R>(&self, f: impl FnOnce(&mut MemoryDevice) -> R) -> R {
        f(&mut self.lock_or_recover())
    }

    /// The version of the running image.
    pub fn running_version(&self) -> AppVersion {
        self.lock_or_recover().running.version
    }

    fn lock_or_recover(&self) -> MutexGuard<'_, MemoryDevice> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock(&self) -> Result<MutexGuard<'_, MemoryDevice>, PalError> {
        self.device
            .lock()
            .map_err(|_| PalError::new(PalStatus::Uninitialized, "device state poisoned"))
    }
}

fn staged_for<'a>(
    dev: &'a mut MemoryDevice,
    file: &FileContext,
) -> Result<&'a mut Staged, PalError> {
    match dev.staged.as_mut() {
        Some(s) if s.job_id == file.job_id && s.path == file.file_path => Ok(s),
        _ => Err(PalError::new(
            PalStatus::NullFileContext,
            format!("no receive file {} for job {}", file.file_path, file.job_id),
        )),
    }
}

impl Pal for MemoryPal {
    fn abort(&mut self, file: &FileContext) -> Result<(), PalError> {
        let mut dev = self.lock()?;
        if let Ok(s) = staged_for(&mut dev, file) {
            s.open = false;
        }
        Ok(())
    }

    fn create_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        let mut dev = self.lock()?;
        if dev.faults.fail_create {
            return Err(PalError::new(
                PalStatus::RxFileCreateFailed,
                "injected fault",
            ));
        }
        if file.file_size > dev.capacity {
            return Err(PalError::new(
                PalStatus::RxFileTooLarge,
                format!(
                    "{} bytes do not fit the {}-byte slot",
                    file.file_size, dev.capacity
                ),
            ));
        }
        let len = usize::try_from(file.file_size)
            .map_err(|_| PalError::new(PalStatus::RxFileTooLarge, "file size"))?;
        dev.staged = Some(Staged {
            job_id: file.job_id.clone(),
            path: file.file_path.clone(),
            bytes: vec![0; len],
            open: true,
            ready: false,
        });
        dev.writes.clear();
        Ok(())
    }

    fn reopen_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        let mut dev = self.lock()?;
        let s = staged_for(&mut dev, file)?;
        if s.bytes.len() as u64 != file.file_size || s.ready {
            return Err(PalError::new(
                PalStatus::RxFileCreateFailed,
                "the slot holds a different file",
            ));
        }
        s.open = true;
        Ok(())
    }

    fn write_block(
        &mut self,
        file: &FileContext,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PalError> {
        let mut dev = self.lock()?;
        if dev.faults.fail_write_at == Some(offset) {
            return Err(PalError::new(PalStatus::FileClose, "injected write fault"));
        }
        let s = staged_for(&mut dev, file)?;
        if !s.open {
            return Err(PalError::new(PalStatus::NullFileContext, "file not open"));
        }
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let end = start.saturating_add(data.len());
        let Some(dst) = s.bytes.get_mut(start..end) else {
            return Err(PalError::new(
                PalStatus::RxFileTooLarge,
                format!("write at {offset} of {} bytes is past the end", data.len()),
            ));
        };
        dst.copy_from_slice(data);
        *dev.writes.entry(offset).or_insert(0) += 1;
        Ok(())
    }

    fn read_block(
        &mut self,
        file: &FileContext,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, PalError> {
        let mut dev = self.lock()?;
        let s = staged_for(&mut dev, file)?;
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        let Some(src) = s.bytes.get(start..) else {
            return Ok(0);
        };
        let n = src.len().min(buf.len());
        buf[..n].copy_from_slice(&src[..n]);
        Ok(n)
    }

    fn close_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        let mut dev = self.lock()?;
        let s = staged_for(&mut dev, file)?;
        s.open = false;
        Ok(())
    }

    fn image_version(&mut self, file: &FileContext) -> Result<Option<AppVersion>, PalError> {
        let mut dev = self.lock()?;
        let s = staged_for(&mut dev, file)?;
        Ok(version_of_image(&s.bytes))
    }

    fn activate_new_image(&mut self) -> Result<(), PalError> {
        let mut dev = self.lock()?;
        if dev.faults.fail_activate {
            return Err(PalError::new(PalStatus::ActivateFailed, "injected fault"));
        }
        let staged = match dev.staged.take() {
            Some(s) if s.ready => s,
            other => {
                dev.staged = other;
                return Err(PalError::new(
                    PalStatus::ActivateFailed,
                    "no verified image to activate",
                ));
            }
        };
        let version = version_of_image(&staged.bytes).unwrap_or_default();
        let old = std::mem::replace(
            &mut dev.running,
            Image {
                bytes: staged.bytes,
                version,
            },
        );
        dev.previous = Some(old);
        dev.state = PalImageState::PendingCommit;
        dev.activations += 1;
        Ok(())
    }

    fn reset_device(&mut self) -> Result<(), PalError> {
        let mut dev = self.lock()?;
        dev.resets += 1;
        if matches!(
            dev.state,
            PalImageState::PendingCommit | PalImageState::Invalid
        ) {
            dev.rollback();
        }
        if let Some(s) = dev.staged.as_mut() {
            s.open = false;
        }
        Ok(())
    }

    fn set_platform_image_state(&mut self, state: ImageState) -> Result<(), PalError> {
        let mut dev = self.lock()?;
        let under_test = dev.state == PalImageState::PendingCommit;
        match state {
            ImageState::Testing => {
                if under_test {
                    return Ok(());
                }
                match dev.staged.as_mut() {
                    Some(s) if !s.open => {
                        s.ready = true;
                        Ok(())
                    }
                    _ => Err(PalError::new(
                        PalStatus::BadImageState,
                        "no closed image to mark Testing",
                    )),
                }
            }
            ImageState::Accepted => {
                if dev.faults.fail_commit {
                    return Err(PalError::new(PalStatus::CommitFailed, "injected fault"));
                }
                if under_test {
                    dev.previous = None;
                    dev.state = PalImageState::Valid;
                    dev.commits += 1;
                }
                Ok(())
            }
            ImageState::Rejected | ImageState::Aborted => {
                if under_test {
                    dev.state = PalImageState::Invalid;
                } else {
                    dev.staged = None;
                }
                Ok(())
            }
            ImageState::Unknown => Err(PalError::new(
                PalStatus::BadImageState,
                "cannot set the image state to Unknown",
            )),
        }
    }

    fn get_platform_image_state(&mut self) -> Result<PalImageState, PalError> {
        Ok(self.lock()?.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(size: u64) -> FileContext {
        FileContext {
            job_id: "job".into(),
            file_path: "fw.bin".into(),
            file_size: size,
            file_id: 0,
            file_type: 0,
            cert_file: "c".into(),
            signature: vec![],
            block_size: 256,
        }
    }

    #[test]
    fn header_round_trip() {
        let v = AppVersion::new(1, 2, 3);
        let img = image_with_version(v, b"payload");
        assert_eq!(version_of_image(&img), Some(v));
        assert_eq!(version_of_image(b"UPDRAFT\x01\x00"), None);
        assert_eq!(version_of_image(b"plain"), None);
    }

    #[test]
    fn download_activate_commit() {
        let mut pal = MemoryPal::with_version(AppVersion::new(1, 0, 0));
        let new = image_with_version(AppVersion::new(1, 1, 0), &[7; 500]);
        let f = ctx(new.len() as u64);
        pal.create_file(&f).expect("create");
        for (i, chunk) in new.chunks(256).enumerate() {
            pal.write_block(&f, i as u64 * 256, chunk).expect("write");
        }
        let mut back = vec![0; 600];
        assert_eq!(pal.read_block(&f, 0, &mut back).expect("read"), new.len());
        assert_eq!(&back[..new.len()], &new[..]);
        assert!(pal.activate_new_image().is_err(), "not verified yet");
        pal.close_file(&f).expect("close");
        assert_eq!(
            pal.image_version(&f).expect("version"),
            Some(AppVersion::new(1, 1, 0))
        );
        pal.set_platform_image_state(ImageState::Testing)
            .expect("testing");
        pal.abort(&f).expect("abort keeps a verified file");
        pal.activate_new_image().expect("activate");
        assert_eq!(
            pal.get_platform_image_state().expect("state"),
            PalImageState::PendingCommit
        );
        assert_eq!(pal.running_version(), AppVersion::new(1, 1, 0));
        pal.set_platform_image_state(ImageState::Accepted)
            .expect("commit");
        pal.reset_device().expect("reset");
        let d = pal.snapshot();
        assert_eq!(d.running.version, AppVersion::new(1, 1, 0));
        assert_eq!((d.commits, d.rollbacks, d.resets), (1, 0, 1));
        assert_eq!(d.state, PalImageState::Valid);
    }

    #[test]
    fn reject_or_reset_under_test_rolls_back() {
        for reject_first in [true, false] {
            let mut pal = MemoryPal::with_version(AppVersion::new(1, 0, 0));
            let new = image_with_version(AppVersion::new(2, 0, 0), b"x");
            let f = ctx(new.len() as u64);
            pal.create_file(&f).expect("create");
            pal.write_block(&f, 0, &new).expect("write");
            pal.close_file(&f).expect("close");
            pal.set_platform_image_state(ImageState::Testing)
                .expect("testing");
            pal.activate_new_image().expect("activate");
            if reject_first {
                pal.set_platform_image_state(ImageState::Rejected)
                    .expect("reject");
                assert_eq!(
                    pal.get_platform_image_state().expect("state"),
                    PalImageState::Invalid
                );
            }
            pal.reset_device().expect("reset");
            assert_eq!(pal.running_version(), AppVersion::new(1, 0, 0));
            assert_eq!(pal.snapshot().rollbacks, 1);
        }
    }

    #[test]
    fn errors() {
        let mut pal = MemoryPal::with_version(AppVersion::new(1, 0, 0));
        pal.update(|d| d.capacity = 100);
        let e = pal.create_file(&ctx(101)).expect_err("too large");
        assert_eq!(e.status, PalStatus::RxFileTooLarge);
        let f = ctx(100);
        assert_eq!(
            pal.write_block(&f, 0, b"x").expect_err("no file").status,
            PalStatus::NullFileContext
        );
        pal.create_file(&f).expect("create");
        assert!(pal.write_block(&f, 99, b"xy").is_err());
        pal.write_block(&f, 0, b"ab").expect("write");
        pal.write_block(&f, 0, b"ab").expect("write");
        assert_eq!(pal.snapshot().rewrites(), 1);
        pal.abort(&f).expect("abort");
        pal.reopen_file(&f).expect("reopen");
        assert!(pal.reopen_file(&ctx(50)).is_err());
        assert!(pal.set_platform_image_state(ImageState::Unknown).is_err());
        pal.set_platform_image_state(ImageState::Aborted)
            .expect("discard");
        assert!(pal.snapshot().staged.is_none());
        pal.update(|d| d.faults.fail_create = true);
        assert_eq!(
            pal.create_file(&f).expect_err("fault").status,
            PalStatus::RxFileCreateFailed
        );
    }
}
