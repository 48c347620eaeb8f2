//! The platform abstraction layer: what the agent needs from the device to store, check,
//! activate and commit or roll back an image (`OtaPalInterface_t`, data-plane reference
//! §4.6). The same agent runs on Linux ([`linux::LinuxPal`], A/B slots in a directory, the
//! daemon's) and, with another PAL, on anything else; [`memory::MemoryPal`] is a complete
//! in-memory device for tests and the fleet simulator.
//!
//! Differences from the C interface, each removing a way to fail:
//! - Signature verification is the agent's, not each PAL's: after [`Pal::close_file`] the
//!   agent reads the stored file back with [`Pal::read_block`] and checks it
//!   ([`Pal::verify_signature`]'s default). A PAL may override that (a secure element), but
//!   a new PAL cannot forget to verify.
//! - [`Pal::reopen_file`] continues a partly written file after a restart (resume); the
//!   C agent erases and starts over.
//! - [`Pal::image_version`] lets the agent enforce the version floor *before* activation
//!   when the platform can read the version from the (already verified) image.

use std::fmt;

use crate::error::{PalError, PalStatus};
use crate::verify::{PublicKey, verify_stored_file};
use crate::version::AppVersion;

/// What the agent tells the PAL about the file being received (`OtaFileContext_t`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileContext {
    /// The job delivering the file.
    pub job_id: String,
    /// `filepath` from the job document: where the platform should put it.
    pub file_path: String,
    /// `filesize`.
    pub file_size: u64,
    /// `fileid`: the file's id in the stream.
    pub file_id: u32,
    /// `fileType` (0, the default, is firmware).
    pub file_type: u32,
    /// `certfile`: which certificate signs it.
    pub cert_file: String,
    /// The DER ECDSA signature (decoded from `sig-sha256-ecdsa`).
    pub signature: Vec<u8>,
    /// The transfer block size; writes are at multiples of it.
    pub block_size: u32,
}

/// The state of an image as the agent and the application see it (`OtaImageState_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ImageState {
    Unknown = 0,
    /// Received and verified, or running under self-test; not committed.
    Testing = 1,
    /// Committed.
    Accepted = 2,
    /// Refused: by a failed check, or by the self-test.
    Rejected = 3,
    /// The transfer was abandoned.
    Aborted = 4,
}

impl ImageState {
    pub const ALL: &'static [ImageState] = &[
        ImageState::Unknown,
        ImageState::Testing,
        ImageState::Accepted,
        ImageState::Rejected,
        ImageState::Aborted,
    ];

    pub fn from_u8(n: u8) -> Option<ImageState> {
        ImageState::ALL.get(usize::from(n)).copied()
    }
}

impl fmt::Display for ImageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageState::Unknown => "Unknown",
            ImageState::Testing => "Testing",
            ImageState::Accepted => "Accepted",
            ImageState::Rejected => "Rejected",
            ImageState::Aborted => "Aborted",
        })
    }
}

/// The state of the *running* image as the platform knows it (`OtaPalImageState_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PalImageState {
    Unknown = 0,
    /// A new image is running and not committed: a reset rolls back. The agent is in self-test.
    PendingCommit = 1,
    /// The running image is committed (or is the factory image).
    Valid = 2,
    /// The running image was rejected: the next reset rolls back.
    Invalid = 3,
}

impl fmt::Display for PalImageState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PalImageState::Unknown => "Unknown",
            PalImageState::PendingCommit => "PendingCommit",
            PalImageState::Valid => "Valid",
            PalImageState::Invalid => "Invalid",
        })
    }
}

/// The platform. Calls are synchronous and made from the agent's task only.
pub trait Pal: Send {
    /// Stops using the open receive file and releases it (`abort`). Called when a transfer
    /// ends, whatever the outcome; it must not discard a file that was closed and verified
    /// (that is [`Pal::set_platform_image_state`] with Rejected or Aborted).
    fn abort(&mut self, file: &FileContext) -> Result<(), PalError>;

    /// Creates the receive file, erasing whatever was there (`createFile`). May refuse with
    /// [`PalStatus::RxFileTooLarge`], [`PalStatus::RxFileCreateFailed`], ...
    fn create_file(&mut self, file: &FileContext) -> Result<(), PalError>;

    /// Reopens a partly received file for the same job without erasing it, to resume after
    /// a restart. The default refuses, and the agent starts the file over.
    fn reopen_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        let _ = file;
        Err(PalError::new(
            PalStatus::RxFileCreateFailed,
            "this platform cannot resume a partial file",
        ))
    }

    /// Writes one whole block at `offset` (`writeBlock`).
    fn write_block(&mut self, file: &FileContext, offset: u64, data: &[u8])
    -> Result<(), PalError>;

    /// Reads back up to `buf.len()` bytes at `offset`; returns how many were read (0 at the
    /// end). Used to verify what was stored.
    fn read_block(
        &mut self,
        file: &FileContext,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, PalError>;

    /// Makes the blocks written so far durable. Called before the agent records them as
    /// received in its resume state; the default does nothing (for volatile stores).
    fn flush(&mut self, file: &FileContext) -> Result<(), PalError> {
        let _ = file;
        Ok(())
    }

    /// Closes the receive file once every block is written (`closeFile`, minus the
    /// signature check: see [`Pal::verify_signature`]).
    fn close_file(&mut self, file: &FileContext) -> Result<(), PalError>;

    /// Checks the closed file's signature. The default reads the file back and verifies it
    /// with `key` (SHA-256, ECDSA P-256); override only to delegate to secure hardware.
    fn verify_signature(&mut self, file: &FileContext, key: &PublicKey) -> Result<(), PalError> {
        verify_stored_file(self, file, key)
    }

    /// The version of the received (closed, verified) image, if the platform can tell.
    /// With a version the agent refuses downgrades before activation; without one the check
    /// happens after the reboot, in the self-test, as in the C agent.
    fn image_version(&mut self, file: &FileContext) -> Result<Option<AppVersion>, PalError> {
        let _ = file;
        Ok(None)
    }

    /// Makes the received image the one that boots, pending commit (`activate`). On a device
    /// this normally reboots and does not return; if it returns `Ok`, the agent treats the
    /// device as rebooting and stops.
    fn activate_new_image(&mut self) -> Result<(), PalError>;

    /// Resets the device (`reset`). An uncommitted image is rolled back by the reset.
    fn reset_device(&mut self) -> Result<(), PalError>;

    /// Records a decision about the image (`setPlatformImageState`):
    /// - `Testing`: the received image is verified and may be activated;
    /// - `Accepted`: commit the running image under test;
    /// - `Rejected`: refuse the received image, or mark the image under test for rollback;
    /// - `Aborted`: discard the received image.
    fn set_platform_image_state(&mut self, state: ImageState) -> Result<(), PalError>;

    /// The running image's state (`getPlatformImageState`).
    fn get_platform_image_state(&mut self) -> Result<PalImageState, PalError>;
}

/// A boxed PAL is a PAL.
impl<P: Pal + ?Sized> Pal for Box<P> {
    fn abort(&mut self, file: &FileContext) -> Result<(), PalError> {
        (**self).abort(file)
    }
    fn create_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        (**self).create_file(file)
    }
    fn reopen_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        (**self).reopen_file(file)
    }
    fn write_block(
        &mut self,
        file: &FileContext,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PalError> {
        (**self).write_block(file, offset, data)
    }
    fn read_block(
        &mut self,
        file: &FileContext,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, PalError> {
        (**self).read_block(file, offset, buf)
    }
    fn flush(&mut self, file: &FileContext) -> Result<(), PalError> {
        (**self).flush(file)
    }
    fn close_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        (**self).close_file(file)
    }
    fn verify_signature(&mut self, file: &FileContext, key: &PublicKey) -> Result<(), PalError> {
        (**self).verify_signature(file, key)
    }
    fn image_version(&mut self, file: &FileContext) -> Result<Option<AppVersion>, PalError> {
        (**self).image_version(file)
    }
    fn activate_new_image(&mut self) -> Result<(), PalError> {
        (**self).activate_new_image()
    }
    fn reset_device(&mut self) -> Result<(), PalError> {
        (**self).reset_device()
    }
    fn set_platform_image_state(&mut self, state: ImageState) -> Result<(), PalError> {
        (**self).set_platform_image_state(state)
    }
    fn get_platform_image_state(&mut self) -> Result<PalImageState, PalError> {
        (**self).get_platform_image_state()
    }
}

#[cfg(unix)]
pub mod linux;
pub mod memory;
