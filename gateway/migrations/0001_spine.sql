-- Control-plane state of the spine: identities, appliances, enrollment, endpoints, audit.
-- Times are unix milliseconds (BIGINT) except audit.time, which is kept as the exact RFC 3339
-- text the record's hash was taken over. Portable between SQLite and PostgreSQL.

CREATE TABLE api_tokens (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    role        TEXT NOT NULL,
    customer    TEXT,
    secret_hash TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    revoked_at  BIGINT
);

CREATE TABLE appliances (
    id               TEXT PRIMARY KEY,
    app              TEXT NOT NULL,
    customer         TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    created_by       TEXT NOT NULL,
    cert_fingerprint TEXT UNIQUE,
    enrolled_at      BIGINT,
    revoked_at       BIGINT,
    last_seen        BIGINT,
    agent_version    TEXT,
    resources        TEXT NOT NULL DEFAULT '[]',
    policy           TEXT
);
CREATE INDEX appliances_app_customer ON appliances (app, customer);

CREATE TABLE enrollment_tokens (
    id           TEXT PRIMARY KEY,
    appliance_id TEXT NOT NULL REFERENCES appliances (id),
    secret_hash  TEXT NOT NULL,
    expires_at   BIGINT NOT NULL,
    used_at      BIGINT
);

CREATE TABLE endpoints (
    id             TEXT PRIMARY KEY,
    endpoint_type  TEXT NOT NULL,
    appliance_id   TEXT NOT NULL REFERENCES appliances (id),
    resource_id    TEXT NOT NULL,
    state          TEXT NOT NULL,
    created_by     TEXT NOT NULL,
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    ended_at       BIGINT,
    address        TEXT,
    sessions_total BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX endpoints_state ON endpoints (state);

CREATE TABLE audit_log (
    seq          BIGINT PRIMARY KEY,
    time         TEXT NOT NULL,
    kind         TEXT NOT NULL,
    actor        TEXT NOT NULL,
    appliance_id TEXT,
    endpoint_id  TEXT,
    session_id   TEXT,
    op_id        TEXT,
    detail       TEXT NOT NULL,
    prev_hash    TEXT NOT NULL,
    hash         TEXT NOT NULL
);
