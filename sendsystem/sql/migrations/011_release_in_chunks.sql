-- Version 11: a newsletter's message rows are created in chunks, each its own
-- short transaction (sendsystem/admin.py `release`), so ten million rows never
-- make one multi-minute transaction or one huge Galera write set.
-- `release_next`: the next subscriber id to release (the resumable cursor);
-- `release_holder`/`release_until`: who is releasing it now, a lease renewed
-- with every chunk, so the sort balancer and a `sendsystem enqueue` never
-- release the same newsletter at once, and a crashed releaser's work is taken
-- over (from the cursor) once its lease runs out.
-- `total` grows with each chunk; the newsletter becomes `running` (visible to
-- the balancers) only when the last chunk is in.

ALTER TABLE newsletters
    ADD COLUMN IF NOT EXISTS release_next BIGINT UNSIGNED NULL,
    ADD COLUMN IF NOT EXISTS release_holder VARCHAR(120) NULL,
    ADD COLUMN IF NOT EXISTS release_until DATETIME(6) NULL;

INSERT IGNORE INTO schema_version (version) VALUES (11);
