//! A small SigV4 client for Updraft's own HTTP API (the same requests the `aws` CLI
//! sends), so the simulator and the demo drive a server — in-process or remote — through
//! its public API path: S3, ACM, Signer and IoT, never by writing rows.

use anyhow::{Context, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;
use updraft_agent::http::{Client, Url};
use updraft_server::auth::uri_encode;

/// Where the API is and who calls it.
#[derive(Clone)]
pub struct Credentials {
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

impl Credentials {
    /// Reads the `credentials` and `config` files a server writes into its data directory
    /// (profile `updraft`).
    pub fn from_data_dir(dir: &Path) -> anyhow::Result<Credentials> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
        };
        let creds = read("credentials")?;
        let value = |text: &str, key: &str| {
            text.lines()
                .filter_map(|l| l.split_once('='))
                .find(|(k, _)| k.trim() == key)
                .map(|(_, v)| v.trim().to_owned())
        };
        let region = read("config")
            .ok()
            .and_then(|c| value(&c, "region"))
            .unwrap_or_else(|| "us-east-1".into());
        Ok(Credentials {
            access_key: value(&creds, "aws_access_key_id").context("no aws_access_key_id")?,
            secret_key: value(&creds, "aws_secret_access_key")
                .context("no aws_secret_access_key")?,
            region,
        })
    }
}

/// The API client: a pool of keep-alive connections, so concurrent callers do not queue
/// behind one another.
pub struct Api {
    base: Url,
    creds: Credentials,
    pool: Mutex<Vec<Client>>,
}

/// An API error with its HTTP status.
#[derive(Debug, thiserror::Error)]
#[error("{service} {method} {path}: HTTP {status}: {body}")]
pub struct ApiError {
    pub service: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub body: String,
}

impl Api {
    pub fn new(base_url: &str, creds: Credentials) -> anyhow::Result<Api> {
        let base = Url::parse(base_url)?;
        if base.tls {
            bail!("the API endpoint must be http:// (got {base_url})");
        }
        Ok(Api {
            base,
            creds,
            pool: Mutex::new(Vec::new()),
        })
    }

    /// One signed request; returns the status, the response headers and the body.
    pub async fn call(
        &self,
        service: &str,
        method: &str,
        path: &str,
        extra: &[(&str, &str)],
        body: &[u8],
    ) -> anyhow::Result<updraft_agent::http::Response> {
        let (path_only, query) = path.split_once('?').unwrap_or((path, ""));
        let amz_date = updraft_server::clock::amz_date(updraft_server::clock::now_ms());
        let payload_hash = hex::encode(Sha256::digest(body));
        let canonical_uri = if service == "s3" {
            path_only.to_owned()
        } else {
            uri_encode(path_only, false)
        };
        let canonical_query =
            updraft_server::auth::canonical_query(updraft_server::auth::query_pairs(query));
        let host = &self.base.authority;
        let canonical = format!(
            "{method}\n{canonical_uri}\n{canonical_query}\nhost:{host}\nx-amz-content-sha256:{payload_hash}\nx-amz-date:{amz_date}\n\nhost;x-amz-content-sha256;x-amz-date\n{payload_hash}"
        );
        let (scope, signature) = updraft_server::auth::signature(
            &self.creds.secret_key,
            &amz_date,
            &self.creds.region,
            service,
            &canonical,
        );
        let auth = format!(
            "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature={signature}",
            self.creds.access_key
        );
        let mut headers: Vec<(&str, &str)> = vec![
            ("Authorization", &auth),
            ("X-Amz-Date", &amz_date),
            ("X-Amz-Content-Sha256", &payload_hash),
        ];
        headers.extend_from_slice(extra);
        let url = Url {
            target: if query.is_empty() {
                path_only.to_owned()
            } else {
                format!("{path_only}?{query}")
            },
            ..self.base.clone()
        };
        let mut client = self
            .pool
            .lock()
            .ok()
            .and_then(|mut p| p.pop())
            .unwrap_or_else(|| Client::new(None, Duration::from_secs(60)));
        let resp = client.send(&url, method, &headers, body).await;
        if let Ok(mut p) = self.pool.lock() {
            p.push(client);
        }
        let resp = resp.with_context(|| format!("{service} {method} {path_only}"))?;
        if resp.status >= 300 {
            return Err(ApiError {
                service: service.into(),
                method: method.into(),
                path: path_only.into(),
                status: resp.status,
                body: String::from_utf8_lossy(&resp.body).into_owned(),
            }
            .into());
        }
        Ok(resp)
    }

    /// A REST-JSON call (IoT, Signer): JSON in, JSON out.
    pub async fn json(
        &self,
        service: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let resp = self
            .call(
                service,
                method,
                path,
                &[("Content-Type", "application/json")],
                body.as_bytes(),
            )
            .await?;
        if resp.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&resp.body).with_context(|| format!("{service} {path}: not JSON"))
    }

    /// An ACM (JSON 1.1) call.
    pub async fn acm(&self, operation: &str, body: Value) -> anyhow::Result<Value> {
        let target = format!("CertificateManager.{operation}");
        let resp = self
            .call(
                "acm",
                "POST",
                "/",
                &[
                    ("X-Amz-Target", &target),
                    ("Content-Type", "application/x-amz-json-1.1"),
                ],
                body.to_string().as_bytes(),
            )
            .await?;
        serde_json::from_slice(&resp.body).with_context(|| format!("acm {operation}: not JSON"))
    }
}
