//! Single-object operations: PutObject, GetObject/HeadObject, DeleteObject and
//! DeleteObjects.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::Response;
use std::ops::Range;

use super::body::{self, MAX_OBJECT_SIZE};
use super::checksum::{self, Algorithm};
use super::list::checksum_type;
use super::xml::{self, XmlWriter};
use super::{
    Ctx, S3Error, empty_response, new_version_id, put_header, unquote_etag, user_metadata,
    xml_response,
};
use crate::artifacts::Artifacts;
use crate::server::AppState;
use crate::store::{ObjectVersion, StoreError, Versioning};

/// What a `Range` header asks of an object of a given size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeRequest {
    /// No (usable) range: the whole object.
    Full,
    /// A satisfiable byte range, end exclusive.
    Partial(Range<u64>),
    Unsatisfiable,
}

/// Interprets `Range: bytes=a-b | a- | -n`. Syntactically invalid or multi-range
/// headers are ignored (the whole object is served), as S3 does.
pub fn parse_range(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(h) = header else {
        return RangeRequest::Full;
    };
    let h = h.trim();
    let Some(spec) = h
        .get(..6)
        .filter(|p| p.eq_ignore_ascii_case("bytes="))
        .map(|_| h[6..].trim())
    else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    if a.is_empty() {
        // Suffix: the last n bytes.
        return match num(b) {
            None => RangeRequest::Full,
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if size == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Partial(size.saturating_sub(n)..size),
        };
    }
    let Some(start) = num(a) else {
        return RangeRequest::Full;
    };
    let end = if b.is_empty() {
        None
    } else {
        match num(b) {
            Some(e) if e >= start => Some(e),
            _ => return RangeRequest::Full,
        }
    };
    if start >= size {
        return RangeRequest::Unsatisfiable;
    }
    let end = end.map_or(size, |e| e.saturating_add(1).min(size));
    RangeRequest::Partial(start..end)
}

/// Records a new object version whose blob is already written. On failure the blob is
/// removed; on success, blobs the write orphaned are.
pub(crate) async fn record_object(state: &AppState, object: &ObjectVersion) -> Result<(), S3Error> {
    match state.store.put_object(object).await {
        Ok(orphaned) => {
            state.artifacts.delete(&orphaned).await;
            Ok(())
        }
        Err(e) => {
            state
                .artifacts
                .delete(std::slice::from_ref(&object.blob))
                .await;
            Err(match e {
                StoreError::NotFound(_) => S3Error::no_such_bucket(&object.bucket),
                e => e.into(),
            })
        }
    }
}

/// The version id a new write gets (the store forces `null` unless versioning is on).
pub(crate) fn version_for(versioning: Versioning) -> String {
    if versioning == Versioning::Enabled {
        new_version_id()
    } else {
        "null".to_owned()
    }
}

pub(crate) fn put_version_header(h: &mut HeaderMap, version_id: &str) {
    if version_id != "null" {
        put_header(h, "x-amz-version-id", version_id);
    }
}

pub async fn put_object(ctx: &Ctx<'_>, body: Body) -> Result<Response, S3Error> {
    let bucket = ctx.bucket().await?;
    let metadata = user_metadata(&ctx.headers)?;
    if ctx.header("if-none-match").map(str::trim) == Some("*")
        && let Some(existing) = ctx
            .state
            .store
            .get_object(&ctx.bucket, &ctx.key, None)
            .await?
        && !existing.delete_marker
    {
        return Err(S3Error::new(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
        ));
    }
    let (spool, verified) = body::spool(ctx, body, MAX_OBJECT_SIZE, None).await?;
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
    let object = ObjectVersion {
        bucket: ctx.bucket.clone(),
        key: ctx.key.clone(),
        version_id: version_for(bucket.versioning),
        delete_marker: false,
        size: verified.len,
        etag: verified.etag(),
        content_type: ctx.header("content-type").map(str::to_owned),
        checksum: verified.stored_checksum(),
        metadata,
        blob,
        created_ms: crate::clock::now_ms(),
        is_latest: true,
    };
    record_object(ctx.state, &object).await?;
    let mut resp = empty_response(StatusCode::OK);
    let h = resp.headers_mut();
    put_header(h, "etag", &object.etag);
    put_version_header(h, &object.version_id);
    if let Some((alg, raw)) = &verified.checksum {
        put_header(h, alg.header(), &checksum::b64(raw));
        put_header(h, "x-amz-checksum-type", "FULL_OBJECT");
    }
    Ok(resp)
}

fn etag_matches(condition: &str, etag: &str) -> bool {
    condition
        .split(',')
        .map(str::trim)
        .any(|c| c == "*" || unquote_etag(c) == unquote_etag(etag))
}

/// The headers GetObject and HeadObject share. Every download by Range comes here, so the
/// fixed names are constants and values are made without intermediate copies.
fn object_headers(ctx: &Ctx<'_>, o: &ObjectVersion, h: &mut HeaderMap) {
    let (etag, last_modified) = validators(o);
    if let Some(v) = etag {
        h.insert(header::ETAG, v);
    }
    if let Some(v) = last_modified {
        h.insert(header::LAST_MODIFIED, v);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    put_version_header(h, &o.version_id);
    let content_type = match o.content_type.as_deref() {
        None => Ok(HeaderValue::from_static("binary/octet-stream")),
        Some(t) => HeaderValue::from_str(t),
    };
    if let Ok(v) = content_type {
        h.insert(header::CONTENT_TYPE, v);
    }
    for (k, v) in &o.metadata {
        put_header(h, &format!("x-amz-meta-{k}"), v);
    }
    // Asking for each override in turn is six scans of the query; most requests have none.
    if !ctx.query.has_prefix("response-") {
        return;
    }
    for (param, header) in [
        ("response-content-type", "content-type"),
        ("response-content-disposition", "content-disposition"),
        ("response-content-encoding", "content-encoding"),
        ("response-content-language", "content-language"),
        ("response-cache-control", "cache-control"),
        ("response-expires", "expires"),
    ] {
        if let Some(v) = ctx.query.get(param) {
            put_header(h, header, v);
        }
    }
}

/// Appends `n` in decimal (on every Range answer: cheaper than the formatting machinery).
fn push_decimal(out: &mut String, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for d in &digits[i..] {
        out.push(char::from(*d));
    }
}

/// An object's `ETag` and `Last-Modified` header values. A fleet downloading one image
/// asks for the same pair on every request, so each thread keeps the last pair it made
/// (a clone is a reference count; making them is formatting a date and two copies).
fn validators(o: &ObjectVersion) -> (Option<HeaderValue>, Option<HeaderValue>) {
    type Made = (i64, String, Option<HeaderValue>, Option<HeaderValue>);
    thread_local! {
        static LAST: std::cell::RefCell<Option<Made>> = const { std::cell::RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((at, etag, e, m)) = last.as_ref()
            && *at == o.created_ms
            && *etag == o.etag
        {
            return (e.clone(), m.clone());
        }
        let e = HeaderValue::from_str(&o.etag).ok();
        let m = HeaderValue::try_from(crate::clock::http_date(o.created_ms)).ok();
        *last = Some((o.created_ms, o.etag.clone(), e.clone(), m.clone()));
        (e, m)
    })
}

/// GetObject, and HeadObject (same answer without a body).
pub async fn get_object(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    if ctx.query.has("partNumber") {
        ctx.bucket().await?;
        return Err(S3Error::not_implemented(
            "Updraft does not support reading objects by part number",
        ));
    }
    let version = ctx.query.get("versionId");
    // A pre-signed GET is a device downloading firmware: a fleet asks for the same object
    // thousands of times, so its metadata may come from memory (for at most a second, and
    // never across an S3 write to this server).
    let found = if ctx.query.has("X-Amz-Signature") {
        ctx.state
            .data_plane
            .object(ctx.state, &ctx.bucket, &ctx.key, version)
            .await?
    } else {
        ctx.state
            .store
            .get_object(&ctx.bucket, &ctx.key, version)
            .await?
            .map(std::sync::Arc::new)
    };
    if found.is_none() {
        // NoSuchBucket before NoSuchKey.
        ctx.bucket().await?;
    }
    let o = match (found, version) {
        (Some(o), _) => o,
        (None, None) => return Err(S3Error::no_such_key()),
        (None, Some(_)) => {
            return Err(S3Error::new(
                StatusCode::NOT_FOUND,
                "NoSuchVersion",
                "The specified version does not exist.",
            ));
        }
    };
    if o.delete_marker {
        let e = if version.is_none() {
            S3Error::no_such_key()
        } else {
            S3Error::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "The specified method is not allowed against this resource.",
            )
            .with_header("last-modified", crate::clock::http_date(o.created_ms))
        };
        let e = e.with_header("x-amz-delete-marker", "true");
        return Err(if o.version_id == "null" {
            e
        } else {
            e.with_header("x-amz-version-id", o.version_id.clone())
        });
    }
    if let Some(c) = ctx.header(header::IF_MATCH)
        && !etag_matches(c, &o.etag)
    {
        return Err(S3Error::new(
            StatusCode::PRECONDITION_FAILED,
            "PreconditionFailed",
            "At least one of the pre-conditions you specified did not hold",
        ));
    }
    if let Some(c) = ctx.header(header::IF_NONE_MATCH)
        && etag_matches(c, &o.etag)
    {
        let mut resp = empty_response(StatusCode::NOT_MODIFIED);
        put_header(resp.headers_mut(), "etag", &o.etag);
        put_header(
            resp.headers_mut(),
            "last-modified",
            &crate::clock::http_date(o.created_ms),
        );
        return Ok(resp);
    }
    let range = match parse_range(ctx.header(header::RANGE), o.size) {
        RangeRequest::Unsatisfiable => {
            return Err(S3Error::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "InvalidRange",
                "The requested range is not satisfiable",
            )
            .with_header("content-range", format!("bytes */{}", o.size)));
        }
        RangeRequest::Full => None,
        RangeRequest::Partial(r) => Some(r),
    };
    let mut resp = Response::new(Body::empty());
    // Sized for an object's usual headers (with the request ids added on the way out) in
    // one allocation, half the size `empty_response` reserves.
    *resp.headers_mut() = HeaderMap::with_capacity(12);
    let h = resp.headers_mut();
    object_headers(ctx, &o, h);
    match &range {
        Some(r) => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(r.end - r.start));
            let mut range = String::with_capacity(64);
            range.push_str("bytes ");
            push_decimal(&mut range, r.start);
            range.push('-');
            push_decimal(&mut range, r.end - 1);
            range.push('/');
            push_decimal(&mut range, o.size);
            if let Ok(v) = HeaderValue::try_from(range) {
                h.insert(header::CONTENT_RANGE, v);
            }
        }
        None => {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(o.size));
            if ctx
                .header("x-amz-checksum-mode")
                .is_some_and(|m| m.eq_ignore_ascii_case("enabled"))
                && let Some(c) = &o.checksum
                && !checksum::is_composite(&c.value)
                && let Some(alg) = Algorithm::parse(&c.algorithm)
            {
                put_header(h, alg.header(), &c.value);
                put_header(h, "x-amz-checksum-type", checksum_type(&c.value));
            }
        }
    }
    if range.is_some() {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
    }
    if ctx.method == Method::HEAD {
        return Ok(resp);
    }
    // Firmware-sized objects come from the data plane's blob cache: a fleet downloading one
    // image by Range requests reads it from disk once.
    // The reads from the artifact store are boxed: their state machines would size every
    // download's future, while a fleet's requests find the blob in memory.
    if o.size <= crate::dataplane::MAX_CACHED_FILE {
        let dp = &ctx.state.data_plane;
        let all = match dp.cached_blob(&o.blob) {
            Some(b) => b,
            None => Box::pin(dp.blob_bytes(ctx.state, &o.blob, o.size)).await?,
        };
        let part = match &range {
            Some(r) => usize::try_from(r.start)
                .ok()
                .zip(usize::try_from(r.end).ok())
                .filter(|(s, e)| s <= e && *e <= all.len())
                .map(|(s, e)| all.slice(s..e)),
            None => Some(all),
        };
        let Some(part) = part else {
            return Err(S3Error::internal(
                "the stored object is shorter than recorded",
            ));
        };
        *resp.body_mut() = Body::from(part);
        return Ok(resp);
    }
    let stream = Box::pin(ctx.state.artifacts.read(&o.blob, range)).await?;
    *resp.body_mut() = Body::from_stream(stream);
    Ok(resp)
}

pub async fn delete_object(ctx: &Ctx<'_>) -> Result<Response, S3Error> {
    ctx.bucket().await?;
    let outcome = match ctx
        .state
        .store
        .delete_object(
            &ctx.bucket,
            &ctx.key,
            ctx.query.get("versionId"),
            crate::clock::now_ms(),
        )
        .await
    {
        Ok(o) => o,
        Err(StoreError::NotFound(_)) => return Err(S3Error::no_such_bucket(&ctx.bucket)),
        Err(e) => return Err(e.into()),
    };
    ctx.state.artifacts.delete(&outcome.orphaned_blobs).await;
    let mut resp = empty_response(StatusCode::NO_CONTENT);
    let h = resp.headers_mut();
    if let Some(v) = &outcome.version_id {
        put_header(h, "x-amz-version-id", v);
    }
    if outcome.delete_marker {
        put_header(h, "x-amz-delete-marker", "true");
    }
    Ok(resp)
}

/// One object named in a DeleteObjects request.
#[derive(Debug, Clone, PartialEq)]
pub struct DeleteTarget {
    pub key: String,
    pub version_id: Option<String>,
}

/// Parses `<Delete><Quiet>..</Quiet><Object><Key>..</Key><VersionId>..</VersionId></Object>..</Delete>`.
pub fn parse_delete(doc: &[u8]) -> Result<(bool, Vec<DeleteTarget>), S3Error> {
    let root = xml::parse(doc).map_err(S3Error::malformed_xml)?;
    if root.name != "Delete" {
        return Err(S3Error::malformed_xml("expected <Delete>"));
    }
    let quiet = match root.child_text("Quiet").map(str::trim) {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => return Err(S3Error::malformed_xml("<Quiet> must be true or false")),
    };
    let mut targets = Vec::new();
    for o in root.children_named("Object") {
        let key = o
            .child_text("Key")
            .filter(|k| !k.is_empty())
            .ok_or_else(|| S3Error::malformed_xml("every <Object> needs a <Key>"))?;
        targets.push(DeleteTarget {
            key: key.to_owned(),
            version_id: o
                .child_text("VersionId")
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned),
        });
    }
    if targets.is_empty() || targets.len() > 1000 {
        return Err(S3Error::malformed_xml(
            "a Delete request names between 1 and 1000 objects",
        ));
    }
    Ok((quiet, targets))
}

pub async fn delete_objects(ctx: &Ctx<'_>, body: Body) -> Result<Response, S3Error> {
    ctx.bucket().await?;
    let doc = body::read_small(ctx, body, body::Flexible::Body(None)).await?;
    let (quiet, targets) = parse_delete(&doc)?;
    let root = "DeleteResult";
    let mut w = XmlWriter::new(root);
    let mut orphaned = Vec::new();
    let now = crate::clock::now_ms();
    for t in &targets {
        let result = ctx
            .state
            .store
            .delete_object(&ctx.bucket, &t.key, t.version_id.as_deref(), now)
            .await;
        match result {
            Ok(outcome) => {
                orphaned.extend(outcome.orphaned_blobs);
                if quiet {
                    continue;
                }
                w.open("Deleted").elem("Key", &t.key);
                match (&t.version_id, outcome.delete_marker) {
                    (Some(v), true) => {
                        w.elem("VersionId", v)
                            .elem("DeleteMarker", "true")
                            .elem("DeleteMarkerVersionId", v);
                    }
                    (Some(v), false) => {
                        w.elem("VersionId", v);
                    }
                    (None, true) => {
                        w.elem("DeleteMarker", "true").elem(
                            "DeleteMarkerVersionId",
                            outcome.version_id.as_deref().unwrap_or("null"),
                        );
                    }
                    (None, false) => {}
                }
                w.close("Deleted");
            }
            Err(e) => {
                let e = match e {
                    StoreError::NotFound(_) => S3Error::no_such_bucket(&ctx.bucket),
                    e => S3Error::from(e),
                };
                w.open("Error").elem("Key", &t.key);
                w.opt("VersionId", t.version_id.as_deref())
                    .elem("Code", e.code)
                    .elem("Message", &e.message)
                    .close("Error");
            }
        }
    }
    ctx.state.artifacts.delete(&orphaned).await;
    Ok(xml_response(w.finish(root)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        use RangeRequest::*;
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(parse_range(Some("bytes=0-99"), 1000), Partial(0..100));
        assert_eq!(parse_range(Some("bytes=0-99"), 50), Partial(0..50));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Partial(5..10));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Partial(7..10));
        assert_eq!(parse_range(Some("bytes=-30"), 10), Partial(0..10));
        assert_eq!(parse_range(Some("Bytes= 2-2"), 10), Partial(2..3));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=10-20"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-5"), 0), Unsatisfiable);
        // Ignored: malformed, reversed, multi-range, other units.
        for h in [
            "bytes=5-2",
            "bytes=a-b",
            "bytes=0-1,3-4",
            "items=0-1",
            "bytes=-",
            "bytes=1",
            "bytes=+1-2",
        ] {
            assert_eq!(parse_range(Some(h), 10), Full, "{h}");
        }
    }

    #[test]
    fn delete_documents() {
        let doc = br#"<?xml version="1.0" encoding="UTF-8"?>
<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Object><Key>a b</Key></Object>
<Object><Key>x&amp;y</Key><VersionId> v1 </VersionId></Object><Quiet>true</Quiet></Delete>"#;
        let (quiet, t) = parse_delete(doc).expect("valid");
        assert!(quiet);
        assert_eq!(
            t,
            vec![
                DeleteTarget {
                    key: "a b".into(),
                    version_id: None
                },
                DeleteTarget {
                    key: "x&y".into(),
                    version_id: Some("v1".into())
                }
            ]
        );
        for bad in [
            &b"<Delete></Delete>"[..],
            b"<Delete><Object><VersionId>1</VersionId></Object></Delete>",
            b"<Remove><Object><Key>a</Key></Object></Remove>",
            b"<Delete><Quiet>maybe</Quiet><Object><Key>a</Key></Object></Delete>",
        ] {
            assert_eq!(
                parse_delete(bad).map_err(|e| e.code).err(),
                Some("MalformedXML")
            );
        }
        let many = format!(
            "<Delete>{}</Delete>",
            "<Object><Key>k</Key></Object>".repeat(1001)
        );
        assert!(parse_delete(many.as_bytes()).is_err());
    }

    #[test]
    fn decimals() {
        for n in [0, 7, 10, 4095, 33_554_431, u64::MAX] {
            let mut s = String::from("x");
            push_decimal(&mut s, n);
            assert_eq!(s, format!("x{n}"));
        }
    }

    #[test]
    fn etag_conditions() {
        assert!(etag_matches("\"abc\"", "\"abc\""));
        assert!(etag_matches("abc", "\"abc\""));
        assert!(etag_matches("\"x\", \"abc\"", "\"abc\""));
        assert!(etag_matches("*", "\"abc\""));
        assert!(!etag_matches("\"abd\"", "\"abc\""));
    }
}
