//! PostgreSQL: devices' writes in batches (group commit, the data plane's writer) and
//! things' pending lists (both dialects), in as few round trips as the dialect allows.
//! (SQLite group-commits devices' writes itself: `sqlite_devices.rs`.)
//!
//! A batch is cut into runs (each thing at most once per run). Each list a run sends
//! travels as ONE JSON parameter (an array of arrays): the execution updates, the
//! StartNext requests, and after the runs the jobs that terminal updates may complete and
//! the things whose pending list the data plane announces. Every statement reads its rows
//! from its list's parameter, so a statement's text does not depend on the batch's size (it
//! is prepared once), a list is parsed only by the statements that read it, and every read
//! answers one row of JSON however many rows it found.

use serde_json::json;
use sqlx::{AssertSqlSafe, Row};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use super::*;

/// A batch of device writes cut into runs in which each thing appears at most once: each
/// row a run's statements change answers exactly one write, and a later write of the same
/// thing (next run) sees the earlier one.
fn segments(writes: &[DeviceWrite]) -> Vec<std::ops::Range<usize>> {
    let mut runs = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut start = 0;
    for (i, w) in writes.iter().enumerate() {
        if !seen.insert(w.thing()) {
            runs.push(start..i);
            seen.clear();
            seen.insert(w.thing());
            start = i;
        }
    }
    if start < writes.len() {
        runs.push(start..writes.len());
    }
    runs
}

/// One statement of a batch: its text, the parameter (a list) it reads, and whether it
/// answers a row of JSON.
struct Statement {
    sql: String,
    param: usize,
    answers: bool,
}

impl SqlStore {
    /// The elements of the array in the statement's parameter (`$1`: each statement binds
    /// its own list), as rows with one column `value` (each element is itself an array,
    /// read with `value ->> i`).
    fn elements(&self) -> &'static str {
        match self.dialect {
            Dialect::Sqlite => "jsonb_each($1)",
            Dialect::Postgres => "json_array_elements($1::json) AS elements(value)",
        }
    }

    /// `rows` (a query) answered as one row: a JSON array holding each row's `columns` as
    /// an array.
    fn json_answer(&self, rows: &str, columns: &str) -> String {
        match self.dialect {
            Dialect::Sqlite => {
                format!("SELECT json_group_array(json_array({columns})) FROM ({rows}) AS r")
            }
            Dialect::Postgres => format!(
                "SELECT COALESCE(json_agg(json_build_array({columns})), '[]')::text FROM ({rows}) AS r"
            ),
        }
    }

    /// The pending executions (IN_PROGRESS first, then QUEUED, each by queue time), at most
    /// `limit` per thing, of the things in `$1` (`[[thing], ...]`), as a JSON answer.
    /// Each status is read in index order and cut at `limit` (no sort of a thing's whole
    /// list): SQLite through a correlated rowid list, PostgreSQL through LATERAL. The limit
    /// is in the text: a bound LIMIT makes SQLite plan the statement again each time.
    fn pending_sql(&self, limit: usize) -> String {
        let things = format!("SELECT value ->> 0 AS thing FROM {}", self.elements());
        let per_status = |status: &str| match self.dialect {
            Dialect::Sqlite => format!(
                "SELECT {EXECUTION_COLUMNS} FROM ({things}) AS t JOIN job_executions AS e \
                 ON e.rowid IN (SELECT rowid FROM job_executions WHERE thing_name = t.thing \
                 AND status = '{status}' ORDER BY queued_ms, job_id LIMIT {limit})"
            ),
            Dialect::Postgres => format!(
                "SELECT e.* FROM ({things}) AS t CROSS JOIN LATERAL \
                 (SELECT {EXECUTION_COLUMNS} FROM job_executions WHERE thing_name = t.thing \
                 AND status = '{status}' ORDER BY queued_ms, job_id LIMIT {limit}) AS e"
            ),
        };
        self.json_answer(
            &format!(
                "{} UNION ALL {}",
                per_status("IN_PROGRESS"),
                per_status("QUEUED")
            ),
            EXECUTION_COLUMNS,
        )
    }

    /// Runs `statements` (statement i reading `params[statements[i].param]`) in one
    /// transaction after locking `jobs`; the JSON answers, in order.
    async fn execute_batch(
        &self,
        statements: &[Statement],
        params: Vec<String>,
        jobs: &BTreeSet<&str>,
    ) -> StoreResult<Vec<String>> {
        let mut answers = Vec::new();
        let mut tx = self.begin().await?;
        for job_id in jobs {
            self.lock_job(&mut tx, job_id).await?;
        }
        for s in statements {
            let param = params.get(s.param).cloned().unwrap_or_default();
            let q = sqlx::query(AssertSqlSafe(s.sql.clone())).bind(param);
            if s.answers {
                answers.push(q.fetch_one(&mut *tx).await?.try_get::<String, _>(0)?);
            } else {
                q.execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        let expected = statements.iter().filter(|s| s.answers).count();
        if answers.len() != expected {
            return Err(StoreError::Corrupt(format!(
                "a device batch answered {} results instead of {expected}",
                answers.len()
            )));
        }
        Ok(answers)
    }

    /// The statement of a run's updates in parameter `param`: written where the stored
    /// version is one less and the queue time the same; answers the things written.
    /// Another server's transaction may change a row between a check and the UPDATE: the
    /// UPDATE itself says what it wrote. (A data-modifying WITH must be at the top level,
    /// hence no `json_answer`.)
    fn update_statement(&self, param: usize) -> Statement {
        let u = self.elements();
        Statement {
            sql: format!(
                "WITH w AS (UPDATE job_executions AS e SET status = j.status, \
                 force_canceled = j.force_canceled, status_details = j.status_details, \
                 started_ms = j.started_ms, updated_ms = j.updated_ms, version = j.version \
                 FROM (SELECT value ->> 0 AS job_id, value ->> 1 AS thing_name, \
                 CAST(value ->> 2 AS BIGINT) AS execution_number, value ->> 3 AS status, \
                 CAST(value ->> 4 AS BIGINT) AS force_canceled, value ->> 5 AS status_details, \
                 CAST(value ->> 6 AS BIGINT) AS started_ms, CAST(value ->> 7 AS BIGINT) AS updated_ms, \
                 CAST(value ->> 8 AS BIGINT) AS version, CAST(value ->> 9 AS BIGINT) AS queued_ms \
                 FROM {u}) AS j \
                 WHERE e.job_id = j.job_id AND e.thing_name = j.thing_name \
                 AND e.execution_number = j.execution_number \
                 AND e.version = j.version - 1 AND e.queued_ms = j.queued_ms \
                 RETURNING e.thing_name) \
                 SELECT COALESCE(json_agg(json_build_array(thing_name)), '[]')::text FROM w"
            ),
            param,
            answers: true,
        }
    }

    /// The statements of a run's StartNexts in parameter `param`: a thing's first QUEUED
    /// execution starts unless one is in progress; answers each thing's head.
    fn start_statements(&self, param: usize, statements: &mut Vec<Statement>) {
        let s = self.elements();
        // The status is checked on the row itself too: a row another transaction just
        // started is re-checked after its lock, the subqueries not. Each thing's head is a
        // LATERAL join on the row's key: compared as a row value with a scalar subquery
        // (`(job_id, ...) = (SELECT ...)`), PostgreSQL scanned every QUEUED execution of the
        // table for each thing (40,000 queued: 390 ms to start two things; joined: 0.14 ms).
        statements.push(Statement {
            sql: format!(
                "UPDATE job_executions AS x SET status = 'IN_PROGRESS', started_ms = s.now_ms, \
                 updated_ms = s.now_ms, status_details = COALESCE(s.status_details, x.status_details), \
                 version = x.version + 1 \
                 FROM (SELECT value ->> 0 AS thing, value ->> 1 AS status_details, \
                 CAST(value ->> 2 AS BIGINT) AS now_ms FROM {s}) AS s \
                 CROSS JOIN LATERAL (SELECT job_id, thing_name, execution_number FROM job_executions \
                 WHERE thing_name = s.thing AND status = 'QUEUED' ORDER BY queued_ms, job_id LIMIT 1) AS h \
                 WHERE x.job_id = h.job_id AND x.thing_name = h.thing_name \
                 AND x.execution_number = h.execution_number AND x.status = 'QUEUED' \
                 AND NOT EXISTS (SELECT 1 FROM job_executions WHERE thing_name = s.thing \
                 AND status = 'IN_PROGRESS')"
            ),
            param,
            answers: false,
        });
        statements.push(Statement {
            sql: self.pending_sql(1),
            param,
            answers: true,
        });
    }

    /// The statement completing the SNAPSHOT jobs in parameter `param` (`[[job, at_ms]]`)
    /// whose executions are all terminal. The jobs are looked up from the list (not the
    /// list scanned for every job in progress).
    fn completion_statement(&self, param: usize) -> Statement {
        let c = self.elements();
        Statement {
            sql: format!(
                "UPDATE jobs SET status = 'COMPLETED', \
                 completed_ms = (SELECT CAST(value ->> 1 AS BIGINT) FROM {c} WHERE value ->> 0 = jobs.job_id), \
                 updated_ms = (SELECT CAST(value ->> 1 AS BIGINT) FROM {c} WHERE value ->> 0 = jobs.job_id), \
                 version = version + 1 \
                 WHERE jobs.job_id IN (SELECT value ->> 0 FROM {c}) AND jobs.status = 'IN_PROGRESS' \
                 AND jobs.target_selection = 'SNAPSHOT' AND NOT EXISTS (SELECT 1 FROM job_executions \
                 WHERE job_executions.job_id = jobs.job_id AND job_executions.status IN ('QUEUED', 'IN_PROGRESS'))"
            ),
            param,
            answers: false,
        }
    }

    /// [`JobStore::device_writes`]: see the module's notes.
    pub(super) async fn device_batch(
        &self,
        writes: &[DeviceWrite],
    ) -> StoreResult<Vec<DeviceWriteOutcome>> {
        debug_assert_eq!(
            self.dialect,
            Dialect::Postgres,
            "SQLite group-commits on its own connection (sqlite_devices.rs)"
        );
        let Ends {
            jobs: ends,
            things: ended_things,
            listed,
        } = Ends::of(writes);
        // What each run answers: (updates?, starts?). The ends are settled after the runs.
        let runs = segments(writes);
        let mut shapes = Vec::with_capacity(runs.len());
        let mut params = Vec::new();
        let mut statements = Vec::new();
        for run in &runs {
            let mut u = Vec::new();
            let mut s = Vec::new();
            for w in &writes[run.clone()] {
                match w {
                    DeviceWrite::Update { execution: e, .. } => u.push(json!([
                        e.job_id,
                        e.thing_name,
                        e.execution_number,
                        e.status.as_str(),
                        flag(e.force_canceled),
                        to_json(&e.status_details)?,
                        e.started_ms,
                        e.updated_ms,
                        e.version,
                        e.queued_ms,
                    ])),
                    DeviceWrite::StartNext {
                        thing,
                        status_details,
                        now_ms,
                    } => s.push(json!([
                        thing,
                        status_details.as_ref().map(to_json).transpose()?,
                        now_ms
                    ])),
                }
            }
            let shape = (!u.is_empty(), !s.is_empty());
            if shape.0 {
                statements.push(self.update_statement(params.len()));
                params.push(serde_json::Value::from(u).to_string());
            }
            if shape.1 {
                self.start_statements(params.len(), &mut statements);
                params.push(serde_json::Value::from(s).to_string());
            }
            shapes.push(shape);
        }
        // The batch's ends are settled once every update is applied.
        if !ends.is_empty() {
            statements.push(self.completion_statement(params.len()));
            let c: Vec<_> = ends.iter().map(|(job, at)| json!([job, at])).collect();
            params.push(serde_json::Value::from(c).to_string());
        }
        if listed > 0 {
            statements.push(Statement {
                sql: self.pending_sql(listed),
                param: params.len(),
                answers: true,
            });
            let t: Vec<_> = ended_things.iter().map(|t| json!([t])).collect();
            params.push(serde_json::Value::from(t).to_string());
        }
        // Jobs before executions, in job id order, as CancelJob and DeleteJob lock them on
        // PostgreSQL: a batch that may complete a job does not take that job's row last, and
        // behind the lock the completion's check sees every earlier batch's executions (READ
        // COMMITTED: two batches ending a job's last two executions would each see the
        // other's as still pending).
        let jobs: BTreeSet<&str> = writes
            .iter()
            .filter_map(|w| match w {
                DeviceWrite::Update { execution: e, .. } => Some(e.job_id.as_str()),
                DeviceWrite::StartNext { .. } => None,
            })
            .collect();
        let mut answers = self
            .execute_batch(&statements, params, &jobs)
            .await?
            .into_iter();
        let mut answer = || {
            answers
                .next()
                .ok_or_else(|| StoreError::Corrupt("a device batch lost an answer".into()))
        };

        let mut outcomes = Vec::with_capacity(writes.len());
        for (run, (updates, starts)) in runs.into_iter().zip(shapes) {
            let written: HashSet<String> = if updates {
                from_json::<Vec<(String,)>>(&answer()?)?
                    .into_iter()
                    .map(|(t,)| t)
                    .collect()
            } else {
                HashSet::new()
            };
            let mut heads = if starts {
                pending_lists(&answer()?, 1)?
            } else {
                HashMap::new()
            };
            for w in &writes[run] {
                outcomes.push(match w {
                    DeviceWrite::Update { execution: e, .. } => {
                        let done = written.contains(&e.thing_name);
                        if done && e.status.is_terminal() {
                            // The list is filled in below, once every run is read.
                            DeviceWriteOutcome::Ended(Vec::new())
                        } else {
                            DeviceWriteOutcome::Updated(done)
                        }
                    }
                    DeviceWrite::StartNext { thing, .. } => {
                        DeviceWriteOutcome::Started(heads.remove(thing).and_then(|mut h| h.pop()))
                    }
                });
            }
        }
        if listed > 0 {
            carry_pending_lists(&mut outcomes, writes, &pending_lists(&answer()?, listed)?);
        }
        Ok(outcomes)
    }

    /// A thing's pending executions (see [`JobStore::pending_executions`]).
    pub(super) async fn pending_of(
        &self,
        thing: &str,
        limit: usize,
    ) -> StoreResult<Vec<JobExecution>> {
        let row = sqlx::query(AssertSqlSafe(self.pending_sql(limit)))
            .bind(json!([[thing]]).to_string())
            .fetch_one(&self.pool)
            .await?;
        Ok(pending_lists(&row.try_get::<String, _>(0)?, limit)?
            .remove(thing)
            .unwrap_or_default())
    }
}

/// What a batch settles once its writes are applied: the jobs its terminal updates may
/// complete (the latest end time of each), and the things whose pending list an ended
/// execution's outcome carries, read as long as the longest asked (`listed`).
pub(super) struct Ends<'a> {
    pub jobs: BTreeMap<&'a str, i64>,
    pub things: BTreeSet<&'a str>,
    pub listed: usize,
}

impl<'a> Ends<'a> {
    pub(super) fn of(writes: impl IntoIterator<Item = &'a DeviceWrite>) -> Self {
        let mut ends = Ends {
            jobs: BTreeMap::new(),
            things: BTreeSet::new(),
            listed: 0,
        };
        for w in writes {
            if let DeviceWrite::Update {
                execution: e,
                pending,
            } = w
                && e.status.is_terminal()
            {
                let at = ends.jobs.entry(&e.job_id).or_insert(e.updated_ms);
                *at = (*at).max(e.updated_ms);
                if *pending > 0 {
                    ends.things.insert(&e.thing_name);
                    ends.listed = ends.listed.max((*pending).min(ENDED_PENDING_LIMIT));
                }
            }
        }
        ends
    }
}

/// Gives each `Ended` outcome (of the update in `writes` at its place) the head of its
/// thing's pending list in `lists`, as long as the update asked for.
pub(super) fn carry_pending_lists<'a>(
    outcomes: &mut [DeviceWriteOutcome],
    writes: impl IntoIterator<Item = &'a DeviceWrite>,
    lists: &HashMap<String, Vec<JobExecution>>,
) {
    for (o, w) in outcomes.iter_mut().zip(writes) {
        if let (
            DeviceWriteOutcome::Ended(list),
            DeviceWrite::Update {
                execution: e,
                pending: wanted,
            },
        ) = (o, w)
            && let Some(p) = lists.get(&e.thing_name)
        {
            list.extend(p.iter().take(*wanted).cloned());
        }
    }
}

/// Decodes a [`SqlStore::pending_sql`] answer into each thing's list, in order.
fn pending_lists(answer: &str, limit: usize) -> StoreResult<HashMap<String, Vec<JobExecution>>> {
    let mut lists: HashMap<String, Vec<JobExecution>> = HashMap::new();
    for columns in from_json::<Vec<ExecutionColumns>>(answer)? {
        let e = execution_from(columns)?;
        lists.entry(e.thing_name.clone()).or_default().push(e);
    }
    for list in lists.values_mut() {
        list.sort_by(|a, b| {
            (
                a.status != ExecutionStatus::InProgress,
                a.queued_ms,
                &a.job_id,
            )
                .cmp(&(
                    b.status != ExecutionStatus::InProgress,
                    b.queued_ms,
                    &b.job_id,
                ))
        });
        list.truncate(limit);
    }
    Ok(lists)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pending lists' statement on SQLite (GetPendingJobExecutions, notifications)
    /// reads each thing's open executions from the partial index, in order, without a sort.
    #[tokio::test]
    async fn sqlite_pending_lists_read_the_index_of_open_executions() {
        let dir = crate::test_support::ScratchDir::new("plan");
        let url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("db.sqlite").display()
        );
        let store = SqlStore::connect(&url).await.expect("a store");
        let rows = sqlx::query(AssertSqlSafe(format!(
            "EXPLAIN QUERY PLAN {}",
            store.pending_sql(10)
        )))
        .bind(json!([["t1"], ["t2"]]).to_string())
        .fetch_all(&store.pool)
        .await
        .expect("a plan");
        let steps: Vec<String> = rows
            .iter()
            .map(|r| r.try_get::<String, _>(3).expect("a step"))
            .collect();
        let by_index = steps
            .iter()
            .filter(|s| s.contains("job_executions_pending (status=? AND thing_name=?)"))
            .count();
        // One read per status (IN_PROGRESS, QUEUED).
        assert_eq!(by_index, 2, "{steps:?}");
        assert!(
            !steps.iter().any(|s| s.contains("TEMP B-TREE")),
            "{steps:?}"
        );
        store.close().await;
    }
}
