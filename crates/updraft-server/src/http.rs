//! The one HTTP listener: authenticates every request with SigV4 and dispatches on the
//! service named in its credential scope (the iot and iot-jobs-data routes collide, so
//! the path alone cannot tell them apart): `iot`, `iot-jobs-data`, `signer` (rest-json),
//! `acm` (json 1.1, `POST /` with `X-Amz-Target`) and `s3`. Errors take the shape of the
//! service's protocol.

use axum::body::{Body, HttpBody};
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use std::convert::Infallible;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpListener;

use crate::auth::{self, AuthError, Claim, SignedRequest};
use crate::error::{ApiError, ErrorCode, ErrorShape, JSON11};
use crate::server::AppState;

/// Largest control-plane request body (job documents are ≤ 32 KiB).
pub const MAX_API_BODY: usize = 1024 * 1024;

/// Serves HTTP on `listener` until `shutdown` resolves, then lets every connection finish
/// the request it is on and waits for them to close.
///
/// hyper directly, without axum's router and server loop: with `/health` as the only
/// route, every request goes to [`dispatch`], and a device's download request (one per
/// Range block) should cost little more than the HTTP exchange itself. What axum's router
/// did besides (Content-Length, HEAD) is done in [`dispatch`]; its accept loop's handling
/// of accept errors is kept. Per connection: TCP_NODELAY, so that small answers do not wait
/// for the client's delayed ACK; and half-close allowed, which spares each request a read
/// that hyper otherwise makes while the handler runs, to notice a client that hung up (a
/// syscall and a fresh read buffer per request); a vanished client is noticed on writing.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let state = Arc::new(state);
    // Each connection is told that shutdown started by its own oneshot: polling one, as
    // every wake of the connection does, is an atomic load, where a watch channel shared
    // by all connections would take a lock they all contend for. Senders of connections
    // that ended are pruned as the list doubles.
    let mut stoppers: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
    let mut prune_at = 64;
    // Held (never polled) by every connection: closed once they have all ended.
    let (done_tx, done_rx) = tokio::sync::watch::channel(());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
        if stoppers.len() >= prune_at {
            stoppers.retain(|s| !s.is_closed());
            prune_at = (stoppers.len() * 2).max(64);
        }
        let (stop_tx, mut stop) = tokio::sync::oneshot::channel::<()>();
        stoppers.push(stop_tx);
        let state = state.clone();
        let done = done_rx.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(dispatch(state, req.map(Body::new)).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .half_close(true)
                .serve_connection(TokioIo::new(tcp), service);
            let mut conn = std::pin::pin!(conn);
            let result = tokio::select! {
                biased;
                r = conn.as_mut() => r,
                _ = &mut stop => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                tracing::trace!(error = %e, "connection ended with an error");
            }
            drop(done);
        });
    }
    drop(listener);
    for s in stoppers {
        let _ = s.send(());
    }
    drop(done_rx);
    done_tx.closed().await;
    Ok(())
}

/// As axum's server loop (after hyper 0.14's): a connection that failed before it was
/// accepted is skipped; anything else (no file descriptors left, say) is logged and
/// retried after a second.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept error: {e}");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

fn health(method: &Method) -> Response {
    if matches!(*method, Method::GET | Method::HEAD) {
        return axum::Json(serde_json::json!({ "status": "ok" })).into_response();
    }
    let mut resp = StatusCode::METHOD_NOT_ALLOWED.into_response();
    resp.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET,HEAD"));
    resp
}

/// First path segments of the control-plane services; anything else is S3 (path style).
const API_ROOTS: &[&str] = &[
    "things",
    "thing-groups",
    "jobs",
    "streams",
    "otaUpdates",
    "endpoint",
    "keys-and-certificate",
    "certificates",
    "certificate",
    "policies",
    "target-policies",
    "signing-profiles",
    "signing-jobs",
    "signing-platforms",
    "greengrass",
];

fn looks_like_s3(path: &str) -> bool {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    !API_ROOTS.contains(&first)
}

/// Paths of the signer service (for answering unsigned requests in its shape).
fn looks_like_signer(path: &str) -> bool {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    first.starts_with("signing-")
}

/// A control-plane request after authentication.
pub struct ApiRequest {
    pub service: String,
    pub method: Method,
    /// Decoded path segments.
    pub segments: Vec<String>,
    pub query: Vec<(String, String)>,
    pub headers: axum::http::HeaderMap,
    pub body: Bytes,
}

async fn dispatch(state: Arc<AppState>, req: Request) -> Response {
    let method = req.method().clone();
    let mut resp = if req.uri().path() == "/health" {
        health(&method)
    } else {
        dispatch_inner(&state, req).await
    };
    // As axum's router did: a body of known size is announced (Content-Length), and a
    // HEAD answer keeps the headers of a GET and drops the body.
    if !resp.headers().contains_key(header::CONTENT_LENGTH)
        && let Some(size) = resp.body().size_hint().exact()
    {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    if method == Method::HEAD {
        *resp.body_mut() = Body::empty();
    }
    // S3 errors name their request id in the body too; keep the one they chose.
    let headers = resp.headers_mut();
    let id = match headers.get(&AMZ_REQUEST_ID) {
        Some(v) => v.clone(),
        None => request_id(),
    };
    headers.insert(AMZN_REQUEST_ID, id.clone());
    headers.insert(AMZ_REQUEST_ID, id);
    resp
}

/// A fresh request id: a random (v4) UUID, as before, without a call for OS randomness on
/// every request. Its bits are a keyed hash (SipHash under a key std draws from the OS)
/// of a per-process counter: as unpredictable and as unlikely to repeat as OS random
/// bytes, for ids that are not secrets anyway.
fn request_id() -> HeaderValue {
    static KEY: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let key = KEY.get_or_init(std::hash::RandomState::new);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let half = |salt: u64| {
        let mut h = key.build_hasher();
        h.write_u64(n);
        h.write_u64(salt);
        h.finish()
    };
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&half(0).to_le_bytes());
    bytes[8..].copy_from_slice(&half(1).to_le_bytes());
    let id = uuid::Builder::from_random_bytes(bytes).into_uuid();
    let mut buf = uuid::Uuid::encode_buffer();
    let text = id.hyphenated().encode_lower(&mut buf);
    // Lowercase hex and hyphens are always a valid header value.
    HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

/// The request id headers (names parsed once; they are on every response).
const AMZN_REQUEST_ID: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-amzn-requestid");
const AMZ_REQUEST_ID: axum::http::HeaderName =
    axum::http::HeaderName::from_static("x-amz-request-id");

/// An ACM (json 1.1) request: `X-Amz-Target: CertificateManager.<Operation>`.
fn is_acm(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("CertificateManager."))
}

/// The error shape of a service.
fn shape_of(service: &str) -> ErrorShape {
    match service {
        "signer" => ErrorShape::Signer,
        "acm" => ErrorShape::Json11,
        _ => ErrorShape::RestJson,
    }
}

fn auth_error(e: &AuthError, s3: bool) -> Response {
    auth_error_as(e, s3, ErrorShape::RestJson)
}

fn auth_error_as(e: &AuthError, s3: bool, shape: ErrorShape) -> Response {
    if s3 {
        let code = match e {
            AuthError::Missing => "AccessDenied",
            AuthError::Malformed(_) => "AuthorizationHeaderMalformed",
            AuthError::UnknownKey(_) => "InvalidAccessKeyId",
            AuthError::SignatureMismatch => "SignatureDoesNotMatch",
            AuthError::Stale(_) => "RequestTimeTooSkewed",
            AuthError::Expired => "AccessDenied",
        };
        return crate::s3::S3Error::new(StatusCode::FORBIDDEN, code, e.to_string()).into_response();
    }
    let code = match e {
        AuthError::Missing => ErrorCode::MissingAuthenticationToken,
        AuthError::Malformed(_) => ErrorCode::IncompleteSignature,
        AuthError::UnknownKey(_) => ErrorCode::UnrecognizedClient,
        AuthError::SignatureMismatch | AuthError::Stale(_) | AuthError::Expired => {
            ErrorCode::InvalidSignature
        }
    };
    ApiError::new(code, e.to_string()).into_response_as(shape)
}

async fn dispatch_inner(state: &AppState, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    // A URI clone shares its bytes (a reference count, no copy).
    let uri = parts.uri.clone();
    let raw_path = uri.path();
    let raw_query = uri.query().unwrap_or("");
    let signed = SignedRequest {
        method: &parts.method,
        raw_path,
        raw_query,
        headers: &parts.headers,
    };
    let now = crate::clock::now_ms();
    // A device downloading by Range asks for one pre-signed URL over and over: after its
    // first verification, the same bytes are known good until the URL expires.
    if let Some(principal) = state.keys.verified_url(&signed, now) {
        return crate::s3::handle(state, &principal, parts, body).await;
    }
    let claim = match Claim::from_request(&signed) {
        Ok(c) => c,
        Err(e) if is_acm(&parts.headers) => return auth_error_as(&e, false, ErrorShape::Json11),
        Err(e) if looks_like_signer(raw_path) => {
            return auth_error_as(&e, false, ErrorShape::Signer);
        }
        Err(e) => return auth_error(&e, looks_like_s3(raw_path)),
    };
    if claim.service == "s3" {
        let principal = match auth::verify_s3(&signed, &claim, &state.keys, now) {
            Ok(p) => p,
            Err(e) => return auth_error(&e, true),
        };
        return crate::s3::handle(state, &principal, parts, body).await;
    }
    // Boxed: the control plane's handlers make a large state machine, which every S3
    // request's future would otherwise be sized for (and allocate and move).
    Box::pin(control_plane(state, parts, body, claim, now)).await
}

/// A request to a service other than S3 (its claim read, not yet verified).
async fn control_plane(
    state: &AppState,
    parts: axum::http::request::Parts,
    body: Body,
    claim: Claim,
    now: i64,
) -> Response {
    let raw_path = parts.uri.path();
    let raw_query = parts.uri.query().unwrap_or("");
    let signed = SignedRequest {
        method: &parts.method,
        raw_path,
        raw_query,
        headers: &parts.headers,
    };
    let shape = shape_of(&claim.service);
    let body = match axum::body::to_bytes(body, MAX_API_BODY).await {
        Ok(b) => b,
        Err(_) => {
            let code = match shape {
                ErrorShape::Signer => ErrorCode::Validation,
                ErrorShape::Json11 => ErrorCode::AcmValidation,
                ErrorShape::RestJson => ErrorCode::InvalidRequest,
            };
            return ApiError::new(code, format!("request body exceeds {MAX_API_BODY} bytes"))
                .into_response_as(shape);
        }
    };
    let body_hash = hex::encode(Sha256::digest(&body));
    if let Err(e) = auth::verify(&signed, &claim, &state.keys, Some(&body_hash), now) {
        return auth_error_as(&e, false, shape);
    }
    let segments: Vec<String> = raw_path
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(auth::percent_decode)
        .collect();
    let api = ApiRequest {
        service: claim.service.clone(),
        method: parts.method,
        segments,
        query: auth::query_pairs(raw_query),
        headers: parts.headers,
        body,
    };
    let result = match api.service.as_str() {
        "iot" => crate::iot::handle(state, &api).await,
        "iot-jobs-data" => crate::dataplane::jobs_http::handle(state, &api).await,
        "signer" => crate::signer::handle(state, &api).await,
        "acm" => crate::acm::handle(state, &api).await,
        other => Err(ApiError::new(
            ErrorCode::NotImplemented,
            format!("Updraft does not serve the '{other}' service"),
        )),
    };
    match (result, shape) {
        (Ok(value), ErrorShape::Json11) => {
            let mut resp = json_response(value);
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static(JSON11));
            resp
        }
        (Ok(value), _) => json_response(value),
        (Err(e), shape) => e.into_response_as(shape),
    }
}

/// A 200 response with a JSON body.
pub fn json_response(value: serde_json::Value) -> Response {
    let mut resp = Response::new(Body::from(value.to_string()));
    resp.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_distinct_v4_uuids() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = request_id();
            let text = id.to_str().unwrap_or_default().to_owned();
            let parsed = uuid::Uuid::parse_str(&text).expect("a UUID");
            assert_eq!(parsed.get_version_num(), 4);
            assert_eq!(text, parsed.hyphenated().to_string());
            assert!(seen.insert(text), "ids repeat");
        }
    }
}
