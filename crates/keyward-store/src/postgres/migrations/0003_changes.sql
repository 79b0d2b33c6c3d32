-- The change log: one row per committed write that changes what an existing key may do (org
-- policy, agent status, policy or scopes, key settings, revocation, rotation). Each row is
-- announced with NOTIFY in the same transaction; nodes drop their verify caches when they hear
-- it, and a node whose listening connection was lost compares the log's head when it is back.
CREATE TABLE changes (
    seq             BIGSERIAL PRIMARY KEY,
    org_id          TEXT NOT NULL,
    changed_at      BIGINT NOT NULL
);
CREATE INDEX changes_changed_at ON changes (changed_at);

-- Quota units taken per key and period, shared by every node: one conditional increment per
-- use, so N nodes together admit exactly the quota.
CREATE TABLE quota_counters (
    key_id          TEXT NOT NULL,
    period_start    BIGINT NOT NULL,
    used            BIGINT NOT NULL,
    PRIMARY KEY (key_id, period_start)
);

-- Request signatures seen within their window (a hash of key and signature), shared by every
-- node so a captured signed request cannot be replayed to another node.
CREATE TABLE signatures_seen (
    id              BYTEA PRIMARY KEY,
    expires_at      BIGINT NOT NULL
);
CREATE INDEX signatures_seen_expires_at ON signatures_seen (expires_at);
