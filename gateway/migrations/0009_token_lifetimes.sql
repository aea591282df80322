-- API tokens expire, can be revoked and remember when they were last used; a name belongs to at
-- most one live (unrevoked) token; grants and endpoints keep the token id of the person who
-- asked beside the display name, and ownership is decided by that id.

ALTER TABLE api_tokens ADD COLUMN expires_at BIGINT;
ALTER TABLE api_tokens ADD COLUMN last_used_at BIGINT;
ALTER TABLE api_tokens ADD COLUMN created_by_id TEXT;
ALTER TABLE grants ADD COLUMN requested_by_id TEXT;
ALTER TABLE endpoints ADD COLUMN created_by_id TEXT;

-- Records made before this migration name their owner only. Where that name belongs to exactly
-- one token the owner is certain; where several tokens shared it nobody owns the record (an
-- admin or the customer's approver still can act on it).
UPDATE grants SET requested_by_id = (SELECT MIN(t.id) FROM api_tokens t WHERE t.name = grants.requested_by)
 WHERE (SELECT COUNT(*) FROM api_tokens t WHERE t.name = grants.requested_by) = 1;
UPDATE endpoints SET created_by_id = (SELECT MIN(t.id) FROM api_tokens t WHERE t.name = endpoints.created_by)
 WHERE (SELECT COUNT(*) FROM api_tokens t WHERE t.name = endpoints.created_by) = 1;

-- Live tokens that shared a name: the oldest keeps it, the others get `#<id>` appended (a
-- character no new name may contain), so the unique index below can be built.
UPDATE api_tokens SET name = name || '#' || id
 WHERE revoked_at IS NULL AND EXISTS (
   SELECT 1 FROM api_tokens o
    WHERE o.name = api_tokens.name AND o.revoked_at IS NULL
      AND (o.created_at < api_tokens.created_at OR (o.created_at = api_tokens.created_at AND o.id < api_tokens.id)));

CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (name) WHERE revoked_at IS NULL;
