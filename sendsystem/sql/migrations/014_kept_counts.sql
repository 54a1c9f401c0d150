-- Version 14: kept counts (sendsystem/keptcounts.py explains the design).
-- `status`, `stats`, the HTML report and the metrics read these small tables
-- instead of scanning `messages`; their size grows with states x slots,
-- workers, seconds of sending, distinct replies and failure reasons, never
-- with the number of messages.
--
--   kept_counts        messages by (newsletter, state, reply code, slot), the
--                      deferrals they went through, and a sample reply
--   kept_timeline      per (newsletter, 1/10/60/600/3600 seconds, send worker):
--                      the delivered (sent or bounced) and failed messages,
--                      and the first/last finished_at (the send workers' rates)
--   kept_sort_workers  per (newsletter, sort worker): messages, first/last merged_at
--   kept_failures      failed messages per (newsletter, reason)
--
-- Times and samples are the least/greatest ever recorded (a row that later
-- changed keeps its mark); counts follow every change. The span of a send
-- (stats' duration) is read from the sort workers' first/last merge and the
-- send workers' first/last finish.
--
-- They are maintained by the triggers below, inside the statement (so the
-- transaction) that changes a message: exact by construction. `slot` spreads
-- the hot counters of kept_counts over up to 64 rows per key, one per
-- writing worker, so two workers committing outcomes of one newsletter
-- neither wait for one row lock nor (on Galera, through two nodes) conflict
-- at certification; readers add the slots up, and a single slot's value
-- means nothing alone (it may be negative). Timeline and sort-worker rows
-- are per worker, so they need no slot.
--
-- INSERTs have no trigger: a per-row trigger would more than double the
-- release of a large newsletter. The one statement that creates message
-- rows, newsletter_release_messages, is followed by kept_counts_add_released
-- with its row count in the same transaction (release.py). DELETEs decrement
-- kept_counts only: the other tables describe what happened, and `purge`
-- drops them once the newsletter's summary is stored.
--
-- Upgrade: stop (or disable) every role first. The triggers start counting
-- when they are created and the backfill below counts what is there; a
-- message changed between the two would be counted twice. `sendsystem
-- counts verify --repair` puts a newsletter right afterwards if need be.
-- Creating a trigger needs the TRIGGER privilege, and, when the server
-- writes a binary log, SUPER (or BINLOG ADMIN) or
-- log_bin_trust_function_creators = 1. The triggers run with the rights of
-- the user who ran `db init` (their DEFINER): keep that user.

CREATE TABLE IF NOT EXISTS kept_counts (
    newsletter_id  INT UNSIGNED NOT NULL,
    state          ENUM('queued','merged','sent','deferred','failed','skipped','bounced','cancelled')
                   NOT NULL,
    reply_code     SMALLINT UNSIGNED NOT NULL,
    slot           TINYINT UNSIGNED NOT NULL,
    n              BIGINT NOT NULL DEFAULT 0,
    deferrals      BIGINT NOT NULL DEFAULT 0,
    sample         VARCHAR(500) NULL,
    PRIMARY KEY (newsletter_id, state, reply_code, slot)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- Per 1, 10, 60, 600 and 3600 seconds of finished_at (`resolution`): a
-- timeline of any length is drawn from at most ~300 rows per worker (the
-- HTML report picks its bucket from the send's length, stats.py), status's
-- last-minute rate reads 60 one-second rows per worker, and the hour rows
-- carry each send worker's first and last finished_at (its rate). One
-- statement writes the five rows: in a trigger the statement costs more
-- than its rows (measured: ~10 us for the statement, ~4 us a row).
-- `bucket`: where the bucket starts, in seconds since 1970-01-01 00:00 of the
-- database's clock (integer arithmetic is cheaper in a trigger than DATETIME's).
CREATE TABLE IF NOT EXISTS kept_timeline (
    newsletter_id  INT UNSIGNED NOT NULL,
    resolution     SMALLINT UNSIGNED NOT NULL,
    bucket         INT UNSIGNED NOT NULL,
    worker_id      INT UNSIGNED NOT NULL,
    sent           BIGINT NOT NULL DEFAULT 0,
    failed         BIGINT NOT NULL DEFAULT 0,
    first_at       DATETIME(6) NULL,
    last_at        DATETIME(6) NULL,
    PRIMARY KEY (newsletter_id, resolution, bucket, worker_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

CREATE TABLE IF NOT EXISTS kept_sort_workers (
    newsletter_id  INT UNSIGNED NOT NULL,
    worker_id      INT UNSIGNED NOT NULL,
    messages       BIGINT NOT NULL DEFAULT 0,
    first_at       DATETIME(6) NULL,
    last_at        DATETIME(6) NULL,
    PRIMARY KEY (newsletter_id, worker_id)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The reason is COALESCE(reply, detail, '(no reason recorded)'), at most 500
-- characters like both columns; keyed by the text itself in the columns'
-- collation, so reasons group exactly as a GROUP BY over the rows would.
-- Replies that quote the address (or a session id, as Gmail's do) make one
-- reason per failed message: the top ten are read from the (n DESC) index,
-- ten rows whatever their number. So no slots here: a reason that every
-- worker hits at once (a relay refusing everything) shares one row, which
-- the failure brake soon stops.
CREATE TABLE IF NOT EXISTS kept_failures (
    newsletter_id  INT UNSIGNED NOT NULL,
    reason         VARCHAR(500) NOT NULL,
    n              BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (newsletter_id, reason),
    KEY ix_kept_failures_top (newsletter_id, n DESC)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;

-- The slot: the writing role's worker id, which each role sets as
-- @sendsystem_slot on its connections (db/database.py), so no two workers
-- share one; other sessions (admin commands, a test's SQL) use their
-- connection id, made distinct across Galera nodes by the node's
-- auto-increment offset (increment and offset are 1 on one server). 64
-- slots: only those written make rows ("no two workers share one" holds for
-- worker ids that differ by less than 64). Written out in each statement
-- rather than kept in a variable: in a trigger every SET and DECLARE is an
-- instruction of its own. For the same reason the tables are cut so that
-- few statements run per change: each costs ~10-20 us per changed row on
-- the 2-core test box, and each row it writes a few more. A sort outcome
-- runs two (counts, sort worker), a send outcome two (counts, timeline), a
-- failure three, a deferral, bounce or cancel one, and an assignment
-- (batch_id only) none.
CREATE OR REPLACE TRIGGER messages_kept_update AFTER UPDATE ON messages FOR EACH ROW
kept: BEGIN
    -- Assignment, hand-back and reclaim change only batch_id: leave at once.
    IF OLD.state = NEW.state AND OLD.deferrals = NEW.deferrals
       AND OLD.reply_code <=> NEW.reply_code AND OLD.reply <=> NEW.reply
       AND OLD.sort_worker_id <=> NEW.sort_worker_id AND OLD.merged_at <=> NEW.merged_at
       AND OLD.send_worker_id <=> NEW.send_worker_id AND OLD.finished_at <=> NEW.finished_at
       AND OLD.detail <=> NEW.detail THEN
        LEAVE kept;
    END IF;

    -- Counts by state and reply code (65535: no reply). A sort outcome, a
    -- cancel or an assignment's hand-back carries no reply and no deferral:
    -- the plain statement; the rest also moves the deferrals the message went
    -- through and keeps the least reply of each code as its sample. (Each
    -- column of an upsert costs a few microseconds a row in a trigger.)
    IF OLD.state <> NEW.state OR OLD.deferrals <> NEW.deferrals
       OR NOT (OLD.reply_code <=> NEW.reply_code) OR NOT (OLD.reply <=> NEW.reply) THEN
        IF OLD.deferrals = 0 AND NEW.deferrals = 0 AND NEW.reply IS NULL THEN
            INSERT INTO kept_counts (newsletter_id, state, reply_code, slot, n)
            VALUES (OLD.newsletter_id, OLD.state, COALESCE(OLD.reply_code, 65535),
                    COALESCE(@sendsystem_slot,
                             CONNECTION_ID() * @@auto_increment_increment
                             + @@auto_increment_offset) MOD 64,
                    -1),
                   (NEW.newsletter_id, NEW.state, COALESCE(NEW.reply_code, 65535),
                    COALESCE(@sendsystem_slot,
                             CONNECTION_ID() * @@auto_increment_increment
                             + @@auto_increment_offset) MOD 64,
                    1)
            ON DUPLICATE KEY UPDATE n = n + VALUES(n);
        ELSE
            INSERT INTO kept_counts (newsletter_id, state, reply_code, slot, n, deferrals, sample)
            VALUES (OLD.newsletter_id, OLD.state, COALESCE(OLD.reply_code, 65535),
                    COALESCE(@sendsystem_slot,
                             CONNECTION_ID() * @@auto_increment_increment
                             + @@auto_increment_offset) MOD 64,
                    -1, -OLD.deferrals, NULL),
                   (NEW.newsletter_id, NEW.state, COALESCE(NEW.reply_code, 65535),
                    COALESCE(@sendsystem_slot,
                             CONNECTION_ID() * @@auto_increment_increment
                             + @@auto_increment_offset) MOD 64,
                    1, NEW.deferrals, NEW.reply)
            ON DUPLICATE KEY UPDATE n = n + VALUES(n), deferrals = deferrals + VALUES(deferrals),
                sample = LEAST(COALESCE(sample, VALUES(sample)), COALESCE(VALUES(sample), sample));
        END IF;
    END IF;

    -- Sort workers: every message a sort worker wrote, and when.
    IF NOT (OLD.sort_worker_id <=> NEW.sort_worker_id) OR NOT (OLD.merged_at <=> NEW.merged_at) THEN
        IF OLD.sort_worker_id IS NOT NULL THEN
            INSERT INTO kept_sort_workers (newsletter_id, worker_id, messages)
            VALUES (OLD.newsletter_id, OLD.sort_worker_id, -1)
            ON DUPLICATE KEY UPDATE messages = messages - 1;
        END IF;
        IF NEW.sort_worker_id IS NOT NULL THEN
            INSERT INTO kept_sort_workers (newsletter_id, worker_id, messages, first_at, last_at)
            VALUES (NEW.newsletter_id, NEW.sort_worker_id, 1, NEW.merged_at, NEW.merged_at)
            ON DUPLICATE KEY UPDATE messages = messages + 1,
                first_at = LEAST(COALESCE(first_at, VALUES(first_at)),
                                 COALESCE(VALUES(first_at), first_at)),
                last_at = GREATEST(COALESCE(last_at, VALUES(last_at)),
                                   COALESCE(VALUES(last_at), last_at));
        END IF;
    END IF;

    -- Timeline of the send workers: delivered (sent or bounced) and failed
    -- messages per 1, 10, 60, 600 and 3600 seconds of finished_at, with the
    -- first and last finished_at in the hour rows. TO_SECONDS ignores the
    -- fraction (a CAST would round or truncate by the sql_mode the trigger was
    -- created under); 62167219200 is TO_SECONDS('1970-01-01').
    IF (OLD.state IN ('sent', 'bounced', 'failed') OR NEW.state IN ('sent', 'bounced', 'failed'))
       AND (OLD.state <> NEW.state OR NOT (OLD.finished_at <=> NEW.finished_at)
            OR NOT (OLD.send_worker_id <=> NEW.send_worker_id)) THEN
        IF OLD.state IN ('sent', 'bounced', 'failed') AND OLD.finished_at IS NOT NULL
           AND OLD.send_worker_id IS NOT NULL THEN
            INSERT INTO kept_timeline (newsletter_id, resolution, bucket, worker_id, sent,
                                       failed)
            VALUES (OLD.newsletter_id, 1,
                    TO_SECONDS(OLD.finished_at) - 62167219200,
                    OLD.send_worker_id, -(OLD.state <> 'failed'), -(OLD.state = 'failed')),
                   (OLD.newsletter_id, 10,
                    (TO_SECONDS(OLD.finished_at) - 62167219200) DIV 10 * 10,
                    OLD.send_worker_id, -(OLD.state <> 'failed'), -(OLD.state = 'failed')),
                   (OLD.newsletter_id, 60,
                    (TO_SECONDS(OLD.finished_at) - 62167219200) DIV 60 * 60,
                    OLD.send_worker_id, -(OLD.state <> 'failed'), -(OLD.state = 'failed')),
                   (OLD.newsletter_id, 600,
                    (TO_SECONDS(OLD.finished_at) - 62167219200) DIV 600 * 600,
                    OLD.send_worker_id, -(OLD.state <> 'failed'), -(OLD.state = 'failed')),
                   (OLD.newsletter_id, 3600,
                    (TO_SECONDS(OLD.finished_at) - 62167219200) DIV 3600 * 3600,
                    OLD.send_worker_id, -(OLD.state <> 'failed'), -(OLD.state = 'failed'))
            ON DUPLICATE KEY UPDATE sent = sent + VALUES(sent), failed = failed + VALUES(failed);
        END IF;
        IF NEW.state IN ('sent', 'bounced', 'failed') AND NEW.finished_at IS NOT NULL
           AND NEW.send_worker_id IS NOT NULL THEN
            INSERT INTO kept_timeline (newsletter_id, resolution, bucket, worker_id, sent,
                                       failed, first_at, last_at)
            VALUES (NEW.newsletter_id, 1,
                    TO_SECONDS(NEW.finished_at) - 62167219200,
                    NEW.send_worker_id, NEW.state <> 'failed', NEW.state = 'failed', NULL, NULL),
                   (NEW.newsletter_id, 10,
                    (TO_SECONDS(NEW.finished_at) - 62167219200) DIV 10 * 10,
                    NEW.send_worker_id, NEW.state <> 'failed', NEW.state = 'failed', NULL, NULL),
                   (NEW.newsletter_id, 60,
                    (TO_SECONDS(NEW.finished_at) - 62167219200) DIV 60 * 60,
                    NEW.send_worker_id, NEW.state <> 'failed', NEW.state = 'failed', NULL, NULL),
                   (NEW.newsletter_id, 600,
                    (TO_SECONDS(NEW.finished_at) - 62167219200) DIV 600 * 600,
                    NEW.send_worker_id, NEW.state <> 'failed', NEW.state = 'failed', NULL, NULL),
                   (NEW.newsletter_id, 3600,
                    (TO_SECONDS(NEW.finished_at) - 62167219200) DIV 3600 * 3600,
                    NEW.send_worker_id, NEW.state <> 'failed', NEW.state = 'failed', NEW.finished_at, NEW.finished_at)
            ON DUPLICATE KEY UPDATE sent = sent + VALUES(sent), failed = failed + VALUES(failed),
                first_at = LEAST(COALESCE(first_at, VALUES(first_at)),
                                 COALESCE(VALUES(first_at), first_at)),
                last_at = GREATEST(COALESCE(last_at, VALUES(last_at)),
                                   COALESCE(VALUES(last_at), last_at));
        END IF;
    END IF;

    -- Failures by reason (the relay's reply, else the merge's detail).
    IF OLD.state = 'failed' THEN
        INSERT INTO kept_failures (newsletter_id, reason, n)
        VALUES (OLD.newsletter_id, COALESCE(OLD.reply, OLD.detail, '(no reason recorded)'), -1)
        ON DUPLICATE KEY UPDATE n = n - 1;
    END IF;
    IF NEW.state = 'failed' THEN
        INSERT INTO kept_failures (newsletter_id, reason, n)
        VALUES (NEW.newsletter_id, COALESCE(NEW.reply, NEW.detail, '(no reason recorded)'), 1)
        ON DUPLICATE KEY UPDATE n = n + 1;
    END IF;
END;

CREATE OR REPLACE TRIGGER messages_kept_delete AFTER DELETE ON messages FOR EACH ROW
    INSERT INTO kept_counts (newsletter_id, state, reply_code, slot, n, deferrals)
    VALUES (OLD.newsletter_id, OLD.state, COALESCE(OLD.reply_code, 65535),
            COALESCE(@sendsystem_slot,
                     CONNECTION_ID() * @@auto_increment_increment
                     + @@auto_increment_offset) MOD 64,
            -1, -OLD.deferrals)
    ON DUPLICATE KEY UPDATE n = n + VALUES(n), deferrals = deferrals + VALUES(deferrals);

-- Backfill: what is there now, in slot 0 (the roles are stopped; see above).
-- The same recount as `sendsystem counts verify --repair` (queries.sql, kept_rebuild_*).
DELETE FROM kept_counts;
DELETE FROM kept_timeline;
DELETE FROM kept_sort_workers;
DELETE FROM kept_failures;

INSERT INTO kept_counts (newsletter_id, state, reply_code, slot, n, deferrals, sample)
SELECT newsletter_id, state, COALESCE(reply_code, 65535) AS code, 0, COUNT(*), SUM(deferrals),
       MIN(reply)
FROM messages GROUP BY newsletter_id, state, code;

INSERT INTO kept_timeline (newsletter_id, resolution, bucket, worker_id, sent, failed,
                           first_at, last_at)
SELECT newsletter_id, 1, TO_SECONDS(finished_at) - 62167219200 AS bucket_s,
       send_worker_id, SUM(state <> 'failed'), SUM(state = 'failed'), NULL, NULL
FROM messages
WHERE state IN ('sent', 'bounced', 'failed') AND finished_at IS NOT NULL
  AND send_worker_id IS NOT NULL
GROUP BY newsletter_id, bucket_s, send_worker_id
UNION ALL
SELECT newsletter_id, 10, (TO_SECONDS(finished_at) - 62167219200) DIV 10 * 10 AS bucket_s,
       send_worker_id, SUM(state <> 'failed'), SUM(state = 'failed'), NULL, NULL
FROM messages
WHERE state IN ('sent', 'bounced', 'failed') AND finished_at IS NOT NULL
  AND send_worker_id IS NOT NULL
GROUP BY newsletter_id, bucket_s, send_worker_id
UNION ALL
SELECT newsletter_id, 60, (TO_SECONDS(finished_at) - 62167219200) DIV 60 * 60 AS bucket_s,
       send_worker_id, SUM(state <> 'failed'), SUM(state = 'failed'), NULL, NULL
FROM messages
WHERE state IN ('sent', 'bounced', 'failed') AND finished_at IS NOT NULL
  AND send_worker_id IS NOT NULL
GROUP BY newsletter_id, bucket_s, send_worker_id
UNION ALL
SELECT newsletter_id, 600, (TO_SECONDS(finished_at) - 62167219200) DIV 600 * 600 AS bucket_s,
       send_worker_id, SUM(state <> 'failed'), SUM(state = 'failed'), NULL, NULL
FROM messages
WHERE state IN ('sent', 'bounced', 'failed') AND finished_at IS NOT NULL
  AND send_worker_id IS NOT NULL
GROUP BY newsletter_id, bucket_s, send_worker_id
UNION ALL
SELECT newsletter_id, 3600, (TO_SECONDS(finished_at) - 62167219200) DIV 3600 * 3600 AS bucket_s,
       send_worker_id, SUM(state <> 'failed'), SUM(state = 'failed'), MIN(finished_at), MAX(finished_at)
FROM messages
WHERE state IN ('sent', 'bounced', 'failed') AND finished_at IS NOT NULL
  AND send_worker_id IS NOT NULL
GROUP BY newsletter_id, bucket_s, send_worker_id;

INSERT INTO kept_sort_workers (newsletter_id, worker_id, messages, first_at, last_at)
SELECT newsletter_id, sort_worker_id, COUNT(*), MIN(merged_at), MAX(merged_at)
FROM messages WHERE sort_worker_id IS NOT NULL
GROUP BY newsletter_id, sort_worker_id;

INSERT INTO kept_failures (newsletter_id, reason, n)
SELECT newsletter_id, COALESCE(reply, detail, '(no reason recorded)') AS reason, COUNT(*)
FROM messages WHERE state = 'failed' GROUP BY newsletter_id, reason;

INSERT IGNORE INTO schema_version (version) VALUES (14);
