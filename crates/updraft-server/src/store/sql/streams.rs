//! Streams: files for MQTT delivery on SQL.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::*;

fn row_stream(r: &AnyRow) -> StoreResult<Stream> {
    Ok(Stream {
        id: r.try_get("stream_id")?,
        version: r.try_get("version")?,
        description: r.try_get("description")?,
        files: from_json(&r.try_get::<String, _>("files")?)?,
        role_arn: r.try_get("role_arn")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

#[async_trait]
impl StreamStore for SqlStore {
    async fn create_stream(&self, s: &Stream) -> StoreResult<()> {
        self.insert_one(
            sqlx::query(
                "INSERT INTO streams (stream_id, version, description, files, role_arn, created_ms, updated_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&s.id)
            .bind(s.version)
            .bind(&s.description)
            .bind(to_json(&s.files)?)
            .bind(&s.role_arn)
            .bind(s.created_ms)
            .bind(s.updated_ms),
            || format!("Stream {} already exists", s.id),
        )
        .await
    }

    async fn get_stream(&self, id: &str) -> StoreResult<Option<Stream>> {
        self.one_by_key("SELECT * FROM streams WHERE stream_id = $1", id, row_stream)
            .await
    }

    async fn list_streams(&self, ascending: bool, page: &PageRequest) -> StoreResult<Page<Stream>> {
        let rows =
            match (ascending, &page.after) {
                (true, after) => {
                    sqlx::query(
                        "SELECT * FROM streams WHERE stream_id > $1 ORDER BY stream_id LIMIT $2",
                    )
                    .bind(after.clone().unwrap_or_default())
                    .bind(page_limit(page))
                    .fetch_all(&self.pool)
                    .await?
                }
                (false, None) => {
                    sqlx::query("SELECT * FROM streams ORDER BY stream_id DESC LIMIT $1")
                        .bind(page_limit(page))
                        .fetch_all(&self.pool)
                        .await?
                }
                (false, Some(after)) => sqlx::query(
                    "SELECT * FROM streams WHERE stream_id < $1 ORDER BY stream_id DESC LIMIT $2",
                )
                .bind(after)
                .bind(page_limit(page))
                .fetch_all(&self.pool)
                .await?,
            };
        let items = rows
            .iter()
            .map(row_stream)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |s| s.id.clone()))
    }

    async fn update_stream(&self, s: &Stream, expected_version: i64) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE streams SET version = $2, description = $3, files = $4, role_arn = $5, updated_ms = $6 \
             WHERE stream_id = $1 AND version = $7",
        )
        .bind(&s.id)
        .bind(s.version)
        .bind(&s.description)
        .bind(to_json(&s.files)?)
        .bind(&s.role_arn)
        .bind(s.updated_ms)
        .bind(expected_version)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            let exists = sqlx::query("SELECT stream_id FROM streams WHERE stream_id = $1")
                .bind(&s.id)
                .fetch_optional(&mut *tx)
                .await?;
            return Err(match exists {
                None => StoreError::NotFound(format!("Stream {} cannot be found.", s.id)),
                Some(_) => StoreError::VersionConflict(format!(
                    "Stream {} was changed concurrently.",
                    s.id
                )),
            });
        }
        tx.commit().await?;
        Ok(())
    }

    async fn delete_stream(&self, id: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        if sqlx::query(self.locked("SELECT stream_id FROM streams WHERE stream_id = $1"))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound(format!(
                "Stream {id} cannot be found."
            )));
        }
        let user = sqlx::query(
            "SELECT ota_update_id FROM ota_updates WHERE stream_id = $1 AND status NOT IN ('DELETE_IN_PROGRESS') LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(r) = user {
            let ota: String = r.try_get(0)?;
            return Err(StoreError::Conflict(format!(
                "Stream {id} is in use by OTA update {ota}; delete the OTA update with deleteStream instead."
            )));
        }
        sqlx::query("DELETE FROM streams WHERE stream_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
