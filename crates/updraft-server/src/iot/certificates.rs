//! Device identity: CreateKeysAndCertificate, DescribeCertificate, UpdateCertificate,
//! ListCertificates, AttachThingPrincipal, DetachThingPrincipal, ListThingPrincipals,
//! and DescribeEndpoint.

use serde_json::{Map, Value, json};
use updraft_protocol::ResourceKind;
use updraft_protocol::ids::THING_NAME;

use super::{Query, check_id, with_token};
use crate::clock::{epoch_seconds, now_ms};
use crate::error::{ApiError, ApiResult, ErrorCode};
use crate::http::ApiRequest;
use crate::server::AppState;
use crate::store::{Certificate, PageRequest};

const STATUSES: [&str; 6] = [
    "ACTIVE",
    "INACTIVE",
    "REVOKED",
    "PENDING_TRANSFER",
    "REGISTER_INACTIVE",
    "PENDING_ACTIVATION",
];

fn check_certificate_id(id: &str) -> ApiResult<()> {
    if id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "certificateId must be 64 hexadecimal characters, not '{id}'"
        )))
    }
}

async fn find(state: &AppState, id: &str) -> ApiResult<Certificate> {
    check_certificate_id(id)?;
    state
        .store
        .get_certificate(&id.to_ascii_lowercase())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Certificate {id} cannot be found.")))
}

pub(super) async fn create_keys_and_certificate(
    state: &AppState,
    req: &ApiRequest,
) -> ApiResult<Value> {
    let active = Query::of(req).bool("setAsActive")?;
    let issued = state
        .device_ca
        .issue_device("Updraft device")
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let now = now_ms();
    state
        .store
        .create_certificate(&Certificate {
            id: issued.id.clone(),
            status: if active { "ACTIVE" } else { "INACTIVE" }.to_owned(),
            pem: issued.certificate_pem.clone(),
            not_before_ms: issued.not_before_ms,
            not_after_ms: issued.not_after_ms,
            created_ms: now,
            updated_ms: now,
        })
        .await?;
    Ok(json!({
        "certificateArn": state.arn(ResourceKind::Cert, &issued.id),
        "certificateId": issued.id,
        "certificatePem": issued.certificate_pem,
        "keyPair": { "PublicKey": issued.public_key_pem, "PrivateKey": issued.private_key_pem },
    }))
}

pub(super) async fn describe(state: &AppState, id: &str) -> ApiResult<Value> {
    let c = find(state, id).await?;
    Ok(json!({
        "certificateDescription": {
            "certificateArn": state.arn(ResourceKind::Cert, &c.id),
            "certificateId": c.id,
            "status": c.status,
            "certificatePem": c.pem,
            "ownedBy": state.account,
            "creationDate": epoch_seconds(c.created_ms),
            "lastModifiedDate": epoch_seconds(c.updated_ms),
            "customerVersion": 1,
            "validity": { "notBefore": epoch_seconds(c.not_before_ms), "notAfter": epoch_seconds(c.not_after_ms) },
            "certificateMode": "DEFAULT",
        }
    }))
}

pub(super) async fn update(state: &AppState, req: &ApiRequest, id: &str) -> ApiResult<Value> {
    let c = find(state, id).await?;
    let status = Query::of(req)
        .get("newStatus")
        .ok_or_else(|| ApiError::invalid("newStatus is required."))?;
    if !STATUSES.contains(&status) {
        return Err(ApiError::invalid(format!(
            "newStatus: '{status}' is not one of [{}]",
            STATUSES.join(", ")
        )));
    }
    if c.status == "REVOKED" && status != "REVOKED" {
        return Err(ApiError::new(
            ErrorCode::CertificateState,
            format!("Certificate {id} is revoked; a revoked certificate cannot change status."),
        ));
    }
    state
        .store
        .set_certificate_status(&c.id, status, now_ms())
        .await?;
    Ok(json!({}))
}

pub(super) async fn list(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let q = Query::of(req);
    // ListCertificates pages with marker/pageSize rather than nextToken/maxResults.
    let limit = q.int("pageSize", 1, 250)?.unwrap_or(100);
    let page = state
        .store
        .list_certificates(&PageRequest {
            after: q.get("marker").map(str::to_owned),
            limit: usize::try_from(limit).unwrap_or(100),
        })
        .await?;
    let items: Vec<Value> = page
        .items
        .iter()
        .map(|c| {
            json!({
                "certificateArn": state.arn(ResourceKind::Cert, &c.id),
                "certificateId": c.id,
                "status": c.status,
                "certificateMode": "DEFAULT",
                "creationDate": epoch_seconds(c.created_ms),
            })
        })
        .collect();
    let mut m = Map::new();
    m.insert("certificates".into(), Value::Array(items));
    if let Some(next) = page.next {
        m.insert("nextMarker".into(), json!(next));
    }
    Ok(Value::Object(m))
}

/// The principal named by the `x-amzn-principal` header: a certificate ARN of this account.
async fn principal(state: &AppState, req: &ApiRequest) -> ApiResult<String> {
    let p = req
        .headers
        .get("x-amzn-principal")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| ApiError::invalid("The x-amzn-principal header is required."))?;
    let arn = super::parse_arn(state, p, &[ResourceKind::Cert])?;
    find(state, &arn.name).await?;
    Ok(p.to_owned())
}

pub(super) async fn attach(state: &AppState, req: &ApiRequest, thing: &str) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, thing)?;
    let exclusive = match Query::of(req).get("thingPrincipalType") {
        None | Some("NON_EXCLUSIVE_THING") => false,
        Some("EXCLUSIVE_THING") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "thingPrincipalType: '{other}' is not one of [EXCLUSIVE_THING, NON_EXCLUSIVE_THING]"
            )));
        }
    };
    let p = principal(state, req).await?;
    state.store.attach_principal(thing, &p, exclusive).await?;
    Ok(json!({}))
}

pub(super) async fn detach(state: &AppState, req: &ApiRequest, thing: &str) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, thing)?;
    if state.store.get_thing(thing).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "Thing {thing} cannot be found."
        )));
    }
    let p = principal(state, req).await?;
    state.store.detach_principal(thing, &p).await?;
    Ok(json!({}))
}

pub(super) async fn list_principals(
    state: &AppState,
    req: &ApiRequest,
    thing: &str,
) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, thing)?;
    if state.store.get_thing(thing).await?.is_none() {
        return Err(ApiError::not_found(format!(
            "Thing {thing} cannot be found."
        )));
    }
    let page = state
        .store
        .list_thing_principals(thing, &Query::of(req).page()?)
        .await?;
    let mut m = Map::new();
    m.insert("principals".into(), json!(page.items));
    Ok(with_token(m, &page))
}

pub(super) async fn describe_endpoint(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let kind = Query::of(req).get("endpointType").unwrap_or("iot:Data");
    let address = match kind {
        "iot:Data" | "iot:Data-ATS" | "iot:Jobs" => state.device_endpoint.clone(),
        "iot:CredentialProvider" => {
            return Err(ApiError::invalid(
                "Updraft has no credential provider endpoint.",
            ));
        }
        other => {
            return Err(ApiError::invalid(format!(
                "endpointType '{other}' is not one of iot:Data, iot:Data-ATS, iot:Jobs"
            )));
        }
    };
    Ok(json!({ "endpointAddress": address }))
}
