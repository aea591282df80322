-- Endpoints and ops say which phase they run under (`--phase operate|deploy|install`): the
-- grant they need and the identity the appliance uses at the target. Older records ran under
-- operate, the only phase there was.

ALTER TABLE endpoints ADD COLUMN phase TEXT NOT NULL DEFAULT 'operate';
ALTER TABLE ops ADD COLUMN phase TEXT NOT NULL DEFAULT 'operate';
