-- Version 4: policy and spam blocks get their own bounce kind.
-- `blocked`: a DSN or bounce that says the receiving side refused our mail by
-- policy (5.7.x, or spam / blocklist wording): about our reputation, not the
-- reader's address. Kept for `stats`, attributed like any bounce, and never
-- counted towards hard_limit or soft_limit.

ALTER TABLE bounces
    MODIFY kind ENUM('hard','soft','blocked','autoreply','complaint','unsubscribe','unknown')
        NOT NULL;

INSERT IGNORE INTO schema_version (version) VALUES (4);
