//! The device side of Jobs, independent of transport: GetPendingJobExecutions,
//! StartNextPendingJobExecution, DescribeJobExecution and UpdateJobExecution as AWS
//! defines them. The MQTT API (`jobs_mqtt.rs`) and the iot-jobs-data HTTPS API
//! (`jobs_http.rs`) are two serializations of these functions.

use std::collections::BTreeMap;
use updraft_protocol::ids::{DETAILS_KEY, DETAILS_VALUE};
use updraft_protocol::job::Actor;
use updraft_protocol::{ExecutionStatus, TransitionError};

use crate::clock::now_ms;
use crate::server::AppState;
use crate::store::{DeviceWriteOutcome, JobExecution, StoreError};

/// The error codes of the Jobs device API (MQTT `rejected` bodies use them verbatim).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobsErrorCode {
    InvalidTopic,
    InvalidJson,
    InvalidRequest,
    InvalidStateTransition,
    ResourceNotFound,
    VersionMismatch,
    InternalError,
    RequestThrottled,
    TerminalStateReached,
}

impl JobsErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            JobsErrorCode::InvalidTopic => "InvalidTopic",
            JobsErrorCode::InvalidJson => "InvalidJson",
            JobsErrorCode::InvalidRequest => "InvalidRequest",
            JobsErrorCode::InvalidStateTransition => "InvalidStateTransition",
            JobsErrorCode::ResourceNotFound => "ResourceNotFound",
            JobsErrorCode::VersionMismatch => "VersionMismatch",
            JobsErrorCode::InternalError => "InternalError",
            JobsErrorCode::RequestThrottled => "RequestThrottled",
            JobsErrorCode::TerminalStateReached => "TerminalStateReached",
        }
    }
}

/// A refused device request.
#[derive(Debug, Clone)]
pub struct JobsError {
    pub code: JobsErrorCode,
    pub message: String,
    /// The execution's current state (InvalidStateTransition and VersionMismatch).
    pub execution_state: Option<Box<JobExecution>>,
}

impl JobsError {
    pub fn new(code: JobsErrorCode, message: impl Into<String>) -> Self {
        JobsError {
            code,
            message: message.into(),
            execution_state: None,
        }
    }

    fn with_state(mut self, e: &JobExecution) -> Self {
        self.execution_state = Some(Box::new(e.clone()));
        self
    }
}

impl From<StoreError> for JobsError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store failure in the jobs data plane");
        JobsError::new(JobsErrorCode::InternalError, "Internal error")
    }
}

pub type JobsResult<T> = Result<T, JobsError>;

/// An execution as delivered to its device, with the job document ready to send.
#[derive(Debug, Clone)]
pub struct DeliveredExecution {
    pub execution: JobExecution,
    /// The job document with pre-signed URL placeholders substituted.
    pub document: String,
}

pub use updraft_protocol::topics::JobRef;

/// The fields of UpdateJobExecution.
#[derive(Debug, Clone, Default)]
pub struct UpdateRequest {
    pub status: Option<String>,
    pub status_details: Option<BTreeMap<String, String>>,
    pub expected_version: Option<i64>,
    pub execution_number: Option<i64>,
    pub step_timeout_in_minutes: Option<i64>,
    pub include_job_execution_state: bool,
    pub include_job_document: bool,
}

/// What an accepted update answers with.
#[derive(Debug, Clone)]
pub struct UpdateOutcome {
    pub execution: JobExecution,
    pub document: Option<String>,
}

/// Checks statusDetails against the model: at most 10 entries, key and value rules.
pub fn check_details(details: &BTreeMap<String, String>) -> JobsResult<()> {
    if details.len() > 10 {
        return Err(JobsError::new(
            JobsErrorCode::InvalidRequest,
            "statusDetails holds at most 10 entries",
        ));
    }
    for (k, v) in details {
        DETAILS_KEY
            .check("statusDetails key", k)
            .and_then(|()| DETAILS_VALUE.check("statusDetails value", v))
            .map_err(|e| JobsError::new(JobsErrorCode::InvalidRequest, e.to_string()))?;
    }
    Ok(())
}

/// `stepTimeoutInMinutes`: 1..10080, or -1 to clear the step timer.
pub fn check_step_timeout(t: Option<i64>) -> JobsResult<()> {
    match t {
        None | Some(-1) | Some(1..=10080) => Ok(()),
        Some(v) => Err(JobsError::new(
            JobsErrorCode::InvalidRequest,
            format!("stepTimeoutInMinutes must be from 1 to 10080, or -1; not {v}"),
        )),
    }
}

async fn deliver(state: &AppState, execution: JobExecution) -> JobsResult<DeliveredExecution> {
    let job = state
        .data_plane
        .job_of(state, &execution)
        .await?
        .ok_or_else(|| {
            JobsError::new(
                JobsErrorCode::ResourceNotFound,
                format!("Job {} no longer exists", execution.job_id),
            )
        })?;
    let document = state.data_plane.substitute_presigned_urls(&job).await;
    Ok(DeliveredExecution {
        execution,
        document,
    })
}

/// GetPendingJobExecutions: (IN_PROGRESS, QUEUED) summaries.
pub async fn get_pending(
    state: &AppState,
    thing: &str,
) -> JobsResult<(Vec<JobExecution>, Vec<JobExecution>)> {
    let pending = state.store.pending_executions(thing, 1000).await?;
    Ok(pending
        .into_iter()
        .partition(|e| e.status == ExecutionStatus::InProgress))
}

/// StartNextPendingJobExecution.
pub async fn start_next(
    state: &AppState,
    thing: &str,
    status_details: Option<BTreeMap<String, String>>,
    step_timeout_in_minutes: Option<i64>,
) -> JobsResult<Option<DeliveredExecution>> {
    if let Some(d) = &status_details {
        check_details(d)?;
    }
    check_step_timeout(step_timeout_in_minutes)?;
    let started = state
        .data_plane
        .start_next(state, thing, status_details, now_ms())
        .await?;
    // StartNext takes the head of the pending list and keeps it there (IN_PROGRESS sorts
    // first): the list does not gain or lose a member and its head does not change, so
    // there is nothing to notify.
    match started {
        Some(e) => Ok(Some(deliver(state, e).await?)),
        None => Ok(None),
    }
}

/// DescribeJobExecution (`$next` or a job id). `Ok(None)` is "nothing pending" for `$next`.
pub async fn describe(
    state: &AppState,
    thing: &str,
    job: JobRef<'_>,
    execution_number: Option<i64>,
) -> JobsResult<Option<DeliveredExecution>> {
    let execution = match job {
        JobRef::Next => state
            .store
            .pending_executions(thing, 1)
            .await?
            .into_iter()
            .next(),
        JobRef::Id(id) => {
            let e = state
                .store
                .get_execution(id, thing, execution_number)
                .await?;
            if e.is_none() {
                return Err(JobsError::new(
                    JobsErrorCode::ResourceNotFound,
                    format!("Job execution of job {id} on thing {thing} not found"),
                ));
            }
            e
        }
    };
    match execution {
        Some(e) => Ok(Some(deliver(state, e).await?)),
        None => Ok(None),
    }
}

/// UpdateJobExecution.
pub async fn update(
    state: &AppState,
    thing: &str,
    job_id: &str,
    req: UpdateRequest,
) -> JobsResult<UpdateOutcome> {
    let status_text = req.status.as_deref().ok_or_else(|| {
        JobsError::new(
            JobsErrorCode::InvalidRequest,
            "Value null at 'status' failed to satisfy constraint: Member must not be null",
        )
    })?;
    let to: ExecutionStatus = status_text
        .parse()
        .map_err(|e| JobsError::new(JobsErrorCode::InvalidRequest, format!("status: {e}")))?;
    if let Some(d) = &req.status_details {
        check_details(d)?;
    }
    check_step_timeout(req.step_timeout_in_minutes)?;
    // Read-modify-write with the store's version check; a concurrent server-side change
    // (a cancel, say) makes us re-read, unless the device pinned a version itself. The
    // first read may come from the data plane's memory: the write's version check guards
    // it, and an error found against it is checked again against the store.
    let mut cached = state
        .data_plane
        .cached_execution(thing, job_id, req.execution_number);
    for _ in 0..5 {
        let from_cache = cached.is_some();
        let current = match cached.take() {
            Some(e) => e,
            None => state
                .store
                .get_execution(job_id, thing, req.execution_number)
                .await?
                .ok_or_else(|| {
                    JobsError::new(
                        JobsErrorCode::ResourceNotFound,
                        format!("Job execution of job {job_id} on thing {thing} not found"),
                    )
                })?,
        };
        let from = current.status;
        let e = match updated(current, &req, to) {
            Ok(e) => e,
            Err(_) if from_cache => continue,
            Err(err) => return Err(err),
        };
        let written = match state.data_plane.write_execution(state, &e).await? {
            // The execution left the pending list (`write_execution` announced it).
            DeviceWriteOutcome::Ended(_) => true,
            DeviceWriteOutcome::Updated(true) => {
                // A QUEUED execution that starts may become the head (`notify-next`).
                if from == ExecutionStatus::Queued && e.status != from {
                    state.data_plane.thing_changed(state, thing).await;
                }
                true
            }
            _ => false,
        };
        if written {
            let document = if req.include_job_document {
                Some(deliver(state, e.clone()).await?.document)
            } else {
                None
            };
            return Ok(UpdateOutcome {
                execution: e,
                document,
            });
        }
        if req.expected_version.is_some() && !from_cache {
            return Err(JobsError::new(
                JobsErrorCode::VersionMismatch,
                "The execution was changed concurrently",
            ));
        }
    }
    Err(JobsError::new(
        JobsErrorCode::RequestThrottled,
        "The execution is changing too fast; retry",
    ))
}

/// The execution after the device's update `req` to status `to`, or why it is refused.
fn updated(
    mut e: JobExecution,
    req: &UpdateRequest,
    to: ExecutionStatus,
) -> JobsResult<JobExecution> {
    if let Some(v) = req.expected_version
        && v != e.version
    {
        return Err(JobsError::new(
            JobsErrorCode::VersionMismatch,
            format!(
                "The expected version {v} does not match the current version {}",
                e.version
            ),
        )
        .with_state(&e));
    }
    e.status = e.status.transition(to, Actor::Device).map_err(|err| {
        let message = match err {
            TransitionError::Terminal(s) => {
                format!("The execution is in the terminal state {s} and cannot be updated")
            }
            TransitionError::NotAllowed { from, to } => {
                format!("Cannot update from {from} to {to}")
            }
        };
        JobsError::new(JobsErrorCode::InvalidStateTransition, message).with_state(&e)
    })?;
    let now = now_ms();
    if e.status == ExecutionStatus::InProgress && e.started_ms.is_none() {
        e.started_ms = Some(now);
    }
    if let Some(d) = &req.status_details {
        e.status_details = d.clone();
    }
    e.updated_ms = now;
    e.version += 1;
    Ok(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_and_timeouts() {
        let ok = BTreeMap::from([("self_test".to_owned(), "ready".to_owned())]);
        assert!(check_details(&ok).is_ok());
        let bad_key = BTreeMap::from([("bad key".to_owned(), "v".to_owned())]);
        assert_eq!(
            check_details(&bad_key).err().map(|e| e.code),
            Some(JobsErrorCode::InvalidRequest)
        );
        let empty_value = BTreeMap::from([("k".to_owned(), String::new())]);
        assert!(check_details(&empty_value).is_err());
        let many: BTreeMap<String, String> =
            (0..11).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        assert!(check_details(&many).is_err());
        assert!(check_step_timeout(Some(-1)).is_ok());
        assert!(check_step_timeout(Some(0)).is_err());
        assert!(check_step_timeout(Some(10081)).is_err());
    }
}
