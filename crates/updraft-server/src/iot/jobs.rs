//! Jobs: CreateJob, DescribeJob, ListJobs, UpdateJob, CancelJob, DeleteJob, GetJobDocument.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use updraft_protocol::ids::{
    COMMENT, DESCRIPTION, DOCUMENT_SOURCE, JOB_ID, MAX_JOB_DOCUMENT, NAMESPACE_ID, REASON_CODE,
    TARGET_ARN, THING_GROUP_ID, THING_GROUP_NAME,
};
use updraft_protocol::{ExecutionStatus, JobStatus, ResourceKind, TargetSelection};

use super::job_config::{
    AbortConfig, JobConfigs, JobExecutionsRetryConfig, JobExecutionsRolloutConfig,
    PresignedUrlConfig, TimeoutConfig,
};
use super::{Query, Tag, body, check_id, check_tags, parse_arn, put_opt, with_token};
use crate::clock::{epoch_seconds, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::http::ApiRequest;
use crate::server::AppState;
use crate::store::{CancelJob, Job, JobExecution, JobFilter, PageRequest, StoreError};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateJobRequest {
    targets: Option<Vec<String>>,
    document_source: Option<String>,
    document: Option<String>,
    description: Option<String>,
    presigned_url_config: Option<PresignedUrlConfig>,
    target_selection: Option<String>,
    job_executions_rollout_config: Option<JobExecutionsRolloutConfig>,
    abort_config: Option<AbortConfig>,
    timeout_config: Option<TimeoutConfig>,
    tags: Option<Vec<Tag>>,
    namespace_id: Option<String>,
    job_template_arn: Option<String>,
    job_executions_retry_config: Option<JobExecutionsRetryConfig>,
    document_parameters: Option<Value>,
    scheduling_config: Option<Value>,
    destination_package_versions: Option<Value>,
}

/// What a new job is made of, however it was asked for (CreateJob or CreateOTAUpdate).
pub(crate) struct JobSpec {
    pub id: String,
    pub targets: Vec<String>,
    pub target_selection: TargetSelection,
    pub description: Option<String>,
    pub document: String,
    pub document_source: Option<String>,
    pub namespace_id: Option<String>,
    pub configs: JobConfigs,
    pub tags: Option<Vec<Tag>>,
}

/// Checks a job document: JSON object text of at most 32 KiB.
fn check_document(doc: &str) -> ApiResult<()> {
    if doc.chars().count() > MAX_JOB_DOCUMENT {
        return Err(ApiError::invalid(format!(
            "The job document exceeds {MAX_JOB_DOCUMENT} characters."
        )));
    }
    match serde_json::from_str::<Value>(doc) {
        Ok(Value::Object(_)) => Ok(()),
        Ok(_) => Err(ApiError::invalid("The job document must be a JSON object.")),
        Err(e) => Err(ApiError::invalid(format!(
            "The job document is not valid JSON: {e}"
        ))),
    }
}

async fn load_document_source(state: &AppState, url: &str) -> ApiResult<String> {
    DOCUMENT_SOURCE.check("documentSource", url)?;
    let (bucket, key) = super::parse_s3_url(url).ok_or_else(|| {
        ApiError::invalid(format!(
            "documentSource '{url}' is not an S3 URL (https://s3.amazonaws.com/BUCKET/KEY or https://BUCKET.s3.amazonaws.com/KEY)"
        ))
    })?;
    let object = super::streams::resolve_object(state, &bucket, &key, None)
        .await
        .map_err(|_| {
            ApiError::invalid(format!(
                "Unable to download the job document from {url}: no such object."
            ))
        })?;
    if object.size > MAX_JOB_DOCUMENT as u64 {
        return Err(ApiError::invalid(format!(
            "The job document at {url} exceeds {MAX_JOB_DOCUMENT} bytes."
        )));
    }
    let bytes = state
        .artifacts
        .read_all(&object.blob, MAX_JOB_DOCUMENT as u64)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| ApiError::invalid(format!("The job document at {url} is not UTF-8.")))
}

/// The things a job's targets name (thing-group members included, recursively), deduplicated.
pub(crate) async fn resolve_targets(
    state: &AppState,
    targets: &[String],
) -> ApiResult<Vec<String>> {
    if targets.is_empty() {
        return Err(ApiError::invalid(
            "targets must name at least one thing or thing group.",
        ));
    }
    let mut things = std::collections::BTreeSet::new();
    for t in targets {
        TARGET_ARN.check("targets", t)?;
        let arn = parse_arn(state, t, &[ResourceKind::Thing, ResourceKind::ThingGroup])?;
        match arn.kind {
            ResourceKind::Thing => {
                if state.store.get_thing(&arn.name).await?.is_none() {
                    return Err(ApiError::not_found(format!(
                        "Thing {} cannot be found.",
                        arn.name
                    )));
                }
                things.insert(arn.name);
            }
            _ => {
                let mut page = PageRequest {
                    after: None,
                    limit: 10_000,
                };
                loop {
                    let p = state
                        .store
                        .list_things_in_group(&arn.name, true, &page)
                        .await
                        .map_err(|e| match e {
                            StoreError::NotFound(m) => ApiError::not_found(m),
                            e => e.into(),
                        })?;
                    things.extend(p.items);
                    match p.next {
                        Some(n) => page.after = Some(n),
                        None => break,
                    }
                }
            }
        }
    }
    Ok(things.into_iter().collect())
}

/// Validates and creates a job with one QUEUED execution per target thing.
pub(crate) async fn create_job(state: &AppState, spec: JobSpec) -> ApiResult<Job> {
    check_id("jobId", &JOB_ID, &spec.id)?;
    if let Some(d) = &spec.description {
        DESCRIPTION.check("description", d)?;
    }
    if let Some(ns) = &spec.namespace_id {
        NAMESPACE_ID.check("namespaceId", ns)?;
    }
    check_tags(&spec.tags)?;
    check_document(&spec.document)?;
    spec.configs.validate()?;
    let things = resolve_targets(state, &spec.targets).await?;
    let now = now_ms();
    let mut details = Map::new();
    spec.configs.store_into(&mut details)?;
    if let Some(tags) = &spec.tags {
        details.insert("tags".into(), json!(tags));
    }
    let snapshot_done = spec.target_selection == TargetSelection::Snapshot && things.is_empty();
    let job = Job {
        id: spec.id.clone(),
        status: if snapshot_done {
            JobStatus::Completed
        } else {
            JobStatus::InProgress
        },
        target_selection: spec.target_selection,
        targets: spec.targets,
        description: spec.description,
        document: spec.document,
        document_source: spec.document_source,
        namespace_id: spec.namespace_id,
        details,
        force_canceled: false,
        reason_code: None,
        comment: None,
        created_ms: now,
        updated_ms: now,
        completed_ms: snapshot_done.then_some(now),
        version: 1,
    };
    let executions: Vec<JobExecution> = things
        .into_iter()
        .map(|thing| JobExecution::queued(&job.id, &thing, now))
        .collect();
    state
        .store
        .create_job(&job, &executions)
        .await
        .map_err(|e| match e {
            StoreError::AlreadyExists(m) => {
                ApiError::already_exists(m, &job.id, Some(state.arn(ResourceKind::Job, &job.id)))
            }
            e => e.into(),
        })?;
    state.data_plane.invalidate_job(&job.id);
    state.data_plane.things_changed(
        state,
        executions.into_iter().map(|e| e.thing_name).collect(),
    );
    Ok(job)
}

/// The things with an execution of `job_id` (to notify after a bulk change).
pub(crate) async fn things_of_job(state: &AppState, job_id: &str) -> ApiResult<Vec<String>> {
    let mut things = Vec::new();
    let mut page = PageRequest {
        after: None,
        limit: 10_000,
    };
    loop {
        let p = state
            .store
            .list_executions_for_job(job_id, None, &page)
            .await?;
        things.extend(p.items.into_iter().map(|e| e.thing_name));
        match p.next {
            Some(n) => page.after = Some(n),
            None => return Ok(things),
        }
    }
}

fn unsupported(what: &str) -> ApiError {
    ApiError::invalid(format!("{what} is not supported by Updraft yet."))
}

pub(super) async fn create(state: &AppState, req: &ApiRequest, id: &str) -> ApiResult<Value> {
    check_id("jobId", &JOB_ID, id)?;
    let r: CreateJobRequest = body(req)?;
    if r.job_template_arn.is_some() {
        return Err(unsupported("jobTemplateArn"));
    }
    if r.document_parameters.is_some() {
        return Err(unsupported("documentParameters (managed job templates)"));
    }
    if r.scheduling_config.is_some() {
        return Err(unsupported("schedulingConfig"));
    }
    if r.destination_package_versions.is_some() {
        return Err(unsupported("destinationPackageVersions"));
    }
    let target_selection = match r.target_selection.as_deref() {
        None => TargetSelection::Snapshot,
        Some(s) => s
            .parse()
            .map_err(|e| ApiError::invalid(format!("targetSelection: {e}")))?,
    };
    let document = match (&r.document, &r.document_source) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "Specify either document or documentSource, not both.",
            ));
        }
        (Some(d), None) => d.clone(),
        (None, Some(src)) => load_document_source(state, src).await?,
        (None, None) => return Err(ApiError::invalid("Specify document or documentSource.")),
    };
    let job = create_job(
        state,
        JobSpec {
            id: id.to_owned(),
            targets: r.targets.unwrap_or_default(),
            target_selection,
            description: r.description,
            document,
            document_source: r.document_source,
            namespace_id: r.namespace_id,
            configs: JobConfigs {
                presigned_url_config: r.presigned_url_config,
                rollout: r.job_executions_rollout_config,
                abort: r.abort_config,
                timeout: r.timeout_config,
                retry: r.job_executions_retry_config,
            },
            tags: r.tags,
        },
    )
    .await?;
    let mut m = Map::new();
    m.insert(
        "jobArn".into(),
        json!(state.arn(ResourceKind::Job, &job.id)),
    );
    m.insert("jobId".into(), json!(job.id));
    put_opt(&mut m, "description", job.description);
    Ok(Value::Object(m))
}

async fn find(state: &AppState, id: &str) -> ApiResult<Job> {
    check_id("jobId", &JOB_ID, id)?;
    state
        .store
        .get_job(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Job {id} cannot be found.")))
}

/// The eight `jobProcessDetails` counters, zeros included.
pub(crate) fn process_details(counts: &BTreeMap<ExecutionStatus, i64>) -> Value {
    let n = |s: ExecutionStatus| counts.get(&s).copied().unwrap_or(0);
    json!({
        "numberOfCanceledThings": n(ExecutionStatus::Canceled),
        "numberOfSucceededThings": n(ExecutionStatus::Succeeded),
        "numberOfFailedThings": n(ExecutionStatus::Failed),
        "numberOfRejectedThings": n(ExecutionStatus::Rejected),
        "numberOfQueuedThings": n(ExecutionStatus::Queued),
        "numberOfInProgressThings": n(ExecutionStatus::InProgress),
        "numberOfRemovedThings": n(ExecutionStatus::Removed),
        "numberOfTimedOutThings": n(ExecutionStatus::TimedOut),
    })
}

pub(super) async fn describe(state: &AppState, _req: &ApiRequest, id: &str) -> ApiResult<Value> {
    let job = find(state, id).await?;
    let counts = state.store.count_executions(id).await?;
    let mut m = Map::new();
    m.insert(
        "jobArn".into(),
        json!(state.arn(ResourceKind::Job, &job.id)),
    );
    m.insert("jobId".into(), json!(job.id));
    m.insert(
        "targetSelection".into(),
        json!(job.target_selection.as_str()),
    );
    m.insert("status".into(), json!(job.status.as_str()));
    if job.status == JobStatus::Canceled {
        m.insert("forceCanceled".into(), json!(job.force_canceled));
    }
    put_opt(&mut m, "reasonCode", job.reason_code.clone());
    put_opt(&mut m, "comment", job.comment.clone());
    m.insert("targets".into(), json!(job.targets));
    put_opt(&mut m, "description", job.description.clone());
    for key in [
        "presignedUrlConfig",
        "jobExecutionsRolloutConfig",
        "timeoutConfig",
    ] {
        m.insert(
            key.into(),
            job.details.get(key).cloned().unwrap_or_else(|| json!({})),
        );
    }
    for key in ["abortConfig", "jobExecutionsRetryConfig"] {
        put_opt(&mut m, key, job.details.get(key).cloned());
    }
    m.insert("createdAt".into(), epoch_seconds(job.created_ms));
    m.insert("lastUpdatedAt".into(), epoch_seconds(job.updated_ms));
    put_opt(&mut m, "completedAt", job.completed_ms.map(epoch_seconds));
    m.insert("jobProcessDetails".into(), process_details(&counts));
    put_opt(&mut m, "namespaceId", job.namespace_id.clone());
    let mut out = Map::new();
    put_opt(&mut out, "documentSource", job.document_source.clone());
    out.insert("job".into(), Value::Object(m));
    Ok(Value::Object(out))
}

pub(super) async fn document(state: &AppState, id: &str) -> ApiResult<Value> {
    let job = find(state, id).await?;
    Ok(json!({ "document": job.document }))
}

pub(super) async fn list(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let q = Query::of(req);
    let group = match (
        q.checked("thingGroupName", &THING_GROUP_NAME)?,
        q.checked("thingGroupId", &THING_GROUP_ID)?,
    ) {
        (Some(name), _) => Some(name.to_owned()),
        (None, Some(id)) => {
            // Group ids are not indexed; a listing of groups is small next to jobs.
            let mut found = None;
            let mut page = PageRequest {
                after: None,
                limit: 1000,
            };
            loop {
                let p = state
                    .store
                    .list_thing_groups(&Default::default(), &page)
                    .await?;
                if let Some(g) = p.items.iter().find(|g| g.id == id) {
                    found = Some(g.name.clone());
                    break;
                }
                match p.next {
                    Some(n) => page.after = Some(n),
                    None => break,
                }
            }
            Some(found.ok_or_else(|| {
                ApiError::not_found(format!("Thing group with id {id} cannot be found."))
            })?)
        }
        (None, None) => None,
    };
    let filter = JobFilter {
        status: q.parsed::<JobStatus>("status")?,
        target_selection: q.parsed::<TargetSelection>("targetSelection")?,
        target: group.map(|g| state.arn(ResourceKind::ThingGroup, &g)),
        namespace_id: q.checked("namespaceId", &NAMESPACE_ID)?.map(str::to_owned),
    };
    let page = state.store.list_jobs(&filter, &q.page()?).await?;
    let jobs: Vec<Value> = page
        .items
        .iter()
        .map(|j| {
            let mut m = Map::new();
            m.insert("jobArn".into(), json!(state.arn(ResourceKind::Job, &j.id)));
            m.insert("jobId".into(), json!(j.id));
            m.insert("targetSelection".into(), json!(j.target_selection.as_str()));
            m.insert("status".into(), json!(j.status.as_str()));
            m.insert("createdAt".into(), epoch_seconds(j.created_ms));
            m.insert("lastUpdatedAt".into(), epoch_seconds(j.updated_ms));
            put_opt(&mut m, "completedAt", j.completed_ms.map(epoch_seconds));
            Value::Object(m)
        })
        .collect();
    let mut m = Map::new();
    m.insert("jobs".into(), Value::Array(jobs));
    Ok(with_token(m, &page))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateJobRequest {
    description: Option<String>,
    presigned_url_config: Option<PresignedUrlConfig>,
    job_executions_rollout_config: Option<JobExecutionsRolloutConfig>,
    abort_config: Option<AbortConfig>,
    timeout_config: Option<TimeoutConfig>,
    job_executions_retry_config: Option<JobExecutionsRetryConfig>,
}

pub(super) async fn update(state: &AppState, req: &ApiRequest, id: &str) -> ApiResult<Value> {
    let q = Query::of(req);
    q.checked("namespaceId", &NAMESPACE_ID)?;
    let r: UpdateJobRequest = body(req)?;
    let mut job = find(state, id).await?;
    if job.status == JobStatus::DeletionInProgress {
        return Err(ApiError::invalid(format!("Job {id} is being deleted.")));
    }
    if let Some(d) = &r.description {
        DESCRIPTION.check("description", d)?;
        job.description = Some(d.clone());
    }
    let configs = JobConfigs {
        presigned_url_config: r.presigned_url_config,
        rollout: r.job_executions_rollout_config,
        abort: r.abort_config,
        timeout: r.timeout_config,
        retry: r.job_executions_retry_config,
    };
    configs.validate()?;
    configs.store_into(&mut job.details)?;
    job.updated_ms = now_ms();
    job.version += 1;
    state.store.update_job(&job).await?;
    state.data_plane.invalidate_job(&job.id);
    Ok(json!({}))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CancelJobRequest {
    reason_code: Option<String>,
    comment: Option<String>,
}

pub(super) async fn cancel(state: &AppState, req: &ApiRequest, id: &str) -> ApiResult<Value> {
    check_id("jobId", &JOB_ID, id)?;
    let force = Query::of(req).bool("force")?;
    let r: CancelJobRequest = body(req)?;
    if let Some(c) = &r.reason_code {
        REASON_CODE.check("reasonCode", c)?;
    }
    if let Some(c) = &r.comment {
        COMMENT.check("comment", c)?;
    }
    let job = state
        .store
        .cancel_job(
            id,
            &CancelJob {
                force,
                reason_code: r.reason_code,
                comment: r.comment,
                now_ms: now_ms(),
            },
        )
        .await?;
    state
        .data_plane
        .things_changed(state, things_of_job(state, id).await?);
    let mut m = Map::new();
    m.insert(
        "jobArn".into(),
        json!(state.arn(ResourceKind::Job, &job.id)),
    );
    m.insert("jobId".into(), json!(job.id));
    put_opt(&mut m, "description", job.description);
    Ok(Value::Object(m))
}

pub(super) async fn delete(state: &AppState, req: &ApiRequest, id: &str) -> ApiResult<Value> {
    check_id("jobId", &JOB_ID, id)?;
    let q = Query::of(req);
    q.checked("namespaceId", &NAMESPACE_ID)?;
    let things = things_of_job(state, id).await?;
    state.store.delete_job(id, q.bool("force")?).await?;
    state.data_plane.invalidate_job(id);
    state.data_plane.things_changed(state, things);
    Ok(json!({}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_source_forms() {
        let want = Some(("b".to_owned(), "dir/job 1.json".to_owned()));
        assert_eq!(
            crate::iot::parse_s3_url("https://s3.amazonaws.com/b/dir/job%201.json"),
            want
        );
        assert_eq!(
            crate::iot::parse_s3_url("https://s3.us-west-2.amazonaws.com/b/dir/job%201.json"),
            want
        );
        assert_eq!(
            crate::iot::parse_s3_url("https://b.s3.amazonaws.com/dir/job%201.json"),
            want
        );
        assert_eq!(
            crate::iot::parse_s3_url("https://b.s3.eu-west-1.amazonaws.com/dir/job%201.json"),
            want
        );
        assert_eq!(crate::iot::parse_s3_url("s3://b/dir/job%201.json"), want);
        assert_eq!(crate::iot::parse_s3_url("https://example.com/b/k"), None);
        assert_eq!(crate::iot::parse_s3_url("https://s3.amazonaws.com/b"), None);
    }

    #[test]
    fn documents_must_be_json_objects() {
        assert!(check_document("{\"a\":1}").is_ok());
        assert!(check_document("[1]").is_err());
        assert!(check_document("{").is_err());
        assert!(
            check_document(&format!("{{\"a\":\"{}\"}}", "x".repeat(MAX_JOB_DOCUMENT))).is_err()
        );
    }
}
