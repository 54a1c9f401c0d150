-- Version 9: bounces and complaints reported by an ESP's webhook.
-- `evidence` = 'webhook': the ESP's request was authenticated (SNS
-- certificate signature, SendGrid ECDSA, Mailgun HMAC, Postmark basic auth)
-- AND the event named one of our messages by its signed Message-ID. An
-- authenticated event without it is stored unverified, as any other report.

ALTER TABLE bounces
    MODIFY COLUMN evidence ENUM('verp','message-id','token','smtp','webhook') NULL;

INSERT IGNORE INTO schema_version (version) VALUES (9);
