//! Every error the agent can report, with the reference C agent's numbers (data-plane
//! reference §4.6, §4.7) and a text for each.
//!
//! The numeric codes matter on the wire: they appear in the `reason` of FAILED status
//! reports (`"rejected: 0x0000000f"`, `"0xe3000000: 0xfffffffe"`), which dashboards decode the
//! same way for every agent. The code enums ([`OtaError`], [`JobParseError`], [`PalStatus`],
//! [`OsError`], [`MqttError`], [`IngestResult`]) are plain values with `code()` and a text
//! (`Display`, the `OTA_*_strerror` equivalents); [`enum@Error`] is what functions return: a code
//! plus what happened.

use std::path::PathBuf;
use thiserror::Error;

macro_rules! code_enum {
    (
        $(#[$meta:meta])*
        $name:ident : $repr:ty, prefix $prefix:literal {
            $($variant:ident = $value:literal => $text:literal),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Error)]
        #[repr($repr)]
        pub enum $name {
            $(#[error($text)] $variant = $value),+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The C agent's number for this value.
            pub fn code(self) -> $repr {
                self as $repr
            }

            /// The C agent's identifier for this value.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => concat!($prefix, stringify!($variant))),+
                }
            }

            /// The value with this number, if there is one.
            pub fn from_code(code: $repr) -> Option<$name> {
                $name::ALL.iter().copied().find(|v| v.code() == code)
            }
        }
    };
}

code_enum!(
    /// The agent's own error codes (`OtaErr_t`).
    OtaError: u32, prefix "OtaErr" {
        Uninitialized = 1 => "the agent is not initialized",
        Panic = 2 => "unrecoverable internal error",
        InvalidArg = 3 => "invalid argument",
        AgentStopped = 4 => "the agent is stopped",
        SignalEventFailed = 5 => "the event could not be queued",
        RequestJobFailed = 6 => "requesting the next job failed",
        InitFileTransferFailed = 7 => "starting the file transfer failed",
        RequestFileBlockFailed = 8 => "requesting file blocks failed",
        CleanupControlFailed = 9 => "cleaning up the job subscriptions failed",
        CleanupDataFailed = 10 => "cleaning up the file transfer failed",
        UpdateJobStatusFailed = 11 => "updating the job status failed",
        JobParserError = 12 => "the job document could not be parsed",
        InvalidDataProtocol = 13 => "the job offers no data protocol this agent supports",
        MomentumAbort = 14 => "too many requests without progress",
        DowngradeNotAllowed = 15 => "the new image is older than the running one and downgrades are not allowed",
        SameFirmwareVersion = 16 => "the new image has the same version as the running one",
        ImageStateMismatch = 17 => "the job and the platform disagree about the self-test",
        NoActiveJob = 18 => "there is no active job",
        UserAbort = 19 => "the job was aborted by the application",
        FailedToEncodeCbor = 20 => "encoding a CBOR message failed",
        FailedToDecodeCbor = 21 => "decoding a CBOR message failed",
        ActivateFailed = 22 => "activating the new image failed",
        FileSizeOverflow = 23 => "the file has more blocks than the agent can track",
        EmptyJobDocument = 24 => "the job document is empty",
    }
);

code_enum!(
    /// Why a job document was refused (`OtaJobParseErr_t`).
    JobParseError: i32, prefix "OtaJobParseErr" {
        Unknown = -1 => "unknown job parse error",
        NullJob = 1 => "the job message has no job",
        UpdateCurrentJob = 2 => "the job is the one already in progress",
        ZeroFileSize = 3 => "the job's file size is zero",
        NonConformingJobDoc = 4 => "the job document does not conform to afr_ota",
        BadModelInitParams = 5 => "the job's parameters are outside what the agent supports",
        NoContextAvailable = 6 => "no file context is available",
        NoActiveJobs = 7 => "there are no active jobs",
    }
);

code_enum!(
    /// The PAL's main status, the top 8 bits of a PAL status word (`OtaPalMainStatus_t`).
    PalStatus: u32, prefix "OtaPal" {
        Success = 0x00 => "success",
        Uninitialized = 0xe0 => "the PAL is not initialized",
        OutOfMemory = 0xe1 => "out of memory",
        NullFileContext = 0xe2 => "no file context",
        SignatureCheckFailed = 0xe3 => "the signature check failed",
        RxFileCreateFailed = 0xe4 => "creating the receive file failed",
        RxFileTooLarge = 0xe5 => "the file is too large for the platform",
        BootInfoCreateFailed = 0xe6 => "creating the boot information failed",
        BadSignerCert = 0xe7 => "the signer certificate is missing or unusable",
        BadImageState = 0xe8 => "invalid image state",
        AbortFailed = 0xe9 => "aborting the file failed",
        RejectFailed = 0xea => "rejecting the image failed",
        CommitFailed = 0xeb => "committing the image failed",
        ActivateFailed = 0xec => "activating the image failed",
        FileAbort = 0xed => "the file was aborted",
        FileClose = 0xee => "closing the file failed",
    }
);

code_enum!(
    /// Failures of the agent's runtime: its event queue and timers (`OtaOsStatus_t`).
    OsError: u32, prefix "OtaOs" {
        EventQueueCreateFailed = 0x80 => "creating the event queue failed",
        EventQueueSendFailed = 0x81 => "the event queue is full",
        EventQueueReceiveFailed = 0x82 => "the event queue is closed: the agent has stopped",
        EventQueueDeleteFailed = 0x83 => "deleting the event queue failed",
        TimerCreateFailed = 0x84 => "creating a timer failed",
        TimerStartFailed = 0x85 => "starting a timer failed",
        TimerRestartFailed = 0x86 => "restarting a timer failed",
        TimerStopFailed = 0x87 => "stopping a timer failed",
        TimerDeleteFailed = 0x88 => "deleting a timer failed",
    }
);

code_enum!(
    /// Failures of the MQTT connection the agent uses (`OtaMqttStatus_t`).
    MqttError: u32, prefix "OtaMqtt" {
        PublishFailed = 0xa0 => "publishing failed",
        SubscribeFailed = 0xa1 => "subscribing failed",
        UnsubscribeFailed = 0xa2 => "unsubscribing failed",
    }
);

code_enum!(
    /// The outcome of ingesting a block when it ends the transfer (`IngestResult_t`);
    /// the second number of a `"0x%08x: 0x%08x"` failure reason.
    IngestResult: i32, prefix "IngestResult" {
        FileComplete = -1 => "the file is complete and its signature is valid",
        SigCheckFail = -2 => "the file is complete but the signature check failed",
        FileCloseFail = -3 => "closing the receive file failed",
        NullContext = -4 => "no file context",
        BadFileHandle = -5 => "the receive file is not open",
        UnexpectedBlock = -6 => "a block arrived that was not expected",
        BlockOutOfRange = -7 => "the block's index or size is outside the file",
        BadData = -8 => "the block message is malformed",
        WriteBlockFailed = -9 => "the PAL failed to write the block",
        NullResultPointer = -10 => "no result pointer",
        Uninitialized = -127 => "the ingest result was never set",
    }
);

/// A PAL failure: the main status, a platform-specific sub-code (24 bits) and what happened.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{status} (PAL status 0x{:08x}): {detail}", self.code())]
pub struct PalError {
    pub status: PalStatus,
    pub sub: u32,
    pub detail: String,
}

impl PalError {
    pub fn new(status: PalStatus, detail: impl Into<String>) -> Self {
        PalError {
            status,
            sub: 0,
            detail: detail.into(),
        }
    }

    /// The same error with a platform sub-code (only the low 24 bits are kept).
    pub fn with_sub(mut self, sub: u32) -> Self {
        self.sub = sub & 0x00ff_ffff;
        self
    }

    /// The PAL status word: `main << 24 | sub` (`OTA_PAL_COMBINE_ERR`).
    pub fn code(&self) -> u32 {
        (self.status.code() << 24) | (self.sub & 0x00ff_ffff)
    }
}

/// A failure of the [`crate::resume::ResumeStore`].
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("resume state {path}: {action} failed: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("resume state {path} is unreadable: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

/// What agent operations return: one of the coded errors with what happened.
#[derive(Debug, Error)]
pub enum Error {
    #[error("{code}: {detail}")]
    Agent { code: OtaError, detail: String },
    #[error("{code}: {detail}")]
    JobParse { code: JobParseError, detail: String },
    #[error(transparent)]
    Pal(#[from] PalError),
    #[error("{code}: {detail}")]
    Os { code: OsError, detail: String },
    #[error("{code}: {detail}")]
    Mqtt { code: MqttError, detail: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    pub fn agent(code: OtaError, detail: impl Into<String>) -> Self {
        Error::Agent {
            code,
            detail: detail.into(),
        }
    }

    pub fn parse(code: JobParseError, detail: impl Into<String>) -> Self {
        Error::JobParse {
            code,
            detail: detail.into(),
        }
    }

    pub fn os(code: OsError, detail: impl Into<String>) -> Self {
        Error::Os {
            code,
            detail: detail.into(),
        }
    }

    pub fn mqtt(code: MqttError, detail: impl Into<String>) -> Self {
        Error::Mqtt {
            code,
            detail: detail.into(),
        }
    }

    /// The agent-level code of this error, as the C agent would classify it.
    pub fn ota_error(&self) -> OtaError {
        match self {
            Error::Agent { code, .. } => *code,
            Error::JobParse { .. } => OtaError::JobParserError,
            Error::Pal(_) => OtaError::Panic,
            Error::Os { .. } => OtaError::SignalEventFailed,
            Error::Mqtt { code, .. } => match code {
                MqttError::PublishFailed => OtaError::UpdateJobStatusFailed,
                MqttError::SubscribeFailed => OtaError::RequestJobFailed,
                MqttError::UnsubscribeFailed => OtaError::CleanupControlFailed,
            },
            Error::Store(_) => OtaError::Panic,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn check_texts<T: std::fmt::Display + Copy>(all: &[T], name: impl Fn(T) -> &'static str) {
        let mut texts = HashSet::new();
        let mut names = HashSet::new();
        for &v in all {
            let text = v.to_string();
            assert!(!text.is_empty());
            assert!(texts.insert(text.clone()), "duplicate text {text}");
            assert!(names.insert(name(v)), "duplicate name {}", name(v));
        }
    }

    #[test]
    fn every_code_has_a_distinct_text_and_name() {
        check_texts(OtaError::ALL, OtaError::name);
        check_texts(JobParseError::ALL, JobParseError::name);
        check_texts(PalStatus::ALL, PalStatus::name);
        check_texts(OsError::ALL, OsError::name);
        check_texts(MqttError::ALL, MqttError::name);
        check_texts(IngestResult::ALL, IngestResult::name);
        assert_eq!(OtaError::ALL.len(), 24);
        assert_eq!(PalStatus::ALL.len(), 16);
    }

    #[test]
    fn codes_match_the_c_agent() {
        assert_eq!(OtaError::DowngradeNotAllowed.code(), 15);
        assert_eq!(OtaError::SameFirmwareVersion.code(), 16);
        assert_eq!(OtaError::ImageStateMismatch.code(), 17);
        assert_eq!(OtaError::UserAbort.code(), 19);
        assert_eq!(OtaError::EmptyJobDocument.code(), 24);
        assert_eq!(
            OtaError::DowngradeNotAllowed.name(),
            "OtaErrDowngradeNotAllowed"
        );
        assert_eq!(JobParseError::ZeroFileSize.code(), 3);
        assert_eq!(JobParseError::Unknown.code(), -1);
        assert_eq!(PalStatus::SignatureCheckFailed.code(), 0xe3);
        assert_eq!(PalStatus::FileClose.name(), "OtaPalFileClose");
        assert_eq!(IngestResult::SigCheckFail.code() as u32, 0xffff_fffe);
        assert_eq!(IngestResult::BlockOutOfRange.code() as u32, 0xffff_fff9);
        for &c in OtaError::ALL {
            assert_eq!(OtaError::from_code(c.code()), Some(c));
        }
        assert_eq!(OtaError::from_code(0), None);
        assert_eq!(PalStatus::from_code(0xe7), Some(PalStatus::BadSignerCert));
    }

    #[test]
    fn pal_status_word() {
        let e = PalError::new(PalStatus::SignatureCheckFailed, "bad").with_sub(0x1234_5678);
        assert_eq!(e.code(), 0xe334_5678);
        assert_eq!(
            e.to_string(),
            "the signature check failed (PAL status 0xe3345678): bad"
        );
        assert_eq!(
            PalError::new(PalStatus::BadSignerCert, "x").code(),
            0xe700_0000
        );
    }

    #[test]
    fn errors_render_code_and_detail() {
        let e = Error::agent(OtaError::MomentumAbort, "32 requests");
        assert_eq!(
            e.to_string(),
            "too many requests without progress: 32 requests"
        );
        assert_eq!(e.ota_error(), OtaError::MomentumAbort);
        let e = Error::parse(JobParseError::ZeroFileSize, "files[0]");
        assert_eq!(e.ota_error(), OtaError::JobParserError);
        let e = Error::os(OsError::EventQueueSendFailed, "64 queued");
        assert_eq!(e.to_string(), "the event queue is full: 64 queued");
        let e = Error::mqtt(MqttError::PublishFailed, "channel full");
        assert_eq!(e.ota_error(), OtaError::UpdateJobStatusFailed);
        let e: Error = PalError::new(PalStatus::FileClose, "disk").into();
        assert!(e.to_string().contains("closing the file failed"));
    }
}
