-- When each key was last used, beside the key's row rather than in it: the usage flush writes
-- this for every key used since the last flush (every second), and updating the wide key row
-- for it writes a new version of the whole row each time.
CREATE TABLE key_last_used (
    key_id  TEXT COLLATE "C" PRIMARY KEY,
    at      BIGINT NOT NULL
);

INSERT INTO key_last_used (key_id, at)
    SELECT id, last_used_at FROM keys WHERE last_used_at IS NOT NULL;

ALTER TABLE keys DROP COLUMN last_used_at;
