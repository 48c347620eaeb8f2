//! AWS Signature Version 4 verification, header and pre-signed (query) forms.
//!
//! Every control-plane and S3 request is checked here against the keys Updraft
//! generated (see [`crate::server`]). The credential scope names the service the
//! client meant (`iot`, `iot-jobs-data`, `signer`, `s3`, ...), which is how one
//! listener serves several AWS services whose routes collide.

use axum::http::header::AUTHORIZATION;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, RwLock};
use thiserror::Error;

type HmacSha256 = Hmac<Sha256>;

/// How far a request's timestamp may be from the server clock.
pub const MAX_SKEW_MS: i64 = 15 * 60 * 1000;
/// The longest lifetime a pre-signed URL may ask for (7 days, as S3).
pub const MAX_PRESIGN_SECONDS: i64 = 7 * 24 * 3600;

/// The payload hash S3 clients send when they do not sign the body.
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    #[error("Missing Authentication Token")]
    Missing,
    #[error("{0}")]
    Malformed(String),
    #[error("The security token included in the request is invalid.")]
    UnknownKey(String),
    #[error(
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method."
    )]
    SignatureMismatch,
    #[error(
        "Signature expired: {0} is now earlier or later than the allowed 15 minutes of server time."
    )]
    Stale(String),
    #[error("Request has expired")]
    Expired,
}

/// Who signed a request, and for which service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub access_key: String,
    pub service: String,
    pub region: String,
    /// The payload hash the client signed (hex SHA-256, or a special marker for S3).
    pub payload_hash: String,
}

/// The access keys the server accepts.
///
/// A key ring never changes after it is made, which is what lets it remember the
/// pre-signed URLs it verified ([`VerifiedUrls`]): an entry can only go stale by its own
/// expiry, never because its key was removed. Whoever changes keys makes a new ring, and
/// with it an empty cache.
#[derive(Debug, Clone, Default)]
pub struct KeyRing {
    secrets: HashMap<String, String>,
    verified: VerifiedUrls,
}

impl KeyRing {
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Self {
        KeyRing {
            secrets: pairs.into_iter().collect(),
            verified: VerifiedUrls::default(),
        }
    }

    /// The principal of a pre-signed `GET` this ring verified before, if `req` is exactly
    /// that request (method, path, query and signed headers byte for byte) and the URL is
    /// still within its lifetime at `now_ms`. `None` means: verify it in full.
    pub fn verified_url(&self, req: &SignedRequest<'_>, now_ms: i64) -> Option<Arc<Principal>> {
        self.verified.get(req, now_ms)
    }

    fn secret(&self, access_key: &str) -> Option<&str> {
        self.secrets.get(access_key).map(String::as_str)
    }

    /// The key pair the server itself signs with (pre-signed URLs), if any.
    pub fn primary(&self) -> Option<(&str, &str)> {
        self.secrets
            .iter()
            .min_by_key(|(k, _)| k.as_str())
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

/// The parts of an HTTP request SigV4 covers.
pub struct SignedRequest<'a> {
    pub method: &'a Method,
    /// The path exactly as received (still percent-encoded).
    pub raw_path: &'a str,
    /// The query string exactly as received.
    pub raw_query: &'a str,
    pub headers: &'a HeaderMap,
}

/// The credential scope and signature of a request, before verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub access_key: String,
    pub date: String,
    pub region: String,
    pub service: String,
    pub signed_headers: Vec<String>,
    pub signature: String,
    pub amz_date: String,
    /// Set for pre-signed URLs: lifetime in seconds.
    pub expires: Option<i64>,
}

impl Claim {
    /// Reads the claim from the `Authorization` header or, failing that, the query.
    pub fn from_request(req: &SignedRequest<'_>) -> Result<Claim, AuthError> {
        if let Some(h) = req.headers.get("authorization") {
            let h = h
                .to_str()
                .map_err(|_| AuthError::Malformed("Authorization header is not ASCII".into()))?;
            return Self::from_header(h, req.headers);
        }
        if req.raw_query.contains("X-Amz-Signature=") {
            return Self::from_query(req.raw_query);
        }
        Err(AuthError::Missing)
    }

    fn from_header(h: &str, headers: &HeaderMap) -> Result<Claim, AuthError> {
        let rest = h.strip_prefix("AWS4-HMAC-SHA256 ").ok_or_else(|| {
            AuthError::Malformed(
                "Authorization header must use the AWS4-HMAC-SHA256 algorithm".into(),
            )
        })?;
        let mut credential = None;
        let mut signed = None;
        let mut signature = None;
        for part in rest.split(',') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("Credential=") {
                credential = Some(v);
            } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
                signed = Some(v);
            } else if let Some(v) = part.strip_prefix("Signature=") {
                signature = Some(v);
            }
        }
        let (Some(credential), Some(signed), Some(signature)) = (credential, signed, signature)
        else {
            return Err(AuthError::Malformed(
                "Authorization header requires 'Credential', 'SignedHeaders' and 'Signature'"
                    .into(),
            ));
        };
        let amz_date = headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| AuthError::Malformed("Missing X-Amz-Date header".into()))?;
        Self::build(credential, signed, signature, amz_date, None)
    }

    fn from_query(raw_query: &str) -> Result<Claim, AuthError> {
        let q: HashMap<String, String> = query_pairs(raw_query).into_iter().collect();
        let get = |k: &str| {
            q.get(k)
                .map(String::as_str)
                .ok_or_else(|| AuthError::Malformed(format!("Missing {k} query parameter")))
        };
        if get("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" {
            return Err(AuthError::Malformed(
                "X-Amz-Algorithm must be AWS4-HMAC-SHA256".into(),
            ));
        }
        let expires = get("X-Amz-Expires")?
            .parse::<i64>()
            .ok()
            .filter(|e| (1..=MAX_PRESIGN_SECONDS).contains(e))
            .ok_or_else(|| {
                AuthError::Malformed("X-Amz-Expires must be between 1 and 604800 seconds".into())
            })?;
        Self::build(
            get("X-Amz-Credential")?,
            get("X-Amz-SignedHeaders")?,
            get("X-Amz-Signature")?,
            get("X-Amz-Date")?,
            Some(expires),
        )
    }

    fn build(
        credential: &str,
        signed: &str,
        signature: &str,
        amz_date: &str,
        expires: Option<i64>,
    ) -> Result<Claim, AuthError> {
        let parts: Vec<&str> = credential.split('/').collect();
        let [access_key, date, region, service, "aws4_request"] = parts.as_slice() else {
            return Err(AuthError::Malformed(format!(
                "Credential should be scoped to a valid region and service: '{credential}'"
            )));
        };
        if !amz_date.starts_with(date) {
            return Err(AuthError::Malformed(
                "Credential date does not match the request date".into(),
            ));
        }
        Ok(Claim {
            access_key: (*access_key).to_owned(),
            date: (*date).to_owned(),
            region: (*region).to_owned(),
            service: (*service).to_owned(),
            signed_headers: signed.split(';').map(str::to_owned).collect(),
            signature: signature.to_ascii_lowercase(),
            amz_date: amz_date.to_owned(),
            expires,
        })
    }
}

/// Verifies `claim` for `req`. `body_hash` is the hex SHA-256 of the body for services
/// that sign the body without announcing its hash (everything but S3); S3 requests
/// carry the hash they signed in `x-amz-content-sha256`, which the caller must check
/// against the body it reads.
pub fn verify(
    req: &SignedRequest<'_>,
    claim: &Claim,
    keys: &KeyRing,
    body_hash: Option<&str>,
    now_ms: i64,
) -> Result<Principal, AuthError> {
    let secret = keys
        .secret(&claim.access_key)
        .ok_or_else(|| AuthError::UnknownKey(claim.access_key.clone()))?;
    let signed_at = crate::clock::parse_amz_date(&claim.amz_date)
        .ok_or_else(|| AuthError::Malformed(format!("Invalid X-Amz-Date '{}'", claim.amz_date)))?;
    match claim.expires {
        None if (now_ms - signed_at).abs() > MAX_SKEW_MS => {
            return Err(AuthError::Stale(claim.amz_date.clone()));
        }
        Some(expires)
            if now_ms > signed_at + expires * 1000 || signed_at - now_ms > MAX_SKEW_MS =>
        {
            return Err(AuthError::Expired);
        }
        _ => {}
    }
    if !claim.signed_headers.iter().any(|h| h == "host") {
        return Err(AuthError::Malformed(
            "SignedHeaders must include 'host'".into(),
        ));
    }
    let s3 = claim.service == "s3";
    let payload_hash = if claim.expires.is_some() {
        UNSIGNED_PAYLOAD.to_owned()
    } else if let Some(h) = req.headers.get("x-amz-content-sha256") {
        h.to_str()
            .map_err(|_| AuthError::Malformed("x-amz-content-sha256 is not ASCII".into()))?
            .to_owned()
    } else if s3 {
        return Err(AuthError::Malformed(
            "Missing required header x-amz-content-sha256".into(),
        ));
    } else {
        body_hash
            .map(str::to_owned)
            .unwrap_or_else(|| hex::encode(Sha256::digest(b"")))
    };
    let canonical = canonical_request(req, claim, &payload_hash, s3)?;
    if !claim.amz_date.starts_with(&claim.date) {
        return Err(AuthError::Malformed(
            "the credential scope's date is not the request's date".into(),
        ));
    }
    let (_, expected) = signature(
        secret,
        &claim.amz_date,
        &claim.region,
        &claim.service,
        &canonical,
    );
    if !constant_time_eq(expected.as_bytes(), claim.signature.as_bytes()) {
        tracing::debug!(%canonical, "SigV4 mismatch");
        return Err(AuthError::SignatureMismatch);
    }
    Ok(Principal {
        access_key: claim.access_key.clone(),
        service: claim.service.clone(),
        region: claim.region.clone(),
        payload_hash,
    })
}

/// [`verify`] for S3 requests, remembering a verified pre-signed `GET` so that the same URL
/// asked again (a device downloading by `Range`, one request per block) is answered from
/// [`KeyRing::verified_url`] instead of a full verification. Only successes are kept.
pub fn verify_s3(
    req: &SignedRequest<'_>,
    claim: &Claim,
    keys: &KeyRing,
    now_ms: i64,
) -> Result<Arc<Principal>, AuthError> {
    let principal = Arc::new(verify(req, claim, keys, None, now_ms)?);
    if let Some(expires) = claim.expires
        && *req.method == Method::GET
        && let Some(signed_at_ms) = crate::clock::parse_amz_date(&claim.amz_date)
    {
        keys.verified.insert(
            req,
            claim,
            (signed_at_ms, signed_at_ms + expires * 1000),
            principal.clone(),
            now_ms,
        );
    }
    Ok(principal)
}

/// How much of the end of a query places its entry: a hex SigV4 signature.
const SLOT_BYTES: usize = 64;

/// Verified pre-signed URLs per key ring, at most this many (about 0.5 KiB each).
/// Each device is handed its own URL, so this is a fleet downloading at once.
const MAX_VERIFIED_URLS: usize = 16 * 1024;

/// Pre-signed `GET` URLs that passed [`verify`], with who signed them.
///
/// Entries are found by a keyed hash of the query's signature, then compared in full
/// (method, path, query and every signed header's values, byte for byte), so any difference from
/// the request that was verified is a miss and goes through full verification; a hash
/// collision, engineered or not, can only cost a miss. An entry answers only while the
/// verification it stands for would still succeed: [`verify`]'s time window is checked
/// again on every hit, and the key that signed it cannot go away (see [`KeyRing`]).
/// Only verified URLs get in, so filling it takes valid signatures; it is bounded all
/// the same.
struct VerifiedUrls {
    entries: RwLock<HashMap<u64, VerifiedUrl>>,
    hasher: RandomState,
    capacity: usize,
}

struct VerifiedUrl {
    method: Method,
    path: Box<str>,
    query: Box<str>,
    /// Every signed header with its values as they were received.
    headers: Box<[(HeaderName, Box<[HeaderValue]>)]>,
    signed_at_ms: i64,
    expires_at_ms: i64,
    principal: Arc<Principal>,
}

impl Default for VerifiedUrls {
    fn default() -> Self {
        Self::with_capacity(MAX_VERIFIED_URLS)
    }
}

/// A copy of a key ring starts with nothing verified (it is re-learnt in one request).
impl Clone for VerifiedUrls {
    fn clone(&self) -> Self {
        Self::with_capacity(self.capacity)
    }
}

impl std::fmt::Debug for VerifiedUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedUrls")
            .field("len", &self.len())
            .finish()
    }
}

impl VerifiedUrls {
    fn with_capacity(capacity: usize) -> Self {
        VerifiedUrls {
            entries: RwLock::new(HashMap::new()),
            hasher: RandomState::new(),
            capacity,
        }
    }

    /// Where a request's entry would be: a hash of the end of its query, where signers
    /// (Updraft, the AWS SDKs) put the signature, distinct for every URL; everything else
    /// is compared in full. A query ending otherwise only makes URLs share slots (misses).
    fn slot(&self, query: &str) -> u64 {
        let tail = query.len().saturating_sub(SLOT_BYTES);
        self.hasher
            .hash_one(query.as_bytes().get(tail..).unwrap_or_default())
    }

    fn len(&self) -> usize {
        self.entries.read().map_or(0, |m| m.len())
    }

    fn get(&self, req: &SignedRequest<'_>, now_ms: i64) -> Option<Arc<Principal>> {
        // The Authorization header takes precedence over the query (see
        // [`Claim::from_request`]): such a request is not the URL that was verified.
        if *req.method != Method::GET || req.headers.contains_key(AUTHORIZATION) {
            return None;
        }
        let slot = self.slot(req.raw_query);
        let m = self.entries.read().ok()?;
        let e = m.get(&slot)?;
        let same = e.method == *req.method
            && *e.path == *req.raw_path
            && *e.query == *req.raw_query
            && e.headers
                .iter()
                .all(|(name, values)| req.headers.get_all(name).iter().eq(values.iter()));
        // Exactly the window `verify` accepts: past it, the full verification answers
        // (Expired), as it does for a URL never seen.
        let live = now_ms <= e.expires_at_ms && e.signed_at_ms - now_ms <= MAX_SKEW_MS;
        (same && live).then(|| e.principal.clone())
    }

    fn insert(
        &self,
        req: &SignedRequest<'_>,
        claim: &Claim,
        (signed_at_ms, expires_at_ms): (i64, i64),
        principal: Arc<Principal>,
        now_ms: i64,
    ) {
        let mut headers = Vec::with_capacity(claim.signed_headers.len());
        for name in &claim.signed_headers {
            let Ok(name) = HeaderName::from_bytes(name.as_bytes()) else {
                return;
            };
            // Copied rather than cloned: a clone would share, and so keep alive, the
            // connection's whole read buffer the request was parsed from.
            let values: Result<Box<[HeaderValue]>, _> = req
                .headers
                .get_all(&name)
                .iter()
                .map(|v| HeaderValue::from_bytes(v.as_bytes()))
                .collect();
            let Ok(values) = values else {
                return;
            };
            headers.push((name, values));
        }
        let entry = VerifiedUrl {
            method: req.method.clone(),
            path: req.raw_path.into(),
            query: req.raw_query.into(),
            headers: headers.into(),
            signed_at_ms,
            expires_at_ms,
            principal,
        };
        let slot = self.slot(req.raw_query);
        let Ok(mut m) = self.entries.write() else {
            return;
        };
        if m.len() >= self.capacity && !m.contains_key(&slot) {
            m.retain(|_, e| now_ms <= e.expires_at_ms);
            if m.len() >= self.capacity {
                // Still full of live URLs: drop an arbitrary half (each costs its device
                // one more full verification), so a full cache costs O(1) per insert.
                let mut keep = true;
                m.retain(|_, _| {
                    keep = !keep;
                    keep
                });
            }
        }
        m.insert(slot, entry);
    }
}

/// A pre-signed S3 `GET` URL (SigV4 query form) for `bucket`/`key` at `base_url`
/// (`http://host:port`), valid for `expires` seconds from `now_ms`.
#[allow(clippy::too_many_arguments)]
pub fn presign_s3_get(
    base_url: &str,
    bucket: &str,
    key: &str,
    access_key: &str,
    secret: &str,
    region: &str,
    now_ms: i64,
    expires: i64,
) -> String {
    let base = base_url.trim_end_matches('/');
    let authority = base.split_once("://").map(|(_, a)| a).unwrap_or(base);
    let path = format!("/{}/{}", uri_encode(bucket, true), uri_encode(key, false));
    let amz_date = crate::clock::amz_date(now_ms);
    let date = &amz_date[..8];
    let credential = format!("{access_key}/{date}/{region}/s3/aws4_request");
    let params = [
        ("X-Amz-Algorithm", "AWS4-HMAC-SHA256".to_owned()),
        ("X-Amz-Credential", credential),
        ("X-Amz-Date", amz_date.clone()),
        ("X-Amz-Expires", expires.to_string()),
        ("X-Amz-SignedHeaders", "host".to_owned()),
    ];
    let query = canonical_query(params.map(|(k, v)| (k.to_owned(), v)));
    let canonical = format!("GET\n{path}\n{query}\nhost:{authority}\n\nhost\n{UNSIGNED_PAYLOAD}");
    let (_, signature) = signature(secret, &amz_date, region, "s3", &canonical);
    format!("{base}{path}?{query}&X-Amz-Signature={signature}")
}

/// The SigV4 signature of a canonical request: `(credential scope, hex signature)`. The
/// one place the string to sign and the signing key are made, for verifying requests,
/// pre-signing URLs and Updraft's own clients.
pub fn signature(
    secret: &str,
    amz_date: &str,
    region: &str,
    service: &str,
    canonical_request: &str,
) -> (String, String) {
    let date = amz_date.get(..8).unwrap_or(amz_date);
    let scope = format!("{date}/{region}/{service}/aws4_request");
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
        hex::encode(Sha256::digest(canonical_request.as_bytes()))
    );
    let signature = hex::encode(hmac(
        &signing_key(secret, date, region, service),
        string_to_sign.as_bytes(),
    ));
    (scope, signature)
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap_or_else(|_| unreachable!());
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// The SigV4 signing key for a date, region and service.
pub fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> Vec<u8> {
    let k = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k = hmac(&k, region.as_bytes());
    let k = hmac(&k, service.as_bytes());
    hmac(&k, b"aws4_request")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn canonical_request(
    req: &SignedRequest<'_>,
    claim: &Claim,
    payload_hash: &str,
    s3: bool,
) -> Result<String, AuthError> {
    let path = if req.raw_path.is_empty() {
        "/"
    } else {
        req.raw_path
    };
    // S3 signs the path as sent; every other service signs it encoded once more.
    let canonical_uri = if s3 {
        path.to_owned()
    } else {
        uri_encode(&normalize_path(path), false)
    };
    let canonical_query = canonical_query(
        query_pairs(req.raw_query)
            .into_iter()
            .filter(|(k, _)| !(claim.expires.is_some() && k == "X-Amz-Signature")),
    );
    let mut canonical_headers = String::new();
    for name in &claim.signed_headers {
        let values: Vec<String> = req
            .headers
            .get_all(name.as_str())
            .iter()
            .map(|v| {
                String::from_utf8_lossy(v.as_bytes())
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        if values.is_empty() {
            return Err(AuthError::Malformed(format!(
                "Signed header '{name}' is missing from the request"
            )));
        }
        canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    Ok(format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        req.method.as_str(),
        canonical_uri,
        canonical_query,
        canonical_headers,
        claim.signed_headers.join(";"),
        payload_hash
    ))
}

/// SigV4's canonical query string: every name and value encoded, the pairs sorted, joined
/// with `&`. Clients signing requests (the `updraft` command's API client) use it too.
pub fn canonical_query(pairs: impl IntoIterator<Item = (String, String)>) -> String {
    let mut pairs: Vec<(String, String)> = pairs
        .into_iter()
        .map(|(k, v)| (uri_encode(&k, true), uri_encode(&v, true)))
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Removes `.` and `..` segments, as botocore does before signing.
fn normalize_path(path: &str) -> String {
    if !path.split('/').any(|s| s == "." || s == "..") {
        return path.to_owned();
    }
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut s = format!("/{}", out.join("/"));
    if path.ends_with('/') && !s.ends_with('/') {
        s.push('/');
    }
    s
}

/// RFC 3986 encoding as SigV4 wants it: unreserved characters stay, `/` stays unless
/// `encode_slash`, everything else becomes `%XX`.
pub fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Decodes `%XX` escapes (not `+`), keeping invalid escapes as they are.
pub fn percent_decode(s: &str) -> String {
    percent_decode_cow(s).into_owned()
}

/// [`percent_decode`], borrowing `s` when it has nothing to decode (most names and
/// values on a request's hot path).
pub fn percent_decode_cow(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains('%') {
        return std::borrow::Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex_val(b[i + 1]), hex_val(b[i + 2]))
        {
            out.push(h * 16 + l);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Splits a raw query string into decoded pairs, keeping repeated keys.
pub fn query_pairs(raw: &str) -> Vec<(String, String)> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    /// The AWS SigV4 test suite's `get-vanilla-query-order-key-case` vector.
    #[test]
    fn aws_test_vector() {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("example.amazonaws.com"));
        headers.insert("x-amz-date", HeaderValue::from_static("20150830T123600Z"));
        headers.insert(
            "authorization",
            HeaderValue::from_static(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, \
                 SignedHeaders=host;x-amz-date, \
                 Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
            ),
        );
        let method = Method::GET;
        let req = SignedRequest {
            method: &method,
            raw_path: "/",
            raw_query: "Param2=value2&Param1=value1",
            headers: &headers,
        };
        let keys = KeyRing::new([(
            "AKIDEXAMPLE".to_owned(),
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_owned(),
        )]);
        let claim = Claim::from_request(&req).expect("claim");
        let now = crate::clock::parse_amz_date("20150830T123600Z").unwrap_or(0);
        let p = verify(&req, &claim, &keys, None, now).expect("valid signature");
        assert_eq!(p.service, "service");
        // Tampering with any covered part fails.
        let req2 = SignedRequest {
            raw_query: "Param2=value2&Param1=value3",
            ..req
        };
        assert_eq!(
            verify(&req2, &claim, &keys, None, now),
            Err(AuthError::SignatureMismatch)
        );
        // A wrong key is unknown; a late request is stale.
        assert!(matches!(
            verify(&req, &claim, &KeyRing::default(), None, now),
            Err(AuthError::UnknownKey(_))
        ));
        assert!(matches!(
            verify(&req, &claim, &keys, None, now + MAX_SKEW_MS + 1000),
            Err(AuthError::Stale(_))
        ));
    }

    /// A URL from `presign_s3_get` verifies, and stops verifying when tampered or expired.
    #[test]
    fn presigned_urls_round_trip() {
        let keys = KeyRing::new([("AK".to_owned(), "SECRET".to_owned())]);
        let now = 1_700_000_000_000;
        let url = presign_s3_get(
            "http://127.0.0.1:9000",
            "fw",
            "dir/a b.bin",
            "AK",
            "SECRET",
            "us-east-1",
            now,
            60,
        );
        let rest = url
            .strip_prefix("http://127.0.0.1:9000")
            .unwrap_or_default();
        let (path, query) = rest.split_once('?').unwrap_or_default();
        assert_eq!(path, "/fw/dir/a%20b.bin");
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("127.0.0.1:9000"));
        let method = Method::GET;
        let req = SignedRequest {
            method: &method,
            raw_path: path,
            raw_query: query,
            headers: &headers,
        };
        let claim = Claim::from_request(&req).expect("claim");
        assert_eq!(claim.service, "s3");
        assert!(verify(&req, &claim, &keys, None, now + 1000).is_ok());
        assert_eq!(
            verify(&req, &claim, &keys, None, now + 61_000),
            Err(AuthError::Expired)
        );
        let tampered = SignedRequest {
            raw_path: "/fw/dir/other.bin",
            ..req
        };
        assert_eq!(
            verify(&tampered, &claim, &keys, None, now),
            Err(AuthError::SignatureMismatch)
        );
    }

    /// A pre-signed URL from `presign_s3_get`, as (path, query), for `verify_s3` tests.
    fn presigned(key: &str, now: i64, expires: i64) -> (String, String) {
        let url = presign_s3_get(
            "http://127.0.0.1:9000",
            "fw",
            key,
            "AK",
            "SECRET",
            "us-east-1",
            now,
            expires,
        );
        let rest = url
            .strip_prefix("http://127.0.0.1:9000")
            .unwrap_or_default();
        let (path, query) = rest.split_once('?').unwrap_or_default();
        (path.to_owned(), query.to_owned())
    }

    fn host(h: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static(h));
        headers
    }

    const T0: i64 = 1_700_000_000_000;

    /// Verifies like `http::dispatch_inner` does: the cache first, then in full.
    fn check(
        keys: &KeyRing,
        method: &Method,
        path: &str,
        query: &str,
        headers: &HeaderMap,
        now: i64,
    ) -> (bool, Result<Arc<Principal>, AuthError>) {
        let req = SignedRequest {
            method,
            raw_path: path,
            raw_query: query,
            headers,
        };
        if let Some(p) = keys.verified_url(&req, now) {
            return (true, Ok(p));
        }
        let r = Claim::from_request(&req).and_then(|c| verify_s3(&req, &c, keys, now));
        (false, r)
    }

    #[test]
    fn verified_urls_are_remembered_until_they_expire() {
        let keys = KeyRing::new([("AK".to_owned(), "SECRET".to_owned())]);
        let (path, query) = presigned("fw.bin", T0, 60);
        let h = host("127.0.0.1:9000");
        let get = Method::GET;
        let (hit, first) = check(&keys, &get, &path, &query, &h, T0 + 1000);
        assert!(!hit, "the first request is verified in full");
        let first = first.expect("valid");
        let (hit, again) = check(&keys, &get, &path, &query, &h, T0 + 2000);
        assert!(hit, "the same URL again is answered from memory");
        assert_eq!(again.expect("valid"), first);
        // The last millisecond `verify` accepts is accepted from memory too; one later,
        // the full verification answers, as for a URL never seen: expired (a 403).
        let (hit, last) = check(&keys, &get, &path, &query, &h, T0 + 60_000);
        assert!(hit && last.is_ok());
        let (hit, late) = check(&keys, &get, &path, &query, &h, T0 + 60_001);
        assert!(!hit);
        assert_eq!(late, Err(AuthError::Expired));
        // A clock set back past the skew `verify` allows for URLs from the future.
        let (hit, early) = check(&keys, &get, &path, &query, &h, T0 - MAX_SKEW_MS - 1);
        assert!(!hit);
        assert_eq!(early, Err(AuthError::Expired));
        assert_eq!(keys.verified.len(), 1);
    }

    #[test]
    fn only_the_exact_verified_request_is_remembered() {
        let keys = KeyRing::new([("AK".to_owned(), "SECRET".to_owned())]);
        let (path, query) = presigned("fw.bin", T0, 60);
        let h = host("127.0.0.1:9000");
        let get = Method::GET;
        assert!(check(&keys, &get, &path, &query, &h, T0).1.is_ok());
        // Any byte of the query, the path or a signed header different: a miss, and the
        // full verification refuses it as it always did.
        let last = query.len() - 1;
        let flipped = if query.ends_with('0') { "1" } else { "0" };
        let bad_signature = format!("{}{flipped}", &query[..last]);
        let (hit, r) = check(&keys, &get, &path, &bad_signature, &h, T0);
        assert!(!hit);
        assert_eq!(r, Err(AuthError::SignatureMismatch));
        let longer = query.replace("X-Amz-Expires=60", "X-Amz-Expires=600");
        let (hit, r) = check(&keys, &get, &path, &longer, &h, T0);
        assert!(!hit);
        assert_eq!(r, Err(AuthError::SignatureMismatch));
        let (hit, r) = check(&keys, &get, "/fw/other.bin", &query, &h, T0);
        assert!(!hit);
        assert_eq!(r, Err(AuthError::SignatureMismatch));
        let (hit, r) = check(&keys, &get, &path, &query, &host("evil:9000"), T0);
        assert!(!hit);
        assert_eq!(r, Err(AuthError::SignatureMismatch));
        // Another method signs differently; an Authorization header takes precedence
        // over the query.
        let (hit, r) = check(&keys, &Method::HEAD, &path, &query, &h, T0);
        assert!(!hit);
        assert_eq!(r, Err(AuthError::SignatureMismatch));
        let mut with_auth = h.clone();
        with_auth.insert("authorization", HeaderValue::from_static("Bearer x"));
        let (hit, r) = check(&keys, &get, &path, &query, &with_auth, T0);
        assert!(!hit);
        assert!(matches!(r, Err(AuthError::Malformed(_))));
        // Failures are never remembered: the same bad request fails again in full.
        assert_eq!(keys.verified.len(), 1);
        let (hit, r) = check(&keys, &get, &path, &bad_signature, &h, T0);
        assert!(!hit);
        assert_eq!(r, Err(AuthError::SignatureMismatch));
        // A copy of the key ring (as for new keys) starts empty.
        assert_eq!(keys.clone().verified.len(), 0);
    }

    #[test]
    fn failed_verifications_are_not_remembered() {
        let keys = KeyRing::new([("AK".to_owned(), "SECRET".to_owned())]);
        let other = KeyRing::new([("AK".to_owned(), "OTHER".to_owned())]);
        let (path, query) = presigned("fw.bin", T0, 60);
        let h = host("127.0.0.1:9000");
        let get = Method::GET;
        for _ in 0..2 {
            let (hit, r) = check(&other, &get, &path, &query, &h, T0);
            assert!(!hit);
            assert_eq!(r, Err(AuthError::SignatureMismatch));
            // Expired on its first request: refused, and not kept.
            let (hit, r) = check(&keys, &get, &path, &query, &h, T0 + 61_000);
            assert!(!hit);
            assert_eq!(r, Err(AuthError::Expired));
        }
        assert_eq!(other.verified.len(), 0);
        assert_eq!(keys.verified.len(), 0);
    }

    #[test]
    fn verified_urls_are_bounded() {
        let mut keys = KeyRing::new([("AK".to_owned(), "SECRET".to_owned())]);
        keys.verified = VerifiedUrls::with_capacity(8);
        let h = host("127.0.0.1:9000");
        let get = Method::GET;
        for i in 0..100 {
            let (path, query) = presigned(&format!("fw-{i}.bin"), T0, 60);
            assert!(check(&keys, &get, &path, &query, &h, T0).1.is_ok());
            assert!(keys.verified.len() <= 8);
            // The newest is always kept.
            assert!(check(&keys, &get, &path, &query, &h, T0).0);
        }
        // When it is full, expired entries go first, and only they if that makes room.
        keys.verified = VerifiedUrls::with_capacity(8);
        let mut long = Vec::new();
        for i in 0..8 {
            let (path, query) = presigned(&format!("fw-{i}.bin"), T0, if i < 4 { 1 } else { 60 });
            assert!(check(&keys, &get, &path, &query, &h, T0).1.is_ok());
            if i >= 4 {
                long.push((path, query));
            }
        }
        assert_eq!(keys.verified.len(), 8);
        let later = T0 + 2_000;
        let (path, query) = presigned("later.bin", later, 60);
        assert!(check(&keys, &get, &path, &query, &h, later).1.is_ok());
        assert_eq!(keys.verified.len(), 5);
        for (path, query) in &long {
            assert!(check(&keys, &get, path, query, &h, later).0);
        }
    }

    #[test]
    fn encoding_rules() {
        assert_eq!(uri_encode("/a b/$next:x", false), "/a%20b/%24next%3Ax");
        assert_eq!(uri_encode("a/b", true), "a%2Fb");
        assert_eq!(percent_decode("a%3Ab%2"), "a:b%2");
        assert_eq!(normalize_path("/a/./b/../c"), "/a/c");
        assert_eq!(
            query_pairs("a=1&b=x%20y&a=2"),
            vec![
                ("a".into(), "1".into()),
                ("b".into(), "x y".into()),
                ("a".into(), "2".into())
            ]
        );
    }
}
