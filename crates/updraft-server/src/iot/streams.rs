//! Streams: the files devices download block by block over MQTT.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
use updraft_protocol::ResourceKind;
use updraft_protocol::ids::{DESCRIPTION, ROLE_ARN, STREAM_ID};

use super::{Query, Tag, body, check_id, check_tags, put_opt, with_token};
use crate::clock::{epoch_seconds, now_ms};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::http::ApiRequest;
use crate::server::AppState;
use crate::store::{ObjectVersion, Stream, StreamFile};

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct S3Location {
    pub bucket: Option<String>,
    pub key: Option<String>,
    pub version: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct StreamFileInput {
    file_id: Option<i64>,
    s3_location: Option<S3Location>,
}

/// The current (or the named) version of an object; a missing object is ResourceNotFound.
pub(crate) async fn resolve_object(
    state: &AppState,
    bucket: &str,
    key: &str,
    version: Option<&str>,
) -> ApiResult<ObjectVersion> {
    let found = state.store.get_object(bucket, key, version).await?;
    match found {
        Some(o) if !o.delete_marker => Ok(o),
        _ => Err(ApiError::not_found(match version {
            Some(v) => format!("The object s3://{bucket}/{key} (version {v}) does not exist."),
            None => format!("The object s3://{bucket}/{key} does not exist."),
        })),
    }
}

impl S3Location {
    /// Checks the location names an existing object and records its version and size.
    pub async fn resolve(&self, state: &AppState, file_id: u8) -> ApiResult<StreamFile> {
        let (Some(bucket), Some(key)) = (&self.bucket, &self.key) else {
            return Err(ApiError::invalid("s3Location requires bucket and key."));
        };
        if bucket.is_empty() || key.is_empty() {
            return Err(ApiError::invalid(
                "s3Location bucket and key must not be empty.",
            ));
        }
        let o = resolve_object(state, bucket, key, self.version.as_deref()).await?;
        Ok(StreamFile {
            file_id,
            bucket: bucket.clone(),
            key: key.clone(),
            version: self.version.clone(),
            resolved_version: o.version_id,
            size: o.size,
            etag: Some(o.etag),
        })
    }
}

async fn resolve_files(state: &AppState, files: &[StreamFileInput]) -> ApiResult<Vec<StreamFile>> {
    if files.is_empty() || files.len() > 50 {
        return Err(ApiError::invalid("A stream has 1 to 50 files."));
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::with_capacity(files.len());
    for f in files {
        let id = f
            .file_id
            .ok_or_else(|| ApiError::invalid("Every stream file needs a fileId."))?;
        let id = u8::try_from(id)
            .map_err(|_| ApiError::invalid(format!("fileId {id} is outside 0..255.")))?;
        if !seen.insert(id) {
            return Err(ApiError::invalid(format!(
                "fileId {id} appears more than once."
            )));
        }
        let loc = f
            .s3_location
            .as_ref()
            .ok_or_else(|| ApiError::invalid("Every stream file needs an s3Location."))?;
        out.push(loc.resolve(state, id).await?);
    }
    Ok(out)
}

pub(crate) fn file_json(f: &StreamFile) -> Value {
    let mut loc = Map::new();
    loc.insert("bucket".into(), json!(f.bucket));
    loc.insert("key".into(), json!(f.key));
    put_opt(&mut loc, "version", f.version.clone());
    json!({ "fileId": f.file_id, "s3Location": loc })
}

fn summary(state: &AppState, s: &Stream) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("streamId".into(), json!(s.id));
    m.insert(
        "streamArn".into(),
        json!(state.arn(ResourceKind::Stream, &s.id)),
    );
    put_opt(&mut m, "description", s.description.clone());
    m.insert("streamVersion".into(), json!(s.version));
    m
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateStreamRequest {
    description: Option<String>,
    files: Option<Vec<StreamFileInput>>,
    role_arn: Option<String>,
    tags: Option<Vec<Tag>>,
}

/// Creates a stream record (used by CreateStream and CreateOTAUpdate).
pub(crate) async fn insert(
    state: &AppState,
    id: &str,
    description: Option<String>,
    files: Vec<StreamFile>,
    role_arn: &str,
) -> ApiResult<Stream> {
    let now = now_ms();
    let stream = Stream {
        id: id.to_owned(),
        version: 1,
        description,
        files,
        role_arn: role_arn.to_owned(),
        created_ms: now,
        updated_ms: now,
    };
    state
        .store
        .create_stream(&stream)
        .await
        .map_err(|e| match e {
            crate::store::StoreError::AlreadyExists(m) => {
                ApiError::already_exists(m, id, Some(state.arn(ResourceKind::Stream, id)))
            }
            e => e.into(),
        })?;
    Ok(stream)
}

pub(super) async fn create(state: &AppState, req: &ApiRequest, id: &str) -> ApiResult<Value> {
    check_id("streamId", &STREAM_ID, id)?;
    let r: CreateStreamRequest = body(req)?;
    if let Some(d) = &r.description {
        DESCRIPTION.check("description", d)?;
    }
    let role = r
        .role_arn
        .ok_or_else(|| ApiError::invalid("roleArn is required."))?;
    ROLE_ARN.check("roleArn", &role)?;
    check_tags(&r.tags)?;
    let files = resolve_files(state, r.files.as_deref().unwrap_or_default()).await?;
    let stream = insert(state, id, r.description, files, &role).await?;
    Ok(Value::Object(summary(state, &stream)))
}

pub(super) async fn describe(state: &AppState, id: &str) -> ApiResult<Value> {
    check_id("streamId", &STREAM_ID, id)?;
    let s = state
        .store
        .get_stream(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Stream {id} cannot be found.")))?;
    let mut info = summary(state, &s);
    info.insert(
        "files".into(),
        Value::Array(s.files.iter().map(file_json).collect()),
    );
    info.insert("createdAt".into(), epoch_seconds(s.created_ms));
    info.insert("lastUpdatedAt".into(), epoch_seconds(s.updated_ms));
    info.insert("roleArn".into(), json!(s.role_arn));
    Ok(json!({ "streamInfo": info }))
}

pub(super) async fn list(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let q = Query::of(req);
    let page = state
        .store
        .list_streams(q.bool("isAscendingOrder")?, &q.page()?)
        .await?;
    let mut m = Map::new();
    m.insert(
        "streams".into(),
        Value::Array(
            page.items
                .iter()
                .map(|s| Value::Object(summary(state, s)))
                .collect(),
        ),
    );
    Ok(with_token(m, &page))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateStreamRequest {
    description: Option<String>,
    files: Option<Vec<StreamFileInput>>,
    role_arn: Option<String>,
}

pub(super) async fn update(state: &AppState, req: &ApiRequest, id: &str) -> ApiResult<Value> {
    check_id("streamId", &STREAM_ID, id)?;
    let r: UpdateStreamRequest = body(req)?;
    let mut s = state
        .store
        .get_stream(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Stream {id} cannot be found.")))?;
    if let Some(d) = r.description {
        DESCRIPTION.check("description", &d)?;
        s.description = Some(d);
    }
    if let Some(role) = r.role_arn {
        ROLE_ARN.check("roleArn", &role)?;
        s.role_arn = role;
    }
    if let Some(files) = &r.files {
        s.files = resolve_files(state, files).await?;
    }
    let previous = s.version;
    if previous >= 65535 {
        return Err(ApiError::new(
            ErrorCode::LimitExceeded,
            format!("Stream {id} has reached the highest version, 65535."),
        ));
    }
    s.version += 1;
    s.updated_ms = now_ms();
    state.store.update_stream(&s, previous).await?;
    state.data_plane.invalidate_stream(id);
    Ok(Value::Object(summary(state, &s)))
}

pub(super) async fn delete(state: &AppState, id: &str) -> ApiResult<Value> {
    check_id("streamId", &STREAM_ID, id)?;
    state.store.delete_stream(id).await?;
    state.data_plane.invalidate_stream(id);
    Ok(json!({}))
}
