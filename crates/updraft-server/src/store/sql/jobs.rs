//! Jobs and job executions on SQL.

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use std::collections::{BTreeMap, BTreeSet};

use super::*;

/// A failure that trying the transaction again can cure: a PostgreSQL deadlock victim or
/// serialization failure.
fn is_transient(e: &StoreError) -> bool {
    match e {
        StoreError::Database(sqlx::Error::Database(db)) => {
            matches!(db.code().as_deref(), Some("40P01" | "40001"))
        }
        _ => false,
    }
}

/// Whose executions a listing walks.
#[derive(Clone, Copy)]
enum ExecutionsOf<'a> {
    Job(&'a str),
    /// A thing's, optionally of one job only.
    Thing(&'a str, Option<&'a str>),
}

impl SqlStore {
    async fn job_in(&self, tx: &mut Tx, id: &str) -> StoreResult<Option<Job>> {
        let row =
            sqlx::query(self.locked(&format!("SELECT {JOB_COLUMNS} FROM jobs WHERE job_id = $1")))
                .bind(id)
                .fetch_optional(&mut **tx)
                .await?;
        row.as_ref().map(row_job).transpose()
    }

    /// One keyset-paged listing of executions: a job's (in thing order) or a thing's (in
    /// job order, optionally of one job), then by execution number.
    async fn list_executions(
        &self,
        of: ExecutionsOf<'_>,
        status: Option<ExecutionStatus>,
        page: &PageRequest,
    ) -> StoreResult<Page<JobExecution>> {
        let (fixed, key, only_job, paged) = match of {
            ExecutionsOf::Job(job) => ("job_id", job, None, "thing_name"),
            ExecutionsOf::Thing(thing, job) => ("thing_name", thing, job, "job_id"),
        };
        let (after, after_number) = page
            .after
            .as_deref()
            .map(split_execution_key)
            .unwrap_or((String::new(), i64::MAX));
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT {EXECUTION_COLUMNS} FROM job_executions WHERE {fixed} = $1 AND ($2 IS NULL OR status = $2) \
             AND ($3 IS NULL OR job_id = $3) AND ({paged} > $4 OR ({paged} = $4 AND execution_number > $5)) \
             ORDER BY {paged}, execution_number LIMIT $6"
        )))
        .bind(key)
        .bind(status.map(|s| s.as_str()))
        .bind(only_job)
        .bind(after)
        .bind(after_number)
        .bind(page_limit(page))
        .fetch_all(&self.pool)
        .await?;
        let items = rows
            .iter()
            .map(row_execution)
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(paginate(items, page, |e| match of {
            ExecutionsOf::Job(_) => format!("{}/{}", e.thing_name, e.execution_number),
            ExecutionsOf::Thing(..) => format!("{}/{}", e.job_id, e.execution_number),
        }))
    }

    async fn cancel_job_once(&self, job_id: &str, how: &CancelJob) -> StoreResult<Job> {
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

    /// Locks the row of `job_id` for the rest of `tx` (PostgreSQL; SQLite serializes
    /// writers). Transactions that may complete a job take it before they look at its
    /// executions: on PostgreSQL (READ COMMITTED) two transactions that end the last two
    /// executions would otherwise each see the other's as still pending and neither
    /// complete the job; behind the lock, the second one's reads take a fresh snapshot that
    /// sees the first one's commit.
    pub(super) async fn lock_job(&self, tx: &mut Tx, job_id: &str) -> StoreResult<()> {
        if self.dialect == Dialect::Postgres {
            sqlx::query(self.locked("SELECT job_id FROM jobs WHERE job_id = $1"))
                .bind(job_id)
                .fetch_optional(&mut **tx)
                .await?;
        }
        Ok(())
    }

    /// Completes a SNAPSHOT job in progress whose executions are all terminal.
    async fn complete_if_done(&self, tx: &mut Tx, job_id: &str, now_ms: i64) -> StoreResult<()> {
        self.lock_job(tx, job_id).await?;
        sqlx::query(
            "UPDATE jobs SET status = 'COMPLETED', completed_ms = $2, updated_ms = $2, version = version + 1 \
             WHERE job_id = $1 AND status = 'IN_PROGRESS' AND target_selection = 'SNAPSHOT' \
             AND NOT EXISTS (SELECT 1 FROM job_executions WHERE job_id = $1 AND status IN ('QUEUED', 'IN_PROGRESS'))",
        )
        .bind(job_id)
        .bind(now_ms)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
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
    execution_from((
        r.try_get("job_id")?,
        r.try_get("thing_name")?,
        r.try_get("execution_number")?,
        r.try_get("status")?,
        r.try_get("force_canceled")?,
        r.try_get("status_details")?,
        r.try_get("queued_ms")?,
        r.try_get("started_ms")?,
        r.try_get("updated_ms")?,
        r.try_get("version")?,
        r.try_get("retry_attempt")?,
    ))
}

/// Splits an execution page position `thing/number`.
fn split_execution_key(key: &str) -> (String, i64) {
    match key.rsplit_once('/') {
        Some((t, n)) => (t.to_owned(), n.parse().unwrap_or(i64::MAX)),
        None => (key.to_owned(), i64::MAX),
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

#[async_trait]
impl JobStore for SqlStore {
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
        // PostgreSQL may pick a cancel as the victim of a deadlock with a batch of device
        // writes (a StartNext locks executions of jobs the batch did not know it would
        // touch); the operator's request is then simply tried again.
        let mut attempt = 0;
        loop {
            match self.cancel_job_once(job_id, how).await {
                Err(e) if attempt < 3 && is_transient(&e) => attempt += 1,
                other => return other,
            }
        }
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
        self.list_executions(ExecutionsOf::Job(job_id), status, page)
            .await
    }

    async fn list_executions_for_thing(
        &self,
        thing: &str,
        status: Option<ExecutionStatus>,
        job_id: Option<&str>,
        page: &PageRequest,
    ) -> StoreResult<Page<JobExecution>> {
        self.list_executions(ExecutionsOf::Thing(thing, job_id), status, page)
            .await
    }

    fn group_commits(&self) -> bool {
        self.devices.is_some()
    }

    async fn device_writes(&self, writes: &[DeviceWrite]) -> StoreResult<Vec<DeviceWriteOutcome>> {
        match &self.devices {
            Some(db) => db.write(writes.to_vec()).await,
            None => self.device_batch(writes).await,
        }
    }

    /// [`JobStore::device_writes`] of one write, handed over without a copy.
    async fn device_write(&self, write: DeviceWrite) -> StoreResult<DeviceWriteOutcome> {
        crate::store::only_outcome(match &self.devices {
            Some(db) => db.write(vec![write]).await?,
            None => self.device_batch(std::slice::from_ref(&write)).await?,
        })
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
        self.pending_of(thing, limit).await
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
}
