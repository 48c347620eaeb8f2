//! SQLite: devices' writes (execution updates and StartNext), group-committed on a
//! connection and a thread of their own.
//!
//! Every device write is a small transaction, and SQLite serializes commits: the thread
//! that owns this connection takes every write that arrived while it committed the last
//! batch and commits them together (up to [`MAX_BATCH`]; under load it waits briefly for
//! more, see [`Pace`]), so a commit's cost is shared by every device waiting on it. Each
//! caller still waits for its own write to be committed before its device is answered.
//!
//! Why not through sqlx: sqlx runs each SQLite connection on a thread of its own and hands
//! every statement, every result and every row between that thread and its caller, each
//! hand-off a wake-up of a thread (on a busy 2-core machine, a wait for a core). A batch
//! is many small statements (one or two per write, each a lookup by key); here it costs
//! one hand-off in and one answer out per caller. The statements change at most one row
//! each and call no function, so SQLite runs them without a statement journal (a copy of
//! each page before it is changed, which set-based statements reading the batch from JSON
//! needed). PostgreSQL's group commit is the data plane's writer (`dataplane/writer.rs`)
//! with `device_batch.rs`.
//!
//! Control-plane changes to one execution (CancelJobExecution, a CONTINUOUS job's member
//! leaving: `Store::update_execution`) come this way too; the other writes go through
//! sqlx's writer pool, and SQLite serializes the two connections' write transactions (the
//! one that finds the database locked retries in SQLite's busy handler, for up to 10 s).

use rusqlite::{Connection, TransactionBehavior, params};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

use super::device_batch::{Ends, carry_pending_lists};
use super::{EXECUTION_COLUMNS, ExecutionColumns, WRITER_PRAGMAS, execution_from, flag, to_json};
use crate::store::{
    DeviceWrite, DeviceWriteOutcome, ExecutionStatus, JobExecution, StoreError, StoreResult,
};

/// The most writes committed together.
const MAX_BATCH: usize = 256;

type Outcomes = StoreResult<Vec<DeviceWriteOutcome>>;
/// A caller's writes (applied in order, in one transaction) and where their outcomes go.
type Request = (Vec<DeviceWrite>, oneshot::Sender<Outcomes>);

/// The device-write connection's thread: requests go in, outcomes come back.
pub(super) struct DeviceDb {
    requests: Mutex<Option<mpsc::Sender<Request>>>,
    /// Answered (dropped) once the thread has closed its connection.
    closed: Mutex<Option<oneshot::Receiver<()>>>,
}

fn gone() -> StoreError {
    StoreError::Invalid("the store is closed".into())
}

impl DeviceDb {
    /// Opens the database file at `path` (its schema already migrated), through the SQLite
    /// VFS named `vfs` when there is one (the database URL's `?vfs=`, which the pools use
    /// too), on a new thread, which counts each transaction it commits in `commits` (the
    /// background checkpoints follow it).
    pub(super) fn open(
        path: &Path,
        vfs: Option<&str>,
        commits: Arc<AtomicU64>,
    ) -> StoreResult<Self> {
        let flags =
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = match vfs {
            Some(vfs) => Connection::open_with_flags_and_vfs(path, flags, vfs)?,
            None => Connection::open_with_flags(path, flags)?,
        };
        conn.busy_timeout(Duration::from_secs(10))?;
        // The writer pool's settings (WAL, commits not synced: the log is, at checkpoints;
        // see `WRITER_PRAGMAS`).
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; {WRITER_PRAGMAS}"
        ))?;
        conn.set_prepared_statement_cache_capacity(32);
        let (tx, rx) = mpsc::channel::<Request>();
        let (closed_tx, closed_rx) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("updraft-sqlite-devices".into())
            .spawn(move || {
                serve(conn, &rx, &commits);
                drop(closed_tx);
            })
            .map_err(|e| StoreError::Invalid(format!("cannot start the device writer: {e}")))?;
        Ok(DeviceDb {
            requests: Mutex::new(Some(tx)),
            closed: Mutex::new(Some(closed_rx)),
        })
    }

    /// Applies `writes` in order in one transaction (with other callers' writes).
    pub(super) async fn write(&self, writes: &[DeviceWrite]) -> Outcomes {
        let (done, outcome) = oneshot::channel();
        let sent = match self.requests.lock() {
            Ok(requests) => requests
                .as_ref()
                .is_some_and(|r| r.send((writes.to_vec(), done)).is_ok()),
            Err(_) => false,
        };
        if !sent {
            return Err(gone());
        }
        outcome.await.unwrap_or_else(|_| Err(gone()))
    }

    /// Stops taking writes; returns once those taken are answered and the connection is
    /// closed.
    pub(super) async fn close(&self) {
        if let Ok(mut requests) = self.requests.lock() {
            requests.take();
        }
        let closed = self.closed.lock().ok().and_then(|mut c| c.take());
        if let Some(closed) = closed {
            let _ = closed.await;
        }
    }
}

/// The connection's thread: batches of the requests waiting (see [`Pace`]), until the
/// store closes.
fn serve(mut conn: Connection, requests: &mpsc::Receiver<Request>, commits: &AtomicU64) {
    let mut pace = Pace::default();
    while let Some((mut batch, size)) = pace.next_batch(requests) {
        let writes: Vec<&DeviceWrite> = batch.iter().flat_map(|(w, _)| w).collect();
        match apply(&mut conn, &writes, commits) {
            Ok(outcomes) => {
                let mut outcomes = outcomes.into_iter();
                for (w, done) in batch {
                    let _ = done.send(Ok(outcomes.by_ref().take(w.len()).collect()));
                }
            }
            Err(e) => {
                settle(&conn);
                match busy(&e) {
                    // The database stayed locked for the whole busy timeout: writing singly
                    // would wait that long again for each caller.
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
                        for (w, done) in batch {
                            let writes: Vec<&DeviceWrite> = w.iter().collect();
                            let outcome = apply(&mut conn, &writes, commits);
                            if outcome.is_err() {
                                settle(&conn);
                            }
                            let _ = done.send(outcome);
                        }
                    }
                    None => {
                        if let Some((_, done)) = batch.pop() {
                            let _ = done.send(Err(e));
                        }
                    }
                }
            }
        }
    }
}

/// How the device thread takes its writes into batches. Under load, the devices one batch
/// answers send their next writes within tens of microseconds, while the thread is still
/// delivering the answers; a thread that blocks at once on an empty queue is woken by the
/// first of them and commits it nearly alone, and waking a thread whose core went idle
/// costs ~40 µs on a virtual machine (a halted vCPU; 1–2 µs on a busy core), a wait every
/// device then shares. So, while the last batch was large ([`BUSY`]: many devices writing
/// at once; a lone device never waits):
/// - after a batch, the thread polls for the next write for up to `linger` before it
///   blocks;
/// - a batch smaller than the last one waits up to `gather` for more: the writes of the
///   devices the last batch answered are on their way.
///
/// A write that comes once the thread has blocked does not wait. The thread spins while it
/// polls (checking its deadline each time): it does not yield, because `sched_yield` hands
/// the core to any other runnable thread of the machine, however low its priority, for as
/// long as the scheduler's slice, while this thread waits, runnable, behind it (with two
/// `SCHED_IDLE` busy loops on the machine, `bench jobs --repeat 5` measured 33–38k
/// updates/s when it yielded, 66–67k spinning). With one CPU nobody could send a write while the
/// thread spins: it never polls. Under steady traffic of large batches less than
/// `linger` apart the thread polls all along (its CPU time counts against a CPU quota).
/// Measured in the ARCHITECTURE notes (device writes).
struct Pace {
    /// How many writes the last batch committed.
    last: usize,
    gather: Duration,
    linger: Duration,
}

/// A batch at least this large means many devices write at once (see [`Pace`]).
const BUSY: usize = 8;

impl Default for Pace {
    fn default() -> Self {
        let cpus = std::thread::available_parallelism().map_or_else(
            |e| {
                tracing::warn!(error = %e, "CPU count unknown: device writes are not paced");
                1
            },
            usize::from,
        );
        Pace::for_cpus(cpus)
    }
}

/// What polling the queue found.
enum Polled {
    Request(Request),
    Nothing,
    Closed,
}

impl Pace {
    /// The pace on a machine (or under a CPU quota) of `cpus` CPUs: with one, no waits.
    fn for_cpus(cpus: usize) -> Pace {
        let (gather, linger) = if cpus > 1 {
            (Duration::from_micros(300), Duration::from_micros(500))
        } else {
            (Duration::ZERO, Duration::ZERO)
        };
        Pace {
            last: 0,
            gather,
            linger,
        }
    }

    /// The next batch (at most [`MAX_BATCH`] writes) and its number of writes; `None` once
    /// the store is closed and every request taken.
    fn next_batch(&mut self, requests: &mpsc::Receiver<Request>) -> Option<(Vec<Request>, usize)> {
        let busy = self.last >= BUSY;
        // A write that comes after the poll ran out (the load has passed) does not wait.
        let (first, busy) = match busy.then(|| poll_until(requests, Instant::now() + self.linger)) {
            Some(Polled::Request(r)) => (r, true),
            Some(Polled::Closed) => return None,
            Some(Polled::Nothing) | None => (requests.recv().ok()?, false),
        };
        let want = if busy { self.last } else { 0 };
        let mut size = first.0.len();
        let mut batch = vec![first];
        // `gather` counts from the first time the queue is found empty.
        let mut until = None;
        while size < MAX_BATCH {
            let polled = match requests.try_recv() {
                Ok(r) => Polled::Request(r),
                Err(mpsc::TryRecvError::Empty) if size < want => poll_until(
                    requests,
                    *until.get_or_insert_with(|| Instant::now() + self.gather),
                ),
                Err(_) => break,
            };
            let Polled::Request(r) = polled else { break };
            size += r.0.len();
            batch.push(r);
        }
        self.last = size;
        Some((batch, size))
    }
}

/// Polls `requests` until `until`, spinning (see [`Pace`] on why it does not yield).
fn poll_until(requests: &mpsc::Receiver<Request>, until: Instant) -> Polled {
    loop {
        match requests.try_recv() {
            Ok(r) => return Polled::Request(r),
            Err(mpsc::TryRecvError::Disconnected) => return Polled::Closed,
            Err(mpsc::TryRecvError::Empty) if Instant::now() >= until => return Polled::Nothing,
            Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
        }
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

/// The first `limit` executions of thing `?1` in `status` (QUEUED or IN_PROGRESS), by queue
/// time. The status is a literal: SQLite then reads them from the partial index of open
/// executions (migration 5), which it uses only for a term of the index's own.
fn pending_query(status: ExecutionStatus, limit: usize) -> String {
    debug_assert!(
        !status.is_terminal(),
        "the partial index holds open executions only"
    );
    format!(
        "SELECT {EXECUTION_COLUMNS} FROM job_executions WHERE thing_name = ?1 \
         AND status = '{}' ORDER BY queued_ms, job_id LIMIT {limit}",
        status.as_str()
    )
}

/// `thing`'s pending executions, IN_PROGRESS first, then QUEUED, each by queue time: at
/// most `limit` (each status read in index order and cut there; the limit is in the text,
/// which the statement cache keys on).
fn pending(conn: &Connection, thing: &str, limit: usize) -> StoreResult<Vec<JobExecution>> {
    let mut list = Vec::new();
    for status in [ExecutionStatus::InProgress, ExecutionStatus::Queued] {
        let left = limit - list.len();
        if left == 0 {
            break;
        }
        let mut statement = conn.prepare_cached(&pending_query(status, left))?;
        let mut rows = statement.query(params![thing])?;
        while let Some(row) = rows.next()? {
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

    /// A request of one StartNext for `thing`, and its outcome's receiver.
    fn request(thing: &str) -> (Request, oneshot::Receiver<Outcomes>) {
        let (done, outcome) = oneshot::channel();
        let write = DeviceWrite::StartNext {
            thing: thing.to_owned(),
            status_details: None,
            now_ms: 0,
        };
        ((vec![write], done), outcome)
    }

    fn paced(last: usize, gather: Duration, linger: Duration) -> Pace {
        Pace {
            last,
            gather,
            linger,
        }
    }

    fn things(batch: &[Request]) -> Vec<&str> {
        batch
            .iter()
            .flat_map(|(w, _)| w)
            .map(|w| w.thing())
            .collect()
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
            (pending_query(ExecutionStatus::InProgress, 1), 1),
            (pending_query(ExecutionStatus::Queued, 10), 1),
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
    fn a_batch_takes_every_waiting_write_up_to_the_cap() {
        let (tx, rx) = mpsc::channel();
        let mut receivers = Vec::new();
        for i in 0..MAX_BATCH + 3 {
            let (r, outcome) = request(&format!("t{i}"));
            tx.send(r).expect("queue");
            receivers.push(outcome);
        }
        let mut pace = Pace::default();
        let (batch, size) = pace.next_batch(&rx).expect("a batch");
        assert_eq!((batch.len(), size), (MAX_BATCH, MAX_BATCH));
        assert_eq!(things(&batch)[..2], ["t0", "t1"]);
        let (rest, size) = pace.next_batch(&rx).expect("the rest");
        assert_eq!(size, 3);
        assert_eq!(things(&rest), ["t256", "t257", "t258"]);
    }

    #[test]
    fn after_a_large_batch_a_smaller_one_waits_for_the_writes_on_their_way() {
        let (tx, rx) = mpsc::channel();
        let mut pace = paced(20, Duration::from_secs(60), Duration::from_secs(60));
        let sender = std::thread::spawn(move || {
            let mut receivers = Vec::new();
            for i in 0..20 {
                let (r, outcome) = request(&format!("t{i}"));
                tx.send(r).expect("queue");
                receivers.push(outcome);
                std::thread::sleep(Duration::from_millis(2));
            }
            receivers
        });
        let (batch, size) = pace.next_batch(&rx).expect("a batch");
        assert_eq!(size, 20, "{:?}", things(&batch));
        drop(sender.join());
    }

    #[test]
    fn a_lone_writer_does_not_wait_and_waiting_is_bounded() {
        let (tx, rx) = mpsc::channel();
        // Not busy: one write waiting is a batch at once (the bounds would hold it a minute).
        let mut pace = paced(BUSY - 1, Duration::from_secs(60), Duration::from_secs(60));
        let (r, _a) = request("alone");
        tx.send(r).expect("queue");
        let started = Instant::now();
        let (batch, _) = pace.next_batch(&rx).expect("a batch");
        assert_eq!(things(&batch), ["alone"]);
        assert!(started.elapsed() < Duration::from_secs(30), "it waited");
        // Busy, with short bounds: fewer writes than last time still make a batch.
        let mut pace = paced(50, Duration::from_millis(1), Duration::from_millis(1));
        let (r, _b) = request("few");
        tx.send(r).expect("queue");
        let started = Instant::now();
        let (batch, size) = pace.next_batch(&rx).expect("a batch");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "it waited past its bound"
        );
        assert_eq!((things(&batch), size), (vec!["few"], 1));
        assert_eq!(pace.last, 1, "the next batch is not held back");
        // Closed: what was taken is answered, then the thread ends.
        drop(tx);
        assert!(pace.next_batch(&rx).is_none());
    }

    #[test]
    fn with_one_cpu_the_thread_never_waits_for_more() {
        let one = Pace::for_cpus(1);
        assert_eq!((one.gather, one.linger), (Duration::ZERO, Duration::ZERO));
        let two = Pace::for_cpus(2);
        assert!(two.gather > Duration::ZERO && two.linger > Duration::ZERO);
    }

    #[test]
    fn a_write_after_the_load_has_passed_does_not_wait() {
        let (tx, rx) = mpsc::channel();
        // The last batch was large, but nothing comes within `linger`: the thread blocks,
        // and the write that wakes it is a batch at once (not held for `gather`).
        let mut pace = paced(50, Duration::from_secs(60), Duration::from_millis(1));
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            let (r, outcome) = request("later");
            tx.send(r).expect("queue");
            (tx, outcome)
        });
        let started = Instant::now();
        let (batch, size) = pace.next_batch(&rx).expect("a batch");
        assert_eq!((things(&batch), size), (vec!["later"], 1));
        assert!(started.elapsed() < Duration::from_secs(30), "it waited");
        drop(sender.join());
    }

    #[test]
    fn closing_while_busy_answers_what_was_taken_then_ends() {
        let (tx, rx) = mpsc::channel();
        let mut pace = paced(50, Duration::from_secs(60), Duration::from_secs(60));
        let (r, _a) = request("last");
        tx.send(r).expect("queue");
        drop(tx);
        let started = Instant::now();
        let (batch, _) = pace.next_batch(&rx).expect("the last batch");
        assert_eq!(things(&batch), ["last"]);
        assert!(pace.next_batch(&rx).is_none());
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "it waited on a closed queue"
        );
    }
}
