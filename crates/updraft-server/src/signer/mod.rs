//! The signer service (AWS Signer, rest-json, signing name `signer`): signing platforms,
//! signing profiles and signing jobs, in AWS's shapes. Signer errors carry their code in
//! the body as well as in `x-amzn-ErrorType` ([`crate::error::ErrorShape::Signer`]).
//!
//! - `platforms.rs`  ListSigningPlatforms, GetSigningPlatform, the platform table
//! - `profiles.rs`   PutSigningProfile, GetSigningProfile, ListSigningProfiles, CancelSigningProfile
//! - `jobs.rs`       StartSigningJob, DescribeSigningJob, ListSigningJobs, and the signing itself
//! - `objects.rs`    reading sources and writing signed objects in Updraft's S3 store
//! - `envelope.rs`   the JSON document a signed object is (`JSONEmbedded`)
//! - `crypto.rs`     certificates, keys, signatures (aws-lc-rs)
//! - `kek.rs`        the key-encryption key that seals private keys at rest

pub mod crypto;
pub mod envelope;
pub mod jobs;
pub mod kek;
pub mod objects;
pub mod platforms;
pub mod profiles;

use axum::http::Method;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Map, Value};
use std::collections::BTreeMap;

use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::http::ApiRequest;
use crate::iot::Query;
use crate::server::AppState;
pub use crate::store::Page;
use crate::store::PageRequest;

/// Routes an authenticated `signer` request; errors come back with signer's codes.
pub async fn handle(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    route(state, req).await.map_err(signer_error)
}

async fn route(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let segs: Vec<&str> = req.segments.iter().map(String::as_str).collect();
    match (segs.as_slice(), &req.method) {
        (["signing-platforms"], &Method::GET) => platforms::list(req).await,
        (["signing-platforms", id], &Method::GET) => platforms::get(id).await,
        (["signing-profiles"], &Method::GET) => profiles::list(state, req).await,
        (["signing-profiles", name], &Method::PUT) => profiles::put(state, req, name).await,
        (["signing-profiles", name], &Method::GET) => profiles::get(state, req, name).await,
        (["signing-profiles", name], &Method::DELETE) => profiles::cancel(state, name).await,
        (["signing-jobs"], &Method::POST) => jobs::start_handler(state, req).await,
        (["signing-jobs"], &Method::GET) => jobs::list(state, req).await,
        (["signing-jobs", id], &Method::GET) => jobs::describe(state, id).await,
        _ => Err(ApiError::new(
            ErrorCode::NotImplemented,
            format!(
                "Updraft does not implement {} /{} for signer",
                req.method,
                req.segments.join("/")
            ),
        )),
    }
}

/// The signer code for an error the shared helpers raised in iot's terms.
fn signer_error(e: ApiError) -> ApiError {
    let code = match e.code {
        ErrorCode::InvalidRequest => ErrorCode::Validation,
        ErrorCode::InternalFailure => ErrorCode::InternalServiceError,
        ErrorCode::ResourceAlreadyExists
        | ErrorCode::DeleteConflict
        | ErrorCode::VersionConflict
        | ErrorCode::InvalidStateTransition => ErrorCode::Conflict,
        ErrorCode::LimitExceeded => ErrorCode::ServiceLimitExceeded,
        other => other,
    };
    ApiError::new(code, e.message)
}

/// `maxResults` (signer: 1..25) and `nextToken`.
pub(crate) fn page_request(q: &Query<'_>) -> ApiResult<PageRequest> {
    let limit = q.int("maxResults", 1, 25)?.unwrap_or(25);
    let after = match q.get("nextToken") {
        Some(t) => Some(
            URL_SAFE_NO_PAD
                .decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| ApiError::invalid("The nextToken is not valid."))?,
        ),
        None => None,
    };
    Ok(PageRequest {
        after,
        limit: usize::try_from(limit).unwrap_or(25),
    })
}

/// Adds `nextToken` when more items exist.
pub(crate) fn with_token<T>(mut body: Map<String, Value>, page: &Page<T>) -> Value {
    if let Some(next) = &page.next {
        body.insert(
            "nextToken".into(),
            Value::String(URL_SAFE_NO_PAD.encode(next)),
        );
    }
    Value::Object(body)
}

/// profileName: 2..64 characters of `[a-zA-Z0-9_]`.
pub(crate) fn check_profile_name(field: &str, name: &str) -> ApiResult<()> {
    let len = name.chars().count();
    if !(2..=64).contains(&len) {
        return Err(ApiError::invalid(format!(
            "{field} must be 2 to 64 characters long."
        )));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ApiError::invalid(format!(
            "{field} must satisfy the pattern ^[a-zA-Z0-9_]{{2,}}: letters, digits and underscores (no hyphens)."
        )));
    }
    Ok(())
}

/// An account id parameter (`profileOwner`, `jobInvoker`): 12 digits.
pub(crate) fn check_account(field: &str, value: &str) -> ApiResult<()> {
    if value.len() == 12 && value.bytes().all(|b| b.is_ascii_digit()) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{field} must be a 12-digit account id."
        )))
    }
}

/// Signer's tag map: 1..200 entries; keys 1..128 of `[a-zA-Z+-=._:/]` not starting
/// with `aws:`; values at most 256 characters.
pub(crate) fn check_tags(tags: &BTreeMap<String, String>) -> ApiResult<()> {
    if tags.is_empty() || tags.len() > 200 {
        return Err(ApiError::invalid("tags must have 1 to 200 entries."));
    }
    for (k, v) in tags {
        let len = k.chars().count();
        let allowed =
            |c: char| c.is_ascii_alphabetic() || ('+'..='=').contains(&c) || "._:/".contains(c);
        if !(1..=128).contains(&len) || !k.chars().all(allowed) || k.starts_with("aws:") {
            return Err(ApiError::invalid(format!(
                "Tag key '{k}' must be 1 to 128 characters of ^(?!aws:)[a-zA-Z+-=._:/]+$."
            )));
        }
        if v.chars().count() > 256 {
            return Err(ApiError::invalid(format!(
                "The value of tag '{k}' must be at most 256 characters."
            )));
        }
    }
    Ok(())
}

/// `arn:aws:signer:{region}:{account}:/signing-profiles/{name}`.
pub fn profile_arn(state: &AppState, name: &str) -> String {
    format!(
        "arn:aws:signer:{}:{}:/signing-profiles/{name}",
        state.region, state.account
    )
}

/// `arn:aws:signer:{region}:{account}:/signing-profiles/{name}/{version}`.
pub fn profile_version_arn(state: &AppState, name: &str, version: &str) -> String {
    format!("{}/{version}", profile_arn(state, name))
}

/// Who signing jobs are requested by: the installation's one identity.
pub fn requested_by(state: &AppState) -> String {
    format!("arn:aws:iam::{}:root", state.account)
}

/// Ten random alphanumerics (a profile version).
pub(crate) fn random_version() -> ApiResult<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 10];
    getrandom::fill(&mut bytes).map_err(|e| ApiError::internal(format!("no randomness: {e}")))?;
    Ok(bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect())
}

/// The longest signature validity signer allows: 135 months.
pub const MAX_VALIDITY_MONTHS: i64 = 135;

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn add_months(ms: i64, months: i64) -> i64 {
    const DAY: i64 = 86_400_000;
    let (y, m, d) = crate::clock::civil(ms);
    let time_of_day = ms.rem_euclid(DAY);
    let total = y * 12 + (m - 1) + months;
    let (ny, nm) = (total.div_euclid(12), total.rem_euclid(12) + 1);
    // Clamp the day to the target month's length (Jan 31 + 1 month = Feb 28/29).
    let next_month_start = days_from_civil(ny + i64::from(nm == 12), nm % 12 + 1, 1);
    let month_len = next_month_start - days_from_civil(ny, nm, 1);
    days_from_civil(ny, nm, d.min(month_len)) * DAY + time_of_day
}

/// When a signature made at `ms` with this validity period expires.
pub fn expiry(ms: i64, value: i64, kind: &str) -> i64 {
    match kind {
        "DAYS" => ms.saturating_add(value.saturating_mul(86_400_000)),
        "YEARS" => add_months(ms, value.saturating_mul(12)),
        _ => add_months(ms, value),
    }
}

/// Checks a signature validity period: a positive value of DAYS, MONTHS or YEARS, at
/// most 135 months.
pub(crate) fn check_validity(value: i64, kind: &str) -> ApiResult<()> {
    if !["DAYS", "MONTHS", "YEARS"].contains(&kind) {
        return Err(ApiError::invalid(
            "signatureValidityPeriod.type must be one of DAYS, MONTHS, YEARS.",
        ));
    }
    if value < 1 {
        return Err(ApiError::invalid(
            "signatureValidityPeriod.value must be at least 1.",
        ));
    }
    let now = crate::clock::now_ms();
    if value > 100_000 || expiry(now, value, kind) > add_months(now, MAX_VALIDITY_MONTHS) {
        return Err(ApiError::invalid(format!(
            "signatureValidityPeriod may be at most {MAX_VALIDITY_MONTHS} months."
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_names_follow_the_model() {
        assert!(check_profile_name("profileName", "ota_profile_1").is_ok());
        assert!(check_profile_name("profileName", "p").is_err());
        assert!(check_profile_name("profileName", "has-hyphen").is_err());
        assert!(check_profile_name("profileName", &"a".repeat(65)).is_err());
        assert!(check_profile_name("profileName", &"a".repeat(64)).is_ok());
    }

    #[test]
    fn tags_follow_the_model() {
        let ok = BTreeMap::from([("team:fw/1.0".to_owned(), "x".to_owned())]);
        assert!(check_tags(&ok).is_ok());
        assert!(check_tags(&BTreeMap::new()).is_err());
        let aws = BTreeMap::from([("aws:x".to_owned(), "x".to_owned())]);
        assert!(check_tags(&aws).is_err());
        let space = BTreeMap::from([("a b".to_owned(), "x".to_owned())]);
        assert!(check_tags(&space).is_err());
        let long = BTreeMap::from([("k".to_owned(), "v".repeat(257))]);
        assert!(check_tags(&long).is_err());
    }

    #[test]
    fn validity_periods() {
        // 2024-01-31T12:00:00Z + 1 month = 2024-02-29T12:00:00Z (leap year, clamped).
        let jan31 = crate::clock::parse_iso8601("2024-01-31T12:00:00Z").expect("date");
        assert_eq!(
            expiry(jan31, 1, "MONTHS"),
            crate::clock::parse_iso8601("2024-02-29T12:00:00Z").expect("date")
        );
        assert_eq!(
            expiry(jan31, 135, "MONTHS"),
            crate::clock::parse_iso8601("2035-04-30T12:00:00Z").expect("date")
        );
        assert_eq!(
            expiry(jan31, 2, "YEARS"),
            crate::clock::parse_iso8601("2026-01-31T12:00:00Z").expect("date")
        );
        assert_eq!(expiry(jan31, 10, "DAYS"), jan31 + 10 * 86_400_000);
        assert!(check_validity(135, "MONTHS").is_ok());
        assert!(check_validity(136, "MONTHS").is_err());
        assert!(check_validity(11, "YEARS").is_ok());
        assert!(check_validity(12, "YEARS").is_err());
        assert!(check_validity(0, "DAYS").is_err());
        assert!(check_validity(1, "WEEKS").is_err());
    }

    #[test]
    fn errors_take_signer_codes() {
        assert_eq!(
            signer_error(ApiError::invalid("x")).code,
            ErrorCode::Validation
        );
        assert_eq!(
            signer_error(ApiError::not_found("x")).code,
            ErrorCode::ResourceNotFound
        );
        assert_eq!(
            signer_error(ApiError::internal("x")).code,
            ErrorCode::InternalServiceError
        );
    }
}
