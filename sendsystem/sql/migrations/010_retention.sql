-- Version 10: retention.
-- `newsletter_summaries`: what `stats` shows of a newsletter, folded before
-- `sendsystem purge` deletes its message rows (sendsystem/retention.py).
-- `facts` is JSON: counts by state, worker shares, the timeline, the replies
-- and failure top lists, deferrals, the send's duration, and the bounce
-- counts by (kind, verified) of the bounce rows received before `cutoff`
-- (those rows are deleted; later ones stay and are added on top).
-- `purged_at` is set once every message row is gone.

CREATE TABLE IF NOT EXISTS newsletter_summaries (
    newsletter_id    INT UNSIGNED NOT NULL PRIMARY KEY,
    facts            LONGTEXT NOT NULL CHECK (JSON_VALID(facts)),
    cutoff           DATETIME(6) NOT NULL,
    summarized_at    DATETIME(6) NOT NULL,
    purged_at        DATETIME(6) NULL,
    messages_purged  BIGINT UNSIGNED NOT NULL DEFAULT 0,
    bounces_purged   BIGINT UNSIGNED NOT NULL DEFAULT 0,
    CONSTRAINT fk_summaries_newsletter FOREIGN KEY (newsletter_id) REFERENCES newsletters (id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

INSERT IGNORE INTO schema_version (version) VALUES (10);
