-- Version 6: render limits for customer templates.
-- `zdict` is the newsletter's zlib preset dictionary, computed once by a sort
-- worker's render child under the render limits and used by every worker
-- (NULL for newsletters from before version 6: the send worker derives it
-- from the template as before). `render_failures` counts render failures in
-- a row (a success resets it); at `[sorting] render_failures_pause` the
-- newsletter pauses itself.

ALTER TABLE newsletters
    ADD COLUMN IF NOT EXISTS zdict BLOB NULL AFTER text,
    ADD COLUMN IF NOT EXISTS render_failures SMALLINT UNSIGNED NOT NULL DEFAULT 0
        AFTER pause_reason;

INSERT IGNORE INTO schema_version (version) VALUES (6);
