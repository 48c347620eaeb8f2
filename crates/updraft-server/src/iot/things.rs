//! Things: CreateThing, DescribeThing, ListThings, UpdateThing, DeleteThing.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use updraft_protocol::ResourceKind;
use updraft_protocol::ids::{ATTRIBUTE_NAME, ATTRIBUTE_VALUE, THING_NAME};

use super::{Query, body, check_id, put_opt, with_token};
use crate::clock::now_ms;
use crate::error::{ApiError, ApiResult};
use crate::http::ApiRequest;
use crate::server::AppState;
use crate::store::{Thing, ThingFilter};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct AttributePayload {
    pub attributes: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub merge: bool,
}

impl AttributePayload {
    /// Checks names and values; an empty value means "remove" and is dropped here.
    pub fn validated(&self) -> ApiResult<BTreeMap<String, String>> {
        let mut out = BTreeMap::new();
        let attrs = self.attributes.clone().unwrap_or_default();
        if attrs.len() > 100 {
            return Err(ApiError::invalid("At most 100 attributes are allowed."));
        }
        for (k, v) in attrs {
            ATTRIBUTE_NAME.check("attributeName", &k)?;
            ATTRIBUTE_VALUE.check("attributeValue", &v)?;
            out.insert(k, v);
        }
        Ok(out)
    }

    /// Applies the payload to existing attributes (merge, or replace).
    pub fn apply(
        &self,
        existing: &BTreeMap<String, String>,
    ) -> ApiResult<BTreeMap<String, String>> {
        let given = self.validated()?;
        let mut result = if self.merge {
            existing.clone()
        } else {
            BTreeMap::new()
        };
        for (k, v) in given {
            if v.is_empty() {
                result.remove(&k);
            } else {
                result.insert(k, v);
            }
        }
        Ok(result)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateThingRequest {
    thing_type_name: Option<String>,
    attribute_payload: Option<AttributePayload>,
    billing_group_name: Option<String>,
}

fn check_type(name: Option<&str>) -> ApiResult<()> {
    if let Some(t) = name {
        THING_NAME.check("thingTypeName", t)?;
        return Err(ApiError::not_found(format!(
            "Thing type {t} cannot be found: Updraft does not manage thing types yet."
        )));
    }
    Ok(())
}

fn thing_json(state: &AppState, t: &Thing, describe: bool) -> Value {
    let mut m = Map::new();
    if describe {
        m.insert("defaultClientId".into(), json!(t.name));
        m.insert("thingId".into(), json!(t.id));
    }
    m.insert("thingName".into(), json!(t.name));
    m.insert(
        "thingArn".into(),
        json!(state.arn(ResourceKind::Thing, &t.name)),
    );
    put_opt(&mut m, "thingTypeName", t.type_name.clone());
    m.insert("attributes".into(), json!(t.attributes));
    m.insert("version".into(), json!(t.version));
    Value::Object(m)
}

pub(super) async fn create(state: &AppState, req: &ApiRequest, name: &str) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, name)?;
    let r: CreateThingRequest = body(req)?;
    check_type(r.thing_type_name.as_deref())?;
    if let Some(b) = &r.billing_group_name {
        THING_NAME.check("billingGroupName", b)?;
        return Err(ApiError::not_found(format!(
            "Billing group {b} cannot be found."
        )));
    }
    let attributes: BTreeMap<String, String> = r
        .attribute_payload
        .unwrap_or_default()
        .validated()?
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let arn = state.arn(ResourceKind::Thing, name);
    if let Some(existing) = state.store.get_thing(name).await? {
        // CreateThing is idempotent for an identical thing.
        if existing.attributes == attributes && existing.type_name == r.thing_type_name {
            return Ok(json!({ "thingName": name, "thingArn": arn, "thingId": existing.id }));
        }
        return Err(ApiError::already_exists(
            format!("Thing {name} already exists in account with different attributes"),
            name,
            Some(arn),
        ));
    }
    let thing = Thing {
        name: name.to_owned(),
        id: uuid::Uuid::new_v4().to_string(),
        type_name: r.thing_type_name,
        attributes,
        version: 1,
        created_ms: now_ms(),
    };
    state.store.create_thing(&thing).await?;
    Ok(json!({ "thingName": name, "thingArn": arn, "thingId": thing.id }))
}

pub(super) async fn describe(state: &AppState, name: &str) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, name)?;
    let t = state
        .store
        .get_thing(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Thing {name} cannot be found.")))?;
    Ok(thing_json(state, &t, true))
}

pub(super) async fn list(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let q = Query::of(req);
    let filter = ThingFilter {
        attribute_name: q
            .checked("attributeName", &ATTRIBUTE_NAME)?
            .map(str::to_owned),
        attribute_value: q
            .checked("attributeValue", &ATTRIBUTE_VALUE)?
            .map(str::to_owned),
        use_prefix_attribute_value: q.bool("usePrefixAttributeValue")?,
        thing_type_name: q.checked("thingTypeName", &THING_NAME)?.map(str::to_owned),
    };
    if filter.use_prefix_attribute_value && filter.attribute_value.is_none() {
        return Err(ApiError::invalid(
            "usePrefixAttributeValue requires attributeValue.",
        ));
    }
    let page = state.store.list_things(&filter, &q.page()?).await?;
    let things: Vec<Value> = page
        .items
        .iter()
        .map(|t| thing_json(state, t, false))
        .collect();
    let mut m = Map::new();
    m.insert("things".into(), Value::Array(things));
    Ok(with_token(m, &page))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UpdateThingRequest {
    thing_type_name: Option<String>,
    attribute_payload: Option<AttributePayload>,
    expected_version: Option<i64>,
    #[serde(default)]
    remove_thing_type: bool,
}

pub(super) async fn update(state: &AppState, req: &ApiRequest, name: &str) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, name)?;
    let r: UpdateThingRequest = body(req)?;
    check_type(r.thing_type_name.as_deref())?;
    let mut thing = state
        .store
        .get_thing(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Thing {name} cannot be found.")))?;
    if let Some(p) = &r.attribute_payload {
        thing.attributes = p.apply(&thing.attributes)?;
    }
    if r.remove_thing_type {
        thing.type_name = None;
    }
    // The read above is not locked: the store checks the version this change is based
    // on, so a concurrent writer makes this one fail instead of being overwritten.
    let expected = Some(r.expected_version.unwrap_or(thing.version));
    state.store.update_thing(&thing, expected).await?;
    Ok(json!({}))
}

pub(super) async fn delete(state: &AppState, req: &ApiRequest, name: &str) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, name)?;
    let expected = Query::of(req).int("expectedVersion", i64::MIN, i64::MAX)?;
    state.store.delete_thing(name, expected).await?;
    Ok(json!({}))
}
