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
    /// The object's ETag when the stream was written, when known: in an unversioned bucket
    /// an overwrite keeps the version id, and this tells the new content from the old.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
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

impl JobExecution {
    /// A job's first execution on a thing, QUEUED at `now_ms` (version 1).
    pub fn queued(job_id: &str, thing_name: &str, now_ms: i64) -> JobExecution {
        JobExecution {
            job_id: job_id.to_owned(),
            thing_name: thing_name.to_owned(),
            execution_number: 1,
            status: ExecutionStatus::Queued,
            force_canceled: false,
            status_details: BTreeMap::new(),
            queued_ms: now_ms,
            started_ms: None,
            updated_ms: now_ms,
            version: 1,
            retry_attempt: 0,
        }
    }
}

/// A device's write to its executions. Concurrent devices' writes are committed together
/// (group commit: one transaction for all the devices waiting), by the store itself on
/// SQLite and by the data plane's writer on PostgreSQL (`JobStore::group_commits`).
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceWrite {
    /// Write `execution` if its stored version is `version - 1`. When that ends it, the
    /// outcome carries up to `pending` (at most [`ENDED_PENDING_LIMIT`]) of its thing's
    /// pending executions: as many as the thing's notifications need (none for a write
    /// that announces nothing).
    Update {
        execution: JobExecution,
        pending: usize,
    },
    /// StartNextPendingJobExecution for `thing`: its next pending execution; a QUEUED one
    /// becomes IN_PROGRESS with `status_details`.
    StartNext {
        thing: String,
        status_details: Option<BTreeMap<String, String>>,
        now_ms: i64,
    },
}

impl DeviceWrite {
    /// The thing whose executions the write changes.
    pub fn thing(&self) -> &str {
        match self {
            DeviceWrite::Update { execution, .. } => &execution.thing_name,
            DeviceWrite::StartNext { thing, .. } => thing,
        }
    }
}

/// How many of a thing's pending executions [`DeviceWriteOutcome::Ended`] carries (as
/// many as a `notify` message lists).
pub const ENDED_PENDING_LIMIT: usize = 10;

/// What one [`DeviceWrite`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceWriteOutcome {
    /// Whether the update was written (`false`: the stored version had moved on). A
    /// written update to a terminal status is [`DeviceWriteOutcome::Ended`] instead.
    Updated(bool),
    /// The update was written and ended the execution, which so left its thing's pending
    /// list: that list as the batch's transaction left it (IN_PROGRESS first, then QUEUED
    /// by queue time; as long as the update's `pending` asked), for the thing's `notify`.
    Ended(Vec<JobExecution>),
    /// The execution started, or the one already in progress; `None` when nothing is pending.
    Started(Option<JobExecution>),
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

/// A certificate imported through the ACM subset, with its private key sealed under the
/// installation's key-encryption key. The key is never returned by any API.
#[derive(Clone, PartialEq)]
pub struct AcmCertificate {
    /// The UUID in the ARN.
    pub id: String,
    pub arn: String,
    pub certificate_pem: String,
    pub chain_pem: Option<String>,
    /// The PKCS#8 private key, sealed with AES-256-GCM (see `signer::kek`).
    pub sealed_private_key: String,
    /// ACM's name for the key type: `EC_prime256v1`, `RSA_2048`, ...
    pub key_algorithm: String,
    pub domain_name: Option<String>,
    pub subject: String,
    pub issuer: String,
    /// Colon-separated lower-case hex, as ACM shows serials.
    pub serial: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    pub tags: BTreeMap<String, String>,
    pub created_ms: i64,
    pub imported_ms: i64,
}

impl std::fmt::Debug for AcmCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The sealed key stays out of logs and panics.
        f.debug_struct("AcmCertificate")
            .field("arn", &self.arn)
            .field("key_algorithm", &self.key_algorithm)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

/// Status of a signing profile (signer's CamelCase values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProfileStatus {
    Active,
    Canceled,
    Revoked,
}

impl ProfileStatus {
    pub const ALL: [ProfileStatus; 3] = [
        ProfileStatus::Active,
        ProfileStatus::Canceled,
        ProfileStatus::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ProfileStatus::Active => "Active",
            ProfileStatus::Canceled => "Canceled",
            ProfileStatus::Revoked => "Revoked",
        }
    }
}

impl std::str::FromStr for ProfileStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        ProfileStatus::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("'{s}' is not one of Active, Canceled, Revoked"))
    }
}

/// A signing profile: a certificate, a platform and signing parameters under a name.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningProfile {
    pub name: String,
    /// Ten alphanumerics, part of `profileVersionArn`.
    pub version: String,
    pub platform_id: String,
    pub certificate_arn: String,
    pub signing_parameters: BTreeMap<String, String>,
    pub validity_value: i64,
    /// `DAYS`, `MONTHS` or `YEARS`.
    pub validity_type: String,
    /// The `overrides` member as given (validated against the platform).
    pub overrides: Option<serde_json::Value>,
    pub status: ProfileStatus,
    pub tags: BTreeMap<String, String>,
    pub created_ms: i64,
    pub updated_ms: i64,
}

/// Status of a signing job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SigningJobStatus {
    InProgress,
    Failed,
    Succeeded,
}

impl SigningJobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SigningJobStatus::InProgress => "InProgress",
            SigningJobStatus::Failed => "Failed",
            SigningJobStatus::Succeeded => "Succeeded",
        }
    }
}

impl std::str::FromStr for SigningJobStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            SigningJobStatus::InProgress,
            SigningJobStatus::Failed,
            SigningJobStatus::Succeeded,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
        .ok_or_else(|| format!("'{s}' is not one of InProgress, Failed, Succeeded"))
    }
}

/// A signing job. The profile's settings are copied in at start, so a job describes what
/// it signed with even after the profile changes.
#[derive(Debug, Clone, PartialEq)]
pub struct SigningJob {
    /// A UUID.
    pub id: String,
    /// StartSigningJob's idempotency token.
    pub client_request_token: String,
    pub profile_name: String,
    pub profile_version: String,
    pub platform_id: String,
    pub certificate_arn: String,
    pub signing_parameters: BTreeMap<String, String>,
    pub overrides: Option<serde_json::Value>,
    pub validity_value: i64,
    pub validity_type: String,
    pub source_bucket: String,
    pub source_key: String,
    pub source_version: String,
    pub destination_bucket: String,
    pub destination_prefix: String,
    /// Where the signed object was written (set on success).
    pub signed_key: Option<String>,
    pub signed_version: Option<String>,
    /// Base64 of the DER signature (set on success).
    pub signature: Option<String>,
    /// Size and SHA-256 (hex) of the signed payload (set on success).
    pub payload_size: Option<u64>,
    pub payload_sha256: Option<String>,
    pub status: SigningJobStatus,
    pub status_reason: Option<String>,
    pub requested_by: String,
    pub created_ms: i64,
    pub completed_ms: Option<i64>,
    pub signature_expires_ms: Option<i64>,
}
