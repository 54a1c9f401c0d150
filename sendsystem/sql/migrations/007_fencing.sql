-- Version 7: fencing.
-- `workers.reclaimed_at`: when the balancer last reclaimed a batch of this
-- worker. Besides telling an operator, it makes the reclaim *write* the
-- worker's row: on Galera, where row locks are node-local, a reclaim and a
-- heartbeat committed concurrently on two nodes then conflict at
-- certification and one of them is retried, exactly as the lock serialises
-- them on a single server (see batch_mark_reclaimed in queries.sql).

ALTER TABLE workers
    ADD COLUMN IF NOT EXISTS reclaimed_at DATETIME(6) NULL AFTER heartbeat_at;

INSERT IGNORE INTO schema_version (version) VALUES (7);
