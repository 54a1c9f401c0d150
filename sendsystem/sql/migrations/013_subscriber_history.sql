-- Version 13: subscriber status history (`list stats`) and erasure (`subscriber forget`).
--
-- `subscriber_events`: one row per change of a subscription's status, written
-- in the same transaction as the change (sendsystem/history.py): an
-- unsubscribe, a bounce crossing the thresholds, a complaint, an admin's
-- change, an erasure request. `reason` says how in a few words ("List-Unsubscribe
-- one-click", "hard bounce 5.1.1", "complaint (ARF)", "admin", ...);
-- `newsletter_id` is the newsletter that caused it when that is known (the
-- bounced or complained-about message's, the one the unsubscribe token names).
-- Joins are NOT events: a subscription's join is its row's `created_at`, so a
-- 10-million-row import writes nothing here. `subscriber_id` is set to NULL
-- by `sendsystem subscriber forget`: the row then only counts.
--
-- `ix_subscribers_list_created`: joins per week are a covering range scan of
-- the list's entries in it (`list stats`). New rows append at its end
-- (created_at grows), so imports pay little.
--
-- `list_stats_weeks`, `list_stats_cache`: what `list stats` has counted of a
-- list's completed weeks (joins, and status changes by from, to and reason),
-- kept so that the next report scans only the weeks since (a past week's rows
-- never change: a join is a row's creation time, an event's time is when it
-- happened). `list_stats_cache.until`: the weeks before it are all there.
-- Aggregates only, nothing about a person.
--
-- `privacy_salt`: one random value, written by the first `subscriber forget`,
-- that salts the SHA-256 of a forgotten address kept in the blocklist
-- ('sha256:<hex>'), so a forgotten person is never mailed again by a list that
-- imports them anew, while the address itself is gone (see
-- sendsystem/forget.py).

CREATE TABLE IF NOT EXISTS subscriber_events (
    id             BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    list_id        INT UNSIGNED NOT NULL,
    subscriber_id  BIGINT UNSIGNED NULL,
    at             DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    from_status    ENUM('active','unsubscribed','bounced','complained') NOT NULL,
    to_status      ENUM('active','unsubscribed','bounced','complained') NOT NULL,
    reason         VARCHAR(100) NOT NULL,
    newsletter_id  INT UNSIGNED NULL,
    -- list stats: the list's changes by week, read from the index alone
    KEY ix_subscriber_events_list (list_id, at, from_status, to_status, reason),
    -- list stats: unsubscribes attributed to each newsletter
    KEY ix_subscriber_events_newsletter (newsletter_id, to_status),
    -- subscriber forget
    KEY ix_subscriber_events_subscriber (subscriber_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

ALTER TABLE subscribers
    ADD KEY IF NOT EXISTS ix_subscribers_list_created (list_id, created_at);

CREATE TABLE IF NOT EXISTS list_stats_weeks (
    list_id      INT UNSIGNED NOT NULL,
    week         DATE NOT NULL,
    kind         ENUM('join','change') NOT NULL,
    from_status  ENUM('active','unsubscribed','bounced','complained') NOT NULL DEFAULT 'active',
    to_status    ENUM('active','unsubscribed','bounced','complained') NOT NULL DEFAULT 'active',
    reason       VARCHAR(100) NOT NULL DEFAULT '',
    n            BIGINT UNSIGNED NOT NULL,
    PRIMARY KEY (list_id, week, kind, from_status, to_status, reason)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS list_stats_cache (
    list_id  INT UNSIGNED NOT NULL PRIMARY KEY,
    until    DATE NOT NULL
) ENGINE=InnoDB;

CREATE TABLE IF NOT EXISTS privacy_salt (
    id    TINYINT UNSIGNED NOT NULL PRIMARY KEY,
    salt  CHAR(64) NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

-- Backfill: every subscription that is not active left once, from active.
-- When it left is not recorded before this version; the best evidence is the
-- latest verified report of the matching kind (a complaint, a bounce, a mailto
-- unsubscribe), else the row's last change (`updated_at`, an upper bound: a
-- later re-import of its fields moves it). Idempotent by itself (a
-- subscription with any event is skipped), so it does not depend on this
-- file's number.
INSERT INTO subscriber_events (list_id, subscriber_id, at, from_status, to_status, reason,
                               newsletter_id)
SELECT s.list_id, s.id,
       COALESCE((SELECT MAX(b.received_at) FROM bounces b
                 WHERE b.subscriber_id = s.id AND b.verified = 1
                   AND b.kind IN (CASE s.status WHEN 'complained' THEN 'complaint'
                                                WHEN 'unsubscribed' THEN 'unsubscribe'
                                                ELSE 'hard' END,
                                  IF(s.status = 'bounced', 'soft', '-'))),
                s.updated_at),
       'active', s.status, 'before history (schema 13)',
       (SELECT b.newsletter_id FROM bounces b
        WHERE b.subscriber_id = s.id AND b.verified = 1
          AND b.kind IN (CASE s.status WHEN 'complained' THEN 'complaint'
                                       WHEN 'unsubscribed' THEN 'unsubscribe'
                                       ELSE 'hard' END,
                         IF(s.status = 'bounced', 'soft', '-'))
        ORDER BY b.received_at DESC, b.id DESC LIMIT 1)
FROM subscribers s
WHERE s.status <> 'active'
  AND NOT EXISTS (SELECT 1 FROM subscriber_events e WHERE e.subscriber_id = s.id);

INSERT IGNORE INTO schema_version (version) VALUES (13);
