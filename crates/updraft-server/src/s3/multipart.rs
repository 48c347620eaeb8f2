//! Multipart uploads: Create, UploadPart, ListParts, Abort and ListMultipartUploads
//! here; CompleteMultipartUpload in [`complete`].
//!
//! Parts are blobs of their own, recorded as store rows of the upload; completion
//! concatenates them into the object's blob.

use axum::body::Body;
use axum::http::StatusCode;
use axum::response::Response;

use super::body::{self, MAX_OBJECT_SIZE};
use super::checksum::{self, Algorithm};
use super::xml::XmlWriter;
use super::{
    Ctx, S3Error, empty_response, listed, max_param, put_header, url_encoding, user_metadata,
    xml_response,
};
use crate::artifacts::Artifacts;
use crate::store::{MultipartUpload, StoreError, StoredChecksum, UploadPart};

/// Every part but the last must be at least this big.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
pub const MAX_PARTS: i64 = 10_000;

/// The checksum an upload was created with, kept in `MultipartUpload::checksum_algorithm`
/// as `crc32` (composite) or `crc32:full` (full object).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadChecksum {
    pub alg: Algorithm,
    pub full_object: bool,
}

impl UploadChecksum {
    fn encode(self) -> String {
        if self.full_object {
            format!("{}:full", self.alg.name())
        } else {
            self.alg.name().to_owned()
        }
    }

    fn decode(stored: Option<&str>) -> Option<Self> {
        let s = stored?;
        let (name, full) = match s.split_once(':') {
            Some((n, kind)) => (n, kind == "full"),
            None => (s, false),
        };
        Some(UploadChecksum {
            alg: Algorithm::parse(name)?,
            full_object: full,
        })
    }

    fn type_name(self) -> &'static str {
        if self.full_object {
            "FULL_OBJECT"
        } else {
            "COMPOSITE"
        }
    }

    /// From `x-amz-checksum-algorithm` and `x-amz-checksum-type`, with S3's rules.
    fn from_headers(alg: Option<&str>, kind: Option<&str>) -> Result<Option<Self>, S3Error> {
        let alg = alg
            .map(|a| {
                Algorithm::parse(a).ok_or_else(|| {
                    S3Error::invalid_request(format!("Checksum algorithm '{a}' is not supported."))
                })
            })
            .transpose()?;
        let full = kind
            .map(|k| match k.trim().to_ascii_uppercase().as_str() {
                "FULL_OBJECT" => Ok(true),
                "COMPOSITE" => Ok(false),
                _ => Err(S3Error::invalid_request(format!(
                    "Value for x-amz-checksum-type header is invalid: '{k}'"
                ))),
            })
            .transpose()?;
        match (alg, full) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err(S3Error::invalid_request(
                "The x-amz-checksum-type header can only be used with the x-amz-checksum-algorithm header.",
            )),
            (Some(Algorithm::Crc64Nvme), Some(false)) => Err(S3Error::invalid_request(
                "The COMPOSITE checksum type cannot be used with the crc64nvme checksum algorithm.",
            )),
            (Some(a), Some(true)) if !a.is_crc() => Err(S3Error::invalid_request(format!(
                "The FULL_OBJECT checksum type cannot be used with the {} checksum algorithm.",
                a.name()
            ))),
            (Some(a), full) => Ok(Some(UploadChecksum {
                alg: a,
                full_object: full.unwrap_or(a == Algorithm::Crc64Nvme),
            })),
        }
    }
}

/// The upload named by `uploadId`, which must belong to the request's bucket and key.
async fn load_upload(ctx: &Ctx<'_>) -> Result<MultipartUpload, S3Error> {
    let id = ctx.query.get("uploadId").unwrap_or("");
    ctx.state
        .store
        .get_upload(id)
        .await?
        .filter(|u| u.bucket == ctx.bucket && u.key == ctx.key)
        .ok_or_else(S3Error::no_such_upload)
}

pub async fn create(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    ctx.bucket().await?;
    let metadata = user_metadata(&ctx.headers)?;
    let uc = UploadChecksum::from_headers(
        ctx.header("x-amz-checksum-algorithm"),
        ctx.header("x-amz-checksum-type"),
    )?;
    let upload = MultipartUpload {
        upload_id: format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ),
        bucket: ctx.bucket.clone(),
        key: ctx.key.clone(),
        content_type: ctx.header("content-type").map(str::to_owned),
        checksum_algorithm: uc.map(UploadChecksum::encode),
        metadata,
        created_ms: crate::clock::now_ms(),
    };
    match ctx.state.store.create_upload(&upload).await {
        Ok(()) => {}
        Err(StoreError::NotFound(_)) => return Err(S3Error::no_such_bucket(&ctx.bucket)),
        Err(e) => return Err(e.into()),
    }
    let root = "InitiateMultipartUploadResult";
    let mut w = XmlWriter::new(root);
    w.elem("Bucket", &ctx.bucket)
        .elem("Key", &ctx.key)
        .elem("UploadId", &upload.upload_id);
    let mut resp = xml_response(w.finish(root));
    if let Some(uc) = uc {
        put_header(
            resp.headers_mut(),
            "x-amz-checksum-algorithm",
            uc.alg.upper(),
        );
        put_header(resp.headers_mut(), "x-amz-checksum-type", uc.type_name());
    }
    Ok(resp)
}

fn part_number(ctx: &Ctx<'_>) -> Result<i64, S3Error> {
    ctx.query
        .get("partNumber")
        .and_then(|n| n.trim().parse::<i64>().ok())
        .filter(|n| (1..=MAX_PARTS).contains(n))
        .ok_or_else(|| {
            S3Error::invalid_argument(
                "Part number must be an integer between 1 and 10000, inclusive",
            )
        })
}

pub async fn upload_part(ctx: &Ctx<'_>, body: Body) -> Result<Response, S3Error> {
    let number = part_number(ctx)?;
    let upload = load_upload(ctx).await?;
    let uc = UploadChecksum::decode(upload.checksum_algorithm.as_deref());
    let (spool, verified) = body::spool(ctx, body, MAX_OBJECT_SIZE, uc.map(|u| u.alg)).await?;
    let blob = Artifacts::new_blob();
    if let Err(e) = ctx
        .state
        .artifacts
        .put_file(&blob, spool.path(), verified.len)
        .await
    {
        ctx.state
            .artifacts
            .delete(std::slice::from_ref(&blob))
            .await;
        return Err(e.into());
    }
    drop(spool);
    let part = UploadPart {
        upload_id: upload.upload_id.clone(),
        part_number: number,
        size: verified.len,
        etag: verified.etag(),
        checksum: verified.stored_checksum(),
        blob,
        created_ms: crate::clock::now_ms(),
    };
    match ctx.state.store.put_part(&part).await {
        Ok(replaced) => {
            if let Some(old) = replaced {
                ctx.state.artifacts.delete(&[old]).await;
            }
        }
        Err(e) => {
            ctx.state.artifacts.delete(&[part.blob]).await;
            return Err(match e {
                StoreError::NotFound(_) => S3Error::no_such_upload(),
                e => e.into(),
            });
        }
    }
    let mut resp = empty_response(StatusCode::OK);
    put_header(resp.headers_mut(), "etag", &part.etag);
    if let Some((alg, raw)) = &verified.checksum {
        put_header(resp.headers_mut(), alg.header(), &checksum::b64(raw));
    }
    Ok(resp)
}

fn part_checksum_member(w: &mut XmlWriter, c: &Option<StoredChecksum>) {
    if let Some(c) = c
        && let Some(alg) = Algorithm::parse(&c.algorithm)
    {
        w.elem(alg.xml_member(), &c.value);
    }
}

pub async fn list_parts(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    let upload = load_upload(ctx).await?;
    let max = max_param(&ctx.query, "max-parts")?;
    let marker = match ctx.query.get("part-number-marker") {
        None => 0,
        Some(m) => m
            .trim()
            .parse::<i64>()
            .map_err(|_| S3Error::invalid_argument("part-number-marker must be an integer"))?,
    };
    let parts = ctx.state.store.list_parts(&upload.upload_id).await?;
    let after: Vec<&UploadPart> = parts.iter().filter(|p| p.part_number > marker).collect();
    let truncated = after.len() > max;
    let page = &after[..after.len().min(max)];
    let root = "ListPartsResult";
    let mut w = XmlWriter::new(root);
    w.elem("Bucket", &ctx.bucket)
        .elem("Key", &ctx.key)
        .elem("UploadId", &upload.upload_id)
        .elem("PartNumberMarker", &marker.to_string())
        .elem(
            "NextPartNumberMarker",
            &page.last().map_or(0, |p| p.part_number).to_string(),
        )
        .elem("MaxParts", &max.to_string())
        .elem("IsTruncated", if truncated { "true" } else { "false" });
    for p in page {
        w.open("Part")
            .elem("PartNumber", &p.part_number.to_string())
            .elem("LastModified", &crate::clock::iso8601(p.created_ms))
            .elem("ETag", &p.etag)
            .elem("Size", &p.size.to_string());
        part_checksum_member(&mut w, &p.checksum);
        w.close("Part");
    }
    ctx.owner(&mut w, "Initiator");
    ctx.owner(&mut w, "Owner");
    w.elem("StorageClass", "STANDARD");
    if let Some(uc) = UploadChecksum::decode(upload.checksum_algorithm.as_deref()) {
        w.elem("ChecksumAlgorithm", uc.alg.upper())
            .elem("ChecksumType", uc.type_name());
    }
    Ok(xml_response(w.finish(root)))
}

pub async fn abort(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    let upload = load_upload(ctx).await?;
    let blobs = match ctx.state.store.delete_upload(&upload.upload_id).await {
        Ok(b) => b,
        Err(StoreError::NotFound(_)) => return Err(S3Error::no_such_upload()),
        Err(e) => return Err(e.into()),
    };
    ctx.state.artifacts.delete(&blobs).await;
    Ok(empty_response(StatusCode::NO_CONTENT))
}

pub async fn list_uploads(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    ctx.bucket().await?;
    let q = &ctx.query;
    let url = url_encoding(q)?;
    let prefix = q.get("prefix").unwrap_or("");
    let delimiter = q.get("delimiter").filter(|d| !d.is_empty());
    let max = max_param(q, "max-uploads")?;
    let key_marker = q.get("key-marker").filter(|k| !k.is_empty());
    let id_marker = q.get("upload-id-marker").filter(|k| !k.is_empty());
    let uploads = ctx.state.store.list_uploads(&ctx.bucket).await?;
    enum Entry<'a> {
        Upload(&'a MultipartUpload),
        Prefix(String),
    }
    let mut entries: Vec<Entry<'_>> = Vec::new();
    // Uploads of the marker key after the marker upload are still to be listed.
    let mut past_id_marker = false;
    for u in &uploads {
        if !u.key.starts_with(prefix) {
            continue;
        }
        if let Some(m) = key_marker {
            if u.key.as_str() < m {
                continue;
            }
            if u.key == m && !past_id_marker {
                past_id_marker = Some(u.upload_id.as_str()) == id_marker;
                continue;
            }
        }
        let cp = delimiter.and_then(|d| {
            let rest = &u.key[prefix.len()..];
            rest.find(d)
                .map(|i| format!("{prefix}{}", &rest[..i + d.len()]))
        });
        match cp {
            Some(cp) => {
                if key_marker.is_some_and(|m| cp.as_str() <= m) {
                    continue;
                }
                if matches!(entries.last(), Some(Entry::Prefix(p)) if *p == cp) {
                    continue;
                }
                entries.push(Entry::Prefix(cp));
            }
            None => entries.push(Entry::Upload(u)),
        }
        if entries.len() > max {
            break;
        }
    }
    let truncated = entries.len() > max;
    entries.truncate(max);
    let root = "ListMultipartUploadsResult";
    let mut w = XmlWriter::new(root);
    w.elem("Bucket", &ctx.bucket)
        .elem("KeyMarker", &listed(key_marker.unwrap_or(""), url))
        .elem("UploadIdMarker", id_marker.unwrap_or(""));
    if truncated {
        match entries.last() {
            Some(Entry::Upload(u)) => {
                w.elem("NextKeyMarker", &listed(&u.key, url))
                    .elem("NextUploadIdMarker", &u.upload_id);
            }
            Some(Entry::Prefix(p)) => {
                w.elem("NextKeyMarker", &listed(p, url));
            }
            None => {}
        }
    }
    if let Some(d) = delimiter {
        w.elem("Delimiter", &listed(d, url));
    }
    w.elem("Prefix", &listed(prefix, url))
        .elem("MaxUploads", &max.to_string());
    if url {
        w.elem("EncodingType", "url");
    }
    w.elem("IsTruncated", if truncated { "true" } else { "false" });
    for e in &entries {
        match e {
            Entry::Upload(u) => {
                w.open("Upload")
                    .elem("Key", &listed(&u.key, url))
                    .elem("UploadId", &u.upload_id);
                ctx.owner(&mut w, "Initiator");
                ctx.owner(&mut w, "Owner");
                w.elem("StorageClass", "STANDARD")
                    .elem("Initiated", &crate::clock::iso8601(u.created_ms));
                if let Some(uc) = UploadChecksum::decode(u.checksum_algorithm.as_deref()) {
                    w.elem("ChecksumAlgorithm", uc.alg.upper())
                        .elem("ChecksumType", uc.type_name());
                }
                w.close("Upload");
            }
            Entry::Prefix(p) => {
                w.open("CommonPrefixes")
                    .elem("Prefix", &listed(p, url))
                    .close("CommonPrefixes");
            }
        }
    }
    Ok(xml_response(w.finish(root)))
}

mod complete;
pub use complete::complete;

#[cfg(test)]
mod tests;
