-- SendSystem schema, version 1: the tables of ARCHITECTURE.md.
-- InnoDB, utf8mb4. Times are DATETIME(6) in the database server's clock
-- (every process compares against NOW(6), so server clocks need not agree).

CREATE TABLE IF NOT EXISTS schema_version (
    version     INT NOT NULL PRIMARY KEY,
    applied_at  DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS lists (
    id            INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name          VARCHAR(100) NOT NULL,
    from_name     VARCHAR(200) NOT NULL,
    from_address  VARCHAR(254) NOT NULL,
    created_at    DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_lists_name (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One row per address per list; the CSV's other columns live in `fields`
-- (a JSON object) so lists may carry any merge fields.
CREATE TABLE IF NOT EXISTS subscribers (
    id          BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    list_id     INT UNSIGNED NOT NULL,
    email       VARCHAR(254) NOT NULL,
    domain      VARCHAR(253) NOT NULL,
    fields      LONGTEXT NOT NULL,
    status      ENUM('active','unsubscribed','bounced','complained') NOT NULL DEFAULT 'active',
    created_at  DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at  DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_subscribers_list_email (list_id, email),
    KEY ix_subscribers_list_status (list_id, status),
    KEY ix_subscribers_email (email),
    KEY ix_subscribers_domain (domain),
    CONSTRAINT fk_subscribers_list FOREIGN KEY (list_id) REFERENCES lists (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS templates (
    id          INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name        VARCHAR(100) NOT NULL,
    subject     TEXT NOT NULL,
    html        MEDIUMTEXT NOT NULL,
    text        MEDIUMTEXT NULL,
    created_at  DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    updated_at  DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6) ON UPDATE CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_templates_name (name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- A newsletter keeps its own copy of the template, so editing a template
-- never changes a newsletter that is already on its way.
CREATE TABLE IF NOT EXISTS newsletters (
    id            INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    list_id       INT UNSIGNED NOT NULL,
    template_id   INT UNSIGNED NOT NULL,
    subject       TEXT NOT NULL,
    html          MEDIUMTEXT NOT NULL,
    text          MEDIUMTEXT NULL,
    state         ENUM('scheduled','running','paused','cancelled','done') NOT NULL,
    send_at       DATETIME(6) NULL,
    total         INT UNSIGNED NOT NULL DEFAULT 0,
    pause_reason  VARCHAR(500) NULL,
    created_at    DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    released_at   DATETIME(6) NULL,
    finished_at   DATETIME(6) NULL,
    KEY ix_newsletters_state (state, send_at),
    CONSTRAINT fk_newsletters_list FOREIGN KEY (list_id) REFERENCES lists (id),
    CONSTRAINT fk_newsletters_template FOREIGN KEY (template_id) REFERENCES templates (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Stored once per newsletter, never once per message.
CREATE TABLE IF NOT EXISTS attachments (
    id             INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    newsletter_id  INT UNSIGNED NOT NULL,
    filename       VARCHAR(255) NOT NULL,
    content_type   VARCHAR(127) NOT NULL,
    size           INT UNSIGNED NOT NULL,
    data           LONGBLOB NOT NULL,
    KEY ix_attachments_newsletter (newsletter_id),
    CONSTRAINT fk_attachments_newsletter FOREIGN KEY (newsletter_id) REFERENCES newsletters (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS workers (
    id            INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    host          VARCHAR(255) NOT NULL,
    role          ENUM('sort','send','sort-balancer','send-balancer') NOT NULL,
    name          VARCHAR(100) NOT NULL,
    pid           INT UNSIGNED NULL,
    state         ENUM('starting','running','standby','stopping','stopped') NOT NULL DEFAULT 'starting',
    enabled       TINYINT(1) NOT NULL DEFAULT 1,
    started_at    DATETIME(6) NULL,
    heartbeat_at  DATETIME(6) NULL,
    rate          DOUBLE NULL,
    backlog       INT UNSIGNED NOT NULL DEFAULT 0,
    processed     BIGINT UNSIGNED NOT NULL DEFAULT 0,
    UNIQUE KEY uq_workers_identity (host, role, name)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS batches (
    id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    role           ENUM('sort','send') NOT NULL,
    worker_id      INT UNSIGNED NOT NULL,
    newsletter_id  INT UNSIGNED NOT NULL,
    size           INT UNSIGNED NOT NULL DEFAULT 0,
    state          ENUM('assigned','done','reclaimed') NOT NULL DEFAULT 'assigned',
    created_at     DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    finished_at    DATETIME(6) NULL,
    KEY ix_batches_worker_state (worker_id, state),
    KEY ix_batches_state_role (state, role)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- One row per recipient of a newsletter. `batch_id` is set while a worker
-- owns the row and cleared when it moves to its next state; `body` holds the
-- compressed merge only between merged and a final state.
CREATE TABLE IF NOT EXISTS messages (
    id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    newsletter_id    INT UNSIGNED NOT NULL,
    subscriber_id    BIGINT UNSIGNED NOT NULL,
    state            ENUM('queued','merged','sent','deferred','failed','skipped','bounced','cancelled')
                     NOT NULL DEFAULT 'queued',
    batch_id         BIGINT UNSIGNED NULL,
    sort_worker_id   INT UNSIGNED NULL,
    send_worker_id   INT UNSIGNED NULL,
    body             MEDIUMBLOB NULL,
    message_id       VARCHAR(255) NULL,
    attempts         SMALLINT UNSIGNED NOT NULL DEFAULT 0,
    next_attempt_at  DATETIME(6) NULL,
    merged_at        DATETIME(6) NULL,
    finished_at      DATETIME(6) NULL,
    reply_code       SMALLINT UNSIGNED NULL,
    detail           VARCHAR(500) NULL,
    UNIQUE KEY uq_messages_newsletter_subscriber (newsletter_id, subscriber_id),
    -- The balancers' pick: WHERE newsletter_id=? AND state=? AND batch_id IS NULL ORDER BY id
    KEY ix_messages_pick (newsletter_id, state, batch_id),
    KEY ix_messages_batch (batch_id),
    KEY ix_messages_message_id (message_id),
    KEY ix_messages_subscriber (subscriber_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Addresses ('user@example.com') or whole domains ('@example.com').
CREATE TABLE IF NOT EXISTS blocklist (
    id          INT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    pattern     VARCHAR(254) NOT NULL,
    reason      VARCHAR(255) NULL,
    created_at  DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    UNIQUE KEY uq_blocklist_pattern (pattern)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS bounces (
    id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    message_id     BIGINT UNSIGNED NULL,
    subscriber_id  BIGINT UNSIGNED NULL,
    email          VARCHAR(254) NULL,
    kind           ENUM('hard','soft','autoreply','complaint','unsubscribe','unknown') NOT NULL,
    status         VARCHAR(20) NULL,
    diagnostic     VARCHAR(1000) NULL,
    received_at    DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    KEY ix_bounces_subscriber (subscriber_id, kind, received_at),
    KEY ix_bounces_message (message_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

INSERT IGNORE INTO schema_version (version) VALUES (1);
