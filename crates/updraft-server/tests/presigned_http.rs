//! Devices' HTTP downloads end to end, over a real socket: pre-signed `Range` GETs on one
//! keep-alive connection (the second and later answered from the verified-URL cache),
//! tampered and expired URLs refused exactly as a first request would be, HEAD, the
//! health check, and a graceful shutdown that does not wait for idle connections.

mod common;

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use common::{TempDir, WAIT, file_bytes, put_object};
use updraft_server::auth::presign_s3_get;
use updraft_server::clock::now_ms;
use updraft_server::config::{FileConfig, ServerConfig};
use updraft_server::server::{AppState, Server};

/// One answer: status, headers (names lowercase), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A minimal HTTP/1.1 keep-alive client: what a device's download loop does.
struct Conn {
    io: BufReader<TcpStream>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        Conn {
            io: BufReader::new(tcp),
        }
    }

    async fn ask(&mut self, method: &str, target: &str, extra: &str) -> Answer {
        tokio::time::timeout(WAIT, self.exchange(method, target, extra))
            .await
            .expect("an answer in time")
    }

    async fn exchange(&mut self, method: &str, target: &str, extra: &str) -> Answer {
        let req = format!("{method} {target} HTTP/1.1\r\nHost: {HOST}\r\n{extra}\r\n");
        self.io
            .get_mut()
            .write_all(req.as_bytes())
            .await
            .expect("send");
        let mut line = String::new();
        self.io.read_line(&mut line).await.expect("status line");
        let status = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("a status code");
        let mut headers = Vec::new();
        loop {
            line.clear();
            self.io.read_line(&mut line).await.expect("header line");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').expect("a header");
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let mut answer = Answer {
            status,
            headers,
            body: Vec::new(),
        };
        if method != "HEAD" {
            let len: usize = answer
                .header("content-length")
                .and_then(|v| v.parse().ok())
                .expect("a content length");
            answer.body = vec![0; len];
            self.io
                .read_exact(&mut answer.body)
                .await
                .expect("the body");
        }
        answer
    }
}

/// The host the URLs are signed for and the client sends.
const HOST: &str = "updraft.test:8080";

/// A pre-signed GET target (path and query) for `fw/<key>`, signed at `signed_ms`.
fn presigned(state: &AppState, key: &str, signed_ms: i64, expires: i64) -> String {
    let (access, secret) = state.keys.primary().expect("a key");
    let base = format!("http://{HOST}");
    let url = presign_s3_get(
        &base,
        "fw",
        key,
        access,
        secret,
        "us-east-1",
        signed_ms,
        expires,
    );
    url.strip_prefix(&base).expect("same base").to_owned()
}

#[tokio::test]
async fn presigned_range_downloads_over_one_connection() {
    let dir = TempDir::new("presigned-http");
    let config = ServerConfig::resolve(FileConfig {
        data_dir: Some(dir.0.clone()),
        http: Some("127.0.0.1:0".into()),
        ..FileConfig::default()
    })
    .expect("config");
    let server = Server::start(&config).await.expect("server");
    let addr = server.http_addr;
    let state = server.state().clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    let data = file_bytes(100_000, 7);
    put_object(&state, "fw", "image.bin", &data).await;
    let url = presigned(&state, "image.bin", now_ms(), 3600);

    let mut c = Conn::open(addr).await;
    for (start, end) in [(0usize, 4095usize), (4096, 8191), (99_000, 99_999), (0, 0)] {
        let a = c
            .ask("GET", &url, &format!("Range: bytes={start}-{end}\r\n"))
            .await;
        assert_eq!(a.status, 206, "bytes {start}-{end}");
        assert_eq!(a.body, data[start..=end]);
        assert_eq!(
            a.header("content-range"),
            Some(format!("bytes {start}-{end}/100000").as_str())
        );
        assert_eq!(a.header("accept-ranges"), Some("bytes"));
        assert!(a.header("etag").is_some() && a.header("last-modified").is_some());
        let id = a.header("x-amz-request-id").expect("a request id");
        assert_eq!(a.header("x-amzn-requestid"), Some(id));
    }
    let whole = c.ask("GET", &url, "").await;
    assert_eq!((whole.status, whole.body.len()), (200, data.len()));
    assert_eq!(whole.body, data);
    let head = c.ask("HEAD", &url, "").await;
    // HEAD is signed separately: this GET URL does not authorize it.
    assert_eq!(head.status, 403);

    // Any byte different is refused, before and after the genuine URL was remembered.
    let tampered = url.replace("image.bin", "image.bim");
    let a = c.ask("GET", &tampered, "Range: bytes=0-9\r\n").await;
    assert_eq!(a.status, 403);
    let text = String::from_utf8_lossy(&a.body);
    assert!(text.contains("SignatureDoesNotMatch"));
    // The error names the request id its headers carry.
    let id = a.header("x-amz-request-id").expect("a request id");
    assert!(
        text.contains(&format!("<RequestId>{id}</RequestId>")),
        "{text}"
    );
    assert_eq!(a.header("x-amzn-requestid"), Some(id));
    let flipped = if url.ends_with('0') { "1" } else { "0" };
    let bad_signature = format!("{}{flipped}", &url[..url.len() - 1]);
    let a = c.ask("GET", &bad_signature, "Range: bytes=0-9\r\n").await;
    assert_eq!(a.status, 403);
    assert!(String::from_utf8_lossy(&a.body).contains("SignatureDoesNotMatch"));

    // Expired: refused as it always was.
    let old = presigned(&state, "image.bin", now_ms() - 7_200_000, 60);
    let a = c.ask("GET", &old, "Range: bytes=0-9\r\n").await;
    assert_eq!(a.status, 403);
    let text = String::from_utf8_lossy(&a.body);
    assert!(text.contains("AccessDenied") && text.contains("Request has expired"));

    // The genuine URL still works on the same connection.
    let a = c.ask("GET", &url, "Range: bytes=10-19\r\n").await;
    assert_eq!((a.status, a.body.as_slice()), (206, &data[10..20]));

    // The health check, and what the router used to answer for other methods.
    let h = c.ask("GET", "/health", "").await;
    assert_eq!(h.status, 200);
    assert_eq!(h.body, br#"{"status":"ok"}"#);
    let h = c.ask("HEAD", "/health", "").await;
    assert_eq!((h.status, h.header("content-length")), (200, Some("15")));
    let h = c.ask("POST", "/health", "Content-Length: 0\r\n").await;
    assert_eq!((h.status, h.header("allow")), (405, Some("GET,HEAD")));

    // Many short connections come and go (the server forgets them as they end).
    for _ in 0..150 {
        let mut short = Conn::open(addr).await;
        assert_eq!(short.ask("GET", "/health", "").await.status, 200);
    }

    // Shutdown does not wait for a connection that is only kept alive.
    let _idle = Conn::open(addr).await;
    let _ = stop_tx.send(());
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the server stops")
        .expect("the server task")
        .expect("a clean stop");
}
