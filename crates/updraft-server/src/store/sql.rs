//! [`Store`] on SQL: SQLite by default, PostgreSQL for scale-out.
//!
//! The SQL is portable (`$n` parameters, TEXT/BIGINT columns); the backends differ only in
//! what [`Dialect`] names: connection setup, how a write transaction starts (SQLite takes
//! the write lock up front with `BEGIN IMMEDIATE`, PostgreSQL locks rows with
//! `FOR UPDATE`), the collation of key columns, and the migration lock.

use async_trait::async_trait;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, AssertSqlSafe, Row, Transaction};
use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;
use std::time::Duration;
use updraft_protocol::job::OtaUpdateStatus;
use updraft_protocol::{ExecutionStatus, JobStatus, TargetSelection};

use super::*;

type Tx = Transaction<'static, Any>;

/// The SQL backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// Versioned migrations, applied in order at start. Never edit one that has shipped.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../migrations/0001_init.sql")),
    (
        2,
        "certificates",
        include_str!("../../migrations/0002_certificates.sql"),
    ),
];

/// The SQL implementation of [`Store`].
#[derive(Clone)]
pub struct SqlStore {
    pool: AnyPool,
    dialect: Dialect,
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn to_json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(corrupt)
}

fn from_json<T: serde::de::DeserializeOwned>(s: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(corrupt)
}

fn parse_enum<T: FromStr>(s: &str) -> StoreResult<T>
where
    T::Err: std::fmt::Display,
{
    s.parse::<T>().map_err(corrupt)
}

fn flag(b: bool) -> i64 {
    i64::from(b)
}

/// Maps a unique-key violation to `AlreadyExists(what)`.
fn on_duplicate(e: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::AlreadyExists(what()),
        _ => StoreError::Database(e),
    }
}

fn page_limit(page: &PageRequest) -> i64 {
    i64::try_from(page.limit.clamp(1, 10_000)).unwrap_or(250) + 1
}

/// Cuts a `limit + 1` fetch down to a page, with the position of its last item.
fn paginate<T>(mut items: Vec<T>, page: &PageRequest, key: impl Fn(&T) -> String) -> Page<T> {
    let limit = page.limit.clamp(1, 10_000);
    if items.len() > limit {
        items.truncate(limit);
        let next = items.last().map(&key);
        Page { items, next }
    } else {
        Page { items, next: None }
    }
}

const EXECUTION_COLUMNS: &str = "job_id, thing_name, execution_number, status, force_canceled, status_details, \
     queued_ms, started_ms, updated_ms, version, retry_attempt";
const JOB_COLUMNS: &str = "job_id, status, target_selection, namespace_id, targets, description, document, \
     document_source, details, force_canceled, reason_code, comment, created_ms, updated_ms, completed_ms, version";
const OBJECT_COLUMNS: &str = "bucket, object_key, version_id, is_latest, delete_marker, size, etag, content_type, \
     checksum, metadata, blob, created_ms";

impl SqlStore {
    /// Connects to `url` (`sqlite://path` or `postgres://...`) and applies pending migrations.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Dialect::Postgres
        } else {
            return Err(StoreError::Corrupt(format!(
                "unsupported database URL '{url}': use sqlite://PATH or postgres://..."
            )));
        };
        let pool = match dialect {
            Dialect::Sqlite => {
                let url = if url.contains('?') {
                    url.to_owned()
                } else {
                    format!("{url}?mode=rwc")
                };
                AnyPoolOptions::new()
                    .max_connections(8)
                    .after_connect(|conn, _meta| {
                        Box::pin(async move {
                            sqlx::raw_sql(
                                "PRAGMA journal_mode=WAL; PRAGMA busy_timeout=10000; PRAGMA synchronous=NORMAL;",
                            )
                            .execute(conn)
                            .await?;
                            Ok(())
                        })
                    })
                    .connect(&url)
                    .await?
            }
            Dialect::Postgres => {
                AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?
            }
        };
        let store = SqlStore { pool, dialect };
        store.migrate().await?;
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn migrate(&self) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        if self.dialect == Dialect::Postgres {
            // Replicas starting together: one migrates, the others wait here.
            sqlx::query("SELECT pg_advisory_xact_lock(7215423301)")
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, \
             description TEXT NOT NULL, applied_ms BIGINT NOT NULL)",
        )
        .execute(&mut *tx)
        .await?;
        let applied: BTreeSet<i64> = sqlx::query("SELECT version FROM schema_migrations")
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<_, _>>()?;
        for (version, description, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            let key_text = match self.dialect {
                Dialect::Sqlite => "TEXT",
                Dialect::Postgres => "TEXT COLLATE \"C\"",
            };
            let sql = sql.replace("KEYTEXT", key_text);
            sqlx::raw_sql(AssertSqlSafe(sql)).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO schema_migrations (version, description, applied_ms) VALUES ($1, $2, $3)")
                .bind(*version)
                .bind(*description)
                .bind(crate::clock::now_ms())
                .execute(&mut *tx)
                .await?;
            tracing::info!(version, description, "applied database migration");
        }
        if let Some(newest) = applied.last()
            && *newest > MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
        {
            return Err(StoreError::Corrupt(format!(
                "the database is at schema version {newest}, newer than this Updraft knows; upgrade Updraft"
            )));
        }
        tx.commit().await?;
        Ok(())
    }

    /// Starts a write transaction.
    async fn begin(&self) -> StoreResult<Tx> {
        Ok(match self.dialect {
            Dialect::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.pool.begin().await?,
        })
    }

    /// `sql` with a row lock when reading inside a write transaction.
    fn locked(&self, sql: &str) -> AssertSqlSafe<String> {
        match self.dialect {
            Dialect::Sqlite => AssertSqlSafe(sql.to_owned()),
            Dialect::Postgres => AssertSqlSafe(format!("{sql} FOR UPDATE")),
        }
    }

    async fn job_in(&self, tx: &mut Tx, id: &str) -> StoreResult<Option<Job>> {
        let row =
            sqlx::query(self.locked(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1")))
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?;
        row.as_ref().map(row_job).transpose()
    }

    /// Completes a SNAPSHOT job in progress whose executions are all terminal.
    async fn complete_if_done(&self, tx: &mut Tx, job_id: &str, now_ms: i64) -> StoreResult<()> {
        let Some(job) = self.job_in(tx, job_id).await? else {
            return Ok(());
        };
        if job.status != JobStatus::InProgress || job.target_selection != TargetSelection::Snapshot
        {
            return Ok(());
        }
        let pending: i64 = sqlx::query(
            "SELECT COUNT(*) FROM job_executions WHERE job_id = $1 AND status IN ('QUEUED', 'IN_PROGRESS')",
        )
        .bind(job_id)
        .fetch_one(&mut **tx)
        .await?
        .try_get(0)?;
        if pending == 0 {
            sqlx::query(
                "UPDATE jobs SET status = 'COMPLETED', completed_ms = $2, updated_ms = $2, version = version + 1 \
                 WHERE job_id = $1",
            )
            .bind(job_id)
            .bind(now_ms)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

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

fn row_job(r: &AnyRow) -> StoreResult<Job> {
    Ok(Job {
        id: r.try_get("job_id")?,
        status: parse_enum(&r.try_get::<String, _>("status")?)?,
        target_selection: parse_enum(&r.try_get::<String, _>("target_selection")?)?,
        targets: from_json(&r.try_get::<String, _>("targets")?)?,
        description: r.try_get("description")?,
        document: r.try_get("document")?,
        document_source: r.try_get("document_source")?,
        namespace_id: r.try_get("namespace_id")?,
        details: from_json(&r.try_get::<String, _>("details")?)?,
        force_canceled: r.try_get::<i64, _>("force_canceled")? != 0,
        reason_code: r.try_get("reason_code")?,
        comment: r.try_get("comment")?,
        created_ms: r.try_get("created_ms")?,
        updated_ms: r.try_get("updated_ms")?,
        completed_ms: r.try_get("completed_ms")?,
        version: r.try_get("version")?,
    })
}

fn row_execution(r: &AnyRow) -> StoreResult<JobExecution> {
    Ok(JobExecution {
        job_id: r.try_get("job_id")?,
        thing_name: r.try_get("thing_name")?,
        execution_number: r.try_get("execution_number")?,
        status: parse_enum(&r.try_get::<String, _>("status")?)?,
        force_canceled: r.try_get::<i64, _>("force_canceled")? != 0,
        status_details: from_json(&r.try_get::<String, _>("status_details")?)?,
        queued_ms: r.try_get("queued_ms")?,
        started_ms: r.try_get("started_ms")?,
        updated_ms: r.try_get("updated_ms")?,
        version: r.try_get("version")?,
        retry_attempt: r.try_get("retry_attempt")?,
    })
}

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

/// Splits an execution page position `thing/number`.
fn split_execution_key(key: &str) -> (String, i64) {
    match key.rsplit_once('/') {
        Some((t, n)) => (t.to_owned(), n.parse().unwrap_or(i64::MAX)),
        None => (key.to_owned(), i64::MAX),
    }
}

#[async_trait]
impl Store for SqlStore {
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

    // ------------------------------------------------------------------ things

    async fn create_thing(&self, t: &Thing) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO things (name, thing_id, type_name, attributes, version, created_ms) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&t.name)
        .bind(&t.id)
        .bind(&t.type_name)
        .bind(to_json(&t.attributes)?)
        .bind(t.version)
        .bind(t.created_ms)
        .execute(&mut *tx)
        .await
        .map_err(|e| on_duplicate(e, || format!("Thing {} already exists", t.name)))?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_thing(&self, name: &str) -> StoreResult<Option<Thing>> {
        let row = sqlx::query("SELECT * FROM things WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_thing).transpose()
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
        sqlx::query("DELETE FROM thing_group_members WHERE thing_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM thing_principals WHERE thing_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM things WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    // ------------------------------------------------------------ thing groups

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
        let row = sqlx::query("SELECT * FROM thing_groups WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_group).transpose()
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
        sqlx::query("DELETE FROM thing_group_members WHERE group_name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM thing_groups WHERE name = $1")
            .bind(name)
            .execute(&mut *tx)
            .await?;
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

    // ----------------------------------------------------------------- streams

    async fn create_stream(&self, s: &Stream) -> StoreResult<()> {
        let mut tx = self.begin().await?;
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
        .bind(s.updated_ms)
        .execute(&mut *tx)
        .await
        .map_err(|e| on_duplicate(e, || format!("Stream {} already exists", s.id)))?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_stream(&self, id: &str) -> StoreResult<Option<Stream>> {
        let row = sqlx::query("SELECT * FROM streams WHERE stream_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_stream).transpose()
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

    // -------------------------------------------------------------------- jobs

    async fn create_job(&self, job: &Job, executions: &[JobExecution]) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO jobs ({JOB_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)"
        )))
        .bind(&job.id)
        .bind(job.status.as_str())
        .bind(job.target_selection.as_str())
        .bind(&job.namespace_id)
        .bind(to_json(&job.targets)?)
        .bind(&job.description)
        .bind(&job.document)
        .bind(&job.document_source)
        .bind(to_json(&job.details)?)
        .bind(flag(job.force_canceled))
        .bind(&job.reason_code)
        .bind(&job.comment)
        .bind(job.created_ms)
        .bind(job.updated_ms)
        .bind(job.completed_ms)
        .bind(job.version)
        .execute(&mut *tx)
        .await
        .map_err(|e| on_duplicate(e, || format!("Job {} already exists", job.id)))?;
        for target in job.targets.iter().collect::<BTreeSet<_>>() {
            sqlx::query("INSERT INTO job_targets (job_id, target) VALUES ($1, $2)")
                .bind(&job.id)
                .bind(target)
                .execute(&mut *tx)
                .await?;
        }
        for e in executions {
            insert_execution(&mut tx, e).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_job(&self, id: &str) -> StoreResult<Option<Job>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_job).transpose()
    }

    async fn list_jobs(&self, filter: &JobFilter, page: &PageRequest) -> StoreResult<Page<Job>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE job_id > $1 AND ($2 IS NULL OR status = $2) \
             AND ($3 IS NULL OR target_selection = $3) AND ($4 IS NULL OR namespace_id = $4) \
             AND ($5 IS NULL OR job_id IN (SELECT job_id FROM job_targets WHERE target = $5)) \
             ORDER BY job_id LIMIT $6"
        )))
        .bind(page.after.clone().unwrap_or_default())
        .bind(filter.status.map(|s| s.as_str()))
        .bind(filter.target_selection.map(|s| s.as_str()))
        .bind(&filter.namespace_id)
        .bind(&filter.target)
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await?;
        let items = rows.iter().map(row_job).collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |j| j.id.clone()))
    }

    async fn update_job(&self, job: &Job) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE jobs SET description = $2, details = $3, updated_ms = $4, version = $5 \
             WHERE job_id = $1 AND version = $6",
        )
        .bind(&job.id)
        .bind(&job.description)
        .bind(to_json(&job.details)?)
        .bind(job.updated_ms)
        .bind(job.version)
        .bind(job.version - 1)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(match self.job_in(&mut tx, &job.id).await? {
                None => StoreError::NotFound(format!("Job {} cannot be found.", job.id)),
                Some(_) => StoreError::VersionConflict(format!(
                    "Job {} was changed concurrently; retry.",
                    job.id
                )),
            });
        }
        tx.commit().await?;
        Ok(())
    }

    async fn count_executions(&self, job_id: &str) -> StoreResult<BTreeMap<ExecutionStatus, i64>> {
        let rows = sqlx::query(
            "SELECT status, COUNT(*) AS n FROM job_executions WHERE job_id = $1 GROUP BY status",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        let mut out = BTreeMap::new();
        for r in rows {
            out.insert(
                parse_enum(&r.try_get::<String, _>("status")?)?,
                r.try_get::<i64, _>("n")?,
            );
        }
        Ok(out)
    }

    async fn cancel_job(&self, job_id: &str, how: &CancelJob) -> StoreResult<Job> {
        let mut tx = self.begin().await?;
        let Some(mut job) = self.job_in(&mut tx, job_id).await? else {
            return Err(StoreError::NotFound(format!(
                "Job {job_id} cannot be found."
            )));
        };
        match job.status {
            JobStatus::DeletionInProgress => {
                return Err(StoreError::Invalid(format!(
                    "Job {job_id} is being deleted."
                )));
            }
            JobStatus::Completed => {
                return Err(StoreError::Invalid(format!(
                    "Job {job_id} has already completed and cannot be canceled."
                )));
            }
            JobStatus::Canceled if !how.force || job.force_canceled => return Ok(job),
            _ => {}
        }
        let statuses: &[&str] = if how.force {
            &["QUEUED", "IN_PROGRESS"]
        } else {
            &["QUEUED"]
        };
        for status in statuses {
            let forced = *status == "IN_PROGRESS";
            sqlx::query(
                "UPDATE job_executions SET status = 'CANCELED', force_canceled = $3, updated_ms = $4, \
                 version = version + 1 WHERE job_id = $1 AND status = $2",
            )
            .bind(job_id)
            .bind(*status)
            .bind(flag(forced))
            .bind(how.now_ms)
            .execute(&mut *tx)
            .await?;
        }
        job.status = JobStatus::Canceled;
        job.force_canceled = how.force;
        if how.reason_code.is_some() {
            job.reason_code.clone_from(&how.reason_code);
        }
        if how.comment.is_some() {
            job.comment.clone_from(&how.comment);
        }
        job.updated_ms = how.now_ms;
        job.version += 1;
        sqlx::query(
            "UPDATE jobs SET status = 'CANCELED', force_canceled = $2, reason_code = $3, comment = $4, \
             updated_ms = $5, version = $6 WHERE job_id = $1",
        )
        .bind(job_id)
        .bind(flag(job.force_canceled))
        .bind(&job.reason_code)
        .bind(&job.comment)
        .bind(job.updated_ms)
        .bind(job.version)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(job)
    }

    async fn delete_job(&self, job_id: &str, force: bool) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let Some(job) = self.job_in(&mut tx, job_id).await? else {
            return Err(StoreError::NotFound(format!(
                "Job {job_id} cannot be found."
            )));
        };
        if job.status == JobStatus::DeletionInProgress {
            return Err(StoreError::InvalidState(format!(
                "Job {job_id} is already being deleted."
            )));
        }
        if !force && !job.status.is_terminal() {
            return Err(StoreError::InvalidState(format!(
                "Job {job_id} is {}; only COMPLETED or CANCELED jobs can be deleted without force.",
                job.status
            )));
        }
        for sql in [
            "DELETE FROM job_executions WHERE job_id = $1",
            "DELETE FROM job_targets WHERE job_id = $1",
            "DELETE FROM jobs WHERE job_id = $1",
        ] {
            sqlx::query(sql).bind(job_id).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get_execution(
        &self,
        job_id: &str,
        thing: &str,
        number: Option<i64>,
    ) -> StoreResult<Option<JobExecution>> {
        let row = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EXECUTION_COLUMNS} FROM job_executions WHERE job_id = $1 AND thing_name = $2 \
             AND ($3 IS NULL OR execution_number = $3) ORDER BY execution_number DESC LIMIT 1"
        )))
        .bind(job_id)
        .bind(thing)
        .bind(number)
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(row_execution).transpose()
    }

    async fn list_executions_for_job(
        &self,
        job_id: &str,
        status: Option<ExecutionStatus>,
        page: &PageRequest,
    ) -> StoreResult<Page<JobExecution>> {
        let (after_thing, after_number) = page
            .after
            .as_deref()
            .map(split_execution_key)
            .unwrap_or((String::new(), i64::MAX));
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EXECUTION_COLUMNS} FROM job_executions WHERE job_id = $1 AND ($2 IS NULL OR status = $2) \
             AND (thing_name > $3 OR (thing_name = $3 AND execution_number > $4)) \
             ORDER BY thing_name, execution_number LIMIT $5"
        )))
        .bind(job_id)
        .bind(status.map(|s| s.as_str()))
        .bind(after_thing)
        .bind(after_number)
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(row_execution)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |e| {
            format!("{}/{}", e.thing_name, e.execution_number)
        }))
    }

    async fn list_executions_for_thing(
        &self,
        thing: &str,
        status: Option<ExecutionStatus>,
        job_id: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<JobExecution>> {
        let (after_job, after_number) = page
            .after
            .as_deref()
            .map(split_execution_key)
            .unwrap_or((String::new(), i64::MAX));
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EXECUTION_COLUMNS} FROM job_executions WHERE thing_name = $1 AND ($2 IS NULL OR status = $2) \
             AND ($3 IS NULL OR job_id = $3) AND (job_id > $4 OR (job_id = $4 AND execution_number > $5)) \
             ORDER BY job_id, execution_number LIMIT $6"
        )))
        .bind(thing)
        .bind(status.map(|s| s.as_str()))
        .bind(job_id)
        .bind(after_job)
        .bind(after_number)
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(row_execution)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |e| {
            format!("{}/{}", e.job_id, e.execution_number)
        }))
    }

    async fn update_execution(&self, e: &JobExecution) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let done = sqlx::query(
            "UPDATE job_executions SET status = $4, force_canceled = $5, status_details = $6, started_ms = $7, \
             updated_ms = $8, version = $9 WHERE job_id = $1 AND thing_name = $2 AND execution_number = $3 \
             AND version = $10",
        )
        .bind(&e.job_id)
        .bind(&e.thing_name)
        .bind(e.execution_number)
        .bind(e.status.as_str())
        .bind(flag(e.force_canceled))
        .bind(to_json(&e.status_details)?)
        .bind(e.started_ms)
        .bind(e.updated_ms)
        .bind(e.version)
        .bind(e.version - 1)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::VersionConflict(format!(
                "The execution of job {} on {} was changed concurrently.",
                e.job_id, e.thing_name
            )));
        }
        self.complete_if_done(&mut tx, &e.job_id, e.updated_ms)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn delete_execution(
        &self,
        job_id: &str,
        thing: &str,
        number: i64,
        force: bool,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(self.locked(&format!(
            "SELECT {EXECUTION_COLUMNS} FROM job_executions WHERE job_id = $1 AND thing_name = $2 \
             AND execution_number = $3"
        )))
        .bind(job_id)
        .bind(thing)
        .bind(number)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(exec) = row.as_ref().map(row_execution).transpose()? else {
            return Err(StoreError::NotFound(format!(
                "Job execution {number} of job {job_id} on thing {thing} cannot be found."
            )));
        };
        if !force && !exec.status.is_terminal() {
            return Err(StoreError::InvalidState(format!(
                "The execution is {}; only terminal executions can be deleted without force.",
                exec.status
            )));
        }
        sqlx::query("DELETE FROM job_executions WHERE job_id = $1 AND thing_name = $2 AND execution_number = $3")
            .bind(job_id)
            .bind(thing)
            .bind(number)
            .execute(&mut *tx)
            .await?;
        self.complete_if_done(&mut tx, job_id, crate::clock::now_ms())
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn pending_executions(
        &self,
        thing: &str,
        limit: usize,
    ) -> StoreResult<Vec<JobExecution>> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EXECUTION_COLUMNS} FROM job_executions WHERE thing_name = $1 \
             AND status IN ('IN_PROGRESS', 'QUEUED') \
             ORDER BY CASE status WHEN 'IN_PROGRESS' THEN 0 ELSE 1 END, queued_ms, job_id LIMIT $2"
        )))
        .bind(thing)
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(row_execution).collect()
    }

    async fn queue_execution_if_absent(&self, e: &JobExecution) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        match self.job_in(&mut tx, &e.job_id).await? {
            Some(job) if job.status == JobStatus::InProgress => {}
            _ => return Ok(false),
        }
        let existing = sqlx::query(
            "SELECT 1 FROM job_executions WHERE job_id = $1 AND thing_name = $2 LIMIT 1",
        )
        .bind(&e.job_id)
        .bind(&e.thing_name)
        .fetch_optional(&mut *tx)
        .await?;
        if existing.is_some() {
            return Ok(false);
        }
        insert_execution(&mut tx, e).await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn start_next_execution(
        &self,
        thing: &str,
        status_details: Option<&BTreeMap<String, String>>,
        now_ms: i64,
    ) -> StoreResult<Option<JobExecution>> {
        let mut tx = self.begin().await?;
        let row = sqlx::query(self.locked(&format!(
            "SELECT {EXECUTION_COLUMNS} FROM job_executions WHERE thing_name = $1 \
             AND status IN ('IN_PROGRESS', 'QUEUED') \
             ORDER BY CASE status WHEN 'IN_PROGRESS' THEN 0 ELSE 1 END, queued_ms, job_id LIMIT 1"
        )))
        .bind(thing)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(mut e) = row.as_ref().map(row_execution).transpose()? else {
            return Ok(None);
        };
        if e.status == ExecutionStatus::Queued {
            e.status = ExecutionStatus::InProgress;
            e.started_ms = Some(now_ms);
            e.updated_ms = now_ms;
            if let Some(d) = status_details {
                e.status_details = d.clone();
            }
            e.version += 1;
            sqlx::query(
                "UPDATE job_executions SET status = 'IN_PROGRESS', status_details = $4, started_ms = $5, \
                 updated_ms = $5, version = version + 1 WHERE job_id = $1 AND thing_name = $2 \
                 AND execution_number = $3",
            )
            .bind(&e.job_id)
            .bind(&e.thing_name)
            .bind(e.execution_number)
            .bind(to_json(&e.status_details)?)
            .bind(now_ms)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        Ok(Some(e))
    }

    // ------------------------------------------------------------ certificates

    async fn create_certificate(&self, c: &Certificate) -> StoreResult<()> {
        let mut tx = self.begin().await?;
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
        .bind(c.updated_ms)
        .execute(&mut *tx)
        .await
        .map_err(|e| on_duplicate(e, || format!("Certificate {} already exists", c.id)))?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_certificate(&self, id: &str) -> StoreResult<Option<Certificate>> {
        let row = sqlx::query("SELECT * FROM certificates WHERE certificate_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_certificate).transpose()
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

    // ------------------------------------------------------------- OTA updates

    async fn create_ota_update(&self, o: &OtaUpdate) -> StoreResult<()> {
        let mut tx = self.begin().await?;
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
        .bind(o.updated_ms)
        .execute(&mut *tx)
        .await
        .map_err(|e| on_duplicate(e, || format!("OTA update {} already exists", o.id)))?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_ota_update(&self, id: &str) -> StoreResult<Option<OtaUpdate>> {
        let row = sqlx::query("SELECT * FROM ota_updates WHERE ota_update_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_ota).transpose()
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

    // ---------------------------------------------------------------------- S3

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
        let row = sqlx::query("SELECT name, versioning, created_ms FROM buckets WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_bucket).transpose()
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
        let row = sqlx::query("SELECT * FROM multipart_uploads WHERE upload_id = $1")
            .bind(upload_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(row_upload).transpose()
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

async fn insert_execution(tx: &mut Tx, e: &JobExecution) -> StoreResult<()> {
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO job_executions ({EXECUTION_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
    )))
    .bind(&e.job_id)
    .bind(&e.thing_name)
    .bind(e.execution_number)
    .bind(e.status.as_str())
    .bind(flag(e.force_canceled))
    .bind(to_json(&e.status_details)?)
    .bind(e.queued_ms)
    .bind(e.started_ms)
    .bind(e.updated_ms)
    .bind(e.version)
    .bind(e.retry_attempt)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
