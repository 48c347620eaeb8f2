//! MQTT-based file delivery (Streams): the messages and their semantics (data-plane reference §2).
//!
//! Requests arrive on `…/streams/{s}/get/{fmt}` and `…/describe/{fmt}`; the
//! service answers one message per block on `…/data/{fmt}`, the stream
//! description on `…/description/{fmt}` and errors on `…/rejected/{fmt}`.
//! Every message exists in a JSON and a CBOR form with the same one-letter keys;
//! byte strings are CBOR byte strings, and in JSON a hex string (bitmap `b`)
//! or base64 (block payload `p`).
//!
//! Decoding is strict about types and ranges and never trusts a length from the
//! wire. When a key appears twice in one map, the last value wins (in both
//! formats).

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;
use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use crate::cbor::{CborError, Kind, Reader, Writer};
use crate::topics::Format;

/// Smallest block size `l` a request may ask for.
pub const MIN_BLOCK_SIZE: u64 = 256;
/// Largest block size `l` a request may ask for.
pub const MAX_BLOCK_SIZE: u64 = 131_072;
/// Total payload one GetStream request may yield; more blocks need more requests.
pub const MAX_RESPONSE_BYTES: u64 = 131_072;
/// Largest block offset `o`.
pub const MAX_BLOCK_OFFSET: u64 = 98_304;
/// Largest block count `n`.
pub const MAX_BLOCK_COUNT: u64 = 98_304;
/// Largest bitmap `b` in bytes (the limit is "less than 12288").
pub const MAX_BITMAP_BYTES: usize = 12_287;
/// Largest client token `c` in bytes.
pub const MAX_CLIENT_TOKEN_BYTES: usize = 64;
/// Largest stream file id `f`.
pub const MAX_FILE_ID: u64 = 255;

/// The error codes of `…/streams/{s}/rejected/{fmt}` (reference §2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectCode {
    InvalidTopic,
    InvalidJson,
    InvalidCbor,
    InvalidRequest,
    Unauthorized,
    BlockSizeOutOfBounds,
    OffsetOutOfBounds,
    BlockCountLimitExceeded,
    BlockBitmapLimitExceeded,
    ResourceNotFound,
    VersionMismatch,
    ETagMismatch,
    InternalError,
}

impl RejectCode {
    /// Every code, in declaration order.
    pub const ALL: &'static [RejectCode] = &[
        RejectCode::InvalidTopic,
        RejectCode::InvalidJson,
        RejectCode::InvalidCbor,
        RejectCode::InvalidRequest,
        RejectCode::Unauthorized,
        RejectCode::BlockSizeOutOfBounds,
        RejectCode::OffsetOutOfBounds,
        RejectCode::BlockCountLimitExceeded,
        RejectCode::BlockBitmapLimitExceeded,
        RejectCode::ResourceNotFound,
        RejectCode::VersionMismatch,
        RejectCode::ETagMismatch,
        RejectCode::InternalError,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::InvalidTopic => "InvalidTopic",
            RejectCode::InvalidJson => "InvalidJson",
            RejectCode::InvalidCbor => "InvalidCbor",
            RejectCode::InvalidRequest => "InvalidRequest",
            RejectCode::Unauthorized => "Unauthorized",
            RejectCode::BlockSizeOutOfBounds => "BlockSizeOutOfBounds",
            RejectCode::OffsetOutOfBounds => "OffsetOutOfBounds",
            RejectCode::BlockCountLimitExceeded => "BlockCountLimitExceeded",
            RejectCode::BlockBitmapLimitExceeded => "BlockBitmapLimitExceeded",
            RejectCode::ResourceNotFound => "ResourceNotFound",
            RejectCode::VersionMismatch => "VersionMismatch",
            RejectCode::ETagMismatch => "ETagMismatch",
            RejectCode::InternalError => "InternalError",
        }
    }

    /// The code for a payload that cannot be decoded in `format`.
    pub fn undecodable(format: Format) -> Self {
        match format {
            Format::Json => RejectCode::InvalidJson,
            Format::Cbor => RejectCode::InvalidCbor,
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RejectCode {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        RejectCode::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .ok_or(())
    }
}

/// A refused Streams request: what goes on `…/rejected/{fmt}`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{code}: {message}")]
pub struct StreamError {
    pub code: RejectCode,
    pub message: String,
    /// The request's client token, echoed as `c`; `None` when there was none or it was invalid.
    pub client_token: Option<String>,
}

impl StreamError {
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        StreamError {
            code,
            message: message.into(),
            client_token: None,
        }
    }

    /// Attaches the token to echo; an over-long token is not echoed.
    pub fn with_client_token(mut self, token: Option<&str>) -> Self {
        self.client_token = token
            .filter(|t| t.len() <= MAX_CLIENT_TOKEN_BYTES)
            .map(str::to_owned);
        self
    }

    /// The rejected body `{o, m, c?}` as an indefinite-length CBOR map.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(32 + self.message.len());
        w.begin_map()
            .text("o")
            .text(self.code.as_str())
            .text("m")
            .text(&self.message);
        if let Some(c) = &self.client_token {
            w.text("c").text(c);
        }
        w.end();
        w.into_bytes()
    }

    /// The rejected body `{"o","m","c"?}` as JSON.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            o: &'a str,
            m: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            c: Option<&'a str>,
        }
        to_json_bytes(&Body {
            o: self.code.as_str(),
            m: &self.message,
            c: self.client_token.as_deref(),
        })
    }

    pub fn encode(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Json => self.to_json(),
            Format::Cbor => self.to_cbor(),
        }
    }
}

/// A decoded rejected message, as a device sees it.
///
/// Accepts the short keys `o`, `m`, `c` and the legacy long ones `code`,
/// `message`, `clientToken` (reference §2.7); the short key wins when both appear.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The wire code; see [`Rejection::reject_code`].
    pub code: String,
    pub message: String,
    pub client_token: Option<String>,
}

impl Rejection {
    pub fn decode(format: Format, payload: &[u8]) -> Result<Self, StreamError> {
        let obj = Object::parse(format, payload)?;
        let text = |short: &str, long: &str| -> Result<Option<String>, StreamError> {
            match obj.text(short).map_err(invalid_request)? {
                Some(v) => Ok(Some(v.to_owned())),
                None => Ok(obj.text(long).map_err(invalid_request)?.map(str::to_owned)),
            }
        };
        Ok(Rejection {
            code: text("o", "code")?.ok_or_else(|| invalid_request("missing 'o'"))?,
            message: text("m", "message")?.unwrap_or_default(),
            client_token: text("c", "clientToken")?,
        })
    }

    /// The code, if it is one of the documented ones.
    pub fn reject_code(&self) -> Option<RejectCode> {
        self.code.parse().ok()
    }
}

/// A GetStream request (`…/get/{fmt}`, reference §2.3).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GetStreamRequest {
    /// `c`: echoed in every response.
    pub client_token: Option<String>,
    /// `s`: the stream version the device expects.
    pub stream_version: Option<u64>,
    /// `f`: the stream file id.
    pub file_id: u64,
    /// `l`: block size in bytes.
    pub block_size: u64,
    /// `o`: first block (in blocks), default 0.
    pub offset: u64,
    /// `n`: number of blocks from `o`, or with a bitmap the cap on blocks returned.
    pub number_of_blocks: Option<u64>,
    /// `b`: bit k (byte k/8, mask `1 << (k % 8)`) asks for block `o + k`.
    pub bitmap: Option<Vec<u8>>,
}

impl GetStreamRequest {
    /// Decodes and validates a request in the topic's format.
    pub fn decode(format: Format, payload: &[u8]) -> Result<Self, StreamError> {
        let obj = Object::parse(format, payload)?;
        let token = obj.client_token()?;
        let tok = token.as_deref();
        let bad = |message: String| invalid_request(message).with_client_token(tok);
        let required = |key: &str| -> Result<u64, StreamError> {
            obj.uint(key)
                .map_err(bad)?
                .ok_or_else(|| bad(format!("missing '{key}'")))
        };
        let req = GetStreamRequest {
            stream_version: obj.uint("s").map_err(bad)?,
            file_id: required("f")?,
            block_size: required("l")?,
            offset: obj.uint("o").map_err(bad)?.unwrap_or(0),
            number_of_blocks: obj.uint("n").map_err(bad)?,
            bitmap: obj.bitmap(format, tok)?,
            client_token: token.clone(),
        };
        req.validate()?;
        Ok(req)
    }

    /// Checks the documented limits (reference §2.6), mapping each to its rejected code.
    pub fn validate(&self) -> Result<(), StreamError> {
        let token = self.client_token.as_deref();
        if let Some(t) = token
            && t.len() > MAX_CLIENT_TOKEN_BYTES
        {
            return Err(invalid_request(format!(
                "the client token is {} bytes, more than {MAX_CLIENT_TOKEN_BYTES}",
                t.len()
            )));
        }
        let fail =
            |code, message: String| Err(StreamError::new(code, message).with_client_token(token));
        if self.file_id > MAX_FILE_ID {
            return fail(
                RejectCode::InvalidRequest,
                format!("file id {} is outside 0..{MAX_FILE_ID}", self.file_id),
            );
        }
        if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&self.block_size) {
            return fail(
                RejectCode::BlockSizeOutOfBounds,
                format!(
                    "block size {} is outside {MIN_BLOCK_SIZE}..{MAX_BLOCK_SIZE}",
                    self.block_size
                ),
            );
        }
        if self.offset > MAX_BLOCK_OFFSET {
            return fail(
                RejectCode::OffsetOutOfBounds,
                format!(
                    "block offset {} is outside 0..{MAX_BLOCK_OFFSET}",
                    self.offset
                ),
            );
        }
        if let Some(n) = self.number_of_blocks
            && n > MAX_BLOCK_COUNT
        {
            return fail(
                RejectCode::BlockCountLimitExceeded,
                format!("block count {n} is outside 0..{MAX_BLOCK_COUNT}"),
            );
        }
        if let Some(b) = &self.bitmap
            && b.len() > MAX_BITMAP_BYTES
        {
            return fail(
                RejectCode::BlockBitmapLimitExceeded,
                format!(
                    "the bitmap is {} bytes, the limit is {MAX_BITMAP_BYTES}",
                    b.len()
                ),
            );
        }
        Ok(())
    }

    /// `VersionMismatch` when the request names a stream version other than `current`.
    pub fn check_version(&self, current: u64) -> Result<(), StreamError> {
        match self.stream_version {
            Some(v) if v != current => Err(StreamError::new(
                RejectCode::VersionMismatch,
                format!("stream version {v} requested, the current version is {current}"),
            )
            .with_client_token(self.client_token.as_deref())),
            _ => Ok(()),
        }
    }

    /// The most blocks one answer may carry: `n` (default 131072 / `l`), capped at
    /// `floor(131072 / l)` so the payloads never exceed [`MAX_RESPONSE_BYTES`].
    pub fn max_blocks(&self) -> u64 {
        let budget = MAX_RESPONSE_BYTES / self.block_size.max(1);
        self.number_of_blocks.map_or(budget, |n| n.min(budget))
    }

    /// The request as a definite-length CBOR map, keys in the FreeRTOS agent's order
    /// (`c`, then `s` if set, `f l o b n`).
    pub fn to_cbor(&self) -> Vec<u8> {
        let pairs = 3
            + u64::from(self.client_token.is_some())
            + u64::from(self.stream_version.is_some())
            + u64::from(self.number_of_blocks.is_some())
            + u64::from(self.bitmap.is_some());
        let mut w = Writer::with_capacity(48 + self.bitmap.as_ref().map_or(0, Vec::len));
        w.map(pairs);
        if let Some(c) = &self.client_token {
            w.text("c").text(c);
        }
        if let Some(s) = self.stream_version {
            w.text("s").uint(s);
        }
        w.text("f")
            .uint(self.file_id)
            .text("l")
            .uint(self.block_size)
            .text("o")
            .uint(self.offset);
        if let Some(b) = &self.bitmap {
            w.text("b").bytes(b);
        }
        if let Some(n) = self.number_of_blocks {
            w.text("n").uint(n);
        }
        w.into_bytes()
    }

    /// The request as JSON, the bitmap as a `0x`-prefixed hex string.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            c: Option<&'a str>,
            #[serde(skip_serializing_if = "Option::is_none")]
            s: Option<u64>,
            f: u64,
            l: u64,
            o: u64,
            #[serde(skip_serializing_if = "Option::is_none")]
            b: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            n: Option<u64>,
        }
        to_json_bytes(&Body {
            c: self.client_token.as_deref(),
            s: self.stream_version,
            f: self.file_id,
            l: self.block_size,
            o: self.offset,
            b: self
                .bitmap
                .as_deref()
                .map(|b| format!("0x{}", hex_encode(b))),
            n: self.number_of_blocks,
        })
    }

    pub fn encode(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Json => self.to_json(),
            Format::Cbor => self.to_cbor(),
        }
    }
}

/// How many `block_size` blocks a file of `file_size` bytes has (the last may be short).
pub fn block_count(file_size: u64, block_size: u64) -> u64 {
    if block_size == 0 {
        0
    } else {
        file_size.div_ceil(block_size)
    }
}

/// The bytes of block `block_id`: `block_size` bytes, the last block the remainder;
/// `None` past the end of the file.
pub fn block_range(file_size: u64, block_size: u64, block_id: u64) -> Option<Range<u64>> {
    let start = block_id.checked_mul(block_size)?;
    if block_size == 0 || start >= file_size {
        return None;
    }
    Some(start..file_size.min(start.saturating_add(block_size)))
}

/// Which blocks (absolute, 0-based, ascending) answer `req` for a file of `file_size` bytes.
///
/// With a bitmap, bit k asks for block `o + k`; without one, blocks `o, o+1, …`
/// are asked for. Blocks past the end of the file are dropped, and at most
/// [`GetStreamRequest::max_blocks`] are returned, so the payloads never exceed
/// 128 KiB; the device asks again for the rest.
///
/// Errors: the request's own limits (see [`GetStreamRequest::validate`]);
/// `OffsetOutOfBounds` when `o` is at or past the end of the file;
/// `ResourceNotFound` when the bitmap asks only for blocks past the end.
/// A request that asks for nothing (`n = 0`, an all-zero bitmap) selects no block.
pub fn select_blocks(file_size: u64, req: &GetStreamRequest) -> Result<Vec<u64>, StreamError> {
    req.validate()?;
    let token = req.client_token.as_deref();
    let blocks = block_count(file_size, req.block_size);
    if req.offset >= blocks {
        return Err(StreamError::new(
            RejectCode::OffsetOutOfBounds,
            format!(
                "block offset {} is past the end of the file ({blocks} blocks of {} bytes)",
                req.offset, req.block_size
            ),
        )
        .with_client_token(token));
    }
    let cap = req.max_blocks();
    let Some(bitmap) = &req.bitmap else {
        let end = req.offset.saturating_add(cap).min(blocks);
        return Ok((req.offset..end).collect());
    };
    let mut out = Vec::new();
    let mut requested = false;
    'bytes: for (j, byte) in bitmap.iter().enumerate() {
        for bit in 0..8u64 {
            if byte & (1 << bit) == 0 {
                continue;
            }
            requested = true;
            let block = req.offset + (j as u64) * 8 + bit;
            if block >= blocks || out.len() as u64 >= cap {
                break 'bytes;
            }
            out.push(block);
        }
    }
    if out.is_empty() && requested && cap > 0 {
        return Err(StreamError::new(
            RejectCode::ResourceNotFound,
            format!("no requested block exists: the file has {blocks} blocks"),
        )
        .with_client_token(token));
    }
    Ok(out)
}

/// One data block (`…/data/{fmt}`, reference §2.4), for encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockResponse<'a> {
    /// `c`, present when the request carried a token.
    pub client_token: Option<&'a str>,
    /// `f`
    pub file_id: u64,
    /// `i`: absolute block index within the file.
    pub block_id: u64,
    /// `p`; `l` is its length.
    pub payload: &'a [u8],
}

impl BlockResponse<'_> {
    /// An indefinite-length map, keys `c` (if any), `f`, `i`, `l`, `p` — the
    /// shape of the captured AWS response.
    pub fn to_cbor(&self) -> Vec<u8> {
        let token_len = self.client_token.map_or(0, str::len);
        let mut w = Writer::with_capacity(self.payload.len() + token_len + 48);
        w.begin_map();
        if let Some(c) = self.client_token {
            w.text("c").text(c);
        }
        w.text("f")
            .uint(self.file_id)
            .text("i")
            .uint(self.block_id)
            .text("l")
            .uint(self.payload.len() as u64)
            .text("p")
            .bytes(self.payload)
            .end();
        w.into_bytes()
    }

    /// `{"c"?, "f", "i", "l", "p"}` with `p` in base64.
    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            c: Option<&'a str>,
            f: u64,
            i: u64,
            l: u64,
            p: String,
        }
        to_json_bytes(&Body {
            c: self.client_token,
            f: self.file_id,
            i: self.block_id,
            l: self.payload.len() as u64,
            p: base64_encode(self.payload),
        })
    }

    pub fn encode(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Json => self.to_json(),
            Format::Cbor => self.to_cbor(),
        }
    }
}

/// A decoded data block, as a device sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataBlock {
    pub client_token: Option<String>,
    pub file_id: u64,
    pub block_id: u64,
    pub payload: Vec<u8>,
}

impl DataBlock {
    /// Decodes a block message; `l` must equal the payload length.
    pub fn decode(format: Format, payload: &[u8]) -> Result<Self, StreamError> {
        let obj = Object::parse(format, payload)?;
        let token = obj.client_token()?;
        let tok = token.as_deref();
        let bad = |message: String| invalid_request(message).with_client_token(tok);
        let required = |key: &str| -> Result<u64, StreamError> {
            obj.uint(key)
                .map_err(bad)?
                .ok_or_else(|| bad(format!("missing '{key}'")))
        };
        let file_id = required("f")?;
        let block_id = required("i")?;
        let len = required("l")?;
        let data = match (obj.get("p"), format) {
            (Some(Field::Bytes(b)), Format::Cbor) => b.to_vec(),
            (Some(Field::Text(t)), Format::Json) => {
                base64_decode(t).ok_or_else(|| bad("'p' is not valid base64".into()))?
            }
            (None, _) => return Err(bad("missing 'p'".into())),
            (Some(other), _) => {
                return Err(bad(format!(
                    "'p' must be {}, found {}",
                    bytes_kind(format, "base64"),
                    other.kind()
                )));
            }
        };
        if data.len() as u64 != len {
            return Err(bad(format!(
                "'l' is {len} but the payload has {} bytes",
                data.len()
            )));
        }
        Ok(DataBlock {
            client_token: token.clone(),
            file_id,
            block_id,
            payload: data,
        })
    }

    /// The same block, for re-encoding.
    pub fn as_response(&self) -> BlockResponse<'_> {
        BlockResponse {
            client_token: self.client_token.as_deref(),
            file_id: self.file_id,
            block_id: self.block_id,
            payload: &self.payload,
        }
    }
}

/// A DescribeStream request (`…/describe/{fmt}`): just an optional token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DescribeStreamRequest {
    pub client_token: Option<String>,
}

impl DescribeStreamRequest {
    /// Decodes a request; an empty payload counts as no fields.
    pub fn decode(format: Format, payload: &[u8]) -> Result<Self, StreamError> {
        let obj = Object::parse(format, payload)?;
        Ok(DescribeStreamRequest {
            client_token: obj.client_token()?,
        })
    }

    pub fn to_cbor(&self) -> Vec<u8> {
        let mut w = Writer::new();
        match &self.client_token {
            Some(c) => w.map(1).text("c").text(c),
            None => w.map(0),
        };
        w.into_bytes()
    }

    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            c: Option<&'a str>,
        }
        to_json_bytes(&Body {
            c: self.client_token.as_deref(),
        })
    }

    pub fn encode(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Json => self.to_json(),
            Format::Cbor => self.to_cbor(),
        }
    }
}

/// One file of a stream, as listed in a DescribeStream response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StreamFile {
    /// `f`
    #[serde(rename = "f")]
    pub file_id: u64,
    /// `z`: size in bytes.
    #[serde(rename = "z")]
    pub size: u64,
}

/// A DescribeStream response (`…/description/{fmt}`, reference §2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DescribeStreamResponse {
    /// `c`
    pub client_token: Option<String>,
    /// `s`
    pub stream_version: u64,
    /// `d`
    pub description: String,
    /// `r`
    pub files: Vec<StreamFile>,
}

impl DescribeStreamResponse {
    /// Indefinite-length map and arrays (like the AWS block response), keys `c? s d r`.
    pub fn to_cbor(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(32 + self.description.len() + 16 * self.files.len());
        w.begin_map();
        if let Some(c) = &self.client_token {
            w.text("c").text(c);
        }
        w.text("s")
            .uint(self.stream_version)
            .text("d")
            .text(&self.description)
            .text("r")
            .begin_array();
        for file in &self.files {
            w.begin_map()
                .text("f")
                .uint(file.file_id)
                .text("z")
                .uint(file.size)
                .end();
        }
        w.end().end();
        w.into_bytes()
    }

    pub fn to_json(&self) -> Vec<u8> {
        #[derive(Serialize)]
        struct Body<'a> {
            #[serde(skip_serializing_if = "Option::is_none")]
            c: Option<&'a str>,
            s: u64,
            d: &'a str,
            r: &'a [StreamFile],
        }
        to_json_bytes(&Body {
            c: self.client_token.as_deref(),
            s: self.stream_version,
            d: &self.description,
            r: &self.files,
        })
    }

    pub fn encode(&self, format: Format) -> Vec<u8> {
        match format {
            Format::Json => self.to_json(),
            Format::Cbor => self.to_cbor(),
        }
    }

    /// Decodes a response; `s` and `r` are required, `d` defaults to empty.
    pub fn decode(format: Format, payload: &[u8]) -> Result<Self, StreamError> {
        let obj = Object::parse(format, payload)?;
        let token = obj.client_token()?;
        let tok = token.as_deref();
        let bad = |message: String| invalid_request(message).with_client_token(tok);
        let stream_version = obj
            .uint("s")
            .map_err(bad)?
            .ok_or_else(|| bad("missing 's'".into()))?;
        let description = obj.text("d").map_err(bad)?.unwrap_or_default().to_owned();
        let items = match obj.get("r") {
            Some(Field::List(items)) => items,
            None => return Err(bad("missing 'r'".into())),
            Some(other) => {
                return Err(bad(format!("'r' must be an array, found {}", other.kind())));
            }
        };
        let mut files = Vec::with_capacity(items.len());
        for item in items {
            let Field::Map(file) = item else {
                return Err(bad(format!(
                    "'r' entries must be maps, found {}",
                    item.kind()
                )));
            };
            let get = |key: &str| -> Result<u64, StreamError> {
                file.uint(key)
                    .map_err(bad)?
                    .ok_or_else(|| bad(format!("missing 'r[].{key}'")))
            };
            files.push(StreamFile {
                file_id: get("f")?,
                size: get("z")?,
            });
        }
        Ok(DescribeStreamResponse {
            client_token: token.clone(),
            stream_version,
            description,
            files,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Format-neutral decoding.

/// The keys any Streams message uses; values under other keys are skipped unread.
const KNOWN_KEYS: &[&str] = &[
    "c",
    "s",
    "f",
    "l",
    "o",
    "n",
    "b",
    "i",
    "p",
    "d",
    "r",
    "z",
    "m",
    "code",
    "message",
    "clientToken",
];

/// A value under a known key, from either format.
#[derive(Debug)]
enum Field<'a> {
    Null,
    Uint(u64),
    Text(Cow<'a, str>),
    Bytes(Cow<'a, [u8]>),
    Map(Object<'a>),
    List(Vec<Field<'a>>),
    /// Anything else, by type name.
    Other(&'static str),
}

impl Field<'_> {
    fn kind(&self) -> &'static str {
        match self {
            Field::Null => "null",
            Field::Uint(_) => "an unsigned integer",
            Field::Text(_) => "a string",
            Field::Bytes(_) => "a byte string",
            Field::Map(_) => "a map",
            Field::List(_) => "an array",
            Field::Other(kind) => kind,
        }
    }
}

/// The known keys of one map; a repeated key replaces the earlier value.
#[derive(Debug, Default)]
struct Object<'a>(Vec<(&'static str, Field<'a>)>);

fn invalid_request(message: impl Into<String>) -> StreamError {
    StreamError::new(RejectCode::InvalidRequest, message)
}

fn bytes_kind(format: Format, json_form: &'static str) -> &'static str {
    match (format, json_form) {
        (Format::Cbor, _) => "a byte string",
        (Format::Json, "hex") => "a hex string",
        (Format::Json, _) => "a base64 string",
    }
}

impl<'a> Object<'a> {
    fn insert(&mut self, key: &str, value: Field<'a>) {
        let Some(known) = KNOWN_KEYS.iter().copied().find(|k| *k == key) else {
            return;
        };
        match self.0.iter_mut().find(|(k, _)| *k == known) {
            Some(slot) => slot.1 = value,
            None => self.0.push((known, value)),
        }
    }

    /// The top-level map of a payload. An empty payload is a map without fields.
    fn parse(format: Format, payload: &'a [u8]) -> Result<Self, StreamError> {
        if payload.is_empty() {
            return Ok(Object::default());
        }
        let undecodable = |e: &dyn fmt::Display| {
            StreamError::new(
                RejectCode::undecodable(format),
                format!(
                    "the payload is not valid {}: {e}",
                    format.as_str().to_uppercase()
                ),
            )
        };
        match format {
            Format::Cbor => {
                Reader::validate(payload).map_err(|e| undecodable(&e))?;
                let mut r = Reader::new(payload);
                if r.peek_kind().map_err(|e| undecodable(&e))? != Kind::Map {
                    return Err(invalid_request("the payload must be a CBOR map"));
                }
                cbor_object(&mut r).map_err(|e| undecodable(&e))
            }
            Format::Json => {
                let value: Value = serde_json::from_slice(payload).map_err(|e| undecodable(&e))?;
                match value {
                    Value::Object(map) => Ok(json_object(map)),
                    _ => Err(invalid_request("the payload must be a JSON object")),
                }
            }
        }
    }

    /// The value under `key`; `null` counts as absent.
    fn get(&self, key: &str) -> Option<&Field<'a>> {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .filter(|v| !matches!(v, Field::Null))
    }

    fn uint(&self, key: &str) -> Result<Option<u64>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Field::Uint(v)) => Ok(Some(*v)),
            Some(other) => Err(format!(
                "'{key}' must be an unsigned integer, found {}",
                other.kind()
            )),
        }
    }

    fn text(&self, key: &str) -> Result<Option<&str>, String> {
        match self.get(key) {
            None => Ok(None),
            Some(Field::Text(t)) => Ok(Some(t)),
            Some(other) => Err(format!("'{key}' must be a string, found {}", other.kind())),
        }
    }

    /// `c`: a string of at most 64 bytes. Errors carry no token (it is the bad part).
    fn client_token(&self) -> Result<Option<String>, StreamError> {
        let token = self.text("c").map_err(invalid_request)?;
        if let Some(t) = token
            && t.len() > MAX_CLIENT_TOKEN_BYTES
        {
            return Err(invalid_request(format!(
                "the client token is {} bytes, more than {MAX_CLIENT_TOKEN_BYTES}",
                t.len()
            )));
        }
        Ok(token.map(str::to_owned))
    }

    /// `b`: a CBOR byte string, or a JSON hex string with or without `0x`.
    fn bitmap(&self, format: Format, token: Option<&str>) -> Result<Option<Vec<u8>>, StreamError> {
        let too_big = |len: usize| {
            StreamError::new(
                RejectCode::BlockBitmapLimitExceeded,
                format!("the bitmap is {len} bytes, the limit is {MAX_BITMAP_BYTES}"),
            )
            .with_client_token(token)
        };
        match (self.get("b"), format) {
            (None, _) => Ok(None),
            (Some(Field::Bytes(b)), Format::Cbor) => {
                if b.len() > MAX_BITMAP_BYTES {
                    return Err(too_big(b.len()));
                }
                Ok(Some(b.to_vec()))
            }
            (Some(Field::Text(t)), Format::Json) => {
                let digits = t
                    .strip_prefix("0x")
                    .or_else(|| t.strip_prefix("0X"))
                    .unwrap_or(t);
                if digits.len() / 2 > MAX_BITMAP_BYTES {
                    return Err(too_big(digits.len() / 2));
                }
                hex_decode(digits).map(Some).ok_or_else(|| {
                    invalid_request("'b' must be an even number of hex digits")
                        .with_client_token(token)
                })
            }
            (Some(other), _) => Err(invalid_request(format!(
                "'b' must be {}, found {}",
                bytes_kind(format, "hex"),
                other.kind()
            ))
            .with_client_token(token)),
        }
    }
}

fn cbor_object<'a>(r: &mut Reader<'a>) -> Result<Object<'a>, CborError> {
    let mut obj = Object::default();
    r.read_map(|r| -> Result<(), CborError> {
        match r.read_key()? {
            Some(key) if KNOWN_KEYS.contains(&&*key) => {
                let value = cbor_field(r)?;
                obj.insert(&key, value);
            }
            _ => r.skip()?,
        }
        Ok(())
    })?;
    Ok(obj)
}

fn cbor_field<'a>(r: &mut Reader<'a>) -> Result<Field<'a>, CborError> {
    Ok(match r.peek_kind()? {
        Kind::Unsigned => Field::Uint(r.read_uint()?),
        Kind::Text => Field::Text(r.read_text()?),
        Kind::Bytes => Field::Bytes(r.read_bytes()?),
        Kind::Map => Field::Map(cbor_object(r)?),
        Kind::Array => {
            let mut items = Vec::new();
            r.read_array(|r| -> Result<(), CborError> {
                items.push(cbor_field(r)?);
                Ok(())
            })?;
            Field::List(items)
        }
        Kind::Null | Kind::Undefined => {
            r.skip()?;
            Field::Null
        }
        kind => {
            r.skip()?;
            Field::Other(kind.name())
        }
    })
}

fn json_object(map: serde_json::Map<String, Value>) -> Object<'static> {
    let mut obj = Object::default();
    for (key, value) in map {
        if KNOWN_KEYS.contains(&key.as_str()) {
            obj.insert(&key, json_field(value));
        }
    }
    obj
}

fn json_field(value: Value) -> Field<'static> {
    match value {
        Value::Null => Field::Null,
        Value::Bool(_) => Field::Other("a boolean"),
        Value::Number(n) => n.as_u64().map_or(
            Field::Other("a number that is not an unsigned integer"),
            Field::Uint,
        ),
        Value::String(s) => Field::Text(Cow::Owned(s)),
        Value::Array(items) => Field::List(items.into_iter().map(json_field).collect()),
        Value::Object(map) => Field::Map(json_object(map)),
    }
}

fn to_json_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings and integers always serialize.
    serde_json::to_vec(value).unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Hex and base64.

fn hex_encode(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    s
}

fn hex_decode(digits: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        char::from(c)
            .to_digit(16)
            .and_then(|d| u8::try_from(d).ok())
    }
    let bytes = digits.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Some((nibble(pair[0])? << 4) | nibble(pair[1])?))
        .collect()
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard-alphabet base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i)) as usize & 0x3f]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Strict standard-alphabet base64 with padding; `None` on any deviation.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        Some(u32::from(v))
    }
    let bytes = s.as_bytes();
    if !bytes.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    let quads = bytes.len() / 4;
    for (q, quad) in bytes.chunks_exact(4).enumerate() {
        let pad = quad.iter().rev().take_while(|c| **c == b'=').count();
        if pad > 2 || (pad > 0 && q + 1 != quads) {
            return None;
        }
        let mut n = 0u32;
        for &c in &quad[..4 - pad] {
            n = (n << 6) | value(c)?;
        }
        n <<= 6 * pad as u32;
        let decoded = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&decoded[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cbor::tests::XorShift;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        hex_decode(&s).expect("hex")
    }

    fn req(
        block_size: u64,
        offset: u64,
        n: Option<u64>,
        bitmap: Option<Vec<u8>>,
    ) -> GetStreamRequest {
        GetStreamRequest {
            block_size,
            offset,
            number_of_blocks: n,
            bitmap,
            ..GetStreamRequest::default()
        }
    }

    fn code<T: fmt::Debug>(r: Result<T, StreamError>) -> RejectCode {
        r.expect_err("should be rejected").code
    }

    fn json(bytes: &[u8]) -> Value {
        serde_json::from_slice(bytes).expect("json")
    }

    // ---- block responses -------------------------------------------------------------------

    #[test]
    fn block_response_cbor_matches_the_aws_capture() {
        let payload = vec![0x5A; 1024];
        let msg = BlockResponse {
            client_token: None,
            file_id: 0,
            block_id: 0,
            payload: &payload,
        }
        .to_cbor();
        let mut expected = hex("BF 61 66 00 61 69 00 61 6C 19 04 00 61 70 59 04 00");
        expected.extend_from_slice(&payload);
        expected.push(0xFF);
        assert_eq!(msg, expected);
        let block = DataBlock::decode(Format::Cbor, &expected).expect("block");
        assert_eq!(block.file_id, 0);
        assert_eq!(block.block_id, 0);
        assert_eq!(block.payload, payload);
        assert_eq!(block.client_token, None);
    }

    #[test]
    fn block_response_cbor_small_with_token() {
        let msg = BlockResponse {
            client_token: Some("rdy"),
            file_id: 1,
            block_id: 300,
            payload: &[1, 2, 3],
        }
        .encode(Format::Cbor);
        assert_eq!(
            msg,
            hex("BF 61 63 63 72 64 79 61 66 01 61 69 19 01 2C 61 6C 03 61 70 43 01 02 03 FF")
        );
        let block = DataBlock::decode(Format::Cbor, &msg).expect("block");
        assert_eq!(block.as_response().to_cbor(), msg);
        assert_eq!(block.client_token.as_deref(), Some("rdy"));
    }

    #[test]
    fn block_response_json() {
        let resp = BlockResponse {
            client_token: Some("tok"),
            file_id: 0,
            block_id: 2,
            payload: &[1, 2, 3, 4],
        };
        assert_eq!(
            String::from_utf8(resp.encode(Format::Json)).expect("utf8"),
            r#"{"c":"tok","f":0,"i":2,"l":4,"p":"AQIDBA=="}"#
        );
        let no_token = BlockResponse {
            client_token: None,
            ..resp
        };
        assert_eq!(
            String::from_utf8(no_token.to_json()).expect("utf8"),
            r#"{"f":0,"i":2,"l":4,"p":"AQIDBA=="}"#
        );
        let block = DataBlock::decode(Format::Json, &resp.to_json()).expect("block");
        assert_eq!(block.as_response(), resp);
    }

    #[test]
    fn data_block_length_must_match() {
        let bad = hex("A4 61 66 00 61 69 00 61 6C 02 61 70 43 01 02 03");
        assert_eq!(
            code(DataBlock::decode(Format::Cbor, &bad)),
            RejectCode::InvalidRequest
        );
        let bad_b64 = br#"{"f":0,"i":0,"l":1,"p":"AQ="}"#;
        assert_eq!(
            code(DataBlock::decode(Format::Json, bad_b64)),
            RejectCode::InvalidRequest
        );
        // A definite map and an indefinite payload are fine too.
        let ok = hex("A4 61 66 00 61 69 05 61 6C 03 61 70 5F 41 01 42 02 03 FF");
        assert_eq!(
            DataBlock::decode(Format::Cbor, &ok).expect("block").payload,
            vec![1, 2, 3]
        );
    }

    #[test]
    fn last_block_is_the_remainder() {
        let size = 10_000;
        assert_eq!(block_count(size, 4096), 3);
        assert_eq!(block_range(size, 4096, 0), Some(0..4096));
        assert_eq!(block_range(size, 4096, 1), Some(4096..8192));
        assert_eq!(block_range(size, 4096, 2), Some(8192..10_000));
        assert_eq!(block_range(size, 4096, 3), None);
        assert_eq!(block_count(8192, 4096), 2);
        assert_eq!(block_range(8192, 4096, 1), Some(4096..8192));
        assert_eq!(block_count(1, 256), 1);
        assert_eq!(block_range(1, 256, 0), Some(0..1));
        assert_eq!(block_count(0, 256), 0);
        assert_eq!(block_range(0, 256, 0), None);
        assert_eq!(block_range(10, 0, 0), None);
        assert_eq!(block_range(u64::MAX, 1 << 20, u64::MAX), None);
        // The response's `l` is the slice length.
        let file: Vec<u8> = (0..size).map(|i| i as u8).collect();
        let range = block_range(size, 4096, 2).expect("range");
        let slice = &file[range.start as usize..range.end as usize];
        let msg = BlockResponse {
            client_token: None,
            file_id: 0,
            block_id: 2,
            payload: slice,
        }
        .to_cbor();
        assert_eq!(
            &msg[..12],
            hex("BF 61 66 00 61 69 02 61 6C 19 07 10").as_slice()
        );
    }

    // ---- request decoding -----------------------------------------------------------------

    #[test]
    fn decodes_the_freertos_cbor_request() {
        // Definite map of 6 in order c f l o b n, as requestFileBlock_Mqtt sends it.
        let mut w = Writer::new();
        w.map(6)
            .text("c")
            .text("rdy")
            .text("f")
            .uint(0)
            .text("l")
            .uint(4096)
            .text("o")
            .uint(0)
            .text("b")
            .bytes(&[0xFF, 0x03])
            .text("n")
            .uint(1);
        let msg = w.into_bytes();
        let r = GetStreamRequest::decode(Format::Cbor, &msg).expect("request");
        assert_eq!(
            r,
            GetStreamRequest {
                client_token: Some("rdy".into()),
                stream_version: None,
                file_id: 0,
                block_size: 4096,
                offset: 0,
                number_of_blocks: Some(1),
                bitmap: Some(vec![0xFF, 0x03]),
            }
        );
        assert_eq!(r.to_cbor(), msg);
    }

    #[test]
    fn requests_round_trip_in_both_formats() {
        let r = GetStreamRequest {
            client_token: Some("tok-1".into()),
            stream_version: Some(3),
            file_id: 255,
            block_size: 131_072,
            offset: 98_304,
            number_of_blocks: Some(98_304),
            bitmap: Some(vec![0x13, 0x00, 0x80]),
        };
        for format in [Format::Json, Format::Cbor] {
            assert_eq!(
                GetStreamRequest::decode(format, &r.encode(format)),
                Ok(r.clone())
            );
        }
        assert_eq!(
            json(&r.to_json()),
            json(br#"{"c":"tok-1","s":3,"f":255,"l":131072,"o":98304,"b":"0x130080","n":98304}"#)
        );
        let minimal = req(256, 0, None, None);
        for format in [Format::Json, Format::Cbor] {
            assert_eq!(
                GetStreamRequest::decode(format, &minimal.encode(format)),
                Ok(minimal.clone())
            );
        }
    }

    #[test]
    fn json_bitmap_is_hex_with_or_without_prefix() {
        for b in ["0x130080", "130080", "0X130080", "0x130080"] {
            let body = format!(r#"{{"f":0,"l":256,"o":20,"n":32,"b":"{b}"}}"#);
            let r = GetStreamRequest::decode(Format::Json, body.as_bytes()).expect("request");
            assert_eq!(r.bitmap, Some(vec![0x13, 0x00, 0x80]), "{b}");
        }
        let upper = br#"{"f":0,"l":256,"b":"0xABcd"}"#;
        assert_eq!(
            GetStreamRequest::decode(Format::Json, upper)
                .expect("request")
                .bitmap,
            Some(vec![0xAB, 0xCD])
        );
        for bad in ["0x1", "MQ==", "0xzz", "0x 1"] {
            let body = format!(r#"{{"f":0,"l":256,"b":"{bad}","c":"t"}}"#);
            let e = GetStreamRequest::decode(Format::Json, body.as_bytes()).expect_err(bad);
            assert_eq!(e.code, RejectCode::InvalidRequest, "{bad}");
            assert_eq!(e.client_token.as_deref(), Some("t"));
        }
        // A byte string is the CBOR form; a number is wrong in JSON.
        let num = br#"{"f":0,"l":256,"b":19}"#;
        assert_eq!(
            code(GetStreamRequest::decode(Format::Json, num)),
            RejectCode::InvalidRequest
        );
        let mut w = Writer::new();
        w.map(3)
            .text("f")
            .uint(0)
            .text("l")
            .uint(256)
            .text("b")
            .text("0x13");
        assert_eq!(
            code(GetStreamRequest::decode(Format::Cbor, w.as_bytes())),
            RejectCode::InvalidRequest
        );
    }

    #[test]
    fn decodes_the_streams_library_requests() {
        // aws-iot-core-mqtt-file-streams-embedded-c, JSON: hard-coded s:1, no bitmap.
        let body = br#"{"s": 1,"f": 0,"l": 4096,"o": 3,"n": 2}"#;
        let r = GetStreamRequest::decode(Format::Json, body).expect("request");
        assert_eq!(r.stream_version, Some(1));
        assert_eq!(r.check_version(1), Ok(()));
        assert_eq!(select_blocks(100_000, &r), Ok(vec![3, 4]));
        // CBOR: the literal bytes "MQ==" as the bitmap with n = 1; only bit 0 matters.
        let mut w = Writer::new();
        w.map(6)
            .text("c")
            .text("rdy")
            .text("f")
            .uint(0)
            .text("l")
            .uint(1024)
            .text("o")
            .uint(5)
            .text("b")
            .bytes(b"MQ==")
            .text("n")
            .uint(1);
        let r = GetStreamRequest::decode(Format::Cbor, w.as_bytes()).expect("request");
        assert_eq!(r.bitmap.as_deref(), Some(&[0x4D, 0x51, 0x3D, 0x3D][..]));
        assert_eq!(select_blocks(100 * 1024, &r), Ok(vec![5]));
    }

    #[test]
    fn accepts_indefinite_lengths_everywhere() {
        let msg = hex(concat!(
            "BF",
            "61 63 7F 62 72 64 61 79 FF", // c: "rd" + "y"
            "61 66 01",
            "7F 61 6C FF 19 01 00",    // key "l" as an indefinite text string
            "61 62 5F 41 01 41 02 FF", // b: 01 02
            "61 78 9F 01 A1 61 79 F6 FF", // unknown key with nested values
            "FF"
        ));
        let r = GetStreamRequest::decode(Format::Cbor, &msg).expect("request");
        assert_eq!(r.client_token.as_deref(), Some("rdy"));
        assert_eq!(r.file_id, 1);
        assert_eq!(r.block_size, 256);
        assert_eq!(r.bitmap, Some(vec![1, 2]));
    }

    #[test]
    fn null_means_absent_and_last_duplicate_wins() {
        let body = br#"{"f":0,"l":256,"n":null,"b":null,"c":null,"s":null}"#;
        assert_eq!(
            GetStreamRequest::decode(Format::Json, body),
            Ok(req(256, 0, None, None))
        );
        let dup = br#"{"f":0,"l":512,"l":256}"#;
        assert_eq!(
            GetStreamRequest::decode(Format::Json, dup).map(|r| r.block_size),
            Ok(256)
        );
        let mut w = Writer::new();
        w.map(3)
            .text("f")
            .uint(0)
            .text("l")
            .uint(512)
            .text("l")
            .uint(256);
        assert_eq!(
            GetStreamRequest::decode(Format::Cbor, w.as_bytes()).map(|r| r.block_size),
            Ok(256)
        );
    }

    // ---- block selection ------------------------------------------------------------------

    #[test]
    fn doc_bitmap_example() {
        // Blocks 20, 21, 24, 43 with o = 20: bits 0, 1, 4, 23 → "0x130080", n = 32.
        let r = GetStreamRequest::decode(
            Format::Json,
            br#"{"c":"x","f":0,"l":256,"o":20,"n":32,"b":"0x130080"}"#,
        )
        .expect("request");
        assert_eq!(select_blocks(256 * 100, &r), Ok(vec![20, 21, 24, 43]));
        // Never more than n.
        let r2 = GetStreamRequest {
            number_of_blocks: Some(3),
            ..r.clone()
        };
        assert_eq!(select_blocks(256 * 100, &r2), Ok(vec![20, 21, 24]));
        // Never past the end of the file (44 blocks end at 43; 40 blocks at 39).
        assert_eq!(select_blocks(256 * 44, &r), Ok(vec![20, 21, 24, 43]));
        assert_eq!(select_blocks(256 * 40, &r), Ok(vec![20, 21, 24]));
    }

    #[test]
    fn freertos_whole_file_bitmap() {
        // 10 blocks of 4096 (last 3136 bytes): bits 0..9 set, trailing bits cleared.
        let size = 9 * 4096 + 3136;
        let mut r = req(4096, 0, Some(1), Some(vec![0xFF, 0x03]));
        r.client_token = Some("rdy".into());
        assert_eq!(select_blocks(size, &r), Ok(vec![0]));
        r.number_of_blocks = Some(8);
        assert_eq!(select_blocks(size, &r), Ok((0..8).collect()));
        // After receiving 0..7 the agent clears those bits.
        r.bitmap = Some(vec![0x00, 0x03]);
        assert_eq!(select_blocks(size, &r), Ok(vec![8, 9]));
        // Holes are served in ascending order.
        r.bitmap = Some(vec![0b1010_0100, 0x02]);
        assert_eq!(select_blocks(size, &r), Ok(vec![2, 5, 7, 9]));
        // Everything received: nothing asked for, nothing sent.
        r.bitmap = Some(vec![0x00, 0x00]);
        assert_eq!(select_blocks(size, &r), Ok(vec![]));
    }

    #[test]
    fn rustot_window_with_nonzero_offset() {
        // A 31-block window (4-byte bitmap, bits 0..30) starting at block 64.
        let window = vec![0xFF, 0xFF, 0xFF, 0x7F];
        let r = req(1024, 64, Some(31), Some(window));
        assert_eq!(select_blocks(1024 * 1000, &r), Ok((64..95).collect()));
        // Some blocks of the window already received.
        let r = req(1024, 64, Some(31), Some(vec![0xFE, 0xFF, 0x00, 0x40]));
        let mut expected: Vec<u64> = (65..80).collect();
        expected.push(64 + 30);
        assert_eq!(select_blocks(1024 * 1000, &r), Ok(expected));
        // The file ends inside the window (80 blocks: last index 79).
        let r = req(1024, 64, Some(31), Some(vec![0xFF, 0xFF, 0xFF, 0x7F]));
        assert_eq!(select_blocks(1024 * 80 - 5, &r), Ok((64..80).collect()));
    }

    #[test]
    fn response_is_capped_at_128_kib() {
        let big = 24 * 1024 * 1024;
        // 128 KiB blocks: one per request, whatever n says.
        assert_eq!(
            select_blocks(big, &req(131_072, 0, None, None)),
            Ok(vec![0])
        );
        assert_eq!(
            select_blocks(big, &req(131_072, 3, Some(10), None)),
            Ok(vec![3])
        );
        assert_eq!(
            select_blocks(big, &req(131_072, 0, Some(10), Some(vec![0xFF]))),
            Ok(vec![0])
        );
        // 4 KiB blocks: 32 per request.
        assert_eq!(
            select_blocks(big, &req(4096, 0, Some(100), None)),
            Ok((0..32).collect())
        );
        assert_eq!(
            select_blocks(big, &req(4096, 10, None, Some(vec![0xFF; 8]))),
            Ok((10..42).collect())
        );
        // Default n without a bitmap is 131072 / l.
        assert_eq!(
            select_blocks(big, &req(256, 0, None, None)).map(|v| v.len()),
            Ok(512)
        );
        // Uneven sizes: floor(131072 / 1000) = 131 blocks.
        assert_eq!(
            select_blocks(big, &req(1000, 0, None, None)).map(|v| v.len()),
            Ok(131)
        );
        for l in [256, 1000, 4096, 65_536, 100_000, 131_072] {
            let r = req(l, 0, Some(MAX_BLOCK_COUNT), None);
            let n = select_blocks(big, &r)
                .map(|v| v.len() as u64)
                .expect("blocks");
            assert!(n * l <= MAX_RESPONSE_BYTES, "{l}");
            assert!((n + 1) * l > MAX_RESPONSE_BYTES, "{l}");
        }
    }

    #[test]
    fn count_without_bitmap_stops_at_end_of_file() {
        let size = 4096 * 10;
        assert_eq!(
            select_blocks(size, &req(4096, 8, Some(5), None)),
            Ok(vec![8, 9])
        );
        assert_eq!(select_blocks(size, &req(4096, 9, None, None)), Ok(vec![9]));
        assert_eq!(
            select_blocks(size, &req(4096, 0, Some(0), None)),
            Ok(vec![])
        );
    }

    // ---- rejections ------------------------------------------------------------------------

    #[test]
    fn every_decode_and_selection_rejection() {
        let j = |s: &str| GetStreamRequest::decode(Format::Json, s.as_bytes());
        assert_eq!(code(j("{")), RejectCode::InvalidJson);
        assert_eq!(code(j("\"f\"")), RejectCode::InvalidRequest);
        assert_eq!(
            code(GetStreamRequest::decode(Format::Cbor, &hex("A1 61 66"))),
            RejectCode::InvalidCbor
        );
        assert_eq!(
            code(GetStreamRequest::decode(Format::Cbor, &hex("A0 00"))),
            RejectCode::InvalidCbor
        );
        assert_eq!(
            code(GetStreamRequest::decode(Format::Cbor, &hex("82 00 00"))),
            RejectCode::InvalidRequest
        );
        assert_eq!(code(j(r#"{"l":256}"#)), RejectCode::InvalidRequest);
        assert_eq!(code(j(r#"{"f":0}"#)), RejectCode::InvalidRequest);
        assert_eq!(code(j(r#"{"f":256,"l":256}"#)), RejectCode::InvalidRequest);
        assert_eq!(code(j(r#"{"f":"0","l":256}"#)), RejectCode::InvalidRequest);
        assert_eq!(code(j(r#"{"f":-1,"l":256}"#)), RejectCode::InvalidRequest);
        assert_eq!(code(j(r#"{"f":0,"l":256.5}"#)), RejectCode::InvalidRequest);
        assert_eq!(
            code(j(r#"{"f":0,"l":255}"#)),
            RejectCode::BlockSizeOutOfBounds
        );
        assert_eq!(
            code(j(r#"{"f":0,"l":131073}"#)),
            RejectCode::BlockSizeOutOfBounds
        );
        assert_eq!(
            code(j(r#"{"f":0,"l":0}"#)),
            RejectCode::BlockSizeOutOfBounds
        );
        assert_eq!(
            code(j(r#"{"f":0,"l":256,"o":98305}"#)),
            RejectCode::OffsetOutOfBounds
        );
        assert_eq!(
            code(j(r#"{"f":0,"l":256,"n":98305}"#)),
            RejectCode::BlockCountLimitExceeded
        );
        let big_bitmap = format!(r#"{{"f":0,"l":256,"b":"0x{}"}}"#, "ff".repeat(12_288));
        assert_eq!(code(j(&big_bitmap)), RejectCode::BlockBitmapLimitExceeded);
        let max_bitmap = format!(r#"{{"f":0,"l":256,"b":"{}"}}"#, "ff".repeat(12_287));
        assert!(j(&max_bitmap).is_ok());
        let mut w = Writer::new();
        w.map(3)
            .text("f")
            .uint(0)
            .text("l")
            .uint(256)
            .text("b")
            .bytes(&[0; 12_288]);
        assert_eq!(
            code(GetStreamRequest::decode(Format::Cbor, w.as_bytes())),
            RejectCode::BlockBitmapLimitExceeded
        );

        let ok = req(4096, 0, None, None);
        assert_eq!(
            code(select_blocks(4096 * 3, &req(4096, 3, None, None))),
            RejectCode::OffsetOutOfBounds
        );
        assert_eq!(code(select_blocks(0, &ok)), RejectCode::OffsetOutOfBounds);
        assert_eq!(
            code(select_blocks(
                4096 * 3,
                &req(4096, 1, None, Some(vec![0x00, 0x01]))
            )),
            RejectCode::ResourceNotFound
        );
        assert_eq!(
            code(select_blocks(4096, &req(255, 0, None, None))),
            RejectCode::BlockSizeOutOfBounds
        );
        let versioned = GetStreamRequest {
            stream_version: Some(2),
            client_token: Some("t".into()),
            ..ok
        };
        let e = versioned.check_version(3).expect_err("mismatch");
        assert_eq!(e.code, RejectCode::VersionMismatch);
        assert_eq!(e.client_token.as_deref(), Some("t"));
        assert_eq!(versioned.check_version(2), Ok(()));
        assert_eq!(req(4096, 0, None, None).check_version(9), Ok(()));
    }

    #[test]
    fn client_token_rules() {
        let t64 = "t".repeat(64);
        let body = format!(r#"{{"c":"{t64}","f":0,"l":256}}"#);
        assert_eq!(
            GetStreamRequest::decode(Format::Json, body.as_bytes())
                .expect("request")
                .client_token,
            Some(t64.clone())
        );
        // Longer than 64 bytes: InvalidRequest, and the token is not echoed.
        let body = format!(r#"{{"c":"{t64}x","f":0,"l":256}}"#);
        let e = GetStreamRequest::decode(Format::Json, body.as_bytes()).expect_err("too long");
        assert_eq!((e.code, e.client_token), (RejectCode::InvalidRequest, None));
        // 33 characters but 66 bytes.
        let wide = "é".repeat(33);
        let e =
            DescribeStreamRequest::decode(Format::Json, format!(r#"{{"c":"{wide}"}}"#).as_bytes())
                .expect_err("too long");
        assert_eq!(e.code, RejectCode::InvalidRequest);
        // Not a string.
        let e =
            GetStreamRequest::decode(Format::Json, br#"{"c":5,"f":0,"l":256}"#).expect_err("type");
        assert_eq!((e.code, e.client_token), (RejectCode::InvalidRequest, None));
        // A good token is echoed with later errors.
        let e = GetStreamRequest::decode(Format::Json, br#"{"c":"abc","f":0,"l":1}"#)
            .expect_err("size");
        assert_eq!(e.code, RejectCode::BlockSizeOutOfBounds);
        assert_eq!(e.client_token.as_deref(), Some("abc"));
        let over = StreamError::new(RejectCode::InternalError, "x").with_client_token(Some(&t64));
        assert_eq!(over.client_token.as_deref(), Some(t64.as_str()));
        let dropped = StreamError::new(RejectCode::InternalError, "x")
            .with_client_token(Some(&format!("{t64}x")));
        assert_eq!(dropped.client_token, None);
    }

    #[test]
    fn rejected_messages_for_every_code() {
        for &c in RejectCode::ALL {
            assert_eq!(c.as_str().parse::<RejectCode>(), Ok(c));
            assert_eq!(c.to_string(), c.as_str());
            let e = StreamError::new(c, "why").with_client_token(Some("tok"));
            let j = e.to_json();
            assert_eq!(
                String::from_utf8(j.clone()).expect("utf8"),
                format!(r#"{{"o":"{c}","m":"why","c":"tok"}}"#)
            );
            let len = c.as_str().len() as u8;
            let mut expected = vec![0xBF, 0x61, b'o'];
            if len < 24 {
                expected.push(0x60 + len);
            } else {
                expected.extend_from_slice(&[0x78, len]);
            }
            expected.extend_from_slice(c.as_str().as_bytes());
            expected.extend_from_slice(&hex("61 6D 63 77 68 79 61 63 63 74 6F 6B FF"));
            assert_eq!(e.encode(Format::Cbor), expected, "{c}");
            for format in [Format::Json, Format::Cbor] {
                let r = Rejection::decode(format, &e.encode(format)).expect("rejection");
                assert_eq!(r.reject_code(), Some(c));
                assert_eq!(r.message, "why");
                assert_eq!(r.client_token.as_deref(), Some("tok"));
            }
        }
        assert_eq!(
            StreamError::new(RejectCode::InvalidJson, "bad").to_json(),
            br#"{"o":"InvalidJson","m":"bad"}"#.to_vec()
        );
        assert_eq!("Nope".parse::<RejectCode>(), Err(()));
        assert_eq!(
            RejectCode::undecodable(Format::Json),
            RejectCode::InvalidJson
        );
        assert_eq!(
            RejectCode::undecodable(Format::Cbor),
            RejectCode::InvalidCbor
        );
    }

    #[test]
    fn legacy_rejection_keys() {
        let legacy =
            br#"{"code":"ResourceNotFound","message":"no such stream","clientToken":"abc"}"#;
        let r = Rejection::decode(Format::Json, legacy).expect("rejection");
        assert_eq!(r.reject_code(), Some(RejectCode::ResourceNotFound));
        assert_eq!(r.message, "no such stream");
        assert_eq!(r.client_token.as_deref(), Some("abc"));
        let unknown = br#"{"o":"Throttled"}"#;
        let r = Rejection::decode(Format::Json, unknown).expect("rejection");
        assert_eq!((r.code.as_str(), r.reject_code()), ("Throttled", None));
        assert_eq!(
            code(Rejection::decode(Format::Json, b"{}")),
            RejectCode::InvalidRequest
        );
    }

    // ---- describe ------------------------------------------------------------------------------

    #[test]
    fn describe_stream_messages() {
        let rq = DescribeStreamRequest {
            client_token: Some("ec944cfb".into()),
        };
        assert_eq!(rq.to_json(), br#"{"c":"ec944cfb"}"#.to_vec());
        assert_eq!(rq.to_cbor(), hex("A1 61 63 68 65 63 39 34 34 63 66 62"));
        for format in [Format::Json, Format::Cbor] {
            assert_eq!(
                DescribeStreamRequest::decode(format, &rq.encode(format)),
                Ok(rq.clone())
            );
            assert_eq!(
                DescribeStreamRequest::decode(format, b""),
                Ok(DescribeStreamRequest::default())
            );
            let empty = DescribeStreamRequest::default().encode(format);
            assert_eq!(
                DescribeStreamRequest::decode(format, &empty),
                Ok(DescribeStreamRequest::default())
            );
        }
        assert_eq!(DescribeStreamRequest::default().to_cbor(), vec![0xA0]);

        let resp = DescribeStreamResponse {
            client_token: Some("ec944cfb".into()),
            stream_version: 1,
            description: "fw".into(),
            files: vec![
                StreamFile {
                    file_id: 0,
                    size: 123_456,
                },
                StreamFile {
                    file_id: 1,
                    size: 42,
                },
            ],
        };
        assert_eq!(
            String::from_utf8(resp.to_json()).expect("utf8"),
            r#"{"c":"ec944cfb","s":1,"d":"fw","r":[{"f":0,"z":123456},{"f":1,"z":42}]}"#
        );
        assert_eq!(
            resp.to_cbor(),
            hex(concat!(
                "BF 61 63 68 65 63 39 34 34 63 66 62",
                "61 73 01 61 64 62 66 77 61 72 9F",
                "BF 61 66 00 61 7A 1A 00 01 E2 40 FF",
                "BF 61 66 01 61 7A 18 2A FF",
                "FF FF"
            ))
        );
        for format in [Format::Json, Format::Cbor] {
            assert_eq!(
                DescribeStreamResponse::decode(format, &resp.encode(format)),
                Ok(resp.clone())
            );
        }
        let missing = br#"{"s":1,"r":[{"f":0}]}"#;
        assert_eq!(
            code(DescribeStreamResponse::decode(Format::Json, missing)),
            RejectCode::InvalidRequest
        );
        let no_d = br#"{"s":1,"r":[]}"#;
        assert_eq!(
            DescribeStreamResponse::decode(Format::Json, no_d).map(|r| r.description),
            Ok(String::new())
        );
    }

    // ---- encodings ---------------------------------------------------------------------------

    #[test]
    fn base64_and_hex() {
        for (raw, b64) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
            (b"\xff\xfe\x00", "//4A"),
            (b"\xfb\xff", "+/8="),
        ] {
            assert_eq!(base64_encode(raw), b64);
            assert_eq!(base64_decode(b64).as_deref(), Some(raw));
        }
        for bad in ["Zg=", "Z===", "Zg==Zg==", "Zm9v!", "Zm 9", "=Zm9"] {
            assert_eq!(base64_decode(bad), None, "{bad}");
        }
        assert_eq!(hex_encode(&[0x13, 0x00, 0x80]), "130080");
        assert_eq!(hex_decode(""), Some(vec![]));
        assert_eq!(hex_decode("+1"), None);
    }

    // ---- robustness ---------------------------------------------------------------------------

    fn decode_all(format: Format, bytes: &[u8]) -> bool {
        let a = GetStreamRequest::decode(format, bytes).is_ok();
        let b = DescribeStreamRequest::decode(format, bytes).is_ok();
        let c = DescribeStreamResponse::decode(format, bytes).is_ok();
        let d = DataBlock::decode(format, bytes).is_ok();
        let e = Rejection::decode(format, bytes).is_ok();
        a || b || c || d || e
    }

    #[test]
    fn no_panic_on_prefixes_and_noise() {
        let full = GetStreamRequest {
            client_token: Some("rdy".into()),
            stream_version: Some(7),
            file_id: 3,
            block_size: 4096,
            offset: 12,
            number_of_blocks: Some(8),
            bitmap: Some(vec![0xF0, 0x0F, 0x55]),
        };
        let describe = DescribeStreamResponse {
            client_token: Some("c".into()),
            stream_version: 2,
            description: "d".into(),
            files: vec![StreamFile {
                file_id: 0,
                size: 9,
            }],
        };
        let block = BlockResponse {
            client_token: Some("c"),
            file_id: 0,
            block_id: 9,
            payload: &[7; 300],
        };
        let rejected =
            StreamError::new(RejectCode::OffsetOutOfBounds, "m").with_client_token(Some("c"));
        let messages = [
            full.to_cbor(),
            describe.to_cbor(),
            block.to_cbor(),
            rejected.to_cbor(),
            DescribeStreamRequest {
                client_token: Some("x".into()),
            }
            .to_cbor(),
        ];
        for msg in &messages {
            assert!(decode_all(Format::Cbor, msg));
            // Every strict prefix except the empty payload ("no fields") is truncated CBOR.
            for end in 1..msg.len() {
                assert!(
                    !decode_all(Format::Cbor, &msg[..end]),
                    "prefix {end} of {msg:02x?}"
                );
            }
        }
        for msg in [
            full.to_json(),
            describe.to_json(),
            block.to_json(),
            rejected.to_json(),
        ] {
            for end in 0..msg.len() {
                let _ = decode_all(Format::Json, &msg[..end]);
            }
        }
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        for _ in 0..10_000 {
            let noise = rng.bytes(96);
            decode_all(Format::Cbor, &noise);
            decode_all(Format::Json, &noise);
        }
        // Mutated valid messages, and noise behind a map header so the decoders go deeper.
        for _ in 0..10_000 {
            let mut m = messages[(rng.next_u64() % messages.len() as u64) as usize].clone();
            for _ in 0..1 + rng.next_u64() % 3 {
                let i = (rng.next_u64() % m.len() as u64) as usize;
                m[i] = rng.next_u64() as u8;
            }
            decode_all(Format::Cbor, &m);
            let mut deep = vec![0xBF, 0x61, b'r', 0x9F];
            deep.extend(rng.bytes(48));
            decode_all(Format::Cbor, &deep);
        }
        // Selection over random requests never panics and respects the budget.
        for _ in 0..5_000 {
            let l = MIN_BLOCK_SIZE + rng.next_u64() % (MAX_BLOCK_SIZE - MIN_BLOCK_SIZE + 1);
            let r = GetStreamRequest {
                block_size: l,
                offset: rng.next_u64() % 200,
                number_of_blocks: rng
                    .next_u64()
                    .is_multiple_of(2)
                    .then(|| rng.next_u64() % 600),
                bitmap: rng.next_u64().is_multiple_of(2).then(|| rng.bytes(40)),
                ..GetStreamRequest::default()
            };
            let size = rng.next_u64() % (64 * 1024 * 1024);
            if let Ok(blocks) = select_blocks(size, &r) {
                assert!(blocks.len() as u64 * l <= MAX_RESPONSE_BYTES);
                assert!(blocks.windows(2).all(|w| w[0] < w[1]));
                assert!(
                    blocks
                        .iter()
                        .all(|b| *b >= r.offset && *b < block_count(size, l))
                );
            }
        }
    }
}
