-- Devices' writes change an execution's status; every index holding `status` is rewritten
-- with it, and a write transaction commits each page it changed (a WAL frame, 4 KiB).
-- The thing index used to hold every execution of a thing in status order, so each start
-- and each end rewrote a leaf of that thing's part of the index: one more page per device
-- written, the bulk of a batch's frames.
-- * Pending lists (StartNext's head, notify's first ten, "is one in progress?") read the
--   open executions only: a partial index of them, status first, so the IN_PROGRESS entries
--   (at most one per thing) share a few pages, and an execution that ends leaves it without
--   writing a page of its thing's part. The queries name a status as a literal (a partial
--   index is usable by SQLite when the query's term is one of the index's OR terms).
-- * Listing a thing's executions (by job id) reads a thing index without `status`, which
--   a status change leaves alone.
-- On PostgreSQL the rebuild locks job_executions until the migration commits: replicas of
-- the previous version wait on it meanwhile (upgrade them together).
DROP INDEX job_executions_thing;
CREATE INDEX job_executions_thing ON job_executions (thing_name, job_id, execution_number);
CREATE INDEX job_executions_pending ON job_executions (status, thing_name, queued_ms, job_id)
    WHERE status = 'QUEUED' OR status = 'IN_PROGRESS';
