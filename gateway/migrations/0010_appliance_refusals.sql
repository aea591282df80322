-- Grants and endpoints the appliance refused although a person was said to approve them: the
-- signed decision was missing or did not verify against the appliance's own [[approver]] keys.
-- error: the appliance's ApiError (APPROVAL_INVALID) as JSON text, shown with the record.
CREATE TABLE appliance_refusals (
    record_id     TEXT PRIMARY KEY,
    appliance_id  TEXT NOT NULL,
    error         TEXT NOT NULL,
    refused_at    BIGINT NOT NULL
);
