//! Signing jobs: StartSigningJob, DescribeSigningJob, ListSigningJobs, and the signing.
//!
//! StartSigningJob checks the request's shape and that the profile exists, records the
//! job InProgress (idempotent on `clientRequestToken`) and answers; a task then signs:
//! it resolves the source object in Updraft's S3 store, unseals the certificate's key,
//! checks the key against the certificate, signs, verifies the signature, and writes the
//! signed object to `{prefix}{jobId}` in the destination bucket. Every check comes before
//! the write, so a job that fails (missing object, profile not Active, key that does not
//! match the certificate, ...) says why in `statusReason` and writes nothing. Jobs left
//! InProgress by a stopped server are signed at start ([`resume_pending`]).

use bytes::Bytes;
use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

use super::crypto::{self, SigningKey, X509};
use super::objects::{self, META_CONTENT, META_JOB};
use super::{check_account, check_profile_name, envelope, page_request, platforms, with_token};
use crate::clock::{epoch_seconds, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::http::ApiRequest;
use crate::iot::{Query, body, put_opt};
use crate::server::AppState;
use crate::store::{
    PageRequest, ProfileStatus, SigningJob, SigningJobFilter, SigningJobStatus, StoreError,
};

/// What AWS says of a job that signed.
pub const SUCCEEDED_REASON: &str = "Signing Succeeded";

/// S3 keys are at most 1024 bytes.
const MAX_KEY_BYTES: usize = 1024;

/// A signing job to start.
#[derive(Debug, Clone)]
pub struct StartSpec {
    pub profile_name: String,
    pub source_bucket: String,
    pub source_key: String,
    pub source_version: String,
    pub destination_bucket: String,
    pub destination_prefix: String,
    pub client_request_token: String,
}

/// Records a job (or finds the one with the same token) and starts signing it.
pub async fn start(state: &AppState, spec: StartSpec) -> ApiResult<SigningJob> {
    let profile = state
        .store
        .get_signing_profile(&spec.profile_name)
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "The signing profile {} does not exist.",
                spec.profile_name
            ))
        })?;
    let job = SigningJob {
        id: uuid::Uuid::new_v4().to_string(),
        client_request_token: spec.client_request_token,
        profile_name: profile.name,
        profile_version: profile.version,
        platform_id: profile.platform_id,
        certificate_arn: profile.certificate_arn,
        signing_parameters: profile.signing_parameters,
        overrides: profile.overrides,
        validity_value: profile.validity_value,
        validity_type: profile.validity_type,
        source_bucket: spec.source_bucket,
        source_key: spec.source_key,
        source_version: spec.source_version,
        destination_bucket: spec.destination_bucket,
        destination_prefix: spec.destination_prefix,
        signed_key: None,
        signed_version: None,
        signature: None,
        payload_size: None,
        payload_sha256: None,
        status: SigningJobStatus::InProgress,
        status_reason: None,
        requested_by: super::requested_by(state),
        created_ms: now_ms(),
        completed_ms: None,
        signature_expires_ms: None,
    };
    let stored = state.store.create_signing_job(&job).await?;
    if stored.id == job.id {
        spawn(state.clone(), stored.id.clone());
    }
    Ok(stored)
}

/// Waits until a job is no longer InProgress (or `timeout` passes) and returns it.
pub async fn wait_finished(state: &AppState, id: &str, timeout: Duration) -> ApiResult<SigningJob> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let job = state
            .store
            .get_signing_job(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("Signing job {id} cannot be found.")))?;
        if job.status != SigningJobStatus::InProgress {
            return Ok(job);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::internal(format!(
                "Signing job {id} did not finish within {} s.",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spawn(state: AppState, id: String) {
    tokio::spawn(async move {
        if let Err(e) = run(&state, &id).await {
            tracing::error!(signing_job = %id, error = %e, "could not record the outcome of a signing job");
        }
    });
}

/// Signs the jobs a stopped server left InProgress.
pub async fn resume_pending(state: &AppState) -> Result<usize, StoreError> {
    let filter = SigningJobFilter {
        status: Some(SigningJobStatus::InProgress),
        ..SigningJobFilter::default()
    };
    let mut page = PageRequest {
        after: None,
        limit: 250,
    };
    let mut resumed = 0;
    loop {
        let p = state.store.list_signing_jobs(&filter, &page).await?;
        for j in &p.items {
            spawn(state.clone(), j.id.clone());
            resumed += 1;
        }
        match p.next {
            Some(n) => page.after = Some(n),
            None => return Ok(resumed),
        }
    }
}

/// What a successful signing produced.
struct Signed {
    key: String,
    version: String,
    signature: String,
    payload_size: u64,
    payload_sha256: String,
}

async fn run(state: &AppState, id: &str) -> Result<(), StoreError> {
    let Some(mut job) = state.store.get_signing_job(id).await? else {
        return Ok(());
    };
    if job.status != SigningJobStatus::InProgress {
        return Ok(());
    }
    let now = now_ms();
    match sign(state, &job).await {
        Ok(s) => {
            job.status = SigningJobStatus::Succeeded;
            job.status_reason = Some(SUCCEEDED_REASON.to_owned());
            job.signed_key = Some(s.key);
            job.signed_version = Some(s.version);
            job.signature = Some(s.signature);
            job.payload_size = Some(s.payload_size);
            job.payload_sha256 = Some(s.payload_sha256);
            job.signature_expires_ms =
                Some(super::expiry(now, job.validity_value, &job.validity_type));
            tracing::info!(signing_job = %id, "signing job succeeded");
        }
        Err(reason) => {
            tracing::warn!(signing_job = %id, %reason, "signing job failed");
            job.status = SigningJobStatus::Failed;
            job.status_reason = Some(reason);
        }
    }
    job.completed_ms = Some(now_ms());
    state.store.complete_signing_job(&job).await
}

/// Signs a job's source; `Err` is the status reason. Nothing is written unless every
/// check passed.
async fn sign(state: &AppState, job: &SigningJob) -> Result<Signed, String> {
    let internal = |e: StoreError| format!("Internal error: {e}");
    let profile = state
        .store
        .get_signing_profile(&job.profile_name)
        .await
        .map_err(internal)?
        .ok_or_else(|| format!("Signing profile {} no longer exists.", job.profile_name))?;
    if profile.status != ProfileStatus::Active {
        return Err(format!(
            "Signing profile {} is {}; only an Active profile can sign.",
            profile.name,
            profile.status.as_str()
        ));
    }
    let platform = platforms::find(&job.platform_id)
        .ok_or_else(|| format!("Signing platform {} is unknown.", job.platform_id))?;
    if let Some(why) = platform.unsupported {
        return Err(why.to_owned());
    }
    let (hash, encryption) = platform.algorithms(job.overrides.as_ref());

    let source = state
        .store
        .get_object(
            &job.source_bucket,
            &job.source_key,
            Some(&job.source_version),
        )
        .await
        .map_err(internal)?
        .filter(|o| !o.delete_marker)
        .ok_or_else(|| {
            format!(
                "The source object s3://{}/{} (version {}) does not exist.",
                job.source_bucket, job.source_key, job.source_version
            )
        })?;
    if source.size > platform.max_size() {
        return Err(format!(
            "The source object is {} bytes; platform {} signs objects of at most {} MB.",
            source.size, platform.id, platform.max_size_mb
        ));
    }
    if state
        .store
        .get_bucket(&job.destination_bucket)
        .await
        .map_err(internal)?
        .is_none()
    {
        return Err(format!(
            "The destination bucket {} does not exist.",
            job.destination_bucket
        ));
    }

    let cert = crate::acm::certificate_for_arn(state, &job.certificate_arn)
        .await
        .map_err(|e| format!("The signing certificate is unusable: {}", e.message))?;
    let x509 = X509::from_pem(cert.certificate_pem.as_bytes())
        .map_err(|e| format!("Certificate {} cannot be read: {e}", cert.arn))?;
    let now = now_ms();
    if now < x509.not_before_ms || now > x509.not_after_ms {
        return Err(format!(
            "Certificate {} is not valid now (valid from {} to {}).",
            cert.arn,
            crate::clock::iso8601(x509.not_before_ms),
            crate::clock::iso8601(x509.not_after_ms)
        ));
    }
    let pkcs8 = state
        .signing_key
        .open(&cert.sealed_private_key, &cert.id)
        .map_err(|e| {
            format!(
                "The private key of certificate {} cannot be unsealed: {e}.",
                cert.arn
            )
        })?;
    let key = SigningKey::from_pkcs8(&pkcs8).map_err(|e| {
        format!(
            "The private key of certificate {} is unusable: {e}",
            cert.arn
        )
    })?;
    if !key.matches(&x509) {
        return Err(format!(
            "The private key of certificate {} does not match the certificate's public key; \
             re-import the certificate with its own private key.",
            cert.arn
        ));
    }
    if x509.key_algorithm.encryption() != encryption {
        return Err(format!(
            "Certificate {} has a {} key; platform {} signs with {encryption}.",
            cert.arn, cert.key_algorithm, platform.id
        ));
    }

    let payload = objects::read(state, &source)
        .await
        .map_err(|e| format!("The source object cannot be read: {e}"))?;
    let signature = key
        .sign(hash, &payload)
        .map_err(|e| format!("Signing failed: {e}"))?;
    if !crypto::verify(&x509, &payload, &signature) {
        return Err("The signature does not verify against the certificate.".to_owned());
    }
    let document = envelope::encode(&payload, &signature, hash, encryption);
    let key_name = format!("{}{}", job.destination_prefix, job.id);
    let metadata = BTreeMap::from([
        (META_JOB.to_owned(), job.id.clone()),
        (META_CONTENT.to_owned(), "signed-object".to_owned()),
    ]);
    let written = objects::write(
        state,
        &job.destination_bucket,
        &key_name,
        Bytes::from(document),
        "application/json",
        metadata,
    )
    .await
    .map_err(|e| format!("The signed object cannot be written: {e}"))?;
    use base64::Engine;
    Ok(Signed {
        key: written.key,
        version: written.version_id,
        signature: base64::engine::general_purpose::STANDARD.encode(&signature),
        payload_size: source.size,
        payload_sha256: objects::sha256_hex(&payload),
    })
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct S3SourceIn {
    bucket_name: Option<String>,
    key: Option<String>,
    version: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SourceIn {
    s3: Option<S3SourceIn>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct S3DestinationIn {
    bucket_name: Option<String>,
    prefix: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DestinationIn {
    s3: Option<S3DestinationIn>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StartRequest {
    source: Option<SourceIn>,
    destination: Option<DestinationIn>,
    profile_name: Option<String>,
    client_request_token: Option<String>,
    profile_owner: Option<String>,
}

fn required(v: Option<String>, what: &str) -> ApiResult<String> {
    match v {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(ApiError::invalid(format!("{what} is required."))),
    }
}

/// Checks the object names of a job (shared with CreateOTAUpdate).
pub fn check_locations(spec: &StartSpec) -> ApiResult<()> {
    for (what, v) in [
        ("source.s3.bucketName", &spec.source_bucket),
        ("source.s3.key", &spec.source_key),
        ("source.s3.version", &spec.source_version),
        ("destination.s3.bucketName", &spec.destination_bucket),
    ] {
        if v.is_empty() {
            return Err(ApiError::invalid(format!("{what} must not be empty.")));
        }
    }
    if spec.source_key.len() > MAX_KEY_BYTES {
        return Err(ApiError::invalid(
            "source.s3.key is longer than 1024 bytes.",
        ));
    }
    // The signed object's key is the prefix and a 36-character job id.
    if spec.destination_prefix.len() + 36 > MAX_KEY_BYTES {
        return Err(ApiError::invalid(
            "destination.s3.prefix leaves no room for the job id in a 1024-byte key.",
        ));
    }
    if spec.client_request_token.is_empty() || spec.client_request_token.len() > 256 {
        return Err(ApiError::invalid(
            "clientRequestToken must be 1 to 256 characters long.",
        ));
    }
    Ok(())
}

/// POST /signing-jobs
pub(super) async fn start_handler(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let r: StartRequest = body(req)?;
    let src = r
        .source
        .and_then(|s| s.s3)
        .ok_or_else(|| ApiError::invalid("source.s3 is required."))?;
    let dst = r
        .destination
        .and_then(|d| d.s3)
        .ok_or_else(|| ApiError::invalid("destination.s3 is required."))?;
    let profile_name = required(r.profile_name, "profileName")?;
    check_profile_name("profileName", &profile_name)?;
    if let Some(owner) = &r.profile_owner {
        check_account("profileOwner", owner)?;
        if owner != &state.account {
            return Err(ApiError::not_found(format!(
                "Account {owner} has no signing profiles here; this installation is account {}.",
                state.account
            )));
        }
    }
    let spec = StartSpec {
        profile_name,
        source_bucket: required(src.bucket_name, "source.s3.bucketName")?,
        source_key: required(src.key, "source.s3.key")?,
        source_version: required(src.version, "source.s3.version")?,
        destination_bucket: required(dst.bucket_name, "destination.s3.bucketName")?,
        destination_prefix: dst.prefix.unwrap_or_default(),
        client_request_token: required(r.client_request_token, "clientRequestToken")?,
    };
    check_locations(&spec)?;
    let job = start(state, spec).await?;
    Ok(json!({ "jobId": job.id, "jobOwner": state.account }))
}

fn source_json(j: &SigningJob) -> Value {
    json!({ "s3": { "bucketName": j.source_bucket, "key": j.source_key, "version": j.source_version } })
}

fn signed_object_json(j: &SigningJob) -> Option<Value> {
    j.signed_key
        .as_ref()
        .map(|k| json!({ "s3": { "bucketName": j.destination_bucket, "key": k } }))
}

fn display_name(j: &SigningJob) -> Option<&'static str> {
    platforms::find(&j.platform_id).map(|p| p.display_name)
}

/// GET /signing-jobs/{jobId}
pub(super) async fn describe(state: &AppState, id: &str) -> ApiResult<Value> {
    let j = state
        .store
        .get_signing_job(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("The signing job {id} does not exist.")))?;
    let mut m = Map::new();
    m.insert("jobId".into(), json!(j.id));
    m.insert("source".into(), source_json(&j));
    m.insert(
        "signingMaterial".into(),
        json!({ "certificateArn": j.certificate_arn }),
    );
    m.insert("platformId".into(), json!(j.platform_id));
    put_opt(&mut m, "platformDisplayName", display_name(&j));
    m.insert("profileName".into(), json!(j.profile_name));
    m.insert("profileVersion".into(), json!(j.profile_version));
    put_opt(&mut m, "overrides", j.overrides.clone());
    m.insert("signingParameters".into(), json!(j.signing_parameters));
    m.insert("createdAt".into(), epoch_seconds(j.created_ms));
    put_opt(&mut m, "completedAt", j.completed_ms.map(epoch_seconds));
    put_opt(
        &mut m,
        "signatureExpiresAt",
        j.signature_expires_ms.map(epoch_seconds),
    );
    m.insert("requestedBy".into(), json!(j.requested_by));
    m.insert("status".into(), json!(j.status.as_str()));
    put_opt(&mut m, "statusReason", j.status_reason.clone());
    put_opt(&mut m, "signedObject", signed_object_json(&j));
    m.insert("jobOwner".into(), json!(state.account));
    m.insert("jobInvoker".into(), json!(state.account));
    Ok(Value::Object(m))
}

/// GET /signing-jobs
pub(super) async fn list(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let q = Query::of(req);
    let page = page_request(&q)?;
    let status = q.parsed::<SigningJobStatus>("status")?;
    let time = |key: &str| -> ApiResult<Option<i64>> {
        q.get(key)
            .map(|v| {
                crate::clock::parse_iso8601(v).ok_or_else(|| {
                    ApiError::invalid(format!(
                        "{key} must be an ISO-8601 UTC time like 2024-01-01T00:00:00Z, not '{v}'."
                    ))
                })
            })
            .transpose()
    };
    let filter = SigningJobFilter {
        status,
        platform_id: q.get("platformId").map(str::to_owned),
        requested_by: q.get("requestedBy").map(str::to_owned),
        signature_expires_before: time("signatureExpiresBefore")?,
        signature_expires_after: time("signatureExpiresAfter")?,
    };
    // No job is ever revoked here, and every job is this account's.
    let mut none = q.bool("isRevoked")?;
    if let Some(invoker) = q.get("jobInvoker") {
        check_account("jobInvoker", invoker)?;
        none |= invoker != state.account;
    }
    let found = if none {
        crate::store::Page {
            items: Vec::new(),
            next: None,
        }
    } else {
        state.store.list_signing_jobs(&filter, &page).await?
    };
    let jobs: Vec<Value> = found
        .items
        .iter()
        .map(|j| {
            let mut m = Map::new();
            m.insert("jobId".into(), json!(j.id));
            m.insert("source".into(), source_json(j));
            put_opt(&mut m, "signedObject", signed_object_json(j));
            m.insert(
                "signingMaterial".into(),
                json!({ "certificateArn": j.certificate_arn }),
            );
            m.insert("createdAt".into(), epoch_seconds(j.created_ms));
            m.insert("status".into(), json!(j.status.as_str()));
            m.insert("isRevoked".into(), json!(false));
            m.insert("profileName".into(), json!(j.profile_name));
            m.insert("profileVersion".into(), json!(j.profile_version));
            m.insert("platformId".into(), json!(j.platform_id));
            put_opt(&mut m, "platformDisplayName", display_name(j));
            put_opt(
                &mut m,
                "signatureExpiresAt",
                j.signature_expires_ms.map(epoch_seconds),
            );
            m.insert("jobOwner".into(), json!(state.account));
            m.insert("jobInvoker".into(), json!(state.account));
            Value::Object(m)
        })
        .collect();
    let mut m = Map::new();
    m.insert("jobs".into(), Value::Array(jobs));
    Ok(with_token(m, &found))
}
