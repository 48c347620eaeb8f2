//! OTA updates on SQL.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::*;

fn row_ota(r: &AnyRow) -> StoreResult<OtaUpdate> {
    Ok(OtaUpdate {
        id: r.try_get("ota_update_id")?,
        status: parse_enum(&r.try_get::<String, _>("status")?)?,
        request: from_json(&r.try_get::<String, _>("request")?)?,
        job_id: r.try_get("job_id")?,
        stream_id: r.try_get("stream_id")?,
        error_code: r.try_get("error_code")?,
        error_message: r.try_get("error_message")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

#[async_trait]
impl OtaStore for SqlStore {
    async fn create_ota_update(&self, o: &OtaUpdate) -> StoreResult<()> {
        self.insert_one(
            sqlx::query(
                "INSERT INTO ota_updates (ota_update_id, status, request, job_id, stream_id, error_code, \
                 error_message, created_ms, updated_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(&o.id)
            .bind(o.status.as_str())
            .bind(to_json(&o.request)?)
            .bind(&o.job_id)
            .bind(&o.stream_id)
            .bind(&o.error_code)
            .bind(&o.error_message)
            .bind(o.created_ms)
            .bind(o.updated_ms),
            || format!("OTA update {} already exists", o.id),
        )
        .await
    }

    async fn get_ota_update(&self, id: &str) -> StoreResult<Option<OtaUpdate>> {
        self.one_by_key(
            "SELECT * FROM ota_updates WHERE ota_update_id = $1",
            id,
            row_ota,
        )
        .await
    }

    async fn list_ota_updates(
        &self,
        status: Option<OtaUpdateStatus>,
        page: &PageRequest,
    ) -> StoreResult<Page<OtaUpdate>> {
        let rows = sqlx::query(
            "SELECT * FROM ota_updates WHERE ota_update_id > $1 AND ($2 IS NULL OR status = $2) \
             ORDER BY ota_update_id LIMIT $3",
        )
        .bind(page.after.clone().unwrap_or_default())
        .bind(status.map(|s| s.as_str()))
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await?;
        let items = rows.iter().map(row_ota).collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |o| o.id.clone()))
    }

    async fn update_ota_update(&self, o: &OtaUpdate) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE ota_updates SET status = $2, job_id = $3, stream_id = $4, error_code = $5, error_message = $6, \
             updated_ms = $7 WHERE ota_update_id = $1",
        )
        .bind(&o.id)
        .bind(o.status.as_str())
        .bind(&o.job_id)
        .bind(&o.stream_id)
        .bind(&o.error_code)
        .bind(&o.error_message)
        .bind(o.updated_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "OTA update {} cannot be found.",
                o.id
            )));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn delete_ota_update(&self, id: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query("DELETE FROM ota_updates WHERE ota_update_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "OTA update {id} cannot be found."
            )));
        }
        tx.commit().await?;
        Ok(())
    }
}
