//! Job executions on the control plane: DescribeJobExecution, ListJobExecutionsForJob,
//! ListJobExecutionsForThing, CancelJobExecution, DeleteJobExecution.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use updraft_protocol::ResourceKind;
use updraft_protocol::ids::{DETAILS_KEY, DETAILS_VALUE, JOB_ID, NAMESPACE_ID, THING_NAME};
use updraft_protocol::job::Actor;
use updraft_protocol::{ExecutionStatus, TransitionError};

use super::{Query, body, check_id, put_opt, with_token};
use crate::clock::{epoch_seconds, now_ms};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::http::ApiRequest;
use crate::server::AppState;
use crate::store::JobExecution;

fn summary(e: &JobExecution) -> Value {
    let mut m = Map::new();
    m.insert("status".into(), json!(e.status.as_str()));
    m.insert("queuedAt".into(), epoch_seconds(e.queued_ms));
    put_opt(&mut m, "startedAt", e.started_ms.map(epoch_seconds));
    m.insert("lastUpdatedAt".into(), epoch_seconds(e.updated_ms));
    m.insert("executionNumber".into(), json!(e.execution_number));
    m.insert("retryAttempt".into(), json!(e.retry_attempt));
    Value::Object(m)
}

pub(super) async fn describe(
    state: &AppState,
    req: &ApiRequest,
    thing: &str,
    job: &str,
) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, thing)?;
    check_id("jobId", &JOB_ID, job)?;
    let number = Query::of(req).int("executionNumber", 1, i64::MAX)?;
    let e = state
        .store
        .get_execution(job, thing, number)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "No job execution of job {job} exists for thing {thing}."
            ))
        })?;
    let mut m = Map::new();
    m.insert("jobId".into(), json!(e.job_id));
    m.insert("status".into(), json!(e.status.as_str()));
    m.insert("forceCanceled".into(), json!(e.force_canceled));
    m.insert(
        "statusDetails".into(),
        json!({ "detailsMap": e.status_details }),
    );
    m.insert(
        "thingArn".into(),
        json!(state.arn(ResourceKind::Thing, &e.thing_name)),
    );
    m.insert("queuedAt".into(), epoch_seconds(e.queued_ms));
    put_opt(&mut m, "startedAt", e.started_ms.map(epoch_seconds));
    m.insert("lastUpdatedAt".into(), epoch_seconds(e.updated_ms));
    m.insert("executionNumber".into(), json!(e.execution_number));
    m.insert("versionNumber".into(), json!(e.version));
    Ok(json!({ "execution": m }))
}

pub(super) async fn list_for_job(
    state: &AppState,
    req: &ApiRequest,
    job: &str,
) -> ApiResult<Value> {
    check_id("jobId", &JOB_ID, job)?;
    let q = Query::of(req);
    let status = q.parsed::<ExecutionStatus>("status")?;
    if state.store.get_job(job).await?.is_none() {
        return Err(ApiError::not_found(format!("Job {job} cannot be found.")));
    }
    let page = state
        .store
        .list_executions_for_job(job, status, &q.page()?)
        .await?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|e| {
            json!({
                "thingArn": state.arn(ResourceKind::Thing, &e.thing_name),
                "jobExecutionSummary": summary(e),
            })
        })
        .collect();
    let mut m = Map::new();
    m.insert("executionSummaries".into(), Value::Array(items));
    Ok(with_token(m, &page))
}

pub(super) async fn list_for_thing(
    state: &AppState,
    req: &ApiRequest,
    thing: &str,
) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, thing)?;
    let q = Query::of(req);
    let status = q.parsed::<ExecutionStatus>("status")?;
    let job = q.checked("jobId", &JOB_ID)?;
    q.checked("namespaceId", &NAMESPACE_ID)?;
    let page = state
        .store
        .list_executions_for_thing(thing, status, job, &q.page()?)
        .await?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|e| json!({ "jobId": e.job_id, "jobExecutionSummary": summary(e) }))
        .collect();
    let mut m = Map::new();
    m.insert("executionSummaries".into(), Value::Array(items));
    Ok(with_token(m, &page))
}

/// Checks a statusDetails map against the model (keys and values, at most 10 entries).
pub(crate) fn check_status_details(details: &BTreeMap<String, String>) -> ApiResult<()> {
    if details.len() > 10 {
        return Err(ApiError::invalid("statusDetails holds at most 10 entries."));
    }
    for (k, v) in details {
        DETAILS_KEY.check("statusDetails key", k)?;
        DETAILS_VALUE.check("statusDetails value", v)?;
    }
    Ok(())
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CancelExecutionRequest {
    expected_version: Option<i64>,
    status_details: Option<BTreeMap<String, String>>,
}

pub(super) async fn cancel(
    state: &AppState,
    req: &ApiRequest,
    thing: &str,
    job: &str,
) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, thing)?;
    check_id("jobId", &JOB_ID, job)?;
    let force = Query::of(req).bool("force")?;
    let r: CancelExecutionRequest = body(req)?;
    if let Some(d) = &r.status_details {
        check_status_details(d)?;
    }
    let mut e = state
        .store
        .get_execution(job, thing, None)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "No job execution of job {job} exists for thing {thing}."
            ))
        })?;
    if let Some(v) = r.expected_version
        && v != e.version
    {
        return Err(ApiError::new(
            ErrorCode::VersionConflict,
            format!(
                "The expected version {v} does not match the execution's version {}.",
                e.version
            ),
        ));
    }
    let actor = if force {
        Actor::ServiceForced
    } else {
        Actor::Service
    };
    let was_in_progress = e.status == ExecutionStatus::InProgress;
    e.status = e
        .status
        .transition(ExecutionStatus::Canceled, actor)
        .map_err(|err| match err {
            TransitionError::NotAllowed {
                from: ExecutionStatus::InProgress,
                ..
            } => ApiError::new(
                ErrorCode::InvalidStateTransition,
                "The execution is IN_PROGRESS; cancel it with force to interrupt the device.",
            ),
            err => ApiError::new(ErrorCode::InvalidStateTransition, err.to_string()),
        })?;
    e.force_canceled = was_in_progress;
    if let Some(d) = r.status_details {
        e.status_details.extend(d);
        check_status_details(&e.status_details)?;
    }
    e.updated_ms = now_ms();
    e.version += 1;
    state.store.update_execution(&e).await?;
    state.data_plane.thing_changed(state, thing).await;
    Ok(json!({}))
}

pub(super) async fn delete(
    state: &AppState,
    req: &ApiRequest,
    thing: &str,
    job: &str,
    n: &str,
) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, thing)?;
    check_id("jobId", &JOB_ID, job)?;
    let number: i64 = n
        .parse()
        .map_err(|_| ApiError::invalid(format!("executionNumber must be a number, not '{n}'")))?;
    let q = Query::of(req);
    q.checked("namespaceId", &NAMESPACE_ID)?;
    state
        .store
        .delete_execution(job, thing, number, q.bool("force")?)
        .await?;
    state.data_plane.thing_changed(state, thing).await;
    Ok(json!({}))
}
