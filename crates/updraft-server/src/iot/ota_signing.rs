//! Code signing in CreateOTAUpdate: the `codeSigning` shapes, the choice of method per
//! file, the checks made while the caller waits (a finished job for `awsSignerJobId`; the
//! profile, destination and source for `startSigningJobParameter`), and what building the
//! update does with the signer (starting and waiting for a job, creating the profile it
//! asks for, pointing streams at the signed payload). See `ota.rs` for the flow.

use serde::Deserialize;
use std::collections::BTreeMap;

use crate::clock::now_ms;
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::server::AppState;
use crate::signer::jobs::StartSpec;
use crate::signer::objects::{META_CONTENT, META_JOB};
use crate::signer::profiles::{CERTNAME, DEFAULT_VALIDITY, ProfileSpec};
use crate::store::{
    OtaUpdate, ProfileStatus, SigningJob, SigningJobStatus, SigningProfile, StreamFile,
};

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct InlineDocument {
    pub(super) inline_document: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CertificateChain {
    pub(super) certificate_name: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CustomCodeSigning {
    pub(super) signature: Option<InlineDocument>,
    pub(super) certificate_chain: Option<CertificateChain>,
    pub(super) hash_algorithm: Option<String>,
    pub(super) signature_algorithm: Option<String>,
}

impl CustomCodeSigning {
    fn is_empty(&self) -> bool {
        self.signature.is_none()
            && self.certificate_chain.is_none()
            && self.hash_algorithm.is_none()
            && self.signature_algorithm.is_none()
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SigningProfileParameter {
    pub(super) certificate_arn: Option<String>,
    pub(super) platform: Option<String>,
    pub(super) certificate_path_on_device: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct S3Destination {
    pub(super) bucket: Option<String>,
    pub(super) prefix: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct SigningDestination {
    s3_destination: Option<S3Destination>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct StartSigningJobParameter {
    pub(super) signing_profile_parameter: Option<SigningProfileParameter>,
    pub(super) signing_profile_name: Option<String>,
    pub(super) destination: Option<SigningDestination>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct CodeSigning {
    pub(super) aws_signer_job_id: Option<String>,
    pub(super) start_signing_job_parameter: Option<StartSigningJobParameter>,
    pub(super) custom_code_signing: Option<CustomCodeSigning>,
}

/// How one file is signed.
pub(super) enum SigningMethod<'a> {
    Custom(&'a CustomCodeSigning),
    /// Reuse a finished signing job.
    Job(&'a str),
    /// Start a signing job while the update is built.
    Start(&'a StartSigningJobParameter),
}

pub(super) fn signing_method(
    i: usize,
    cs: Option<&CodeSigning>,
) -> ApiResult<Option<SigningMethod<'_>>> {
    let Some(cs) = cs else {
        return Ok(None);
    };
    let custom = cs.custom_code_signing.as_ref().filter(|c| !c.is_empty());
    let mut methods = Vec::new();
    if let Some(id) = &cs.aws_signer_job_id {
        methods.push(SigningMethod::Job(id));
    }
    if let Some(p) = &cs.start_signing_job_parameter {
        methods.push(SigningMethod::Start(p));
    }
    if let Some(c) = custom {
        methods.push(SigningMethod::Custom(c));
    }
    match methods.len() {
        0 => Err(ApiError::invalid(format!(
            "files[{i}].codeSigning names no signing method."
        ))),
        1 => Ok(methods.pop()),
        _ => Err(ApiError::invalid(format!(
            "files[{i}].codeSigning takes exactly one of awsSignerJobId, startSigningJobParameter and customCodeSigning."
        ))),
    }
}

/// Where CreateOTAUpdate puts signed objects when startSigningJobParameter names no
/// destination: the source bucket, under this prefix (as AWS does).
pub(super) const DEFAULT_SIGNED_PREFIX: &str = "SignedImages/";

/// How long building an update waits for a signing job it started.
pub(super) const SIGNING_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A signing job CreateOTAUpdate will start for a file.
pub(super) struct StartPlan {
    pub(super) profile_name: String,
    /// The profile to create first (from signingProfileParameter).
    pub(super) create_profile: Option<ProfileSpec>,
    pub(super) certfile: Option<String>,
    pub(super) source: (String, String, String),
    pub(super) destination: (String, String),
}

/// A file whose signature and bytes come from the signer, completed while building.
pub(super) struct SignerFile {
    /// Index in the document's files.
    pub(super) doc_index: usize,
    /// Index in the new stream's files, when the file goes there.
    pub(super) stream_index: Option<usize>,
    /// A caller's stream file that names the signed object: (stream, file id).
    pub(super) repoint: Option<(String, u8)>,
    /// The finished job whose signed object's payload devices get (awsSignerJobId).
    pub(super) job: Option<SigningJob>,
    /// The job to start (startSigningJobParameter).
    pub(super) start: Option<StartPlan>,
}

impl SignerFile {
    pub(super) fn payload(
        doc_index: usize,
        stream_index: Option<usize>,
        repoint: Option<(String, u8)>,
        job: &SigningJob,
    ) -> Self {
        SignerFile {
            doc_index,
            stream_index,
            repoint,
            job: Some(job.clone()),
            start: None,
        }
    }
}

/// A Succeeded signing job (awsSignerJobId).
pub(super) async fn finished_job(state: &AppState, i: usize, id: &str) -> ApiResult<SigningJob> {
    let job = state.store.get_signing_job(id).await?.ok_or_else(|| {
        ApiError::not_found(format!("files[{i}]: signing job {id} cannot be found."))
    })?;
    match job.status {
        SigningJobStatus::Succeeded if job.signature.is_some() && job.signed_key.is_some() => {
            Ok(job)
        }
        SigningJobStatus::InProgress => Err(ApiError::invalid(format!(
            "files[{i}]: signing job {id} is still InProgress; wait for it (aws signer wait successful-signing-job)."
        ))),
        _ => Err(ApiError::invalid(format!(
            "files[{i}]: signing job {id} did not succeed ({}: {}); only a Succeeded job's signature can be used.",
            job.status.as_str(),
            job.status_reason.as_deref().unwrap_or("no reason")
        ))),
    }
}

/// The (hash, signature algorithm) names of a job's signature, as the document keys them.
pub(super) fn job_algorithms(job: &SigningJob) -> (&'static str, &'static str) {
    match crate::signer::platforms::find(&job.platform_id) {
        Some(p) => {
            let (hash, encryption) = p.algorithms(job.overrides.as_ref());
            (hash.name(), encryption)
        }
        None => ("SHA256", "ECDSA"),
    }
}

/// Adds a placeholder for a signer payload to the new stream (MQTT); returns the file's
/// id and its index in the stream. The version is resolved while building.
pub(super) fn payload_stream_file(
    mqtt: bool,
    i: usize,
    stream_files: &mut Vec<StreamFile>,
    bucket: &str,
    key: &str,
    size: u64,
) -> (u32, Option<usize>) {
    if !mqtt {
        return (u32::try_from(i).unwrap_or(u32::MAX), None);
    }
    let index = stream_files.len();
    let id = u8::try_from(index).unwrap_or(u8::MAX);
    stream_files.push(StreamFile {
        file_id: id,
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        version: None,
        resolved_version: String::new(),
        size,
        etag: None,
    });
    (u32::from(id), Some(index))
}

/// Whether a version of a job's signed object is the raw payload Updraft wrote there.
pub(super) async fn is_payload_version(
    state: &AppState,
    job: &SigningJob,
    version: &str,
) -> ApiResult<bool> {
    let (Some(key), bucket) = (job.signed_key.as_deref(), &job.destination_bucket) else {
        return Ok(false);
    };
    Ok(state
        .store
        .get_object(bucket, key, Some(version))
        .await?
        .is_some_and(|o| {
            o.metadata.get(META_JOB) == Some(&job.id)
                && o.metadata.get(META_CONTENT).map(String::as_str) == Some("payload")
        }))
}

pub(super) fn size_mismatch(
    i: usize,
    bucket: &str,
    key: &str,
    size: u64,
    job: &SigningJob,
) -> ApiError {
    ApiError::invalid(format!(
        "files[{i}]: s3://{bucket}/{key} is {size} bytes, but signing job {} signed {} bytes; deliver the signed          firmware (or omit fileLocation to deliver the job's signed object).",
        job.id,
        job.payload_size.unwrap_or(0)
    ))
}

/// Checks a startSigningJobParameter (the profile to use or create, the destination);
/// changes nothing.
pub(super) async fn plan_signing_start(
    state: &AppState,
    i: usize,
    p: &StartSigningJobParameter,
    source: &StreamFile,
) -> ApiResult<StartPlan> {
    let field = |m: &str| format!("files[{i}].codeSigning.startSigningJobParameter.{m}");
    let name = p.signing_profile_name.clone().ok_or_else(|| {
        ApiError::invalid(format!("{} is required.", field("signingProfileName")))
    })?;
    crate::signer::check_profile_name("signingProfileName", &name)?;
    let inline = p.signing_profile_parameter.as_ref().filter(|q| {
        q.certificate_arn.is_some()
            || q.platform.is_some()
            || q.certificate_path_on_device.is_some()
    });
    let existing = state.store.get_signing_profile(&name).await?;
    let active = |e: &SigningProfile| -> ApiResult<()> {
        if e.status == ProfileStatus::Active {
            Ok(())
        } else {
            Err(ApiError::invalid(format!(
                "Signing profile {name} is {}; only an Active profile can sign.",
                e.status.as_str()
            )))
        }
    };
    let (platform_id, certfile, create_profile) = match (inline, existing) {
        (Some(q), existing) => {
            let spec = ProfileSpec {
                name: name.clone(),
                platform_id: q.platform.clone().ok_or_else(|| {
                    ApiError::invalid(format!(
                        "{} is required.",
                        field("signingProfileParameter.platform")
                    ))
                })?,
                certificate_arn: q.certificate_arn.clone().ok_or_else(|| {
                    ApiError::invalid(format!(
                        "{} is required.",
                        field("signingProfileParameter.certificateArn")
                    ))
                })?,
                signing_parameters: q
                    .certificate_path_on_device
                    .iter()
                    .map(|p| (CERTNAME.to_owned(), p.clone()))
                    .collect(),
                validity_value: DEFAULT_VALIDITY.0,
                validity_type: DEFAULT_VALIDITY.1.to_owned(),
                overrides: None,
                tags: BTreeMap::new(),
            };
            match existing {
                Some(e) => {
                    same_profile(&e, &spec)?;
                    active(&e)?;
                    let certfile = e.signing_parameters.get(CERTNAME).cloned();
                    (e.platform_id, certfile, None)
                }
                None => {
                    crate::signer::profiles::validate(state, &spec).await?;
                    let certfile = spec.signing_parameters.get(CERTNAME).cloned();
                    (spec.platform_id.clone(), certfile, Some(spec))
                }
            }
        }
        (None, Some(e)) => {
            active(&e)?;
            let certfile = e.signing_parameters.get(CERTNAME).cloned();
            (e.platform_id, certfile, None)
        }
        (None, None) => {
            return Err(ApiError::not_found(format!(
                "Signing profile {name} does not exist; give {} to create it.",
                field("signingProfileParameter")
            )));
        }
    };
    let platform = crate::signer::platforms::find(&platform_id)
        .ok_or_else(|| ApiError::invalid(format!("Signing platform {platform_id} is unknown.")))?;
    if let Some(why) = platform.unsupported {
        return Err(ApiError::invalid(why));
    }
    if source.size > platform.max_size() {
        return Err(ApiError::invalid(format!(
            "files[{i}] is {} bytes; platform {} signs objects of at most {} MB.",
            source.size, platform.id, platform.max_size_mb
        )));
    }
    let destination = match p
        .destination
        .as_ref()
        .and_then(|d| d.s3_destination.as_ref())
    {
        Some(d) => (
            d.bucket.clone().filter(|b| !b.is_empty()).ok_or_else(|| {
                ApiError::invalid(format!(
                    "{} is required.",
                    field("destination.s3Destination.bucket")
                ))
            })?,
            d.prefix.clone().unwrap_or_default(),
        ),
        None => (source.bucket.clone(), DEFAULT_SIGNED_PREFIX.to_owned()),
    };
    if state.store.get_bucket(&destination.0).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "files[{i}]: the destination bucket {} does not exist.",
            destination.0
        )));
    }
    let source = (
        source.bucket.clone(),
        source.key.clone(),
        source
            .version
            .clone()
            .unwrap_or_else(|| source.resolved_version.clone()),
    );
    crate::signer::jobs::check_locations(&StartSpec {
        profile_name: name.clone(),
        source_bucket: source.0.clone(),
        source_key: source.1.clone(),
        source_version: source.2.clone(),
        destination_bucket: destination.0.clone(),
        destination_prefix: destination.1.clone(),
        client_request_token: "check".to_owned(),
    })?;
    Ok(StartPlan {
        profile_name: name,
        create_profile,
        certfile,
        source,
        destination,
    })
}

/// An existing profile may stand in for signingProfileParameter only if it says the same.
pub(super) fn same_profile(e: &SigningProfile, spec: &ProfileSpec) -> ApiResult<()> {
    if e.platform_id == spec.platform_id
        && e.certificate_arn == spec.certificate_arn
        && e.signing_parameters.get(CERTNAME) == spec.signing_parameters.get(CERTNAME)
    {
        return Ok(());
    }
    Err(ApiError::invalid(format!(
        "Signing profile {} exists with other settings (platform {}, certificate {}, certname {}); choose another          signingProfileName, or omit signingProfileParameter to use the profile as it is.",
        e.name,
        e.platform_id,
        e.certificate_arn,
        e.signing_parameters
            .get(CERTNAME)
            .map(String::as_str)
            .unwrap_or("none")
    )))
}

/// Starts (or finds again, after a restart) the signing job of a file and waits for it.
pub(super) async fn run_signing(
    state: &AppState,
    ota: &OtaUpdate,
    i: usize,
    start: &StartPlan,
) -> ApiResult<SigningJob> {
    if let Some(spec) = &start.create_profile {
        match crate::signer::profiles::create(state, spec).await {
            Ok(_) => {}
            Err(e) if e.code == ErrorCode::ResourceAlreadyExists => {
                // Made by an earlier attempt, or concurrently: it must say the same.
                let e = state
                    .store
                    .get_signing_profile(&spec.name)
                    .await?
                    .ok_or_else(|| ApiError::internal("signing profile vanished"))?;
                same_profile(&e, spec)?;
            }
            Err(e) => return Err(e),
        }
    }
    let job = crate::signer::jobs::start(
        state,
        StartSpec {
            profile_name: start.profile_name.clone(),
            source_bucket: start.source.0.clone(),
            source_key: start.source.1.clone(),
            source_version: start.source.2.clone(),
            destination_bucket: start.destination.0.clone(),
            destination_prefix: start.destination.1.clone(),
            client_request_token: signing_token(ota, i),
        },
    )
    .await?;
    let job = crate::signer::jobs::wait_finished(state, &job.id, SIGNING_TIMEOUT).await?;
    if job.status != SigningJobStatus::Succeeded {
        return Err(ApiError::invalid(format!(
            "Signing job {} for files[{i}] failed: {}",
            job.id,
            job.status_reason.as_deref().unwrap_or("no reason given")
        )));
    }
    Ok(job)
}

/// The client request token of the signing job an update starts for file `i`.
pub(super) fn signing_token(ota: &OtaUpdate, i: usize) -> String {
    format!("updraft-ota:{}:{}:{i}", ota.id, ota.created_ms)
}

/// Points a caller's stream file that names a signed object at its payload version.
pub(super) async fn repoint_stream(
    state: &AppState,
    stream_id: &str,
    file_id: u8,
    payload: &crate::store::ObjectVersion,
) -> ApiResult<()> {
    let mut s = state
        .store
        .get_stream(stream_id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Stream {stream_id} cannot be found.")))?;
    let Some(f) = s.files.iter_mut().find(|f| f.file_id == file_id) else {
        return Err(ApiError::not_found(format!(
            "Stream {stream_id} has no file with fileId {file_id}."
        )));
    };
    if f.resolved_version == payload.version_id {
        return Ok(());
    }
    f.resolved_version = payload.version_id.clone();
    f.size = payload.size;
    f.etag = None;
    let previous = s.version;
    s.version += 1;
    s.updated_ms = now_ms();
    state.store.update_stream(&s, previous).await?;
    state.data_plane.invalidate_stream(&s.id);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_signing(v: serde_json::Value) -> CodeSigning {
        serde_json::from_value(v).expect("codeSigning")
    }

    #[test]
    fn exactly_one_signing_method() {
        let job = code_signing(serde_json::json!({"awsSignerJobId": "j"}));
        assert!(matches!(
            signing_method(0, Some(&job)),
            Ok(Some(SigningMethod::Job("j")))
        ));
        // GetOTAUpdate echoes `customCodeSigning: {}` next to the signer members: empty
        // custom signing is no method.
        let echoed = code_signing(serde_json::json!({
            "awsSignerJobId": "j", "customCodeSigning": {}
        }));
        assert!(matches!(
            signing_method(0, Some(&echoed)),
            Ok(Some(SigningMethod::Job(_)))
        ));
        let two = code_signing(serde_json::json!({
            "awsSignerJobId": "j", "startSigningJobParameter": {"signingProfileName": "p"}
        }));
        assert!(signing_method(0, Some(&two)).is_err());
        assert!(signing_method(0, Some(&code_signing(serde_json::json!({})))).is_err());
        assert!(matches!(signing_method(0, None), Ok(None)));
    }

    #[test]
    fn payload_placeholders_go_in_the_new_stream_only_over_mqtt() {
        let mut files = Vec::new();
        assert_eq!(
            payload_stream_file(true, 3, &mut files, "b", "k", 10),
            (0, Some(0))
        );
        assert_eq!(files[0].key, "k");
        assert_eq!(files[0].size, 10);
        assert_eq!(
            payload_stream_file(false, 3, &mut files, "b", "k", 10),
            (3, None)
        );
        assert_eq!(files.len(), 1);
    }
}
