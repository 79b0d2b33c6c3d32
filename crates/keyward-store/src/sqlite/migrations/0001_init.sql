-- Keyward's SQLite schema, version 1. Timestamps are Unix milliseconds (INTEGER); ids are UUID
-- text; JSON columns hold text. Rules that must hold under concurrency are constraints here.

CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    policy      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE agents (
    id              TEXT PRIMARY KEY,
    org_id          TEXT NOT NULL REFERENCES orgs(id),
    name            TEXT NOT NULL,
    display_name    TEXT,
    agent_type      TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('active', 'paused', 'revoked')),
    scopes          TEXT NOT NULL,
    metadata        TEXT NOT NULL,
    policy          TEXT NOT NULL,
    capabilities    TEXT NOT NULL,
    did             TEXT,
    owner_user_id   TEXT,
    parent_agent_id TEXT,
    version         INTEGER NOT NULL,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    revoked_at      INTEGER
);
-- A name is unique among the org's non-revoked agents; a revoked agent's name can be reused.
CREATE UNIQUE INDEX agents_live_name ON agents (org_id, name) WHERE status <> 'revoked';
CREATE INDEX agents_org_created ON agents (org_id, created_at, id);

CREATE TABLE keys (
    id                  TEXT PRIMARY KEY,
    org_id              TEXT NOT NULL REFERENCES orgs(id),
    agent_id            TEXT REFERENCES agents(id),
    parent_key_id       TEXT REFERENCES keys(id),
    kind                TEXT NOT NULL,
    environment         TEXT NOT NULL,
    name                TEXT,
    start               TEXT NOT NULL,
    digest              BLOB NOT NULL UNIQUE,
    scopes              TEXT NOT NULL,
    cidr_allowlist      TEXT NOT NULL,
    rate_limit          TEXT,
    quota               TEXT,
    alert_thresholds    TEXT NOT NULL,
    requires_signature  INTEGER NOT NULL,
    signing_secret_enc  BLOB,
    expires_at          INTEGER,
    deprecated_at       INTEGER,
    revoked_at          INTEGER,
    successor_key_id    TEXT,
    last_used_at        INTEGER,
    created_at          INTEGER NOT NULL,
    metadata            TEXT NOT NULL
);
CREATE INDEX keys_org_created ON keys (org_id, created_at, id);
CREATE INDEX keys_agent ON keys (agent_id, created_at, id);
CREATE INDEX keys_parent ON keys (parent_key_id);

CREATE TABLE audit_events (
    id              TEXT PRIMARY KEY,
    org_id          TEXT NOT NULL,
    occurred_at     INTEGER NOT NULL,
    action          TEXT NOT NULL,
    outcome         TEXT NOT NULL,
    error_code      TEXT,
    actor_key_id    TEXT,
    actor_agent_id  TEXT,
    target_type     TEXT,
    target_id       TEXT,
    client_ip       TEXT,
    request_id      TEXT,
    run_id          TEXT,
    thread_id       TEXT,
    parent_agent    TEXT,
    traceparent     TEXT,
    trace_meta      TEXT NOT NULL,
    details         TEXT NOT NULL
);
CREATE INDEX audit_org_time ON audit_events (org_id, occurred_at DESC, id DESC);
CREATE INDEX audit_org_run ON audit_events (org_id, run_id);

CREATE TABLE idempotency_keys (
    org_id          TEXT NOT NULL,
    idem_key        TEXT NOT NULL,
    request_hash    BLOB NOT NULL,
    status          INTEGER NOT NULL,
    response        TEXT NOT NULL,
    agent_id        TEXT,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (org_id, idem_key)
);
