//! The store: every piece of Updraft's state that is not an artifact blob.
//!
//! [`Store`] is the interface the rest of the server uses. [`SqlStore`] implements it
//! on SQLite (the zero-setup default) and on PostgreSQL (for several replicas); the
//! two differ only in the few places named in [`sql::Dialect`], and one conformance
//! suite (`tests/store_conformance.rs`) runs against both.
//!
//! Every mutating method is one database transaction. Records carry a `version` and
//! writers that read-modify-write check it (`expected_version`), so concurrent
//! replicas cannot overwrite each other's changes.

mod model;
mod sql;

pub use model::*;
pub use sql::{Dialect, SqlStore};

use async_trait::async_trait;
use std::collections::BTreeMap;
use thiserror::Error;
use updraft_protocol::{ExecutionStatus, JobStatus};

/// What can go wrong in the store, in terms the API can answer with.
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    VersionConflict(String),
    /// The resource is referenced by another and cannot be removed.
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    LimitExceeded(String),
    /// The request is not valid given the stored state.
    #[error("{0}")]
    Invalid(String),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// The SQLite connection devices' writes run on (see `store/sql/sqlite_devices.rs`).
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Corrupt(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// A page request: at most `limit` items strictly after the opaque position `after`.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    pub after: Option<String>,
    pub limit: usize,
}

/// A page of results and the position to continue from, if more exist.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// Filters of ListThings.
#[derive(Debug, Clone, Default)]
pub struct ThingFilter {
    pub attribute_name: Option<String>,
    pub attribute_value: Option<String>,
    pub use_prefix_attribute_value: bool,
    pub thing_type_name: Option<String>,
}

/// Filters of ListThingGroups.
#[derive(Debug, Clone, Default)]
pub struct GroupFilter {
    pub parent_group: Option<String>,
    pub name_prefix: Option<String>,
    /// With a parent: include all descendants, not only children.
    pub recursive: bool,
}

/// Filters of ListJobs.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    pub target_selection: Option<updraft_protocol::TargetSelection>,
    /// Only jobs that target this thing-group ARN.
    pub target: Option<String>,
    pub namespace_id: Option<String>,
}

/// How CancelJob treats executions.
#[derive(Debug, Clone)]
pub struct CancelJob {
    pub force: bool,
    pub reason_code: Option<String>,
    pub comment: Option<String>,
    pub now_ms: i64,
}

/// The objects of a bucket listing: keys (latest versions) and common prefixes.
#[derive(Debug, Clone, Default)]
pub struct ObjectListing {
    pub objects: Vec<ObjectVersion>,
    pub common_prefixes: Vec<String>,
    pub next_after: Option<String>,
}

/// Filters of ListSigningProfiles: the statuses to include (never empty) and a platform.
#[derive(Debug, Clone)]
pub struct ProfileFilter {
    pub statuses: Vec<ProfileStatus>,
    pub platform_id: Option<String>,
}

/// Filters of ListSigningJobs.
#[derive(Debug, Clone, Default)]
pub struct SigningJobFilter {
    pub status: Option<SigningJobStatus>,
    pub platform_id: Option<String>,
    pub requested_by: Option<String>,
    /// Only jobs whose signature expires before / after these instants (epoch ms).
    pub signature_expires_before: Option<i64>,
    pub signature_expires_after: Option<i64>,
}

/// What happened to an object on delete.
#[derive(Debug, Clone, PartialEq)]
pub struct DeleteOutcome {
    /// The version removed or the delete marker created.
    pub version_id: Option<String>,
    pub delete_marker: bool,
    /// Blobs that are no longer referenced and can be removed from the artifact store.
    pub orphaned_blobs: Vec<String>,
}

/// The store interface, one trait per domain (each implemented in its own file of
/// `sql/`); `Store` is all of them. See the module documentation.
pub trait Store:
    SettingsStore
    + ThingStore
    + StreamStore
    + JobStore
    + CertificateStore
    + OtaStore
    + ObjectIndex
    + SigningStore
    + Send
    + Sync
    + 'static
{
}

impl<T> Store for T where
    T: SettingsStore
        + ThingStore
        + StreamStore
        + JobStore
        + CertificateStore
        + OtaStore
        + ObjectIndex
        + SigningStore
        + Send
        + Sync
        + 'static
{
}

/// Installation-wide settings (account id, keys, the device CA).
#[async_trait]
pub trait SettingsStore: Send + Sync {
    /// Reads an installation-wide setting (account id, keys).
    async fn get_setting(&self, key: &str) -> StoreResult<Option<String>>;

    /// Stores `value` under `key` unless a value exists; returns the value in force.
    async fn init_setting(&self, key: &str, value: &str) -> StoreResult<String>;
}

/// Things, thing groups and membership.
#[async_trait]
pub trait ThingStore: Send + Sync {
    async fn create_thing(&self, thing: &Thing) -> StoreResult<()>;

    async fn get_thing(&self, name: &str) -> StoreResult<Option<Thing>>;

    async fn list_things(
        &self,
        filter: &ThingFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Thing>>;

    /// Replaces a thing; `expected_version` (if given) must match the stored version.
    async fn update_thing(
        &self,
        thing: &Thing,
        expected_version: Option<i64>,
    ) -> StoreResult<Thing>;

    async fn delete_thing(&self, name: &str, expected_version: Option<i64>) -> StoreResult<()>;

    async fn create_thing_group(&self, group: &ThingGroup) -> StoreResult<()>;

    async fn get_thing_group(&self, name: &str) -> StoreResult<Option<ThingGroup>>;

    async fn list_thing_groups(
        &self,
        filter: &GroupFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<ThingGroup>>;

    async fn delete_thing_group(
        &self,
        name: &str,
        expected_version: Option<i64>,
    ) -> StoreResult<()>;

    async fn add_thing_to_group(&self, group: &str, thing: &str) -> StoreResult<()>;

    async fn remove_thing_from_group(&self, group: &str, thing: &str) -> StoreResult<()>;

    /// Names of things in a group (and its descendants if `recursive`), in name order.
    async fn list_things_in_group(
        &self,
        group: &str,
        recursive: bool,
        page: &PageRequest,
    ) -> StoreResult<Page<String>>;

    async fn list_groups_for_thing(
        &self,
        thing: &str,
        page: &PageRequest,
    ) -> StoreResult<Page<ThingGroup>>;
}

/// Streams: files for MQTT delivery.
#[async_trait]
pub trait StreamStore: Send + Sync {
    async fn create_stream(&self, stream: &Stream) -> StoreResult<()>;

    async fn get_stream(&self, id: &str) -> StoreResult<Option<Stream>>;

    async fn list_streams(&self, ascending: bool, page: &PageRequest) -> StoreResult<Page<Stream>>;

    /// Replaces a stream if its stored version is `expected_version`.
    async fn update_stream(&self, stream: &Stream, expected_version: i64) -> StoreResult<()>;

    async fn delete_stream(&self, id: &str) -> StoreResult<()>;
}

/// The outcome of a one-write [`JobStore::device_writes`].
pub(crate) fn only_outcome(
    mut outcomes: Vec<DeviceWriteOutcome>,
) -> StoreResult<DeviceWriteOutcome> {
    outcomes
        .pop()
        .ok_or_else(|| StoreError::Invalid("the store answered no outcome".into()))
}

/// Jobs and job executions.
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Creates a job and its initial executions atomically.
    async fn create_job(&self, job: &Job, executions: &[JobExecution]) -> StoreResult<()>;

    async fn get_job(&self, id: &str) -> StoreResult<Option<Job>>;

    async fn list_jobs(&self, filter: &JobFilter, page: &PageRequest) -> StoreResult<Page<Job>>;

    /// Replaces a job's mutable fields if its stored version is `job.version - 1`.
    async fn update_job(&self, job: &Job) -> StoreResult<()>;

    /// Executions of a job counted by status.
    async fn count_executions(&self, job_id: &str) -> StoreResult<BTreeMap<ExecutionStatus, i64>>;

    /// Cancels a job: its QUEUED executions (and IN_PROGRESS ones with `force`) become CANCELED.
    async fn cancel_job(&self, job_id: &str, how: &CancelJob) -> StoreResult<Job>;

    /// Deletes a job and all its executions. Without `force`, refuses jobs in progress.
    async fn delete_job(&self, job_id: &str, force: bool) -> StoreResult<()>;

    async fn get_execution(
        &self,
        job_id: &str,
        thing: &str,
        number: Option<i64>,
    ) -> StoreResult<Option<JobExecution>>;

    async fn list_executions_for_job(
        &self,
        job_id: &str,
        status: Option<ExecutionStatus>,
        page: &PageRequest,
    ) -> StoreResult<Page<JobExecution>>;

    async fn list_executions_for_thing(
        &self,
        thing: &str,
        status: Option<ExecutionStatus>,
        job_id: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<JobExecution>>;

    /// Writes an execution if its stored version is `execution.version - 1`, and completes a
    /// SNAPSHOT job whose executions are then all terminal.
    async fn update_execution(&self, execution: &JobExecution) -> StoreResult<()> {
        match self
            .device_write(DeviceWrite::Update {
                execution: execution.clone(),
                pending: 0,
            })
            .await?
        {
            DeviceWriteOutcome::Updated(true) | DeviceWriteOutcome::Ended(_) => Ok(()),
            _ => Err(StoreError::VersionConflict(format!(
                "The execution of job {} on {} was changed concurrently.",
                execution.job_id, execution.thing_name
            ))),
        }
    }

    /// Devices' writes in one transaction (group commit), applied in order: one outcome per
    /// write. Updates complete SNAPSHOT jobs whose executions are then all terminal. A
    /// database failure fails them all (and writes none).
    async fn device_writes(&self, writes: &[DeviceWrite]) -> StoreResult<Vec<DeviceWriteOutcome>>;

    /// Whether [`JobStore::device_writes`] commits concurrent callers' writes together
    /// itself (group commit); if not, the data plane's writer batches them.
    fn group_commits(&self) -> bool {
        false
    }

    /// One device write in its own transaction.
    async fn device_write(&self, write: DeviceWrite) -> StoreResult<DeviceWriteOutcome> {
        only_outcome(self.device_writes(std::slice::from_ref(&write)).await?)
    }

    /// Deletes one execution. Without `force`, refuses a non-terminal one.
    async fn delete_execution(
        &self,
        job_id: &str,
        thing: &str,
        number: i64,
        force: bool,
    ) -> StoreResult<()>;

    /// A thing's pending executions (IN_PROGRESS first, then QUEUED), oldest first, at most `limit`.
    async fn pending_executions(&self, thing: &str, limit: usize)
    -> StoreResult<Vec<JobExecution>>;

    /// Queues `execution` unless its (job, thing) already has one; returns whether it did.
    /// The job must be IN_PROGRESS (CONTINUOUS jobs picking up a new group member).
    async fn queue_execution_if_absent(&self, execution: &JobExecution) -> StoreResult<bool>;
}

/// Device certificates and thing principals.
#[async_trait]
pub trait CertificateStore: Send + Sync {
    async fn create_certificate(&self, cert: &Certificate) -> StoreResult<()>;

    async fn get_certificate(&self, id: &str) -> StoreResult<Option<Certificate>>;

    async fn list_certificates(&self, page: &PageRequest) -> StoreResult<Page<Certificate>>;

    /// Sets a certificate's status (the caller checks the transition).
    async fn set_certificate_status(&self, id: &str, status: &str, now_ms: i64) -> StoreResult<()>;

    /// Attaches a principal (certificate ARN) to a thing. With `exclusive`, refuses a
    /// principal attached to another thing, and marks this attachment exclusive.
    async fn attach_principal(
        &self,
        thing: &str,
        principal: &str,
        exclusive: bool,
    ) -> StoreResult<()>;

    async fn detach_principal(&self, thing: &str, principal: &str) -> StoreResult<()>;

    async fn list_thing_principals(
        &self,
        thing: &str,
        page: &PageRequest,
    ) -> StoreResult<Page<String>>;

    /// Is `principal` attached to `thing`?
    async fn principal_attached(&self, thing: &str, principal: &str) -> StoreResult<bool>;
}

/// OTA updates.
#[async_trait]
pub trait OtaStore: Send + Sync {
    async fn create_ota_update(&self, ota: &OtaUpdate) -> StoreResult<()>;

    async fn get_ota_update(&self, id: &str) -> StoreResult<Option<OtaUpdate>>;

    async fn list_ota_updates(
        &self,
        status: Option<updraft_protocol::job::OtaUpdateStatus>,
        page: &PageRequest,
    ) -> StoreResult<Page<OtaUpdate>>;

    async fn update_ota_update(&self, ota: &OtaUpdate) -> StoreResult<()>;

    async fn delete_ota_update(&self, id: &str) -> StoreResult<()>;
}

/// S3 buckets and object metadata (the bytes live in the artifact store).
#[async_trait]
pub trait ObjectIndex: Send + Sync {
    async fn create_bucket(&self, bucket: &Bucket) -> StoreResult<()>;

    async fn get_bucket(&self, name: &str) -> StoreResult<Option<Bucket>>;

    async fn list_buckets(&self) -> StoreResult<Vec<Bucket>>;

    /// Deletes an empty bucket.
    async fn delete_bucket(&self, name: &str) -> StoreResult<()>;

    async fn set_bucket_versioning(&self, name: &str, status: Versioning) -> StoreResult<()>;

    /// Records a new object version; returns blobs that the write made unreachable.
    async fn put_object(&self, object: &ObjectVersion) -> StoreResult<Vec<String>>;

    /// The latest version (which may be a delete marker), or a given version.
    async fn get_object(
        &self,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
    ) -> StoreResult<Option<ObjectVersion>>;

    async fn delete_object(
        &self,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<DeleteOutcome>;

    /// Latest, non-deleted objects under `prefix` after `start_after`, grouped by `delimiter`.
    async fn list_objects(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ObjectListing>;

    /// Every version of objects under `prefix` (ListObjectVersions), newest first per key.
    async fn list_object_versions(
        &self,
        bucket: &str,
        prefix: &str,
        limit: usize,
    ) -> StoreResult<Vec<ObjectVersion>>;

    async fn create_upload(&self, upload: &MultipartUpload) -> StoreResult<()>;

    async fn get_upload(&self, upload_id: &str) -> StoreResult<Option<MultipartUpload>>;

    /// Records a part; returns the blob of a part it replaced, if any.
    async fn put_part(&self, part: &UploadPart) -> StoreResult<Option<String>>;

    async fn list_parts(&self, upload_id: &str) -> StoreResult<Vec<UploadPart>>;

    /// Removes an upload and its parts; returns their blobs.
    async fn delete_upload(&self, upload_id: &str) -> StoreResult<Vec<String>>;

    async fn list_uploads(&self, bucket: &str) -> StoreResult<Vec<MultipartUpload>>;
}

/// Code signing: imported certificates (ACM), signing profiles and signing jobs.
#[async_trait]
pub trait SigningStore: Send + Sync {
    async fn create_acm_certificate(&self, cert: &AcmCertificate) -> StoreResult<()>;

    async fn get_acm_certificate(&self, id: &str) -> StoreResult<Option<AcmCertificate>>;

    /// Certificates in import order (newest first with `descending`).
    async fn list_acm_certificates(
        &self,
        descending: bool,
        page: &PageRequest,
    ) -> StoreResult<Page<AcmCertificate>>;

    /// Replaces a certificate's material (re-import); id, ARN, tags and creation stay.
    async fn reimport_acm_certificate(&self, cert: &AcmCertificate) -> StoreResult<()>;

    /// Deletes a certificate; refuses (`Conflict`) while an Active signing profile uses it.
    async fn delete_acm_certificate(&self, id: &str) -> StoreResult<()>;

    /// The signing profiles (any status) that use a certificate ARN.
    async fn profiles_using_certificate(&self, arn: &str) -> StoreResult<Vec<SigningProfile>>;

    /// Creates a profile; a name already taken (in any status) is `AlreadyExists`.
    async fn create_signing_profile(&self, profile: &SigningProfile) -> StoreResult<()>;

    async fn get_signing_profile(&self, name: &str) -> StoreResult<Option<SigningProfile>>;

    /// Profiles in name order.
    async fn list_signing_profiles(
        &self,
        filter: &ProfileFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<SigningProfile>>;

    /// Moves an Active profile to `status`; a profile that is not Active is `InvalidState`.
    async fn set_signing_profile_status(
        &self,
        name: &str,
        status: ProfileStatus,
        now_ms: i64,
    ) -> StoreResult<SigningProfile>;

    /// Records a new InProgress job, unless a job with its client request token exists:
    /// then that job is returned unchanged (StartSigningJob is idempotent on the token).
    async fn create_signing_job(&self, job: &SigningJob) -> StoreResult<SigningJob>;

    async fn get_signing_job(&self, id: &str) -> StoreResult<Option<SigningJob>>;

    async fn get_signing_job_by_token(&self, token: &str) -> StoreResult<Option<SigningJob>>;

    /// Jobs, newest first.
    async fn list_signing_jobs(
        &self,
        filter: &SigningJobFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<SigningJob>>;

    /// Records the outcome of an InProgress job (status, reason, signed object, signature,
    /// completion); a job that is no longer InProgress is `InvalidState`.
    async fn complete_signing_job(&self, job: &SigningJob) -> StoreResult<()>;
}
