//! The iot-jobs-data HTTPS API (`aws iot-jobs-data ...`): the Jobs device API over
//! rest-json. Unlike MQTT, `jobDocument` is a string here; timestamps are integer seconds.

use axum::http::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use updraft_protocol::ids::{JOB_ID, THING_NAME};

use super::jobs::{self, JobRef, JobsError, JobsErrorCode, UpdateRequest};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::http::ApiRequest;
use crate::iot::Query;
use crate::server::AppState;
use crate::store::JobExecution;

impl From<JobsError> for ApiError {
    fn from(e: JobsError) -> Self {
        let code = match e.code {
            JobsErrorCode::InvalidTopic
            | JobsErrorCode::InvalidJson
            | JobsErrorCode::InvalidRequest => ErrorCode::InvalidRequest,
            JobsErrorCode::ResourceNotFound => ErrorCode::ResourceNotFound,
            JobsErrorCode::InvalidStateTransition | JobsErrorCode::VersionMismatch => {
                ErrorCode::InvalidStateTransition
            }
            JobsErrorCode::TerminalStateReached => ErrorCode::TerminalState,
            JobsErrorCode::RequestThrottled => ErrorCode::DataPlaneThrottling,
            JobsErrorCode::InternalError => ErrorCode::ServiceUnavailable,
        };
        ApiError::new(code, e.message)
    }
}

fn execution_json(e: &JobExecution, document: Option<&str>) -> Value {
    let mut m = Map::new();
    m.insert("jobId".into(), json!(e.job_id));
    m.insert("thingName".into(), json!(e.thing_name));
    m.insert("status".into(), json!(e.status.as_str()));
    m.insert("statusDetails".into(), json!(e.status_details));
    m.insert("queuedAt".into(), json!(e.queued_ms / 1000));
    if let Some(s) = e.started_ms {
        m.insert("startedAt".into(), json!(s / 1000));
    }
    m.insert("lastUpdatedAt".into(), json!(e.updated_ms / 1000));
    m.insert("versionNumber".into(), json!(e.version));
    m.insert("executionNumber".into(), json!(e.execution_number));
    if let Some(d) = document {
        m.insert("jobDocument".into(), json!(d));
    }
    Value::Object(m)
}

fn summary_json(e: &JobExecution) -> Value {
    let mut m = Map::new();
    m.insert("jobId".into(), json!(e.job_id));
    m.insert("queuedAt".into(), json!(e.queued_ms / 1000));
    if let Some(s) = e.started_ms {
        m.insert("startedAt".into(), json!(s / 1000));
    }
    m.insert("lastUpdatedAt".into(), json!(e.updated_ms / 1000));
    m.insert("versionNumber".into(), json!(e.version));
    m.insert("executionNumber".into(), json!(e.execution_number));
    Value::Object(m)
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartNextBody {
    status_details: Option<BTreeMap<String, String>>,
    step_timeout_in_minutes: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateBody {
    status: Option<String>,
    status_details: Option<BTreeMap<String, String>>,
    step_timeout_in_minutes: Option<i64>,
    expected_version: Option<i64>,
    #[serde(default)]
    include_job_execution_state: bool,
    #[serde(default)]
    include_job_document: bool,
    execution_number: Option<i64>,
}

/// Routes an authenticated `iot-jobs-data` request.
pub async fn handle(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let segs: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let (thing, rest) = match segs.as_slice() {
        ["things", thing, "jobs", rest @ ..] => (*thing, rest),
        _ => {
            return Err(ApiError::new(
                ErrorCode::NotImplemented,
                format!(
                    "iot-jobs-data has no operation {} /{}",
                    req.method,
                    req.segments.join("/")
                ),
            ));
        }
    };
    THING_NAME.check("thingName", thing)?;
    let q = Query::of(req);
    match (rest, &req.method) {
        ([], &Method::GET) => {
            let (in_progress, queued) = jobs::get_pending(state, thing).await?;
            Ok(json!({
                "inProgressJobs": in_progress.iter().map(summary_json).collect::<Vec<_>>(),
                "queuedJobs": queued.iter().map(summary_json).collect::<Vec<_>>(),
            }))
        }
        (["$next"], &Method::PUT) => {
            let b: StartNextBody = crate::iot::body(req)?;
            let started =
                jobs::start_next(state, thing, b.status_details, b.step_timeout_in_minutes).await?;
            Ok(match started {
                Some(d) => json!({ "execution": execution_json(&d.execution, Some(&d.document)) }),
                None => json!({}),
            })
        }
        ([job], &Method::GET) => {
            let job_ref = if *job == updraft_protocol::topics::NEXT_JOB {
                JobRef::Next
            } else {
                JOB_ID.check("jobId", job)?;
                JobRef::Id(job)
            };
            let include_doc = q.get("includeJobDocument") != Some("false");
            q.bool("includeJobDocument")?;
            let number = q.int("executionNumber", 1, i64::MAX)?;
            let found = jobs::describe(state, thing, job_ref, number).await?;
            Ok(match found {
                Some(d) => {
                    json!({ "execution": execution_json(&d.execution, include_doc.then_some(d.document.as_str())) })
                }
                None => json!({}),
            })
        }
        ([job], &Method::POST) => {
            JOB_ID.check("jobId", job)?;
            let b: UpdateBody = crate::iot::body(req)?;
            let include_state = b.include_job_execution_state;
            let out = jobs::update(
                state,
                thing,
                job,
                UpdateRequest {
                    status: b.status,
                    status_details: b.status_details,
                    expected_version: b.expected_version,
                    execution_number: b.execution_number,
                    step_timeout_in_minutes: b.step_timeout_in_minutes,
                    include_job_execution_state: include_state,
                    include_job_document: b.include_job_document,
                },
            )
            .await?;
            let mut m = Map::new();
            if include_state {
                m.insert(
                    "executionState".into(),
                    json!({
                        "status": out.execution.status.as_str(),
                        "statusDetails": out.execution.status_details,
                        "versionNumber": out.execution.version,
                    }),
                );
            }
            if let Some(d) = out.document {
                m.insert("jobDocument".into(), json!(d));
            }
            Ok(Value::Object(m))
        }
        _ => Err(ApiError::new(
            ErrorCode::NotImplemented,
            format!(
                "iot-jobs-data has no operation {} /{}",
                req.method,
                req.segments.join("/")
            ),
        )),
    }
}
