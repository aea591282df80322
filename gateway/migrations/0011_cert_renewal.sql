-- Agent certificate renewal. `cert_fingerprint` stays the certificate in use; a renewed one
-- waits in `pending_cert_fingerprint` until the agent's first connection with it, which makes
-- it current (and the old one unusable). `cert_expires_at` is the current one's not_after
-- (unix ms), shown by `appliance list`. Every certificate issued is kept in appliance_certs.

ALTER TABLE appliances ADD COLUMN pending_cert_fingerprint TEXT;
ALTER TABLE appliances ADD COLUMN cert_expires_at BIGINT;
CREATE INDEX appliances_pending_cert ON appliances (pending_cert_fingerprint);
