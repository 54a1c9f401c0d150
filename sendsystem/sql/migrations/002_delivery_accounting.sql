-- Version 2: delivery accounting for the send worker and statistics.
-- `deferrals` counts temporary failures per message (stats: deferrals);
-- `reply` keeps the relay's answer (queue id on 250, reason otherwise);
-- a newsletter remembers who enqueued its attachments' total size.

ALTER TABLE messages
    ADD COLUMN IF NOT EXISTS deferrals SMALLINT UNSIGNED NOT NULL DEFAULT 0 AFTER attempts,
    ADD COLUMN IF NOT EXISTS reply VARCHAR(500) NULL AFTER reply_code,
    ADD KEY IF NOT EXISTS ix_messages_finished (newsletter_id, finished_at);

ALTER TABLE newsletters
    ADD COLUMN IF NOT EXISTS attachment_bytes INT UNSIGNED NOT NULL DEFAULT 0 AFTER total;

INSERT IGNORE INTO schema_version (version) VALUES (2);
