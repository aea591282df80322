-- Ops keep the token id of the person who asked beside the display name, as grants and
-- endpoints do since 0009: names are display only, ownership is by id.

ALTER TABLE ops ADD COLUMN requested_by_id TEXT;

-- Ops made before this migration name their requester only. Where that name belongs to exactly
-- one token the requester is certain; otherwise the op names no token.
UPDATE ops SET requested_by_id = (SELECT MIN(t.id) FROM api_tokens t WHERE t.name = ops.requested_by)
 WHERE (SELECT COUNT(*) FROM api_tokens t WHERE t.name = ops.requested_by) = 1;
