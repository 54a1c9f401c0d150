-- Version 12: opt-in open and click tracking (sendsystem/tracking/).
-- `lists.track`: the kinds a list's newsletters track ('', 'opens', 'clicks',
-- 'opens,clicks'; `list set NAME --track`). `newsletters.track`: what this
-- newsletter tracks, fixed at enqueue from the list or `enqueue --track/--no-track`
-- (NULL: enqueued before schema 12, never tracked). `[tracking] enabled` wins.
--
-- `newsletter_links`: the redirect targets of a newsletter's tracked links.
-- `idx` is a keyed 64-bit hash of the URL, so every sort worker names a URL
-- alike without asking anyone; rows are only ever added (INSERT IGNORE), in
-- the transaction that stores the first merged message using them. A click is
-- redirected only to a URL of this table: a forged token fails its MAC, and a
-- genuine one can only name a link of its own newsletter. Kept by `purge`:
-- links in old mail keep working.
--
-- `tracking_events`: every hit (one row per request), written in multi-row
-- batches by the web app's flusher. `hit` is the hit's own id, made by the
-- web worker, so a batch replayed from the spool after an outage is inserted
-- once (INSERT IGNORE). `verdict`: 0 human, 1 within machine_seconds of
-- delivery, 2 a mail-privacy proxy, 3 a known scanner or prefetcher (user
-- agent, HEAD), 4 one of a burst of clicks on many links at once. No IP
-- address and no user agent are stored.
--
-- `tracking_unique`: one row per recipient (message) and kind and link (0 for
-- opens), rebuilt from that recipient's events at each flush; reports count
-- these rows (unique per recipient) instead of scanning every hit.

ALTER TABLE lists
    ADD COLUMN IF NOT EXISTS track VARCHAR(20) NOT NULL DEFAULT '' AFTER relay_group;

ALTER TABLE newsletters
    ADD COLUMN IF NOT EXISTS track VARCHAR(20) NULL;

CREATE TABLE IF NOT EXISTS newsletter_links (
    newsletter_id  INT UNSIGNED NOT NULL,
    idx            BIGINT UNSIGNED NOT NULL,
    url            TEXT NOT NULL,
    created_at     DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    PRIMARY KEY (newsletter_id, idx)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS tracking_events (
    id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    hit            BINARY(16) NOT NULL,
    newsletter_id  INT UNSIGNED NOT NULL,
    message_id     BIGINT UNSIGNED NOT NULL,
    kind           ENUM('open','click') NOT NULL,
    link_idx       BIGINT UNSIGNED NOT NULL DEFAULT 0,
    at             DATETIME(6) NOT NULL,
    verdict        TINYINT UNSIGNED NOT NULL DEFAULT 0,
    UNIQUE KEY uq_tracking_events_hit (hit),
    KEY ix_tracking_events_message (message_id, kind, at),
    KEY ix_tracking_events_newsletter (newsletter_id, at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS tracking_unique (
    newsletter_id   INT UNSIGNED NOT NULL,
    kind            ENUM('open','click') NOT NULL,
    message_id      BIGINT UNSIGNED NOT NULL,
    link_idx        BIGINT UNSIGNED NOT NULL DEFAULT 0,
    hits            INT UNSIGNED NOT NULL,
    human_hits      INT UNSIGNED NOT NULL,
    first_at        DATETIME(6) NOT NULL,
    last_at         DATETIME(6) NOT NULL,
    first_human_at  DATETIME(6) NULL,
    -- The strongest machine verdict among its hits (0 when all were human).
    verdict         TINYINT UNSIGNED NOT NULL DEFAULT 0,
    PRIMARY KEY (newsletter_id, kind, message_id, link_idx),
    KEY ix_tracking_unique_message (message_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

INSERT IGNORE INTO schema_version (version) VALUES (12);
