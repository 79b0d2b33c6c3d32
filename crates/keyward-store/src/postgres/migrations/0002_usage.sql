-- Usage counters per key and UTC hour, and the quota alert thresholds already announced.
CREATE TABLE usage_hourly (
    key_id          TEXT NOT NULL,
    org_id          TEXT NOT NULL,
    hour_start      BIGINT NOT NULL,
    allowed         BIGINT NOT NULL DEFAULT 0,
    denied          BIGINT NOT NULL DEFAULT 0,
    rate_limited    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, hour_start)
);

-- One row per (key, quota period, threshold): the alert event is written only when its row is
-- new, so a threshold is announced once per period even across restarts and nodes.
CREATE TABLE quota_alerts (
    key_id          TEXT NOT NULL,
    period_start    BIGINT NOT NULL,
    threshold       BIGINT NOT NULL,
    PRIMARY KEY (key_id, period_start, threshold)
);
