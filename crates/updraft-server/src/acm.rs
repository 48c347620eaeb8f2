//! The ACM subset (AWS Certificate Manager, json 1.1, signing name `acm`) that code signing
//! needs: ImportCertificate, DescribeCertificate, ListCertificates, DeleteCertificate.
//!
//! Requests are `POST /` with `X-Amz-Target: CertificateManager.<Operation>` and a json 1.1
//! body whose blobs (certificate, key, chain) are base64. Errors are `{"__type", "message"}`
//! with HTTP 400 for every client error, as ACM sends them. An imported private key is
//! checked against the certificate, sealed under the key-encryption key
//! ([`crate::signer::kek`]) and never returned by any operation.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

use crate::clock::{epoch_seconds, now_ms};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::http::ApiRequest;
use crate::server::AppState;
use crate::signer::crypto::{SigningKey, X509};
use crate::store::{AcmCertificate, PageRequest, ProfileStatus, StoreError};

/// Largest private key ACM imports (its guideline: 5 KB).
const MAX_KEY_BYTES: usize = 5120;

/// Routes an authenticated `acm` request; errors come back with ACM's codes.
pub async fn handle(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    route(state, req).await.map_err(acm_error)
}

async fn route(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let target = req
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let Some(operation) = target.strip_prefix("CertificateManager.") else {
        return Err(ApiError::new(
            ErrorCode::UnknownOperation,
            "ACM requests are POST / with X-Amz-Target: CertificateManager.<Operation>.",
        ));
    };
    if req.method != axum::http::Method::POST || !req.segments.is_empty() {
        return Err(ApiError::new(
            ErrorCode::UnknownOperation,
            "ACM requests are POST /.",
        ));
    }
    match operation {
        "ImportCertificate" => import(state, parse(req)?).await,
        "DescribeCertificate" => describe(state, parse(req)?).await,
        "ListCertificates" => list(state, parse(req)?).await,
        "DeleteCertificate" => delete(state, parse(req)?).await,
        other => Err(ApiError::new(
            ErrorCode::UnknownOperation,
            format!(
                "Updraft does not implement ACM's {other}; it implements ImportCertificate, DescribeCertificate, \
                 ListCertificates and DeleteCertificate."
            ),
        )),
    }
}

/// ACM's code for an error the shared helpers raised in iot's terms.
fn acm_error(e: ApiError) -> ApiError {
    let code = match e.code {
        ErrorCode::InvalidRequest => ErrorCode::AcmValidation,
        ErrorCode::ResourceNotFound => ErrorCode::AcmResourceNotFound,
        ErrorCode::DeleteConflict => ErrorCode::ResourceInUse,
        ErrorCode::ResourceAlreadyExists | ErrorCode::VersionConflict => ErrorCode::AcmConflict,
        ErrorCode::LimitExceeded => ErrorCode::AcmLimitExceeded,
        other => other,
    };
    ApiError::new(code, e.message)
}

fn parse<T: DeserializeOwned>(req: &ApiRequest) -> ApiResult<T> {
    let bytes: &[u8] = if req.body.is_empty() {
        b"{}"
    } else {
        &req.body
    };
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            ErrorCode::Serialization,
            format!("Could not parse the request body: {e}"),
        )
    })
}

/// `arn:aws:acm:{region}:{account}:certificate/{id}`.
pub fn certificate_arn(state: &AppState, id: &str) -> String {
    format!(
        "arn:aws:acm:{}:{}:certificate/{id}",
        state.region, state.account
    )
}

/// Why an ARN names no certificate here.
enum ArnProblem {
    Malformed,
    Elsewhere,
}

/// The certificate id in an ACM certificate ARN of this installation.
fn certificate_id(state: &AppState, arn: &str) -> Result<String, ArnProblem> {
    let mut parts = arn.splitn(6, ':');
    let (Some("arn"), Some(partition), Some("acm"), Some(region), Some(account), Some(res)) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return Err(ArnProblem::Malformed);
    };
    let Some(id) = res.strip_prefix("certificate/") else {
        return Err(ArnProblem::Malformed);
    };
    if !partition.starts_with("aws")
        || id.is_empty()
        || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        || arn.len() > 2048
    {
        return Err(ArnProblem::Malformed);
    }
    if region != state.region || account != state.account {
        return Err(ArnProblem::Elsewhere);
    }
    Ok(id.to_owned())
}

fn arn_error(
    state: &AppState,
    arn: &str,
    problem: ArnProblem,
    invalid_code: ErrorCode,
) -> ApiError {
    match problem {
        ArnProblem::Malformed => ApiError::new(
            invalid_code,
            format!(
                "'{arn}' is not a valid ACM certificate ARN (arn:aws:acm:REGION:ACCOUNT:certificate/ID)."
            ),
        ),
        ArnProblem::Elsewhere => ApiError::not_found(format!(
            "Certificate {arn} is not in this account ({}) and region ({}).",
            state.account, state.region
        )),
    }
}

fn missing(arn: &str) -> ApiError {
    ApiError::not_found(format!("Could not find certificate with arn {arn}."))
}

/// The imported certificate an ARN names (for signer: a malformed ARN is a validation
/// error, a missing certificate is not found).
pub async fn certificate_for_arn(state: &AppState, arn: &str) -> ApiResult<AcmCertificate> {
    let id = certificate_id(state, arn)
        .map_err(|p| arn_error(state, arn, p, ErrorCode::InvalidRequest))?;
    state
        .store
        .get_acm_certificate(&id)
        .await?
        .ok_or_else(|| missing(arn))
}

async fn certificate_in_acm(state: &AppState, arn: Option<String>) -> ApiResult<AcmCertificate> {
    let arn = arn.ok_or_else(|| ApiError::invalid("CertificateArn is required."))?;
    let id = certificate_id(state, &arn)
        .map_err(|p| arn_error(state, &arn, p, ErrorCode::InvalidArn))?;
    state
        .store
        .get_acm_certificate(&id)
        .await?
        .ok_or_else(|| missing(&arn))
}

/// A blob member: base64 on the wire, within the model's size bounds.
fn blob(name: &str, value: Option<&str>, max: usize) -> ApiResult<Option<Vec<u8>>> {
    let Some(v) = value else {
        return Ok(None);
    };
    let bytes = B64.decode(v.trim()).map_err(|_| {
        ApiError::new(
            ErrorCode::Serialization,
            format!("{name} is not valid base64."),
        )
    })?;
    if bytes.is_empty() || bytes.len() > max {
        return Err(ApiError::invalid(format!(
            "{name} must be 1 to {max} bytes long."
        )));
    }
    Ok(Some(bytes))
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AcmTag {
    key: Option<String>,
    value: Option<String>,
}

/// `[\p{L}\p{Z}\p{N}_.:/=+\-@]*`
fn tag_char(c: char) -> bool {
    c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c)
}

fn check_tags(tags: &[AcmTag]) -> ApiResult<BTreeMap<String, String>> {
    if tags.is_empty() {
        return Err(ApiError::invalid("Tags must have at least one tag."));
    }
    if tags.len() > 50 {
        return Err(ApiError::new(
            ErrorCode::TooManyTags,
            "A certificate can have at most 50 tags.",
        ));
    }
    let mut out = BTreeMap::new();
    for t in tags {
        let key = t.key.clone().unwrap_or_default();
        let value = t.value.clone().unwrap_or_default();
        let key_len = key.chars().count();
        if !(1..=128).contains(&key_len)
            || !key.chars().all(tag_char)
            || key.to_ascii_lowercase().starts_with("aws:")
        {
            return Err(ApiError::new(
                ErrorCode::InvalidTag,
                format!(
                    "Tag key '{key}' must be 1 to 128 characters of letters, digits, spaces and _.:/=+-@, not starting with aws:."
                ),
            ));
        }
        if value.chars().count() > 256 || !value.chars().all(tag_char) {
            return Err(ApiError::new(
                ErrorCode::InvalidTag,
                format!(
                    "The value of tag '{key}' must be at most 256 characters of letters, digits, spaces and _.:/=+-@."
                ),
            ));
        }
        out.insert(key, value);
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ImportRequest {
    certificate_arn: Option<String>,
    certificate: Option<String>,
    private_key: Option<String>,
    certificate_chain: Option<String>,
    tags: Option<Vec<AcmTag>>,
}

async fn import(state: &AppState, r: ImportRequest) -> ApiResult<Value> {
    let cert_pem = blob("Certificate", r.certificate.as_deref(), 32768)?
        .ok_or_else(|| ApiError::invalid("Certificate is required."))?;
    let key_pem = blob("PrivateKey", r.private_key.as_deref(), 8192)?
        .ok_or_else(|| ApiError::invalid("PrivateKey is required."))?;
    let chain_pem = blob(
        "CertificateChain",
        r.certificate_chain.as_deref(),
        2_097_152,
    )?;
    let tags = r.tags.as_deref().map(check_tags).transpose()?;
    if key_pem.len() > MAX_KEY_BYTES {
        return Err(ApiError::invalid(format!(
            "The private key must be no larger than 5 KB ({MAX_KEY_BYTES} bytes)."
        )));
    }
    let x509 = X509::from_pem(&cert_pem).map_err(|e| ApiError::invalid(e.to_string()))?;
    if !x509.key_algorithm.acm_supported() {
        return Err(ApiError::invalid(format!(
            "The certificate's key ({}) is not one ACM imports (RSA 1024 to 4096 bits, or EC P-256/P-384/P-521).",
            x509.key_algorithm.acm_name()
        )));
    }
    if x509.issuer.is_empty() {
        return Err(ApiError::invalid(
            "The certificate's Issuer field must not be empty.",
        ));
    }
    let now = now_ms();
    if now < x509.not_before_ms || now > x509.not_after_ms {
        return Err(ApiError::invalid(format!(
            "The certificate is not valid now: it is valid from {} to {}.",
            crate::clock::iso8601(x509.not_before_ms),
            crate::clock::iso8601(x509.not_after_ms)
        )));
    }
    let key = SigningKey::from_pem(&key_pem).map_err(|e| ApiError::invalid(e.to_string()))?;
    if !key.matches(&x509) {
        return Err(ApiError::invalid(
            "The private key does not match the public key in the certificate.",
        ));
    }
    let chain = match &chain_pem {
        Some(pem) => {
            X509::all_from_pem(pem)
                .map_err(|e| ApiError::invalid(format!("CertificateChain: {e}")))?;
            Some(String::from_utf8_lossy(pem).into_owned())
        }
        None => None,
    };
    let pkcs8 = key
        .to_pkcs8()
        .map_err(|e| ApiError::internal(e.to_string()))?;

    let reimport = match &r.certificate_arn {
        Some(arn) => {
            if tags.is_some() {
                return Err(ApiError::invalid(
                    "Tags cannot be given when re-importing a certificate (CertificateArn).",
                ));
            }
            Some(certificate_in_acm(state, Some(arn.clone())).await?)
        }
        None => None,
    };
    let id = reimport
        .as_ref()
        .map(|c| c.id.clone())
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let sealed = state
        .signing_key
        .seal(&pkcs8, &id)
        .map_err(|e| ApiError::internal(format!("cannot seal the private key: {e}")))?;
    let cert = AcmCertificate {
        arn: certificate_arn(state, &id),
        id,
        certificate_pem: x509.to_pem(),
        chain_pem: chain,
        sealed_private_key: sealed,
        key_algorithm: x509.key_algorithm.acm_name(),
        domain_name: x509.domain_name(),
        subject: x509.subject.clone(),
        issuer: x509.issuer.clone(),
        serial: x509.serial.clone(),
        not_before_ms: x509.not_before_ms,
        not_after_ms: x509.not_after_ms,
        tags: tags.unwrap_or_default(),
        created_ms: reimport.as_ref().map_or(now, |c| c.created_ms),
        imported_ms: now,
    };
    if reimport.is_some() {
        state.store.reimport_acm_certificate(&cert).await?;
    } else {
        state.store.create_acm_certificate(&cert).await?;
    }
    tracing::info!(arn = %cert.arn, key = %cert.key_algorithm, "certificate imported");
    Ok(json!({ "CertificateArn": cert.arn }))
}

fn status(c: &AcmCertificate) -> &'static str {
    if now_ms() > c.not_after_ms {
        "EXPIRED"
    } else {
        "ISSUED"
    }
}

/// What ACM shows of a certificate's extensions (read from the stored PEM).
struct Usages {
    sans: Vec<String>,
    key_usages: Vec<&'static str>,
    extended: Vec<(&'static str, String)>,
    signature_algorithm: String,
}

fn usages(c: &AcmCertificate) -> Usages {
    match X509::from_pem(c.certificate_pem.as_bytes()) {
        Ok(x) => {
            let mut sans = x.dns_names.clone();
            if sans.is_empty() {
                sans.extend(c.domain_name.clone());
            }
            Usages {
                sans,
                key_usages: x.key_usages,
                extended: x.extended_key_usages,
                signature_algorithm: x.signature_algorithm,
            }
        }
        Err(_) => Usages {
            sans: c.domain_name.iter().cloned().collect(),
            key_usages: Vec::new(),
            extended: Vec::new(),
            signature_algorithm: String::new(),
        },
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArnRequest {
    certificate_arn: Option<String>,
}

async fn describe(state: &AppState, r: ArnRequest) -> ApiResult<Value> {
    let c = certificate_in_acm(state, r.certificate_arn).await?;
    let u = usages(&c);
    let in_use: Vec<String> = state
        .store
        .profiles_using_certificate(&c.arn)
        .await?
        .into_iter()
        .filter(|p| p.status == ProfileStatus::Active)
        .map(|p| crate::signer::profile_arn(state, &p.name))
        .collect();
    let mut m = Map::new();
    m.insert("CertificateArn".into(), json!(c.arn));
    crate::iot::put_opt(&mut m, "DomainName", c.domain_name.clone());
    if !u.sans.is_empty() {
        m.insert("SubjectAlternativeNames".into(), json!(u.sans));
    }
    m.insert("Serial".into(), json!(c.serial));
    m.insert("Subject".into(), json!(c.subject));
    m.insert("Issuer".into(), json!(c.issuer));
    m.insert("CreatedAt".into(), epoch_seconds(c.created_ms));
    m.insert("ImportedAt".into(), epoch_seconds(c.imported_ms));
    m.insert("Status".into(), json!(status(&c)));
    m.insert("NotBefore".into(), epoch_seconds(c.not_before_ms));
    m.insert("NotAfter".into(), epoch_seconds(c.not_after_ms));
    m.insert("KeyAlgorithm".into(), json!(c.key_algorithm));
    if !u.signature_algorithm.is_empty() {
        m.insert("SignatureAlgorithm".into(), json!(u.signature_algorithm));
    }
    m.insert("InUseBy".into(), json!(in_use));
    m.insert("Type".into(), json!("IMPORTED"));
    m.insert(
        "KeyUsages".into(),
        Value::Array(u.key_usages.iter().map(|n| json!({ "Name": n })).collect()),
    );
    m.insert(
        "ExtendedKeyUsages".into(),
        Value::Array(
            u.extended
                .iter()
                .map(|(n, oid)| json!({ "Name": n, "OID": oid }))
                .collect(),
        ),
    );
    m.insert("RenewalEligibility".into(), json!("INELIGIBLE"));
    Ok(json!({ "Certificate": m }))
}

const STATUSES: &[&str] = &[
    "PENDING_VALIDATION",
    "ISSUED",
    "INACTIVE",
    "EXPIRED",
    "VALIDATION_TIMED_OUT",
    "REVOKED",
    "FAILED",
];
const KEY_TYPES: &[&str] = &[
    "RSA_1024",
    "RSA_2048",
    "RSA_3072",
    "RSA_4096",
    "EC_prime256v1",
    "EC_secp384r1",
    "EC_secp521r1",
];
const KEY_USAGES: &[&str] = &[
    "DIGITAL_SIGNATURE",
    "NON_REPUDIATION",
    "KEY_ENCIPHERMENT",
    "DATA_ENCIPHERMENT",
    "KEY_AGREEMENT",
    "CERTIFICATE_SIGNING",
    "CRL_SIGNING",
    "ENCIPHER_ONLY",
    "DECIPHER_ONLY",
    "ANY",
    "CUSTOM",
];
const EXTENDED_KEY_USAGES: &[&str] = &[
    "TLS_WEB_SERVER_AUTHENTICATION",
    "TLS_WEB_CLIENT_AUTHENTICATION",
    "CODE_SIGNING",
    "EMAIL_PROTECTION",
    "TIME_STAMPING",
    "OCSP_SIGNING",
    "IPSEC_END_SYSTEM",
    "IPSEC_TUNNEL",
    "IPSEC_USER",
    "ANY",
    "NONE",
    "CUSTOM",
];

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Filters {
    extended_key_usage: Option<Vec<String>>,
    key_usage: Option<Vec<String>>,
    key_types: Option<Vec<String>>,
    export_option: Option<String>,
    managed_by: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ListRequest {
    certificate_statuses: Option<Vec<String>>,
    certificate_key_pair_origins: Option<Vec<String>>,
    includes: Option<Filters>,
    next_token: Option<String>,
    max_items: Option<i64>,
    sort_by: Option<String>,
    sort_order: Option<String>,
}

fn check_enum_list(name: &str, values: &Option<Vec<String>>, allowed: &[&str]) -> ApiResult<()> {
    for v in values.iter().flatten() {
        if !allowed.contains(&v.as_str()) {
            return Err(ApiError::new(
                ErrorCode::InvalidArgs,
                format!("{name} value '{v}' is not one of {}.", allowed.join(", ")),
            ));
        }
    }
    Ok(())
}

async fn list(state: &AppState, r: ListRequest) -> ApiResult<Value> {
    check_enum_list("CertificateStatuses", &r.certificate_statuses, STATUSES)?;
    check_enum_list(
        "CertificateKeyPairOrigins",
        &r.certificate_key_pair_origins,
        &["AWS_MANAGED", "ACME", "CUSTOMER_PROVIDED"],
    )?;
    if r.certificate_key_pair_origins
        .as_ref()
        .is_some_and(|o| o.is_empty() || o.len() > 3)
    {
        return Err(ApiError::invalid(
            "CertificateKeyPairOrigins must have 1 to 3 entries.",
        ));
    }
    let includes = r.includes.unwrap_or_default();
    check_enum_list("Includes.keyTypes", &includes.key_types, KEY_TYPES)?;
    check_enum_list("Includes.keyUsage", &includes.key_usage, KEY_USAGES)?;
    check_enum_list(
        "Includes.extendedKeyUsage",
        &includes.extended_key_usage,
        EXTENDED_KEY_USAGES,
    )?;
    if let Some(e) = &includes.export_option
        && !["ENABLED", "DISABLED"].contains(&e.as_str())
    {
        return Err(ApiError::new(
            ErrorCode::InvalidArgs,
            "Includes.exportOption must be ENABLED or DISABLED.",
        ));
    }
    if let Some(m) = &includes.managed_by
        && m != "CLOUDFRONT"
    {
        return Err(ApiError::new(
            ErrorCode::InvalidArgs,
            "Includes.managedBy must be CLOUDFRONT.",
        ));
    }
    if let Some(s) = &r.sort_by
        && s != "CREATED_AT"
    {
        return Err(ApiError::invalid("SortBy must be CREATED_AT."));
    }
    let descending = match r.sort_order.as_deref() {
        None | Some("ASCENDING") => false,
        Some("DESCENDING") => true,
        Some(_) => {
            return Err(ApiError::invalid(
                "SortOrder must be ASCENDING or DESCENDING.",
            ));
        }
    };
    let max = match r.max_items {
        None => 1000,
        Some(n) if (1..=1000).contains(&n) => usize::try_from(n).unwrap_or(1000),
        Some(_) => return Err(ApiError::invalid("MaxItems must be from 1 to 1000.")),
    };
    let mut after = match r.next_token.as_deref() {
        None => None,
        Some(t) => Some(
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(t)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .ok_or_else(|| {
                    ApiError::new(ErrorCode::InvalidArgs, "The NextToken is not valid.")
                })?,
        ),
    };
    // ACM's default: only RSA_1024 and RSA_2048 certificates unless keyTypes says otherwise.
    let key_types: Vec<String> = includes
        .key_types
        .clone()
        .unwrap_or_else(|| vec!["RSA_1024".into(), "RSA_2048".into()]);
    let mut out = Vec::new();
    let mut next = None;
    // Scan in pages, keeping the matches, until `max` matched or the store is exhausted.
    'scan: loop {
        let page = state
            .store
            .list_acm_certificates(
                descending,
                &PageRequest {
                    after: after.clone(),
                    limit: 250,
                },
            )
            .await?;
        for c in &page.items {
            if out.len() == max {
                next = after.clone();
                break 'scan;
            }
            // The store's position after `c` (its (created, id) cursor).
            after = Some(format!("{}:{}", c.created_ms, c.id));
            if !key_types.contains(&c.key_algorithm) {
                continue;
            }
            if let Some(statuses) = &r.certificate_statuses
                && !statuses.iter().any(|s| s == status(c))
            {
                continue;
            }
            let u = usages(c);
            if let Some(ku) = &includes.key_usage
                && !ku
                    .iter()
                    .any(|k| k == "ANY" || u.key_usages.contains(&k.as_str()))
            {
                continue;
            }
            if let Some(eku) = &includes.extended_key_usage
                && !eku.iter().any(|k| {
                    k == "ANY"
                        || (k == "NONE" && u.extended.is_empty())
                        || u.extended.iter().any(|(n, _)| n == k)
                })
            {
                continue;
            }
            let users = state.store.profiles_using_certificate(&c.arn).await?;
            let mut m = Map::new();
            m.insert("CertificateArn".into(), json!(c.arn));
            crate::iot::put_opt(&mut m, "DomainName", c.domain_name.clone());
            if !u.sans.is_empty() {
                m.insert("SubjectAlternativeNameSummaries".into(), json!(u.sans));
            }
            m.insert("HasAdditionalSubjectAlternativeNames".into(), json!(false));
            m.insert("Status".into(), json!(status(c)));
            m.insert("Type".into(), json!("IMPORTED"));
            m.insert("KeyAlgorithm".into(), json!(c.key_algorithm));
            m.insert("KeyUsages".into(), json!(u.key_usages));
            m.insert(
                "ExtendedKeyUsages".into(),
                json!(u.extended.iter().map(|(n, _)| *n).collect::<Vec<_>>()),
            );
            m.insert(
                "InUse".into(),
                json!(users.iter().any(|p| p.status == ProfileStatus::Active)),
            );
            m.insert("RenewalEligibility".into(), json!("INELIGIBLE"));
            m.insert("NotBefore".into(), epoch_seconds(c.not_before_ms));
            m.insert("NotAfter".into(), epoch_seconds(c.not_after_ms));
            m.insert("CreatedAt".into(), epoch_seconds(c.created_ms));
            m.insert("ImportedAt".into(), epoch_seconds(c.imported_ms));
            out.push(Value::Object(m));
        }
        if page.next.is_none() {
            break;
        }
    }
    let mut body = Map::new();
    body.insert("CertificateSummaryList".into(), Value::Array(out));
    if let Some(n) = next {
        body.insert(
            "NextToken".into(),
            json!(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(n)),
        );
    }
    Ok(Value::Object(body))
}

async fn delete(state: &AppState, r: ArnRequest) -> ApiResult<Value> {
    let c = certificate_in_acm(state, r.certificate_arn).await?;
    match state.store.delete_acm_certificate(&c.id).await {
        Ok(()) => Ok(json!({})),
        Err(StoreError::Conflict(m)) => Err(ApiError::new(ErrorCode::ResourceInUse, m)),
        Err(StoreError::NotFound(_)) => Err(missing(&c.arn)),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_rules() {
        let tag = |k: &str, v: &str| AcmTag {
            key: Some(k.into()),
            value: Some(v.into()),
        };
        assert!(check_tags(&[tag("team", "fw 1.0")]).is_ok());
        assert_eq!(
            check_tags(&[tag("aws:x", "y")]).map_err(|e| e.code),
            Err(ErrorCode::InvalidTag)
        );
        assert_eq!(
            check_tags(&[tag("a#b", "y")]).map_err(|e| e.code),
            Err(ErrorCode::InvalidTag)
        );
        let many: Vec<AcmTag> = (0..51).map(|i| tag(&format!("k{i}"), "v")).collect();
        assert_eq!(
            check_tags(&many).map_err(|e| e.code),
            Err(ErrorCode::TooManyTags)
        );
    }

    #[test]
    fn errors_take_acm_codes() {
        assert_eq!(
            acm_error(ApiError::invalid("x")).code,
            ErrorCode::AcmValidation
        );
        assert_eq!(
            acm_error(ApiError::not_found("x")).code,
            ErrorCode::AcmResourceNotFound
        );
        assert_eq!(
            acm_error(ApiError::new(ErrorCode::InvalidArn, "x")).code,
            ErrorCode::InvalidArn
        );
    }
}
