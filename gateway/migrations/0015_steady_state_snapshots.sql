-- Steady-state health snapshots the agents push, one row per resource per collection: the
-- latest per resource is what `postern appliance status` shows; older rows are the bounded
-- history (24 h, capped in count per appliance), pruned as new rows arrive.

CREATE TABLE steady_state_snapshots (
    appliance_id TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    collected_at_ms BIGINT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    health TEXT NOT NULL
);

CREATE INDEX steady_state_snapshots_by_resource
    ON steady_state_snapshots (appliance_id, resource_id, received_at_ms);
