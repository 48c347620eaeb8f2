//! The HTTP data path: file blocks fetched with `Range` GETs from the job's pre-signed URL
//! (`update_data_url`), as the C agent's `ota_http.c` does, over plain HTTP or HTTPS.
//!
//! The agent stays free of I/O: its `RequestFileBlock` handler sends a [`Fetch`] (a run of
//! missing blocks) to the fetcher task started by [`crate::Agent::run`], and the fetcher
//! hands each block back through the agent's block queue, where it meets the same ingest
//! step as a Streams block (same bitmap, checkpoints, statistics and verification).
//!
//! The client is a minimal HTTP/1.1 one — `GET` with `Range`, `Content-Length` or chunked
//! bodies, keep-alive — because a pre-signed S3 download needs nothing more, and a device
//! daemon should not carry a general-purpose HTTP stack. Differences from the C agent: one
//! request covers a run of up to `blocks_per_request` blocks (not one block), a port in the
//! URL is honoured, and a short body keeps the whole blocks it delivered.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufStream};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Attempts of one fetch before the agent is told it failed (its request timer then asks
/// again, counted against `max_request_momentum`).
const ATTEMPTS: u32 = 3;
/// Pause before the second attempt; doubled for each further one.
const BACKOFF: Duration = Duration::from_millis(200);
/// The largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// The largest body accepted (an answer is at most one request's worth of blocks; error
/// pages are small).
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Why an HTTP exchange failed.
#[derive(Debug, Error)]
pub enum HttpError {
    #[error("bad URL {url}: {detail}")]
    Url { url: String, detail: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("malformed response: {0}")]
    Protocol(String),
    #[error("HTTP {status}: {detail}")]
    Status { status: u16, detail: String },
}

impl HttpError {
    /// Worth another attempt with the same URL: the network, the server's 5xx, 429.
    fn transient(&self) -> bool {
        match self {
            HttpError::Io(_) | HttpError::Timeout(_) | HttpError::Protocol(_) => true,
            HttpError::Status { status, .. } => *status >= 500 || *status == 429,
            HttpError::Url { .. } | HttpError::Tls(_) => false,
        }
    }

    /// The HTTP status, when the server answered with one.
    pub fn status(&self) -> Option<u16> {
        match self {
            HttpError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// An `http://` or `https://` URL, split for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `host[:port]` exactly as written: the `Host` header (pre-signed URLs sign it).
    pub authority: String,
    /// Path and query, as written.
    pub target: String,
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, HttpError> {
        let bad = |d: &str| HttpError::Url {
            url: redact(url),
            detail: d.into(),
        };
        // Nothing a job document carries may reach the request line as a control character
        // or space (a CR/LF would inject headers).
        if url.bytes().any(|b| b <= 0x20 || b == 0x7f) {
            return Err(bad("control characters or spaces"));
        }
        let url_no_fragment = url.split_once('#').map_or(url, |(u, _)| u);
        let (scheme, rest) = url_no_fragment
            .split_once("://")
            .ok_or_else(|| bad("no scheme"))?;
        let tls = match scheme.to_ascii_lowercase().as_str() {
            "http" => false,
            "https" => true,
            _ => return Err(bad("only http and https are supported")),
        };
        let (authority, target) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("no host, or user info in the URL"));
        }
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed IPv6 literal"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => default_port,
                None => return Err(bad("junk after the IPv6 literal")),
            };
            (h.to_owned(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| bad("bad port"))?),
                None => (authority.to_owned(), default_port),
            }
        };
        Ok(Url {
            tls,
            host,
            port,
            authority: authority.to_owned(),
            target,
        })
    }
}

/// The URL without its query: pre-signed URLs carry credentials-like signatures that
/// do not belong in logs.
pub fn redact(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?…"),
        None => url.to_owned(),
    }
}

/// The TLS client configuration for `https` URLs, trusting the certificates of `ca_pem`
/// (one or more PEM blocks).
pub fn tls_config(ca_pem: &str) -> Result<Arc<rustls::ClientConfig>, HttpError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut rest = ca_pem;
    while let Some(start) = rest.find("-----BEGIN ") {
        let block = &rest[start..];
        let end = block
            .find("-----END ")
            .and_then(|e| {
                block[e..]
                    .find("\n")
                    .map(|n| e + n + 1)
                    .or(Some(block.len()))
            })
            .unwrap_or(block.len());
        let (label, der) = crate::verify::parse_pem(&block[..end]).map_err(HttpError::Tls)?;
        if label == "CERTIFICATE" {
            roots
                .add(rustls::pki_types::CertificateDer::from(der))
                .map_err(|e| HttpError::Tls(format!("CA certificate: {e}")))?;
        }
        rest = &block[end..];
    }
    if roots.is_empty() {
        return Err(HttpError::Tls("no CERTIFICATE in the CA bundle".into()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| HttpError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// An open connection and where it goes.
struct Connection {
    key: (bool, String, u16),
    io: BufStream<Box<dyn Io>>,
}

/// A keep-alive HTTP/1.1 client for one origin at a time.
pub struct Client {
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
    conn: Option<Connection>,
}

/// The answer to a request.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    /// The response headers, names in lower case.
    pub headers: Vec<(String, String)>,
    /// The body as far as it arrived; `complete` says whether it is all of it.
    pub body: Vec<u8>,
    pub complete: bool,
}

impl Response {
    /// The value of header `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// `Content-Range: bytes FIRST-LAST/...` as (first, last).
    pub fn content_range(&self) -> Option<(u64, u64)> {
        let v = self.header("content-range")?.strip_prefix("bytes ")?;
        let (range, _total) = v.split_once('/')?;
        let (first, last) = range.split_once('-')?;
        Some((first.trim().parse().ok()?, last.trim().parse().ok()?))
    }
}

impl Client {
    /// A client; `tls` is needed for `https` URLs. `timeout` bounds getting an answer's
    /// head (connecting included) and each silence while its body arrives.
    pub fn new(tls: Option<Arc<rustls::ClientConfig>>, timeout: Duration) -> Self {
        Client {
            tls,
            timeout,
            conn: None,
        }
    }

    /// Opens a connection to the URL's origin unless one is open.
    async fn connect(&mut self, url: &Url) -> Result<(), HttpError> {
        let key = (url.tls, url.host.clone(), url.port);
        if self.conn.as_ref().is_some_and(|c| c.key == key) {
            return Ok(());
        }
        self.conn = None;
        let tcp = TcpStream::connect((url.host.as_str(), url.port)).await?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = if url.tls {
            let config = self.tls.clone().ok_or_else(|| {
                HttpError::Tls(
                    "an https URL, but no CA is configured (AgentConfig::http_ca_pem)".into(),
                )
            })?;
            let name = rustls::pki_types::ServerName::try_from(url.host.clone())
                .map_err(|e| HttpError::Tls(format!("server name {}: {e}", url.host)))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| HttpError::Tls(e.to_string()))?;
            Box::new(tls)
        } else {
            Box::new(tcp)
        };
        self.conn = Some(Connection {
            key,
            io: BufStream::new(io),
        });
        Ok(())
    }

    /// `GET url` with `Range: bytes=start-end` (inclusive).
    pub async fn get_range(
        &mut self,
        url: &Url,
        start: u64,
        end: u64,
    ) -> Result<Response, HttpError> {
        let range = format!("bytes={start}-{end}");
        self.send(url, "GET", &[("Range", range.as_str())], &[])
            .await
    }

    /// One request with `headers` (besides Host, Content-Length and Connection) and
    /// `body`. A connection that fails or asks to close is dropped; the next request opens
    /// a new one.
    pub async fn send(
        &mut self,
        url: &Url,
        method: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Response, HttpError> {
        // The timeout bounds getting an answer's head; its body may take longer as long as
        // it keeps coming (each read within the timeout): a slow link still progresses.
        let r = self.exchange(url, method, headers, body).await;
        if !matches!(&r, Ok((_, true))) {
            self.conn = None;
        }
        r.map(|(resp, _)| resp)
    }

    /// One exchange; the flag says whether the connection may be reused.
    async fn exchange(
        &mut self,
        url: &Url,
        method: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<(Response, bool), HttpError> {
        let timeout = self.timeout;
        let head = tokio::time::timeout(timeout, self.request_head(url, method, headers, body));
        let head = match head.await {
            Ok(h) => h?,
            Err(_) => return Err(HttpError::Timeout(timeout)),
        };
        let Some(conn) = self.conn.as_mut() else {
            return Err(HttpError::Protocol("no connection".into()));
        };
        let io = &mut conn.io;
        if method == "HEAD" {
            let response = Response {
                status: head.status,
                headers: head.headers,
                body: Vec::new(),
                complete: true,
            };
            return Ok((response, head.keep_alive));
        }
        let mut body = Vec::new();
        let complete = match head.length {
            BodyLength::Chunked => {
                match tokio::time::timeout(timeout, read_chunked(io, &mut body)).await {
                    Ok(r) => r?,
                    // What arrived is kept; the connection is not reused.
                    Err(_) => false,
                }
            }
            BodyLength::Exact(n) => {
                let limit = usize::try_from(n).unwrap_or(usize::MAX);
                if limit > MAX_BODY {
                    return Err(HttpError::Protocol(format!("a {n}-byte body")));
                }
                read_body(io, &mut body, limit, timeout).await == BodyEnd::Full
            }
            BodyLength::UntilClose => {
                read_body(io, &mut body, MAX_BODY, timeout).await == BodyEnd::Eof
            }
        };
        let reusable = complete && head.keep_alive && head.length != BodyLength::UntilClose;
        Ok((
            Response {
                status: head.status,
                headers: head.headers,
                body,
                complete,
            },
            reusable,
        ))
    }

    /// Connects (or reuses the connection), sends the request and reads the answer's head.
    async fn request_head(
        &mut self,
        url: &Url,
        method: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Result<Head, HttpError> {
        self.connect(url).await?;
        let Some(conn) = self.conn.as_mut() else {
            return Err(HttpError::Protocol("no connection".into()));
        };
        let mut request = format!(
            "{method} {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: updraft-agent\r\nAccept: */*\r\nConnection: keep-alive\r\n",
            url.target, url.authority
        );
        for (name, value) in headers {
            if value.contains(['\r', '\n']) {
                return Err(HttpError::Protocol(format!(
                    "header {name} has a line break"
                )));
            }
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if !body.is_empty() || !matches!(method, "GET" | "HEAD" | "DELETE") {
            request.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        request.push_str("\r\n");
        let io = &mut conn.io;
        io.write_all(request.as_bytes()).await?;
        io.write_all(body).await?;
        io.flush().await?;
        read_head(io).await
    }
}

/// How reading a body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    /// All the bytes asked for arrived.
    Full,
    /// The connection closed first.
    Eof,
    /// An error, or no byte for a whole `idle` period.
    Broken,
}

/// Reads up to `limit` bytes, each read within `idle`; what arrived is kept however it ends
/// (the blocks it completes are not fetched again).
async fn read_body<R: AsyncRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
    limit: usize,
    idle: Duration,
) -> BodyEnd {
    let mut buf = vec![0u8; 16 * 1024];
    while out.len() < limit {
        let want = (limit - out.len()).min(buf.len());
        match tokio::time::timeout(idle, r.read(&mut buf[..want])).await {
            Ok(Ok(0)) => return BodyEnd::Eof,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => {
                debug!("HTTP body cut: {e}");
                return BodyEnd::Broken;
            }
            Err(_) => {
                debug!("HTTP body stalled for {idle:?}");
                return BodyEnd::Broken;
            }
        }
    }
    BodyEnd::Full
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyLength {
    Exact(u64),
    Chunked,
    UntilClose,
}

struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    length: BodyLength,
    keep_alive: bool,
}

async fn read_line<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    budget: &mut usize,
) -> Result<String, HttpError> {
    let mut line = Vec::new();
    // At most `budget` bytes are read, newline or not: a line without end must not grow
    // without bound.
    let n = (&mut *r)
        .take(*budget as u64)
        .read_until(b'\n', &mut line)
        .await?;
    if n == 0 {
        if *budget == 0 {
            return Err(HttpError::Protocol("response head too large".into()));
        }
        return Err(HttpError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    if line.last() != Some(&b'\n') && n == *budget {
        return Err(HttpError::Protocol("response head too large".into()));
    }
    *budget -= n;
    while matches!(line.last(), Some(b'\n' | b'\r')) {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| HttpError::Protocol("non-UTF-8 header".into()))
}

async fn read_head<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Head, HttpError> {
    // Interim answers (100 Continue, 103 Early Hints) precede the real one.
    for _ in 0..MAX_INTERIM {
        let head = read_one_head(r).await?;
        if !(100..200).contains(&head.status) {
            return Ok(head);
        }
    }
    Err(HttpError::Protocol("too many interim (1xx) answers".into()))
}

/// Interim answers skipped before giving up.
const MAX_INTERIM: usize = 8;

async fn read_one_head<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Head, HttpError> {
    let mut budget = MAX_HEAD;
    let status_line = read_line(r, &mut budget).await?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|_| version.starts_with("HTTP/1."))
        .ok_or_else(|| HttpError::Protocol(format!("status line '{status_line}'")))?;
    let mut keep_alive = version != "HTTP/1.0";
    let mut length = BodyLength::UntilClose;
    let mut headers = Vec::new();
    loop {
        let line = read_line(r, &mut budget).await?;
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpError::Protocol(format!("header '{line}'")));
        };
        let value = value.trim();
        let name = name.trim().to_ascii_lowercase();
        headers.push((name.clone(), value.to_owned()));
        match name.as_str() {
            "content-length" if length != BodyLength::Chunked => {
                let n = value
                    .parse()
                    .map_err(|_| HttpError::Protocol(format!("Content-Length '{value}'")))?;
                length = BodyLength::Exact(n);
            }
            "transfer-encoding" if value.to_ascii_lowercase().contains("chunked") => {
                length = BodyLength::Chunked;
            }
            "connection" => {
                let v = value.to_ascii_lowercase();
                if v.contains("close") {
                    keep_alive = false;
                } else if v.contains("keep-alive") {
                    keep_alive = true;
                }
            }
            _ => {}
        }
    }
    if (100..200).contains(&status) || status == 204 || status == 304 {
        length = BodyLength::Exact(0);
    }
    Ok(Head {
        status,
        headers,
        length,
        keep_alive,
    })
}

/// Reads until `limit` bytes or the end of the stream.
async fn read_up_to<R: AsyncRead + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<(), HttpError> {
    let mut take = r.take(limit as u64);
    take.read_to_end(out).await?;
    Ok(())
}

/// Reads a chunked body; `false` when the stream ended before the last chunk.
async fn read_chunked<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    out: &mut Vec<u8>,
) -> Result<bool, HttpError> {
    loop {
        let mut budget = MAX_HEAD;
        let line = match read_line(r, &mut budget).await {
            Ok(l) => l,
            Err(HttpError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(false);
            }
            Err(e) => return Err(e),
        };
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| HttpError::Protocol(format!("chunk size '{line}'")))?;
        if size == 0 {
            // Trailers, then the empty line.
            while !read_line(r, &mut budget).await?.is_empty() {}
            return Ok(true);
        }
        if size > MAX_BODY.saturating_sub(out.len()) {
            return Err(HttpError::Protocol("chunked body too large".into()));
        }
        let before = out.len();
        read_up_to(r, out, size).await?;
        if out.len() - before < size {
            return Ok(false);
        }
        read_line(r, &mut budget).await?;
    }
}

/// A run of blocks to fetch for a transfer.
#[derive(Debug, Clone)]
pub(crate) struct Fetch {
    /// The transfer this belongs to; answers for an older one are dropped by the agent.
    pub transfer: u64,
    pub url: String,
    pub first_block: u64,
    pub blocks: u64,
    pub block_size: u32,
    pub file_size: u64,
}

/// Where the fetcher hands its results: the agent's block queue (waiting when it is full —
/// an HTTP download is paced by the agent, so nothing needs dropping) and control queue.
pub(crate) struct Sink {
    pub blocks: mpsc::WeakSender<crate::handle::Block>,
    pub control: mpsc::WeakUnboundedSender<crate::handle::Command>,
    /// For the statistics: HTTP blocks count as received and queued like Streams ones.
    pub shared: Arc<crate::handle::Shared>,
}

impl Sink {
    async fn block(&self, transfer: u64, block_id: u64, payload: Bytes) -> bool {
        let Some(tx) = self.blocks.upgrade() else {
            return false;
        };
        crate::handle::Shared::bump(&self.shared.received);
        crate::handle::Shared::bump(&self.shared.queued);
        tx.send(crate::handle::Block::Http {
            transfer,
            block_id,
            payload,
        })
        .await
        .is_ok()
    }

    fn failed(&self, transfer: u64, status: Option<u16>, detail: String) {
        if let Some(tx) = self.control.upgrade() {
            let _ = tx.send(crate::handle::Command::HttpFailed {
                transfer,
                status,
                detail,
            });
        }
    }
}

/// The fetcher task: one fetch at a time; a newer request replaces queued older ones.
pub(crate) async fn fetcher(
    mut requests: mpsc::UnboundedReceiver<Fetch>,
    sink: Sink,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
) {
    let mut client = Client::new(tls, timeout);
    while let Some(mut fetch) = requests.recv().await {
        while let Ok(newer) = requests.try_recv() {
            fetch = newer;
        }
        if let Err(e) = run_fetch(&mut client, &fetch, &sink).await {
            warn!(url = %redact(&fetch.url), "HTTP download: {e}");
            sink.failed(fetch.transfer, e.status(), e.to_string());
        }
    }
}

/// Fetches the blocks of `f`, retrying transient failures; a short body keeps the whole
/// blocks it brought and the next attempt starts after them.
async fn run_fetch(client: &mut Client, f: &Fetch, sink: &Sink) -> Result<(), HttpError> {
    let url = Url::parse(&f.url)?;
    let bs = u64::from(f.block_size.max(1));
    let end_block = (f.first_block + f.blocks).min(f.file_size.div_ceil(bs));
    let mut next = f.first_block;
    let mut failures = 0;
    while next < end_block {
        let start = next * bs;
        let end = (end_block * bs).min(f.file_size);
        let result = client.get_range(&url, start, end - 1).await;
        let resp = match result {
            Ok(r) if r.status == 206 => r,
            Ok(r) => {
                let detail = match r.status {
                    200 => "the server ignored the Range header".to_owned(),
                    403 => "the pre-signed URL was refused (expired or not valid)".to_owned(),
                    _ => String::from_utf8_lossy(&r.body[..r.body.len().min(200)]).into_owned(),
                };
                let e = HttpError::Status {
                    status: r.status,
                    detail,
                };
                if !e.transient() {
                    return Err(e);
                }
                failures += 1;
                if failures >= ATTEMPTS {
                    return Err(e);
                }
                tokio::time::sleep(BACKOFF * 2u32.pow(failures - 1)).await;
                continue;
            }
            Err(e) => {
                failures += 1;
                if !e.transient() || failures >= ATTEMPTS {
                    return Err(e);
                }
                debug!("HTTP attempt {failures} failed: {e}; retrying");
                tokio::time::sleep(BACKOFF * 2u32.pow(failures - 1)).await;
                continue;
            }
        };
        // The bytes must be the ones asked for: a proxy answering another range (or a
        // desynchronised connection) would otherwise write them as the wrong blocks.
        match resp.content_range() {
            Some((first, _)) if first == start => {}
            other => {
                return Err(HttpError::Protocol(format!(
                    "a 206 for bytes {start}-{} answered with Content-Range {other:?}",
                    end - 1
                )));
            }
        }
        let expected = usize::try_from(end - start).unwrap_or(usize::MAX);
        if resp.body.len() > expected {
            return Err(HttpError::Protocol(format!(
                "{} bytes for a {expected}-byte range",
                resp.body.len()
            )));
        }
        let body = Bytes::from(resp.body);
        let mut offset = 0usize;
        let before = next;
        while next < end_block {
            let len = usize::try_from((f.file_size - next * bs).min(bs)).unwrap_or(usize::MAX);
            if body.len() - offset < len {
                break;
            }
            if !sink
                .block(f.transfer, next, body.slice(offset..offset + len))
                .await
            {
                return Ok(());
            }
            offset += len;
            next += 1;
        }
        if next > before {
            // Progress: a slow or capped server is not failing.
            failures = 0;
        }
        if next < end_block {
            failures += 1;
            let e = HttpError::Protocol(format!(
                "short body: {} of {expected} bytes (complete: {})",
                body.len(),
                resp.complete
            ));
            if failures >= ATTEMPTS {
                return Err(e);
            }
            debug!("{e}; asking for the rest");
        } else {
            failures = 0;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("http://127.0.0.1:8080/firmware/fw.bin?X-Amz-Date=1&X-Amz-Signature=ab")
            .expect("url");
        assert_eq!(
            (u.tls, u.host.as_str(), u.port, u.authority.as_str()),
            (false, "127.0.0.1", 8080, "127.0.0.1:8080")
        );
        assert_eq!(u.target, "/firmware/fw.bin?X-Amz-Date=1&X-Amz-Signature=ab");
        let u = Url::parse("https://s3.eu-west-1.amazonaws.com/b/k").expect("url");
        assert_eq!((u.tls, u.port, u.target.as_str()), (true, 443, "/b/k"));
        let u = Url::parse("http://[::1]:9000?x=1").expect("url");
        assert_eq!(
            (u.host.as_str(), u.port, u.target.as_str()),
            ("::1", 9000, "/?x=1")
        );
        for bad in [
            "ftp://h/x",
            "h/x",
            "http:///x",
            "http://h:port/x",
            "http://u@h/x",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(redact("http://h/k?X-Amz-Signature=s"), "http://h/k?…");
    }

    #[tokio::test]
    async fn heads_and_bodies() {
        let raw = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\nContent-Range: bytes 0-4/10\r\n\r\nhello";
        let mut r = tokio::io::BufReader::new(&raw[..]);
        let h = read_head(&mut r).await.expect("head");
        assert_eq!(
            (h.status, h.length, h.keep_alive),
            (206, BodyLength::Exact(5), true)
        );
        let raw = b"HTTP/1.1 206 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n";
        let mut r = tokio::io::BufReader::new(&raw[..]);
        let h = read_head(&mut r).await.expect("head");
        assert_eq!((h.length, h.keep_alive), (BodyLength::Chunked, false));
        let mut body = vec![];
        assert!(read_chunked(&mut r, &mut body).await.expect("chunked"));
        assert_eq!(body, b"abcde");
        let raw = b"HTTP/1.1 206 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab";
        let mut r = tokio::io::BufReader::new(&raw[..]);
        read_head(&mut r).await.expect("head");
        let mut body = vec![];
        assert!(!read_chunked(&mut r, &mut body).await.expect("short"));
        let mut r = tokio::io::BufReader::new(&b"SMTP ready\r\n\r\n"[..]);
        assert!(read_head(&mut r).await.is_err());
        // Interim answers are skipped.
        let raw = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\nHTTP/1.1 206 OK\r\nContent-Length: 1\r\n\r\nz";
        let mut r = tokio::io::BufReader::new(&raw[..]);
        let h = read_head(&mut r).await.expect("head");
        assert_eq!((h.status, h.length), (206, BodyLength::Exact(1)));
    }

    #[tokio::test]
    async fn hostile_heads_and_chunks_are_bounded() {
        // A header line without end stops at the head budget.
        let mut raw = b"HTTP/1.1 206 OK\r\nX: ".to_vec();
        raw.extend(std::iter::repeat_n(b'a', 10 * MAX_HEAD));
        let mut r = tokio::io::BufReader::new(&raw[..]);
        assert!(matches!(
            read_head(&mut r).await,
            Err(HttpError::Protocol(_))
        ));
        // A chunk size that would overflow is refused, not wrapped.
        let raw = b"ffffffffffffffff\r\nabc";
        let mut r = tokio::io::BufReader::new(&raw[..]);
        let mut body = b"x".to_vec();
        assert!(matches!(
            read_chunked(&mut r, &mut body).await,
            Err(HttpError::Protocol(_))
        ));
        assert!(Url::parse("http://h/x\r\nEvil: 1").is_err());
        assert_eq!(
            Url::parse("http://h/x?a=1#frag").expect("url").target,
            "/x?a=1"
        );
    }

    #[test]
    fn content_ranges() {
        let resp = |v: &str| Response {
            status: 206,
            headers: vec![("content-range".into(), v.into())],
            body: vec![],
            complete: true,
        };
        assert_eq!(
            resp("bytes 4096-8191/10000").content_range(),
            Some((4096, 8191))
        );
        assert_eq!(resp("bytes */10000").content_range(), None);
    }

    /// What the test server does with the next request.
    #[derive(Clone, Copy)]
    enum Answer {
        Good,
        /// Half of the body, then the connection closes.
        Short,
        Status(u16),
        /// The whole body in 1 KiB pieces, 150 ms apart (a slow link).
        Trickle,
    }

    /// A one-file HTTP server on a free port, plain or TLS, answering Range GETs as the
    /// script says (then Good); returns the port and the number of requests seen.
    async fn server(
        file: Arc<Vec<u8>>,
        script: Vec<Answer>,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let seen = Arc::new(AtomicUsize::new(0));
        let script = Arc::new(std::sync::Mutex::new(script.into_iter()));
        let count = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (file, script, count, tls) =
                    (file.clone(), script.clone(), count.clone(), tls.clone());
                tokio::spawn(async move {
                    let io: Box<dyn Io> = match tls {
                        Some(c) => match tokio_rustls::TlsAcceptor::from(c).accept(tcp).await {
                            Ok(s) => Box::new(s),
                            Err(_) => return,
                        },
                        None => Box::new(tcp),
                    };
                    let mut io = BufStream::new(io);
                    loop {
                        let mut range = None;
                        loop {
                            let mut line = String::new();
                            if io.read_line(&mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            if line.trim().is_empty() {
                                break;
                            }
                            if let Some(r) = line.trim().strip_prefix("Range: bytes=") {
                                let (a, b) = r.split_once('-').expect("range");
                                range = Some((
                                    a.parse::<usize>().expect("a"),
                                    b.parse::<usize>().expect("b"),
                                ));
                            }
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        let answer = script.lock().expect("lock").next().unwrap_or(Answer::Good);
                        let (a, b) = range.expect("a Range header");
                        let body = &file[a..=b];
                        let total = file.len();
                        let head = |status: u16, len: usize| {
                            let range = if status == 206 {
                                format!("Content-Range: bytes {a}-{b}/{total}\r\n")
                            } else {
                                String::new()
                            };
                            format!("HTTP/1.1 {status} X\r\n{range}Content-Length: {len}\r\n\r\n")
                        };
                        let ok = match answer {
                            Answer::Good => {
                                io.write_all(head(206, body.len()).as_bytes()).await.is_ok()
                                    && io.write_all(body).await.is_ok()
                            }
                            Answer::Short => {
                                let _ = io.write_all(head(206, body.len()).as_bytes()).await;
                                let _ = io.write_all(&body[..body.len() / 2]).await;
                                let _ = io.flush().await;
                                return;
                            }
                            Answer::Status(s) => io.write_all(head(s, 0).as_bytes()).await.is_ok(),
                            Answer::Trickle => {
                                let mut ok =
                                    io.write_all(head(206, body.len()).as_bytes()).await.is_ok();
                                for piece in body.chunks(1024) {
                                    ok = ok
                                        && io.write_all(piece).await.is_ok()
                                        && io.flush().await.is_ok();
                                    tokio::time::sleep(Duration::from_millis(150)).await;
                                }
                                ok
                            }
                        };
                        if !ok || io.flush().await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, seen)
    }

    /// Runs one fetch of the whole file and collects what reaches the agent.
    async fn fetch_all(
        url: String,
        file_size: u64,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> (Result<(), HttpError>, Vec<u8>, u64) {
        fetch_all_within(url, file_size, tls, Duration::from_secs(5)).await
    }

    async fn fetch_all_within(
        url: String,
        file_size: u64,
        tls: Option<Arc<rustls::ClientConfig>>,
        timeout: Duration,
    ) -> (Result<(), HttpError>, Vec<u8>, u64) {
        let (shared, _state) = crate::handle::Shared::new();
        let (btx, mut brx) = mpsc::channel(1024);
        let (ctx, _crx) = mpsc::unbounded_channel();
        let sink = Sink {
            blocks: btx.downgrade(),
            control: ctx.downgrade(),
            shared: Arc::new(shared),
        };
        let fetch = Fetch {
            transfer: 1,
            url,
            first_block: 0,
            blocks: 1000,
            block_size: 1000,
            file_size,
        };
        let mut client = Client::new(tls, timeout);
        let r = run_fetch(&mut client, &fetch, &sink).await;
        drop(btx);
        let mut got = Vec::new();
        let mut next = 0;
        while let Some(b) = brx.recv().await {
            let crate::handle::Block::Http {
                block_id, payload, ..
            } = b
            else {
                panic!("not an HTTP block");
            };
            assert_eq!(block_id, next, "blocks in order");
            next += 1;
            got.extend_from_slice(&payload);
        }
        (r, got, next)
    }

    fn file() -> Arc<Vec<u8>> {
        Arc::new((0..10_500u32).map(|i| (i * 7 + i / 256) as u8).collect())
    }

    #[tokio::test]
    async fn short_bodies_and_server_errors_are_retried() {
        let f = file();
        let (port, seen) = server(
            f.clone(),
            vec![Answer::Short, Answer::Status(503), Answer::Good],
            None,
        )
        .await;
        let (r, got, blocks) =
            fetch_all(format!("http://127.0.0.1:{port}/b/k?sig=1"), 10_500, None).await;
        r.expect("fetched");
        assert_eq!(blocks, 11);
        assert_eq!(&got, f.as_ref());
        // Short (keeps 5 whole blocks), 503, then the rest in one.
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_slow_link_progresses_past_the_exchange_timeout() {
        // 10.5 KB at ~6.7 KB/s takes ~1.6 s; the timeout is 1 s, but every piece comes
        // within it.
        let f = file();
        let (port, seen) = server(f.clone(), vec![Answer::Trickle], None).await;
        let (r, got, _) = fetch_all_within(
            format!("http://127.0.0.1:{port}/b/k"),
            10_500,
            None,
            Duration::from_secs(1),
        )
        .await;
        r.expect("fetched");
        assert_eq!(&got, f.as_ref());
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "in one request"
        );
    }

    #[tokio::test]
    async fn refusals_are_reported_with_their_status() {
        let (port, seen) = server(file(), vec![Answer::Status(403)], None).await;
        let (r, got, _) = fetch_all(format!("http://127.0.0.1:{port}/b/k"), 10_500, None).await;
        let e = r.expect_err("403");
        assert_eq!(e.status(), Some(403));
        assert!(e.to_string().contains("expired"), "{e}");
        assert!(got.is_empty());
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "no retry of a 403"
        );
        let (port, seen) = server(file(), vec![Answer::Status(500); 5], None).await;
        let (r, _, _) = fetch_all(format!("http://127.0.0.1:{port}/b/k"), 10_500, None).await;
        assert_eq!(r.expect_err("500").status(), Some(500));
        assert_eq!(
            seen.load(std::sync::atomic::Ordering::SeqCst),
            ATTEMPTS as usize
        );
    }

    #[tokio::test]
    async fn https_with_the_configured_ca() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let server_config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let f = file();
        let (port, _) = server(f.clone(), vec![], Some(Arc::new(server_config))).await;
        let url = format!("https://localhost:{port}/b/k");
        let tls = tls_config(&cert.pem()).expect("ca");
        let (r, got, _) = fetch_all(url.clone(), 10_500, Some(tls)).await;
        r.expect("fetched over TLS");
        assert_eq!(&got, f.as_ref());
        // Without the CA: refused, and not retried.
        let (r, _, _) = fetch_all(url.clone(), 10_500, None).await;
        assert!(matches!(r, Err(HttpError::Tls(_))), "{r:?}");
        let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let other = rcgen::CertificateParams::new(vec!["localhost".into()])
            .expect("params")
            .self_signed(&other)
            .expect("cert");
        let (r, _, _) = fetch_all(url, 10_500, Some(tls_config(&other.pem()).expect("ca"))).await;
        assert!(matches!(r, Err(HttpError::Tls(_))), "{r:?}");
        assert!(tls_config("no pem here").is_err());
    }
}
