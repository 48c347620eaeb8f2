//! Signing profiles: PutSigningProfile, GetSigningProfile, ListSigningProfiles,
//! CancelSigningProfile. A profile names a certificate imported into ACM, a platform, the
//! signing parameters (`certname`: the certificate's path on the device) and how long
//! signatures stay valid. Profiles are not edited: a name is used once (a canceled
//! profile's name stays taken, as on AWS).

use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;

use super::crypto::X509;
use super::platforms::{self, Platform};
use super::{
    check_account, check_profile_name, check_tags, check_validity, page_request, profile_arn,
    profile_version_arn, random_version, with_token,
};
use crate::error::{ApiError, ApiResult};
use crate::http::ApiRequest;
use crate::iot::{Query, body};
use crate::server::AppState;
use crate::store::{ProfileFilter, ProfileStatus, SigningProfile, StoreError};

/// Default signature validity: 135 months.
pub const DEFAULT_VALIDITY: (i64, &str) = (135, "MONTHS");

/// The signing parameter that names the certificate's path on the device.
pub const CERTNAME: &str = "certname";

/// A profile to create, from PutSigningProfile or from CreateOTAUpdate's
/// `signingProfileParameter`.
#[derive(Debug, Clone, PartialEq)]
pub struct ProfileSpec {
    pub name: String,
    pub platform_id: String,
    pub certificate_arn: String,
    pub signing_parameters: BTreeMap<String, String>,
    pub validity_value: i64,
    pub validity_type: String,
    pub overrides: Option<Value>,
    pub tags: BTreeMap<String, String>,
}

/// Checks everything about a new profile except whether its name is free: the platform
/// (one Updraft can sign for), the certificate (imported here, of a key type the platform
/// signs with), overrides, parameters, validity, tags. Changes nothing.
pub async fn validate(state: &AppState, spec: &ProfileSpec) -> ApiResult<&'static Platform> {
    check_profile_name("profileName", &spec.name)?;
    let platform = platforms::find(&spec.platform_id).ok_or_else(|| {
        ApiError::not_found(format!(
            "The signing platform {} does not exist; see ListSigningPlatforms.",
            spec.platform_id
        ))
    })?;
    if let Some(why) = platform.unsupported {
        return Err(ApiError::invalid(why));
    }
    if let Some(o) = &spec.overrides {
        platform.check_overrides(o)?;
    }
    let cert = crate::acm::certificate_for_arn(state, &spec.certificate_arn).await?;
    let x509 = X509::from_pem(cert.certificate_pem.as_bytes())
        .map_err(|e| ApiError::internal(format!("stored certificate is unreadable: {e}")))?;
    let (_, encryption) = platform.algorithms(spec.overrides.as_ref());
    let usable = match x509.key_algorithm {
        super::crypto::KeyAlgorithm::EcP256 => encryption == "ECDSA",
        super::crypto::KeyAlgorithm::Rsa(_) => encryption == "RSA",
        _ => false,
    };
    if !usable {
        return Err(ApiError::invalid(format!(
            "Certificate {} has a {} key, but platform {} signs with {encryption}{}.",
            spec.certificate_arn,
            cert.key_algorithm,
            platform.id,
            if encryption == "ECDSA" {
                " on P-256 (EC_prime256v1)"
            } else {
                ""
            }
        )));
    }
    for (k, v) in &spec.signing_parameters {
        if k.is_empty() {
            return Err(ApiError::invalid(
                "signingParameters keys must not be empty.",
            ));
        }
        if k == CERTNAME && v.trim().is_empty() {
            return Err(ApiError::invalid(
                "signingParameters.certname must name the certificate's path on the device.",
            ));
        }
    }
    if platform.partner == "AmazonFreeRTOS" && !spec.signing_parameters.contains_key(CERTNAME) {
        return Err(ApiError::invalid(format!(
            "Platform {} needs signingParameters certname=<path of the certificate on the device> \
             (it becomes certfile in OTA job documents).",
            platform.id
        )));
    }
    check_validity(spec.validity_value, &spec.validity_type)?;
    if !spec.tags.is_empty() {
        check_tags(&spec.tags)?;
    }
    Ok(platform)
}

/// Validates and records a new Active profile.
pub async fn create(state: &AppState, spec: &ProfileSpec) -> ApiResult<SigningProfile> {
    validate(state, spec).await?;
    let now = crate::clock::now_ms();
    let profile = SigningProfile {
        name: spec.name.clone(),
        version: random_version()?,
        platform_id: spec.platform_id.clone(),
        certificate_arn: spec.certificate_arn.clone(),
        signing_parameters: spec.signing_parameters.clone(),
        validity_value: spec.validity_value,
        validity_type: spec.validity_type.clone(),
        overrides: spec.overrides.clone(),
        status: ProfileStatus::Active,
        tags: spec.tags.clone(),
        created_ms: now,
        updated_ms: now,
    };
    state
        .store
        .create_signing_profile(&profile)
        .await
        .map_err(|e| match e {
            StoreError::AlreadyExists(_) => taken(&spec.name),
            e => e.into(),
        })?;
    Ok(profile)
}

fn taken(name: &str) -> ApiError {
    ApiError::new(
        crate::error::ErrorCode::ResourceAlreadyExists,
        format!(
            "A signing profile named {name} already exists (profile names are not reused, even after cancellation)."
        ),
    )
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SigningMaterial {
    certificate_arn: Option<String>,
}

#[derive(Debug, Deserialize)]
struct ValidityPeriod {
    value: Option<i64>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PutRequest {
    signing_material: Option<SigningMaterial>,
    signature_validity_period: Option<ValidityPeriod>,
    platform_id: Option<String>,
    overrides: Option<Value>,
    signing_parameters: Option<BTreeMap<String, String>>,
    tags: Option<BTreeMap<String, String>>,
}

/// PUT /signing-profiles/{profileName}
pub(super) async fn put(state: &AppState, req: &ApiRequest, name: &str) -> ApiResult<Value> {
    check_profile_name("profileName", name)?;
    let r: PutRequest = body(req)?;
    let platform_id = r
        .platform_id
        .ok_or_else(|| ApiError::invalid("platformId is required."))?;
    let certificate_arn = r
        .signing_material
        .and_then(|m| m.certificate_arn)
        .ok_or_else(|| ApiError::invalid("signing material cannot be null."))?;
    let (validity_value, validity_type) = match r.signature_validity_period {
        None => (DEFAULT_VALIDITY.0, DEFAULT_VALIDITY.1.to_owned()),
        Some(ValidityPeriod { value, kind }) => (
            value.ok_or_else(|| ApiError::invalid("signatureValidityPeriod.value is required."))?,
            kind.ok_or_else(|| ApiError::invalid("signatureValidityPeriod.type is required."))?,
        ),
    };
    if let Some(tags) = &r.tags {
        check_tags(tags)?;
    }
    if state.store.get_signing_profile(name).await?.is_some() {
        return Err(taken(name));
    }
    let spec = ProfileSpec {
        name: name.to_owned(),
        platform_id,
        certificate_arn,
        signing_parameters: r.signing_parameters.unwrap_or_default(),
        validity_value,
        validity_type,
        overrides: r.overrides,
        tags: r.tags.unwrap_or_default(),
    };
    let p = create(state, &spec).await?;
    Ok(json!({
        "arn": profile_arn(state, &p.name),
        "profileVersion": p.version,
        "profileVersionArn": profile_version_arn(state, &p.name, &p.version),
    }))
}

/// The SigningProfile shape (ListSigningProfiles); GetSigningProfile adds to it.
fn profile_json(state: &AppState, p: &SigningProfile) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("profileName".into(), json!(p.name));
    m.insert("profileVersion".into(), json!(p.version));
    m.insert(
        "profileVersionArn".into(),
        json!(profile_version_arn(state, &p.name, &p.version)),
    );
    m.insert(
        "signingMaterial".into(),
        json!({ "certificateArn": p.certificate_arn }),
    );
    m.insert(
        "signatureValidityPeriod".into(),
        json!({ "value": p.validity_value, "type": p.validity_type }),
    );
    m.insert("platformId".into(), json!(p.platform_id));
    if let Some(platform) = platforms::find(&p.platform_id) {
        m.insert("platformDisplayName".into(), json!(platform.display_name));
    }
    m.insert("signingParameters".into(), json!(p.signing_parameters));
    m.insert("status".into(), json!(p.status.as_str()));
    m.insert("arn".into(), json!(profile_arn(state, &p.name)));
    if !p.tags.is_empty() {
        m.insert("tags".into(), json!(p.tags));
    }
    m
}

fn check_owner(state: &AppState, q: &Query<'_>) -> ApiResult<()> {
    if let Some(owner) = q.get("profileOwner") {
        check_account("profileOwner", owner)?;
        if owner != state.account {
            return Err(ApiError::not_found(format!(
                "Account {owner} has no signing profiles here; this installation is account {}.",
                state.account
            )));
        }
    }
    Ok(())
}

fn not_found(name: &str) -> ApiError {
    ApiError::not_found(format!("The signing profile {name} does not exist."))
}

/// GET /signing-profiles/{profileName}
pub(super) async fn get(state: &AppState, req: &ApiRequest, name: &str) -> ApiResult<Value> {
    check_profile_name("profileName", name)?;
    check_owner(state, &Query::of(req))?;
    let p = state
        .store
        .get_signing_profile(name)
        .await?
        .ok_or_else(|| not_found(name))?;
    let mut m = profile_json(state, &p);
    if let Some(o) = &p.overrides {
        m.insert("overrides".into(), o.clone());
    }
    if p.status != ProfileStatus::Active {
        m.insert(
            "statusReason".into(),
            json!(format!(
                "The profile was {}.",
                p.status.as_str().to_lowercase()
            )),
        );
    }
    Ok(Value::Object(m))
}

/// GET /signing-profiles
pub(super) async fn list(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let q = Query::of(req);
    let page = page_request(&q)?;
    let include_canceled = q.bool("includeCanceled")?;
    let mut statuses = Vec::new();
    for (k, v) in &req.query {
        if k == "statuses" {
            let s: ProfileStatus = v
                .parse()
                .map_err(|e: String| ApiError::invalid(format!("statuses: {e}")))?;
            if !statuses.contains(&s) {
                statuses.push(s);
            }
        }
    }
    if statuses.is_empty() {
        statuses = vec![ProfileStatus::Active, ProfileStatus::Revoked];
    }
    if include_canceled && !statuses.contains(&ProfileStatus::Canceled) {
        statuses.push(ProfileStatus::Canceled);
    }
    let filter = ProfileFilter {
        statuses,
        platform_id: q.get("platformId").map(str::to_owned),
    };
    let found = state.store.list_signing_profiles(&filter, &page).await?;
    let mut m = Map::new();
    m.insert(
        "profiles".into(),
        Value::Array(
            found
                .items
                .iter()
                .map(|p| Value::Object(profile_json(state, p)))
                .collect(),
        ),
    );
    Ok(with_token(m, &found))
}

/// DELETE /signing-profiles/{profileName}: Active → Canceled. Canceling a canceled
/// profile changes nothing and succeeds.
pub(super) async fn cancel(state: &AppState, name: &str) -> ApiResult<Value> {
    check_profile_name("profileName", name)?;
    let now = crate::clock::now_ms();
    match state
        .store
        .set_signing_profile_status(name, ProfileStatus::Canceled, now)
        .await
    {
        Ok(_) => Ok(json!({})),
        Err(StoreError::NotFound(_)) => Err(not_found(name)),
        Err(StoreError::InvalidState(m)) => match state.store.get_signing_profile(name).await? {
            Some(p) if p.status == ProfileStatus::Canceled => Ok(json!({})),
            _ => Err(ApiError::invalid(m)),
        },
        Err(e) => Err(e.into()),
    }
}
