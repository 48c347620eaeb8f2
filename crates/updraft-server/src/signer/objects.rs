//! Objects in Updraft's own S3-compatible store, as signing reads and writes them: the
//! source of a signing job, the signed object it writes, and the raw payload an OTA update
//! delivers (written next to the signed object, as AWS's CreateOTAUpdate does).

use bytes::Bytes;
use md5::{Digest as _, Md5};
use sha2::Sha256;
use std::collections::BTreeMap;

use crate::artifacts::Artifacts;
use crate::error::{ApiError, ApiResult};
use crate::server::AppState;
use crate::store::{ObjectVersion, SigningJob, SigningJobStatus, Versioning};

use super::envelope;

/// Metadata naming the signing job an object came from (`x-amz-meta-updraft-signing-job`).
pub const META_JOB: &str = "updraft-signing-job";
/// Metadata saying what the object is: `signed-object` or `payload`.
pub const META_CONTENT: &str = "updraft-signing-content";

/// The bytes of an object version (signing sources are at most a few MiB).
pub async fn read(state: &AppState, o: &ObjectVersion) -> Result<Bytes, String> {
    let bytes = state
        .artifacts
        .read_all(&o.blob, o.size)
        .await
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 != o.size {
        return Err(format!(
            "the artifact store returned {} of the object's {} bytes",
            bytes.len(),
            o.size
        ));
    }
    Ok(bytes)
}

/// Writes a new version of `bucket/key` (the bucket's versioning decides its id).
pub async fn write(
    state: &AppState,
    bucket: &str,
    key: &str,
    bytes: Bytes,
    content_type: &str,
    metadata: BTreeMap<String, String>,
) -> Result<ObjectVersion, String> {
    let b = state
        .store
        .get_bucket(bucket)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("The destination bucket {bucket} does not exist."))?;
    let blob = Artifacts::new_blob();
    state
        .artifacts
        .put_bytes(&blob, bytes.clone())
        .await
        .map_err(|e| format!("cannot store the object's bytes: {e}"))?;
    let object = ObjectVersion {
        bucket: bucket.to_owned(),
        key: key.to_owned(),
        version_id: if b.versioning == Versioning::Enabled {
            uuid::Uuid::new_v4().simple().to_string()
        } else {
            "null".to_owned()
        },
        delete_marker: false,
        size: bytes.len() as u64,
        etag: format!("\"{}\"", hex::encode(Md5::digest(&bytes))),
        content_type: Some(content_type.to_owned()),
        checksum: None,
        metadata,
        blob: blob.clone(),
        created_ms: crate::clock::now_ms(),
        is_latest: true,
    };
    match state.store.put_object(&object).await {
        Ok(orphaned) => {
            state.artifacts.delete(&orphaned).await;
            Ok(object)
        }
        Err(e) => {
            state.artifacts.delete(std::slice::from_ref(&blob)).await;
            Err(format!("cannot record the object: {e}"))
        }
    }
}

/// SHA-256 of bytes, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The raw payload of a finished signing job as an object devices can download: a version
/// of the signed object's key whose bytes are the signed payload. AWS's CreateOTAUpdate
/// writes it as the newest version of that key (the older one is signer's JSON document);
/// Updraft does the same, once per job, and finds it again on later calls.
pub async fn payload_version(state: &AppState, job: &SigningJob) -> ApiResult<ObjectVersion> {
    let (Some(key), Some(signed_version), Some(sha), Some(size)) = (
        job.signed_key.as_deref(),
        job.signed_version.as_deref(),
        job.payload_sha256.as_deref(),
        job.payload_size,
    ) else {
        return Err(ApiError::invalid(format!(
            "Signing job {} has no signed object (status {}).",
            job.id,
            job.status.as_str()
        )));
    };
    if job.status != SigningJobStatus::Succeeded {
        return Err(ApiError::invalid(format!(
            "Signing job {} is {}, not Succeeded.",
            job.id,
            job.status.as_str()
        )));
    }
    let bucket = &job.destination_bucket;
    let versions = state.store.list_object_versions(bucket, key, 1000).await?;
    if let Some(found) = versions.into_iter().find(|o| {
        o.key == key
            && !o.delete_marker
            && o.metadata.get(META_JOB).map(String::as_str) == Some(job.id.as_str())
            && o.metadata.get(META_CONTENT).map(String::as_str) == Some("payload")
            && o.size == size
    }) {
        return Ok(found);
    }
    let signed = state
        .store
        .get_object(bucket, key, Some(signed_version))
        .await?
        .filter(|o| !o.delete_marker)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "The signed object of signing job {} (s3://{bucket}/{key}, version {signed_version}) no longer exists.",
                job.id
            ))
        })?;
    let bytes = read(state, &signed)
        .await
        .map_err(|e| ApiError::internal(format!("cannot read the signed object: {e}")))?;
    let env = envelope::decode(&bytes).map_err(|e| {
        ApiError::invalid(format!(
            "The signed object of signing job {} is unusable: {e}",
            job.id
        ))
    })?;
    if env.payload.len() as u64 != size || sha256_hex(&env.payload) != sha {
        return Err(ApiError::invalid(format!(
            "The signed object of signing job {} was changed after signing: its payload is not what was signed.",
            job.id
        )));
    }
    let metadata = BTreeMap::from([
        (META_JOB.to_owned(), job.id.clone()),
        (META_CONTENT.to_owned(), "payload".to_owned()),
    ]);
    write(
        state,
        bucket,
        key,
        Bytes::from(env.payload),
        "application/octet-stream",
        metadata,
    )
    .await
    .map_err(ApiError::internal)
}
