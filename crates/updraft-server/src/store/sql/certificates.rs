//! Device certificates and thing principals on SQL.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::*;

fn row_certificate(r: &AnyRow) -> StoreResult<Certificate> {
    Ok(Certificate {
        id: r.try_get("certificate_id")?,
        status: r.try_get("status")?,
        pem: r.try_get("pem")?,
        not_before_ms: r.try_get("not_before_ms")?,
        not_after_ms: r.try_get("not_after_ms")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

#[async_trait]
impl CertificateStore for SqlStore {
    async fn create_certificate(&self, c: &Certificate) -> StoreResult<()> {
        self.insert_one(
            sqlx::query(
                "INSERT INTO certificates (certificate_id, status, pem, not_before_ms, not_after_ms, created_ms, \
                 updated_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(&c.id)
            .bind(&c.status)
            .bind(&c.pem)
            .bind(c.not_before_ms)
            .bind(c.not_after_ms)
            .bind(c.created_ms)
            .bind(c.updated_ms),
            || format!("Certificate {} already exists", c.id),
        )
        .await
    }

    async fn get_certificate(&self, id: &str) -> StoreResult<Option<Certificate>> {
        self.one_by_key(
            "SELECT * FROM certificates WHERE certificate_id = $1",
            id,
            row_certificate,
        )
        .await
    }

    async fn list_certificates(&self, page: &PageRequest) -> StoreResult<Page<Certificate>> {
        let rows = sqlx::query(
            "SELECT * FROM certificates WHERE certificate_id > $1 ORDER BY certificate_id LIMIT $2",
        )
        .bind(page.after.clone().unwrap_or_default())
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(row_certificate)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |c| c.id.clone()))
    }

    async fn set_certificate_status(&self, id: &str, status: &str, now_ms: i64) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE certificates SET status = $2, updated_ms = $3 WHERE certificate_id = $1",
        )
        .bind(id)
        .bind(status)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "Certificate {id} cannot be found."
            )));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn attach_principal(
        &self,
        thing: &str,
        principal: &str,
        exclusive: bool,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
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
        let others = sqlx::query(
            "SELECT thing_name, exclusive FROM thing_principals WHERE principal = $1 AND thing_name <> $2",
        )
        .bind(principal)
        .bind(thing)
        .fetch_all(&mut *tx)
        .await?;
        for r in &others {
            let other: String = r.try_get(0)?;
            if exclusive || r.try_get::<i64, _>(1)? != 0 {
                return Err(StoreError::Invalid(format!(
                    "Principal {principal} is attached exclusively, or must be, and is attached to {other}."
                )));
            }
        }
        sqlx::query(
            "INSERT INTO thing_principals (thing_name, principal, exclusive) VALUES ($1, $2, $3) \
             ON CONFLICT (thing_name, principal) DO UPDATE SET exclusive = $3",
        )
        .bind(thing)
        .bind(principal)
        .bind(flag(exclusive))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn detach_principal(&self, thing: &str, principal: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("DELETE FROM thing_principals WHERE thing_name = $1 AND principal = $2")
            .bind(thing)
            .bind(principal)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_thing_principals(
        &self,
        thing: &str,
        page: &PageRequest,
    ) -> StoreResult<Page<String>> {
        let rows = sqlx::query(
            "SELECT principal FROM thing_principals WHERE thing_name = $1 AND principal > $2 \
             ORDER BY principal LIMIT $3",
        )
        .bind(thing)
        .bind(page.after.clone().unwrap_or_default())
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(paginate(items, page, String::clone))
    }

    async fn principal_attached(&self, thing: &str, principal: &str) -> StoreResult<bool> {
        let row =
            sqlx::query("SELECT 1 FROM thing_principals WHERE thing_name = $1 AND principal = $2")
                .bind(thing)
                .bind(principal)
                .fetch_optional(&self.pool)
                .await?;
        Ok(row.is_some())
    }
}
