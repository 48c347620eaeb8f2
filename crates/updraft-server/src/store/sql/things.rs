//! Things, thing groups and membership on SQL.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;
use std::collections::BTreeSet;

use super::*;

impl SqlStore {
    async fn group_descendants(&self, tx: &mut Tx, root: &str) -> StoreResult<Vec<String>> {
        let mut out = vec![root.to_owned()];
        let mut i = 0;
        while i < out.len() {
            let children =
                sqlx::query("SELECT name FROM thing_groups WHERE parent = $1 ORDER BY name")
                    .bind(out[i].clone())
                    .fetch_all(&mut **tx)
                    .await?;
            for c in children {
                out.push(c.try_get::<String, _>(0)?);
            }
            i += 1;
        }
        Ok(out)
    }
}

fn row_thing(r: &AnyRow) -> StoreResult<Thing> {
    Ok(Thing {
        name: r.try_get("name")?,
        id: r.try_get("thing_id")?,
        type_name: r.try_get("type_name")?,
        attributes: from_json(&r.try_get::<String, _>("attributes")?)?,
        version: r.try_get("version")?,
        created_ms: r.try_get("created_ms")?,
    })
}

fn row_group(r: &AnyRow) -> StoreResult<ThingGroup> {
    Ok(ThingGroup {
        name: r.try_get("name")?,
        id: r.try_get("group_id")?,
        parent: r.try_get("parent")?,
        description: r.try_get("description")?,
        attributes: from_json(&r.try_get::<String, _>("attributes")?)?,
        version: r.try_get("version")?,
        created_ms: r.try_get("created_ms")?,
    })
}

#[async_trait]
impl ThingStore for SqlStore {
    async fn create_thing(&self, t: &Thing) -> StoreResult<()> {
        self.insert_one(
            sqlx::query(
                "INSERT INTO things (name, thing_id, type_name, attributes, version, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(&t.name)
            .bind(&t.id)
            .bind(&t.type_name)
            .bind(to_json(&t.attributes)?)
            .bind(t.version)
            .bind(t.created_ms),
            || format!("Thing {} already exists", t.name),
        )
        .await
    }

    async fn get_thing(&self, name: &str) -> StoreResult<Option<Thing>> {
        self.one_by_key("SELECT * FROM things WHERE name = $1", name, row_thing)
            .await
    }

    async fn list_things(
        &self,
        filter: &ThingFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<Thing>> {
        // Attribute filters are applied to the decoded map, so scan in batches until the page fills.
        let limit = page.limit.clamp(1, 10_000);
        let mut out = Vec::new();
        let mut after = page.after.clone().unwrap_or_default();
        loop {
            let rows = sqlx::query(
                "SELECT * FROM things WHERE name > $1 AND ($2 IS NULL OR type_name = $2) ORDER BY name LIMIT 500",
            )
            .bind(&after)
            .bind(&filter.thing_type_name)
            .fetch_all(&self.pool)
            .await?;
            let exhausted = rows.len() < 500;
            for r in &rows {
                let t = row_thing(r)?;
                after = t.name.clone();
                let keep = match (&filter.attribute_name, &filter.attribute_value) {
                    (Some(n), Some(v)) => t.attributes.get(n).is_some_and(|a| {
                        if filter.use_prefix_attribute_value {
                            a.starts_with(v.as_str())
                        } else {
                            a == v
                        }
                    }),
                    (Some(n), None) => t.attributes.contains_key(n),
                    (None, Some(v)) => t.attributes.values().any(|a| a == v),
                    (None, None) => true,
                };
                if keep {
                    out.push(t);
                    if out.len() > limit {
                        return Ok(paginate(out, page, |t| t.name.clone()));
                    }
                }
            }
            if exhausted {
                return Ok(paginate(out, page, |t| t.name.clone()));
            }
        }
    }

    async fn update_thing(&self, t: &Thing, expected_version: Option<i64>) -> StoreResult<Thing> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(self.locked("SELECT * FROM things WHERE name = $1"))
            .bind(&t.name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(current) = row.as_ref().map(row_thing).transpose()? else {
            return Err(StoreError::NotFound(format!(
                "Thing {} cannot be found.",
                t.name
            )));
        };
        if let Some(v) = expected_version
            && v != current.version
        {
            return Err(StoreError::VersionConflict(format!(
                "The version for thing {} does not match the expected version.",
                t.name
            )));
        }
        let mut updated = t.clone();
        updated.version = current.version + 1;
        sqlx::query("UPDATE things SET type_name = $2, attributes = $3, version = $4 WHERE name = $1 AND version = $5")
            .bind(&t.name)
            .bind(&updated.type_name)
            .bind(to_json(&updated.attributes)?)
            .bind(updated.version)
            .bind(current.version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(updated)
    }

    async fn delete_thing(&self, name: &str, expected_version: Option<i64>) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(self.locked("SELECT * FROM things WHERE name = $1"))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(current) = row.as_ref().map(row_thing).transpose()? else {
            // DeleteThing succeeds for a thing that does not exist, as on AWS.
            return Ok(());
        };
        if let Some(v) = expected_version
            && v != current.version
        {
            return Err(StoreError::VersionConflict(format!(
                "The version for thing {name} does not match the expected version."
            )));
        }
        for sql in [
            "DELETE FROM thing_group_members WHERE thing_name = $1",
            "DELETE FROM thing_principals WHERE thing_name = $1",
            "DELETE FROM things WHERE name = $1",
        ] {
            sqlx::query(sql).bind(name).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn create_thing_group(&self, g: &ThingGroup) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        if let Some(parent) = &g.parent {
            let exists = sqlx::query(self.locked("SELECT name FROM thing_groups WHERE name = $1"))
                .bind(parent)
                .fetch_optional(&mut *tx)
                .await?;
            if exists.is_none() {
                return Err(StoreError::NotFound(format!(
                    "Thing group {parent} cannot be found."
                )));
            }
        }
        sqlx::query(
            "INSERT INTO thing_groups (name, group_id, parent, description, attributes, version, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&g.name)
        .bind(&g.id)
        .bind(&g.parent)
        .bind(&g.description)
        .bind(to_json(&g.attributes)?)
        .bind(g.version)
        .bind(g.created_ms)
        .execute(&mut *tx)
        .await
        .map_err(|e| on_duplicate(e, || format!("Thing group {} already exists", g.name)))?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_thing_group(&self, name: &str) -> StoreResult<Option<ThingGroup>> {
        self.one_by_key(
            "SELECT * FROM thing_groups WHERE name = $1",
            name,
            row_group,
        )
        .await
    }

    async fn list_thing_groups(
        &self,
        filter: &GroupFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<ThingGroup>> {
        let prefix = filter.name_prefix.clone().unwrap_or_default();
        let after = page.after.clone().unwrap_or_default();
        let rows =
            match (&filter.parent_group, filter.recursive) {
                (Some(parent), true) => {
                    let mut tx = self.pool.begin().await?;
                    let mut names = self.group_descendants(&mut tx, parent).await?;
                    names.retain(|n| n != parent && n.starts_with(&prefix) && *n > after);
                    names.sort();
                    names.truncate(page.limit.clamp(1, 10_000) + 1);
                    let mut rows = Vec::with_capacity(names.len());
                    for n in names {
                        if let Some(r) = sqlx::query("SELECT * FROM thing_groups WHERE name = $1")
                            .bind(n)
                            .fetch_optional(&mut *tx)
                            .await?
                        {
                            rows.push(r);
                        }
                    }
                    rows
                }
                (parent, _) => sqlx::query(
                    "SELECT * FROM thing_groups WHERE name > $1 AND ($2 IS NULL OR parent = $2) \
                     AND substr(name, 1, length($3)) = $3 ORDER BY name LIMIT $4",
                )
                .bind(&after)
                .bind(parent)
                .bind(&prefix)
                .bind(page_limit(page))
                .fetch_all(&self.pool)
                .await?,
            };
        let items = rows
            .iter()
            .map(row_group)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |g| g.name.clone()))
    }

    async fn delete_thing_group(
        &self,
        name: &str,
        expected_version: Option<i64>,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(self.locked("SELECT * FROM thing_groups WHERE name = $1"))
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(current) = row.as_ref().map(row_group).transpose()? else {
            // Like AWS, deleting a group that does not exist succeeds.
            return Ok(());
        };
        if let Some(v) = expected_version
            && v != current.version
        {
            return Err(StoreError::VersionConflict(format!(
                "The version for thing group {name} does not match the expected version."
            )));
        }
        let child = sqlx::query("SELECT name FROM thing_groups WHERE parent = $1 LIMIT 1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        if child.is_some() {
            return Err(StoreError::Invalid(format!(
                "Cannot delete thing group {name} when it has child groups"
            )));
        }
        for sql in [
            "DELETE FROM thing_group_members WHERE group_name = $1",
            "DELETE FROM thing_groups WHERE name = $1",
        ] {
            sqlx::query(sql).bind(name).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn add_thing_to_group(&self, group: &str, thing: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        if sqlx::query(self.locked("SELECT name FROM thing_groups WHERE name = $1"))
            .bind(group)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound(format!(
                "Thing group {group} cannot be found."
            )));
        }
        if sqlx::query(self.locked("SELECT name FROM things WHERE name = $1"))
            .bind(thing)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound(format!(
                "Thing {thing} cannot be found."
            )));
        }
        sqlx::query(
            "INSERT INTO thing_group_members (group_name, thing_name) VALUES ($1, $2) \
             ON CONFLICT (group_name, thing_name) DO NOTHING",
        )
        .bind(group)
        .bind(thing)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn remove_thing_from_group(&self, group: &str, thing: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        if sqlx::query("SELECT name FROM thing_groups WHERE name = $1")
            .bind(group)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound(format!(
                "Thing group {group} cannot be found."
            )));
        }
        if sqlx::query("SELECT name FROM things WHERE name = $1")
            .bind(thing)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound(format!(
                "Thing {thing} cannot be found."
            )));
        }
        sqlx::query("DELETE FROM thing_group_members WHERE group_name = $1 AND thing_name = $2")
            .bind(group)
            .bind(thing)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_things_in_group(
        &self,
        group: &str,
        recursive: bool,
        page: &PageRequest,
    ) -> StoreResult<Page<String>> {
        let mut tx = self.pool.begin().await?;
        if sqlx::query("SELECT name FROM thing_groups WHERE name = $1")
            .bind(group)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound(format!(
                "Thing group {group} cannot be found."
            )));
        }
        let after = page.after.clone().unwrap_or_default();
        let groups = if recursive {
            self.group_descendants(&mut tx, group).await?
        } else {
            vec![group.to_owned()]
        };
        let mut names = BTreeSet::new();
        for g in groups {
            let rows = sqlx::query(
                "SELECT thing_name FROM thing_group_members WHERE group_name = $1 AND thing_name > $2 \
                 ORDER BY thing_name LIMIT $3",
            )
            .bind(g)
            .bind(&after)
            .bind(page_limit(page))
            .fetch_all(&mut *tx)
            .await?;
            for r in rows {
                names.insert(r.try_get::<String, _>(0)?);
            }
        }
        Ok(paginate(names.into_iter().collect(), page, String::clone))
    }

    async fn list_groups_for_thing(
        &self,
        thing: &str,
        page: &PageRequest,
    ) -> StoreResult<Page<ThingGroup>> {
        if self.get_thing(thing).await?.is_none() {
            return Err(StoreError::NotFound(format!(
                "Thing {thing} cannot be found."
            )));
        }
        let rows = sqlx::query(
            "SELECT g.* FROM thing_groups g JOIN thing_group_members m ON m.group_name = g.name \
             WHERE m.thing_name = $1 AND g.name > $2 ORDER BY g.name LIMIT $3",
        )
        .bind(thing)
        .bind(page.after.clone().unwrap_or_default())
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(row_group)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |g| g.name.clone()))
    }
}
