//! The Jobs MQTT API: topics `$aws/things/{thing}/jobs/...`, JSON payloads, replies on
//! `<request topic>/accepted` and `/rejected`. Over MQTT `jobDocument` is an embedded JSON
//! object and timestamps are integer epoch seconds.

use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

use super::jobs::{self, JobsError, JobsErrorCode, UpdateRequest};
use super::reply;
use crate::clock::now_ms;
use crate::mqtt::{Inbound, MessageBus};
use crate::server::AppState;
use crate::store::JobExecution;
use updraft_protocol::topics::JobsOp;

/// The longest `clientToken` (the API's limit).
const MAX_CLIENT_TOKEN: usize = 64;

fn seconds(ms: i64) -> Value {
    Value::from(ms / 1000)
}

/// The document as JSON (it was validated as a JSON object when the job was created).
fn document_value(doc: &str) -> Value {
    serde_json::from_str(doc).unwrap_or_else(|_| Value::String(doc.to_owned()))
}

/// JobExecution in the device-plane MQTT shape.
pub(super) fn execution_json(e: &JobExecution, document: Option<&str>) -> Value {
    let mut m = Map::new();
    m.insert("jobId".into(), json!(e.job_id));
    m.insert("thingName".into(), json!(e.thing_name));
    m.insert("status".into(), json!(e.status.as_str()));
    if !e.status_details.is_empty() {
        m.insert("statusDetails".into(), json!(e.status_details));
    }
    m.insert("queuedAt".into(), seconds(e.queued_ms));
    if let Some(s) = e.started_ms {
        m.insert("startedAt".into(), seconds(s));
    }
    m.insert("lastUpdatedAt".into(), seconds(e.updated_ms));
    m.insert("versionNumber".into(), json!(e.version));
    m.insert("executionNumber".into(), json!(e.execution_number));
    if let Some(d) = document {
        m.insert("jobDocument".into(), document_value(d));
    }
    Value::Object(m)
}

/// JobExecutionSummary in the device-plane shape.
pub(super) fn summary_json(e: &JobExecution) -> Value {
    let mut m = Map::new();
    m.insert("jobId".into(), json!(e.job_id));
    m.insert("queuedAt".into(), seconds(e.queued_ms));
    if let Some(s) = e.started_ms {
        m.insert("startedAt".into(), seconds(s));
    }
    m.insert("lastUpdatedAt".into(), seconds(e.updated_ms));
    m.insert("versionNumber".into(), json!(e.version));
    m.insert("executionNumber".into(), json!(e.execution_number));
    Value::Object(m)
}

/// JobExecutionState.
pub(super) fn state_json(e: &JobExecution) -> Value {
    json!({
        "status": e.status.as_str(),
        "statusDetails": e.status_details,
        "versionNumber": e.version,
    })
}

/// Request fields, leniently typed as real clients send them.
struct Fields(Map<String, Value>);

impl Fields {
    fn parse(payload: &[u8]) -> Result<Self, JobsError> {
        if payload.iter().all(u8::is_ascii_whitespace) {
            return Ok(Fields(Map::new()));
        }
        match serde_json::from_slice::<Value>(payload) {
            Ok(Value::Object(m)) => Ok(Fields(m)),
            Ok(_) => Err(JobsError::new(
                JobsErrorCode::InvalidJson,
                "The payload must be a JSON object",
            )),
            Err(e) => Err(JobsError::new(
                JobsErrorCode::InvalidJson,
                format!("Invalid JSON: {e}"),
            )),
        }
    }

    /// `clientToken`: a string of at most 64 characters, echoed verbatim. Anything else is
    /// refused (and not echoed).
    fn client_token(&self) -> Result<Option<String>, JobsError> {
        match self.0.get("clientToken") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(t)) if (1..=MAX_CLIENT_TOKEN).contains(&t.chars().count()) => {
                Ok(Some(t.clone()))
            }
            Some(_) => Err(JobsError::new(
                JobsErrorCode::InvalidRequest,
                format!("clientToken must be a string of 1 to {MAX_CLIENT_TOKEN} characters"),
            )),
        }
    }

    /// A number, or a numeric string (AWS's Jobs library sends `"expectedVersion":"2"`).
    fn long(&self, key: &str) -> Result<Option<i64>, JobsError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_i64().map(Some).ok_or_else(|| {
                JobsError::new(
                    JobsErrorCode::InvalidRequest,
                    format!("{key} must be an integer"),
                )
            }),
            Some(Value::String(s)) => s.trim().parse::<i64>().map(Some).map_err(|_| {
                JobsError::new(
                    JobsErrorCode::InvalidRequest,
                    format!("{key} must be an integer"),
                )
            }),
            Some(_) => Err(JobsError::new(
                JobsErrorCode::InvalidRequest,
                format!("{key} must be an integer"),
            )),
        }
    }

    fn flag(&self, key: &str, default: bool) -> Result<bool, JobsError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(Value::String(s)) if s == "true" || s == "false" => Ok(s == "true"),
            Some(_) => Err(JobsError::new(
                JobsErrorCode::InvalidRequest,
                format!("{key} must be a boolean"),
            )),
        }
    }

    fn string(&self, key: &str) -> Result<Option<String>, JobsError> {
        match self.0.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(JobsError::new(
                JobsErrorCode::InvalidRequest,
                format!("{key} must be a string"),
            )),
        }
    }

    fn details(&self) -> Result<Option<BTreeMap<String, String>>, JobsError> {
        match self.0.get("statusDetails") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| match v {
                    Value::String(s) => Ok((k.clone(), s.clone())),
                    _ => Err(JobsError::new(
                        JobsErrorCode::InvalidRequest,
                        format!("statusDetails.{k} must be a string"),
                    )),
                })
                .collect::<Result<BTreeMap<_, _>, _>>()
                .map(Some),
            Some(_) => Err(JobsError::new(
                JobsErrorCode::InvalidRequest,
                "statusDetails must be an object",
            )),
        }
    }
}

fn with_envelope(mut body: Map<String, Value>, token: &Option<String>) -> Vec<u8> {
    body.insert("timestamp".into(), Value::from(now_ms() / 1000));
    if let Some(t) = token {
        body.insert("clientToken".into(), Value::String(t.clone()));
    }
    Value::Object(body).to_string().into_bytes()
}

/// The `rejected` body for an error.
pub(super) fn rejected_body(e: &JobsError, token: &Option<String>) -> Vec<u8> {
    let mut m = Map::new();
    m.insert("code".into(), json!(e.code.as_str()));
    m.insert("message".into(), json!(e.message));
    if let Some(s) = &e.execution_state {
        m.insert("executionState".into(), state_json(s));
    }
    with_envelope(m, token)
}

/// Answers one Jobs request on `topic` (its `/accepted` or `/rejected`).
pub(super) async fn handle(
    state: &AppState,
    bus: &dyn MessageBus,
    msg: &Inbound,
    op: Result<JobsOp<'_>, String>,
) {
    let thing = msg.client_id.as_str();
    let fields = Fields::parse(&msg.payload);
    let (token, fields) = match fields.map(|f| (f.client_token(), f)) {
        Ok((Ok(token), f)) => (token, Ok(f)),
        Ok((Err(e), _)) => (None, Err(e)),
        Err(e) => (None, Err(e)),
    };
    let result = match (op, fields) {
        (Err(reason), _) => Err(JobsError::new(
            JobsErrorCode::InvalidTopic,
            format!("The topic {} does not name a Jobs API: {reason}", msg.topic),
        )),
        (_, Err(e)) => Err(e),
        (Ok(op), Ok(f)) => run(state, thing, op, &f).await,
    };
    match result {
        Ok(body) => reply(
            bus,
            thing,
            format!("{}/accepted", msg.topic),
            with_envelope(body, &token),
        ),
        Err(e) => reply(
            bus,
            thing,
            format!("{}/rejected", msg.topic),
            rejected_body(&e, &token),
        ),
    }
}

async fn run(
    state: &AppState,
    thing: &str,
    op: JobsOp<'_>,
    f: &Fields,
) -> Result<Map<String, Value>, JobsError> {
    let mut body = Map::new();
    match op {
        JobsOp::GetPending => {
            let (in_progress, queued) = jobs::get_pending(state, thing).await?;
            body.insert(
                "inProgressJobs".into(),
                in_progress.iter().map(summary_json).collect(),
            );
            body.insert(
                "queuedJobs".into(),
                queued.iter().map(summary_json).collect(),
            );
        }
        JobsOp::StartNext => {
            let started =
                jobs::start_next(state, thing, f.details()?, f.long("stepTimeoutInMinutes")?)
                    .await?;
            if let Some(d) = started {
                body.insert(
                    "execution".into(),
                    execution_json(&d.execution, Some(&d.document)),
                );
            }
        }
        JobsOp::Describe { job_id } => {
            let include_doc = f.flag("includeJobDocument", true)?;
            let found = jobs::describe(state, thing, job_id, f.long("executionNumber")?).await?;
            if let Some(d) = found {
                let doc = include_doc.then_some(d.document.as_str());
                body.insert("execution".into(), execution_json(&d.execution, doc));
            }
        }
        JobsOp::Update { job_id } => {
            let req = UpdateRequest {
                status: f.string("status")?,
                status_details: f.details()?,
                expected_version: f.long("expectedVersion")?,
                execution_number: f.long("executionNumber")?,
                step_timeout_in_minutes: f.long("stepTimeoutInMinutes")?,
                include_job_execution_state: f.flag("includeJobExecutionState", false)?,
                include_job_document: f.flag("includeJobDocument", false)?,
            };
            let include_state = req.include_job_execution_state;
            let out = jobs::update(state, thing, job_id, req).await?;
            if include_state {
                body.insert("executionState".into(), state_json(&out.execution));
            }
            if let Some(d) = &out.document {
                body.insert("jobDocument".into(), document_value(d));
            }
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lenient_fields() {
        let f = Fields::parse(
            br#"{"expectedVersion":"2","executionNumber":3,"includeJobDocument":true}"#,
        )
        .unwrap_or(Fields(Map::new()));
        assert_eq!(f.long("expectedVersion").ok().flatten(), Some(2));
        assert_eq!(f.long("executionNumber").ok().flatten(), Some(3));
        assert_eq!(f.flag("includeJobDocument", false).ok(), Some(true));
        assert!(Fields::parse(b"").is_ok());
        assert_eq!(
            Fields::parse(b"{bad").err().map(|e| e.code),
            Some(JobsErrorCode::InvalidJson)
        );
        let bad = Fields::parse(br#"{"expectedVersion":"two"}"#).unwrap_or(Fields(Map::new()));
        assert!(bad.long("expectedVersion").is_err());
    }
}
