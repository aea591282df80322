-- Proof of teardown. Every certificate an appliance has held, so a proof it signed can still
-- be checked after the appliance is enrolled again; and the signed proofs agents delivered,
-- one per endpoint (a resent proof is stored once).

CREATE TABLE appliance_certs (
    fingerprint  TEXT PRIMARY KEY,
    appliance_id TEXT NOT NULL REFERENCES appliances (id),
    cert_pem     TEXT NOT NULL,
    stored_at    BIGINT NOT NULL
);
CREATE INDEX appliance_certs_appliance ON appliance_certs (appliance_id);

CREATE TABLE teardown_proofs (
    endpoint_id      TEXT PRIMARY KEY,
    appliance_id     TEXT NOT NULL REFERENCES appliances (id),
    -- The signed proof as the agent sent it (JSON of endpoint_types::teardown::SignedTeardown).
    proof            TEXT NOT NULL,
    cert_fingerprint TEXT NOT NULL REFERENCES appliance_certs (fingerprint),
    received_at      BIGINT NOT NULL
);
