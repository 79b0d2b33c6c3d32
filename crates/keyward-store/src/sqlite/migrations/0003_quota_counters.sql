-- Quota units taken per key and period (the same table as PostgreSQL's; a single node counts
-- quotas in memory and uses it only through the Store trait's shared-quota calls).
CREATE TABLE quota_counters (
    key_id          TEXT NOT NULL,
    period_start    INTEGER NOT NULL,
    used            INTEGER NOT NULL,
    PRIMARY KEY (key_id, period_start)
);
