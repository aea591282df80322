-- The customer trail's outbox: every request, decision and outcome concerning an appliance,
-- numbered per appliance, kept until the appliance's agent has recorded it in its own trail.
-- Rows are written in the same transaction as their vendor-trail record.

-- last_number: the last number given to a record of this appliance;
-- recorded_number: the last number the agent says its trail holds (rows up to it are pruned).
CREATE TABLE customer_trail_heads (
    appliance_id    TEXT PRIMARY KEY,
    last_number     BIGINT NOT NULL,
    recorded_number BIGINT NOT NULL
);

CREATE TABLE customer_trail_outbox (
    appliance_id TEXT NOT NULL,
    number       BIGINT NOT NULL,
    kind         TEXT NOT NULL,
    time         TEXT NOT NULL,
    actor        TEXT NOT NULL,
    endpoint_id  TEXT,
    op_id        TEXT,
    detail       TEXT NOT NULL,
    gateway_seq  BIGINT NOT NULL,
    gateway_hash TEXT NOT NULL,
    PRIMARY KEY (appliance_id, number)
);
