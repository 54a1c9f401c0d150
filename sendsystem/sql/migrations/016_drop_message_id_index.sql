-- Version 16: `messages.message_id` (the Message-ID header a send worker wrote)
-- loses its index. No statement looks a message up by it: a bounce, a
-- complaint or a webhook names a message by our signed Message-ID, which
-- carries the row's id (sendsystem/tokens.py), and is checked against that.
-- The index cost every release one more entry per message row (10,000,000
-- rows at a time), and every delivery a random insert into a string index as
-- large as the table. Dropping a secondary index is in place and quick.

ALTER TABLE messages DROP INDEX IF EXISTS ix_messages_message_id;

INSERT IGNORE INTO schema_version (version) VALUES (16);
