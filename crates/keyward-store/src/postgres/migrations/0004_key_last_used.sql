-- When each key was last used, beside the key's row rather than in it: the usage flush writes
-- this for every key used since the last flush (every second), and updating the wide key row
-- for it writes a new version of the whole row each time.
CREATE TABLE key_last_used (
    key_id  TEXT COLLATE "C" PRIMARY KEY,
    at      BIGINT NOT NULL
);

INSERT INTO key_last_used (key_id, at)
    SELECT id, last_used_at FROM keys WHERE last_used_at IS NOT NULL;

-- keys.last_used_at stays, unused, for one release: nodes of the previous version still running
-- against a shared database (a rolling upgrade) read and write it. A later migration drops it.
