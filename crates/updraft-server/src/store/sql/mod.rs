//! [`Store`] on SQL: SQLite by default, PostgreSQL for scale-out.
//!
//! The SQL is portable (`$n` parameters, TEXT/BIGINT columns); the backends differ in
//! what [`Dialect`] names: connection setup, how a write transaction starts (SQLite takes
//! the write lock up front with `BEGIN IMMEDIATE`, PostgreSQL locks rows with
//! `FOR UPDATE`), the collation of key columns, and the migration lock — and in how
//! devices' writes are group-committed: `sqlite_devices.rs` (SQLite, its own connection,
//! committed by its callers in turn) and `device_batch.rs` (PostgreSQL, set-based batches from the data plane's
//! writer).

use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{Any, AnyPool, AssertSqlSafe, Row, Transaction};
use std::collections::BTreeSet;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use updraft_protocol::job::OtaUpdateStatus;
use updraft_protocol::{ExecutionStatus, JobStatus};

use super::*;

type Tx = Transaction<'static, Any>;

/// The SQL backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// A migration's text in this dialect (`KEYTEXT`: keys ordered bytewise).
    fn schema(self, sql: &str) -> String {
        let key_text = match self {
            Dialect::Sqlite => "TEXT",
            Dialect::Postgres => "TEXT COLLATE \"C\"",
        };
        sql.replace("KEYTEXT", key_text)
    }
}

/// Versioned migrations, applied in order at start. Never edit one that has shipped.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("../../../migrations/0001_init.sql")),
    (
        2,
        "certificates",
        include_str!("../../../migrations/0002_certificates.sql"),
    ),
    (
        3,
        "signing",
        include_str!("../../../migrations/0003_signing.sql"),
    ),
    (
        4,
        "pending order",
        include_str!("../../../migrations/0004_pending_order.sql"),
    ),
    (
        5,
        "pending index",
        include_str!("../../../migrations/0005_pending_index.sql"),
    ),
];

/// The SQL implementation of [`Store`].
#[derive(Clone)]
pub struct SqlStore {
    /// Reads (and, on PostgreSQL, everything).
    pool: AnyPool,
    /// Write transactions: on SQLite one connection (devices' writes have their own, see
    /// `devices`), on PostgreSQL the same pool.
    writer: AnyPool,
    dialect: Dialect,
    /// SQLite: the connection that group-commits devices' writes
    /// (see `sqlite_devices.rs`).
    devices: Option<Arc<sqlite_devices::DeviceDb>>,
    /// SQLite: the background checkpoints, until the last clone of the store is gone.
    _checkpoints: Option<Arc<AbortOnDrop>>,
}

/// Ends a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The SQLite writer connections' settings: their automatic checkpoint at 8,192 log pages
/// (32 MiB of 4 KiB pages; SQLite's default is 1,000; see [`checkpoints`]), and a 64 MiB
/// page cache (a fleet's executions and their indexes outgrow the default 2 MiB). The
/// device-write connection (`sqlite_devices.rs`) has the same, but runs its checkpoint at
/// 8,192 pages on a blocking thread, off the async runtime.
const WRITER_PRAGMAS: &str = "PRAGMA wal_autocheckpoint=8192; PRAGMA cache_size=-65536;";

/// How often a SQLite database's write-ahead log is copied back into it in the background
/// while the device-write connection commits.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(50);
/// How many [`CHECKPOINT_EVERY`] periods apart the background checkpoints are while it does
/// not (the control plane's writes): 250 ms.
const CHECKPOINT_IDLE_PERIODS: u32 = 5;

/// Checkpoints `pool`'s SQLite database: every [`CHECKPOINT_EVERY`] while the device-write
/// connection commits (`commits` moves), every [`CHECKPOINT_IDLE_PERIODS`] periods otherwise. A
/// PASSIVE checkpoint never takes the write lock: the log is copied back and synced while
/// the writer goes on committing, instead of inside the commit that filled it (a stall of
/// every device write waiting on that batch). Only a checkpoint the writer runs between its
/// own transactions finds every frame copied, which lets the log start over: that is the
/// writer's automatic checkpoint (see [`WRITER_PRAGMAS`]), which has the less to copy and
/// sync the more often these run (and the more often, the more often a page changed again
/// meanwhile is copied again). Measured, medians of 5–7 alternating runs of `updraft bench
/// jobs`: with sustained device writes (`--rounds 60`) every 250 ms ~49–53k updates/s,
/// 100 ms ~54k, 50 ms ~56k, 25 ms ~55–57k; on the default 0.1 s run 250 ms and 50 ms alike
/// (~59k), 25 ms ~57k.
async fn checkpoints(pool: AnyPool, commits: Arc<AtomicU64>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut seen, mut idle) = (commits.load(Ordering::Relaxed), 0);
    loop {
        tick.tick().await;
        if pool.is_closed() {
            return;
        }
        let now = commits.load(Ordering::Relaxed);
        idle += 1;
        if now == seen && idle < CHECKPOINT_IDLE_PERIODS {
            continue;
        }
        (seen, idle) = (now, 0);
        if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .fetch_all(&pool)
            .await
        {
            tracing::debug!(error = %e, "background checkpoint failed");
        }
    }
}

/// The database file a `sqlite://` URL names, and the VFS it asks for (`?vfs=`): what the
/// device-write connection (`sqlite_devices.rs`, outside sqlx) must open to share the
/// database with the pools. Refused: in-memory and temporary databases (`sqlite::memory:`,
/// `mode=memory`, `file::memory:`, no file name), which that connection could not share,
/// and read-only ones (`mode=ro`, `immutable`): the server writes to its database.
fn sqlite_file(url: &str) -> StoreResult<(std::path::PathBuf, Option<String>)> {
    let refuse = |why: &str| {
        StoreError::Invalid(format!(
            "unsupported database URL '{url}': {why}; use sqlite://PATH"
        ))
    };
    let options: sqlx::sqlite::SqliteConnectOptions = url.parse()?;
    let query = url.split_once('?').map_or("", |(_, q)| q);
    let mut vfs = None;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        match (&*key, &*value) {
            ("mode", "memory") => return Err(refuse("an in-memory database cannot be shared")),
            ("mode", "ro") | ("immutable", "true" | "1") => {
                return Err(refuse("the server writes to its database"));
            }
            ("vfs", name) => vfs = Some(name.to_owned()),
            _ => {}
        }
    }
    let path = options.get_filename().to_path_buf();
    let name = path.to_string_lossy();
    // sqlx names its in-memory databases `file:sqlx-in-memory-N`.
    if name.is_empty() || name.starts_with("file:sqlx-in-memory") || name.contains(":memory:") {
        return Err(refuse(
            "an in-memory or temporary database cannot be shared by the server's connections",
        ));
    }
    Ok((path, vfs))
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
/// An execution's columns, in the order of [`EXECUTION_COLUMNS`].
type ExecutionColumns = (
    String,
    String,
    i64,
    String,
    i64,
    String,
    i64,
    Option<i64>,
    i64,
    i64,
    i64,
);

fn execution_from(c: ExecutionColumns) -> StoreResult<JobExecution> {
    let (
        job_id,
        thing_name,
        execution_number,
        status,
        force_canceled,
        status_details,
        queued_ms,
        started_ms,
        updated_ms,
        version,
        retry_attempt,
    ) = c;
    Ok(JobExecution {
        job_id,
        thing_name,
        execution_number,
        status: parse_enum(&status)?,
        force_canceled: force_canceled != 0,
        status_details: from_json(&status_details)?,
        queued_ms,
        started_ms,
        updated_ms,
        version,
        retry_attempt,
    })
}

const JOB_COLUMNS: &str = "job_id, status, target_selection, namespace_id, targets, description, document, \
     document_source, details, force_canceled, reason_code, comment, created_ms, updated_ms, completed_ms, version";
const OBJECT_COLUMNS: &str = "bucket, object_key, version_id, is_latest, delete_marker, size, etag, content_type, \
     checksum, metadata, blob, created_ms";

mod certificates;
mod device_batch;
mod jobs;
mod objects;
mod ota;
mod settings;
mod signing;
mod sqlite_devices;
mod streams;
mod things;

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
        // Commits on the SQLite device-write connection, which the background checkpoints
        // follow.
        let commits = Arc::new(AtomicU64::new(0));
        // Checked before anything is opened: the device-write connection must be able to
        // open the same database.
        let sqlite_file = match dialect {
            Dialect::Sqlite => Some(sqlite_file(url)?),
            Dialect::Postgres => None,
        };
        let (pool, writer, checkpoints) = match dialect {
            Dialect::Sqlite => {
                let url = if url.contains('?') {
                    url.to_owned()
                } else {
                    format!("{url}?mode=rwc")
                };
                // A connection to a local file cannot go stale: no ping (a round trip to
                // the connection's thread) before each use.
                let options = |connections: u32, pragmas: &'static str| {
                    AnyPoolOptions::new()
                        .max_connections(connections)
                        .test_before_acquire(false)
                        .after_connect(move |conn, _meta| {
                            Box::pin(async move {
                                sqlx::raw_sql(AssertSqlSafe(format!(
                                    "PRAGMA journal_mode=WAL; PRAGMA busy_timeout=10000; \
                                     PRAGMA synchronous=NORMAL; {pragmas}"
                                )))
                                .execute(conn)
                                .await?;
                                Ok(())
                            })
                        })
                };
                // SQLite runs one writer at a time. Giving writes a connection of their own
                // queues control-plane writers in the pool (in order, without SQLite's
                // sleeping busy handler) and keeps that connection's page cache warm: a
                // connection whose database another connection changed starts over from
                // the OS's cache. Devices' writes have a connection of their own
                // (`sqlite_devices`); between the two, SQLite's busy handler decides.
                // Copying the write-ahead log back into the database (a checkpoint, with its
                // fsyncs) is mostly done off that path: see `checkpoints`.
                let writer = options(1, WRITER_PRAGMAS).connect(&url).await?;
                let pool = options(8, "").connect(&url).await?;
                let task = tokio::spawn(checkpoints(pool.clone(), commits.clone()));
                (pool, writer, Some(Arc::new(AbortOnDrop(task))))
            }
            Dialect::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(16)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?;
                (pool.clone(), pool, None)
            }
        };
        let mut store = SqlStore {
            pool,
            writer,
            dialect,
            devices: None,
            _checkpoints: checkpoints,
        };
        store.migrate().await?;
        if let Some((path, vfs)) = sqlite_file {
            // Opening waits for the database while another process holds it locked (up to
            // the busy timeout): off the async runtime.
            let db = tokio::task::spawn_blocking(move || {
                sqlite_devices::DeviceDb::open(&path, vfs.as_deref(), commits)
            })
            .await
            .map_err(|e| StoreError::Invalid(format!("cannot open the device writer: {e}")))??;
            store.devices = Some(Arc::new(db));
        }
        Ok(store)
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Closes the pools (waits for connections to be returned).
    pub async fn close(&self) {
        if let Some(db) = &self.devices {
            db.close().await;
        }
        self.pool.close().await;
        self.writer.close().await;
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
            sqlx::raw_sql(AssertSqlSafe(self.dialect.schema(sql)))
                .execute(&mut *tx)
                .await?;
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
            Dialect::Sqlite => self.writer.begin_with("BEGIN IMMEDIATE").await?,
            Dialect::Postgres => self.writer.begin().await?,
        })
    }

    /// Runs one INSERT on its own (a single statement is its own transaction); a duplicate
    /// key becomes `AlreadyExists(what())`.
    async fn insert_one<'q>(
        &self,
        insert: sqlx::query::Query<'q, Any, sqlx::any::AnyArguments>,
        what: impl FnOnce() -> String,
    ) -> StoreResult<()> {
        insert
            .execute(&self.writer)
            .await
            .map_err(|e| on_duplicate(e, what))?;
        Ok(())
    }

    /// The row `sql` selects with its one parameter bound to `key`, decoded by `decode`.
    async fn one_by_key<T>(
        &self,
        sql: &'static str,
        key: &str,
        decode: fn(&AnyRow) -> StoreResult<T>,
    ) -> StoreResult<Option<T>> {
        let row = sqlx::query(sql)
            .bind(key)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(decode).transpose()
    }

    /// `sql` with a row lock when reading inside a write transaction.
    fn locked(&self, sql: &str) -> AssertSqlSafe<String> {
        match self.dialect {
            Dialect::Sqlite => AssertSqlSafe(sql.to_owned()),
            Dialect::Postgres => AssertSqlSafe(format!("{sql} FOR UPDATE")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database at schema version 4 holding executions is upgraded at connect (migration
    /// 5 rebuilds the thing indexes), and reads the same pending lists and listings after.
    #[tokio::test]
    async fn a_version_4_database_with_executions_upgrades() {
        let dir = crate::test_support::ScratchDir::new("upgrade");
        let file = dir.path().join("db.sqlite");
        {
            let conn = rusqlite::Connection::open(&file).expect("a database");
            conn.execute_batch(
                "CREATE TABLE schema_migrations (version BIGINT PRIMARY KEY, \
                 description TEXT NOT NULL, applied_ms BIGINT NOT NULL)",
            )
            .expect("the migrations table");
            for (version, description, sql) in &MIGRATIONS[..4] {
                conn.execute_batch(&Dialect::Sqlite.schema(sql))
                    .expect("a migration");
                conn.execute(
                    "INSERT INTO schema_migrations VALUES (?1, ?2, 0)",
                    rusqlite::params![version, description],
                )
                .expect("recorded");
            }
            // thing-a: job-0 done, job-1 in progress, job-2 and job-3 queued (job-3 first).
            for (job, status, queued) in [
                ("job-0", "SUCCEEDED", 1),
                ("job-1", "IN_PROGRESS", 2),
                ("job-2", "QUEUED", 4),
                ("job-3", "QUEUED", 3),
            ] {
                conn.execute(
                    &format!(
                        "INSERT INTO job_executions ({EXECUTION_COLUMNS}) VALUES \
                     (?1, 'thing-a', 1, ?2, 0, '{{}}', ?3, NULL, ?3, 1, 0)"
                    ),
                    rusqlite::params![job, status, queued],
                )
                .expect("an execution");
            }
        }
        let store = SqlStore::connect(&format!("sqlite://{}", file.display()))
            .await
            .expect("upgraded");
        let pending = store
            .pending_executions("thing-a", 10)
            .await
            .expect("pending");
        let jobs: Vec<(&str, ExecutionStatus)> = pending
            .iter()
            .map(|e| (e.job_id.as_str(), e.status))
            .collect();
        assert_eq!(
            jobs,
            [
                ("job-1", ExecutionStatus::InProgress),
                ("job-3", ExecutionStatus::Queued),
                ("job-2", ExecutionStatus::Queued)
            ]
        );
        let page = PageRequest {
            after: None,
            limit: 10,
        };
        let listed = store
            .list_executions_for_thing("thing-a", None, None, &page)
            .await
            .expect("listed");
        let ids: Vec<&str> = listed.items.iter().map(|e| e.job_id.as_str()).collect();
        assert_eq!(ids, ["job-0", "job-1", "job-2", "job-3"]);
        let indexes: Vec<String> = sqlx::query(
            "SELECT name FROM sqlite_master WHERE tbl_name = 'job_executions' AND type = 'index' \
             AND name LIKE 'job_executions_%' ORDER BY name",
        )
        .fetch_all(&store.pool)
        .await
        .expect("the indexes")
        .iter()
        .map(|r| r.try_get::<String, _>(0).expect("a name"))
        .collect();
        assert_eq!(
            indexes,
            [
                "job_executions_pending",
                "job_executions_status",
                "job_executions_thing"
            ]
        );
        store.close().await;
    }

    #[test]
    fn sqlite_urls_map_to_the_file_and_vfs_the_device_connection_opens() {
        let (path, vfs) = sqlite_file("sqlite:///var/lib/updraft/db.sqlite?mode=rwc&vfs=unix-excl")
            .expect("a file and a VFS");
        assert_eq!(path, std::path::PathBuf::from("/var/lib/updraft/db.sqlite"));
        assert_eq!(vfs.as_deref(), Some("unix-excl"));
        let (path, vfs) = sqlite_file("sqlite://data/a%20b.db").expect("a file");
        assert_eq!(path, std::path::PathBuf::from("data/a b.db"));
        assert_eq!(vfs, None);
        for url in [
            "sqlite::memory:",
            "sqlite://x.db?mode=memory",
            "sqlite:file::memory:",
            "sqlite://",
            "sqlite://x.db?mode=ro",
            "sqlite://x.db?immutable=1",
        ] {
            assert!(sqlite_file(url).is_err(), "{url}");
        }
    }
}
