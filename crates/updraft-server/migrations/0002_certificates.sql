-- Device certificates issued by Updraft's CA, and which things they are attached to.

CREATE TABLE certificates (
    certificate_id KEYTEXT PRIMARY KEY,
    status TEXT NOT NULL,
    pem TEXT NOT NULL,
    not_before_ms BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE thing_principals (
    thing_name KEYTEXT NOT NULL,
    principal KEYTEXT NOT NULL,
    exclusive BIGINT NOT NULL,
    PRIMARY KEY (thing_name, principal)
);
CREATE INDEX thing_principals_principal ON thing_principals (principal, thing_name);
