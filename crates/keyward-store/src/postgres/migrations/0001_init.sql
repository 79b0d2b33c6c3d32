-- Keyward's PostgreSQL schema, version 1: the SQLite schema's tables, columns and rules.
-- Timestamps are Unix milliseconds (BIGINT) and ids UUID text, exactly as SQLite stores them, so
-- both backends order and compare rows the same way: ids sort by byte (COLLATE "C", whatever the
-- database's locale), as lowercase UUID text does in SQLite, so ties on a timestamp break alike.
-- JSON columns hold text so stored documents read back byte for byte (JSONB would reorder keys).
-- Every integer is BIGINT because the store reads them as i64. Rules that must hold across nodes
-- are constraints here; their names are what the backend maps unique violations by.

CREATE TABLE orgs (
    id          TEXT COLLATE "C" PRIMARY KEY,
    name        TEXT NOT NULL CONSTRAINT orgs_name_unique UNIQUE,
    policy      TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

CREATE TABLE agents (
    id              TEXT COLLATE "C" PRIMARY KEY,
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
    version         BIGINT NOT NULL,
    created_at      BIGINT NOT NULL,
    updated_at      BIGINT NOT NULL,
    revoked_at      BIGINT
);
-- A name is unique among the org's non-revoked agents; a revoked agent's name can be reused.
CREATE UNIQUE INDEX agents_live_name ON agents (org_id, name) WHERE status <> 'revoked';
CREATE INDEX agents_org_created ON agents (org_id, created_at, id);

CREATE TABLE keys (
    id                  TEXT COLLATE "C" PRIMARY KEY,
    org_id              TEXT NOT NULL REFERENCES orgs(id),
    agent_id            TEXT REFERENCES agents(id),
    parent_key_id       TEXT REFERENCES keys(id),
    kind                TEXT NOT NULL,
    environment         TEXT NOT NULL,
    name                TEXT,
    start               TEXT NOT NULL,
    digest              BYTEA NOT NULL CONSTRAINT keys_digest_unique UNIQUE,
    scopes              TEXT NOT NULL,
    cidr_allowlist      TEXT NOT NULL,
    rate_limit          TEXT,
    quota               TEXT,
    alert_thresholds    TEXT NOT NULL,
    requires_signature  BOOLEAN NOT NULL,
    signing_secret_enc  BYTEA,
    expires_at          BIGINT,
    deprecated_at       BIGINT,
    revoked_at          BIGINT,
    successor_key_id    TEXT,
    last_used_at        BIGINT,
    created_at          BIGINT NOT NULL,
    metadata            TEXT NOT NULL
);
CREATE INDEX keys_org_created ON keys (org_id, created_at, id);
CREATE INDEX keys_agent ON keys (agent_id, created_at, id);
CREATE INDEX keys_parent ON keys (parent_key_id);

CREATE TABLE audit_events (
    id              TEXT COLLATE "C" PRIMARY KEY,
    org_id          TEXT NOT NULL,
    occurred_at     BIGINT NOT NULL,
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
    request_hash    BYTEA NOT NULL,
    status          BIGINT NOT NULL,
    response        TEXT NOT NULL,
    agent_id        TEXT,
    created_at      BIGINT NOT NULL,
    CONSTRAINT idempotency_keys_pkey PRIMARY KEY (org_id, idem_key)
);
