//! CompleteMultipartUpload: validates the named parts against the stored ones, then
//! concatenates them into a new blob, records the object and drops the upload.
//!
//! Completion can take a while for big objects on a remote artifact store, so, as S3
//! does, it answers 200 early and keeps the connection alive with whitespace until the
//! result document is ready.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use md5::{Digest, Md5};
use std::time::Duration;

use super::{MAX_PARTS, MIN_PART_SIZE, UploadChecksum, load_upload};
use crate::artifacts::Artifacts;
use crate::s3::body::{self, Flexible};
use crate::s3::checksum::{self, Algorithm};
use crate::s3::objects::{put_version_header, record_object, version_for};
use crate::s3::xml::{self, XmlWriter};
use crate::s3::{Ctx, S3Error, put_header, unquote_etag, xml_response};
use crate::server::AppState;
use crate::store::{MultipartUpload, ObjectVersion, StoredChecksum, UploadPart};

/// How long completion may take before the response starts with keep-alive whitespace.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// A part as CompleteMultipartUpload names it.
#[derive(Debug, Clone, PartialEq)]
pub struct CompletePart {
    pub number: i64,
    pub etag: String,
    pub checksums: Vec<(Algorithm, String)>,
}

pub fn parse_complete(doc: &[u8]) -> Result<Vec<CompletePart>, S3Error> {
    let root = xml::parse(doc).map_err(S3Error::malformed_xml)?;
    if root.name != "CompleteMultipartUpload" {
        return Err(S3Error::malformed_xml("expected <CompleteMultipartUpload>"));
    }
    let mut parts = Vec::new();
    for p in root.children_named("Part") {
        let number = p
            .child_text("PartNumber")
            .and_then(|n| n.trim().parse::<i64>().ok())
            .ok_or_else(|| S3Error::malformed_xml("every <Part> needs a <PartNumber>"))?;
        let etag = p
            .child_text("ETag")
            .map(|e| unquote_etag(e).to_owned())
            .ok_or_else(|| S3Error::malformed_xml("every <Part> needs an <ETag>"))?;
        let checksums = Algorithm::ALL
            .into_iter()
            .filter_map(|a| {
                p.child_text(a.xml_member())
                    .map(|v| (a, v.trim().to_owned()))
            })
            .collect();
        parts.push(CompletePart {
            number,
            etag,
            checksums,
        });
    }
    if parts.is_empty() || parts.len() > MAX_PARTS as usize {
        return Err(S3Error::malformed_xml(
            "a CompleteMultipartUpload names between 1 and 10000 parts",
        ));
    }
    Ok(parts)
}

/// What completion will write, worked out (and validated) before anything is written.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub size: u64,
    pub etag: String,
    pub checksum: Option<StoredChecksum>,
    pub blobs: Vec<String>,
}

fn invalid_part(detail: &str) -> S3Error {
    S3Error::new(
        StatusCode::BAD_REQUEST,
        "InvalidPart",
        format!(
            "One or more of the specified parts could not be found. The part may not have been uploaded, or the specified entity tag may not match the part's entity tag. ({detail})"
        ),
    )
}

/// Validates the requested parts against the stored ones and derives the object's
/// size, ETag and checksum.
pub fn plan(
    uc: Option<UploadChecksum>,
    requested: &[CompletePart],
    stored: &[UploadPart],
) -> Result<Plan, S3Error> {
    if requested.windows(2).any(|w| w[0].number >= w[1].number) {
        return Err(S3Error::new(
            StatusCode::BAD_REQUEST,
            "InvalidPartOrder",
            "The list of parts was not in ascending order. Parts must be ordered by part number.",
        ));
    }
    let mut md5s = Md5::new();
    let mut raw_sums: Vec<(Vec<u8>, u64)> = Vec::new();
    let mut size = 0u64;
    let mut blobs = Vec::new();
    for (i, r) in requested.iter().enumerate() {
        let p = stored
            .iter()
            .find(|p| p.part_number == r.number)
            .ok_or_else(|| invalid_part(&format!("part {} was not uploaded", r.number)))?;
        if !unquote_etag(&p.etag).eq_ignore_ascii_case(&r.etag) {
            return Err(invalid_part(&format!("part {} has another ETag", r.number)));
        }
        for (alg, value) in &r.checksums {
            let matches = p
                .checksum
                .as_ref()
                .is_some_and(|c| c.algorithm == alg.name() && c.value == *value);
            if !matches {
                return Err(invalid_part(&format!(
                    "part {} has another {} checksum",
                    r.number,
                    alg.upper()
                )));
            }
        }
        if i + 1 < requested.len() && p.size < MIN_PART_SIZE {
            return Err(S3Error::new(
                StatusCode::BAD_REQUEST,
                "EntityTooSmall",
                "Your proposed upload is smaller than the minimum allowed object size.",
            ));
        }
        let md5 = hex::decode(unquote_etag(&p.etag))
            .map_err(|_| S3Error::internal(format!("part {} has a malformed ETag", r.number)))?;
        md5s.update(&md5);
        if let Some(uc) = uc {
            let raw = p
                .checksum
                .as_ref()
                .filter(|c| c.algorithm == uc.alg.name())
                .and_then(|c| uc.alg.decode(&c.value))
                .ok_or_else(|| {
                    S3Error::internal(format!(
                        "part {} has no {} checksum",
                        r.number,
                        uc.alg.name()
                    ))
                })?;
            raw_sums.push((raw, p.size));
        }
        size += p.size;
        blobs.push(p.blob.clone());
    }
    let checksum = match uc {
        None => None,
        Some(uc) if uc.full_object => {
            let raw = checksum::combine_full(uc.alg, &raw_sums)
                .ok_or_else(|| S3Error::internal("cannot combine part checksums"))?;
            Some(StoredChecksum {
                algorithm: uc.alg.name().to_owned(),
                value: checksum::b64(&raw),
            })
        }
        Some(uc) => {
            let raws: Vec<Vec<u8>> = raw_sums.into_iter().map(|(r, _)| r).collect();
            Some(StoredChecksum {
                algorithm: uc.alg.name().to_owned(),
                value: checksum::composite(uc.alg, &raws),
            })
        }
    };
    Ok(Plan {
        size,
        etag: format!("\"{}-{}\"", hex::encode(md5s.finalize()), requested.len()),
        checksum,
        blobs,
    })
}

/// Checks object-level `x-amz-checksum-*` and `x-amz-mp-object-size` headers of the
/// completion request against the plan.
fn check_expected(ctx: &Ctx<'_>, uc: Option<UploadChecksum>, plan: &Plan) -> Result<(), S3Error> {
    if let Some(s) = ctx.header("x-amz-mp-object-size")
        && s.trim().parse::<u64>().ok() != Some(plan.size)
    {
        return Err(S3Error::invalid_request(format!(
            "The provided x-amz-mp-object-size {s} does not match the object size {}",
            plan.size
        )));
    }
    for alg in Algorithm::ALL {
        let Some(given) = ctx.header(alg.header()) else {
            continue;
        };
        let (Some(uc), Some(c)) = (uc, &plan.checksum) else {
            return Err(S3Error::invalid_request(
                "The upload was not created with a checksum algorithm.",
            ));
        };
        if uc.alg != alg {
            return Err(S3Error::invalid_request(format!(
                "Checksum Type mismatch occurred, expected checksum Type: {}, actual checksum Type: {}",
                uc.alg.name(),
                alg.name()
            )));
        }
        let base = |v: &str| v.trim().split('-').next().unwrap_or("").to_owned();
        if base(given) != base(&c.value) {
            return Err(S3Error::new(
                StatusCode::BAD_REQUEST,
                "BadDigest",
                format!(
                    "The {} you specified did not match the calculated checksum.",
                    alg.upper()
                ),
            ));
        }
    }
    Ok(())
}

/// Concatenates the parts, records the object and drops the upload. Returns the result
/// document.
async fn commit(
    state: AppState,
    upload: MultipartUpload,
    plan: Plan,
    object: ObjectVersion,
    location: String,
) -> Result<String, S3Error> {
    if let Err(e) = state.artifacts.concat(&object.blob, &plan.blobs).await {
        state
            .artifacts
            .delete(std::slice::from_ref(&object.blob))
            .await;
        return Err(e.into());
    }
    record_object(&state, &object).await?;
    match state.store.delete_upload(&upload.upload_id).await {
        Ok(blobs) => state.artifacts.delete(&blobs).await,
        // Completed concurrently or aborted after the concatenation: the object stands.
        Err(e) => {
            tracing::warn!(upload = %upload.upload_id, error = %e, "could not remove a completed upload")
        }
    }
    let root = "CompleteMultipartUploadResult";
    let mut w = XmlWriter::new(root);
    w.elem("Location", &location)
        .elem("Bucket", &object.bucket)
        .elem("Key", &object.key)
        .elem("ETag", &object.etag);
    if let Some(c) = &object.checksum
        && let Some(alg) = Algorithm::parse(&c.algorithm)
    {
        w.elem(alg.xml_member(), &c.value)
            .elem("ChecksumType", crate::s3::list::checksum_type(&c.value));
    }
    Ok(w.finish(root))
}

pub async fn complete(ctx: &Ctx<'_>, body: Body) -> Result<Response, S3Error> {
    let upload = load_upload(ctx).await?;
    let bucket = ctx.bucket().await?;
    let doc = body::read_small(ctx, body, Flexible::NotBody).await?;
    let requested = parse_complete(&doc)?;
    let stored = ctx.state.store.list_parts(&upload.upload_id).await?;
    let uc = UploadChecksum::decode(upload.checksum_algorithm.as_deref());
    let plan = plan(uc, &requested, &stored)?;
    check_expected(ctx, uc, &plan)?;
    let object = ObjectVersion {
        bucket: ctx.bucket.clone(),
        key: ctx.key.clone(),
        version_id: version_for(bucket.versioning),
        delete_marker: false,
        size: plan.size,
        etag: plan.etag.clone(),
        content_type: upload.content_type.clone(),
        checksum: plan.checksum.clone(),
        metadata: upload.metadata.clone(),
        blob: Artifacts::new_blob(),
        created_ms: crate::clock::now_ms(),
        is_latest: true,
    };
    let location = format!(
        "http://{}/{}/{}",
        ctx.header("host").unwrap_or("localhost"),
        crate::auth::uri_encode(&ctx.bucket, true),
        crate::auth::uri_encode(&ctx.key, false)
    );
    let version_id = object.version_id.clone();
    let mut task = tokio::spawn(commit(ctx.state.clone(), upload, plan, object, location));
    let mut resp = match tokio::time::timeout(KEEPALIVE, &mut task).await {
        Ok(joined) => xml_response(joined.map_err(S3Error::internal)??),
        Err(_) => keepalive_response(task, KEEPALIVE),
    };
    put_version_header(resp.headers_mut(), &version_id);
    Ok(resp)
}

/// A 200 whose body is the XML declaration, whitespace while `task` runs, then its
/// result document (or an error document, as S3 does for slow completions).
fn keepalive_response(
    task: tokio::task::JoinHandle<Result<String, S3Error>>,
    interval: Duration,
) -> Response {
    enum Step {
        Declaration(tokio::task::JoinHandle<Result<String, S3Error>>),
        Waiting(tokio::task::JoinHandle<Result<String, S3Error>>),
        Done,
    }
    let stream = futures::stream::unfold(Step::Declaration(task), move |step| async move {
        match step {
            Step::Declaration(t) => Some((
                Ok::<Bytes, std::convert::Infallible>(Bytes::from_static(
                    xml::DECLARATION.as_bytes(),
                )),
                Step::Waiting(t),
            )),
            Step::Waiting(mut t) => match tokio::time::timeout(interval, &mut t).await {
                Err(_) => Some((Ok(Bytes::from_static(b" ")), Step::Waiting(t))),
                Ok(joined) => {
                    let doc = match joined.map_err(S3Error::internal).and_then(|r| r) {
                        Ok(doc) => doc,
                        Err(e) => e.document(&uuid::Uuid::new_v4().simple().to_string()),
                    };
                    Some((Ok(Bytes::from(doc)), Step::Done))
                }
            },
            Step::Done => None,
        }
    });
    let mut resp = Response::new(Body::from_stream(stream));
    put_header(resp.headers_mut(), "content-type", "application/xml");
    resp
}

#[cfg(test)]
mod tests;
