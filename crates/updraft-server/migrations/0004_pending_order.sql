-- A thing's pending list is read per status in (queued_ms, job_id) order, a few rows at a
-- time (StartNext's head, notify's first ten): with job_id in the index those reads walk
-- the index in order and stop, instead of sorting every pending execution of the thing.
DROP INDEX job_executions_thing;
CREATE INDEX job_executions_thing ON job_executions (thing_name, status, queued_ms, job_id);
