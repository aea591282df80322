-- The approval webhook goes out over https only, signed with a per-customer secret, to a
-- checked address, and every delivery is kept until it is delivered or given up (24 h of
-- retries), so a gateway restart resumes what was pending.

-- The signing secret, sealed (AES-256-GCM under a key derived from the gateway CA key): the
-- gateway must be able to sign with it, so it cannot be hashed; sealed, a copy of the
-- database alone does not give it away.
ALTER TABLE customer_settings ADD COLUMN webhook_secret_sealed TEXT;
-- PEM bundle the receiver's certificate must chain to (NULL: the system roots).
ALTER TABLE customer_settings ADD COLUMN webhook_ca_pem TEXT;
-- 1: the admin allowed loopback, link-local, private and CGNAT addresses as targets.
ALTER TABLE customer_settings ADD COLUMN webhook_allow_private BIGINT NOT NULL DEFAULT 0;

-- Webhooks set before this migration were plain http and unsigned: they stop until set again.
UPDATE customer_settings SET webhook_url = NULL WHERE webhook_url IS NOT NULL;

CREATE TABLE webhook_deliveries (
    id              TEXT PRIMARY KEY,
    customer        TEXT NOT NULL,
    event           TEXT NOT NULL,
    target          TEXT NOT NULL,
    body            TEXT NOT NULL,
    -- pending | delivered | failed
    state           TEXT NOT NULL,
    created_at      BIGINT NOT NULL,
    attempts        BIGINT NOT NULL DEFAULT 0,
    last_status     BIGINT,
    last_error      TEXT,
    -- When a worker may (next) try it; a worker that takes it moves this forward by a lease,
    -- so a crash mid-attempt only delays the retry.
    next_attempt_at BIGINT,
    delivered_at    BIGINT
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (state, next_attempt_at);
CREATE INDEX webhook_deliveries_customer ON webhook_deliveries (customer, created_at);
