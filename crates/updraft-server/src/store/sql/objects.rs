//! S3 buckets and object metadata (the bytes live in the artifact store) on SQL.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use std::collections::BTreeMap;

use super::*;

impl SqlStore {
    async fn next_seq(&self, tx: &mut Tx, bucket: &str, key: &str) -> StoreResult<i64> {
        let row = sqlx::query(
            "SELECT COALESCE(MAX(seq), 0) FROM objects WHERE bucket = $1 AND object_key = $2",
        )
        .bind(bucket)
        .bind(key)
        .fetch_one(&mut **tx)
        .await?;
        Ok(row.try_get::<i64, _>(0)? + 1)
    }

    async fn bucket_in(&self, tx: &mut Tx, name: &str) -> StoreResult<Bucket> {
        let row = sqlx::query(
            self.locked("SELECT name, versioning, created_ms FROM buckets WHERE name = $1"),
        )
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?;
        match row {
            Some(r) => row_bucket(&r),
            None => Err(StoreError::NotFound(format!(
                "The specified bucket does not exist: {name}"
            ))),
        }
    }

    /// Deletes one object version row; returns its blob.
    async fn remove_version(
        &self,
        tx: &mut Tx,
        bucket: &str,
        key: &str,
        version: &str,
    ) -> StoreResult<Option<ObjectVersion>> {
        let row = sqlx::query(self.locked(&format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE bucket = $1 AND object_key = $2 AND version_id = $3"
        )))
        .bind(bucket)
        .bind(key)
        .bind(version)
        .fetch_optional(&mut **tx)
        .await?;
        let Some(old) = row.as_ref().map(row_object).transpose()? else {
            return Ok(None);
        };
        sqlx::query(
            "DELETE FROM objects WHERE bucket = $1 AND object_key = $2 AND version_id = $3",
        )
        .bind(bucket)
        .bind(key)
        .bind(version)
        .execute(&mut **tx)
        .await?;
        Ok(Some(old))
    }

    /// Makes the newest remaining version of a key its latest.
    async fn promote_latest(&self, tx: &mut Tx, bucket: &str, key: &str) -> StoreResult<()> {
        sqlx::query("UPDATE objects SET is_latest = 0 WHERE bucket = $1 AND object_key = $2")
            .bind(bucket)
            .bind(key)
            .execute(&mut **tx)
            .await?;
        sqlx::query(
            "UPDATE objects SET is_latest = 1 WHERE bucket = $1 AND object_key = $2 AND seq = \
             (SELECT MAX(seq) FROM objects WHERE bucket = $1 AND object_key = $2)",
        )
        .bind(bucket)
        .bind(key)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn insert_object(&self, tx: &mut Tx, o: &ObjectVersion) -> StoreResult<()> {
        sqlx::query("UPDATE objects SET is_latest = 0 WHERE bucket = $1 AND object_key = $2")
            .bind(&o.bucket)
            .bind(&o.key)
            .execute(&mut **tx)
            .await?;
        let seq = self.next_seq(tx, &o.bucket, &o.key).await?;
        let checksum = o.checksum.as_ref().map(to_json).transpose()?;
        sqlx::query(
            "INSERT INTO objects (bucket, object_key, version_id, seq, is_latest, delete_marker, size, etag, \
             content_type, checksum, metadata, blob, created_ms) \
             VALUES ($1, $2, $3, $4, 1, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&o.bucket)
        .bind(&o.key)
        .bind(&o.version_id)
        .bind(seq)
        .bind(flag(o.delete_marker))
        .bind(i64::try_from(o.size).map_err(corrupt)?)
        .bind(&o.etag)
        .bind(&o.content_type)
        .bind(checksum)
        .bind(to_json(&o.metadata)?)
        .bind(&o.blob)
        .bind(o.created_ms)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

fn row_bucket(r: &AnyRow) -> StoreResult<Bucket> {
    let v: String = r.try_get("versioning")?;
    Ok(Bucket {
        name: r.try_get("name")?,
        versioning: Versioning::parse(&v).ok_or_else(|| corrupt(format!("versioning '{v}'")))?,
        created_ms: r.try_get("created_ms")?,
    })
}

fn row_object(r: &AnyRow) -> StoreResult<ObjectVersion> {
    let checksum: Option<String> = r.try_get("checksum")?;
    Ok(ObjectVersion {
        bucket: r.try_get("bucket")?,
        key: r.try_get("object_key")?,
        version_id: r.try_get("version_id")?,
        delete_marker: r.try_get::<i64, _>("delete_marker")? != 0,
        size: u64::try_from(r.try_get::<i64, _>("size")?).map_err(corrupt)?,
        etag: r.try_get("etag")?,
        content_type: r.try_get("content_type")?,
        checksum: checksum.as_deref().map(from_json).transpose()?,
        metadata: from_json(&r.try_get::<String, _>("metadata")?)?,
        blob: r.try_get("blob")?,
        created_ms: r.try_get("created_ms")?,
        is_latest: r.try_get::<i64, _>("is_latest")? != 0,
    })
}

fn row_upload(r: &AnyRow) -> StoreResult<MultipartUpload> {
    Ok(MultipartUpload {
        upload_id: r.try_get("upload_id")?,
        bucket: r.try_get("bucket")?,
        key: r.try_get("object_key")?,
        content_type: r.try_get("content_type")?,
        checksum_algorithm: r.try_get("checksum_algorithm")?,
        metadata: from_json(&r.try_get::<String, _>("metadata")?)?,
        created_ms: r.try_get("created_ms")?,
    })
}

fn row_part(r: &AnyRow) -> StoreResult<UploadPart> {
    let checksum: Option<String> = r.try_get("checksum")?;
    Ok(UploadPart {
        upload_id: r.try_get("upload_id")?,
        part_number: r.try_get("part_number")?,
        size: u64::try_from(r.try_get::<i64, _>("size")?).map_err(corrupt)?,
        etag: r.try_get("etag")?,
        checksum: checksum.as_deref().map(from_json).transpose()?,
        blob: r.try_get("blob")?,
        created_ms: r.try_get("created_ms")?,
    })
}

#[async_trait]
impl ObjectIndex for SqlStore {
    async fn create_bucket(&self, b: &Bucket) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO buckets (name, versioning, created_ms) VALUES ($1, $2, $3)")
            .bind(&b.name)
            .bind(b.versioning.as_str())
            .bind(b.created_ms)
            .execute(&mut *tx)
            .await
            .map_err(|e| on_duplicate(e, || b.name.clone()))?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_bucket(&self, name: &str) -> StoreResult<Option<Bucket>> {
        self.one_by_key(
            "SELECT name, versioning, created_ms FROM buckets WHERE name = $1",
            name,
            row_bucket,
        )
        .await
    }

    async fn list_buckets(&self) -> StoreResult<Vec<Bucket>> {
        let rows = sqlx::query("SELECT name, versioning, created_ms FROM buckets ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(row_bucket).collect()
    }

    async fn delete_bucket(&self, name: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        self.bucket_in(&mut tx, name).await?;
        let any = sqlx::query("SELECT object_key FROM objects WHERE bucket = $1 LIMIT 1")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
        let uploads =
            sqlx::query("SELECT upload_id FROM multipart_uploads WHERE bucket = $1 LIMIT 1")
                .bind(name)
                .fetch_optional(&mut *tx)
                .await?;
        if any.is_some() || uploads.is_some() {
            return Err(StoreError::Conflict(format!(
                "The bucket {name} is not empty."
            )));
        }
        sqlx::query("DELETE FROM buckets WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn set_bucket_versioning(&self, name: &str, status: Versioning) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let bucket = self.bucket_in(&mut tx, name).await?;
        // Once versioned, a bucket can only be suspended, never unversioned again.
        let status =
            if status == Versioning::Unversioned && bucket.versioning != Versioning::Unversioned {
                Versioning::Suspended
            } else {
                status
            };
        sqlx::query("UPDATE buckets SET versioning = $2 WHERE name = $1")
            .bind(name)
            .bind(status.as_str())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn put_object(&self, o: &ObjectVersion) -> StoreResult<Vec<String>> {
        let mut tx = self.begin().await?;
        let bucket = self.bucket_in(&mut tx, &o.bucket).await?;
        let mut o = o.clone();
        let mut orphaned = Vec::new();
        if bucket.versioning != Versioning::Enabled {
            o.version_id = "null".into();
            if let Some(old) = self
                .remove_version(&mut tx, &o.bucket, &o.key, "null")
                .await?
                && !old.blob.is_empty()
            {
                orphaned.push(old.blob);
            }
        }
        self.insert_object(&mut tx, &o).await?;
        tx.commit().await?;
        Ok(orphaned)
    }

    async fn get_object(
        &self,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
    ) -> StoreResult<Option<ObjectVersion>> {
        let row = match version_id {
            Some(v) => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {OBJECT_COLUMNS} FROM objects WHERE bucket = $1 AND object_key = $2 AND version_id = $3"
                )))
                .bind(bucket)
                .bind(key)
                .bind(v)
                .fetch_optional(&self.pool)
                .await?
            }
            None => {
                sqlx::query(AssertSqlSafe(format!(
                    "SELECT {OBJECT_COLUMNS} FROM objects WHERE bucket = $1 AND object_key = $2 AND is_latest = 1"
                )))
                .bind(bucket)
                .bind(key)
                .fetch_optional(&self.pool)
                .await?
            }
        };
        row.as_ref().map(row_object).transpose()
    }

    async fn delete_object(
        &self,
        bucket: &str,
        key: &str,
        version_id: Option<&str>,
        now_ms: i64,
    ) -> StoreResult<DeleteOutcome> {
        let mut tx = self.begin().await?;
        let b = self.bucket_in(&mut tx, bucket).await?;
        let mut outcome = DeleteOutcome {
            version_id: None,
            delete_marker: false,
            orphaned_blobs: Vec::new(),
        };
        match (version_id, b.versioning) {
            (Some(v), _) => {
                if let Some(old) = self.remove_version(&mut tx, bucket, key, v).await? {
                    outcome.version_id = Some(v.to_owned());
                    outcome.delete_marker = old.delete_marker;
                    if !old.blob.is_empty() {
                        outcome.orphaned_blobs.push(old.blob);
                    }
                    if old.is_latest {
                        self.promote_latest(&mut tx, bucket, key).await?;
                    }
                }
            }
            (None, Versioning::Unversioned) => {
                if let Some(old) = self.remove_version(&mut tx, bucket, key, "null").await?
                    && !old.blob.is_empty()
                {
                    outcome.orphaned_blobs.push(old.blob);
                }
            }
            (None, versioning) => {
                let marker_version = if versioning == Versioning::Enabled {
                    uuid::Uuid::new_v4().simple().to_string()
                } else {
                    if let Some(old) = self.remove_version(&mut tx, bucket, key, "null").await?
                        && !old.blob.is_empty()
                    {
                        outcome.orphaned_blobs.push(old.blob);
                    }
                    "null".to_owned()
                };
                let marker = ObjectVersion {
                    bucket: bucket.to_owned(),
                    key: key.to_owned(),
                    version_id: marker_version.clone(),
                    delete_marker: true,
                    size: 0,
                    etag: String::new(),
                    content_type: None,
                    checksum: None,
                    metadata: BTreeMap::new(),
                    blob: String::new(),
                    created_ms: now_ms,
                    is_latest: true,
                };
                self.insert_object(&mut tx, &marker).await?;
                outcome.version_id = Some(marker_version);
                outcome.delete_marker = true;
            }
        }
        tx.commit().await?;
        Ok(outcome)
    }

    async fn list_objects(
        &self,
        bucket: &str,
        prefix: &str,
        delimiter: Option<&str>,
        start_after: Option<&str>,
        limit: usize,
    ) -> StoreResult<ObjectListing> {
        let mut listing = ObjectListing::default();
        if limit == 0 {
            return Ok(listing);
        }
        let mut cursor = start_after.unwrap_or("").to_owned();
        if cursor.as_str() < prefix {
            // Keys sort after their prefix; start just before it.
            cursor = String::new();
        }
        let mut count = 0;
        loop {
            let rows = sqlx::query(AssertSqlSafe(format!(
                "SELECT {OBJECT_COLUMNS} FROM objects WHERE bucket = $1 AND is_latest = 1 AND delete_marker = 0 \
                 AND object_key > $2 AND substr(object_key, 1, length($3)) = $3 ORDER BY object_key LIMIT 1000"
            )))
            .bind(bucket)
            .bind(&cursor)
            .bind(prefix)
            .fetch_all(&self.pool)
            .await?;
            if rows.is_empty() {
                return Ok(listing);
            }
            let mut jumped = false;
            for r in &rows {
                let o = row_object(r)?;
                if count == limit {
                    listing.next_after = Some(cursor.clone());
                    return Ok(listing);
                }
                let rest = &o.key[prefix.len()..];
                if let Some(d) = delimiter.filter(|d| !d.is_empty())
                    && let Some(i) = rest.find(d)
                {
                    let common = format!("{prefix}{}", &rest[..i + d.len()]);
                    // Skip every key under this common prefix.
                    cursor = format!("{common}\u{10FFFF}");
                    listing.common_prefixes.push(common);
                    count += 1;
                    jumped = true;
                    break;
                }
                cursor = o.key.clone();
                listing.objects.push(o);
                count += 1;
            }
            if !jumped && rows.len() < 1000 {
                return Ok(listing);
            }
        }
    }

    async fn list_object_versions(
        &self,
        bucket: &str,
        prefix: &str,
        limit: usize,
    ) -> StoreResult<Vec<ObjectVersion>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {OBJECT_COLUMNS} FROM objects WHERE bucket = $1 AND substr(object_key, 1, length($2)) = $2 \
             ORDER BY object_key, seq DESC LIMIT $3"
        )))
        .bind(bucket)
        .bind(prefix)
        .bind(i64::try_from(limit).unwrap_or(1000))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_object).collect()
    }

    async fn create_upload(&self, u: &MultipartUpload) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        self.bucket_in(&mut tx, &u.bucket).await?;
        sqlx::query(
            "INSERT INTO multipart_uploads (upload_id, bucket, object_key, content_type, checksum_algorithm, \
             metadata, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&u.upload_id)
        .bind(&u.bucket)
        .bind(&u.key)
        .bind(&u.content_type)
        .bind(&u.checksum_algorithm)
        .bind(to_json(&u.metadata)?)
        .bind(u.created_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_upload(&self, upload_id: &str) -> StoreResult<Option<MultipartUpload>> {
        self.one_by_key(
            "SELECT * FROM multipart_uploads WHERE upload_id = $1",
            upload_id,
            row_upload,
        )
        .await
    }

    async fn put_part(&self, p: &UploadPart) -> StoreResult<Option<String>> {
        let mut tx = self.begin().await?;
        if sqlx::query(self.locked("SELECT upload_id FROM multipart_uploads WHERE upload_id = $1"))
            .bind(&p.upload_id)
            .fetch_optional(&mut *tx)
            .await?
            .is_none()
        {
            return Err(StoreError::NotFound(format!(
                "Upload {} does not exist.",
                p.upload_id
            )));
        }
        let old = sqlx::query(
            "SELECT blob FROM multipart_parts WHERE upload_id = $1 AND part_number = $2",
        )
        .bind(&p.upload_id)
        .bind(p.part_number)
        .fetch_optional(&mut *tx)
        .await?
        .map(|r| r.try_get::<String, _>(0))
        .transpose()?;
        sqlx::query("DELETE FROM multipart_parts WHERE upload_id = $1 AND part_number = $2")
            .bind(&p.upload_id)
            .bind(p.part_number)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO multipart_parts (upload_id, part_number, size, etag, checksum, blob, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(&p.upload_id)
        .bind(p.part_number)
        .bind(i64::try_from(p.size).map_err(corrupt)?)
        .bind(&p.etag)
        .bind(p.checksum.as_ref().map(to_json).transpose()?)
        .bind(&p.blob)
        .bind(p.created_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(old)
    }

    async fn list_parts(&self, upload_id: &str) -> StoreResult<Vec<UploadPart>> {
        let rows =
            sqlx::query("SELECT * FROM multipart_parts WHERE upload_id = $1 ORDER BY part_number")
                .bind(upload_id)
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(row_part).collect()
    }

    async fn delete_upload(&self, upload_id: &str) -> StoreResult<Vec<String>> {
        let mut tx = self.begin().await?;
        let blobs = sqlx::query("SELECT blob FROM multipart_parts WHERE upload_id = $1")
            .bind(upload_id)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<String, _>(0))
            .collect::<Result<Vec<_>, _>>()?;
        sqlx::query("DELETE FROM multipart_parts WHERE upload_id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM multipart_uploads WHERE upload_id = $1")
            .bind(upload_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound(format!(
                "Upload {upload_id} does not exist."
            )));
        }
        tx.commit().await?;
        Ok(blobs)
    }

    async fn list_uploads(&self, bucket: &str) -> StoreResult<Vec<MultipartUpload>> {
        let rows = sqlx::query(
            "SELECT * FROM multipart_uploads WHERE bucket = $1 ORDER BY object_key, created_ms",
        )
        .bind(bucket)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_upload).collect()
    }
}
