-- Approvers' signed decisions, exactly as the approver's key made them (JSON text), kept apart
-- from the records they decide: the gateway stores and forwards them untouched and cannot
-- make one. stage: command | output (grants and endpoints: command).
CREATE TABLE signed_decisions (
    record_id  TEXT NOT NULL,
    stage      TEXT NOT NULL,
    signed     TEXT NOT NULL,
    stored_at  BIGINT NOT NULL,
    PRIMARY KEY (record_id, stage)
);
