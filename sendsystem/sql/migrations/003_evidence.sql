-- Version 3: only signed evidence acts.
-- `verified` = 1: the report was tied to one of our messages (or subscriptions)
-- by something an outsider cannot forge, and it was acted upon; 0: kept for a
-- human and for `stats`, it changed nothing. New rows must say which (the
-- default is the safe one, 0).
-- `evidence` names what tied it: the VERP address's HMAC, a signed
-- Message-ID, a signed unsubscribe token, or the relay's own reply at send
-- time; NULL for unverified rows and for rows from before this version.
-- `newsletter_id` lets `stats` count a report against a newsletter even when
-- it is unverified (then only loosely: from what the report claims).

ALTER TABLE bounces
    ADD COLUMN IF NOT EXISTS newsletter_id INT UNSIGNED NULL AFTER id,
    ADD COLUMN IF NOT EXISTS verified TINYINT(1) NOT NULL DEFAULT 0 AFTER kind,
    ADD COLUMN IF NOT EXISTS evidence ENUM('verp','message-id','token','smtp') NULL AFTER verified,
    ADD KEY IF NOT EXISTS ix_bounces_newsletter (newsletter_id, verified, kind),
    ADD KEY IF NOT EXISTS ix_bounces_email (email, verified, kind, received_at),
    ADD KEY IF NOT EXISTS ix_bounces_unverified (verified, received_at);

-- Rows from before: those that were acted upon count as verified, as they
-- did ('unknown' and token-less unsubscribe requests changed nothing).
UPDATE bounces SET verified = 1
WHERE kind <> 'unknown' AND NOT (kind = 'unsubscribe' AND subscriber_id IS NULL)
  AND evidence IS NULL AND verified = 0
  AND NOT EXISTS (SELECT 1 FROM schema_version WHERE version = 3);

UPDATE bounces b JOIN messages m ON m.id = b.message_id
SET b.newsletter_id = m.newsletter_id
WHERE b.newsletter_id IS NULL;

INSERT IGNORE INTO schema_version (version) VALUES (3);
