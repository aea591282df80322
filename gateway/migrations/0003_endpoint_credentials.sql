-- The public half of each endpoint's client credential (a CSR, a SCRAM verifier, an SSH public
-- key), as JSON. The secret half stays on the operator's machine.
ALTER TABLE endpoints ADD COLUMN credential TEXT;
