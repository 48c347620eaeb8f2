//! Updraft's device OTA agent: the protocol and guarantees of the reference FreeRTOS agent
//! (ota-for-aws-iot-embedded-sdk v3), in Rust, with fewer ways to fail.
//!
//! - [`state`]: the agent's states and events and its state machine as one table.
//! - [`agent`] and [`handle`]: the agent ([`init`], [`Agent::run`]) and the application's
//!   [`AgentHandle`] — the whole `OTA_*` interface.
//! - [`pal`]: the platform abstraction ([`Pal`]), [`pal::memory::MemoryPal`], a complete
//!   in-memory device, and (on Unix) [`pal::linux::LinuxPal`], A/B slots in a directory —
//!   the PAL of the `updraft-agent` daemon.
//! - [`job`]: job messages and the `afr_ota` document.
//! - [`verify`]: SHA-256 + ECDSA P-256 against the certificate named by `certfile`.
//! - [`resume`]: checkpoints of the block bitmap, so a restart resumes the download.
//! - [`mqtt`]: the MQTT side, shareable with the application's connection.
//! - [`status`]: job status reports with the C agent's exact `statusDetails`.
//! - [`error`]: every error code with its text.
//!
//! - [`http`]: downloads through the job's pre-signed URL with `Range` GETs.
//!
//! Transports: MQTT Streams (CBOR, or JSON) and HTTP(S) through the pre-signed URL, chosen
//! per job by [`AgentConfig::data_protocols`]. Both meet in the same two places: the
//! [`AgentEvent::RequestFileBlock`] handler turns the bitmap into a request (a GetStream
//! message, or a Range GET handed to the fetcher task), and the
//! [`AgentEvent::ReceivedFileBlock`] ingest step writes, checkpoints and counts the blocks.
#![forbid(unsafe_code)]

pub mod agent;
mod durable;
pub mod error;
pub mod handle;
pub mod http;
pub mod job;
pub mod mqtt;
pub mod pal;
pub mod resume;
pub mod state;
pub mod status;
pub mod verify;
pub mod version;

pub use agent::{Agent, AgentConfig, JobEvent, Statistics};
pub use error::{Error, JobParseError, MqttError, OsError, OtaError, PalError, PalStatus};
pub use handle::{AgentHandle, init};
pub use pal::{FileContext, ImageState, Pal, PalImageState};
pub use resume::{FileResumeStore, MemoryResumeStore, ResumeStore};
pub use state::{AgentEvent, AgentState};
pub use verify::CertificateStore;
pub use version::AppVersion;
