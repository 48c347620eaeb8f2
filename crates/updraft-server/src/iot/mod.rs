//! The AWS IoT control plane (`iot` service): things, thing groups, streams, jobs,
//! job executions and OTA updates, in the AWS rest-json shapes.
//!
//! Each resource module owns its handlers; this module routes a request to them and
//! holds the request helpers they share (query parsing, paging tokens, body parsing).

mod certificates;
mod continuous;
mod executions;
mod groups;
mod job_config;
mod jobs;
pub mod ota;
mod ota_signing;
mod streams;
mod things;

use axum::http::Method;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde_json::Value;
use updraft_protocol::ids::Rule;
use updraft_protocol::{Arn, ResourceKind};

use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::http::ApiRequest;
use crate::server::AppState;
use crate::store::{Page, PageRequest};

/// Routes an authenticated `iot` request.
pub async fn handle(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let segs: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    let m = &req.method;
    match (segs.as_slice(), m) {
        (["things"], &Method::GET) => things::list(state, req).await,
        (["things", name], &Method::POST) => things::create(state, req, name).await,
        (["things", name], &Method::GET) => things::describe(state, name).await,
        (["things", name], &Method::PATCH) => things::update(state, req, name).await,
        (["things", name], &Method::DELETE) => things::delete(state, req, name).await,
        (["things", name, "principals"], &Method::PUT) => {
            certificates::attach(state, req, name).await
        }
        (["things", name, "principals"], &Method::DELETE) => {
            certificates::detach(state, req, name).await
        }
        (["things", name, "principals"], &Method::GET) => {
            certificates::list_principals(state, req, name).await
        }
        (["keys-and-certificate"], &Method::POST) => {
            certificates::create_keys_and_certificate(state, req).await
        }
        (["certificates"], &Method::GET) => certificates::list(state, req).await,
        (["certificates", id], &Method::GET) => certificates::describe(state, id).await,
        (["certificates", id], &Method::PUT) => certificates::update(state, req, id).await,
        (["endpoint"], &Method::GET) => certificates::describe_endpoint(state, req).await,
        (["things", name, "thing-groups"], &Method::GET) => {
            groups::list_for_thing(state, req, name).await
        }
        (["things", name, "jobs"], &Method::GET) => {
            executions::list_for_thing(state, req, name).await
        }
        (["things", thing, "jobs", job], &Method::GET) => {
            executions::describe(state, req, thing, job).await
        }
        (["things", thing, "jobs", job, "cancel"], &Method::PUT) => {
            executions::cancel(state, req, thing, job).await
        }
        (["things", thing, "jobs", job, "executionNumber", n], &Method::DELETE) => {
            executions::delete(state, req, thing, job, n).await
        }
        (["thing-groups"], &Method::GET) => groups::list(state, req).await,
        (["thing-groups", "addThingToThingGroup"], &Method::PUT) => {
            groups::add_thing(state, req).await
        }
        (["thing-groups", "removeThingFromThingGroup"], &Method::PUT) => {
            groups::remove_thing(state, req).await
        }
        (["thing-groups", name], &Method::POST) => groups::create(state, req, name).await,
        (["thing-groups", name], &Method::GET) => groups::describe(state, name).await,
        (["thing-groups", name], &Method::DELETE) => groups::delete(state, req, name).await,
        (["thing-groups", name, "things"], &Method::GET) => {
            groups::list_things(state, req, name).await
        }
        (["streams"], &Method::GET) => streams::list(state, req).await,
        (["streams", id], &Method::POST) => streams::create(state, req, id).await,
        (["streams", id], &Method::GET) => streams::describe(state, id).await,
        (["streams", id], &Method::PUT) => streams::update(state, req, id).await,
        (["streams", id], &Method::DELETE) => streams::delete(state, id).await,
        (["jobs"], &Method::GET) => jobs::list(state, req).await,
        (["jobs", id], &Method::PUT) => jobs::create(state, req, id).await,
        (["jobs", id], &Method::GET) => jobs::describe(state, req, id).await,
        (["jobs", id], &Method::PATCH) => jobs::update(state, req, id).await,
        (["jobs", id], &Method::DELETE) => jobs::delete(state, req, id).await,
        (["jobs", id, "cancel"], &Method::PUT) => jobs::cancel(state, req, id).await,
        (["jobs", id, "job-document"], &Method::GET) => jobs::document(state, id).await,
        (["jobs", id, "things"], &Method::GET) => executions::list_for_job(state, req, id).await,
        (["otaUpdates"], &Method::GET) => ota::list(state, req).await,
        (["otaUpdates", id], &Method::POST) => ota::create(state, req, id).await,
        (["otaUpdates", id], &Method::GET) => ota::get(state, id).await,
        (["otaUpdates", id], &Method::DELETE) => ota::delete(state, req, id).await,
        _ => Err(ApiError::new(
            ErrorCode::NotImplemented,
            format!(
                "Updraft does not implement {} /{} for iot",
                m,
                req.segments.join("/")
            ),
        )),
    }
}

/// (bucket, key) of a documentSource URL: `https://s3.amazonaws.com/b/k`,
/// `https://s3.<region>.amazonaws.com/b/k`, `https://b.s3[.<region>].amazonaws.com/k`, or `s3://b/k`.
pub fn parse_s3_url(url: &str) -> Option<(String, String)> {
    let decode = crate::auth::percent_decode;
    if let Some(rest) = url.strip_prefix("s3://") {
        let (b, k) = rest.split_once('/')?;
        return (!b.is_empty() && !k.is_empty()).then(|| (b.to_owned(), decode(k)));
    }
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let (host, path) = rest.split_once('/')?;
    let host = host.split(':').next()?;
    let is_s3_host = |h: &str| h == "s3" || (h.starts_with("s3.") || h.starts_with("s3-"));
    if let Some(prefix) = host.strip_suffix(".amazonaws.com") {
        if is_s3_host(prefix) {
            let (b, k) = path.split_once('/')?;
            return (!b.is_empty() && !k.is_empty()).then(|| (b.to_owned(), decode(k)));
        }
        if let Some(i) = prefix.find(".s3") {
            let bucket = &prefix[..i];
            return (!bucket.is_empty() && !path.is_empty())
                .then(|| (bucket.to_owned(), decode(path)));
        }
    }
    None
}

/// The query string of a request, with typed accessors that answer bad values with
/// InvalidRequestException.
pub(crate) struct Query<'a>(&'a [(String, String)]);

impl<'a> Query<'a> {
    pub fn of(req: &'a ApiRequest) -> Self {
        Query(&req.query)
    }

    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn bool(&self, key: &str) -> ApiResult<bool> {
        match self.get(key) {
            None => Ok(false),
            Some("true") => Ok(true),
            Some("false") => Ok(false),
            Some(v) => Err(ApiError::invalid(format!(
                "{key} must be true or false, not '{v}'"
            ))),
        }
    }

    pub fn int(&self, key: &str, min: i64, max: i64) -> ApiResult<Option<i64>> {
        let Some(v) = self.get(key) else {
            return Ok(None);
        };
        match v.parse::<i64>() {
            Ok(n) if (min..=max).contains(&n) => Ok(Some(n)),
            _ => Err(ApiError::invalid(format!(
                "{key} must be an integer from {min} to {max}, not '{v}'"
            ))),
        }
    }

    /// A string parameter checked against a model rule.
    pub fn checked(&self, key: &'static str, rule: &Rule) -> ApiResult<Option<&'a str>> {
        match self.get(key) {
            Some(v) => {
                rule.check(key, v)?;
                Ok(Some(v))
            }
            None => Ok(None),
        }
    }

    /// An enum parameter.
    pub fn parsed<T: std::str::FromStr>(&self, key: &str) -> ApiResult<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        self.get(key)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|e| ApiError::invalid(format!("{key}: {e}")))
            })
            .transpose()
    }

    /// `maxResults` (1..250) and `nextToken`.
    pub fn page(&self) -> ApiResult<PageRequest> {
        let limit = self.int("maxResults", 1, 250)?.unwrap_or(100);
        let after = self.get("nextToken").map(decode_token).transpose()?;
        Ok(PageRequest {
            after,
            limit: usize::try_from(limit).unwrap_or(100),
        })
    }
}

fn decode_token(token: &str) -> ApiResult<String> {
    URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| ApiError::invalid("The nextToken is not valid."))
}

/// Adds `nextToken` to a list response when more items exist.
pub(crate) fn with_token<T>(mut body: serde_json::Map<String, Value>, page: &Page<T>) -> Value {
    if let Some(next) = &page.next {
        body.insert(
            "nextToken".into(),
            Value::String(URL_SAFE_NO_PAD.encode(next)),
        );
    }
    Value::Object(body)
}

/// Parses a JSON request body (an absent body is `{}`).
pub(crate) fn body<T: DeserializeOwned>(req: &ApiRequest) -> ApiResult<T> {
    let bytes: &[u8] = if req.body.is_empty() {
        b"{}"
    } else {
        &req.body
    };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("Could not parse the request body: {e}")))
}

/// Checks a path label against its rule.
pub(crate) fn check_id(field: &'static str, rule: &Rule, value: &str) -> ApiResult<()> {
    rule.check(field, value).map_err(ApiError::from)
}

/// Resolves an IoT ARN that must name a resource of `kind` in this installation.
pub(crate) fn parse_arn(state: &AppState, arn: &str, kinds: &[ResourceKind]) -> ApiResult<Arn> {
    let parsed = Arn::parse(arn).map_err(|e| ApiError::invalid(e.to_string()))?;
    if !kinds.contains(&parsed.kind) {
        return Err(ApiError::invalid(format!(
            "'{arn}' is not a {} ARN",
            kinds
                .iter()
                .map(|k| k.segment())
                .collect::<Vec<_>>()
                .join(" or ")
        )));
    }
    if parsed.account != state.account || parsed.region != state.region {
        return Err(ApiError::not_found(format!(
            "'{arn}' is not in this account ({}) and region ({})",
            state.account, state.region
        )));
    }
    Ok(parsed)
}

/// Inserts `key: value` when `value` is present.
pub(crate) fn put_opt(
    m: &mut serde_json::Map<String, Value>,
    key: &str,
    value: Option<impl Into<Value>>,
) {
    if let Some(v) = value {
        m.insert(key.to_owned(), v.into());
    }
}

/// Validates the `tags` member shared by several create operations.
pub(crate) fn check_tags(tags: &Option<Vec<Tag>>) -> ApiResult<()> {
    use updraft_protocol::ids::{TAG_KEY, TAG_VALUE};
    for t in tags.iter().flatten() {
        TAG_KEY.check("tags.Key", &t.key)?;
        TAG_VALUE.check("tags.Value", t.value.as_deref().unwrap_or(""))?;
    }
    Ok(())
}

#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub(crate) struct Tag {
    #[serde(rename = "Key")]
    pub key: String,
    #[serde(rename = "Value", skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}
