-- A grant's expiry is derived from expires_at and never stored as its state; what is stored is
-- that its `grant.expired` record was written (both trails), so it is written once, also across
-- a restart or by several replicas (the first to set this writes it). Grants that ran out
-- before this migration get their record at the next start, marked late.

ALTER TABLE grants ADD COLUMN expiry_recorded_at BIGINT;
CREATE INDEX grants_unrecorded_expiry ON grants (state, expiry_recorded_at, expires_at);
