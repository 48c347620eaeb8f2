//! Request bodies: read once, decoded (aws-chunked) if needed, hashed on the way
//! (MD5 for the ETag, SHA-256 when the client signed the payload hash, and the flexible
//! checksum the client asked for), written to a spool file (objects, parts) or memory
//! (small XML documents), and verified before anything is stored.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use futures::StreamExt;
use md5::Md5;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tokio::io::AsyncWriteExt;

use super::checksum::{self, Algorithm};
use super::chunked::{ChunkError, ChunkedDecoder};
use super::{Ctx, S3Error};
use crate::store::StoredChecksum;

/// The largest object (or part) a single request may carry: 5 GiB, as S3.
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// The largest XML request document accepted.
pub const MAX_XML_BODY: u64 = 4 * 1024 * 1024;

/// How the client protected the payload (from `x-amz-content-sha256`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The body's SHA-256 was signed.
    Signed([u8; 32]),
    Unsigned,
    /// aws-chunked body with unsigned chunks and (optional) trailers.
    UnsignedTrailer,
}

impl Payload {
    pub fn from_hash(hash: &str) -> Result<Payload, S3Error> {
        match hash {
            crate::auth::UNSIGNED_PAYLOAD => Ok(Payload::Unsigned),
            "STREAMING-UNSIGNED-PAYLOAD-TRAILER" => Ok(Payload::UnsignedTrailer),
            h if h.starts_with("STREAMING-") => Err(S3Error::not_implemented(format!(
                "Updraft does not accept signed chunked uploads ({h}); use UNSIGNED-PAYLOAD, \
                 STREAMING-UNSIGNED-PAYLOAD-TRAILER or a signed SHA-256 payload hash"
            ))),
            h => {
                let mut raw = [0u8; 32];
                hex::decode_to_slice(h, &mut raw).map_err(|_| {
                    S3Error::invalid_argument(
                        "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, \
                         STREAMING-UNSIGNED-PAYLOAD-TRAILER, or a valid sha256 value.",
                    )
                })?;
                Ok(Payload::Signed(raw))
            }
        }
    }
}

/// What the request says about a flexible checksum.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChecksumSpec {
    pub algorithm: Option<Algorithm>,
    /// The value from an `x-amz-checksum-*` header.
    pub expected: Option<Vec<u8>>,
    /// The value comes in a trailer instead.
    pub trailer: bool,
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Reads `x-amz-checksum-<alg>`, `x-amz-trailer` and `x-amz-sdk-checksum-algorithm`.
pub fn checksum_spec(headers: &HeaderMap, payload: &Payload) -> Result<ChecksumSpec, S3Error> {
    let mut spec = ChecksumSpec::default();
    for alg in Algorithm::ALL {
        let Some(v) = headers.get(alg.header()) else {
            continue;
        };
        if spec.algorithm.is_some() {
            return Err(S3Error::invalid_request(
                "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.",
            ));
        }
        let value = v.to_str().ok().and_then(|s| alg.decode(s)).ok_or_else(|| {
            S3Error::invalid_request(format!("Value for {} header is invalid.", alg.header()))
        })?;
        spec.algorithm = Some(alg);
        spec.expected = Some(value);
    }
    if let Some(t) = header(headers, "x-amz-trailer") {
        let alg = t
            .trim()
            .strip_prefix("x-amz-checksum-")
            .and_then(Algorithm::parse)
            .ok_or_else(|| {
                S3Error::invalid_request(format!("The trailer '{t}' is not supported."))
            })?;
        if *payload != Payload::UnsignedTrailer {
            return Err(S3Error::invalid_request(
                "x-amz-trailer requires x-amz-content-sha256: STREAMING-UNSIGNED-PAYLOAD-TRAILER",
            ));
        }
        if spec.algorithm.is_some() {
            return Err(S3Error::invalid_request(
                "Expecting a single x-amz-checksum- header. Multiple checksum Types are not allowed.",
            ));
        }
        spec.algorithm = Some(alg);
        spec.trailer = true;
    }
    if let Some(s) = header(headers, "x-amz-sdk-checksum-algorithm") {
        let alg = Algorithm::parse(s).ok_or_else(|| {
            S3Error::invalid_request(format!("Checksum algorithm '{s}' is not supported."))
        })?;
        match spec.algorithm {
            None => spec.algorithm = Some(alg),
            Some(a) if a == alg => {}
            Some(a) => {
                return Err(S3Error::invalid_request(format!(
                    "Value for x-amz-sdk-checksum-algorithm header is invalid: {} does not match {}",
                    alg.upper(),
                    a.upper()
                )));
            }
        }
    }
    Ok(spec)
}

/// A body that was read completely and passed every integrity check.
#[derive(Debug, Clone)]
pub struct Verified {
    pub len: u64,
    pub md5: [u8; 16],
    pub checksum: Option<(Algorithm, Vec<u8>)>,
}

impl Verified {
    /// The quoted hex MD5, as S3 answers it.
    pub fn etag(&self) -> String {
        format!("\"{}\"", hex::encode(self.md5))
    }

    pub fn stored_checksum(&self) -> Option<StoredChecksum> {
        self.checksum.as_ref().map(|(alg, raw)| StoredChecksum {
            algorithm: alg.name().to_owned(),
            value: checksum::b64(raw),
        })
    }
}

/// A spooled body on disk; the file is removed when this is dropped.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
}

impl Spool {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove spool file");
        }
    }
}

enum Sink {
    File(tokio::io::BufWriter<tokio::fs::File>),
    Memory(Vec<u8>),
}

impl Sink {
    async fn write(&mut self, data: &[u8]) -> Result<(), S3Error> {
        match self {
            Sink::File(f) => f.write_all(data).await.map_err(S3Error::internal),
            Sink::Memory(v) => {
                v.extend_from_slice(data);
                Ok(())
            }
        }
    }
}

fn entity_too_large(max: u64) -> S3Error {
    S3Error::new(
        StatusCode::BAD_REQUEST,
        "EntityTooLarge",
        format!("Your proposed upload exceeds the maximum allowed size of {max} bytes"),
    )
}

fn incomplete(detail: impl std::fmt::Display) -> S3Error {
    S3Error::new(
        StatusCode::BAD_REQUEST,
        "IncompleteBody",
        format!("The request body terminated unexpectedly: {detail}"),
    )
}

impl From<ChunkError> for S3Error {
    fn from(e: ChunkError) -> Self {
        match e {
            ChunkError::Truncated => incomplete(e),
            ChunkError::MalformedTrailer(_) => S3Error::new(
                StatusCode::BAD_REQUEST,
                "MalformedTrailerError",
                format!("The request contained trailing data that was not well-formed: {e}"),
            ),
            e => S3Error::invalid_request(e.to_string()),
        }
    }
}

fn declared_len(headers: &HeaderMap, name: &str) -> Result<Option<u64>, S3Error> {
    header(headers, name)
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| S3Error::invalid_argument(format!("Invalid {name} header '{v}'")))
        })
        .transpose()
}

/// How `x-amz-checksum-*` headers relate to a body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flexible {
    /// They describe this body; `Some` names an algorithm to compute even if the
    /// request names none (a multipart upload's), and a request naming another one is
    /// refused.
    Body(Option<Algorithm>),
    /// They describe something else (CompleteMultipartUpload's object checksum).
    NotBody,
}

/// Reads the whole body into `sink`, then checks it against every hash the client gave.
async fn ingest(
    ctx: &Ctx<'_>,
    body: Body,
    sink: &mut Sink,
    max: u64,
    flexible: Flexible,
) -> Result<Verified, S3Error> {
    let payload = Payload::from_hash(&ctx.principal.payload_hash)?;
    let (spec, want) = match flexible {
        Flexible::Body(want) => (checksum_spec(&ctx.headers, &payload)?, want),
        Flexible::NotBody => (ChecksumSpec::default(), None),
    };
    if let (Some(w), Some(a)) = (want, spec.algorithm)
        && w != a
    {
        return Err(S3Error::invalid_request(format!(
            "Checksum Type mismatch occurred, expected checksum Type: {}, actual checksum Type: {}",
            w.name(),
            a.name()
        )));
    }
    let chunked = payload == Payload::UnsignedTrailer;
    let decoded_len = declared_len(&ctx.headers, "x-amz-decoded-content-length")?;
    let announced = if chunked {
        decoded_len
    } else {
        declared_len(&ctx.headers, "content-length")?
    };
    if announced.is_some_and(|n| n > max) {
        return Err(entity_too_large(max));
    }
    let content_md5 = header(&ctx.headers, "content-md5")
        .map(|v| {
            B64.decode(v.trim())
                .ok()
                .filter(|d| d.len() == 16)
                .ok_or_else(|| {
                    S3Error::new(
                        StatusCode::BAD_REQUEST,
                        "InvalidDigest",
                        "The Content-MD5 you specified was invalid.",
                    )
                })
        })
        .transpose()?;

    let algorithm = spec.algorithm.or(want);
    let mut hasher = algorithm.map(Algorithm::hasher);
    let mut md5 = Md5::new();
    let mut sha = matches!(payload, Payload::Signed(_)).then(Sha256::new);
    let mut decoder = chunked.then(ChunkedDecoder::new);
    let mut decoded = Vec::new();
    let mut len = 0u64;
    let mut stream = body.into_data_stream();
    while let Some(frame) = stream.next().await {
        let data = frame.map_err(incomplete)?;
        if let Some(s) = sha.as_mut() {
            s.update(&data);
        }
        let piece: &[u8] = match decoder.as_mut() {
            Some(d) => {
                decoded.clear();
                d.feed(&data, &mut decoded)?;
                &decoded
            }
            None => &data,
        };
        len += piece.len() as u64;
        if len > max {
            return Err(entity_too_large(max));
        }
        md5.update(piece);
        if let Some(h) = hasher.as_mut() {
            h.update(piece);
        }
        sink.write(piece).await?;
    }
    let trailers = decoder.map(ChunkedDecoder::finish).transpose()?;
    if chunked && decoded_len.is_some_and(|n| n != len) {
        return Err(incomplete(format!(
            "received {len} bytes but x-amz-decoded-content-length announced {}",
            decoded_len.unwrap_or(0)
        )));
    }

    if let (Payload::Signed(expected), Some(s)) = (&payload, sha)
        && s.finalize().as_slice() != expected.as_slice()
    {
        return Err(S3Error::new(
            StatusCode::BAD_REQUEST,
            "XAmzContentSHA256Mismatch",
            "The provided 'x-amz-content-sha256' header does not match what was computed.",
        ));
    }
    let md5: [u8; 16] = md5.finalize().into();
    if content_md5.is_some_and(|d| d != md5) {
        return Err(S3Error::new(
            StatusCode::BAD_REQUEST,
            "BadDigest",
            "The Content-MD5 you specified did not match what we received.",
        ));
    }
    let checksum = match (algorithm, hasher) {
        (Some(alg), Some(h)) => {
            let actual = h.finalize();
            let expected = if spec.trailer {
                let name = alg.header();
                let value = trailers
                    .as_ref()
                    .and_then(|t| t.iter().find(|(n, _)| n == name))
                    .map(|(_, v)| v.as_str())
                    .ok_or_else(|| {
                        S3Error::new(
                            StatusCode::BAD_REQUEST,
                            "MalformedTrailerError",
                            format!("The request declared the trailer {name} but did not send it."),
                        )
                    })?;
                Some(alg.decode(value).ok_or_else(|| {
                    S3Error::invalid_request(format!(
                        "Value for {name} trailing header is invalid."
                    ))
                })?)
            } else {
                spec.expected
            };
            if expected.is_some_and(|e| e != actual) {
                return Err(S3Error::new(
                    StatusCode::BAD_REQUEST,
                    "BadDigest",
                    format!(
                        "The {} you specified did not match the calculated checksum.",
                        alg.upper()
                    ),
                ));
            }
            Some((alg, actual))
        }
        _ => None,
    };
    Ok(Verified { len, md5, checksum })
}

/// Spools an object or part body to a file in the spool directory and verifies it.
pub async fn spool(
    ctx: &Ctx<'_>,
    body: Body,
    max: u64,
    want: Option<Algorithm>,
) -> Result<(Spool, Verified), S3Error> {
    let spool = Spool {
        path: ctx
            .state
            .spool_dir
            .join(format!("{}.body", uuid::Uuid::new_v4().simple())),
    };
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(spool.path())
        .await
        .map_err(S3Error::internal)?;
    let mut sink = Sink::File(tokio::io::BufWriter::with_capacity(1024 * 1024, file));
    let verified = ingest(ctx, body, &mut sink, max, Flexible::Body(want)).await?;
    if let Sink::File(mut f) = sink {
        f.flush().await.map_err(S3Error::internal)?;
    }
    Ok((spool, verified))
}

/// Reads a small request document (XML) into memory and verifies it.
pub async fn read_small(ctx: &Ctx<'_>, body: Body, flexible: Flexible) -> Result<Bytes, S3Error> {
    let mut sink = Sink::Memory(Vec::new());
    ingest(ctx, body, &mut sink, MAX_XML_BODY, flexible).await?;
    match sink {
        Sink::Memory(v) => Ok(Bytes::from(v)),
        Sink::File(_) => Err(S3Error::internal("small body was not read into memory")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn payload_modes() {
        assert_eq!(
            Payload::from_hash("UNSIGNED-PAYLOAD").ok(),
            Some(Payload::Unsigned)
        );
        assert_eq!(
            Payload::from_hash("STREAMING-UNSIGNED-PAYLOAD-TRAILER").ok(),
            Some(Payload::UnsignedTrailer)
        );
        assert_eq!(
            Payload::from_hash("STREAMING-AWS4-HMAC-SHA256-PAYLOAD")
                .map_err(|e| e.code)
                .err(),
            Some("NotImplemented")
        );
        let empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(matches!(Payload::from_hash(empty), Ok(Payload::Signed(_))));
        assert_eq!(
            Payload::from_hash("nope").map_err(|e| e.code).err(),
            Some("InvalidArgument")
        );
    }

    #[test]
    fn checksum_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-amz-checksum-crc32", HeaderValue::from_static("DUoRhQ=="));
        let spec = checksum_spec(&h, &Payload::Unsigned).expect("valid");
        assert_eq!(spec.algorithm, Some(Algorithm::Crc32));
        assert_eq!(spec.expected, Some(vec![0x0d, 0x4a, 0x11, 0x85]));
        h.insert("x-amz-checksum-sha1", HeaderValue::from_static("AAAA"));
        assert!(checksum_spec(&h, &Payload::Unsigned).is_err());

        let mut h = HeaderMap::new();
        h.insert(
            "x-amz-trailer",
            HeaderValue::from_static("x-amz-checksum-crc64nvme"),
        );
        assert!(checksum_spec(&h, &Payload::Unsigned).is_err());
        let spec = checksum_spec(&h, &Payload::UnsignedTrailer).expect("valid");
        assert_eq!(spec.algorithm, Some(Algorithm::Crc64Nvme));
        assert!(spec.trailer && spec.expected.is_none());
        h.insert(
            "x-amz-sdk-checksum-algorithm",
            HeaderValue::from_static("SHA256"),
        );
        assert!(checksum_spec(&h, &Payload::UnsignedTrailer).is_err());

        let mut h = HeaderMap::new();
        h.insert("x-amz-checksum-crc32", HeaderValue::from_static("bad"));
        assert!(checksum_spec(&h, &Payload::Unsigned).is_err());
    }
}
