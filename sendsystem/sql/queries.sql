-- Every SQL statement SendSystem runs, by name (see sendsystem/db/queries.py).
-- Placeholders are PyMySQL's %(name)s. Roles PREPARE the ones they use at
-- start-up, so a schema mismatch fails at once and names the statement.

-- ===================================================================== meta

-- name: schema_version
SELECT MAX(version) AS version FROM schema_version;

-- name: connection_id
SELECT CONNECTION_ID() AS id;

-- name: db_now
SELECT NOW(6) AS now;

-- name: db_node_state
-- On connect (sendsystem/db/database.py): is this a Galera node, and may it
-- serve us (Primary component, ready, Synced)?
SELECT @@wsrep_on AS wsrep_on,
       (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS
        WHERE VARIABLE_NAME = 'WSREP_READY') AS ready,
       (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS
        WHERE VARIABLE_NAME = 'WSREP_CLUSTER_STATUS') AS cluster_status,
       (SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS
        WHERE VARIABLE_NAME = 'WSREP_LOCAL_STATE_COMMENT') AS local_state;

-- name: db_idle_transaction_timeout
-- On connect: the server drops a connection idle inside a transaction this long.
SET SESSION idle_transaction_timeout = %(seconds)s;

-- name: db_session_slot
-- The kept counts' slot of this session's writes (migration 014): the worker
-- id of the role that owns the connection.
SET @sendsystem_slot = %(slot)s;

-- name: db_causal_reads
-- Galera only: reads wait until this node has applied every write committed
-- anywhere in the cluster before they began.
SET SESSION wsrep_sync_wait = 1;

-- ==================================================================== lists

-- name: list_insert
INSERT INTO lists (name, from_name, from_address) VALUES (%(name)s, %(from_name)s, %(from_address)s);

-- name: list_by_name
SELECT id, name, from_name, from_address, relay_group FROM lists WHERE name = %(name)s;

-- name: list_all
SELECT l.id, l.name, l.from_name, l.from_address, l.relay_group,
       (SELECT COUNT(*) FROM subscribers s WHERE s.list_id = l.id AND s.status = 'active') AS active,
       (SELECT COUNT(*) FROM subscribers s WHERE s.list_id = l.id) AS total
FROM lists l ORDER BY l.name;

-- ============================================================== subscribers

-- name: subscriber_get
SELECT s.id, s.list_id, s.email, s.status FROM subscribers s WHERE s.id = %(id)s;

-- name: subscriber_set_status
-- left_at / left_reason say when and why the subscription got its current
-- status (every statement that changes it sets them; assigned before status,
-- which MariaDB assigns left to right).
UPDATE subscribers SET left_at = NOW(), left_reason = %(reason)s, status = %(status)s
WHERE id = %(id)s AND (status = 'active' OR (%(status)s = 'complained' AND status <> 'complained'));

-- name: subscribers_import
-- values: list_id, email, domain, fields, status, left_at, left_reason
-- `list import` writes its checked rows in address order, one statement per
-- chunk of at most a fraction of a second (sendsystem/importer.py).
-- A new row takes the file's status (active when it has none), left_at and
-- left_reason. An existing row takes the new merge fields and never goes
-- back to active: an active one takes a non-active status from the file
-- (when: the file's left_at, else now; why: the file's reason, else
-- 'import'); one that already left keeps its status, left_at and
-- left_reason. status is assigned last: the others test its old value.
INSERT INTO subscribers (list_id, email, domain, fields, status, left_at, left_reason)
VALUES %(rows)s
ON DUPLICATE KEY UPDATE
    fields = VALUES(fields), domain = VALUES(domain),
    left_at = IF(status = 'active' AND VALUES(status) <> 'active',
                 COALESCE(VALUES(left_at), NOW()), left_at),
    left_reason = IF(status = 'active' AND VALUES(status) <> 'active',
                     COALESCE(VALUES(left_reason), 'import'), left_reason),
    status = IF(status = 'active', VALUES(status), status);

-- name: subscribers_import_changes
-- values: list_id, email, h, status
-- `list import` into a list with subscribers: which rows of a chunk would
-- change something (new, other merge fields or domain, or an active
-- subscriber the file says left); the others are not written. h is the MD5
-- of domain TAB fields as the import would store them, so that only the
-- addresses travel back.
WITH v (list_id, email, h, status) AS (VALUES %(rows)s)
SELECT v.email
FROM v LEFT JOIN subscribers s ON s.list_id = v.list_id AND s.email = v.email
WHERE s.id IS NULL OR (s.status = 'active' AND v.status <> 'active')
   OR MD5(CONCAT(s.domain, CHAR(9 USING utf8mb4), s.fields)) <> v.h;

-- name: subscribers_import_left
-- values: list_id, email
-- `list import` into a list with subscribers: which of a chunk's addresses
-- that the file says left have already left (their status stays, so no
-- history event). Locked until the chunk's transaction ends, so nothing
-- changes their status between this and the upsert.
WITH v (list_id, email) AS (VALUES %(rows)s)
SELECT s.email
FROM v JOIN subscribers s ON s.list_id = v.list_id AND s.email = v.email
WHERE s.status <> 'active'
FOR UPDATE;

-- name: subscriber_events_import
-- values: list_id, email
-- `list import`: the history events of a chunk's subscriptions that it
-- ended or created ended (the addresses given are exactly those), in the
-- chunk's transaction. The event's time is when the list learned of it (the
-- row's left_at keeps the file's date): list stats' completed weeks are
-- counted once and kept, so an event is never dated into one of them.
INSERT INTO subscriber_events (list_id, subscriber_id, from_status, to_status, reason)
WITH v (list_id, email) AS (VALUES %(rows)s)
SELECT s.list_id, s.id, 'active', s.status, LEFT(COALESCE(s.left_reason, 'import'), 100)
FROM v JOIN subscribers s ON s.list_id = v.list_id AND s.email = v.email
WHERE s.status <> 'active';

-- name: list_has_subscribers
SELECT 1 AS yes FROM subscribers WHERE list_id = %(list_id)s LIMIT 1;

-- name: subscribers_export_chunk
-- `list export`: the next rows of one status after id `after`: keyset
-- pagination on ix_subscribers_list_status (list_id, status, id). The ids
-- come from the index alone (ordered by all three columns, or MariaDB reads
-- the index from the list's first entry, skipping up to `after` on every
-- chunk: 643 s for 10,000,000 rows); the rows are then fetched by id.
SELECT s.id, s.email, s.fields, s.status, s.left_at, s.left_reason
FROM (SELECT id FROM subscribers
      WHERE list_id = %(list_id)s AND status = %(status)s AND id > %(after)s
      ORDER BY list_id, status, id LIMIT %(limit)s) AS k
JOIN subscribers s ON s.id = k.id
ORDER BY s.id;

-- name: list_status_counts
SELECT status, COUNT(*) AS n FROM subscribers WHERE list_id = %(list_id)s GROUP BY status;

-- =================================================================== imports

-- name: list_lock
-- Serialises the start of two imports into one list (sendsystem/importer.py).
SELECT id FROM lists WHERE id = %(list_id)s FOR UPDATE;

-- name: imports_unfinished
SELECT id, file, host, pid, state, rows_to_write, rows_written, started_at,
       TIMESTAMPDIFF(SECOND, heartbeat_at, NOW(6)) AS idle
FROM imports WHERE list_id = %(list_id)s AND state IN ('reading', 'writing') ORDER BY id;

-- name: import_interrupted
-- Only if it is still silent: a live import's heartbeat wins the race.
UPDATE imports SET state = 'interrupted', finished_at = NOW(6), message = %(message)s
WHERE id = %(id)s AND state IN ('reading', 'writing')
  AND heartbeat_at < TIMESTAMPADD(SECOND, -%(stale)s, NOW(6));

-- name: import_begin
INSERT INTO imports (list_id, file, host, pid) VALUES (%(list_id)s, %(file)s, %(host)s, %(pid)s);

-- name: import_progress
UPDATE imports SET heartbeat_at = NOW(6), state = %(state)s, rows_read = %(rows_read)s,
       bad_rows = %(bad_rows)s, rows_to_write = %(rows_to_write)s, rows_written = %(rows_written)s
WHERE id = %(id)s;

-- name: import_finish
UPDATE imports SET heartbeat_at = NOW(6), finished_at = NOW(6), state = %(state)s,
       rows_read = %(rows_read)s, bad_rows = %(bad_rows)s, rows_to_write = %(rows_to_write)s,
       rows_written = %(rows_written)s, message = %(message)s
WHERE id = %(id)s;

-- ================================================================ templates

-- name: template_upsert
INSERT INTO templates (name, subject, html, text)
VALUES (%(name)s, %(subject)s, %(html)s, %(text)s)
ON DUPLICATE KEY UPDATE subject = VALUES(subject), html = VALUES(html), text = VALUES(text);

-- name: template_by_name
SELECT id, name, subject, html, text FROM templates WHERE name = %(name)s;

-- ============================================================== newsletters

-- name: newsletter_insert
INSERT INTO newsletters (list_id, template_id, subject, html, text, state, send_at, attachment_bytes)
VALUES (%(list_id)s, %(template_id)s, %(subject)s, %(html)s, %(text)s, 'scheduled', %(send_at)s,
        %(attachment_bytes)s);

-- name: attachment_insert
INSERT INTO attachments (newsletter_id, filename, content_type, size, data)
VALUES (%(newsletter_id)s, %(filename)s, %(content_type)s, %(size)s, %(data)s);

-- name: attachments_for_newsletter
SELECT id, filename, content_type, size, data FROM attachments WHERE newsletter_id = %(id)s ORDER BY id;

-- name: newsletter_get
SELECT n.id, n.list_id, n.subject, n.html, n.text, n.zdict, n.state, n.send_at, n.total,
       n.pause_reason, n.render_failures, n.created_at, n.released_at, n.finished_at,
       l.name AS list_name, l.from_name, l.from_address, l.relay_group,
       (SELECT COUNT(*) FROM attachments a WHERE a.newsletter_id = n.id) AS attachment_count
FROM newsletters n JOIN lists l ON l.id = n.list_id
WHERE n.id = %(id)s;

-- name: newsletter_set_zdict
-- First writer wins: every worker then uses the stored one.
UPDATE newsletters SET zdict = %(zdict)s WHERE id = %(id)s AND zdict IS NULL;

-- name: newsletter_zdict
SELECT zdict FROM newsletters WHERE id = %(id)s;

-- name: newsletter_render_state
SELECT state, render_failures FROM newsletters WHERE id = %(id)s;

-- name: newsletter_set_render_failures
UPDATE newsletters SET render_failures = %(n)s WHERE id = %(id)s;

-- name: newsletters_due
SELECT id, list_id FROM newsletters
WHERE state = 'scheduled' AND (send_at IS NULL OR send_at <= NOW(6))
ORDER BY id;

-- name: newsletter_release_messages
-- Set-based: one statement creates the message rows of a range of subscriber
-- ids (a chunk of the list, never a Python loop over rows). The audience is the
-- list's active subscribers at release time. IGNORE: a chunk re-run after a
-- crash creates only the rows that are missing (uq_messages_newsletter_subscriber).
INSERT IGNORE INTO messages (newsletter_id, subscriber_id)
SELECT %(id)s, s.id FROM subscribers s
WHERE s.list_id = %(list_id)s AND s.status = 'active' AND s.id BETWEEN %(lo)s AND %(hi)s
ORDER BY s.id;

-- name: newsletter_release_claim
-- Take (or renew) the release lease of a scheduled newsletter: free, ours, or
-- expired (its holder died; the cursor says where it got to).
UPDATE newsletters
SET release_holder = %(holder)s, release_until = TIMESTAMPADD(MICROSECOND, %(lease_us)s, NOW(6)),
    release_next = COALESCE(release_next, 0)
WHERE id = %(id)s AND state = 'scheduled'
  AND (release_holder IS NULL OR release_holder = %(holder)s OR release_until < NOW(6));

-- name: kept_counts_add_released
-- The rows newsletter_release_messages created (its row count), counted in
-- the same transaction: INSERTs have no trigger (see migration 014).
INSERT INTO kept_counts (newsletter_id, state, reply_code, slot, n)
VALUES (%(id)s, 'queued', 65535,
        COALESCE(@sendsystem_slot,
                 CONNECTION_ID() * @@auto_increment_increment + @@auto_increment_offset) MOD 64,
        %(n)s)
ON DUPLICATE KEY UPDATE n = n + VALUES(n);

-- name: newsletter_lock_for_release
-- First statement of each chunk's transaction: the chunk goes ahead only if the
-- newsletter is still scheduled and the lease is still ours (a releaser that
-- stalled past its lease and was taken over stops here, so no chunk runs twice
-- at once; one that ran twice anyway would create nothing: INSERT IGNORE).
SELECT state, release_next, release_holder = %(holder)s AND release_until >= NOW(6) AS ours
FROM newsletters WHERE id = %(id)s FOR UPDATE;

-- name: newsletter_release_advance
UPDATE newsletters
SET release_next = %(next)s, total = total + %(created)s,
    release_until = TIMESTAMPADD(MICROSECOND, %(lease_us)s, NOW(6))
WHERE id = %(id)s AND release_holder = %(holder)s;

-- name: newsletter_get_total
SELECT state, total FROM newsletters WHERE id = %(id)s;

-- name: newsletter_mark_released
UPDATE newsletters
SET state = 'running', released_at = NOW(6), release_next = NULL, release_holder = NULL,
    release_until = NULL
WHERE id = %(id)s AND state = 'scheduled' AND release_holder = %(holder)s;

-- name: newsletters_running
SELECT id FROM newsletters WHERE state = 'running' ORDER BY id;

-- name: newsletter_pause
UPDATE newsletters SET state = 'paused', pause_reason = %(reason)s
WHERE id = %(id)s AND state IN ('scheduled', 'running');

-- name: newsletter_resume
-- Resuming also forgets a render-failure streak: the next failures count anew.
UPDATE newsletters SET state = IF(released_at IS NULL, 'scheduled', 'running'), pause_reason = NULL,
    render_failures = 0
WHERE id = %(id)s AND state = 'paused';

-- name: newsletter_cancel
UPDATE newsletters SET state = 'cancelled', finished_at = NOW(6)
WHERE id = %(id)s AND state IN ('scheduled', 'running', 'paused');

-- name: newsletter_cancel_messages
UPDATE messages SET state = 'cancelled', body = NULL, batch_id = NULL, finished_at = NOW(6)
WHERE newsletter_id = %(id)s AND state IN ('queued', 'merged', 'deferred');

-- name: newsletter_unfinished
SELECT EXISTS (
    SELECT 1 FROM messages
    WHERE newsletter_id = %(id)s AND state IN ('queued', 'merged', 'deferred')
) AS unfinished;

-- name: newsletter_mark_done
UPDATE newsletters SET state = 'done', finished_at = NOW(6)
WHERE id = %(id)s AND state = 'running';

-- name: newsletter_merged
-- Kept counts: the newsletter's merged messages not yet sent (the sort balancer's brake).
SELECT COALESCE(SUM(n), 0) AS n FROM kept_counts
WHERE newsletter_id = %(id)s AND state = 'merged';

-- name: newsletter_counts
-- Kept counts (migration 014): the slots and reply codes of a state added up.
SELECT state, SUM(n) AS n FROM kept_counts WHERE newsletter_id = %(id)s
GROUP BY state HAVING SUM(n) <> 0;

-- ================================================================== workers

-- name: worker_register
-- Re-registering the same host/role/name reuses the row; `enabled` is never
-- touched here, so a disabled worker stays disabled across restarts.
INSERT INTO workers (host, role, name, pid, db_node, state, started_at, heartbeat_at)
VALUES (%(host)s, %(role)s, %(name)s, %(pid)s, %(db_node)s, 'starting', NOW(6), NOW(6))
ON DUPLICATE KEY UPDATE id = LAST_INSERT_ID(id), pid = VALUES(pid), db_node = VALUES(db_node),
    state = 'starting', started_at = NOW(6), heartbeat_at = NOW(6);

-- name: worker_get
SELECT id, host, role, name, pid, state, enabled, rate, backlog, processed,
       TIMESTAMPDIFF(MICROSECOND, heartbeat_at, NOW(6)) / 1000000 AS heartbeat_age
FROM workers WHERE id = %(id)s;

-- name: worker_heartbeat
UPDATE workers SET heartbeat_at = NOW(6), state = %(state)s, rate = %(rate)s,
    backlog = %(backlog)s, processed = %(processed)s, db_node = %(db_node)s
WHERE id = %(id)s;

-- name: worker_set_state
UPDATE workers SET state = %(state)s, heartbeat_at = NOW(6) WHERE id = %(id)s;

-- name: worker_set_enabled
UPDATE workers SET enabled = %(enabled)s WHERE id = %(id)s;

-- name: worker_find
SELECT id, host, role, name, enabled, state FROM workers
WHERE id = %(id)s OR name = %(name)s ORDER BY id;

-- name: workers_all
SELECT id, host, role, name, pid, db_node, state, enabled, rate, backlog, processed, started_at,
       TIMESTAMPDIFF(MICROSECOND, heartbeat_at, NOW(6)) / 1000000 AS heartbeat_age
FROM workers ORDER BY role, host, name;

-- name: workers_for_role
SELECT id, name, state, enabled, rate,
       TIMESTAMPDIFF(MICROSECOND, heartbeat_at, NOW(6)) / 1000000 AS heartbeat_age
FROM workers WHERE role = %(role)s;

-- ================================================================ balancers

-- The balancer lease (sendsystem/roles/balancer.py): one row per kind,
-- taken and renewed with ordinary transactional UPDATEs on the database's
-- clock. Not GET_LOCK: that is node-local on Galera and frees only when the
-- holder's TCP connection closes.

-- name: lease_seed
INSERT IGNORE INTO leases (kind) VALUES (%(kind)s);

-- name: lease_take
-- Free, expired, or ours from a previous life (same worker row, the file
-- lock guarantees the old process is gone): a new epoch fences the old one.
UPDATE leases SET holder = %(holder)s, epoch = epoch + 1, taken_at = NOW(6),
    expires_at = TIMESTAMPADD(MICROSECOND, %(length_us)s, NOW(6))
WHERE kind = %(kind)s AND (holder IS NULL OR expires_at < NOW(6) OR holder = %(holder)s);

-- name: lease_renew
-- Matches only the holder with the current epoch of a lease not yet expired;
-- 0 rows = the lease is lost. Runs first in every assignment transaction.
UPDATE leases SET expires_at = TIMESTAMPADD(MICROSECOND, %(length_us)s, NOW(6))
WHERE kind = %(kind)s AND holder = %(holder)s AND epoch = %(epoch)s AND expires_at >= NOW(6);

-- name: lease_release
UPDATE leases SET holder = NULL, expires_at = NOW(6)
WHERE kind = %(kind)s AND holder = %(holder)s AND epoch = %(epoch)s;

-- name: lease_get
SELECT kind, holder, epoch, expires_at,
       TIMESTAMPDIFF(MICROSECOND, NOW(6), expires_at) / 1000000 AS expires_in
FROM leases WHERE kind = %(kind)s;

-- name: leases_all
SELECT l.kind, l.holder, l.epoch, l.taken_at, w.name AS holder_name, w.host AS holder_host,
       TIMESTAMPDIFF(MICROSECOND, NOW(6), l.expires_at) / 1000000 AS expires_in
FROM leases l LEFT JOIN workers w ON w.id = l.holder ORDER BY l.kind;

-- name: backlog_by_worker
SELECT b.worker_id, COUNT(m.id) AS backlog
FROM batches b JOIN messages m ON m.batch_id = b.id
WHERE b.role = %(role)s AND b.state = 'assigned'
GROUP BY b.worker_id;

-- name: batches_reclaimable
-- Batches of workers that stopped or whose heartbeat is older than the timeout.
SELECT b.id, b.worker_id, w.name
FROM batches b JOIN workers w ON w.id = b.worker_id
WHERE b.role = %(role)s AND b.state = 'assigned'
  AND (w.state = 'stopped'
       OR w.heartbeat_at < TIMESTAMPADD(MICROSECOND, -%(timeout_us)s, NOW(6)));

-- name: batch_release_messages
-- Run after batch_mark_reclaimed, in the same transaction, only when it changed the batch.
UPDATE messages SET batch_id = NULL WHERE batch_id = %(batch)s;

-- name: batch_mark_reclaimed
-- The ownership token of a batch is its id while its state is 'assigned': a
-- reclaimed batch never becomes assigned again, and its messages go out under
-- new batch ids. The heartbeat is read again here, under lock (a multi-table
-- UPDATE locks the worker row it reads), so a worker whose heartbeat commits
-- first keeps its batch, and a worker that heartbeats and then checks
-- ownership can never be overtaken by a reclaim decided on its old heartbeat.
-- Writing w.reclaimed_at makes the same hold on Galera (node-local locks): a
-- concurrent heartbeat on another node conflicts at certification.
UPDATE batches b JOIN workers w ON w.id = b.worker_id
SET b.state = 'reclaimed', b.finished_at = NOW(6), w.reclaimed_at = NOW(6)
WHERE b.id = %(batch)s AND b.state = 'assigned'
  AND (w.state = 'stopped'
       OR w.heartbeat_at < TIMESTAMPADD(MICROSECOND, -%(timeout_us)s, NOW(6)));

-- name: batch_insert
INSERT INTO batches (role, worker_id, newsletter_id) VALUES (%(role)s, %(worker)s, %(newsletter)s);

-- name: batch_set_size
UPDATE batches SET size = %(size)s WHERE id = %(batch)s;

-- name: batch_delete_empty
DELETE FROM batches WHERE id = %(batch)s AND size = 0;

-- name: sort_ready_count
SELECT COUNT(*) AS n FROM (
    SELECT 1 FROM messages
    WHERE newsletter_id = %(newsletter)s AND state = 'queued' AND batch_id IS NULL
    LIMIT %(cap)s
) AS ready;

-- name: sort_assign
-- One set-based statement per batch. The balancer holds the lease, and
-- `batch_id IS NULL` in the same statement means no message goes to two workers.
-- FORCE INDEX: left to itself the optimizer chose an index_merge plus sort
-- that locked every unassigned row and deadlocked with the workers (1213);
-- the pick index alone locks only the rows taken, oldest (lowest id) first,
-- since the index ends in the primary key.
UPDATE messages FORCE INDEX (ix_messages_pick) SET batch_id = %(batch)s
WHERE newsletter_id = %(newsletter)s AND state = 'queued' AND batch_id IS NULL
LIMIT %(n)s;

-- name: send_ready_count
SELECT COUNT(*) AS n FROM (
    SELECT 1 FROM messages
    WHERE newsletter_id = %(newsletter)s AND state = 'merged' AND batch_id IS NULL
    LIMIT %(cap)s
) AS ready;

-- name: send_retry_ready_count
SELECT COUNT(*) AS n FROM (
    SELECT 1 FROM messages
    WHERE newsletter_id = %(newsletter)s AND state = 'deferred' AND batch_id IS NULL
      AND next_attempt_at <= NOW(6)
    LIMIT %(cap)s
) AS ready;

-- name: send_assign
UPDATE messages FORCE INDEX (ix_messages_pick) SET batch_id = %(batch)s
WHERE newsletter_id = %(newsletter)s AND state = 'merged' AND batch_id IS NULL
LIMIT %(n)s;

-- name: send_assign_retries
UPDATE messages FORCE INDEX (ix_messages_pick) SET batch_id = %(batch)s
WHERE newsletter_id = %(newsletter)s AND state = 'deferred' AND batch_id IS NULL
  AND next_attempt_at <= NOW(6)
LIMIT %(n)s;

-- name: pending_for_role
-- For --once: is there anything left that could still reach this role?
-- A scheduled newsletter that is due counts: the balancer is about to release it.
SELECT EXISTS (
    SELECT 1 FROM messages m JOIN newsletters n ON n.id = m.newsletter_id
    WHERE n.state = 'running' AND m.state IN %(states)s
      AND (m.state <> 'deferred' OR m.next_attempt_at <= NOW(6))
) OR EXISTS (
    SELECT 1 FROM newsletters WHERE state = 'scheduled' AND (send_at IS NULL OR send_at <= NOW(6))
) AS pending;

-- name: batches_outstanding
SELECT COUNT(*) AS n FROM batches WHERE role = %(role)s AND state = 'assigned';

-- ================================================================== workers' own batches

-- name: my_batches
SELECT id, newsletter_id FROM batches
WHERE worker_id = %(worker)s AND state = 'assigned' ORDER BY id;

-- name: my_backlog
SELECT COUNT(*) AS n FROM messages m JOIN batches b ON b.id = m.batch_id
WHERE b.worker_id = %(worker)s AND b.state = 'assigned';

-- name: batch_mark_done
UPDATE batches SET state = 'done', finished_at = NOW(6) WHERE id = %(batch)s AND state = 'assigned';

-- name: my_batches_hand_back_messages
UPDATE messages m JOIN batches b ON b.id = m.batch_id SET m.batch_id = NULL
WHERE b.worker_id = %(worker)s AND b.state = 'assigned';

-- name: batch_hand_back_messages
-- A worker gives back what it has not done of one batch (its newsletter paused
-- itself); the rows stay queued for when the newsletter is resumed.
UPDATE messages SET batch_id = NULL WHERE batch_id = %(batch)s AND state = 'queued';

-- name: my_batches_mark_reclaimed
UPDATE batches SET state = 'reclaimed', finished_at = NOW(6)
WHERE worker_id = %(worker)s AND state = 'assigned';

-- ============================================================== sort worker

-- name: sort_batch_messages
-- `blocked`: the address, its @domain, or the salted hash `subscriber forget`
-- leaves of a forgotten address ('sha256:' + SHA2(salt + lower-case address);
-- sendsystem/forget.py), so a forgotten person imported again is never mailed.
-- Three EXISTS, each one unique-key lookup: an OR inside one subquery made
-- MariaDB scan the whole blocklist index for every message (measured 2 s per
-- 2,000 messages with 5,500 entries, 22 ms this way).
SELECT m.id, m.subscriber_id, s.list_id, s.email, s.fields, s.status,
       (EXISTS (SELECT 1 FROM blocklist b WHERE b.pattern = s.email)
        OR EXISTS (SELECT 1 FROM blocklist b WHERE b.pattern = CONCAT('@', s.domain))
        OR EXISTS (SELECT 1 FROM blocklist b
                   WHERE b.pattern = CONCAT('sha256:', SHA2(CONCAT(
                       (SELECT p.salt FROM privacy_salt p WHERE p.id = 1), LOWER(s.email)), 256))))
           AS blocked
FROM messages m JOIN subscribers s ON s.id = m.subscriber_id
WHERE m.batch_id = %(batch)s AND m.state = 'queued'
ORDER BY m.id LIMIT %(limit)s;

-- name: sort_mark
-- values: id, state, body, detail
-- One statement per chunk. Only rows still ours are written: a batch
-- reclaimed from us (we were thought dead) is not written twice.
UPDATE messages m JOIN (%(values)s) AS v ON v.id = m.id
SET m.state = v.state, m.body = v.body, m.detail = v.detail, m.sort_worker_id = %(worker)s,
    m.merged_at = NOW(6), m.finished_at = IF(v.state = 'merged', NULL, NOW(6)), m.batch_id = NULL
WHERE m.batch_id = %(batch)s AND m.state = 'queued';

-- ============================================================== send worker

-- name: send_batch_messages
-- `blocked` as in sort_batch_messages.
SELECT m.id, m.newsletter_id, m.subscriber_id, m.body, m.attempts, s.email, s.status,
       TIMESTAMPDIFF(SECOND, COALESCE(m.merged_at, m.next_attempt_at, NOW(6)), NOW(6)) AS age,
       (EXISTS (SELECT 1 FROM blocklist b WHERE b.pattern = s.email)
        OR EXISTS (SELECT 1 FROM blocklist b WHERE b.pattern = CONCAT('@', s.domain))
        OR EXISTS (SELECT 1 FROM blocklist b
                   WHERE b.pattern = CONCAT('sha256:', SHA2(CONCAT(
                       (SELECT p.salt FROM privacy_salt p WHERE p.id = 1), LOWER(s.email)), 256))))
           AS blocked
FROM messages m JOIN subscribers s ON s.id = m.subscriber_id
WHERE m.batch_id = %(batch)s AND m.state IN ('merged', 'deferred')
ORDER BY m.id LIMIT %(limit)s;

-- name: send_mark_sent
-- values: id, code, reply, message_id
-- A 250 is the truth: it wins over any state but sent/bounced (even a cancel
-- that came while the message was on the wire), and it is the one outcome
-- written whether or not the row is still ours: a fenced worker's late 250
-- for a reclaimed row records what happened, with this worker as the sender,
-- and puts the row in no batch (it is final), so it steals nothing back; if
-- a peer has not sent it yet, the peer's next fetch no longer sees it.
UPDATE messages m JOIN (%(values)s) AS v ON v.id = m.id
SET m.state = 'sent', m.body = NULL, m.batch_id = NULL, m.send_worker_id = %(worker)s,
    m.finished_at = NOW(6), m.attempts = m.attempts + 1, m.reply_code = v.code,
    m.reply = v.reply, m.message_id = COALESCE(v.message_id, m.message_id)
WHERE m.state NOT IN ('sent', 'bounced');

-- name: send_mark_failed
-- values: id, code, reply, message_id
-- Every outcome but a 250 is written only for rows still ours (in a batch of
-- this worker that is still assigned): a 5xx or 4xx that a fenced worker got
-- for a reclaimed row is dropped, and the row's new owner gets its own answer.
UPDATE messages m JOIN (%(values)s) AS v ON v.id = m.id
JOIN batches b ON b.id = m.batch_id AND b.worker_id = %(worker)s AND b.state = 'assigned'
SET m.state = 'failed', m.body = NULL, m.batch_id = NULL, m.send_worker_id = %(worker)s,
    m.finished_at = NOW(6), m.attempts = m.attempts + 1, m.reply_code = v.code,
    m.reply = v.reply, m.message_id = COALESCE(v.message_id, m.message_id)
WHERE m.state IN ('merged', 'deferred');

-- name: send_mark_deferred
-- values: id, code, reply, delay_us
UPDATE messages m JOIN (%(values)s) AS v ON v.id = m.id
JOIN batches b ON b.id = m.batch_id AND b.worker_id = %(worker)s AND b.state = 'assigned'
SET m.state = 'deferred', m.batch_id = NULL, m.send_worker_id = %(worker)s,
    m.attempts = m.attempts + 1, m.deferrals = m.deferrals + 1, m.reply_code = v.code,
    m.reply = v.reply, m.next_attempt_at = TIMESTAMPADD(MICROSECOND, v.delay_us, NOW(6))
WHERE m.state IN ('merged', 'deferred');

-- name: send_mark_skipped
-- values: id, detail
UPDATE messages m JOIN (%(values)s) AS v ON v.id = m.id
JOIN batches b ON b.id = m.batch_id AND b.worker_id = %(worker)s AND b.state = 'assigned'
SET m.state = 'skipped', m.body = NULL, m.batch_id = NULL, m.send_worker_id = %(worker)s,
    m.finished_at = NOW(6), m.detail = v.detail
WHERE m.state IN ('merged', 'deferred');

-- ================================================================ blocklist

-- name: block_add
INSERT IGNORE INTO blocklist (pattern, reason) VALUES (%(pattern)s, %(reason)s);

-- name: block_remove
DELETE FROM blocklist WHERE pattern = %(pattern)s;

-- name: block_list
SELECT pattern, reason, created_at FROM blocklist ORDER BY pattern;

-- name: block_remove_forgotten
-- `block remove ADDRESS` also lifts the hashed entry `subscriber forget` left for it.
DELETE b FROM blocklist b JOIN privacy_salt p ON p.id = 1
WHERE b.pattern = CONCAT('sha256:', SHA2(CONCAT(p.salt, LOWER(%(pattern)s)), 256));

-- ============================================================ status, stats

-- name: newsletters_in_progress
SELECT n.id, n.subject, n.state, n.total, n.send_at, n.pause_reason, n.released_at,
       l.name AS list_name
FROM newsletters n JOIN lists l ON l.id = n.list_id
WHERE n.state IN ('scheduled', 'running', 'paused')
   OR n.finished_at >= TIMESTAMPADD(MINUTE, -10, NOW(6))
ORDER BY n.id;

-- name: newsletter_recent_sent
-- Delivered in the last %(seconds)s seconds, counted in whole seconds (so up to
-- one second more than asked).
SELECT COALESCE(SUM(sent), 0) AS n FROM kept_timeline
WHERE newsletter_id = %(id)s AND resolution = 1
  AND bucket >= TO_SECONDS(NOW(6)) - 62167219200 - %(seconds)s;

-- name: stats_sort_workers
SELECT w.name, w.host, k.messages,
       TIMESTAMPDIFF(MICROSECOND, k.first_at, k.last_at) / 1000000 AS span
FROM kept_sort_workers k JOIN workers w ON w.id = k.worker_id
WHERE k.newsletter_id = %(id)s AND k.messages > 0
ORDER BY w.name;

-- name: stats_send_workers
-- Sent, failed or bounced per send worker, and the span of their finished_at,
-- from the hourly timeline rows (their first/last are exact).
SELECT w.name, w.host, SUM(k.sent + k.failed) AS messages,
       TIMESTAMPDIFF(MICROSECOND, MIN(k.first_at), MAX(k.last_at)) / 1000000 AS span
FROM kept_timeline k JOIN workers w ON w.id = k.worker_id
WHERE k.newsletter_id = %(id)s AND k.resolution = 3600
GROUP BY w.id, w.name, w.host HAVING SUM(k.sent + k.failed) > 0
ORDER BY w.name;

-- name: stats_timeline
-- Delivered per minute (seconds since 1970) and worker id, in primary-key order:
-- a range read, no join, no temporary table; stats.py names the workers (the
-- list is as long as the send in minutes times its workers).
SELECT bucket AS minute, worker_id, sent FROM kept_timeline
WHERE newsletter_id = %(id)s AND resolution = 60 AND sent <> 0;

-- name: worker_names
SELECT id, name FROM workers;

-- name: stats_sent_span
-- The first and last second anything was delivered, in seconds since 1970
-- (index order: a row or two read each).
SELECT (SELECT bucket FROM kept_timeline
        WHERE newsletter_id = %(id)s AND resolution = 1 AND sent > 0
        ORDER BY bucket LIMIT 1) AS first,
       (SELECT bucket FROM kept_timeline
        WHERE newsletter_id = %(id)s AND resolution = 1 AND sent > 0
        ORDER BY bucket DESC LIMIT 1) AS last;

-- name: stats_timeline_buckets
-- Delivered per worker per bucket of %(bucket)s seconds from %(start)s (seconds
-- since 1970), read
-- from the kept rows of %(resolution)s seconds (the coarsest that divides the
-- bucket: stats.timeline_resolution). stats.py picks the bucket from the
-- send's length so there are at most ~300 of them.
SELECT (k.bucket - %(start)s) DIV %(bucket)s AS bucket, w.name AS worker, SUM(k.sent) AS sent
FROM kept_timeline k JOIN workers w ON w.id = k.worker_id
WHERE k.newsletter_id = %(id)s AND k.resolution = %(resolution)s AND k.bucket >= %(start)s
GROUP BY (k.bucket - %(start)s) DIV %(bucket)s, w.name HAVING SUM(k.sent) > 0
ORDER BY 1, w.name;

-- name: stats_replies
SELECT reply_code AS code, MIN(sample) AS reply, SUM(n) AS count
FROM kept_counts WHERE newsletter_id = %(id)s AND reply_code <> 65535
GROUP BY reply_code HAVING SUM(n) > 0
ORDER BY count DESC, reply_code LIMIT 10;

-- name: stats_failures
-- Why messages failed: the relay's reply, or the merge's reason. Ten entries
-- of ix_kept_failures_top, however many reasons there are.
SELECT reason, n AS count FROM kept_failures
WHERE newsletter_id = %(id)s AND n > 0
ORDER BY n DESC, reason LIMIT 10;

-- name: stats_deferrals
SELECT COALESCE(SUM(deferrals), 0) AS n FROM kept_counts WHERE newsletter_id = %(id)s;

-- name: stats_bounces
-- Unverified reports (verified = 0) are counted apart: they changed nothing.
SELECT kind, verified, COUNT(*) AS n
FROM bounces WHERE newsletter_id = %(id)s GROUP BY kind, verified;

-- name: bounces_unverified_recent
SELECT COUNT(*) AS n FROM bounces
WHERE verified = 0 AND received_at >= TIMESTAMPADD(HOUR, -%(hours)s, NOW(6));

-- name: stats_span
-- From the first merge to the last merge, send outcome or cancel (kept tables:
-- the sort workers' and the send workers' first/last marks; a sort worker's
-- skipped and failed messages finish when they are merged). A send-time
-- skip (a recipient gone since the merge) finishing last is not seen.
SELECT TIMESTAMPDIFF(MICROSECOND,
           (SELECT MIN(first_at) FROM kept_sort_workers WHERE newsletter_id = n.id),
           GREATEST(COALESCE((SELECT MAX(last_at) FROM kept_sort_workers
                              WHERE newsletter_id = n.id), '1970-01-01'),
                    COALESCE((SELECT MAX(last_at) FROM kept_timeline
                              WHERE newsletter_id = n.id AND resolution = 3600), '1970-01-01'),
                    IF(n.state = 'cancelled', n.finished_at, '1970-01-01'))) / 1000000
           AS duration
FROM newsletters n WHERE n.id = %(id)s;

-- name: stats_bounces_between
-- The bounce rows of a newsletter received in [since, before): what purge folds
-- into the summary (since = the old cutoff) and what stats adds on top of it.
SELECT kind, verified, COUNT(*) AS n
FROM bounces
WHERE newsletter_id = %(id)s AND received_at >= %(since)s AND received_at < %(before)s
GROUP BY kind, verified;

-- ============================================================= retention

-- name: summary_get
SELECT newsletter_id, facts, cutoff, summarized_at, purged_at, messages_purged, bounces_purged
FROM newsletter_summaries WHERE newsletter_id = %(id)s;

-- name: summary_get_for_update
SELECT newsletter_id, facts, cutoff FROM newsletter_summaries
WHERE newsletter_id = %(id)s FOR UPDATE;

-- name: summary_insert
-- INSERT IGNORE: two purges racing on one newsletter keep the first summary.
INSERT IGNORE INTO newsletter_summaries (newsletter_id, facts, cutoff, summarized_at)
VALUES (%(id)s, %(facts)s, %(cutoff)s, NOW(6));

-- name: summary_fold_bounces
UPDATE newsletter_summaries SET facts = %(facts)s, cutoff = %(cutoff)s
WHERE newsletter_id = %(id)s;

-- name: summary_mark_purged
UPDATE newsletter_summaries
SET purged_at = NOW(6), messages_purged = messages_purged + %(messages)s,
    bounces_purged = bounces_purged + %(bounces)s
WHERE newsletter_id = %(id)s;

-- name: retention_cutoff
-- The database's clock decides what is old, as it does for heartbeats.
SELECT TIMESTAMPADD(MICROSECOND, -%(seconds)s * 1000000, NOW(6)) AS cutoff;

-- name: retention_candidates
-- Finished (done or cancelled) before the cut-off. Newsletters are few; the
-- per-newsletter work is bounded by the chunked deletes.
SELECT n.id, n.state, n.subject, n.finished_at, s.purged_at, s.cutoff AS summary_cutoff
FROM newsletters n LEFT JOIN newsletter_summaries s ON s.newsletter_id = n.id
WHERE n.state IN ('done', 'cancelled') AND n.finished_at < %(cutoff)s
ORDER BY n.id;

-- name: retention_message_span
-- One pass over the newsletter's index entries; the deletes then walk the
-- primary key in ranges, so each chunk locks at most `chunk` rows.
SELECT MIN(id) AS lo, MAX(id) AS hi, COUNT(*) AS n FROM messages WHERE newsletter_id = %(id)s;

-- name: retention_old_bounces
SELECT COUNT(*) AS n FROM bounces WHERE newsletter_id = %(id)s AND received_at < %(cutoff)s;

-- name: retention_delete_messages
DELETE FROM messages
WHERE id >= %(lo)s AND id < %(lo)s + %(chunk)s AND newsletter_id = %(id)s;

-- name: retention_delete_bounces
DELETE FROM bounces WHERE newsletter_id = %(id)s AND received_at < %(cutoff)s
ORDER BY id LIMIT %(chunk)s;

-- ============================================================ recipients

-- name: bounce_insert
-- The newsletter follows from the message when there is one; an unverified
-- report has none and passes what it loosely claims (or NULL).
INSERT INTO bounces (newsletter_id, message_id, subscriber_id, email, kind, verified, evidence,
                     status, diagnostic)
VALUES (COALESCE(%(newsletter_id)s,
                 (SELECT m.newsletter_id FROM messages m WHERE m.id = %(message_id)s)),
        %(message_id)s, %(subscriber_id)s, %(email)s, %(kind)s, %(verified)s, %(evidence)s,
        %(status)s, %(diagnostic)s);

-- name: bounce_tally
-- [bounce] scope = address: the address's verified bounces on every list.
SELECT COALESCE(SUM(kind = 'hard'), 0) AS hard,
       COALESCE(SUM(kind = 'soft' AND received_at >= TIMESTAMPADD(DAY, -%(days)s, NOW(6))), 0)
           AS soft
FROM bounces WHERE email = %(email)s AND verified = 1;

-- name: bounce_tally_subscriber
-- [bounce] scope = list: only this subscription's verified bounces count.
SELECT COALESCE(SUM(kind = 'hard'), 0) AS hard,
       COALESCE(SUM(kind = 'soft' AND received_at >= TIMESTAMPADD(DAY, -%(days)s, NOW(6))), 0)
           AS soft
FROM bounces WHERE subscriber_id = %(subscriber_id)s AND verified = 1;

-- name: subscribers_mark_bounced
-- [bounce] scope = address: every subscription of the address.
UPDATE subscribers SET status = 'bounced', left_at = NOW(), left_reason = %(reason)s
WHERE email = %(email)s AND status = 'active';

-- name: subscriber_mark_bounced
-- [bounce] scope = list: the one subscription the bounced message went to.
UPDATE subscribers SET status = 'bounced', left_at = NOW(), left_reason = %(reason)s
WHERE id = %(id)s AND status = 'active';

-- name: message_mark_bounced
UPDATE messages SET state = 'bounced' WHERE id = %(id)s AND state = 'sent';

-- name: subscriber_unsubscribe
UPDATE subscribers SET status = 'unsubscribed', left_at = NOW(), left_reason = %(reason)s
WHERE id = %(id)s AND list_id = %(list_id)s AND status = 'active';

-- name: subscriber_complained
-- A complaint is the strongest reason to leave: it replaces an unsubscribe or
-- a bounce, and left_at / left_reason with it (never a first complaint's).
UPDATE subscribers SET left_at = NOW(), left_reason = %(reason)s, status = 'complained'
WHERE id = %(id)s AND status <> 'complained';

-- name: subscriber_with_list
SELECT s.id, s.email, s.status, l.id AS list_id, l.name AS list_name
FROM subscribers s JOIN lists l ON l.id = s.list_id
WHERE s.id = %(id)s AND s.list_id = %(list_id)s;

-- name: message_for_bounce
SELECT m.id, m.newsletter_id, m.state, m.subscriber_id, s.email, s.list_id
FROM messages m JOIN subscribers s ON s.id = m.subscriber_id
WHERE m.id = %(id)s;

-- name: recent_message_by_email
-- A report that only names an address: the newsletter it most likely is
-- about, for counting it (unverified) in `stats`. Never acted upon.
SELECT m.id, m.newsletter_id, m.state, m.subscriber_id, s.email, s.list_id
FROM subscribers s JOIN messages m ON m.subscriber_id = s.id
WHERE s.email = %(email)s AND m.state IN ('sent', 'bounced')
  AND m.finished_at >= TIMESTAMPADD(DAY, -%(days)s, NOW(6))
ORDER BY m.finished_at DESC LIMIT 1;

-- ===== bounce intake

-- name: bounce_message_lock
-- Serialises two intakes of the same bounce (an MTA retry racing a scan).
SELECT id FROM messages WHERE id = %(id)s FOR UPDATE;

-- name: bounce_seen_for_message
-- One bounce of a kind per message: a re-delivered bounce or a second delay
-- warning for the same message changes nothing.
SELECT EXISTS (
    SELECT 1 FROM bounces WHERE message_id = %(message_id)s AND kind = %(kind)s
) AS seen;

-- name: list_subscriber_id_range
SELECT MIN(id) AS lo, MAX(id) AS hi FROM subscribers WHERE list_id = %(list_id)s;

-- ==================================================================== relays

-- name: relay_usage_seed
-- The bucket starts full (burst) on first use of a relay.
INSERT IGNORE INTO relay_usage (relay, tokens, stamp, day, used_today)
VALUES (%(relay)s, %(burst)s, COALESCE(%(now)s, NOW(6)), DATE(COALESCE(%(now)s, NOW(6))), 0);

-- name: relay_claim
-- Take n tokens of a relay's cluster-wide bucket, all or nothing, on the
-- database's clock (or %(now)s, which tests set): refill at `rate` up to
-- `burst` since `stamp`, and count them against today's quota. One row,
-- one conditional UPDATE: concurrent workers serialise on the row lock,
-- so the tokens granted in any interval never exceed burst + rate x interval.
-- SET runs left to right: `tokens` reads the old `stamp`, `used_today` the
-- old `day`.
UPDATE relay_usage u JOIN (SELECT COALESCE(%(now)s, NOW(6)) AS t) AS c
SET u.tokens = LEAST(%(burst)s, u.tokens + GREATEST(0, TIMESTAMPDIFF(MICROSECOND, u.stamp, c.t))
                     / 1e6 * %(rate)s) - %(n)s,
    u.stamp = GREATEST(u.stamp, c.t),
    u.used_today = IF(u.day = DATE(c.t), u.used_today, 0) + %(n)s,
    u.day = DATE(c.t)
WHERE u.relay = %(relay)s
  AND LEAST(%(burst)s, u.tokens + GREATEST(0, TIMESTAMPDIFF(MICROSECOND, u.stamp, c.t))
            / 1e6 * %(rate)s) >= %(n)s
  AND IF(u.day = DATE(c.t), u.used_today, 0) + %(n)s <= %(quota)s;

-- name: relay_peek
-- What relay_claim would see now: tokens available and messages claimed today.
SELECT LEAST(%(burst)s, u.tokens + GREATEST(0, TIMESTAMPDIFF(MICROSECOND, u.stamp, c.t))
             / 1e6 * %(rate)s) AS tokens,
       IF(u.day = DATE(c.t), u.used_today, 0) AS used_today
FROM relay_usage u JOIN (SELECT COALESCE(%(now)s, NOW(6)) AS t) AS c
WHERE u.relay = %(relay)s;

-- name: relay_usage_all
SELECT relay, IF(day = CURRENT_DATE(), used_today, 0) AS used_today FROM relay_usage;

-- name: relay_health_put
INSERT INTO relay_health (relay, worker_id, relay_group, health, last_error, rate, slow_rate,
                          sent, deferred, failed, updated_at)
VALUES (%(relay)s, %(worker)s, %(group)s, %(health)s, %(last_error)s, %(rate)s, %(slow_rate)s,
        %(sent)s, %(deferred)s, %(failed)s, NOW(6))
ON DUPLICATE KEY UPDATE relay_group = VALUES(relay_group), health = VALUES(health),
    last_error = VALUES(last_error), rate = VALUES(rate), slow_rate = VALUES(slow_rate),
    sent = VALUES(sent), deferred = VALUES(deferred), failed = VALUES(failed),
    updated_at = VALUES(updated_at);

-- name: relay_health_all
-- What live send workers last reported (heartbeat younger than %(timeout)s seconds).
SELECT h.relay, h.worker_id, w.name AS worker, h.relay_group, h.health, h.last_error, h.rate,
       h.slow_rate, h.sent, h.deferred, h.failed,
       TIMESTAMPDIFF(MICROSECOND, h.updated_at, NOW(6)) / 1e6 AS age
FROM relay_health h JOIN workers w ON w.id = h.worker_id
WHERE w.state <> 'stopped'
  AND TIMESTAMPDIFF(MICROSECOND, w.heartbeat_at, NOW(6)) / 1e6 <= %(timeout)s
ORDER BY h.relay, h.worker_id;

-- name: list_set_relay_group
UPDATE lists SET relay_group = %(group)s WHERE name = %(name)s;

-- name: newsletter_retry_failed
-- Failed messages go back to the sort worker (their body was purged when they
-- failed): only for recipients still active, not blocked, on a newsletter
-- that is not cancelled; %(pattern)s is a LIKE pattern on the reply.
UPDATE messages m JOIN subscribers s ON s.id = m.subscriber_id
JOIN newsletters n ON n.id = m.newsletter_id
SET m.state = 'queued', m.batch_id = NULL, m.body = NULL, m.finished_at = NULL,
    m.next_attempt_at = NULL, m.merged_at = NULL
WHERE m.newsletter_id = %(id)s AND m.state = 'failed' AND s.status = 'active'
  AND n.state IN ('running', 'done', 'paused')
  AND COALESCE(m.reply, '') LIKE %(pattern)s
  AND NOT EXISTS (SELECT 1 FROM blocklist b WHERE b.pattern = s.email)
  AND NOT EXISTS (SELECT 1 FROM blocklist b WHERE b.pattern = CONCAT('@', s.domain))
  AND NOT EXISTS (SELECT 1 FROM blocklist b
                  WHERE b.pattern = CONCAT('sha256:', SHA2(CONCAT(
                      (SELECT p.salt FROM privacy_salt p WHERE p.id = 1), LOWER(s.email)), 256)))
  AND NOT EXISTS (SELECT 1 FROM bounces x WHERE x.message_id = m.id);

-- name: newsletter_reopen
UPDATE newsletters SET state = 'running', finished_at = NULL
WHERE id = %(id)s AND state = 'done';

-- =============================================================== monitoring
-- `sendsystem metrics` and `sendsystem check` (sendsystem/monitoring.py).

-- name: metrics_running_counts
-- Messages by state of running newsletters only (bounded label cardinality).
SELECT k.newsletter_id, k.state, SUM(k.n) AS n
FROM newsletters n JOIN kept_counts k ON k.newsletter_id = n.id
WHERE n.state = 'running'
GROUP BY k.newsletter_id, k.state;

-- name: metrics_deliveries
-- Every message there is by state, and the deferrals they went through:
-- counters that survive restarts because they are the rows themselves, read
-- from the kept counts (a finished newsletter's are folded into one row per
-- state and reply code, see keptcounts.compact).
SELECT state, SUM(n) AS n, COALESCE(SUM(deferrals), 0) AS deferrals
FROM kept_counts GROUP BY state;

-- name: metrics_purged_deliveries
-- The same counts for newsletters whose rows `purge` deleted, from their
-- summaries, so the delivery counters do not drop when a purge runs.
SELECT COALESCE(SUM(JSON_VALUE(facts, '$.counts.sent')), 0) AS sent,
       COALESCE(SUM(JSON_VALUE(facts, '$.counts.bounced')), 0) AS bounced,
       COALESCE(SUM(JSON_VALUE(facts, '$.counts.failed')), 0) AS failed,
       COALESCE(SUM(JSON_VALUE(facts, '$.counts.skipped')), 0) AS skipped,
       COALESCE(SUM(JSON_VALUE(facts, '$.counts.cancelled')), 0) AS cancelled,
       COALESCE(SUM(JSON_VALUE(facts, '$.deferrals')), 0) AS deferrals
FROM newsletter_summaries WHERE purged_at IS NOT NULL;

-- name: metrics_bounces
-- Bounce and complaint reports by kind, signed evidence (verified = 1) apart.
SELECT kind, verified, COUNT(*) AS n FROM bounces GROUP BY kind, verified;

-- name: check_running
-- Each running newsletter: work a worker could take now (queued and merged from
-- the kept counts, plus the retries that are due: those are read from the
-- deferred rows, ix_messages_pick) and the last moment anything moved (a
-- merge, a send outcome, the release; the kept sort workers and timeline).
SELECT n.id,
       COALESCE((SELECT SUM(k.n) FROM kept_counts k
                 WHERE k.newsletter_id = n.id AND k.state IN ('queued', 'merged')), 0)
       + (SELECT COUNT(*) FROM messages p
          WHERE p.newsletter_id = n.id AND p.state = 'deferred'
            AND p.next_attempt_at <= NOW(6)) AS pending,
       TIMESTAMPDIFF(MICROSECOND,
           GREATEST(COALESCE((SELECT MAX(f.last_at) FROM kept_timeline f
                              WHERE f.newsletter_id = n.id AND f.resolution = 3600),
                             n.released_at),
                    COALESCE((SELECT MAX(g.last_at) FROM kept_sort_workers g
                              WHERE g.newsletter_id = n.id), n.released_at),
                    n.released_at),
           NOW(6)) / 1e6 AS idle_seconds
FROM newsletters n WHERE n.state = 'running' ORDER BY n.id;

-- name: check_deferred
-- The deferred backlog of running newsletters: how many, and how long the
-- oldest has waited since it was ready to send.
SELECT COUNT(*) AS n,
       MAX(TIMESTAMPDIFF(MICROSECOND, COALESCE(m.merged_at, n.released_at), NOW(6))) / 1e6
           AS oldest_seconds
FROM newsletters n JOIN messages m ON m.newsletter_id = n.id
WHERE n.state = 'running' AND m.state = 'deferred';

-- name: check_last_finished
SELECT id FROM newsletters WHERE state = 'done' ORDER BY finished_at DESC, id DESC LIMIT 1;

-- ================================================================ tracking
-- Opt-in open and click tracking (sendsystem/tracking/, migration 014).

-- name: list_set_track
UPDATE lists SET track = %(track)s WHERE name = %(name)s;

-- name: list_track_all
SELECT name, track FROM lists ORDER BY name;

-- name: newsletter_set_track
-- At enqueue, in its transaction: the newsletter keeps what it tracks, like its
-- template copy; %(track)s NULL takes the list's setting.
UPDATE newsletters n JOIN lists l ON l.id = n.list_id
SET n.track = COALESCE(%(track)s, l.track)
WHERE n.id = %(id)s;

-- name: newsletter_track
SELECT track FROM newsletters WHERE id = %(id)s;

-- name: tracking_links_insert
-- values: newsletter_id, idx, url
-- A link's idx is a keyed hash of its URL: every sort worker writes the same row.
INSERT IGNORE INTO newsletter_links (newsletter_id, idx, url)
SELECT v.newsletter_id, v.idx, v.url FROM (%(values)s) AS v;

-- name: tracking_links_get
SELECT idx, url FROM newsletter_links WHERE newsletter_id = %(id)s AND idx IN %(idx)s;

-- name: tracking_links_all
SELECT idx, url FROM newsletter_links WHERE newsletter_id = %(id)s;

-- name: tracking_events_insert
-- values: hit, newsletter_id, message_id, kind, link_idx, at, verdict
-- A batch of hits in one statement; a hit already stored (a spooled batch
-- replayed after its commit got lost) is skipped by its own id.
INSERT IGNORE INTO tracking_events (hit, newsletter_id, message_id, kind, link_idx, at, verdict)
SELECT v.hit, v.newsletter_id, v.message_id, v.kind, v.link_idx, v.at, v.verdict
FROM (%(values)s) AS v;

-- name: tracking_delivered_at
-- When each message of a batch of hits was accepted by the relay (the
-- "within seconds of delivery" rule); purged messages are simply absent.
SELECT id, finished_at FROM messages WHERE id IN %(ids)s AND state IN ('sent', 'bounced');

-- name: tracking_recent_clicks
-- The clicks of these recipients since %(since)s: the burst rule's input.
SELECT id, message_id, link_idx, at, verdict FROM tracking_events
WHERE message_id IN %(ids)s AND kind = 'click' AND at >= %(since)s
ORDER BY message_id, at, id;

-- name: tracking_mark_burst
-- The hits the burst rule found to be one of a scanner's clicks on many links.
UPDATE tracking_events SET verdict = 4 WHERE id IN %(ids)s AND verdict < 4;

-- name: tracking_unique_delete
DELETE FROM tracking_unique WHERE message_id IN %(ids)s;

-- name: tracking_unique_rebuild
-- The unique rows of these recipients, from all their events: rebuilding
-- (rather than adding) keeps them right whatever order hits, replays and
-- re-classifications come in.
INSERT INTO tracking_unique (newsletter_id, kind, message_id, link_idx, hits, human_hits,
                             first_at, last_at, first_human_at, verdict)
SELECT newsletter_id, kind, message_id, link_idx, COUNT(*), SUM(verdict = 0), MIN(at), MAX(at),
       MIN(IF(verdict = 0, at, NULL)), MAX(verdict)
FROM tracking_events WHERE message_id IN %(ids)s
GROUP BY newsletter_id, kind, message_id, link_idx;

-- name: tracking_counts
-- Unique per recipient: human = a recipient with at least one human hit;
-- machine = a recipient whose every hit was a machine's (by its strongest verdict).
SELECT kind, IF(human_hits > 0, 0, verdict) AS verdict, COUNT(DISTINCT message_id) AS recipients,
       SUM(hits) AS hits
FROM tracking_unique
WHERE newsletter_id = %(id)s AND first_at >= %(since)s AND first_at < %(before)s
GROUP BY kind, IF(human_hits > 0, 0, verdict);

-- name: tracking_clickers
-- Recipients who clicked at all: human if any click of theirs was human.
SELECT COUNT(*) AS recipients, COALESCE(SUM(human), 0) AS human FROM (
    SELECT message_id, MAX(human_hits > 0) AS human FROM tracking_unique
    WHERE newsletter_id = %(id)s AND kind = 'click' AND first_at >= %(since)s
      AND first_at < %(before)s
    GROUP BY message_id
) AS c;

-- name: tracking_links_counts
-- Clicks per link: unique human and machine recipients, and all hits.
SELECT u.link_idx AS idx, l.url, SUM(u.human_hits > 0) AS clicks,
       SUM(u.human_hits = 0) AS machine_clicks, SUM(u.hits) AS hits
FROM tracking_unique u
LEFT JOIN newsletter_links l ON l.newsletter_id = u.newsletter_id AND l.idx = u.link_idx
WHERE u.newsletter_id = %(id)s AND u.kind = 'click' AND u.first_at >= %(since)s
  AND u.first_at < %(before)s
GROUP BY u.link_idx, l.url
ORDER BY clicks DESC, hits DESC, u.link_idx
LIMIT %(limit)s;

-- name: tracking_timeline
-- Unique recipients by the hour of their first hit (human: their first human
-- hit); the report folds hours into days for long spans.
SELECT DATE_FORMAT(COALESCE(first_human_at, first_at), '%%Y-%%m-%%dT%%H:00:00') AS hour, kind,
       SUM(human_hits > 0) AS human, SUM(human_hits = 0) AS machine
FROM tracking_unique
WHERE newsletter_id = %(id)s AND first_at >= %(since)s AND first_at < %(before)s
GROUP BY hour, kind ORDER BY hour, kind;

-- name: tracking_newsletters_facts
-- For `list stats`: unique human/machine opens and clicks of many newsletters at once.
SELECT newsletter_id, kind, COUNT(DISTINCT IF(human_hits > 0, message_id, NULL)) AS human,
       COUNT(DISTINCT message_id) AS recipients
FROM tracking_unique WHERE newsletter_id IN %(ids)s
GROUP BY newsletter_id, kind;

-- name: retention_delete_tracking_events
DELETE FROM tracking_events WHERE newsletter_id = %(id)s AND at < %(cutoff)s
ORDER BY at, id LIMIT %(chunk)s;

-- name: retention_delete_tracking_unique
DELETE FROM tracking_unique WHERE newsletter_id = %(id)s AND first_at < %(cutoff)s
ORDER BY kind, message_id, link_idx LIMIT %(chunk)s;

-- name: forget_tracking_events
-- `subscriber forget`: a person's opens and clicks (before their messages go).
DELETE e FROM tracking_events e JOIN messages m ON m.id = e.message_id
JOIN subscribers s ON s.id = m.subscriber_id
WHERE s.email = %(email)s;

-- name: forget_tracking_unique
DELETE u FROM tracking_unique u JOIN messages m ON m.id = u.message_id
JOIN subscribers s ON s.id = m.subscriber_id
WHERE s.email = %(email)s;

-- ======================================================== subscriber history
-- sendsystem/history.py: a status change and its subscriber_events row are one
-- transaction. The subscription is locked first (its status before the change
-- is the event's from_status), then the caller's UPDATE runs, then the event.

-- name: subscriber_lock
SELECT id, list_id, email, status FROM subscribers WHERE id = %(id)s FOR UPDATE;

-- name: subscribers_lock_active_by_email
-- [bounce] scope = address: the subscriptions subscribers_mark_bounced will end.
SELECT id, list_id, status FROM subscribers
WHERE email = %(email)s AND status = 'active' ORDER BY id FOR UPDATE;

-- name: subscriber_by_list_email
SELECT id, list_id, email, status FROM subscribers
WHERE list_id = %(list_id)s AND email = %(email)s;

-- name: subscriber_event_insert
-- The newsletter: the one given (an unsubscribe token names it), else the
-- newsletter of the message given, when it was sent for this subscription's list.
INSERT INTO subscriber_events (list_id, subscriber_id, at, from_status, to_status, reason,
                               newsletter_id)
VALUES (%(list_id)s, %(subscriber_id)s, NOW(6), %(from_status)s, %(to_status)s, %(reason)s,
        COALESCE(%(newsletter_id)s,
                 (SELECT m.newsletter_id FROM messages m JOIN newsletters n ON n.id = m.newsletter_id
                  WHERE m.id = %(message_id)s AND n.list_id = %(list_id)s)));

-- ================================================================ list stats
-- sendsystem/liststats.py. Weeks start on Monday 00:00 UTC (sessions are UTC);
-- each statement aggregates in the server over an index and returns at most a
-- row per week (and status or reason), never a row per subscriber.

-- name: liststats_joins_by_week
-- Joins per week since %(since)s (a subscription's join is its row's creation):
-- a covering range scan of ix_subscribers_list_created from there on.
SELECT DATE(created_at) - INTERVAL WEEKDAY(created_at) DAY AS week, COUNT(*) AS n
FROM subscribers FORCE INDEX (ix_subscribers_list_created)
WHERE list_id = %(list_id)s AND created_at >= %(since)s
GROUP BY week;

-- name: liststats_events_by_week
SELECT DATE(at) - INTERVAL WEEKDAY(at) DAY AS week, from_status, to_status, reason,
       COUNT(*) AS n
FROM subscriber_events WHERE list_id = %(list_id)s AND at >= %(since)s
GROUP BY week, from_status, to_status, reason;

-- name: liststats_cache_until
SELECT until FROM list_stats_cache WHERE list_id = %(list_id)s;

-- name: liststats_cached_weeks
SELECT week, kind, from_status, to_status, reason, n FROM list_stats_weeks
WHERE list_id = %(list_id)s;

-- name: liststats_cache_week
INSERT IGNORE INTO list_stats_weeks (list_id, week, kind, from_status, to_status, reason, n)
VALUES (%(list_id)s, %(week)s, %(kind)s, %(from_status)s, %(to_status)s, %(reason)s, %(n)s);

-- name: liststats_cache_set
-- Only forward: a slower concurrent report never moves it back.
INSERT INTO list_stats_cache (list_id, until) VALUES (%(list_id)s, %(until)s)
ON DUPLICATE KEY UPDATE until = GREATEST(until, VALUES(until));

-- name: liststats_cache_drop_weeks
DELETE FROM list_stats_weeks WHERE list_id = %(list_id)s;

-- name: liststats_cache_drop
DELETE FROM list_stats_cache WHERE list_id = %(list_id)s;

-- name: liststats_status_now
-- `list stats --verify`: the subscribers table itself, by status (a scan of the
-- list's entries in ix_subscribers_list_status).
SELECT status, COUNT(*) AS n FROM subscribers WHERE list_id = %(list_id)s GROUP BY status;

-- name: liststats_blocked_active
-- Active subscribers whose address or @domain is on the blocklist now, driven
-- from the (small) blocklist through the email and domain indexes. The hashed
-- entries of forgotten addresses cannot be looked up this way and are not counted.
SELECT COUNT(*) AS n FROM (
    SELECT s.id FROM blocklist b JOIN subscribers s ON s.email = b.pattern
    WHERE s.list_id = %(list_id)s AND s.status = 'active'
    UNION
    SELECT s.id FROM blocklist b JOIN subscribers s ON s.domain = SUBSTRING(b.pattern, 2)
    WHERE b.pattern LIKE '@%%' AND s.list_id = %(list_id)s AND s.status = 'active'
) AS blocked;

-- name: liststats_newsletters
-- The list's newsletters that went out (released), newest first.
SELECT id, subject, state, released_at, finished_at, total, track FROM newsletters
WHERE list_id = %(list_id)s AND released_at IS NOT NULL
ORDER BY released_at DESC, id DESC LIMIT %(limit)s;

-- name: liststats_unsubscribes
-- Unsubscribes attributed to each of these newsletters (the token named it).
SELECT newsletter_id, COUNT(*) AS n FROM subscriber_events
WHERE newsletter_id IN %(ids)s AND to_status = 'unsubscribed'
GROUP BY newsletter_id;

-- name: liststats_unattributed_unsubscribes
-- Unsubscribes since %(since)s that name no newsletter (links in mail sent
-- before schema 13, mailto requests with an old token, admins).
SELECT COUNT(*) AS n FROM subscriber_events
WHERE list_id = %(list_id)s AND to_status = 'unsubscribed' AND newsletter_id IS NULL
  AND at >= %(since)s;

-- ==================================================================== forget
-- sendsystem/forget.py: a person's data, found by address and by subscription.
-- %(pattern)s is a PCRE (REGEXP) matching the address; %(any_address)s one
-- matching any address (for the person's own rows, whose free text may also
-- name a forwarding address of theirs). Every scrub is idempotent and chunked:
-- it repeats until it changes fewer than %(chunk)s rows.

-- name: forget_find
SELECT id, list_id, status FROM subscribers WHERE email = %(email)s ORDER BY id;

-- name: forget_cancel_messages
-- Their messages that no worker holds (batch_id NULL): cancelled, as a
-- newsletter cancel does. Held ones are waited for (forget.py).
UPDATE messages SET state = 'cancelled', body = NULL, finished_at = NOW(6)
WHERE subscriber_id = %(id)s AND state IN ('queued', 'merged', 'deferred') AND batch_id IS NULL;

-- name: forget_pending_messages
SELECT COUNT(*) AS n,
       COALESCE(SUM(batch_id IS NULL), 0) AS unheld
FROM messages WHERE subscriber_id = %(id)s AND state IN ('queued', 'merged', 'deferred');

-- name: forget_count_messages
SELECT COUNT(*) AS n FROM messages
WHERE subscriber_id = %(id)s
  AND (body IS NOT NULL OR reply REGEXP %(any_address)s OR detail REGEXP %(any_address)s);

-- name: forget_scrub_messages
UPDATE messages
SET body = NULL, reply = REGEXP_REPLACE(reply, %(any_address)s, '[forgotten]'),
    detail = REGEXP_REPLACE(detail, %(any_address)s, '[forgotten]')
WHERE subscriber_id = %(id)s
  AND (body IS NOT NULL OR reply REGEXP %(any_address)s OR detail REGEXP %(any_address)s)
LIMIT %(chunk)s;

-- name: forget_count_bounces_subscriber
SELECT COUNT(*) AS n FROM bounces
WHERE subscriber_id = %(id)s AND (email IS NOT NULL OR diagnostic REGEXP %(any_address)s);

-- name: forget_scrub_bounces_subscriber
UPDATE bounces
SET email = NULL, diagnostic = REGEXP_REPLACE(diagnostic, %(any_address)s, '[forgotten]')
WHERE subscriber_id = %(id)s AND (email IS NOT NULL OR diagnostic REGEXP %(any_address)s)
LIMIT %(chunk)s;

-- name: forget_count_bounces_email
-- Reports stored by address only (unverified ones have no subscriber).
SELECT COUNT(*) AS n FROM bounces WHERE email = %(email)s;

-- name: forget_scrub_bounces_email
UPDATE bounces
SET email = NULL, diagnostic = REGEXP_REPLACE(diagnostic, %(any_address)s, '[forgotten]')
WHERE email = %(email)s
LIMIT %(chunk)s;

-- name: forget_count_events
SELECT COUNT(*) AS n FROM subscriber_events WHERE subscriber_id = %(id)s;

-- name: forget_scrub_events
-- The events stay (the list's history counts them); only the link to the person goes.
UPDATE subscriber_events SET subscriber_id = NULL WHERE subscriber_id = %(id)s LIMIT %(chunk)s;

-- name: forget_count_blocklist
SELECT COUNT(*) AS n FROM blocklist WHERE pattern = %(email)s;

-- name: forget_scrub_blocklist
-- The plain entry goes; forget_suppress keeps its salted hash instead.
DELETE FROM blocklist WHERE pattern = %(email)s LIMIT %(chunk)s;

-- name: forget_count_relay_health
SELECT COUNT(*) AS n FROM relay_health WHERE last_error REGEXP %(pattern)s;

-- name: forget_scrub_relay_health
UPDATE relay_health SET last_error = REGEXP_REPLACE(last_error, %(pattern)s, '[forgotten]')
WHERE last_error REGEXP %(pattern)s LIMIT %(chunk)s;

-- name: forget_count_kept_samples
-- The kept counts keep one sample reply per (state, code): it may quote them.
SELECT COUNT(*) AS n FROM kept_counts WHERE sample REGEXP %(pattern)s;

-- name: forget_scrub_kept_samples
UPDATE kept_counts SET sample = REGEXP_REPLACE(sample, %(pattern)s, '[forgotten]')
WHERE sample REGEXP %(pattern)s LIMIT %(chunk)s;

-- name: forget_count_kept_failures
-- Scrubbing their failed messages' replies moved those counts to the scrubbed
-- reason (the trigger); what is left under the old text counts 0 and goes.
SELECT COUNT(*) AS n FROM kept_failures WHERE reason REGEXP %(pattern)s;

-- name: forget_scrub_kept_failures
DELETE FROM kept_failures WHERE reason REGEXP %(pattern)s AND n = 0 LIMIT %(chunk)s;

-- name: forget_count_summaries
-- A purged newsletter's summary keeps its top SMTP replies and failure reasons.
SELECT COUNT(*) AS n FROM newsletter_summaries WHERE facts REGEXP %(pattern)s;

-- name: forget_scrub_summaries
UPDATE newsletter_summaries SET facts = REGEXP_REPLACE(facts, %(pattern)s, '[forgotten]')
WHERE facts REGEXP %(pattern)s LIMIT %(chunk)s;

-- name: forget_count_tracking_events
-- forget_tracking_events deletes them (the tracking section above).
SELECT COUNT(*) AS n FROM tracking_events e JOIN messages m ON m.id = e.message_id
JOIN subscribers s ON s.id = m.subscriber_id
WHERE s.email = %(email)s;

-- name: forget_count_tracking_unique
SELECT COUNT(*) AS n FROM tracking_unique u JOIN messages m ON m.id = u.message_id
JOIN subscribers s ON s.id = m.subscriber_id
WHERE s.email = %(email)s;

-- name: forget_count_links
-- A tracked link with a merge field in its URL is a row per recipient
-- (sendsystem/tracking/links.py): the address may be in it, plain or URL-encoded
-- (%(url_pattern)s matches both). Kept by purge, so every newsletter's are read.
SELECT COUNT(*) AS n FROM newsletter_links WHERE url REGEXP %(url_pattern)s;

-- name: forget_scrub_links
UPDATE newsletter_links SET url = REGEXP_REPLACE(url, %(url_pattern)s, '[forgotten]')
WHERE url REGEXP %(url_pattern)s LIMIT %(chunk)s;

-- name: forget_count_subscriber
SELECT COUNT(*) AS n FROM subscribers
WHERE id = %(id)s AND domain <> 'forgotten.invalid';

-- name: forget_scrub_subscriber
-- Last: the row stays (messages, bounces and counts refer to it) without the
-- address, its domain or its merge fields; `.invalid` is reserved (RFC 2606)
-- and the status is never active, so it is never mailed.
UPDATE subscribers
SET email = CONCAT('forgotten-', id, '@forgotten.invalid'), domain = 'forgotten.invalid',
    fields = '{}'
WHERE id = %(id)s AND domain <> 'forgotten.invalid' LIMIT %(chunk)s;

-- name: privacy_salt_init
INSERT IGNORE INTO privacy_salt (id, salt) VALUES (1, %(salt)s);

-- name: forget_suppressed
SELECT COUNT(*) AS n FROM blocklist b JOIN privacy_salt p ON p.id = 1
WHERE b.pattern = CONCAT('sha256:', SHA2(CONCAT(p.salt, LOWER(%(email)s)), 256));

-- name: forget_suppress
-- What stays of a forgotten address: a salted hash in the blocklist, so no
-- list mails it again (sort and send workers match it, see sort_batch_messages).
INSERT IGNORE INTO blocklist (pattern, reason)
SELECT CONCAT('sha256:', SHA2(CONCAT(p.salt, LOWER(%(email)s)), 256)), 'erasure request'
FROM privacy_salt p WHERE p.id = 1;
-- ============================================================ kept counts
-- sendsystem/keptcounts.py: verify the kept tables (migration 014) against the
-- rows, rebuild a newsletter's, fold a finished newsletter's slots.
-- The verify statements read the kept rows and the message rows in ONE
-- statement, so one consistent snapshot: exact even while roles write. Each
-- returns only the keys where the two differ. %(id)s NULL: every newsletter.

-- name: kept_verify_counts
SELECT newsletter_id, state, reply_code, SUM(kept) AS kept, SUM(actual) AS actual,
       SUM(kept_deferrals) AS kept_deferrals, SUM(actual_deferrals) AS actual_deferrals
FROM (
    SELECT newsletter_id, state, reply_code, n AS kept, 0 AS actual,
           deferrals AS kept_deferrals, 0 AS actual_deferrals
    FROM kept_counts WHERE %(id)s IS NULL OR newsletter_id = %(id)s
    UNION ALL
    SELECT newsletter_id, state, COALESCE(reply_code, 65535), 0, COUNT(*), 0, SUM(deferrals)
    FROM messages WHERE %(id)s IS NULL OR newsletter_id = %(id)s
    GROUP BY newsletter_id, state, reply_code
) AS x
GROUP BY newsletter_id, state, reply_code
HAVING SUM(kept) <> SUM(actual) OR SUM(kept_deferrals) <> SUM(actual_deferrals)
ORDER BY newsletter_id, state, reply_code;

-- name: kept_verify_timeline
-- Only newsletters without a summary: `purge` drops the history once the
-- summary holds it.
SELECT newsletter_id, resolution, bucket, worker_id, SUM(kept_sent) AS kept_sent,
       SUM(actual_sent) AS actual_sent, SUM(kept_failed) AS kept_failed,
       SUM(actual_failed) AS actual_failed
FROM (
    SELECT newsletter_id, resolution, bucket, worker_id, sent AS kept_sent,
           0 AS actual_sent, failed AS kept_failed, 0 AS actual_failed
    FROM kept_timeline WHERE %(id)s IS NULL OR newsletter_id = %(id)s
    UNION ALL
    SELECT newsletter_id, 1, TO_SECONDS(finished_at) - 62167219200 AS bucket_s,
           send_worker_id, 0, SUM(state <> 'failed'), 0, SUM(state = 'failed')
    FROM messages
    WHERE (%(id)s IS NULL OR newsletter_id = %(id)s)
      AND state IN ('sent', 'bounced', 'failed') AND finished_at IS NOT NULL
      AND send_worker_id IS NOT NULL
    GROUP BY newsletter_id, bucket_s, send_worker_id
    UNION ALL
    SELECT newsletter_id, 10, (TO_SECONDS(finished_at) - 62167219200) DIV 10 * 10 AS bucket_s,
           send_worker_id, 0, SUM(state <> 'failed'), 0, SUM(state = 'failed')
    FROM messages
    WHERE (%(id)s IS NULL OR newsletter_id = %(id)s)
      AND state IN ('sent', 'bounced', 'failed') AND finished_at IS NOT NULL
      AND send_worker_id IS NOT NULL
    GROUP BY newsletter_id, bucket_s, send_worker_id
    UNION ALL
    SELECT newsletter_id, 60, (TO_SECONDS(finished_at) - 62167219200) DIV 60 * 60 AS bucket_s,
           send_worker_id, 0, SUM(state <> 'failed'), 0, SUM(state = 'failed')
    FROM messages
    WHERE (%(id)s IS NULL OR newsletter_id = %(id)s)
      AND state IN ('sent', 'bounced', 'failed') AND finished_at IS NOT NULL
      AND send_worker_id IS NOT NULL
    GROUP BY newsletter_id, bucket_s, send_worker_id
    UNION ALL
    SELECT newsletter_id, 600, (TO_SECONDS(finished_at) - 62167219200) DIV 600 * 600 AS bucket_s,
           send_worker_id, 0, SUM(state <> 'failed'), 0, SUM(state = 'failed')
    FROM messages
    WHERE (%(id)s IS NULL OR newsletter_id = %(id)s)
      AND state IN ('sent', 'bounced', 'failed') AND finished_at IS NOT NULL
      AND send_worker_id IS NOT NULL
    GROUP BY newsletter_id, bucket_s, send_worker_id
    UNION ALL
    SELECT newsletter_id, 3600, (TO_SECONDS(finished_at) - 62167219200) DIV 3600 * 3600 AS bucket_s,
           send_worker_id, 0, SUM(state <> 'failed'), 0, SUM(state = 'failed')
    FROM messages
    WHERE (%(id)s IS NULL OR newsletter_id = %(id)s)
      AND state IN ('sent', 'bounced', 'failed') AND finished_at IS NOT NULL
      AND send_worker_id IS NOT NULL
    GROUP BY newsletter_id, bucket_s, send_worker_id
) AS x
WHERE newsletter_id NOT IN (SELECT newsletter_id FROM newsletter_summaries)
GROUP BY newsletter_id, resolution, bucket, worker_id
HAVING SUM(kept_sent) <> SUM(actual_sent) OR SUM(kept_failed) <> SUM(actual_failed)
ORDER BY newsletter_id, resolution, bucket, worker_id;

-- name: kept_verify_sort_workers
SELECT newsletter_id, worker_id, SUM(kept) AS kept, SUM(actual) AS actual
FROM (
    SELECT newsletter_id, worker_id, messages AS kept, 0 AS actual
    FROM kept_sort_workers WHERE %(id)s IS NULL OR newsletter_id = %(id)s
    UNION ALL
    SELECT newsletter_id, sort_worker_id, 0, COUNT(*)
    FROM messages
    WHERE (%(id)s IS NULL OR newsletter_id = %(id)s) AND sort_worker_id IS NOT NULL
    GROUP BY newsletter_id, sort_worker_id
) AS x
WHERE newsletter_id NOT IN (SELECT newsletter_id FROM newsletter_summaries)
GROUP BY newsletter_id, worker_id HAVING SUM(kept) <> SUM(actual)
ORDER BY newsletter_id, worker_id;

-- name: kept_verify_failures
-- Grouped in the columns' collation, as kept_failures is keyed.
SELECT newsletter_id, MIN(reason) AS reason, SUM(kept) AS kept, SUM(actual) AS actual
FROM (
    SELECT newsletter_id, reason, n AS kept, 0 AS actual
    FROM kept_failures WHERE %(id)s IS NULL OR newsletter_id = %(id)s
    UNION ALL
    SELECT newsletter_id, COALESCE(reply, detail, '(no reason recorded)') AS reason, 0, COUNT(*)
    FROM messages
    WHERE (%(id)s IS NULL OR newsletter_id = %(id)s) AND state = 'failed'
    GROUP BY newsletter_id, reason
) AS x
WHERE newsletter_id NOT IN (SELECT newsletter_id FROM newsletter_summaries)
GROUP BY newsletter_id, reason HAVING SUM(kept) <> SUM(actual)
ORDER BY newsletter_id, reason;

-- name: kept_lock_messages
-- Repair: share-lock the newsletter's rows, so no transaction changes one
-- (and its kept rows) until the recount commits. Node-local on Galera.
SELECT COUNT(*) AS n FROM messages WHERE newsletter_id = %(id)s LOCK IN SHARE MODE;

-- name: kept_has_summary
SELECT EXISTS (SELECT 1 FROM newsletter_summaries WHERE newsletter_id = %(id)s) AS has;

-- name: kept_counts_delete
DELETE FROM kept_counts WHERE newsletter_id = %(id)s;

-- name: kept_history_delete_timeline
-- `purge` drops a summarised newsletter's history in chunks.
DELETE FROM kept_timeline WHERE newsletter_id = %(id)s LIMIT %(chunk)s;

-- name: kept_history_delete_sort_workers
DELETE FROM kept_sort_workers WHERE newsletter_id = %(id)s LIMIT %(chunk)s;

-- name: kept_history_delete_failures
DELETE FROM kept_failures WHERE newsletter_id = %(id)s LIMIT %(chunk)s;

-- name: kept_rebuild_counts
-- The recount (the same as migration 014's backfill), into slot 0.
INSERT INTO kept_counts (newsletter_id, state, reply_code, slot, n, deferrals, sample)
SELECT newsletter_id, state, COALESCE(reply_code, 65535) AS code, 0, COUNT(*), SUM(deferrals),
       MIN(reply)
FROM messages WHERE newsletter_id = %(id)s
GROUP BY newsletter_id, state, code;

-- name: kept_rebuild_timeline
INSERT INTO kept_timeline (newsletter_id, resolution, bucket, worker_id, sent, failed,
                           first_at, last_at)
SELECT newsletter_id, 1, TO_SECONDS(finished_at) - 62167219200 AS bucket_s,
       send_worker_id, SUM(state <> 'failed'), SUM(state = 'failed'), NULL, NULL
FROM messages
WHERE newsletter_id = %(id)s AND state IN ('sent', 'bounced', 'failed')
  AND finished_at IS NOT NULL AND send_worker_id IS NOT NULL
GROUP BY newsletter_id, bucket_s, send_worker_id
UNION ALL
SELECT newsletter_id, 10, (TO_SECONDS(finished_at) - 62167219200) DIV 10 * 10 AS bucket_s,
       send_worker_id, SUM(state <> 'failed'), SUM(state = 'failed'), NULL, NULL
FROM messages
WHERE newsletter_id = %(id)s AND state IN ('sent', 'bounced', 'failed')
  AND finished_at IS NOT NULL AND send_worker_id IS NOT NULL
GROUP BY newsletter_id, bucket_s, send_worker_id
UNION ALL
SELECT newsletter_id, 60, (TO_SECONDS(finished_at) - 62167219200) DIV 60 * 60 AS bucket_s,
       send_worker_id, SUM(state <> 'failed'), SUM(state = 'failed'), NULL, NULL
FROM messages
WHERE newsletter_id = %(id)s AND state IN ('sent', 'bounced', 'failed')
  AND finished_at IS NOT NULL AND send_worker_id IS NOT NULL
GROUP BY newsletter_id, bucket_s, send_worker_id
UNION ALL
SELECT newsletter_id, 600, (TO_SECONDS(finished_at) - 62167219200) DIV 600 * 600 AS bucket_s,
       send_worker_id, SUM(state <> 'failed'), SUM(state = 'failed'), NULL, NULL
FROM messages
WHERE newsletter_id = %(id)s AND state IN ('sent', 'bounced', 'failed')
  AND finished_at IS NOT NULL AND send_worker_id IS NOT NULL
GROUP BY newsletter_id, bucket_s, send_worker_id
UNION ALL
SELECT newsletter_id, 3600, (TO_SECONDS(finished_at) - 62167219200) DIV 3600 * 3600 AS bucket_s,
       send_worker_id, SUM(state <> 'failed'), SUM(state = 'failed'), MIN(finished_at), MAX(finished_at)
FROM messages
WHERE newsletter_id = %(id)s AND state IN ('sent', 'bounced', 'failed')
  AND finished_at IS NOT NULL AND send_worker_id IS NOT NULL
GROUP BY newsletter_id, bucket_s, send_worker_id;

-- name: kept_rebuild_sort_workers
INSERT INTO kept_sort_workers (newsletter_id, worker_id, messages, first_at, last_at)
SELECT newsletter_id, sort_worker_id, COUNT(*), MIN(merged_at), MAX(merged_at)
FROM messages WHERE newsletter_id = %(id)s AND sort_worker_id IS NOT NULL
GROUP BY newsletter_id, sort_worker_id;

-- name: kept_rebuild_failures
INSERT INTO kept_failures (newsletter_id, reason, n)
SELECT newsletter_id, COALESCE(reply, detail, '(no reason recorded)') AS reason, COUNT(*)
FROM messages WHERE newsletter_id = %(id)s AND state = 'failed'
GROUP BY newsletter_id, reason;

-- name: kept_counts_for_update
-- Compaction: lock a newsletter's kept counts (and, in REPEATABLE READ, the
-- gaps between them, so no new slot row appears) while they are folded.
SELECT state, reply_code, slot, n, deferrals, sample
FROM kept_counts WHERE newsletter_id = %(id)s FOR UPDATE;

-- name: kept_counts_insert
INSERT INTO kept_counts (newsletter_id, state, reply_code, slot, n, deferrals, sample)
VALUES (%(id)s, %(state)s, %(reply_code)s, 0, %(n)s, %(deferrals)s, %(sample)s);
