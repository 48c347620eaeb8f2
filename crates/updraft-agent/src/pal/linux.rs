//! A/B slots in a directory: the PAL of the `updraft-agent` daemon on Linux.
//!
//! ```text
//! <dir>/slots/a/image      one image per slot
//! <dir>/slots/b/image
//! <dir>/current -> slots/a the active slot (a relative symlink, replaced by rename)
//! <dir>/state.json         which slot is active and in what state (durable, see below)
//! <dir>/updraft-agent.lock held (File::try_lock) by the one process using the directory
//! ```
//!
//! An incoming image goes to the inactive slot, written in place with positional writes and
//! made durable ([`Pal::flush`], `fdatasync`) before the agent checkpoints its progress, so a
//! kill or power cut resumes the download ([`Pal::reopen_file`]).
//!
//! `state.json` is the truth and `current` follows it: every change is first written to
//! `state.json` (temporary file, fsync, rename, directory fsync), then `current` is switched
//! (a new symlink renamed over it, directory fsync). [`LinuxPal::open`] finishes a switch a
//! crash interrupted. The active image is Accepted (committed), Testing (activated, not yet
//! committed: the previous slot is kept for a rollback) or Rejected (refused under test; the
//! next reset rolls back).
//!
//! Activation and reset "reboot" by restarting the process that owns the PAL: the PAL
//! switches the slot, records the state, and raises its [`RestartSignal`]; the daemon then
//! exits (systemd starts it again) or re-executes itself. A process that starts with the
//! active image in Testing is the new image's first boot; if it starts in Testing a second
//! time, the image died under test without a verdict, and [`LinuxPal::open`] rolls back
//! before anything else runs — a boot-once trial, as A/B bootloaders do.

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use thiserror::Error;
use tracing::{debug, info, trace, warn};

use crate::durable;
use crate::error::{PalError, PalStatus};
use crate::pal::memory::version_of_image;
use crate::pal::{FileContext, ImageState, Pal, PalImageState};
use crate::version::AppVersion;

/// The name of the image file in a slot.
pub const IMAGE_FILE: &str = "image";
/// The name of the lock file in the install directory.
pub const LOCK_FILE: &str = "updraft-agent.lock";
/// The name of the active-slot symlink in the install directory.
pub const CURRENT_LINK: &str = "current";
/// The name of the slot state file in the install directory.
pub const STATE_FILE: &str = "state.json";

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }

    /// The target of `current` for this slot, relative to the install directory.
    fn link_target(self) -> PathBuf {
        Path::new("slots").join(self.name())
    }
}

/// The state of the active slot's image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotImageState {
    /// Committed (or the factory image).
    Accepted,
    /// Activated and on trial: committed by the self-test, or rolled back.
    Testing,
    /// Refused under test: the next reset (or start) rolls back.
    Rejected,
}

/// The image being received into the inactive slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receiving {
    pub slot: Slot,
    pub job_id: String,
    pub file_path: String,
    pub file_size: u64,
    /// Closed and verified by the agent (marked Testing): ready for activation.
    pub verified: bool,
}

/// What `state.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotState {
    pub active: Slot,
    pub image_state: SlotImageState,
    /// While the active image is Testing or Rejected: the slot a rollback returns to.
    pub previous: Option<Slot>,
    /// Starts of the process since the active image was activated, while it is on trial.
    pub trial_boots: u32,
    pub receiving: Option<Receiving>,
    /// The slot of the last image rolled back, for the operator.
    pub rolled_back_from: Option<Slot>,
}

impl SlotState {
    fn fresh(active: Slot) -> SlotState {
        SlotState {
            active,
            image_state: SlotImageState::Accepted,
            previous: None,
            trial_boots: 0,
            receiving: None,
            rolled_back_from: None,
        }
    }
}

/// Where the running version comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionSource {
    /// The Updraft image header at the start of the image
    /// ([`crate::pal::memory::image_with_version`]). The received image's version is known
    /// too, so downgrades are refused before activation.
    Header,
    /// A file holding `major.minor.build`; `{slot}` in the path stands for the active slot's
    /// directory. Downgrades are then refused after the restart, in the self-test.
    File(String),
}

/// How the PAL is set up.
#[derive(Debug, Clone)]
pub struct LinuxPalOptions {
    pub version_source: VersionSource,
    /// The version when the active slot holds no image (a fresh install).
    pub factory_version: AppVersion,
    /// The largest image a slot takes.
    pub max_file_size: u64,
}

impl Default for LinuxPalOptions {
    fn default() -> Self {
        LinuxPalOptions {
            version_source: VersionSource::Header,
            factory_version: AppVersion::new(0, 0, 1),
            max_file_size: 1 << 30,
        }
    }
}

/// Why the process that owns the PAL must restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// A new image was activated: start it (on trial).
    Activated,
    /// The agent reset the device; an image on trial was rolled back first.
    Reset { rolled_back: bool },
}

/// Raised by the PAL when the "device" must reboot: read by the daemon once the agent has
/// stopped.
#[derive(Debug, Clone, Default)]
pub struct RestartSignal(Arc<Mutex<Option<Restart>>>);

impl RestartSignal {
    fn raise(&self, r: Restart) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(r);
    }

    /// The restart asked for, if any.
    pub fn requested(&self) -> Option<Restart> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Failures of [`LinuxPal::open`].
#[derive(Debug, Error)]
pub enum LinuxPalError {
    #[error(
        "another updraft-agent{} holds the lock {} of this install directory",
        holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
        path.display()
    )]
    Locked { path: PathBuf, holder: Option<u32> },
    #[error("{}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{}: {detail}", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error(transparent)]
    Pal(#[from] PalError),
}

fn io_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(io::Error) -> LinuxPalError + 'a {
    move |source| LinuxPalError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

/// The open receive file.
struct Open {
    job_id: String,
    file_path: String,
    file: File,
}

/// A/B slots in an install directory. See the module documentation.
pub struct LinuxPal {
    dir: PathBuf,
    options: LinuxPalOptions,
    state: SlotState,
    open: Option<Open>,
    restart: RestartSignal,
    /// Held for the PAL's lifetime: the lock is released when the file is closed (on drop,
    /// or at `exec`, as std opens files close-on-exec).
    _lock: File,
}

impl std::fmt::Debug for LinuxPal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinuxPal")
            .field("dir", &self.dir)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// Takes the install directory's lock, or says who holds it.
/// Attempts (100 ms apart) to take the install directory's lock before giving up.
const LOCK_ATTEMPTS: u32 = 20;

fn lock(dir: &Path) -> Result<File, LinuxPalError> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(io_err(&path, "opening the lock file"))?;
    // A moment's grace: `updraft-agent status` takes the lock shared for an instant, and a
    // daemon restarting right then must not give up (the unit does not retry exit 3).
    let mut attempt = 0;
    let locked = loop {
        match file.try_lock() {
            Err(fs::TryLockError::WouldBlock) if attempt < LOCK_ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            other => break other,
        }
    };
    match locked {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let holder = file
                .read_to_string(&mut pid)
                .ok()
                .and_then(|_| pid.trim().parse().ok());
            return Err(LinuxPalError::Locked { path, holder });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err(&path, "locking")(e)),
    }
    // The holder's pid, for the message a second instance prints.
    file.set_len(0)
        .and_then(|()| file.write_all_at(std::process::id().to_string().as_bytes(), 0))
        .map_err(io_err(&path, "writing the lock file"))?;
    Ok(file)
}

/// Reads `state.json`; `None` if there is none yet.
pub fn read_state(dir: &Path) -> Result<Option<SlotState>, LinuxPalError> {
    let path = dir.join(STATE_FILE);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| LinuxPalError::Corrupt {
                path,
                detail: e.to_string(),
            }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path, "reading")(e)),
    }
}

/// The slot `current` points at, if it is a link to one.
pub fn current_slot(dir: &Path) -> Option<Slot> {
    let target = fs::read_link(dir.join(CURRENT_LINK)).ok()?;
    [Slot::A, Slot::B]
        .into_iter()
        .find(|s| target == s.link_target())
}

/// The version of the image in `slot` of the install directory `dir` (see
/// [`VersionSource`]); the factory version when the slot holds none.
pub fn slot_version(
    dir: &Path,
    slot: Slot,
    options: &LinuxPalOptions,
) -> Result<AppVersion, LinuxPalError> {
    let slot_dir = dir.join(slot.link_target());
    match &options.version_source {
        VersionSource::Header => {
            let path = slot_dir.join(IMAGE_FILE);
            let mut head = [0u8; 12];
            match File::open(&path) {
                Ok(f) => {
                    let n = f
                        .read_at(&mut head, 0)
                        .map_err(io_err(&path, "reading the image header"))?;
                    version_of_image(&head[..n]).ok_or_else(|| LinuxPalError::Corrupt {
                        path,
                        detail: "the image has no Updraft version header".into(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(options.factory_version),
                Err(e) => Err(io_err(&path, "opening the image")(e)),
            }
        }
        VersionSource::File(template) => {
            let path = PathBuf::from(template.replace("{slot}", &slot_dir.to_string_lossy()));
            match fs::read_to_string(&path) {
                Ok(s) => s.trim().parse().map_err(|e| LinuxPalError::Corrupt {
                    path,
                    detail: format!("{e}"),
                }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(options.factory_version),
                Err(e) => Err(io_err(&path, "reading the version")(e)),
            }
        }
    }
}

impl LinuxPal {
    /// Opens (creating if needed) the install directory: takes its lock, finishes an
    /// interrupted slot switch, and counts this start as a boot of an image on trial —
    /// rolling back one that already had its boot.
    pub fn open(dir: impl Into<PathBuf>, options: LinuxPalOptions) -> Result<Self, LinuxPalError> {
        let dir = dir.into();
        for slot in [Slot::A, Slot::B] {
            let d = dir.join(slot.link_target());
            fs::create_dir_all(&d).map_err(io_err(&d, "creating the slot directory"))?;
        }
        let lock = lock(&dir)?;
        let (state, fresh) = match read_state(&dir)? {
            Some(s) => (s, false),
            None => {
                let active = current_slot(&dir).unwrap_or(Slot::A);
                info!(dir = %dir.display(), "new install directory: slot {} active", active.name());
                (SlotState::fresh(active), true)
            }
        };
        let mut pal = LinuxPal {
            dir,
            options,
            state,
            open: None,
            restart: RestartSignal::default(),
            _lock: lock,
        };
        if fresh {
            pal.save()?;
        }
        if current_slot(&pal.dir) != Some(pal.state.active) {
            info!(
                "switching `current` to slot {} (first start, or a switch a restart interrupted)",
                pal.state.active.name()
            );
            pal.switch_link()?;
        }
        match pal.state.image_state {
            SlotImageState::Testing if pal.state.trial_boots == 0 => {
                pal.state.trial_boots = 1;
                info!(
                    "slot {} is on trial: first start of the new image",
                    pal.state.active.name()
                );
                pal.save()?;
            }
            SlotImageState::Testing | SlotImageState::Rejected => {
                warn!(
                    "slot {} restarted on trial without being committed ({:?}): rolling back",
                    pal.state.active.name(),
                    pal.state.image_state
                );
                pal.rollback()?;
            }
            SlotImageState::Accepted => {}
        }
        Ok(pal)
    }

    /// The install directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The slot state as last recorded.
    pub fn state(&self) -> &SlotState {
        &self.state
    }

    pub fn slot_dir(&self, slot: Slot) -> PathBuf {
        self.dir.join(slot.link_target())
    }

    pub fn image_path(&self, slot: Slot) -> PathBuf {
        self.slot_dir(slot).join(IMAGE_FILE)
    }

    /// What the daemon reads after the agent stops.
    pub fn restart_signal(&self) -> RestartSignal {
        self.restart.clone()
    }

    /// The version of the active image (see [`VersionSource`]); the factory version when
    /// the slot holds none.
    pub fn running_version(&self) -> Result<AppVersion, LinuxPalError> {
        slot_version(&self.dir, self.state.active, &self.options)
    }

    // ---- durable state ------------------------------------------------------------------

    fn save(&self) -> Result<(), PalError> {
        let path = self.dir.join(STATE_FILE);
        let json = serde_json::to_vec_pretty(&self.state)
            .map_err(|e| PalError::new(PalStatus::BootInfoCreateFailed, e.to_string()))?;
        durable::replace(&path, &json).map_err(|f| {
            PalError::new(
                PalStatus::BootInfoCreateFailed,
                format!("{}: {}: {}", path.display(), f.action, f.source),
            )
        })
    }

    /// Points `current` at the active slot: a new link renamed over the old one.
    fn switch_link(&self) -> Result<(), PalError> {
        let link = self.dir.join(CURRENT_LINK);
        let tmp = durable::tmp_path(&link);
        let fail = |action: &str, e: io::Error| {
            PalError::new(
                PalStatus::ActivateFailed,
                format!("{}: {action}: {e}", link.display()),
            )
        };
        match fs::remove_file(&tmp) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(fail("removing a stale link", e));
            }
            _ => {}
        }
        std::os::unix::fs::symlink(self.state.active.link_target(), &tmp)
            .map_err(|e| fail("creating the link", e))?;
        fs::rename(&tmp, &link).map_err(|e| fail("replacing the link", e))?;
        durable::sync_dir(&self.dir).map_err(|e| fail("syncing the directory", e))?;
        info!(slot = self.state.active.name(), "`current` switched");
        Ok(())
    }

    /// Records `next` as the state, then makes `current` follow it. If the link cannot be
    /// switched, the old state is restored.
    fn transition(&mut self, next: SlotState) -> Result<(), PalError> {
        let before = std::mem::replace(&mut self.state, next);
        if let Err(e) = self.save() {
            self.state = before;
            return Err(e);
        }
        if current_slot(&self.dir) != Some(self.state.active)
            && let Err(e) = self.switch_link()
        {
            self.state = before;
            if let Err(se) = self.save() {
                warn!("restoring the slot state: {se}");
            }
            return Err(e);
        }
        Ok(())
    }

    /// Back to the previous slot, committed.
    fn rollback(&mut self) -> Result<(), PalError> {
        let Some(previous) = self.state.previous else {
            warn!("no previous slot to roll back to: keeping the active one");
            let mut next = self.state.clone();
            next.image_state = SlotImageState::Accepted;
            next.trial_boots = 0;
            return self.transition(next);
        };
        let from = self.state.active;
        let next = SlotState {
            active: previous,
            image_state: SlotImageState::Accepted,
            previous: None,
            trial_boots: 0,
            receiving: None,
            rolled_back_from: Some(from),
        };
        self.transition(next)?;
        info!(
            "rolled back from slot {} to slot {}",
            from.name(),
            previous.name()
        );
        Ok(())
    }

    fn on_trial(&self) -> bool {
        self.state.image_state != SlotImageState::Accepted
    }

    /// The receive file for `file`, checked against the record.
    fn open_for(&mut self, file: &FileContext) -> Result<&File, PalError> {
        match self.open.as_ref() {
            Some(o) if o.job_id == file.job_id && o.file_path == file.file_path => Ok(&o.file),
            _ => Err(PalError::new(
                PalStatus::NullFileContext,
                format!("no receive file {} for job {}", file.file_path, file.job_id),
            )),
        }
    }

    fn receiving_matches(&self, file: &FileContext) -> Option<&Receiving> {
        self.state.receiving.as_ref().filter(|r| {
            r.job_id == file.job_id
                && r.file_path == file.file_path
                && r.file_size == file.file_size
        })
    }

    /// Forgets the received image and removes it from its slot.
    fn discard_received(&mut self) -> Result<(), PalError> {
        self.open = None;
        let Some(r) = self.state.receiving.take() else {
            return Ok(());
        };
        self.save()?;
        let path = self.image_path(r.slot);
        if let Err(f) = durable::remove(&path) {
            warn!("{}: {}: {}", path.display(), f.action, f.source);
        }
        info!(job = %r.job_id, slot = r.slot.name(), "received image discarded");
        Ok(())
    }
}

fn io_pal(status: PalStatus, what: &str, e: io::Error) -> PalError {
    PalError::new(status, format!("{what}: {e}"))
}

impl Pal for LinuxPal {
    fn abort(&mut self, file: &FileContext) -> Result<(), PalError> {
        if self.open_for(file).is_ok() {
            self.open = None;
        }
        Ok(())
    }

    fn create_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        if self.on_trial() {
            return Err(PalError::new(
                PalStatus::RxFileCreateFailed,
                "the running image is on trial: no download until it is committed",
            ));
        }
        if file.file_size > self.options.max_file_size {
            return Err(PalError::new(
                PalStatus::RxFileTooLarge,
                format!(
                    "{} bytes exceed the slot size limit of {}",
                    file.file_size, self.options.max_file_size
                ),
            ));
        }
        self.open = None;
        let slot = self.state.active.other();
        // Record first: a crash after this leaves a record of a partial file, which a
        // resume checks (size, length) before trusting.
        self.state.receiving = Some(Receiving {
            slot,
            job_id: file.job_id.clone(),
            file_path: file.file_path.clone(),
            file_size: file.file_size,
            verified: false,
        });
        self.save()?;
        let path = self.image_path(slot);
        let status = PalStatus::RxFileCreateFailed;
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(|e| io_pal(status, &path.display().to_string(), e))?;
        f.set_len(file.file_size)
            .and_then(|()| f.sync_all())
            .and_then(|()| durable::sync_parent(&path))
            .map_err(|e| io_pal(status, &path.display().to_string(), e))?;
        info!(
            job = %file.job_id,
            slot = slot.name(),
            bytes = file.file_size,
            "receiving into the inactive slot"
        );
        self.open = Some(Open {
            job_id: file.job_id.clone(),
            file_path: file.file_path.clone(),
            file: f,
        });
        Ok(())
    }

    fn reopen_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        let refuse = |why: String| Err(PalError::new(PalStatus::RxFileCreateFailed, why));
        if self.on_trial() {
            return refuse("the running image is on trial".into());
        }
        let Some(r) = self.receiving_matches(file).cloned() else {
            return refuse("the inactive slot holds another file".into());
        };
        if r.verified || r.slot == self.state.active {
            return refuse("the recorded receive file cannot be continued".into());
        }
        let path = self.image_path(r.slot);
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| io_pal(PalStatus::RxFileCreateFailed, "reopening", e))?;
        let len = f
            .metadata()
            .map_err(|e| io_pal(PalStatus::RxFileCreateFailed, "reopening", e))?
            .len();
        if len != file.file_size {
            return refuse(format!(
                "{} holds {len} bytes, not {}",
                path.display(),
                file.file_size
            ));
        }
        info!(job = %file.job_id, slot = r.slot.name(), "continuing the partial image");
        self.open = Some(Open {
            job_id: file.job_id.clone(),
            file_path: file.file_path.clone(),
            file: f,
        });
        Ok(())
    }

    fn write_block(
        &mut self,
        file: &FileContext,
        offset: u64,
        data: &[u8],
    ) -> Result<(), PalError> {
        let end = offset.saturating_add(data.len() as u64);
        if end > file.file_size {
            return Err(PalError::new(
                PalStatus::RxFileTooLarge,
                format!("write at {offset} of {} bytes is past the end", data.len()),
            ));
        }
        let f = self.open_for(file)?;
        f.write_all_at(data, offset)
            .map_err(|e| io_pal(PalStatus::FileClose, "writing a block", e))?;
        trace!(
            offset,
            block = offset / u64::from(file.block_size.max(1)),
            "block written"
        );
        Ok(())
    }

    fn read_block(
        &mut self,
        file: &FileContext,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<usize, PalError> {
        let f = self.open_for(file)?;
        let mut done = 0;
        while done < buf.len() {
            let n = f
                .read_at(&mut buf[done..], offset + done as u64)
                .map_err(|e| io_pal(PalStatus::SignatureCheckFailed, "reading back", e))?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    fn flush(&mut self, file: &FileContext) -> Result<(), PalError> {
        self.open_for(file)?
            .sync_data()
            .map_err(|e| io_pal(PalStatus::FileClose, "syncing the image", e))
    }

    fn close_file(&mut self, file: &FileContext) -> Result<(), PalError> {
        self.open_for(file)?
            .sync_all()
            .map_err(|e| io_pal(PalStatus::FileClose, "syncing the image", e))?;
        debug!(job = %file.job_id, "receive file closed");
        Ok(())
    }

    fn image_version(&mut self, file: &FileContext) -> Result<Option<AppVersion>, PalError> {
        if self.options.version_source != VersionSource::Header {
            return Ok(None);
        }
        let mut head = [0u8; 12];
        let n = self.read_block(file, 0, &mut head)?;
        Ok(version_of_image(&head[..n]))
    }

    fn activate_new_image(&mut self) -> Result<(), PalError> {
        let Some(r) = self.state.receiving.clone().filter(|r| r.verified) else {
            return Err(PalError::new(
                PalStatus::ActivateFailed,
                "no verified image to activate",
            ));
        };
        self.open = None;
        let next = SlotState {
            active: r.slot,
            image_state: SlotImageState::Testing,
            previous: Some(self.state.active),
            trial_boots: 0,
            receiving: None,
            rolled_back_from: None,
        };
        self.transition(next)?;
        info!(job = %r.job_id, slot = r.slot.name(), "activated: the new image starts on trial");
        self.restart.raise(Restart::Activated);
        Ok(())
    }

    fn reset_device(&mut self) -> Result<(), PalError> {
        let rolled_back = self.on_trial();
        if rolled_back {
            self.rollback()?;
        }
        self.restart.raise(Restart::Reset { rolled_back });
        Ok(())
    }

    fn set_platform_image_state(&mut self, state: ImageState) -> Result<(), PalError> {
        let on_trial = self.on_trial();
        match state {
            ImageState::Testing if on_trial => Ok(()),
            ImageState::Testing => {
                let Some(r) = self.state.receiving.as_mut() else {
                    return Err(PalError::new(
                        PalStatus::BadImageState,
                        "no received image to mark Testing",
                    ));
                };
                r.verified = true;
                self.save()
            }
            ImageState::Accepted if self.state.image_state == SlotImageState::Rejected => {
                // A verdict must never commit an image already refused (a late "pass").
                Err(PalError::new(
                    PalStatus::CommitFailed,
                    "the image under test was rejected; it cannot be committed",
                ))
            }
            ImageState::Accepted if on_trial => {
                let mut next = self.state.clone();
                next.image_state = SlotImageState::Accepted;
                next.previous = None;
                next.trial_boots = 0;
                self.transition(next)
                    .map_err(|e| PalError::new(PalStatus::CommitFailed, e.detail))?;
                info!(slot = self.state.active.name(), "image committed");
                Ok(())
            }
            ImageState::Accepted => Ok(()),
            ImageState::Rejected | ImageState::Aborted if on_trial => {
                let mut next = self.state.clone();
                next.image_state = SlotImageState::Rejected;
                self.transition(next)
                    .map_err(|e| PalError::new(PalStatus::RejectFailed, e.detail))?;
                info!(
                    slot = self.state.active.name(),
                    "image rejected: the reset rolls back"
                );
                Ok(())
            }
            ImageState::Rejected | ImageState::Aborted => self.discard_received(),
            ImageState::Unknown => Err(PalError::new(
                PalStatus::BadImageState,
                "cannot set the image state to Unknown",
            )),
        }
    }

    fn get_platform_image_state(&mut self) -> Result<PalImageState, PalError> {
        Ok(match self.state.image_state {
            SlotImageState::Accepted => PalImageState::Valid,
            SlotImageState::Testing => PalImageState::PendingCommit,
            SlotImageState::Rejected => PalImageState::Invalid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pal::memory::image_with_version;

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let p = std::env::temp_dir().join(format!(
                "updraft-linux-pal-{tag}-{}-{t:x}",
                std::process::id()
            ));
            fs::create_dir_all(&p).expect("dir");
            Dir(p)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const OLD: AppVersion = AppVersion::new(1, 0, 0);
    const NEW: AppVersion = AppVersion::new(1, 1, 0);

    fn ctx(job: &str, size: u64) -> FileContext {
        FileContext {
            job_id: job.into(),
            file_path: "fw.bin".into(),
            file_size: size,
            file_id: 0,
            file_type: 0,
            cert_file: "c".into(),
            signature: vec![],
            block_size: 256,
        }
    }

    fn open(d: &Dir) -> LinuxPal {
        LinuxPal::open(&d.0, LinuxPalOptions::default()).expect("open")
    }

    /// Writes `image` into the inactive slot and marks it verified.
    fn receive(pal: &mut LinuxPal, job: &str, image: &[u8]) -> FileContext {
        let f = ctx(job, image.len() as u64);
        pal.create_file(&f).expect("create");
        for (i, chunk) in image.chunks(256).enumerate() {
            pal.write_block(&f, i as u64 * 256, chunk).expect("write");
        }
        pal.flush(&f).expect("flush");
        pal.close_file(&f).expect("close");
        pal.set_platform_image_state(ImageState::Testing)
            .expect("testing");
        pal.abort(&f).expect("abort keeps a verified file");
        f
    }

    fn install_factory(d: &Dir, image: &[u8]) {
        let slot = d.0.join("slots/a");
        fs::create_dir_all(&slot).expect("slot");
        fs::write(slot.join(IMAGE_FILE), image).expect("factory image");
    }

    #[test]
    fn fresh_directory_layout_and_factory_version() {
        let d = Dir::new("fresh");
        let pal = open(&d);
        assert_eq!(current_slot(&d.0), Some(Slot::A));
        assert!(d.0.join("slots/b").is_dir());
        assert_eq!(
            pal.running_version().expect("version"),
            LinuxPalOptions::default().factory_version
        );
        assert_eq!(
            read_state(&d.0).expect("read"),
            Some(SlotState::fresh(Slot::A))
        );
        let lock = fs::read_to_string(d.0.join(LOCK_FILE)).expect("lock file");
        assert_eq!(lock, std::process::id().to_string());
    }

    #[test]
    fn a_second_open_is_refused_naming_the_lock() {
        let d = Dir::new("lock");
        let pal = open(&d);
        let e = LinuxPal::open(&d.0, LinuxPalOptions::default()).expect_err("locked");
        let LinuxPalError::Locked { path, holder } = &e else {
            panic!("{e}");
        };
        assert_eq!(path, &d.0.join(LOCK_FILE));
        assert_eq!(*holder, Some(std::process::id()));
        assert!(e.to_string().contains(LOCK_FILE), "{e}");
        drop(pal);
        open(&d);
    }

    #[test]
    fn activate_commit_and_versions() {
        let d = Dir::new("commit");
        install_factory(&d, &image_with_version(OLD, b"old"));
        let mut pal = open(&d);
        assert_eq!(pal.running_version().expect("version"), OLD);
        let new = image_with_version(NEW, &[7; 1000]);
        let f = receive(&mut pal, "job-1", &new);
        pal.reopen_file(&f)
            .expect_err("verified files are not continued");
        let signal = pal.restart_signal();
        pal.activate_new_image().expect("activate");
        assert_eq!(signal.requested(), Some(Restart::Activated));
        assert_eq!(current_slot(&d.0), Some(Slot::B));
        assert_eq!(fs::read(d.0.join("current/image")).expect("image"), new);
        drop(pal);

        // The new image's first start: on trial.
        let mut pal = open(&d);
        assert_eq!(pal.running_version().expect("version"), NEW);
        assert_eq!(pal.state().trial_boots, 1);
        assert_eq!(
            pal.get_platform_image_state().expect("state"),
            PalImageState::PendingCommit
        );
        pal.create_file(&ctx("job-2", 10))
            .expect_err("no download on trial");
        pal.set_platform_image_state(ImageState::Accepted)
            .expect("commit");
        let s = read_state(&d.0).expect("read").expect("state");
        assert_eq!(
            (s.active, s.image_state, s.previous),
            (Slot::B, SlotImageState::Accepted, None)
        );
        drop(pal);
        let pal = open(&d);
        assert_eq!(pal.state().active, Slot::B);
        assert_eq!(pal.running_version().expect("version"), NEW);
    }

    #[test]
    fn reject_then_reset_rolls_back() {
        let d = Dir::new("reject");
        install_factory(&d, &image_with_version(OLD, b"old"));
        let mut pal = open(&d);
        receive(&mut pal, "job-1", &image_with_version(NEW, b"new"));
        pal.activate_new_image().expect("activate");
        drop(pal);
        let mut pal = open(&d);
        pal.set_platform_image_state(ImageState::Rejected)
            .expect("reject");
        assert_eq!(
            pal.get_platform_image_state().expect("state"),
            PalImageState::Invalid
        );
        // A late "pass" cannot commit what was rejected.
        pal.set_platform_image_state(ImageState::Accepted)
            .expect_err("a rejected image is never committed");
        assert_eq!(pal.state().image_state, SlotImageState::Rejected);
        let signal = pal.restart_signal();
        pal.reset_device().expect("reset");
        assert_eq!(
            signal.requested(),
            Some(Restart::Reset { rolled_back: true })
        );
        assert_eq!(current_slot(&d.0), Some(Slot::A));
        assert_eq!(pal.running_version().expect("version"), OLD);
        assert_eq!(pal.state().rolled_back_from, Some(Slot::B));
    }

    #[test]
    fn a_second_start_on_trial_rolls_back() {
        let d = Dir::new("trial");
        install_factory(&d, &image_with_version(OLD, b"old"));
        let mut pal = open(&d);
        receive(&mut pal, "job-1", &image_with_version(NEW, b"new"));
        pal.activate_new_image().expect("activate");
        drop(pal);
        drop(open(&d)); // first start of the new image; it dies without a verdict
        let pal = open(&d);
        assert_eq!(pal.state().active, Slot::A);
        assert_eq!(pal.state().image_state, SlotImageState::Accepted);
        assert_eq!(current_slot(&d.0), Some(Slot::A));
    }

    #[test]
    fn an_interrupted_switch_is_finished() {
        let d = Dir::new("switch");
        let mut pal = open(&d);
        receive(&mut pal, "job-1", b"abc");
        pal.activate_new_image().expect("activate");
        drop(pal);
        // A crash between recording the state and switching the link.
        fs::remove_file(d.0.join(CURRENT_LINK)).expect("unlink");
        std::os::unix::fs::symlink("slots/a", d.0.join(CURRENT_LINK)).expect("old link");
        let pal = open(&d);
        assert_eq!(current_slot(&d.0), Some(Slot::B));
        assert_eq!(pal.state().image_state, SlotImageState::Testing);
    }

    #[test]
    fn partial_files_resume_and_refused_ones_are_removed() {
        let d = Dir::new("resume");
        let mut pal = open(&d);
        let f = ctx("job-1", 600);
        pal.create_file(&f).expect("create");
        pal.write_block(&f, 0, &[1; 256]).expect("write");
        pal.write_block(&f, 512, &[1; 88]).expect("write");
        pal.write_block(&f, 512, &[1; 89])
            .expect_err("past the end");
        pal.flush(&f).expect("flush");
        drop(pal); // killed

        let mut pal = open(&d);
        pal.reopen_file(&ctx("job-2", 600))
            .expect_err("another job");
        pal.reopen_file(&ctx("job-1", 601))
            .expect_err("another size");
        pal.reopen_file(&f).expect("reopen");
        pal.write_block(&f, 256, &[2; 256]).expect("write");
        let mut buf = vec![0; 700];
        assert_eq!(pal.read_block(&f, 0, &mut buf).expect("read"), 600);
        assert_eq!(&buf[..3], &[1, 1, 1]);
        assert_eq!(buf[300], 2);
        pal.close_file(&f).expect("close");
        pal.set_platform_image_state(ImageState::Rejected)
            .expect("refuse");
        assert!(!d.0.join("slots/b/image").exists());
        assert_eq!(pal.state().receiving, None);
        pal.activate_new_image().expect_err("nothing to activate");
        assert!(pal.set_platform_image_state(ImageState::Unknown).is_err());
    }

    #[test]
    fn version_from_a_file() {
        let d = Dir::new("vfile");
        let opts = LinuxPalOptions {
            version_source: VersionSource::File("{slot}/VERSION".into()),
            factory_version: AppVersion::new(0, 1, 0),
            max_file_size: 100,
        };
        let mut pal = LinuxPal::open(&d.0, opts.clone()).expect("open");
        assert_eq!(
            pal.running_version().expect("version"),
            AppVersion::new(0, 1, 0)
        );
        fs::write(d.0.join("slots/a/VERSION"), "2.3.4\n").expect("version file");
        assert_eq!(
            pal.running_version().expect("version"),
            AppVersion::new(2, 3, 4)
        );
        assert_eq!(
            pal.create_file(&ctx("j", 101)).expect_err("too big").status,
            PalStatus::RxFileTooLarge
        );
        let f = ctx("j", 12);
        pal.create_file(&f).expect("create");
        pal.write_block(&f, 0, &image_with_version(NEW, b""))
            .expect("write");
        assert_eq!(pal.image_version(&f).expect("version"), None);
    }
}
