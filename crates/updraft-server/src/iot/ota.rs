//! OTA updates: CreateOTAUpdate, GetOTAUpdate, ListOTAUpdates, DeleteOTAUpdate.
//!
//! CreateOTAUpdate validates everything it can while the caller waits (so mistakes are
//! 4xx answers), records the update as CREATE_PENDING and returns. A background task
//! then moves it through CREATE_IN_PROGRESS to CREATE_COMPLETE (stream and job created)
//! or CREATE_FAILED with `errorInfo`. Updates left pending by a stopped server are
//! resumed at start ([`resume_pending`]); every creation step is idempotent.
//!
//! Code signing, per file: `customCodeSigning` carries the caller's signature;
//! `awsSignerJobId` reuses a Succeeded signing job (its signature, and `certfile` from its
//! profile's `certname`); `startSigningJobParameter` has the build start a signing job
//! (creating the profile from `signingProfileParameter` if asked) and wait for it. Either
//! signer variant delivers the job's raw payload, written (as AWS does) as the newest
//! version of the signed object's key, and keys the signature by the platform's
//! algorithms (`sig-sha256-ecdsa` for AmazonFreeRTOS-Default). The signing parts live in
//! `ota_signing.rs`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use updraft_protocol::ResourceKind;
use updraft_protocol::ids::{DESCRIPTION, OTA_UPDATE_ID, PARAMETER_VALUE, ROLE_ARN};
use updraft_protocol::job::{OtaUpdateStatus, Protocol};
use updraft_protocol::otadoc::{OtaFile, OtaJobDocument, Signature, presigned_placeholder};
use updraft_protocol::{JobStatus, TargetSelection};

use super::job_config::{
    AbortConfig, AbortCriteria, JobConfigs, JobExecutionsRolloutConfig, PresignedUrlConfig,
    TimeoutConfig,
};
use super::jobs::{JobSpec, create_job, resolve_targets};
use super::ota_signing::{
    CodeSigning, SignerFile, SigningMethod, finished_job, is_payload_version, job_algorithms,
    payload_stream_file, plan_signing_start, repoint_stream, run_signing, signing_method,
    signing_token, size_mismatch,
};
use super::streams::S3Location;
use super::{Query, Tag, body, check_id, check_tags, put_opt, with_token};
use crate::clock::{epoch_seconds, now_ms};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::http::ApiRequest;
use crate::server::AppState;
use crate::signer::profiles::CERTNAME;
use crate::store::{OtaUpdate, PageRequest, StoreError, StreamFile};

/// The job id AWS derives from an OTA update id.
pub fn job_id_for(ota_id: &str) -> String {
    format!("AFR_OTA-{ota_id}")
}

/// Default lifetime of pre-signed URLs for HTTP delivery (model text: 1800 s).
const DEFAULT_PRESIGN_SECONDS: i64 = 1800;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AwsPresignedUrlConfig {
    expires_in_sec: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AwsAbortConfig {
    abort_criteria_list: Option<Vec<AbortCriteria>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StreamRef {
    stream_id: Option<String>,
    file_id: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FileLocation {
    stream: Option<StreamRef>,
    s3_location: Option<S3Location>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OtaFileInput {
    file_name: Option<String>,
    file_type: Option<i64>,
    file_location: Option<FileLocation>,
    code_signing: Option<CodeSigning>,
    attributes: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateOtaRequest {
    description: Option<String>,
    targets: Option<Vec<String>>,
    protocols: Option<Vec<String>>,
    target_selection: Option<String>,
    aws_job_executions_rollout_config: Option<JobExecutionsRolloutConfig>,
    aws_job_presigned_url_config: Option<AwsPresignedUrlConfig>,
    aws_job_abort_config: Option<AwsAbortConfig>,
    aws_job_timeout_config: Option<TimeoutConfig>,
    files: Option<Vec<OtaFileInput>>,
    role_arn: Option<String>,
    additional_parameters: Option<BTreeMap<String, String>>,
    tags: Option<Vec<Tag>>,
}

/// What creating an update will make: an optional new stream and the job.
struct Plan {
    new_stream_files: Vec<StreamFile>,
    /// Files completed from the signer while building.
    signing: Vec<SignerFile>,
    document: OtaJobDocument,
    targets: Vec<String>,
    target_selection: TargetSelection,
    configs: JobConfigs,
}

/// The signature text for the job document from the blob the client sent.
///
/// `inlineDocument` is a blob, so the wire carries base64 of what the caller gave. Callers
/// of CLI v1 and boto3 give the base64 signature text itself (the wire then holds it
/// base64-encoded once more); CLI v2 callers and boto3 callers with bytes give the raw
/// DER signature. Either way the document carries base64 of the DER bytes.
fn signature_text(wire: &str) -> ApiResult<String> {
    let bytes = B64.decode(wire.trim()).map_err(|_| {
        ApiError::invalid("customCodeSigning.signature.inlineDocument is not valid base64.")
    })?;
    if bytes.is_empty() {
        return Err(ApiError::invalid(
            "customCodeSigning.signature.inlineDocument is empty.",
        ));
    }
    let as_text = std::str::from_utf8(&bytes).ok().map(str::trim);
    match as_text {
        Some(t) if !t.is_empty() && B64.decode(t).is_ok() => Ok(t.to_owned()),
        _ => Ok(B64.encode(&bytes)),
    }
}

fn parse_protocols(given: Option<&[String]>) -> ApiResult<Vec<Protocol>> {
    let Some(given) = given else {
        return Ok(vec![Protocol::Mqtt]);
    };
    if given.is_empty() || given.len() > 2 {
        return Err(ApiError::invalid(
            "protocols has one or two entries: MQTT, HTTP.",
        ));
    }
    let mut out = Vec::new();
    for p in given {
        let p: Protocol = p
            .parse()
            .map_err(|e| ApiError::invalid(format!("protocols: {e}")))?;
        if out.contains(&p) {
            return Err(ApiError::invalid(format!("protocols lists {p} twice.")));
        }
        out.push(p);
    }
    Ok(out)
}

/// Validates a request and works out what to create. `stream_id` names the stream the
/// update creates for files given by S3 location when MQTT is used.
async fn plan(state: &AppState, r: &CreateOtaRequest, stream_id: &str) -> ApiResult<Plan> {
    if let Some(d) = &r.description {
        DESCRIPTION.check("description", d)?;
    }
    let role = r
        .role_arn
        .as_deref()
        .ok_or_else(|| ApiError::invalid("roleArn is required."))?;
    ROLE_ARN.check("roleArn", role)?;
    check_tags(&r.tags)?;
    for v in r.additional_parameters.iter().flat_map(|m| m.values()) {
        PARAMETER_VALUE.check("additionalParameters", v)?;
    }
    let protocols = parse_protocols(r.protocols.as_deref())?;
    let mqtt = protocols.contains(&Protocol::Mqtt);
    let http = protocols.contains(&Protocol::Http);
    let target_selection = match r.target_selection.as_deref() {
        None => TargetSelection::Snapshot,
        Some(s) => s
            .parse()
            .map_err(|e| ApiError::invalid(format!("targetSelection: {e}")))?,
    };
    let targets = r.targets.clone().unwrap_or_default();
    resolve_targets(state, &targets).await?;

    let files = r.files.as_deref().unwrap_or_default();
    if files.is_empty() {
        return Err(ApiError::invalid("files needs at least one file."));
    }
    let mut doc_files = Vec::new();
    let mut new_stream_files = Vec::new();
    let mut existing_stream: Option<String> = None;
    let mut signing = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let file_type = f
            .file_type
            .map(|t| u32::try_from(t).ok().filter(|t| *t <= 255))
            .map(|t| {
                t.ok_or_else(|| {
                    ApiError::invalid(format!("files[{i}].fileType must be from 0 to 255."))
                })
            })
            .transpose()?;
        for v in f.attributes.iter().flat_map(|m| m.values()) {
            PARAMETER_VALUE.check("files.attributes", v)?;
        }
        let method = signing_method(i, f.code_signing.as_ref())?;
        // The signer job whose signed object this file is delivered from, when it is.
        let signer_job = match &method {
            Some(SigningMethod::Job(id)) => Some(finished_job(state, i, id).await?),
            _ => None,
        };
        let signed_object = signer_job.as_ref().and_then(|j| {
            j.signed_key
                .clone()
                .map(|k| (j.destination_bucket.clone(), k))
        });
        let mut task: Option<SignerFile> = None;
        // (bucket, key) for HTTP delivery, stream file id, size.
        let (object, file_id, size) = match (&f.file_location, &method) {
            (None, Some(SigningMethod::Job(_))) => {
                let job = signer_job
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("signing job lost"))?;
                let (bucket, key) = signed_object
                    .clone()
                    .ok_or_else(|| ApiError::internal("signed object lost"))?;
                let size = job.payload_size.unwrap_or(0);
                let (file_id, stream_index) =
                    payload_stream_file(mqtt, i, &mut new_stream_files, &bucket, &key, size);
                task = Some(SignerFile::payload(i, stream_index, None, job));
                ((bucket, key), file_id, size)
            }
            (None, _) => {
                return Err(ApiError::invalid(format!(
                    "files[{i}].fileLocation is required (it may be omitted only with codeSigning.awsSignerJobId)."
                )));
            }
            (Some(loc), method) => match (&loc.stream, &loc.s3_location) {
                (Some(_), Some(_)) | (None, None) => {
                    return Err(ApiError::invalid(format!(
                        "files[{i}].fileLocation needs exactly one of stream and s3Location."
                    )));
                }
                (Some(_), None) if matches!(method, Some(SigningMethod::Start(_))) => {
                    return Err(ApiError::invalid(format!(
                        "files[{i}]: startSigningJobParameter signs an S3 object; give fileLocation.s3Location, not a stream."
                    )));
                }
                (Some(s), None) => {
                    let sid = s.stream_id.as_deref().ok_or_else(|| {
                        ApiError::invalid(format!(
                            "files[{i}].fileLocation.stream.streamId is required."
                        ))
                    })?;
                    check_id("streamId", &updraft_protocol::ids::STREAM_ID, sid)?;
                    let fid = s.file_id.unwrap_or(0);
                    let stream = state.store.get_stream(sid).await?.ok_or_else(|| {
                        ApiError::not_found(format!("Stream {sid} cannot be found."))
                    })?;
                    let sf = stream
                        .files
                        .iter()
                        .find(|sf| i64::from(sf.file_id) == fid)
                        .ok_or_else(|| {
                            ApiError::not_found(format!(
                                "Stream {sid} has no file with fileId {fid}."
                            ))
                        })?;
                    match &existing_stream {
                        Some(other) if other != sid => {
                            return Err(ApiError::invalid(
                                "All files of an OTA update must come from one stream.",
                            ));
                        }
                        _ => existing_stream = Some(sid.to_owned()),
                    }
                    let mut size = sf.size;
                    if let Some(job) = &signer_job {
                        let payload_size = job.payload_size.unwrap_or(0);
                        if signed_object.as_ref() == Some(&(sf.bucket.clone(), sf.key.clone())) {
                            // The stream names the signer's output: devices must get the
                            // payload, which becomes that key's newest version.
                            if sf.version.is_some()
                                && !is_payload_version(state, job, &sf.resolved_version).await?
                            {
                                return Err(ApiError::invalid(format!(
                                    "files[{i}]: stream {sid} file {fid} is pinned to version {} of s3://{}/{}, signing job {}'s \
                                     JSON document, not the firmware; give the stream file no version (it then follows the \
                                     payload), or omit fileLocation to let the update make its own stream.",
                                    sf.resolved_version, sf.bucket, sf.key, job.id
                                )));
                            }
                            task = Some(SignerFile::payload(
                                i,
                                None,
                                Some((sid.to_owned(), sf.file_id)),
                                job,
                            ));
                            size = payload_size;
                        } else if sf.size != payload_size {
                            return Err(size_mismatch(i, &sf.bucket, &sf.key, sf.size, job));
                        }
                    }
                    (
                        (sf.bucket.clone(), sf.key.clone()),
                        u32::from(sf.file_id),
                        size,
                    )
                }
                (None, Some(s3)) => {
                    let next_id = u8::try_from(new_stream_files.len()).unwrap_or(u8::MAX);
                    let names_signed = signed_object.as_ref()
                        == Some(&(
                            s3.bucket.clone().unwrap_or_default(),
                            s3.key.clone().unwrap_or_default(),
                        ));
                    if let (Some(job), true) = (&signer_job, names_signed) {
                        let (bucket, key) = signed_object
                            .clone()
                            .ok_or_else(|| ApiError::internal("signed object lost"))?;
                        let size = job.payload_size.unwrap_or(0);
                        let (file_id, stream_index) = payload_stream_file(
                            mqtt,
                            i,
                            &mut new_stream_files,
                            &bucket,
                            &key,
                            size,
                        );
                        task = Some(SignerFile::payload(i, stream_index, None, job));
                        ((bucket, key), file_id, size)
                    } else {
                        let sf = s3.resolve(state, next_id).await?;
                        let size = sf.size;
                        let object = (sf.bucket.clone(), sf.key.clone());
                        if let Some(job) = &signer_job
                            && Some(size) != job.payload_size
                        {
                            return Err(size_mismatch(i, &sf.bucket, &sf.key, size, job));
                        }
                        if let Some(SigningMethod::Start(p)) = method {
                            let start = plan_signing_start(state, i, p, &sf).await?;
                            let stream_index = mqtt.then_some(new_stream_files.len());
                            task = Some(SignerFile {
                                doc_index: i,
                                stream_index,
                                repoint: None,
                                job: None,
                                start: Some(start),
                            });
                        }
                        let file_id = if mqtt {
                            new_stream_files.push(sf);
                            u32::from(next_id)
                        } else {
                            u32::try_from(i).unwrap_or(u32::MAX)
                        };
                        (object, file_id, size)
                    }
                }
            },
        };
        if size == 0 {
            return Err(ApiError::invalid(format!(
                "files[{i}] is empty; an OTA file needs at least one byte."
            )));
        }
        let (signature, cert_file) = match &method {
            None => (None, None),
            Some(SigningMethod::Custom(custom)) => {
                let sig = custom
                    .signature
                    .as_ref()
                    .and_then(|s| s.inline_document.as_deref())
                    .ok_or_else(|| {
                        ApiError::invalid(format!("files[{i}].codeSigning.customCodeSigning.signature.inlineDocument is required."))
                    })?;
                (
                    Some(Signature {
                        hash_algorithm: custom.hash_algorithm.clone(),
                        signature_algorithm: custom.signature_algorithm.clone(),
                        value: signature_text(sig)?,
                    }),
                    custom
                        .certificate_chain
                        .as_ref()
                        .and_then(|c| c.certificate_name.clone()),
                )
            }
            Some(SigningMethod::Job(_)) => {
                let job = signer_job
                    .as_ref()
                    .ok_or_else(|| ApiError::internal("signing job lost"))?;
                let (hash, encryption) = job_algorithms(job);
                (
                    Some(Signature {
                        hash_algorithm: Some(hash.to_owned()),
                        signature_algorithm: Some(encryption.to_owned()),
                        value: job.signature.clone().unwrap_or_default(),
                    }),
                    job.signing_parameters.get(CERTNAME).cloned(),
                )
            }
            // Filled in when the update is built, from the job it starts.
            Some(SigningMethod::Start(_)) => (
                None,
                task.as_ref()
                    .and_then(|t| t.start.as_ref())
                    .and_then(|s| s.certfile.clone()),
            ),
        };
        if let Some(t) = task {
            signing.push(t);
        }
        doc_files.push(OtaFile {
            file_path: f.file_name.clone().unwrap_or_else(|| object.1.clone()),
            file_size: size,
            file_id,
            cert_file,
            file_type,
            update_data_url: http
                .then(|| presigned_placeholder(&state.region, &object.0, &object.1)),
            signature,
        });
    }
    if existing_stream.is_some() && !new_stream_files.is_empty() && mqtt {
        return Err(ApiError::invalid(
            "All files of an OTA update must come from one stream: do not mix stream and s3Location files.",
        ));
    }
    let stream_name = if !mqtt {
        None
    } else if new_stream_files.is_empty() {
        existing_stream
    } else {
        Some(stream_id.to_owned())
    };

    let rollout = r.aws_job_executions_rollout_config.clone();
    if let Some(c) = &rollout {
        c.validate("awsJobExecutionsRolloutConfig", 1000)?;
    }
    let abort = r.aws_job_abort_config.as_ref().map(|a| AbortConfig {
        criteria_list: a.abort_criteria_list.clone(),
    });
    let presigned_url_config = if http {
        let expires = r
            .aws_job_presigned_url_config
            .as_ref()
            .and_then(|p| p.expires_in_sec)
            .unwrap_or(DEFAULT_PRESIGN_SECONDS);
        Some(PresignedUrlConfig {
            role_arn: Some(role.to_owned()),
            expires_in_sec: Some(expires),
        })
    } else {
        None
    };
    let configs = JobConfigs {
        presigned_url_config,
        rollout,
        abort,
        timeout: r.aws_job_timeout_config.clone(),
        retry: None,
    };
    configs.validate().map_err(|e| {
        ApiError::invalid(e.message.replace(
            "abortConfig.criteriaList",
            "awsJobAbortConfig.abortCriteriaList",
        ))
    })?;
    Ok(Plan {
        new_stream_files,
        signing,
        document: OtaJobDocument {
            protocols,
            stream_name,
            files: doc_files,
        },
        targets,
        target_selection,
        configs,
    })
}

pub(super) async fn create(state: &AppState, req: &ApiRequest, id: &str) -> ApiResult<Value> {
    check_id("otaUpdateId", &OTA_UPDATE_ID, id)?;
    let job_id = job_id_for(id);
    if job_id.len() > 64 {
        return Err(ApiError::invalid(format!(
            "otaUpdateId must be at most 56 characters so that its job id {job_id} fits in 64."
        )));
    }
    let raw: Value = body(req)?;
    let r: CreateOtaRequest = serde_json::from_value(raw.clone())
        .map_err(|e| ApiError::invalid(format!("Could not parse the request body: {e}")))?;
    let stream_id = format!("AFR_OTA-{}", uuid::Uuid::new_v4());
    let plan = plan(state, &r, &stream_id).await?;
    let arn = state.arn(ResourceKind::OtaUpdate, id);
    if state.store.get_ota_update(id).await?.is_some() {
        return Err(ApiError::already_exists(
            format!("OTA update {id} already exists."),
            id,
            Some(arn),
        ));
    }
    if state.store.get_job(&job_id).await?.is_some() {
        return Err(ApiError::already_exists(
            format!("Job {job_id}, which OTA update {id} would create, already exists."),
            &job_id,
            Some(state.arn(ResourceKind::Job, &job_id)),
        ));
    }
    let now = now_ms();
    let ota = OtaUpdate {
        id: id.to_owned(),
        status: OtaUpdateStatus::CreatePending,
        request: raw,
        job_id: Some(job_id.clone()),
        stream_id: (!plan.new_stream_files.is_empty()).then_some(stream_id),
        error_code: None,
        error_message: None,
        created_ms: now,
        updated_ms: now,
    };
    state
        .store
        .create_ota_update(&ota)
        .await
        .map_err(|e| match e {
            StoreError::AlreadyExists(m) => ApiError::already_exists(m, id, Some(arn.clone())),
            e => e.into(),
        })?;
    spawn_creation(state.clone(), id.to_owned());
    Ok(json!({
        "otaUpdateId": id,
        "otaUpdateArn": arn,
        "awsIotJobId": job_id,
        "awsIotJobArn": state.arn(ResourceKind::Job, &job_id),
        "otaUpdateStatus": OtaUpdateStatus::CreatePending.as_str(),
    }))
}

fn spawn_creation(state: AppState, id: String) {
    tokio::spawn(async move {
        if let Err(e) = run_creation(&state, &id).await {
            tracing::error!(ota_update = %id, error = %e, "could not record the outcome of an OTA update");
        }
    });
}

/// Resumes OTA updates whose creation a stopped server left unfinished.
pub async fn resume_pending(state: &AppState) -> Result<usize, StoreError> {
    let mut resumed = 0;
    for status in [
        OtaUpdateStatus::CreatePending,
        OtaUpdateStatus::CreateInProgress,
    ] {
        let mut page = PageRequest {
            after: None,
            limit: 250,
        };
        loop {
            let p = state.store.list_ota_updates(Some(status), &page).await?;
            for o in &p.items {
                spawn_creation(state.clone(), o.id.clone());
                resumed += 1;
            }
            match p.next {
                Some(n) => page.after = Some(n),
                None => break,
            }
        }
    }
    Ok(resumed)
}

async fn run_creation(state: &AppState, id: &str) -> Result<(), StoreError> {
    let Some(mut ota) = state.store.get_ota_update(id).await? else {
        return Ok(());
    };
    if !matches!(
        ota.status,
        OtaUpdateStatus::CreatePending | OtaUpdateStatus::CreateInProgress
    ) {
        return Ok(());
    }
    ota.status = OtaUpdateStatus::CreateInProgress;
    ota.updated_ms = now_ms();
    state.store.update_ota_update(&ota).await?;
    match build(state, &ota).await {
        Ok(()) => {
            ota.status = OtaUpdateStatus::CreateComplete;
            tracing::info!(ota_update = %id, "OTA update created");
        }
        Err(e) => {
            tracing::warn!(ota_update = %id, error = %e, "OTA update creation failed");
            ota.status = OtaUpdateStatus::CreateFailed;
            ota.error_code = Some(e.code.name().to_owned());
            ota.error_message = Some(e.message);
        }
    }
    ota.updated_ms = now_ms();
    state.store.update_ota_update(&ota).await
}

/// Creates the stream and the job of an update; safe to repeat after a crash.
async fn build(state: &AppState, ota: &OtaUpdate) -> ApiResult<()> {
    let r: CreateOtaRequest = serde_json::from_value(ota.request.clone())
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let stream_id = ota.stream_id.clone().unwrap_or_default();
    let mut plan = plan(state, &r, &stream_id).await?;
    let http = plan.document.protocols.contains(&Protocol::Http);
    for task in &plan.signing {
        let job = match (&task.start, &task.job) {
            (Some(start), _) => run_signing(state, ota, task.doc_index, start).await?,
            (None, Some(job)) => job.clone(),
            (None, None) => continue,
        };
        let file = plan
            .document
            .files
            .get_mut(task.doc_index)
            .ok_or_else(|| ApiError::internal("planned file is missing"))?;
        if task.start.is_some() {
            let (hash, encryption) = job_algorithms(&job);
            file.signature = Some(Signature {
                hash_algorithm: Some(hash.to_owned()),
                signature_algorithm: Some(encryption.to_owned()),
                value: job
                    .signature
                    .clone()
                    .ok_or_else(|| ApiError::internal("signing job has no signature"))?,
            });
        }
        // Devices get the raw payload, written as the signed object's newest version.
        let payload = crate::signer::objects::payload_version(state, &job).await?;
        file.file_size = payload.size;
        if http {
            file.update_data_url = Some(presigned_placeholder(
                &state.region,
                &payload.bucket,
                &payload.key,
            ));
        }
        if let Some(sf) = task
            .stream_index
            .and_then(|i| plan.new_stream_files.get_mut(i))
        {
            sf.bucket = payload.bucket.clone();
            sf.key = payload.key.clone();
            sf.version = None;
            sf.resolved_version = payload.version_id.clone();
            sf.size = payload.size;
            sf.etag = None;
        }
        if let Some((sid, fid)) = &task.repoint {
            repoint_stream(state, sid, *fid, &payload).await?;
        }
    }
    if !plan.new_stream_files.is_empty() && state.store.get_stream(&stream_id).await?.is_none() {
        super::streams::insert(
            state,
            &stream_id,
            Some(format!("Stream of OTA update {}", ota.id)),
            plan.new_stream_files,
            r.role_arn.as_deref().unwrap_or_default(),
        )
        .await?;
    }
    let job_id = job_id_for(&ota.id);
    if state.store.get_job(&job_id).await?.is_some() {
        return Ok(());
    }
    create_job(
        state,
        JobSpec {
            id: job_id,
            targets: plan.targets,
            target_selection: plan.target_selection,
            description: None,
            document: plan.document.to_json(),
            document_source: None,
            namespace_id: None,
            configs: plan.configs,
            tags: None,
        },
    )
    .await?;
    Ok(())
}

pub(super) async fn get(state: &AppState, id: &str) -> ApiResult<Value> {
    check_id("otaUpdateId", &OTA_UPDATE_ID, id)?;
    let o = state
        .store
        .get_ota_update(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("OTA update {id} cannot be found.")))?;
    let req = o.request.as_object().cloned().unwrap_or_default();
    let mut m = Map::new();
    m.insert("otaUpdateId".into(), json!(o.id));
    m.insert(
        "otaUpdateArn".into(),
        json!(state.arn(ResourceKind::OtaUpdate, &o.id)),
    );
    m.insert("creationDate".into(), epoch_seconds(o.created_ms));
    m.insert("lastModifiedDate".into(), epoch_seconds(o.updated_ms));
    put_opt(&mut m, "description", req.get("description").cloned());
    m.insert(
        "targets".into(),
        req.get("targets").cloned().unwrap_or_else(|| json!([])),
    );
    m.insert(
        "protocols".into(),
        req.get("protocols")
            .cloned()
            .unwrap_or_else(|| json!(["MQTT"])),
    );
    put_opt(
        &mut m,
        "awsJobExecutionsRolloutConfig",
        req.get("awsJobExecutionsRolloutConfig").cloned(),
    );
    put_opt(
        &mut m,
        "awsJobPresignedUrlConfig",
        req.get("awsJobPresignedUrlConfig").cloned(),
    );
    m.insert(
        "targetSelection".into(),
        req.get("targetSelection")
            .cloned()
            .unwrap_or_else(|| json!("SNAPSHOT")),
    );
    let mut files = req.get("files").cloned().unwrap_or_else(|| json!([]));
    // Files signed by a job the update started name that job, as on AWS.
    if let Some(list) = files.as_array_mut() {
        for (i, f) in list.iter_mut().enumerate() {
            let Some(cs) = f.get_mut("codeSigning").and_then(Value::as_object_mut) else {
                continue;
            };
            if cs.contains_key("startSigningJobParameter")
                && !cs.contains_key("awsSignerJobId")
                && let Some(job) = state
                    .store
                    .get_signing_job_by_token(&signing_token(&o, i))
                    .await?
            {
                cs.insert("awsSignerJobId".into(), json!(job.id));
            }
        }
    }
    m.insert("otaUpdateFiles".into(), files);
    m.insert("otaUpdateStatus".into(), json!(o.status.as_str()));
    if let Some(job) = &o.job_id {
        m.insert("awsIotJobId".into(), json!(job));
        m.insert(
            "awsIotJobArn".into(),
            json!(state.arn(ResourceKind::Job, job)),
        );
    }
    if o.error_code.is_some() || o.error_message.is_some() {
        m.insert(
            "errorInfo".into(),
            json!({ "code": o.error_code, "message": o.error_message }),
        );
    }
    put_opt(
        &mut m,
        "additionalParameters",
        req.get("additionalParameters").cloned(),
    );
    Ok(json!({ "otaUpdateInfo": m }))
}

pub(super) async fn list(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let q = Query::of(req);
    let status = q.parsed::<OtaUpdateStatus>("otaUpdateStatus")?;
    let page = state.store.list_ota_updates(status, &q.page()?).await?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|o| {
            json!({
                "otaUpdateId": o.id,
                "otaUpdateArn": state.arn(ResourceKind::OtaUpdate, &o.id),
                "creationDate": epoch_seconds(o.created_ms),
            })
        })
        .collect();
    let mut m = Map::new();
    m.insert("otaUpdates".into(), Value::Array(items));
    Ok(with_token(m, &page))
}

pub(super) async fn delete(state: &AppState, req: &ApiRequest, id: &str) -> ApiResult<Value> {
    check_id("otaUpdateId", &OTA_UPDATE_ID, id)?;
    let q = Query::of(req);
    let delete_stream = q.bool("deleteStream")?;
    let force_job = q.bool("forceDeleteAWSJob")?;
    let mut ota = state
        .store
        .get_ota_update(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("OTA update {id} cannot be found.")))?;
    if matches!(
        ota.status,
        OtaUpdateStatus::CreatePending | OtaUpdateStatus::CreateInProgress
    ) {
        return Err(ApiError::new(
            ErrorCode::VersionConflict,
            format!("OTA update {id} is still being created; try again shortly."),
        ));
    }
    ota.status = OtaUpdateStatus::DeleteInProgress;
    ota.updated_ms = now_ms();
    state.store.update_ota_update(&ota).await?;
    let outcome = delete_parts(state, &ota, delete_stream, force_job).await;
    if let Err(e) = outcome {
        ota.status = OtaUpdateStatus::DeleteFailed;
        ota.error_code = Some(e.code.name().to_owned());
        ota.error_message = Some(e.message.clone());
        ota.updated_ms = now_ms();
        state.store.update_ota_update(&ota).await?;
        return Err(e);
    }
    state.store.delete_ota_update(id).await?;
    Ok(json!({}))
}

async fn delete_parts(
    state: &AppState,
    ota: &OtaUpdate,
    delete_stream: bool,
    force_job: bool,
) -> ApiResult<()> {
    if force_job && let Some(job_id) = &ota.job_id {
        match state.store.get_job(job_id).await? {
            Some(job) if job.status != JobStatus::DeletionInProgress => {
                let things = super::jobs::things_of_job(state, job_id).await?;
                state.store.delete_job(job_id, true).await?;
                state.data_plane.invalidate_job(job_id);
                state.data_plane.things_changed(state, things);
            }
            _ => {}
        }
    }
    if delete_stream && let Some(stream_id) = &ota.stream_id {
        state.data_plane.invalidate_stream(stream_id);
        match state.store.delete_stream(stream_id).await {
            Ok(()) | Err(StoreError::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_from_either_client_convention() {
        let der = [0x30u8, 0x45, 0x02, 0x21, 0x00, 0xff, 0x10];
        let b64 = B64.encode(der);
        // Raw bytes on the wire (CLI v2, boto3 with bytes).
        assert_eq!(signature_text(&B64.encode(der)).ok(), Some(b64.clone()));
        // Base64 text on the wire (CLI v1, boto3 with str).
        assert_eq!(signature_text(&B64.encode(b64.as_bytes())).ok(), Some(b64));
        assert!(signature_text("***").is_err());
    }

    #[test]
    fn protocols_default_and_limits() {
        assert_eq!(parse_protocols(None).ok(), Some(vec![Protocol::Mqtt]));
        let both = vec!["HTTP".to_owned(), "MQTT".to_owned()];
        assert_eq!(
            parse_protocols(Some(&both)).ok(),
            Some(vec![Protocol::Http, Protocol::Mqtt])
        );
        assert!(parse_protocols(Some(&["MQTT".to_owned(), "MQTT".to_owned()])).is_err());
        assert!(parse_protocols(Some(&["FTP".to_owned()])).is_err());
        assert!(parse_protocols(Some(&[])).is_err());
    }
}
