//! The records the store keeps. Timestamps are milliseconds since the Unix epoch.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use updraft_protocol::job::OtaUpdateStatus;
use updraft_protocol::{ExecutionStatus, JobStatus, TargetSelection};

#[derive(Debug, Clone, PartialEq)]
pub struct Thing {
    pub name: String,
    pub id: String,
    pub type_name: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub version: i64,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ThingGroup {
    pub name: String,
    pub id: String,
    pub parent: Option<String>,
    pub description: Option<String>,
    pub attributes: BTreeMap<String, String>,
    pub version: i64,
    pub created_ms: i64,
}

/// One file of a stream: an object in the artifact store, resolved at write time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StreamFile {
    pub file_id: u8,
    pub bucket: String,
    pub key: String,
    /// The version the caller named, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The object version resolved when the stream was written.
    pub resolved_version: String,
    /// The object's size in bytes when the stream was written.
    pub size: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    pub id: String,
    pub version: i64,
    pub description: Option<String>,
    pub files: Vec<StreamFile>,
    pub role_arn: String,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// A job. `details` holds the validated configuration members exactly as DescribeJob
/// returns them (presignedUrlConfig, jobExecutionsRolloutConfig, abortConfig, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub id: String,
    pub status: JobStatus,
    pub target_selection: TargetSelection,
    pub targets: Vec<String>,
    pub description: Option<String>,
    pub document: String,
    pub document_source: Option<String>,
    pub namespace_id: Option<String>,
    pub details: serde_json::Map<String, serde_json::Value>,
    pub force_canceled: bool,
    pub reason_code: Option<String>,
    pub comment: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub completed_ms: Option<i64>,
    pub version: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobExecution {
    pub job_id: String,
    pub thing_name: String,
    pub execution_number: i64,
    pub status: ExecutionStatus,
    pub force_canceled: bool,
    pub status_details: BTreeMap<String, String>,
    pub queued_ms: i64,
    pub started_ms: Option<i64>,
    pub updated_ms: i64,
    pub version: i64,
    pub retry_attempt: i64,
}

/// An OTA update. `request` is the validated CreateOTAUpdate body; the rest is derived.
#[derive(Debug, Clone, PartialEq)]
pub struct OtaUpdate {
    pub id: String,
    pub status: OtaUpdateStatus,
    pub request: serde_json::Value,
    pub job_id: Option<String>,
    /// The stream this update created (deleted with `deleteStream`).
    pub stream_id: Option<String>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// Bucket versioning state. `Unversioned` buckets keep one version, id `null`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Versioning {
    Unversioned,
    Enabled,
    Suspended,
}

impl Versioning {
    pub fn as_str(self) -> &'static str {
        match self {
            Versioning::Unversioned => "",
            Versioning::Enabled => "Enabled",
            Versioning::Suspended => "Suspended",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" => Some(Versioning::Unversioned),
            "Enabled" => Some(Versioning::Enabled),
            "Suspended" => Some(Versioning::Suspended),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Bucket {
    pub name: String,
    pub versioning: Versioning,
    pub created_ms: i64,
}

/// A checksum recorded with an object or part (`crc32`, `crc32c`, `sha1`, `sha256`, `crc64nvme`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredChecksum {
    pub algorithm: String,
    /// Base64 value; composite values of multipart objects end in `-N`.
    pub value: String,
}

/// One version of an object (or a delete marker).
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectVersion {
    pub bucket: String,
    pub key: String,
    /// `null` for objects written while versioning was off or suspended.
    pub version_id: String,
    pub delete_marker: bool,
    pub size: u64,
    /// Quoted, as S3 returns it.
    pub etag: String,
    pub content_type: Option<String>,
    pub checksum: Option<StoredChecksum>,
    pub metadata: BTreeMap<String, String>,
    /// Where the bytes are in the artifact store (empty for delete markers).
    pub blob: String,
    pub created_ms: i64,
    /// Set by the store: whether this is the key's current version.
    pub is_latest: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MultipartUpload {
    pub upload_id: String,
    pub bucket: String,
    pub key: String,
    pub content_type: Option<String>,
    pub checksum_algorithm: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct UploadPart {
    pub upload_id: String,
    pub part_number: i64,
    pub size: u64,
    pub etag: String,
    pub checksum: Option<StoredChecksum>,
    pub blob: String,
    pub created_ms: i64,
}

/// A device certificate issued by Updraft's CA.
#[derive(Debug, Clone, PartialEq)]
pub struct Certificate {
    /// SHA-256 of the DER, 64 lower-case hex characters (as AWS IoT names certificates).
    pub id: String,
    /// ACTIVE, INACTIVE, REVOKED, ...
    pub status: String,
    pub pem: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub created_ms: i64,
    pub updated_ms: i64,
}
