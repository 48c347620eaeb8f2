-- Code signing: certificates imported through the ACM subset, signing profiles and signing
-- jobs of the signer service. Private keys are stored only as AES-256-GCM ciphertext under
-- the installation's key-encryption key (never in the clear, never returned by any API).

CREATE TABLE acm_certificates (
    certificate_id KEYTEXT PRIMARY KEY,
    arn KEYTEXT NOT NULL UNIQUE,
    certificate_pem TEXT NOT NULL,
    chain_pem TEXT,
    private_key TEXT NOT NULL,
    key_algorithm TEXT NOT NULL,
    domain_name TEXT,
    subject TEXT NOT NULL,
    issuer TEXT NOT NULL,
    serial TEXT NOT NULL,
    not_before_ms BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    tags TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    imported_ms BIGINT NOT NULL
);
CREATE INDEX acm_certificates_created ON acm_certificates (created_ms, certificate_id);

CREATE TABLE signing_profiles (
    profile_name KEYTEXT PRIMARY KEY,
    profile_version TEXT NOT NULL,
    platform_id TEXT NOT NULL,
    certificate_arn KEYTEXT NOT NULL,
    signing_parameters TEXT NOT NULL,
    validity_value BIGINT NOT NULL,
    validity_type TEXT NOT NULL,
    overrides TEXT,
    status TEXT NOT NULL,
    tags TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX signing_profiles_certificate ON signing_profiles (certificate_arn, status);

CREATE TABLE signing_jobs (
    job_id KEYTEXT PRIMARY KEY,
    client_request_token KEYTEXT NOT NULL UNIQUE,
    profile_name TEXT NOT NULL,
    profile_version TEXT NOT NULL,
    platform_id TEXT NOT NULL,
    certificate_arn TEXT NOT NULL,
    signing_parameters TEXT NOT NULL,
    overrides TEXT,
    validity_value BIGINT NOT NULL,
    validity_type TEXT NOT NULL,
    source_bucket TEXT NOT NULL,
    source_key TEXT NOT NULL,
    source_version TEXT NOT NULL,
    destination_bucket TEXT NOT NULL,
    destination_prefix TEXT NOT NULL,
    signed_key TEXT,
    signed_version TEXT,
    signature TEXT,
    payload_size BIGINT,
    payload_sha256 TEXT,
    status TEXT NOT NULL,
    status_reason TEXT,
    requested_by TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    completed_ms BIGINT,
    signature_expires_ms BIGINT
);
CREATE INDEX signing_jobs_created ON signing_jobs (created_ms, job_id);
CREATE INDEX signing_jobs_status ON signing_jobs (status, created_ms);
