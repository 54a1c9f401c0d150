-- Version 5: a highly available central database.
-- `workers.db_node`: the database node (host:port) each process is connected
-- to, reported with every heartbeat (`sendsystem status` shows it).
-- `leases`: the cluster-wide lease of the active balancer of each kind
-- (sort, send), replacing GET_LOCK, which is node-local on Galera.

ALTER TABLE workers
    ADD COLUMN IF NOT EXISTS db_node VARCHAR(300) NULL AFTER pid;

CREATE TABLE IF NOT EXISTS leases (
    kind        VARCHAR(16) NOT NULL PRIMARY KEY,
    holder      INT UNSIGNED NULL,
    epoch       BIGINT UNSIGNED NOT NULL DEFAULT 0,
    taken_at    DATETIME(6) NULL,
    expires_at  DATETIME(6) NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

INSERT IGNORE INTO leases (kind) VALUES ('sort'), ('send');

INSERT IGNORE INTO schema_version (version) VALUES (5);
