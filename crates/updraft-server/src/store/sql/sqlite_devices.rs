//! SQLite: devices' writes (execution updates and StartNext), group-committed on a
//! connection of their own.
//!
//! Every device write is a small transaction, and SQLite serializes commits. So the writes
//! wait in one queue, and the first caller to find nobody committing commits them (flat
//! combining): unless [`GATHER_BELOW`] requests already wait, it first lets the tasks ready
//! on its thread run ([`tokio::task::yield_now`]: the devices the last batch answered send
//! their next writes in that time); then it commits every write waiting (up to
//! [`MAX_BATCH`]) in one transaction and answers their callers. If writes came meanwhile,
//! a task goes on in the same way until the queue is empty (see [`Committing`]). The
//! others only wait for their answers. A commit's cost is shared by every device waiting
//! on it, and a write is applied on a thread of the runtime, mostly the one that received
//! it: no hand-off to another thread and back, each a wake-up of a thread (on a 2-core
//! virtual machine, of a halted vCPU: tens of microseconds) and a wait for a core. Each
//! caller still waits for its own write to be committed before its device is answered.
//!
//! The connection never waits on the async runtime's threads: it has no busy timeout
//! there, and it does not checkpoint the log itself. When another connection holds the
//! database's write lock (the control plane's writer, see below), or a commit has grown
//! the log past [`CHECKPOINT_FRAMES`], the connection goes to a blocking thread
//! ([`tokio::task::spawn_blocking`]), which checkpoints or waits for the lock (up to
//! [`BUSY_TIMEOUT`]) and commits what is waiting until the queue is empty; meanwhile callers
//! leave their writes to it. A batch is still run on the runtime's thread (at most
//! [`MAX_BATCH`] writes of a few microseconds each). One exception, at shutdown only: while
//! [`DeviceDb::close`] commits the last writes (waiting for the lock if need be), a
//! committer on the runtime waits for the connection.
//!
//! Why not through sqlx: sqlx runs each SQLite connection on a thread of its own and hands
//! every statement, every result and every row between that thread and its caller. A batch
//! is many small statements (one or two per write, each a lookup by key); here it costs no
//! hand-off at all. The statements change at most one row each and call no function, so
//! SQLite runs them without a statement journal (a copy of each page before it is changed,
//! which set-based statements reading the batch from JSON needed). PostgreSQL's group
//! commit is the data plane's writer (`dataplane/writer.rs`) with `device_batch.rs`.
//!
//! Control-plane changes to one execution (CancelJobExecution, a CONTINUOUS job's member
//! leaving: `Store::update_execution`) come this way too; the other writes go through
//! sqlx's writer pool, and SQLite serializes the two connections' write transactions.

use rusqlite::{Connection, TransactionBehavior, params};
use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

use super::device_batch::{Ends, carry_pending_lists};
use super::{EXECUTION_COLUMNS, ExecutionColumns, WRITER_PRAGMAS, execution_from, flag, to_json};
use crate::store::{
    DeviceWrite, DeviceWriteOutcome, ExecutionStatus, JobExecution, StoreError, StoreResult,
};

/// The most writes committed together.
const MAX_BATCH: usize = 256;
/// A committer that finds fewer requests than this waiting lets the tasks ready on its
/// thread run first, to commit their writes with them (see [`Committing`]).
const GATHER_BELOW: usize = 8;
/// The most batches a committer commits without yielding.
const UNYIELDED: usize = 2;
/// How long the blocking thread waits for the write lock another connection holds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);
/// The log's length (in pages) past which a commit is followed by a checkpoint, on the
/// blocking thread: the writer connections' automatic checkpoint (`WRITER_PRAGMAS`).
const CHECKPOINT_FRAMES: i32 = 8192;

type Outcomes = StoreResult<Vec<DeviceWriteOutcome>>;
/// A caller's writes (applied in order, in one transaction) and where their outcomes go.
type Request = (Vec<DeviceWrite>, oneshot::Sender<Outcomes>);

/// The device-write connection and the writes waiting for it.
pub(super) struct DeviceDb {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// `None` once the store is closed.
    conn: Mutex<Option<Connection>>,
    /// Each transaction committed (the background checkpoints follow it).
    commits: Arc<AtomicU64>,
    /// [`CHECKPOINT_FRAMES`] (smaller in tests).
    checkpoint_frames: i32,
    /// The checkpoints the blocking thread ran.
    checkpoints: AtomicU64,
}

#[derive(Default)]
struct Queue {
    requests: VecDeque<Request>,
    /// Who commits the waiting writes, if anybody does.
    committer: Committer,
    closed: bool,
}

#[derive(Default, Clone, Copy, PartialEq, Debug)]
enum Committer {
    #[default]
    Nobody,
    /// A caller, on the async runtime.
    Caller,
    /// The blocking thread: the database was locked, or the log is to be checkpointed.
    Blocking,
}

/// Why the connection went to the blocking thread.
#[derive(Clone, Copy, PartialEq, Debug)]
enum HandOff {
    /// Another connection holds the write lock (the batch is back at the queue's head).
    Locked,
    /// The log has grown past its checkpoint length.
    Checkpoint,
}

fn gone() -> StoreError {
    StoreError::Invalid("the store is closed".into())
}

thread_local! {
    /// The log's length (in pages) after this thread's last commit (SQLite's log hook).
    static LOG_FRAMES: Cell<i32> = const { Cell::new(0) };
}

/// SQLite's log hook, called by the committing thread once a commit is in the log. It
/// replaces the connection's automatic checkpoint: the checkpoint is run by the blocking
/// thread instead (see [`HandOff::Checkpoint`]).
fn log_written(_: &rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    LOG_FRAMES.set(frames);
    Ok(())
}

impl DeviceDb {
    /// Opens the database file at `path` (its schema already migrated), through the SQLite
    /// VFS named `vfs` when there is one (the database URL's `?vfs=`, which the pools use
    /// too); each transaction it commits is counted in `commits`.
    pub(super) fn open(
        path: &Path,
        vfs: Option<&str>,
        commits: Arc<AtomicU64>,
    ) -> StoreResult<Self> {
        Self::open_checkpointing_at(path, vfs, commits, CHECKPOINT_FRAMES)
    }

    fn open_checkpointing_at(
        path: &Path,
        vfs: Option<&str>,
        commits: Arc<AtomicU64>,
        checkpoint_frames: i32,
    ) -> StoreResult<Self> {
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match vfs {
            Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs)?,
            None => Connection::open_with_flags(path, flags)?,
        };
        // Opening is off the runtime (the caller's `spawn_blocking`): it may wait.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // The writer pool's settings (WAL, commits not synced: the log is, at checkpoints;
        // see `WRITER_PRAGMAS`), but the log hook instead of the automatic checkpoint.
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; {WRITER_PRAGMAS}"
        ))?;
        conn.wal_hook(Some(log_written));
        conn.busy_timeout(Duration::ZERO)?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(DeviceDb {
            shared: Arc::new(Shared {
                queue: Mutex::new(Queue::default()),
                conn: Mutex::new(Some(conn)),
                commits,
                checkpoint_frames,
                checkpoints: AtomicU64::new(0),
            }),
        })
    }

    /// Applies `writes` in order in one transaction (with other callers' writes).
    pub(super) async fn write(&self, writes: Vec<DeviceWrite>) -> Outcomes {
        let (done, outcome) = oneshot::channel();
        let commits = {
            let mut queue = self.shared.queue();
            if queue.closed {
                return Err(gone());
            }
            queue.requests.push_back((writes, done));
            let commits = queue.committer == Committer::Nobody;
            if commits {
                queue.committer = Committer::Caller;
            }
            commits
        };
        if commits {
            let mut committing = Committing {
                shared: Some(self.shared.clone()),
                caller: true,
            };
            committing.run().await;
        }
        outcome.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Stops taking writes; returns once those taken are answered and the connection is
    /// closed.
    pub(super) async fn close(&self) {
        self.shared.queue().closed = true;
        let shared = self.shared.clone();
        let closed = tokio::task::spawn_blocking(move || {
            let mut conn = shared.conn();
            if let Some(c) = conn.as_mut() {
                shared.commit_waiting(c);
            }
            conn.take();
            shared.fail_waiting();
        });
        if let Err(e) = closed.await {
            tracing::error!(error = %e, "device writes: closing failed");
        }
    }
}

/// Commits the waiting writes on the async runtime: first the caller that found nobody
/// committing, for one batch (which holds its own write unless more than [`MAX_BATCH`] were
/// ahead of it); then, while writes keep coming, a task of its own, so that no caller waits
/// on others' writes for longer than its own batch.
struct Committing {
    /// `None` once done: the queue was found empty, or the blocking thread took over.
    shared: Option<Arc<Shared>>,
    caller: bool,
}

impl Committing {
    async fn run(&mut self) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        // Batches committed since this task last yielded.
        let mut unyielded = 0;
        loop {
            // Fewer than `GATHER_BELOW` requests waiting: the tasks ready on this thread run
            // first, and the writes they bring are committed with these. Otherwise they are
            // committed at once, but never more than `UNYIELDED` batches in a row: the tasks
            // this one wakes may wait where no other thread can take them (tokio's LIFO slot).
            if unyielded >= UNYIELDED || shared.queue().requests.len() < GATHER_BELOW {
                tokio::task::yield_now().await;
                unyielded = 0;
            }
            unyielded += 1;
            let handed_off = {
                let mut conn = shared.conn();
                match conn.as_mut() {
                    Some(c) => shared.commit_next(c),
                    None => {
                        shared.fail_waiting();
                        None
                    }
                }
            };
            let mut queue = shared.queue();
            if let Some(why) = handed_off {
                queue.committer = Committer::Blocking;
                drop(queue);
                Shared::hand_off(&shared, why);
                break;
            }
            if queue.requests.is_empty() {
                queue.committer = Committer::Nobody;
                break;
            }
            if self.caller {
                drop(queue);
                Shared::go_on(&shared);
                break;
            }
        }
        self.shared = None;
    }
}

impl Drop for Committing {
    /// Not done: a caller gave up (an HTTP client went away) and a task goes on in its
    /// place; or the task itself was dropped (the runtime is shutting down): what is
    /// waiting is committed here.
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            if self.caller {
                Shared::go_on(&shared);
            } else {
                shared.drain(None);
            }
        }
    }
}

impl Shared {
    /// The queue (its lock is never held across anything that can panic).
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The connection: a panic while it was held left no transaction open (see
    /// [`settle`], run after every failed batch), so it is used again.
    fn conn(&self) -> MutexGuard<'_, Option<Connection>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A task of its own commits the waiting writes on the runtime (without a runtime, this
    /// thread does, waiting as the blocking thread does).
    fn go_on(shared: &Arc<Shared>) {
        let mut next = Committing {
            shared: Some(shared.clone()),
            caller: false,
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // Dropped unrun, it commits where it is dropped.
            drop(runtime.spawn(async move { next.run().await }));
        }
    }

    /// The connection goes to a blocking thread (see the module's notes), which commits
    /// what is waiting until the queue is empty (after the checkpoint, if that is `why`).
    fn hand_off(shared: &Arc<Shared>, why: HandOff) {
        /// Drains when dropped: by the blocking task that runs, or, dropped unrun (the
        /// runtime shutting down), wherever it is dropped.
        struct Drainer(Arc<Shared>, HandOff);
        impl Drop for Drainer {
            fn drop(&mut self) {
                self.0.drain(Some(self.1));
            }
        }
        let drainer = Drainer(shared.clone(), why);
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(move || drop(drainer))),
            // Without a runtime, here.
            Err(_) => drop(drainer),
        }
    }

    /// Commits what is waiting, waiting for the database as long as [`BUSY_TIMEOUT`] each
    /// time, until the queue is empty; then nobody commits. Called where waiting is fine:
    /// on the blocking thread, or when nothing else can go on.
    fn drain(self: &Arc<Shared>, why: Option<HandOff>) {
        /// Unless it finished, the writes waiting must not be left to nobody (a panic).
        struct Release<'a> {
            shared: &'a Arc<Shared>,
            done: bool,
        }
        impl Drop for Release<'_> {
            fn drop(&mut self) {
                if self.done {
                    return;
                }
                tracing::error!("device writes: committing panicked");
                // A task goes on; without a runtime the next caller does.
                let runtime = tokio::runtime::Handle::try_current().is_ok();
                self.shared.queue().committer = if runtime {
                    Committer::Caller
                } else {
                    Committer::Nobody
                };
                if runtime {
                    Shared::go_on(self.shared);
                }
            }
        }
        let mut release = Release {
            shared: self,
            done: false,
        };
        let mut conn = self.conn();
        if why == Some(HandOff::Checkpoint)
            && let Some(c) = conn.as_ref()
        {
            self.checkpoint(c);
        }
        loop {
            match conn.as_mut() {
                Some(c) => self.commit_waiting(c),
                None => self.fail_waiting(),
            }
            // Checked and let go together: a write queued from here on finds nobody
            // committing, and commits itself.
            let mut queue = self.queue();
            if queue.requests.is_empty() {
                queue.committer = Committer::Nobody;
                break;
            }
        }
        release.done = true;
    }

    /// Copies the log back into the database, between the connection's transactions: the
    /// checkpoint that lets the log start over (see `checkpoints` in `sql/mod.rs`).
    fn checkpoint(&self, conn: &Connection) {
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "device writes: the log's checkpoint failed");
        }
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
    }

    /// Answers every waiting write: the store is closed.
    fn fail_waiting(&self) {
        let waiting = std::mem::take(&mut self.queue().requests);
        for (_, done) in waiting {
            let _ = done.send(Err(gone()));
        }
    }

    /// The next batch: the writes waiting, up to [`MAX_BATCH`] (at least one request).
    fn next_batch(&self) -> Vec<Request> {
        let mut queue = self.queue();
        let mut batch = Vec::new();
        let mut size = 0;
        while let Some((writes, _)) = queue.requests.front() {
            if size > 0 && size + writes.len() > MAX_BATCH {
                break;
            }
            size += writes.len();
            batch.extend(queue.requests.pop_front());
        }
        batch
    }

    /// On the async runtime: commits the next batch, never waiting for the database. What
    /// the blocking thread must do next, if anything: a batch the lock held back is at the
    /// head of the queue again.
    fn commit_next(&self, conn: &mut Connection) -> Option<HandOff> {
        let batch = self.next_batch();
        if batch.is_empty() {
            return None;
        }
        if let Err(batch) = self.commit(conn, batch, false) {
            let mut queue = self.queue();
            for request in batch.into_iter().rev() {
                queue.requests.push_front(request);
            }
            return Some(HandOff::Locked);
        }
        (LOG_FRAMES.get() >= self.checkpoint_frames).then_some(HandOff::Checkpoint)
    }

    /// On the blocking thread: commits the waiting writes, batch after batch, until the
    /// queue is empty, waiting up to [`BUSY_TIMEOUT`] for the database each time (and
    /// checkpointing when the log has grown long).
    fn commit_waiting(&self, conn: &mut Connection) {
        if let Err(e) = conn.busy_timeout(BUSY_TIMEOUT) {
            tracing::warn!(error = %e, "device writes: cannot set the busy timeout");
        }
        loop {
            let batch = self.next_batch();
            if batch.is_empty() {
                break;
            }
            // Nothing is given back when the commit may wait.
            let _ = self.commit(conn, batch, true);
            if LOG_FRAMES.get() >= self.checkpoint_frames {
                LOG_FRAMES.set(0);
                self.checkpoint(conn);
            }
        }
        if let Err(e) = conn.busy_timeout(Duration::ZERO) {
            tracing::warn!(error = %e, "device writes: cannot clear the busy timeout");
        }
    }

    /// Commits `batch` and answers its callers. Unless the commit `may_wait` for the
    /// database, a batch the database's lock held back is given back unanswered (its
    /// callers answered so far stay answered).
    fn commit(
        &self,
        conn: &mut Connection,
        batch: Vec<Request>,
        may_wait: bool,
    ) -> Result<(), Vec<Request>> {
        LOG_FRAMES.set(0);
        let writes: Vec<&DeviceWrite> = batch.iter().flat_map(|(w, _)| w).collect();
        let e = match apply(conn, &writes, &self.commits) {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for (w, done) in batch {
                    let _ = done.send(Ok(outcomes.by_ref().take(w.len()).collect()));
                }
                return Ok(());
            }
            Err(e) => e,
        };
        settle(conn);
        let size = writes.len();
        match busy(&e) {
            Some(_) if !may_wait => return Err(batch),
            // The database stayed locked for the whole busy timeout: writing singly would
            // wait that long again for each caller.
            Some((code, message)) => {
                tracing::warn!(error = %e, size, "device writes: the database is busy");
                for (_, done) in batch {
                    let again = rusqlite::Error::SqliteFailure(code, message.clone());
                    let _ = done.send(Err(again.into()));
                }
            }
            None if batch.len() > 1 => {
                // One caller's write may be what failed: each gets its own outcome.
                tracing::warn!(error = %e, size, "group commit failed; writing singly");
                let mut rest = batch.into_iter();
                while let Some((w, done)) = rest.next() {
                    let writes: Vec<&DeviceWrite> = w.iter().collect();
                    let outcome = apply(conn, &writes, &self.commits);
                    if let Err(e) = &outcome {
                        settle(conn);
                        if !may_wait && busy(e).is_some() {
                            return Err(std::iter::once((w, done)).chain(rest).collect());
                        }
                    }
                    let _ = done.send(outcome);
                }
            }
            None => {
                if let Some((_, done)) = batch.into_iter().next() {
                    let _ = done.send(Err(e));
                }
            }
        }
        Ok(())
    }
}

/// What makes up `e` (to give every caller a copy) if it is SQLite's "busy" or "locked".
fn busy(e: &StoreError) -> Option<(rusqlite::ffi::Error, Option<String>)> {
    match e {
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, message))
            if matches!(
                f.code,
                rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked
            ) =>
        {
            Some((*f, message.clone()))
        }
        _ => None,
    }
}

/// After a failed batch: its transaction must not outlive it. Dropping it rolled it back
/// unless the rollback itself failed (then it is tried again here; a connection stuck in a
/// transaction would hold SQLite's write lock and fail every later batch).
fn settle(conn: &Connection) {
    if !conn.is_autocommit()
        && let Err(e) = conn.execute_batch("ROLLBACK")
    {
        tracing::error!(error = %e, "device writes: a failed batch could not be rolled back");
    }
}

/// A write that keeps the status (IN_PROGRESS with new details, the most common) leaves
/// `status` out, so SQLite leaves the two indexes on it alone.
const KEEP_STATUS: &str = "UPDATE job_executions SET force_canceled = ?5, status_details = ?6, \
     started_ms = ?7, updated_ms = ?8, version = ?9 WHERE job_id = ?1 AND thing_name = ?2 \
     AND execution_number = ?3 AND version = ?9 - 1 AND queued_ms = ?10 AND status = ?4";
const MOVE_STATUS: &str = "UPDATE job_executions SET status = ?4, force_canceled = ?5, \
     status_details = ?6, started_ms = ?7, updated_ms = ?8, version = ?9 WHERE job_id = ?1 \
     AND thing_name = ?2 AND execution_number = ?3 AND version = ?9 - 1 AND queued_ms = ?10 \
     AND status <> ?4";
/// A thing's first QUEUED execution starts unless one is in progress.
const START_NEXT: &str = "UPDATE job_executions SET status = 'IN_PROGRESS', started_ms = ?3, \
     updated_ms = ?3, status_details = COALESCE(?2, status_details), version = version + 1 \
     WHERE rowid = (SELECT rowid FROM job_executions WHERE thing_name = ?1 AND status = 'QUEUED' \
     ORDER BY queued_ms, job_id LIMIT 1) AND NOT EXISTS (SELECT 1 FROM job_executions \
     WHERE thing_name = ?1 AND status = 'IN_PROGRESS')";
/// A SNAPSHOT job whose executions are all terminal is complete.
const COMPLETE: &str = "UPDATE jobs SET status = 'COMPLETED', completed_ms = ?2, updated_ms = ?2, \
     version = version + 1 WHERE job_id = ?1 AND status = 'IN_PROGRESS' \
     AND target_selection = 'SNAPSHOT' AND NOT EXISTS (SELECT 1 FROM job_executions \
     WHERE job_id = ?1 AND status IN ('QUEUED', 'IN_PROGRESS'))";

/// [`crate::store::JobStore::device_writes`] on `conn`: the writes in order, each seeing the
/// ones before it; then the jobs terminal updates may complete, then the pending lists
/// ended executions carry (as they stand after the whole batch); the commit is counted in
/// `commits`.
fn apply(conn: &mut Connection, writes: &[&DeviceWrite], commits: &AtomicU64) -> Outcomes {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(writes.len());
    for &w in writes {
        outcomes.push(match w {
            DeviceWrite::Update { execution: e, .. } => {
                let details = to_json(&e.status_details)?;
                let values = params![
                    e.job_id,
                    e.thing_name,
                    e.execution_number,
                    e.status.as_str(),
                    flag(e.force_canceled),
                    details,
                    e.started_ms,
                    e.updated_ms,
                    e.version,
                    e.queued_ms,
                ];
                // The likelier one first: progress reports keep IN_PROGRESS, other
                // statuses are reached from another.
                let tries = if e.status == ExecutionStatus::InProgress {
                    [KEEP_STATUS, MOVE_STATUS]
                } else {
                    [MOVE_STATUS, KEEP_STATUS]
                };
                let mut written = false;
                for sql in tries {
                    if tx.prepare_cached(sql)?.execute(values)? == 1 {
                        written = true;
                        break;
                    }
                }
                if written && e.status.is_terminal() {
                    // The list is filled in below, once every write is applied.
                    DeviceWriteOutcome::Ended(Vec::new())
                } else {
                    DeviceWriteOutcome::Updated(written)
                }
            }
            DeviceWrite::StartNext {
                thing,
                status_details,
                now_ms,
            } => {
                let details = status_details.as_ref().map(to_json).transpose()?;
                tx.prepare_cached(START_NEXT)?
                    .execute(params![thing, details, now_ms])?;
                DeviceWriteOutcome::Started(pending(&tx, thing, 1)?.pop())
            }
        });
    }
    let ends = Ends::of(writes.iter().copied());
    for (job, at) in &ends.jobs {
        tx.prepare_cached(COMPLETE)?.execute(params![job, at])?;
    }
    let mut lists = HashMap::new();
    for thing in ends.things {
        lists.insert(thing.to_owned(), pending(&tx, thing, ends.listed)?);
    }
    carry_pending_lists(&mut outcomes, writes.iter().copied(), &lists);
    tx.commit()?;
    commits.fetch_add(1, Ordering::Relaxed);
    Ok(outcomes)
}

/// Thing `?1`'s executions in `status` (QUEUED or IN_PROGRESS), by queue time. The status
/// is a literal: SQLite then reads them from the partial index of open executions
/// (migration 5), which it uses only for a term of the index's own. The texts are made
/// once (the statement cache looks them up by text on every read).
fn pending_query(status: ExecutionStatus) -> &'static str {
    static TEXTS: std::sync::LazyLock<[String; 2]> = std::sync::LazyLock::new(|| {
        [ExecutionStatus::InProgress, ExecutionStatus::Queued].map(|status| {
            format!(
                "SELECT {EXECUTION_COLUMNS} FROM job_executions WHERE thing_name = ?1 \
                 AND status = '{}' ORDER BY queued_ms, job_id",
                status.as_str()
            )
        })
    });
    debug_assert!(
        !status.is_terminal(),
        "the partial index holds open executions only"
    );
    let [in_progress, queued] = &*TEXTS;
    if status == ExecutionStatus::InProgress {
        in_progress
    } else {
        queued
    }
}

/// `thing`'s pending executions, IN_PROGRESS first, then QUEUED, each by queue time: at
/// most `limit` (each status read in index order, and no further than needed).
fn pending(conn: &Connection, thing: &str, limit: usize) -> StoreResult<Vec<JobExecution>> {
    let mut list = Vec::new();
    for status in [ExecutionStatus::InProgress, ExecutionStatus::Queued] {
        if list.len() == limit {
            break;
        }
        let mut statement = conn.prepare_cached(pending_query(status))?;
        let mut rows = statement.query(params![thing])?;
        while list.len() < limit
            && let Some(row) = rows.next()?
        {
            let columns: ExecutionColumns = (
                row.get(0)?,
                row.get(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
                row.get(5)?,
                row.get(6)?,
                row.get(7)?,
                row.get(8)?,
                row.get(9)?,
                row.get(10)?,
            );
            list.push(execution_from(columns)?);
        }
    }
    Ok(list)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::ScratchDir;

    /// A migrated database in a scratch directory of its own, holding one QUEUED execution
    /// for each of `names`, and its device-write connection.
    struct Fixture {
        dir: ScratchDir,
        names: Vec<String>,
        db: Arc<DeviceDb>,
        /// The transactions `db` committed.
        commits: Arc<AtomicU64>,
    }

    /// A [`Fixture`] of `count` things (`thing-0`, …) whose connection checkpoints the log
    /// past `frames` pages.
    fn fixture(tag: &str, count: usize, frames: i32) -> Fixture {
        let dir = ScratchDir::new(tag);
        let names: Vec<String> = (0..count).map(|i| format!("thing-{i}")).collect();
        let path = dir.path().join("devices.db");
        let conn = Connection::open(&path).expect("database");
        conn.execute_batch("PRAGMA journal_mode=WAL").expect("WAL");
        for (_, _, sql) in super::super::MIGRATIONS {
            conn.execute_batch(&super::super::Dialect::Sqlite.schema(sql))
                .expect("migration");
        }
        for t in &names {
            conn.execute(
                "INSERT INTO job_executions (job_id, thing_name, execution_number, status, \
                 force_canceled, status_details, queued_ms, updated_ms, version, \
                 retry_attempt) VALUES ('job', ?1, 1, 'QUEUED', 0, '{}', 1, 1, 1, 0)",
                params![t],
            )
            .expect("an execution");
        }
        // The log starts empty (see `log_size`).
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .expect("checkpoint");
        let commits = Arc::new(AtomicU64::new(0));
        let db = DeviceDb::open_checkpointing_at(&path, None, commits.clone(), frames)
            .expect("device writes");
        Fixture {
            dir,
            names,
            db: Arc::new(db),
            commits,
        }
    }

    /// Waits until nobody commits (the blocking thread answers its callers before it lets
    /// go of the queue).
    async fn let_go(db: &DeviceDb) {
        while db.shared.queue().committer != Committer::Nobody {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A StartNext for `thing` at `now_ms`.
    fn start_next(thing: &str, now_ms: i64) -> Vec<DeviceWrite> {
        vec![DeviceWrite::StartNext {
            thing: thing.to_owned(),
            status_details: None,
            now_ms,
        }]
    }

    /// When the execution a StartNext answered with started (the time of the StartNext that
    /// started it).
    fn started(outcome: Outcomes) -> Option<i64> {
        match outcome.expect("a committed write").pop() {
            Some(DeviceWriteOutcome::Started(Some(e))) => e.started_ms,
            other => panic!("not a started execution: {other:?}"),
        }
    }

    fn current_thread() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// `test` on `runtime`, failed if it has not finished within a minute (a write left
    /// waiting for nobody would otherwise hang).
    fn within_a_minute<T>(
        runtime: &tokio::runtime::Runtime,
        test: impl std::future::Future<Output = T>,
    ) -> T {
        runtime
            .block_on(async { tokio::time::timeout(Duration::from_secs(60), test).await })
            .expect("finished within a minute")
    }

    /// Runs `writers` StartNexts at once, one per thing, on a one-thread runtime; for each
    /// (in the order of `names`) its outcome and how many commits there had been when it
    /// was answered.
    fn at_once(
        db: &Arc<DeviceDb>,
        commits: &Arc<AtomicU64>,
        names: &[String],
    ) -> Vec<(Option<i64>, u64)> {
        within_a_minute(&current_thread(), async {
            // All ready before any runs: the first to run commits, after letting the others
            // queue their writes.
            let tasks: Vec<_> = names
                .iter()
                .map(|t| {
                    let (db, commits, t) = (db.clone(), commits.clone(), t.clone());
                    tokio::spawn(async move {
                        let outcome = started(db.write(start_next(&t, 2)).await);
                        (outcome, commits.load(Ordering::Relaxed))
                    })
                })
                .collect();
            let mut outcomes = Vec::new();
            for t in tasks {
                outcomes.push(t.await.expect("a writer"));
            }
            outcomes
        })
    }

    /// `db.write(writes)` polled once, with nothing to wake it: its writes are queued and
    /// its caller, committing, has yielded.
    fn queued<'a>(
        db: &'a DeviceDb,
        writes: Vec<DeviceWrite>,
    ) -> std::pin::Pin<Box<impl std::future::Future<Output = Outcomes> + 'a>> {
        let mut write = Box::pin(db.write(writes));
        let polled = write
            .as_mut()
            .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()));
        assert!(polled.is_pending(), "answered at once");
        write
    }

    /// The size of the database's write-ahead log file.
    fn log_size(dir: &ScratchDir) -> u64 {
        std::fs::metadata(dir.path().join("devices.db-wal")).map_or(0, |m| m.len())
    }

    /// What SQLite plans for `sql` on the migrated schema: one line per step.
    fn plan(conn: &Connection, sql: &str) -> Vec<String> {
        let mut statement = conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .expect(sql);
        let unbound = vec![rusqlite::types::Null; statement.parameter_count()];
        let steps = statement
            .query_map(rusqlite::params_from_iter(unbound), |row| {
                row.get::<_, String>(3)
            })
            .expect("plan");
        steps.collect::<Result<_, _>>().expect("plan steps")
    }

    #[test]
    fn devices_read_pending_lists_from_the_index_of_open_executions() {
        let conn = Connection::open_in_memory().expect("in-memory database");
        for (_, _, sql) in super::super::MIGRATIONS {
            conn.execute_batch(&super::super::Dialect::Sqlite.schema(sql))
                .expect("migration");
        }
        let head = "job_executions_pending (status=? AND thing_name=?)";
        let cases = [
            (START_NEXT.to_owned(), 2),
            (pending_query(ExecutionStatus::InProgress).to_owned(), 1),
            (pending_query(ExecutionStatus::Queued).to_owned(), 1),
        ];
        for (sql, reads) in cases {
            let steps = plan(&conn, &sql);
            let by_head = steps.iter().filter(|s| s.contains(head)).count();
            assert_eq!(by_head, reads, "{sql}: {steps:?}");
            assert!(
                !steps
                    .iter()
                    .any(|s| s.starts_with("SCAN") || s.contains("TEMP B-TREE")),
                "{sql}: {steps:?}"
            );
        }
        // Listing a thing's executions reads the thing index, which holds no status.
        let listing = plan(
            &conn,
            "SELECT job_id FROM job_executions WHERE thing_name = ?1 AND job_id > ?2 \
             ORDER BY job_id, execution_number LIMIT 5",
        );
        assert!(
            listing
                .iter()
                .any(|s| s.contains("job_executions_thing (thing_name=? AND job_id>?)")),
            "{listing:?}"
        );
    }

    #[test]
    fn writers_ready_together_share_one_commit() {
        let f = fixture("combine", 20, CHECKPOINT_FRAMES);
        let outcomes = at_once(&f.db, &f.commits, &f.names);
        assert!(outcomes.iter().all(|o| *o == (Some(2), 1)), "{outcomes:?}");
        assert_eq!(f.commits.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_caller_commits_one_batch_and_leaves_the_rest_to_a_task() {
        let f = fixture("combine-fair", MAX_BATCH + 20, CHECKPOINT_FRAMES);
        let outcomes = at_once(&f.db, &f.commits, &f.names);
        // The first caller is answered once its batch (the first MAX_BATCH writes) is
        // committed, not after the writes that queued meanwhile.
        assert_eq!(outcomes[0], (Some(2), 1));
        assert!(
            outcomes[MAX_BATCH..].iter().all(|o| *o == (Some(2), 2)),
            "{outcomes:?}"
        );
        assert_eq!(f.commits.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn many_writers_on_two_threads_are_all_answered_in_their_own_order() {
        let f = fixture("combine-mt", 40, CHECKPOINT_FRAMES);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let answers = within_a_minute(&runtime, async {
            let tasks: Vec<_> = f
                .names
                .iter()
                .map(|t| {
                    let (db, t) = (f.db.clone(), t.clone());
                    tokio::spawn(async move {
                        // The first starts the thing's job, the second finds it started.
                        let first = started(db.write(start_next(&t, 2)).await);
                        let second = started(db.write(start_next(&t, 3)).await);
                        (first, second)
                    })
                })
                .collect();
            let mut answers = Vec::new();
            for t in tasks {
                answers.push(t.await.expect("a writer"));
            }
            answers
        });
        assert!(
            answers.iter().all(|a| *a == (Some(2), Some(2))),
            "{answers:?}"
        );
        // Forty tasks ready at once on two threads: some of their writes were committed
        // together.
        let commits = f.commits.load(Ordering::Relaxed);
        assert!(commits < 80, "{commits} commits for 80 writes");
    }

    #[test]
    fn a_committer_whose_caller_gives_up_leaves_one_in_its_place() {
        let f = fixture("combine-cancel", 2, CHECKPOINT_FRAMES);
        let (db, names) = (&f.db, &f.names);
        within_a_minute(&current_thread(), async {
            // Polled once (it queues its write, becomes the committer and lets other tasks
            // run), then dropped.
            drop(queued(db, start_next(&names[0], 2)));
            // The next caller is answered, and the write of the one that gave up committed.
            let second = start_next(&names[1], 3);
            assert_eq!(started(db.write(second).await), Some(3));
            let again = db.write(start_next(&names[0], 4)).await;
            assert_eq!(started(again), Some(2), "the first write was not committed");
        });
    }

    #[test]
    fn while_another_connection_holds_the_database_the_runtime_goes_on() {
        let Fixture { dir, names, db, .. } = fixture("combine-locked", 1, CHECKPOINT_FRAMES);
        let other = Connection::open(dir.path().join("devices.db")).expect("another connection");
        other
            .execute_batch("BEGIN IMMEDIATE")
            .expect("the write lock");
        let (release, released) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _ = released.recv();
            other.execute_batch("COMMIT").expect("commit");
        });
        within_a_minute(&current_thread(), async {
            let write = tokio::spawn({
                let db = db.clone();
                let t = names[0].clone();
                async move { (db.write(start_next(&t, 2)).await, db) }
            });
            // The one runtime thread is not held by the waiting write: this task runs.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(
                !write.is_finished(),
                "written while the database was locked"
            );
            release.send(()).expect("release");
            let (outcome, db) = write.await.expect("the writer");
            assert_eq!(started(outcome), Some(2));
            // Once the blocking thread lets go, the next write commits on the runtime again.
            let_go(&db).await;
            let next = db.write(start_next(&names[0], 3)).await;
            assert_eq!(started(next), Some(2));
            assert_eq!(db.shared.queue().committer, Committer::Nobody);
        });
        holder.join().expect("holder");
    }

    #[test]
    fn a_long_log_is_checkpointed_off_the_runtime_and_writes_go_on() {
        // 30 writes one at a time, checkpointing past `frames`: the log's size, the
        // checkpoints.
        let run = |frames: i32| {
            let f = fixture("combine-checkpoint", 30, frames);
            within_a_minute(&current_thread(), async {
                for t in &f.names {
                    assert_eq!(started(f.db.write(start_next(t, 2)).await), Some(2));
                }
                // The last checkpoint runs on the blocking thread.
                let_go(&f.db).await;
            });
            assert_eq!(f.commits.load(Ordering::Relaxed), 30);
            let checkpoints = f.db.shared.checkpoints.load(Ordering::Relaxed);
            (log_size(&f.dir), checkpoints)
        };
        // Past one page, every commit is followed by a checkpoint, and the next commit
        // starts the log over: it stays as long as one commit's pages.
        let (short, checkpointed) = run(1);
        let (long, unchecked) = run(CHECKPOINT_FRAMES);
        assert_eq!((checkpointed, unchecked), (30, 0));
        assert!(
            short * 4 < long,
            "the log: {short} bytes checkpointed, {long} not"
        );
    }

    #[test]
    fn closing_answers_what_was_queued_then_refuses() {
        let f = fixture("combine-close", 1, CHECKPOINT_FRAMES);
        let (db, names) = (&f.db, &f.names);
        within_a_minute(&current_thread(), async {
            // Polled once: the write is queued, its caller committing lets others run; the
            // store closes with the write waiting.
            let waiting = queued(db, start_next(&names[0], 2));
            assert_eq!(db.shared.queue().requests.len(), 1, "nothing waiting");
            db.close().await;
            assert_eq!(started(waiting.await), Some(2));
            let refused = db.write(start_next(&names[0], 3)).await;
            assert!(matches!(refused, Err(StoreError::Invalid(m)) if m.contains("closed")));
            assert!(db.shared.conn().is_none(), "the connection is still open");
        });
    }
}
