//! Updraft's wire vocabulary, shared by the server and (later) the device agent.
//!
//! Pure data and validation, no I/O: ARNs, identifier rules, job and execution
//! states with their transition table, and the `afr_ota` job document that
//! CreateOTAUpdate generates.

pub mod arn;
pub mod cbor;
pub mod ids;
pub mod job;
pub mod otadoc;
pub mod streams;
pub mod topics;

pub use arn::{Arn, ArnError, ResourceKind};
pub use ids::IdError;
pub use job::{ExecutionStatus, JobStatus, TargetSelection, TransitionError};
