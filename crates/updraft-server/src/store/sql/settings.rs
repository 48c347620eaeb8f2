//! Installation-wide settings (account id, keys, the device CA) on SQL.

use async_trait::async_trait;
use sqlx::Row;

use super::*;

#[async_trait]
impl SettingsStore for SqlStore {
    async fn get_setting(&self, key: &str) -> StoreResult<Option<String>> {
        let row = sqlx::query("SELECT value FROM settings WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| r.try_get::<String, _>(0)).transpose()?)
    }

    async fn init_setting(&self, key: &str, value: &str) -> StoreResult<String> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(self.locked("SELECT value FROM settings WHERE key = $1"))
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(r) = row {
            return Ok(r.try_get::<String, _>(0)?);
        }
        sqlx::query("INSERT INTO settings (key, value) VALUES ($1, $2)")
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(value.to_owned())
    }
}
