-- Control plane: grants (permission phases), one-off ops, the steady-state switch, the grant an
-- endpoint was created under, per-customer settings. Times are unix milliseconds (BIGINT),
-- booleans BIGINT 0/1, keywords (level, state, tool) TEXT. Portable between SQLite and
-- PostgreSQL.

-- state: pending-approval | active | denied | revoked. Expiry is derived from expires_at.
CREATE TABLE grants (
    id           TEXT PRIMARY KEY,
    appliance_id TEXT NOT NULL REFERENCES appliances (id),
    level        TEXT NOT NULL,
    state        TEXT NOT NULL,
    requested_by TEXT NOT NULL,
    reason       TEXT NOT NULL,
    duration_ms  BIGINT NOT NULL,
    requested_at BIGINT NOT NULL,
    decided_by   TEXT,
    decided_at   BIGINT,
    message      TEXT,
    expires_at   BIGINT,
    revoked_by   TEXT,
    revoked_at   BIGINT
);
CREATE INDEX grants_appliance ON grants (appliance_id);

CREATE TABLE ops (
    id                  TEXT PRIMARY KEY,
    appliance_id        TEXT NOT NULL REFERENCES appliances (id),
    tool                TEXT NOT NULL,
    command             TEXT NOT NULL,
    origin_resource_id  TEXT NOT NULL,
    timeout_ms          BIGINT NOT NULL,
    state               TEXT NOT NULL,
    requested_by        TEXT NOT NULL,
    requested_at        BIGINT NOT NULL,
    grant_id            TEXT,
    command_approved_by TEXT,
    command_approved_at BIGINT,
    output_approved_by  TEXT,
    output_approved_at  BIGINT,
    started_at          BIGINT,
    finished_at         BIGINT,
    exit_code           BIGINT,
    stdout              TEXT,
    stderr              TEXT,
    truncated           BIGINT NOT NULL DEFAULT 0,
    error               TEXT, -- JSON ApiError
    message             TEXT
);
CREATE INDEX ops_appliance ON ops (appliance_id);
CREATE INDEX ops_state ON ops (state);

ALTER TABLE endpoints ADD COLUMN grant_id TEXT;
CREATE INDEX endpoints_grant ON endpoints (grant_id);

ALTER TABLE appliances ADD COLUMN steady_state_disabled BIGINT NOT NULL DEFAULT 0;

CREATE TABLE customer_settings (
    customer    TEXT PRIMARY KEY,
    webhook_url TEXT
);
