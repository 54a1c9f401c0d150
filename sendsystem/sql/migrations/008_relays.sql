-- Version 8: named relays, relay groups, cluster-wide relay limits.
-- `lists.relay_group`: the relay group a list's mail leaves through (NULL or
-- '' = the default group: every relay without `group`).
-- `relay_usage`: one row per named relay with `rate` or `daily_quota`, the
-- token bucket every send worker claims from (sendsystem/relaylimits.py):
-- `tokens` at `stamp` (database clock), and `used_today` messages claimed
-- on `day`.
-- `relay_health`: what each send worker's pool last saw of each relay
-- (written with its heartbeat), for `sendsystem relays` and `status`.

ALTER TABLE lists
    ADD COLUMN IF NOT EXISTS relay_group VARCHAR(64) NULL AFTER from_address;

CREATE TABLE IF NOT EXISTS relay_usage (
    relay       VARCHAR(100) NOT NULL PRIMARY KEY,
    tokens      DOUBLE NOT NULL,
    stamp       DATETIME(6) NOT NULL,
    day         DATE NOT NULL,
    used_today  INT UNSIGNED NOT NULL DEFAULT 0
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS relay_health (
    relay       VARCHAR(100) NOT NULL,
    worker_id   INT UNSIGNED NOT NULL,
    relay_group VARCHAR(64) NOT NULL DEFAULT '',
    health      VARCHAR(20) NOT NULL,
    last_error  VARCHAR(500) NOT NULL DEFAULT '',
    rate        DOUBLE NOT NULL DEFAULT 0,
    slow_rate   DOUBLE NULL,
    sent        BIGINT UNSIGNED NOT NULL DEFAULT 0,
    deferred    BIGINT UNSIGNED NOT NULL DEFAULT 0,
    failed      BIGINT UNSIGNED NOT NULL DEFAULT 0,
    updated_at  DATETIME(6) NOT NULL,
    PRIMARY KEY (relay, worker_id)
) ENGINE=InnoDB;

INSERT IGNORE INTO schema_version (version) VALUES (8);
