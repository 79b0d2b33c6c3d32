-- Each key's last use rides on its usage row for the hour of that use, so the usage flush writes
-- one row per used key instead of two: the upsert of `key_last_used` was two fifths of a flush
-- (10,000 keys: 17-22 ms of 50-59 ms), and the flush is the largest single cost a busy node
-- pays per verification. A key's `last_used_at` is the later of its `key_last_used` row (what
-- earlier versions wrote, imports, and a use whose hour the flush carries no counts for) and the
-- `last_at` of its latest usage row that has one.
ALTER TABLE usage_hourly ADD COLUMN last_at INTEGER;
