-- Version 15: lists of ten million (streaming import, export).
-- `subscribers.left_at` / `left_reason`: when (UTC, to the second) and why a
-- subscription got its current non-active status, set by the statements that
-- change it (unsubscribe, bounce thresholds, complaint, an admin, an import).
-- Short reasons without personal data ("unsubscribe: web", "bounced: 1 hard,
-- 0 soft, last 5.1.1", "complaint: ESP webhook", "import"). Subscriptions
-- that left before this version have both NULL: nobody recorded it.
-- Both are appended nullable columns, so MariaDB adds them instantly.
--
-- `imports`: one row per `list import`, its state and progress (heartbeat on
-- the database's clock). A second import into the same list refuses to start
-- while one is alive; an import that stopped without finishing (killed, host
-- crashed) is found by the next import of its list, marked `interrupted`
-- and reported with how far its writing got (sendsystem/importer.py).

ALTER TABLE subscribers
    ADD COLUMN IF NOT EXISTS left_at DATETIME NULL,
    ADD COLUMN IF NOT EXISTS left_reason VARCHAR(100) NULL;

CREATE TABLE IF NOT EXISTS imports (
    id            INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    list_id       INT UNSIGNED NOT NULL,
    file          VARCHAR(500) NOT NULL,
    host          VARCHAR(255) NOT NULL,
    pid           INT UNSIGNED NOT NULL,
    state         ENUM('reading','writing','done','failed','interrupted') NOT NULL DEFAULT 'reading',
    rows_read     BIGINT UNSIGNED NOT NULL DEFAULT 0,
    bad_rows      BIGINT UNSIGNED NOT NULL DEFAULT 0,
    rows_to_write BIGINT UNSIGNED NOT NULL DEFAULT 0,
    rows_written  BIGINT UNSIGNED NOT NULL DEFAULT 0,
    started_at    DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    heartbeat_at  DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    finished_at   DATETIME(6) NULL,
    message       VARCHAR(1000) NULL,
    KEY ix_imports_list_state (list_id, state),
    CONSTRAINT fk_imports_list FOREIGN KEY (list_id) REFERENCES lists (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

INSERT IGNORE INTO schema_version (version) VALUES (15);
