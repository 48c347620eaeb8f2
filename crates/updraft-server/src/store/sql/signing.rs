//! Code signing on SQL: imported certificates, signing profiles, signing jobs.

use async_trait::async_trait;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::*;

const JOB_COLUMNS: &str = "job_id, client_request_token, profile_name, profile_version, platform_id, \
     certificate_arn, signing_parameters, overrides, validity_value, validity_type, source_bucket, source_key, \
     source_version, destination_bucket, destination_prefix, signed_key, signed_version, signature, payload_size, \
     payload_sha256, status, status_reason, requested_by, created_ms, completed_ms, signature_expires_ms";

/// A position in a (created_ms, id) ordering.
fn time_cursor(created_ms: i64, id: &str) -> String {
    format!("{created_ms}:{id}")
}

fn parse_time_cursor(cursor: &str) -> StoreResult<(i64, String)> {
    cursor
        .split_once(':')
        .and_then(|(t, id)| Some((t.parse::<i64>().ok()?, id.to_owned())))
        .ok_or_else(|| StoreError::Invalid("The nextToken is not valid.".into()))
}

fn opt_json(v: &Option<serde_json::Value>) -> StoreResult<Option<String>> {
    v.as_ref().map(to_json).transpose()
}

fn opt_from_json(s: Option<String>) -> StoreResult<Option<serde_json::Value>> {
    s.as_deref().map(from_json).transpose()
}

fn to_db_size(n: Option<u64>) -> StoreResult<Option<i64>> {
    n.map(|n| i64::try_from(n).map_err(corrupt)).transpose()
}

fn row_certificate(r: &AnyRow) -> StoreResult<AcmCertificate> {
    Ok(AcmCertificate {
        id: r.try_get("certificate_id")?,
        arn: r.try_get("arn")?,
        certificate_pem: r.try_get("certificate_pem")?,
        chain_pem: r.try_get("chain_pem")?,
        sealed_private_key: r.try_get("private_key")?,
        key_algorithm: r.try_get("key_algorithm")?,
        domain_name: r.try_get("domain_name")?,
        subject: r.try_get("subject")?,
        issuer: r.try_get("issuer")?,
        serial: r.try_get("serial")?,
        not_before_ms: r.try_get("not_before_ms")?,
        not_after_ms: r.try_get("not_after_ms")?,
        tags: from_json(&r.try_get::<String, _>("tags")?)?,
        created_ms: r.try_get("created_ms")?,
        imported_ms: r.try_get("imported_ms")?,
    })
}

fn row_profile(r: &AnyRow) -> StoreResult<SigningProfile> {
    Ok(SigningProfile {
        name: r.try_get("profile_name")?,
        version: r.try_get("profile_version")?,
        platform_id: r.try_get("platform_id")?,
        certificate_arn: r.try_get("certificate_arn")?,
        signing_parameters: from_json(&r.try_get::<String, _>("signing_parameters")?)?,
        validity_value: r.try_get("validity_value")?,
        validity_type: r.try_get("validity_type")?,
        overrides: opt_from_json(r.try_get("overrides")?)?,
        status: parse_enum(&r.try_get::<String, _>("status")?)?,
        tags: from_json(&r.try_get::<String, _>("tags")?)?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
    })
}

fn row_job(r: &AnyRow) -> StoreResult<SigningJob> {
    let size: Option<i64> = r.try_get("payload_size")?;
    Ok(SigningJob {
        id: r.try_get("job_id")?,
        client_request_token: r.try_get("client_request_token")?,
        profile_name: r.try_get("profile_name")?,
        profile_version: r.try_get("profile_version")?,
        platform_id: r.try_get("platform_id")?,
        certificate_arn: r.try_get("certificate_arn")?,
        signing_parameters: from_json(&r.try_get::<String, _>("signing_parameters")?)?,
        overrides: opt_from_json(r.try_get("overrides")?)?,
        validity_value: r.try_get("validity_value")?,
        validity_type: r.try_get("validity_type")?,
        source_bucket: r.try_get("source_bucket")?,
        source_key: r.try_get("source_key")?,
        source_version: r.try_get("source_version")?,
        destination_bucket: r.try_get("destination_bucket")?,
        destination_prefix: r.try_get("destination_prefix")?,
        signed_key: r.try_get("signed_key")?,
        signed_version: r.try_get("signed_version")?,
        signature: r.try_get("signature")?,
        payload_size: size
            .map(|n| u64::try_from(n).map_err(corrupt))
            .transpose()?,
        payload_sha256: r.try_get("payload_sha256")?,
        status: parse_enum(&r.try_get::<String, _>("status")?)?,
        status_reason: r.try_get("status_reason")?,
        requested_by: r.try_get("requested_by")?,
        created_ms: r.try_get("created_ms")?,
        completed_ms: r.try_get("completed_ms")?,
        signature_expires_ms: r.try_get("signature_expires_ms")?,
    })
}

impl SqlStore {
    async fn signing_job_by_token(&self, token: &str) -> StoreResult<Option<SigningJob>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM signing_jobs WHERE client_request_token = $1"
        )))
        .bind(token)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_job).transpose()
    }
}

#[async_trait]
impl SigningStore for SqlStore {
    async fn create_acm_certificate(&self, c: &AcmCertificate) -> StoreResult<()> {
        self.insert_one(
            sqlx::query(
                "INSERT INTO acm_certificates (certificate_id, arn, certificate_pem, chain_pem, private_key, \
                 key_algorithm, domain_name, subject, issuer, serial, not_before_ms, not_after_ms, tags, created_ms, \
                 imported_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
            )
            .bind(&c.id)
            .bind(&c.arn)
            .bind(&c.certificate_pem)
            .bind(&c.chain_pem)
            .bind(&c.sealed_private_key)
            .bind(&c.key_algorithm)
            .bind(&c.domain_name)
            .bind(&c.subject)
            .bind(&c.issuer)
            .bind(&c.serial)
            .bind(c.not_before_ms)
            .bind(c.not_after_ms)
            .bind(to_json(&c.tags)?)
            .bind(c.created_ms)
            .bind(c.imported_ms),
            || format!("Certificate {} already exists.", c.arn),
        )
        .await
    }

    async fn get_acm_certificate(&self, id: &str) -> StoreResult<Option<AcmCertificate>> {
        self.one_by_key(
            "SELECT * FROM acm_certificates WHERE certificate_id = $1",
            id,
            row_certificate,
        )
        .await
    }

    async fn list_acm_certificates(
        &self,
        descending: bool,
        page: &PageRequest,
    ) -> StoreResult<Page<AcmCertificate>> {
        let after = page.after.as_deref().map(parse_time_cursor).transpose()?;
        let (t, id) =
            after.unwrap_or((if descending { i64::MAX } else { i64::MIN }, String::new()));
        let sql = if descending {
            // With no cursor, (MAX, "") sorts after every row: compare with <= on the id.
            "SELECT * FROM acm_certificates WHERE created_ms < $1 OR (created_ms = $1 AND ($2 = '' OR certificate_id < $2)) \
             ORDER BY created_ms DESC, certificate_id DESC LIMIT $3"
        } else {
            "SELECT * FROM acm_certificates WHERE created_ms > $1 OR (created_ms = $1 AND certificate_id > $2) \
             ORDER BY created_ms, certificate_id LIMIT $3"
        };
        let rows = sqlx::query(sql)
            .bind(t)
            .bind(id)
            .bind(page_limit(page))
            .fetch_all(&self.pool)
            .await?;
        let items = rows
            .iter()
            .map(row_certificate)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |c| time_cursor(c.created_ms, &c.id)))
    }

    async fn reimport_acm_certificate(&self, c: &AcmCertificate) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE acm_certificates SET certificate_pem = $2, chain_pem = $3, private_key = $4, key_algorithm = $5, \
             domain_name = $6, subject = $7, issuer = $8, serial = $9, not_before_ms = $10, not_after_ms = $11, \
             imported_ms = $12 WHERE certificate_id = $1",
        )
        .bind(&c.id)
        .bind(&c.certificate_pem)
        .bind(&c.chain_pem)
        .bind(&c.sealed_private_key)
        .bind(&c.key_algorithm)
        .bind(&c.domain_name)
        .bind(&c.subject)
        .bind(&c.issuer)
        .bind(&c.serial)
        .bind(c.not_before_ms)
        .bind(c.not_after_ms)
        .bind(c.imported_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "Certificate {} cannot be found.",
                c.arn
            )));
        }
        tx.commit().await?;
        Ok(())
    }

    async fn delete_acm_certificate(&self, id: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let row =
            sqlx::query(self.locked("SELECT arn FROM acm_certificates WHERE certificate_id = $1"))
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(row) = row else {
            return Err(StoreError::NotFound(format!(
                "Certificate {id} cannot be found."
            )));
        };
        let arn: String = row.try_get(0)?;
        let user = sqlx::query(
            "SELECT profile_name FROM signing_profiles WHERE certificate_arn = $1 AND status = 'Active' \
             ORDER BY profile_name LIMIT 1",
        )
        .bind(&arn)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(r) = user {
            let profile: String = r.try_get(0)?;
            return Err(StoreError::Conflict(format!(
                "Certificate {arn} is in use by signing profile {profile}; cancel the profile first."
            )));
        }
        sqlx::query("DELETE FROM acm_certificates WHERE certificate_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn profiles_using_certificate(&self, arn: &str) -> StoreResult<Vec<SigningProfile>> {
        let rows = sqlx::query(
            "SELECT * FROM signing_profiles WHERE certificate_arn = $1 ORDER BY profile_name",
        )
        .bind(arn)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_profile).collect()
    }

    async fn create_signing_profile(&self, p: &SigningProfile) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        // The certificate must exist when the profile is recorded (and cannot be deleted
        // concurrently: delete_acm_certificate locks the same row).
        if sqlx::query(self.locked("SELECT certificate_id FROM acm_certificates WHERE arn = $1"))
            .bind(&p.certificate_arn)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound(format!(
                "Certificate {} cannot be found.",
                p.certificate_arn
            )));
        }
        sqlx::query(
            "INSERT INTO signing_profiles (profile_name, profile_version, platform_id, certificate_arn, \
             signing_parameters, validity_value, validity_type, overrides, status, tags, created_ms, updated_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&p.name)
        .bind(&p.version)
        .bind(&p.platform_id)
        .bind(&p.certificate_arn)
        .bind(to_json(&p.signing_parameters)?)
        .bind(p.validity_value)
        .bind(&p.validity_type)
        .bind(opt_json(&p.overrides)?)
        .bind(p.status.as_str())
        .bind(to_json(&p.tags)?)
        .bind(p.created_ms)
        .bind(p.updated_ms)
        .execute(&mut *tx)
        .await
        .map_err(|e| on_duplicate(e, || format!("Signing profile {} already exists.", p.name)))?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_signing_profile(&self, name: &str) -> StoreResult<Option<SigningProfile>> {
        self.one_by_key(
            "SELECT * FROM signing_profiles WHERE profile_name = $1",
            name,
            row_profile,
        )
        .await
    }

    async fn list_signing_profiles(
        &self,
        filter: &ProfileFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<SigningProfile>> {
        let Some(first) = filter.statuses.first() else {
            return Ok(Page {
                items: Vec::new(),
                next: None,
            });
        };
        // Three slots, padded with the first status: no SQL is built from input.
        let status = |i: usize| filter.statuses.get(i).unwrap_or(first).as_str();
        let rows = sqlx::query(
            "SELECT * FROM signing_profiles WHERE profile_name > $1 AND status IN ($2, $3, $4) \
             AND ($5 IS NULL OR platform_id = $5) ORDER BY profile_name LIMIT $6",
        )
        .bind(page.after.clone().unwrap_or_default())
        .bind(status(0))
        .bind(status(1))
        .bind(status(2))
        .bind(filter.platform_id.as_deref())
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(row_profile)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |p| p.name.clone()))
    }

    async fn set_signing_profile_status(
        &self,
        name: &str,
        status: ProfileStatus,
        now_ms: i64,
    ) -> StoreResult<SigningProfile> {
        let mut tx = self.begin().await?;
        let row =
            sqlx::query(self.locked("SELECT * FROM signing_profiles WHERE profile_name = $1"))
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(mut profile) = row.as_ref().map(row_profile).transpose()? else {
            return Err(StoreError::NotFound(format!(
                "Signing profile {name} cannot be found."
            )));
        };
        if profile.status != ProfileStatus::Active {
            return Err(StoreError::InvalidState(format!(
                "Signing profile {name} is {}, not Active.",
                profile.status.as_str()
            )));
        }
        sqlx::query(
            "UPDATE signing_profiles SET status = $2, updated_ms = $3 WHERE profile_name = $1",
        )
        .bind(name)
        .bind(status.as_str())
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        profile.status = status;
        profile.updated_ms = now_ms;
        Ok(profile)
    }

    async fn create_signing_job(&self, j: &SigningJob) -> StoreResult<SigningJob> {
        let mut tx = self.begin().await?;
        let existing = sqlx::query(self.locked(&format!(
            "SELECT {JOB_COLUMNS} FROM signing_jobs WHERE client_request_token = $1"
        )))
        .bind(&j.client_request_token)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(r) = existing {
            return row_job(&r);
        }
        let inserted = sqlx::query(
            "INSERT INTO signing_jobs (job_id, client_request_token, profile_name, profile_version, platform_id, \
             certificate_arn, signing_parameters, overrides, validity_value, validity_type, source_bucket, source_key, \
             source_version, destination_bucket, destination_prefix, signed_key, signed_version, signature, \
             payload_size, payload_sha256, status, status_reason, requested_by, created_ms, completed_ms, \
             signature_expires_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, \
             $17, $18, $19, $20, $21, $22, $23, $24, $25, $26)",
        )
        .bind(&j.id)
        .bind(&j.client_request_token)
        .bind(&j.profile_name)
        .bind(&j.profile_version)
        .bind(&j.platform_id)
        .bind(&j.certificate_arn)
        .bind(to_json(&j.signing_parameters)?)
        .bind(opt_json(&j.overrides)?)
        .bind(j.validity_value)
        .bind(&j.validity_type)
        .bind(&j.source_bucket)
        .bind(&j.source_key)
        .bind(&j.source_version)
        .bind(&j.destination_bucket)
        .bind(&j.destination_prefix)
        .bind(&j.signed_key)
        .bind(&j.signed_version)
        .bind(&j.signature)
        .bind(to_db_size(j.payload_size)?)
        .bind(&j.payload_sha256)
        .bind(j.status.as_str())
        .bind(&j.status_reason)
        .bind(&j.requested_by)
        .bind(j.created_ms)
        .bind(j.completed_ms)
        .bind(j.signature_expires_ms)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {
                tx.commit().await?;
                Ok(j.clone())
            }
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                // Another writer recorded the same token first (PostgreSQL replicas).
                drop(tx);
                self.signing_job_by_token(&j.client_request_token)
                    .await?
                    .ok_or_else(|| {
                        StoreError::AlreadyExists(format!("Signing job {} already exists.", j.id))
                    })
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn get_signing_job(&self, id: &str) -> StoreResult<Option<SigningJob>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM signing_jobs WHERE job_id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_job).transpose()
    }

    async fn get_signing_job_by_token(&self, token: &str) -> StoreResult<Option<SigningJob>> {
        self.signing_job_by_token(token).await
    }

    async fn list_signing_jobs(
        &self,
        f: &SigningJobFilter,
        page: &PageRequest,
    ) -> StoreResult<Page<SigningJob>> {
        let (t, id) = match page.after.as_deref() {
            Some(c) => parse_time_cursor(c)?,
            None => (i64::MAX, String::new()),
        };
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM signing_jobs \
             WHERE (created_ms < $1 OR (created_ms = $1 AND ($2 = '' OR job_id < $2))) \
             AND ($3 IS NULL OR status = $3) AND ($4 IS NULL OR platform_id = $4) \
             AND ($5 IS NULL OR requested_by = $5) \
             AND ($6 IS NULL OR signature_expires_ms < $6) AND ($7 IS NULL OR signature_expires_ms > $7) \
             ORDER BY created_ms DESC, job_id DESC LIMIT $8"
        )))
        .bind(t)
        .bind(id)
        .bind(f.status.map(SigningJobStatus::as_str))
        .bind(f.platform_id.as_deref())
        .bind(f.requested_by.as_deref())
        .bind(f.signature_expires_before)
        .bind(f.signature_expires_after)
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await?;
        let items = rows.iter().map(row_job).collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |j| time_cursor(j.created_ms, &j.id)))
    }

    async fn complete_signing_job(&self, j: &SigningJob) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE signing_jobs SET status = $2, status_reason = $3, signed_key = $4, signed_version = $5, \
             signature = $6, payload_size = $7, payload_sha256 = $8, completed_ms = $9, signature_expires_ms = $10 \
             WHERE job_id = $1 AND status = 'InProgress'",
        )
        .bind(&j.id)
        .bind(j.status.as_str())
        .bind(&j.status_reason)
        .bind(&j.signed_key)
        .bind(&j.signed_version)
        .bind(&j.signature)
        .bind(to_db_size(j.payload_size)?)
        .bind(&j.payload_sha256)
        .bind(j.completed_ms)
        .bind(j.signature_expires_ms)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            let exists = sqlx::query("SELECT status FROM signing_jobs WHERE job_id = $1")
                .bind(&j.id)
                .fetch_optional(&mut *tx)
                .await?;
            return Err(match exists {
                None => StoreError::NotFound(format!("Signing job {} cannot be found.", j.id)),
                Some(r) => StoreError::InvalidState(format!(
                    "Signing job {} has already finished ({}).",
                    j.id,
                    r.try_get::<String, _>(0)?
                )),
            });
        }
        tx.commit().await?;
        Ok(())
    }
}
