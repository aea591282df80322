-- Pages of the audit trail filtered by appliance or time are served from an index, not a scan.
CREATE INDEX audit_log_appliance_seq ON audit_log (appliance_id, seq);
CREATE INDEX audit_log_time ON audit_log (time);
