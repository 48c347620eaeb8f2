//! The S3-compatible artifact endpoint (path-style addressing: `/bucket/key...`).
//!
//! [`handle`] runs after SigV4 verification (see [`crate::http`]). Object bytes live in
//! the artifact store under server-chosen blob names; buckets, object versions and
//! multipart uploads are rows in the [`crate::store::Store`]. Every write spools and
//! verifies the body first, then writes the blob, then records it; a failure at any
//! step removes what was written, so the store and artifact store stay unchanged.
//!
//! Modules: [`body`] (request bodies: spooling, aws-chunked decoding, integrity
//! checks), [`checksum`], [`xml`], [`buckets`], [`list`] (listings), [`objects`]
//! (single-object operations), [`multipart`].

mod body;
mod buckets;
mod checksum;
mod chunked;
mod list;
mod multipart;
mod objects;
mod xml;

use axum::body::Body;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::artifacts::ArtifactError;
use crate::auth::Principal;
use crate::server::AppState;
use crate::store::{Bucket, StoreError};

/// An S3 error, rendered as S3's XML error document.
#[derive(Debug, Clone)]
pub struct S3Error {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// The path the request named (`<Resource>`).
    pub resource: Option<String>,
    /// Extra response headers (`x-amz-delete-marker`, `Content-Range`, ...).
    pub headers: Vec<(&'static str, String)>,
}

impl S3Error {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        S3Error {
            status,
            code,
            message: message.into(),
            resource: None,
            headers: Vec::new(),
        }
    }

    pub fn with_resource(mut self, resource: impl Into<String>) -> Self {
        self.resource = Some(resource.into());
        self
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidArgument", message)
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "InvalidRequest", message)
    }

    pub fn malformed_xml(detail: impl std::fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "MalformedXML",
            format!(
                "The XML you provided was not well-formed or did not validate against our published schema: {detail}"
            ),
        )
    }

    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_IMPLEMENTED, "NotImplemented", message)
    }

    pub fn no_such_bucket(bucket: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NoSuchBucket",
            format!("The specified bucket does not exist: {bucket}"),
        )
    }

    pub fn no_such_key() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NoSuchKey",
            "The specified key does not exist.",
        )
    }

    pub fn no_such_upload() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "NoSuchUpload",
            "The specified multipart upload does not exist. The upload ID may be invalid, or the upload may have been aborted or completed.",
        )
    }

    /// A server-side failure; the detail is logged, not sent.
    pub fn internal(detail: impl std::fmt::Display) -> Self {
        tracing::error!(error = %detail, "S3 request failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "We encountered an internal error. Please try again.",
        )
    }

    /// The error document, without XML declaration.
    pub(crate) fn document(&self, request_id: &str) -> String {
        format!(
            "<Error><Code>{}</Code><Message>{}</Message>{}<RequestId>{}</RequestId></Error>",
            xml::escape(self.code),
            xml::escape(&self.message),
            self.resource
                .as_deref()
                .map(|r| format!("<Resource>{}</Resource>", xml::escape(r)))
                .unwrap_or_default(),
            xml::escape(request_id),
        )
    }
}

impl std::fmt::Display for S3Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for S3Error {}

impl IntoResponse for S3Error {
    fn into_response(self) -> Response {
        let request_id = uuid::Uuid::new_v4().simple().to_string();
        let body = format!("{}{}", xml::DECLARATION, self.document(&request_id));
        let mut resp = (self.status, body).into_response();
        let h = resp.headers_mut();
        h.insert("content-type", HeaderValue::from_static("application/xml"));
        // The same id in the header as in the document (the HTTP layer keeps it).
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            h.insert("x-amz-request-id", v);
        }
        for (name, value) in &self.headers {
            put_header(h, name, value);
        }
        resp
    }
}

impl From<StoreError> for S3Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(m) => S3Error::invalid_request(m),
            StoreError::Conflict(m) | StoreError::VersionConflict(m) => {
                S3Error::new(StatusCode::CONFLICT, "OperationAborted", m)
            }
            e => S3Error::internal(e),
        }
    }
}

impl From<ArtifactError> for S3Error {
    fn from(e: ArtifactError) -> Self {
        S3Error::internal(e)
    }
}

/// The query string of a request: names decoded, values decoded when first asked for
/// (a pre-signed URL's own parameters, asked for by no one, never are), borrowing from
/// the request what needs no decoding.
pub(crate) struct Query<'a>(Vec<(Cow<'a, str>, Value<'a>)>);

/// A query parameter's value, as sent and, if it has escapes, decoded.
struct Value<'a> {
    raw: &'a str,
    decoded: std::sync::OnceLock<String>,
}

impl<'a> Query<'a> {
    pub fn parse(raw: &'a str) -> Self {
        // Room for a pre-signed URL's parameters and a few more without growing.
        let mut pairs = Vec::with_capacity(8);
        for p in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let value = Value {
                raw: v,
                decoded: std::sync::OnceLock::new(),
            };
            pairs.push((crate::auth::percent_decode_cow(k), value));
        }
        Query(pairs)
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        let (_, v) = self.0.iter().find(|(k, _)| k == name)?;
        Some(if v.raw.contains('%') {
            v.decoded
                .get_or_init(|| crate::auth::percent_decode(v.raw))
                .as_str()
        } else {
            v.raw
        })
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.iter().any(|(k, _)| k == name)
    }

    /// Whether any parameter's name starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.0.iter().any(|(k, _)| k.starts_with(prefix))
    }

    /// Refuses parameters outside `allowed` (apart from SigV4 and SDK bookkeeping), so
    /// that an unsupported subresource (`?acl`, `?tagging`, ...) is never mistaken for
    /// a plain object or bucket operation.
    pub fn only(&self, allowed: &[&str]) -> Result<(), S3Error> {
        for (k, _) in &self.0 {
            let bookkeeping = k.starts_with("X-Amz-") || k.starts_with("x-amz-") || k == "x-id";
            if !bookkeeping && !allowed.contains(&k.as_ref()) {
                return Err(S3Error::not_implemented(format!(
                    "Updraft does not support the '{k}' parameter or subresource here"
                )));
            }
        }
        Ok(())
    }
}

/// One S3 request after authentication.
pub(crate) struct Ctx<'a> {
    pub state: &'a AppState,
    pub principal: &'a Principal,
    pub method: Method,
    pub bucket: String,
    /// Decoded object key; empty for service and bucket requests.
    pub key: String,
    pub query: Query<'a>,
    pub headers: HeaderMap,
}

impl Ctx<'_> {
    /// A request header as text, if present and visible ASCII.
    pub fn header(&self, name: impl axum::http::header::AsHeaderName) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The bucket the request names, which must exist.
    pub async fn bucket(&self) -> Result<Bucket, S3Error> {
        self.state
            .store
            .get_bucket(&self.bucket)
            .await?
            .ok_or_else(|| S3Error::no_such_bucket(&self.bucket))
    }

    /// The display owner of everything (one account per installation).
    pub fn owner(&self, w: &mut xml::XmlWriter, element: &str) {
        w.open(element)
            .elem("ID", &self.state.account)
            .elem("DisplayName", "updraft")
            .close(element);
    }
}

/// Splits a raw path into (bucket, key), both percent-decoded.
fn split_path(raw_path: &str) -> (String, String) {
    let trimmed = raw_path.strip_prefix('/').unwrap_or(raw_path);
    match trimmed.split_once('/') {
        Some((b, k)) => (
            crate::auth::percent_decode(b),
            crate::auth::percent_decode(k),
        ),
        None => (crate::auth::percent_decode(trimmed), String::new()),
    }
}

/// Serves one authenticated S3 request.
pub async fn handle(state: &AppState, principal: &Principal, parts: Parts, body: Body) -> Response {
    let Parts {
        method,
        uri,
        headers,
        ..
    } = parts;
    let raw_path = uri.path();
    let (bucket, key) = split_path(raw_path);
    let ctx = Ctx {
        state,
        principal,
        method,
        bucket,
        key,
        query: Query::parse(uri.query().unwrap_or("")),
        headers,
    };
    let writes = !matches!(ctx.method, Method::GET | Method::HEAD);
    let routed = route(&ctx, body).await;
    if writes {
        // Whatever it changed, devices' downloads must not be served from before it.
        state.data_plane.forget_objects();
    }
    let mut resp = match routed {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(method = %ctx.method, path = %raw_path, error = %e, "S3 error");
            e.with_resource(raw_path).into_response()
        }
    };
    if ctx.method == Method::HEAD {
        *resp.body_mut() = Body::empty();
    }
    resp
}

/// The parameters GetObject and HeadObject accept.
const GET_OBJECT: &[&str] = &[
    "versionId",
    "partNumber",
    "response-content-type",
    "response-content-disposition",
    "response-content-encoding",
    "response-content-language",
    "response-cache-control",
    "response-expires",
];

async fn route(ctx: &Ctx<'_>, body: Body) -> Result<Response, S3Error> {
    // An object read (devices' downloads) is awaited in place, as [`route_any`] would;
    // every other operation is boxed, so that their larger state machines do not size
    // (and cost an allocation and a move for) each download's future.
    let object_read = !ctx.bucket.is_empty()
        && !ctx.key.is_empty()
        && ctx.key.len() <= MAX_KEY_LEN
        && match ctx.method {
            Method::GET => !ctx.query.has("uploadId"),
            Method::HEAD => true,
            _ => false,
        };
    if object_read {
        ctx.query.only(GET_OBJECT)?;
        return objects::get_object(ctx).await;
    }
    Box::pin(route_any(ctx, body)).await
}

/// The longest object key.
const MAX_KEY_LEN: usize = 1024;

async fn route_any(ctx: &Ctx<'_>, body: Body) -> Result<Response, S3Error> {
    let q = &ctx.query;
    let m = &ctx.method;
    if ctx.bucket.is_empty() {
        return if *m == Method::GET {
            q.only(&[
                "prefix",
                "max-buckets",
                "continuation-token",
                "bucket-region",
            ])?;
            buckets::list_buckets(ctx).await
        } else {
            Err(method_not_allowed())
        };
    }
    if ctx.key.is_empty() {
        return bucket_route(ctx, body).await;
    }
    if ctx.key.len() > MAX_KEY_LEN {
        return Err(S3Error::new(
            StatusCode::BAD_REQUEST,
            "KeyTooLongError",
            "Your key is too long",
        ));
    }
    match *m {
        Method::GET if q.has("uploadId") => {
            q.only(&[
                "uploadId",
                "max-parts",
                "part-number-marker",
                "encoding-type",
            ])?;
            multipart::list_parts(ctx).await
        }
        Method::GET | Method::HEAD => {
            q.only(GET_OBJECT)?;
            objects::get_object(ctx).await
        }
        Method::PUT if ctx.headers.contains_key("x-amz-copy-source") => Err(
            S3Error::not_implemented("Updraft does not support CopyObject or UploadPartCopy"),
        ),
        Method::PUT if q.has("uploadId") || q.has("partNumber") => {
            q.only(&["uploadId", "partNumber"])?;
            multipart::upload_part(ctx, body).await
        }
        Method::PUT => {
            q.only(&[])?;
            objects::put_object(ctx, body).await
        }
        Method::DELETE if q.has("uploadId") => {
            q.only(&["uploadId"])?;
            multipart::abort(ctx).await
        }
        Method::DELETE => {
            q.only(&["versionId"])?;
            objects::delete_object(ctx).await
        }
        Method::POST if q.has("uploads") => {
            q.only(&["uploads"])?;
            multipart::create(ctx).await
        }
        Method::POST if q.has("uploadId") => {
            q.only(&["uploadId"])?;
            multipart::complete(ctx, body).await
        }
        Method::POST => Err(S3Error::not_implemented(
            "Updraft does not support this POST operation on objects",
        )),
        _ => Err(method_not_allowed()),
    }
}

async fn bucket_route(ctx: &Ctx<'_>, body: Body) -> Result<Response, S3Error> {
    let q = &ctx.query;
    const LIST_V1: &[&str] = &["prefix", "delimiter", "marker", "max-keys", "encoding-type"];
    const LIST_V2: &[&str] = &[
        "list-type",
        "prefix",
        "delimiter",
        "max-keys",
        "encoding-type",
        "continuation-token",
        "start-after",
        "fetch-owner",
    ];
    match ctx.method {
        Method::GET if q.has("versioning") => {
            q.only(&["versioning"])?;
            buckets::get_versioning(ctx).await
        }
        Method::GET if q.has("location") => {
            q.only(&["location"])?;
            buckets::get_location(ctx).await
        }
        Method::GET if q.has("uploads") => {
            q.only(&[
                "uploads",
                "prefix",
                "delimiter",
                "key-marker",
                "upload-id-marker",
                "max-uploads",
                "encoding-type",
            ])?;
            multipart::list_uploads(ctx).await
        }
        Method::GET if q.has("versions") => {
            q.only(&[
                "versions",
                "prefix",
                "delimiter",
                "key-marker",
                "version-id-marker",
                "max-keys",
                "encoding-type",
            ])?;
            list::list_versions(ctx).await
        }
        Method::GET if q.get("list-type") == Some("2") => {
            q.only(LIST_V2)?;
            list::list_objects(ctx, true).await
        }
        Method::GET => {
            q.only(LIST_V1)?;
            list::list_objects(ctx, false).await
        }
        Method::HEAD => {
            q.only(&[])?;
            buckets::head_bucket(ctx).await
        }
        Method::PUT if q.has("versioning") => {
            q.only(&["versioning"])?;
            buckets::put_versioning(ctx, body).await
        }
        Method::PUT => {
            q.only(&[])?;
            buckets::create_bucket(ctx, body).await
        }
        Method::DELETE => {
            q.only(&[])?;
            buckets::delete_bucket(ctx).await
        }
        Method::POST if q.has("delete") => {
            q.only(&["delete"])?;
            objects::delete_objects(ctx, body).await
        }
        _ => Err(method_not_allowed()),
    }
}

fn method_not_allowed() -> S3Error {
    S3Error::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "The specified method is not allowed against this resource.",
    )
}

/// Sets a header if name and value are valid; silently skips otherwise.
pub(crate) fn put_header(h: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_bytes(value.as_bytes()),
    ) {
        h.insert(n, v);
    }
}

/// A 200 response carrying an XML document (declaration added here).
pub(crate) fn xml_response(doc: String) -> Response {
    let mut resp = Response::new(Body::from(format!("{}{doc}", xml::DECLARATION)));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/xml"));
    resp
}

/// An empty response with a status.
pub(crate) fn empty_response(status: StatusCode) -> Response {
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = status;
    // Room for an object's usual headers without growing the map.
    resp.headers_mut().reserve(16);
    resp
}

/// The `x-amz-meta-*` headers of a request (names without the prefix).
pub(crate) fn user_metadata(headers: &HeaderMap) -> Result<BTreeMap<String, String>, S3Error> {
    let mut meta = BTreeMap::new();
    let mut size = 0;
    for (name, value) in headers {
        if let Some(k) = name.as_str().strip_prefix("x-amz-meta-") {
            let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
            size += k.len() + v.len();
            meta.insert(k.to_owned(), v);
        }
    }
    if size > 2048 {
        return Err(S3Error::new(
            StatusCode::BAD_REQUEST,
            "MetadataTooLarge",
            "Your metadata headers exceed the maximum allowed metadata size.",
        ));
    }
    Ok(meta)
}

/// A fresh object version id (for versioning-enabled buckets).
pub(crate) fn new_version_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// `"abc"` → `abc`: ETags as clients quote them, or not.
pub(crate) fn unquote_etag(s: &str) -> &str {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|x| x.strip_suffix('"'))
        .unwrap_or(s)
}

/// Whether `encoding-type=url` was asked for (anything else is an error).
pub(crate) fn url_encoding(q: &Query<'_>) -> Result<bool, S3Error> {
    match q.get("encoding-type") {
        None => Ok(false),
        Some(t) if t.eq_ignore_ascii_case("url") => Ok(true),
        Some(t) => Err(S3Error::invalid_argument(format!(
            "Invalid Encoding Method specified in Request: '{t}'"
        ))),
    }
}

/// A key-ish value as listed: URL-encoded when the client asked for it.
pub(crate) fn listed(s: &str, url: bool) -> String {
    if url {
        crate::auth::uri_encode(s, false)
    } else {
        s.to_owned()
    }
}

/// A `max-keys`-style parameter: default when absent, capped at 1000.
pub(crate) fn max_param(q: &Query<'_>, name: &str) -> Result<usize, S3Error> {
    match q.get(name) {
        None => Ok(1000),
        Some(v) => v
            .trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .map(|n| usize::try_from(n.min(1000)).unwrap_or(1000))
            .ok_or_else(|| {
                S3Error::invalid_argument(format!(
                    "Provided {name} not an integer or within integer range"
                ))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_paths() {
        assert_eq!(split_path("/"), (String::new(), String::new()));
        assert_eq!(split_path("/b"), ("b".into(), String::new()));
        assert_eq!(split_path("/b/"), ("b".into(), String::new()));
        assert_eq!(
            split_path("/b/dir/a%20b%2Fc.bin"),
            ("b".into(), "dir/a b/c.bin".into())
        );
        assert_eq!(split_path("/b//x"), ("b".into(), "/x".into()));
    }

    #[test]
    fn error_document() {
        let e = S3Error::new(StatusCode::NOT_FOUND, "NoSuchKey", "a < b").with_resource("/b/k&");
        assert_eq!(
            e.document("rid"),
            "<Error><Code>NoSuchKey</Code><Message>a &lt; b</Message><Resource>/b/k&amp;</Resource><RequestId>rid</RequestId></Error>"
        );
    }

    #[test]
    fn query_allow_lists() {
        let q = Query::parse("versionId=1&x-id=GetObject&X-Amz-Date=1");
        assert!(q.only(&["versionId"]).is_ok());
        assert_eq!(q.get("versionId"), Some("1"));
        let q = Query::parse("a%20b=x%2Fy&c=%ZZ&d");
        assert_eq!(q.get("a b"), Some("x/y"));
        assert_eq!(q.get("a b"), Some("x/y"));
        assert_eq!(q.get("c"), Some("%ZZ"));
        assert_eq!(q.get("d"), Some(""));
        assert!(q.has("d") && !q.has("a%20b") && q.get("e").is_none());
        let q = Query::parse("tagging");
        assert!(q.has("tagging"));
        assert_eq!(
            q.only(&["versionId"]).map_err(|e| e.code),
            Err("NotImplemented")
        );
        assert_eq!(unquote_etag(" \"abc\" "), "abc");
        assert_eq!(unquote_etag("abc"), "abc");
    }
}
