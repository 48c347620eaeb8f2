-- Updraft schema, version 1. Portable SQL: runs unchanged on SQLite and PostgreSQL.
-- KEYTEXT is TEXT on SQLite and TEXT COLLATE "C" on PostgreSQL, so both order keys bytewise.
-- Timestamps are BIGINT milliseconds since the Unix epoch; JSON is TEXT; flags are BIGINT 0/1.

CREATE TABLE settings (
    key KEYTEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE things (
    name KEYTEXT PRIMARY KEY,
    thing_id TEXT NOT NULL,
    type_name TEXT,
    attributes TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX things_type ON things (type_name, name);

CREATE TABLE thing_groups (
    name KEYTEXT PRIMARY KEY,
    group_id TEXT NOT NULL,
    parent TEXT,
    description TEXT,
    attributes TEXT NOT NULL,
    version BIGINT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX thing_groups_parent ON thing_groups (parent, name);

CREATE TABLE thing_group_members (
    group_name KEYTEXT NOT NULL,
    thing_name KEYTEXT NOT NULL,
    PRIMARY KEY (group_name, thing_name)
);
CREATE INDEX thing_group_members_thing ON thing_group_members (thing_name, group_name);

CREATE TABLE streams (
    stream_id KEYTEXT PRIMARY KEY,
    version BIGINT NOT NULL,
    description TEXT,
    files TEXT NOT NULL,
    role_arn TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE jobs (
    job_id KEYTEXT PRIMARY KEY,
    status TEXT NOT NULL,
    target_selection TEXT NOT NULL,
    namespace_id TEXT,
    targets TEXT NOT NULL,
    description TEXT,
    document TEXT NOT NULL,
    document_source TEXT,
    details TEXT NOT NULL,
    force_canceled BIGINT NOT NULL,
    reason_code TEXT,
    comment TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL,
    completed_ms BIGINT,
    version BIGINT NOT NULL
);
CREATE INDEX jobs_status ON jobs (status, job_id);

CREATE TABLE job_targets (
    job_id KEYTEXT NOT NULL,
    target KEYTEXT NOT NULL,
    PRIMARY KEY (job_id, target)
);
CREATE INDEX job_targets_target ON job_targets (target, job_id);

CREATE TABLE job_executions (
    job_id KEYTEXT NOT NULL,
    thing_name KEYTEXT NOT NULL,
    execution_number BIGINT NOT NULL,
    status TEXT NOT NULL,
    force_canceled BIGINT NOT NULL,
    status_details TEXT NOT NULL,
    queued_ms BIGINT NOT NULL,
    started_ms BIGINT,
    updated_ms BIGINT NOT NULL,
    version BIGINT NOT NULL,
    retry_attempt BIGINT NOT NULL,
    PRIMARY KEY (job_id, thing_name, execution_number)
);
CREATE INDEX job_executions_status ON job_executions (job_id, status);
CREATE INDEX job_executions_thing ON job_executions (thing_name, status, queued_ms);

CREATE TABLE ota_updates (
    ota_update_id KEYTEXT PRIMARY KEY,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    job_id TEXT,
    stream_id TEXT,
    error_code TEXT,
    error_message TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX ota_updates_status ON ota_updates (status, ota_update_id);

CREATE TABLE buckets (
    name KEYTEXT PRIMARY KEY,
    versioning TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- seq orders the versions of one key (newest = highest).
CREATE TABLE objects (
    bucket KEYTEXT NOT NULL,
    object_key KEYTEXT NOT NULL,
    version_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    is_latest BIGINT NOT NULL,
    delete_marker BIGINT NOT NULL,
    size BIGINT NOT NULL,
    etag TEXT NOT NULL,
    content_type TEXT,
    checksum TEXT,
    metadata TEXT NOT NULL,
    blob TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (bucket, object_key, version_id)
);
CREATE INDEX objects_latest ON objects (bucket, is_latest, object_key);

CREATE TABLE multipart_uploads (
    upload_id KEYTEXT PRIMARY KEY,
    bucket KEYTEXT NOT NULL,
    object_key KEYTEXT NOT NULL,
    content_type TEXT,
    checksum_algorithm TEXT,
    metadata TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);
CREATE INDEX multipart_uploads_bucket ON multipart_uploads (bucket, object_key);

CREATE TABLE multipart_parts (
    upload_id KEYTEXT NOT NULL,
    part_number BIGINT NOT NULL,
    size BIGINT NOT NULL,
    etag TEXT NOT NULL,
    checksum TEXT,
    blob TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    PRIMARY KEY (upload_id, part_number)
);
