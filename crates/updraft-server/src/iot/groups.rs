//! Thing groups and membership.

use serde::Deserialize;
use serde_json::{Map, Value, json};
use updraft_protocol::ResourceKind;
use updraft_protocol::ids::{THING_GROUP_DESCRIPTION, THING_GROUP_NAME, THING_NAME};

use super::things::AttributePayload;
use super::{Query, Tag, body, check_id, check_tags, parse_arn, put_opt, with_token};
use crate::clock::{epoch_seconds, now_ms};
use crate::error::{ApiError, ApiResult};
use crate::http::ApiRequest;
use crate::server::AppState;
use crate::store::{GroupFilter, ThingGroup};

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ThingGroupProperties {
    thing_group_description: Option<String>,
    attribute_payload: Option<AttributePayload>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateThingGroupRequest {
    parent_group_name: Option<String>,
    thing_group_properties: Option<ThingGroupProperties>,
    tags: Option<Vec<Tag>>,
}

fn group_ref(state: &AppState, g: &ThingGroup) -> Value {
    json!({ "groupName": g.name, "groupArn": state.arn(ResourceKind::ThingGroup, &g.name) })
}

pub(super) async fn create(state: &AppState, req: &ApiRequest, name: &str) -> ApiResult<Value> {
    check_id("thingGroupName", &THING_GROUP_NAME, name)?;
    let r: CreateThingGroupRequest = body(req)?;
    if let Some(p) = &r.parent_group_name {
        THING_GROUP_NAME.check("parentGroupName", p)?;
    }
    check_tags(&r.tags)?;
    let props = r.thing_group_properties.unwrap_or_default();
    if let Some(d) = &props.thing_group_description {
        THING_GROUP_DESCRIPTION.check("thingGroupDescription", d)?;
    }
    let attributes = props.attribute_payload.unwrap_or_default().validated()?;
    let arn = state.arn(ResourceKind::ThingGroup, name);
    if let Some(existing) = state.store.get_thing_group(name).await? {
        if existing.parent == r.parent_group_name
            && existing.description == props.thing_group_description
            && existing.attributes == attributes
        {
            return Ok(
                json!({ "thingGroupName": name, "thingGroupArn": arn, "thingGroupId": existing.id }),
            );
        }
        return Err(ApiError::already_exists(
            format!("Thing group {name} already exists with different properties"),
            name,
            Some(arn),
        ));
    }
    let group = ThingGroup {
        name: name.to_owned(),
        id: uuid::Uuid::new_v4().to_string(),
        parent: r.parent_group_name,
        description: props.thing_group_description,
        attributes,
        version: 1,
        created_ms: now_ms(),
    };
    state.store.create_thing_group(&group).await?;
    Ok(json!({ "thingGroupName": name, "thingGroupArn": arn, "thingGroupId": group.id }))
}

pub(super) async fn describe(state: &AppState, name: &str) -> ApiResult<Value> {
    check_id("thingGroupName", &THING_GROUP_NAME, name)?;
    let g = state
        .store
        .get_thing_group(name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("Thing group {name} cannot be found.")))?;
    // rootToParentThingGroups: ancestors from the root down to the parent.
    let mut ancestors = Vec::new();
    let mut next = g.parent.clone();
    while let Some(p) = next {
        if ancestors.len() > 16 {
            break;
        }
        match state.store.get_thing_group(&p).await? {
            Some(pg) => {
                next = pg.parent.clone();
                ancestors.push(group_ref(state, &pg));
            }
            None => break,
        }
    }
    ancestors.reverse();
    let mut props = Map::new();
    put_opt(&mut props, "thingGroupDescription", g.description.clone());
    props.insert(
        "attributePayload".into(),
        json!({ "attributes": g.attributes }),
    );
    let mut meta = Map::new();
    put_opt(&mut meta, "parentGroupName", g.parent.clone());
    meta.insert("rootToParentThingGroups".into(), Value::Array(ancestors));
    meta.insert("creationDate".into(), epoch_seconds(g.created_ms));
    Ok(json!({
        "thingGroupName": g.name,
        "thingGroupId": g.id,
        "thingGroupArn": state.arn(ResourceKind::ThingGroup, &g.name),
        "version": g.version,
        "thingGroupProperties": props,
        "thingGroupMetadata": meta,
    }))
}

pub(super) async fn list(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let q = Query::of(req);
    let filter = GroupFilter {
        parent_group: q
            .checked("parentGroup", &THING_GROUP_NAME)?
            .map(str::to_owned),
        name_prefix: q
            .checked("namePrefixFilter", &THING_GROUP_NAME)?
            .map(str::to_owned),
        recursive: q.bool("recursive")?,
    };
    if let Some(p) = &filter.parent_group
        && state.store.get_thing_group(p).await?.is_none()
    {
        return Err(ApiError::not_found(format!(
            "Thing group {p} cannot be found."
        )));
    }
    let page = state.store.list_thing_groups(&filter, &q.page()?).await?;
    let mut m = Map::new();
    m.insert(
        "thingGroups".into(),
        Value::Array(page.items.iter().map(|g| group_ref(state, g)).collect()),
    );
    Ok(with_token(m, &page))
}

pub(super) async fn delete(state: &AppState, req: &ApiRequest, name: &str) -> ApiResult<Value> {
    check_id("thingGroupName", &THING_GROUP_NAME, name)?;
    let expected = Query::of(req).int("expectedVersion", i64::MIN, i64::MAX)?;
    state.store.delete_thing_group(name, expected).await?;
    Ok(json!({}))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MembershipRequest {
    thing_group_name: Option<String>,
    thing_group_arn: Option<String>,
    thing_name: Option<String>,
    thing_arn: Option<String>,
}

impl MembershipRequest {
    /// (group, thing) from names or ARNs; at least one of each.
    fn resolve(&self, state: &AppState) -> ApiResult<(String, String)> {
        let group = match (&self.thing_group_name, &self.thing_group_arn) {
            (Some(n), _) => n.clone(),
            (None, Some(arn)) => parse_arn(state, arn, &[ResourceKind::ThingGroup])?.name,
            (None, None) => {
                return Err(ApiError::invalid(
                    "Specify thingGroupName or thingGroupArn.",
                ));
            }
        };
        let thing = match (&self.thing_name, &self.thing_arn) {
            (Some(n), _) => n.clone(),
            (None, Some(arn)) => parse_arn(state, arn, &[ResourceKind::Thing])?.name,
            (None, None) => return Err(ApiError::invalid("Specify thingName or thingArn.")),
        };
        THING_GROUP_NAME.check("thingGroupName", &group)?;
        THING_NAME.check("thingName", &thing)?;
        Ok((group, thing))
    }
}

pub(super) async fn add_thing(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let r: MembershipRequest = body(req)?;
    let (group, thing) = r.resolve(state)?;
    state.store.add_thing_to_group(&group, &thing).await?;
    super::continuous::thing_joined(state, &group, &thing).await?;
    Ok(json!({}))
}

pub(super) async fn remove_thing(state: &AppState, req: &ApiRequest) -> ApiResult<Value> {
    let r: MembershipRequest = body(req)?;
    let (group, thing) = r.resolve(state)?;
    state.store.remove_thing_from_group(&group, &thing).await?;
    super::continuous::thing_left(state, &group, &thing).await?;
    Ok(json!({}))
}

pub(super) async fn list_things(
    state: &AppState,
    req: &ApiRequest,
    name: &str,
) -> ApiResult<Value> {
    check_id("thingGroupName", &THING_GROUP_NAME, name)?;
    let q = Query::of(req);
    let page = state
        .store
        .list_things_in_group(name, q.bool("recursive")?, &q.page()?)
        .await?;
    let mut m = Map::new();
    m.insert("things".into(), json!(page.items));
    Ok(with_token(m, &page))
}

pub(super) async fn list_for_thing(
    state: &AppState,
    req: &ApiRequest,
    name: &str,
) -> ApiResult<Value> {
    check_id("thingName", &THING_NAME, name)?;
    let page = state
        .store
        .list_groups_for_thing(name, &Query::of(req).page()?)
        .await?;
    let mut m = Map::new();
    m.insert(
        "thingGroups".into(),
        Value::Array(page.items.iter().map(|g| group_ref(state, g)).collect()),
    );
    Ok(with_token(m, &page))
}
