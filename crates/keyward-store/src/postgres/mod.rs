//! The PostgreSQL backend: one database shared by every node, selected with `--database-url`.
//!
//! It mirrors the SQLite backend column for column (ids as UUID text, timestamps as Unix
//! milliseconds, JSON as text) so both read back exactly the same values and the one conformance
//! suite holds for both. What differs is how the rules are enforced: SQLite has a single writer,
//! so its transactions never overlap; here many connections (and many nodes) write at once, so
//! every rule that reads before it writes takes a row lock first:
//!
//! - the last-active-key guard and the revocation cascade lock the agent row (or, for a root key,
//!   the org row) `FOR UPDATE`, so two revocations of one agent's keys run one after the other
//!   and the second counts what the first left;
//! - writes that refuse revoked agents (`insert_key`, `rotate_key`, `import_keys`, child agents)
//!   lock the agent row `FOR SHARE`, and `update_agent` locks it `FOR UPDATE`, so a key cannot
//!   slip in beside a concurrent revocation of its agent;
//! - name uniqueness and idempotency claims are unique indexes, whose violations (SQLSTATE 23505)
//!   are told apart by constraint name.
//!
//! Transactions run at READ COMMITTED (the default): each statement after a lock sees what the
//! transaction that held the lock committed, which is what the guards above need.

use std::borrow::Cow;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use keyward_core::model::{
    Agent, AgentStatus, AuditEvent, AuditFilter, IdempotencyRecord, Key, KeyFilter, Org, Page,
    Timestamp,
};
use keyward_core::token::{TokenDigest, TokenKind};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{ConnectOptions, Executor, Postgres, QueryBuilder, Row, Transaction};
use uuid::Uuid;

use crate::codec::{
    corrupt, from_json, from_ms, get, ms, opt_ms, opt_uuid, row_to_agent, row_to_audit, row_to_key,
    row_to_org, to_json, uuid, Columns,
};

use crate::{
    ChangeWatch, KeyWithAgent, Revoked, Signal, Store, StoreError, StoreResult, ThresholdAlert,
    UsageBucket, UsageDelta,
};

/// The migrations, embedded in the binary like SQLite's so a node needs nothing beside it.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("migrations/0001_init.sql")),
    (2, "usage", include_str!("migrations/0002_usage.sql")),
    (3, "changes", include_str!("migrations/0003_changes.sql")),
    (
        4,
        "key_last_used",
        include_str!("migrations/0004_key_last_used.sql"),
    ),
    (
        5,
        "idempotency_created",
        include_str!("migrations/0005_idempotency_created.sql"),
    ),
];

/// How many connections one node keeps: verifications hit the cache, so the store mostly sees
/// writes and cache misses, and 16 covers bursts without crowding PostgreSQL's default limit
/// (100) when several nodes share it.
const POOL_SIZE: u32 = 16;

/// How long a call waits for a connection before the store reports itself unavailable: long
/// enough to ride out a burst that has every connection busy, short enough that while
/// PostgreSQL is down requests fail with 503 in seconds rather than hang.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);

fn migrator() -> Migrator {
    let migrations: Vec<Migration> = MIGRATIONS
        .iter()
        .map(|(v, d, sql)| {
            Migration::new(
                *v,
                Cow::Borrowed(*d),
                MigrationType::Simple,
                Cow::Borrowed(*sql),
                false,
            )
        })
        .collect();
    Migrator {
        migrations: Cow::Owned(migrations),
        // Two nodes starting at once on an empty database: the advisory lock makes one apply
        // the migrations while the other waits, then finds them applied.
        locking: true,
        ..Migrator::DEFAULT
    }
}

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// The NOTIFY channel of this schema's change log: `keyward_changes_<schema>`, so stores in
    /// different schemas of one database (tests, several deployments) do not hear each other.
    channel: String,
}

const KEY_COLS: &str =
    "k.id, k.org_id, k.agent_id, k.parent_key_id, k.kind, k.environment, k.name, \
    k.start, k.digest, k.scopes, k.cidr_allowlist, k.rate_limit, k.quota, k.alert_thresholds, \
    k.requires_signature, k.signing_secret_enc, k.expires_at, k.deprecated_at, k.revoked_at, \
    k.successor_key_id, \
    (SELECT u.at FROM key_last_used u WHERE u.key_id = k.id) AS last_used_at, \
    k.created_at, k.metadata";

const AGENT_COLS: &str = "id, org_id, name, display_name, agent_type, status, scopes, metadata, \
    policy, capabilities, did, owner_user_id, parent_agent_id, version, created_at, updated_at, \
    revoked_at";

const AUDIT_COLS: &str = "id, org_id, occurred_at, action, outcome, error_code, actor_key_id, \
    actor_agent_id, target_type, target_id, client_ip, request_id, run_id, thread_id, \
    parent_agent, traceparent, trace_meta, details";

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/db?...`), opens a
    /// pool and runs the migrations.
    pub async fn connect(url: &str) -> StoreResult<PostgresStore> {
        PostgresStore::open(parse_url(url)?).await
    }

    /// Like `connect`, but every pooled connection works in `schema` (created if missing): tests
    /// give each store a fresh schema of one shared database so they never see each other's rows.
    pub async fn connect_in_schema(url: &str, schema: &str) -> StoreResult<PostgresStore> {
        let options = parse_url(url)?;
        let mut conn = options.connect().await.map_err(map_err)?;
        conn.execute(format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(schema)).as_str())
            .await
            .map_err(map_err)?;
        // Close politely; a failure here only loses a connection that is dropped anyway.
        let _ = sqlx::Connection::close(conn).await;
        PostgresStore::open(options.options([("search_path", schema)])).await
    }

    async fn open(options: PgConnectOptions) -> StoreResult<PostgresStore> {
        // One direct connection first: the pool retries a refused connection until its acquire
        // timeout and then reports only "pool timed out", while a node started against a wrong
        // address should fail at once and say why. Later, while serving, the pool's retries are
        // what we want (PostgreSQL restarting), so they stay.
        let probe = options.connect().await.map_err(map_err)?;
        // Closing politely only spares the server a log line; a failure changes nothing.
        let _ = sqlx::Connection::close(probe).await;
        let pool = PgPoolOptions::new()
            .max_connections(POOL_SIZE)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(map_err)?;
        migrator().run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => match map_err(e) {
                StoreError::Unavailable(m) => StoreError::Unavailable(m),
                other => StoreError::Internal(format!("migration failed: {other}")),
            },
            e => StoreError::Internal(format!("migration failed: {e}")),
        })?;
        let schema: String = sqlx::query_scalar("SELECT current_schema()::TEXT")
            .fetch_one(&pool)
            .await
            .map_err(map_err)?;
        Ok(PostgresStore {
            pool,
            channel: channel_name(&schema),
        })
    }

    async fn begin(&self) -> StoreResult<Transaction<'static, Postgres>> {
        self.pool.begin().await.map_err(map_err)
    }
}

/// Parses a database URL. The URL carries the password, so the error never repeats it.
fn parse_url(url: &str) -> StoreResult<PgConnectOptions> {
    let options = PgConnectOptions::from_str(url)
        .map_err(|_| StoreError::Internal("invalid PostgreSQL database URL".to_string()))?;
    // Without this every start logs the server's NOTICEs (such as "relation _sqlx_migrations
    // already exists, skipping") at info level; warnings and errors still come through.
    Ok(options.options([("client_min_messages", "warning")]))
}

/// The NOTIFY channel of a schema's change log. Channel names are identifiers (at most 63
/// bytes); a longer schema name is cut, which at worst makes two schemas hear each other's
/// changes (extra cache drops, never a missed one).
fn channel_name(schema: &str) -> String {
    let mut name = format!("keyward_changes_{schema}");
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// Appends a change to the log and announces it, inside the write's transaction: the NOTIFY is
/// delivered when (and only if) the transaction commits.
async fn note_change_tx(
    tx: &mut Transaction<'_, Postgres>,
    channel: &str,
    audit: &AuditEvent,
) -> StoreResult<()> {
    let seq: i64 = sqlx::query_scalar(
        "INSERT INTO changes (org_id, changed_at) VALUES ($1, $2) RETURNING seq",
    )
    .bind(audit.org_id.to_string())
    .bind(ms(audit.occurred_at))
    .fetch_one(&mut **tx)
    .await
    .map_err(map_err)?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel)
        .bind(seq.to_string())
        .execute(&mut **tx)
        .await
        .map_err(map_err)?;
    Ok(())
}

/// How long the change log keeps its rows: the log is read only for its head, and a day of
/// history is kept for operators.
const CHANGE_LOG_RETENTION_MS: i64 = 24 * 3600 * 1000;

/// The PostgreSQL change watch: a dedicated LISTEN connection, checked with a round trip
/// whenever it has been quiet for the wait, so a connection that died silently is noticed.
///
/// sqlx's listener can reconnect on its own, and notifications sent while it was away are lost.
/// So it never reconnects eagerly here, and the heartbeat reads the server process id of the
/// connection it ran on: a different one means the connection was replaced, which is reported
/// as `Resumed` (every cache dropped), never as `Quiet`.
struct PgChangeWatch {
    pool: PgPool,
    channel: String,
    listener: Option<sqlx::postgres::PgListener>,
    /// The server process of the listening connection.
    backend_pid: i64,
    /// The change log's head when last read.
    head: i64,
}

impl PgChangeWatch {
    /// The listening connection's server process and the change log's head.
    async fn read_head(listener: &mut sqlx::postgres::PgListener) -> StoreResult<(i64, i64)> {
        let row = sqlx::query(
            "SELECT pg_backend_pid()::BIGINT AS pid, COALESCE(MAX(seq), 0)::BIGINT AS head FROM changes",
        )
        .fetch_one(listener)
        .await
        .map_err(map_err)?;
        Ok((get::<i64>(&row, "pid")?, get::<i64>(&row, "head")?))
    }

    /// Notes a notification's sequence number and drains those already received: a burst of
    /// writes is one signal.
    fn heard(&mut self, first: sqlx::postgres::PgNotification) {
        let mut seq = first.payload().parse::<i64>().unwrap_or(0);
        if let Some(listener) = self.listener.as_mut() {
            while let Some(n) = listener.next_buffered() {
                seq = seq.max(n.payload().parse::<i64>().unwrap_or(0));
            }
        }
        self.head = self.head.max(seq);
    }

    async fn connect(&mut self, wait: Duration) -> StoreResult<Signal> {
        let connect = async {
            let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool)
                .await
                .map_err(map_err)?;
            listener.eager_reconnect(false);
            listener.listen(&self.channel).await.map_err(map_err)?;
            let (pid, head) = Self::read_head(&mut listener).await?;
            Ok::<_, StoreError>((listener, pid, head))
        };
        let (listener, pid, head) =
            tokio::time::timeout(wait * 2, connect)
                .await
                .map_err(|_| {
                    StoreError::Unavailable("connecting the change watch timed out".into())
                })??;
        self.listener = Some(listener);
        self.backend_pid = pid;
        self.head = head;
        Ok(Signal::Resumed)
    }

    async fn step(&mut self, wait: Duration) -> StoreResult<Signal> {
        let Some(listener) = self.listener.as_mut() else {
            return self.connect(wait).await;
        };
        if let Some(n) = listener.next_buffered() {
            self.heard(n);
            return Ok(Signal::Changed);
        }
        match tokio::time::timeout(wait, listener.try_recv()).await {
            Ok(Ok(Some(n))) => {
                self.heard(n);
                Ok(Signal::Changed)
            }
            // The connection was lost (and, without eager reconnection, not replaced): what
            // was said since is lost; the next call reconnects and reports `Resumed`.
            Ok(Ok(None)) => Err(StoreError::Unavailable(
                "the change watch lost its connection".into(),
            )),
            Ok(Err(e)) => Err(map_err(e)),
            Err(_quiet) => {
                let (pid, head) = tokio::time::timeout(wait * 2, Self::read_head(listener))
                    .await
                    .map_err(|_| {
                        StoreError::Unavailable("the change watch heartbeat timed out".into())
                    })??;
                if pid != self.backend_pid {
                    // The connection was replaced under us: notifications may have been lost.
                    self.backend_pid = pid;
                    self.head = head;
                    return Ok(Signal::Resumed);
                }
                if head != self.head {
                    // A write whose NOTIFY never reached this connection.
                    self.head = head;
                    Ok(Signal::Changed)
                } else {
                    Ok(Signal::Quiet)
                }
            }
        }
    }
}

/// Deletes change-log rows older than the retention and expired signature claims, every ten
/// minutes, on its own task so the
/// watch never waits for it; failures only delay the next prune. Ends when the pool closes.
fn spawn_change_log_pruner(pool: PgPool) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(600));
        loop {
            tick.tick().await;
            if pool.is_closed() {
                return;
            }
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let _ = sqlx::query("DELETE FROM signatures_seen WHERE expires_at < $1")
                .bind(now_ms / 1000)
                .execute(&pool)
                .await;
            // Keep the newest row whatever its age: the log's head must never go back.
            let _ = sqlx::query(
                "DELETE FROM changes WHERE changed_at < $1 \
                 AND seq < (SELECT COALESCE(MAX(seq), 0) FROM changes)",
            )
            .bind(now_ms - CHANGE_LOG_RETENTION_MS)
            .execute(&pool)
            .await;
        }
    });
}

#[async_trait]
impl ChangeWatch for PgChangeWatch {
    async fn next(&mut self, wait: Duration) -> StoreResult<Signal> {
        let r = self.step(wait).await;
        if r.is_err() {
            // Whatever state the connection is in, the next call starts from a fresh one.
            self.listener = None;
        }
        r
    }
}

/// Quotes an SQL identifier (a schema name), doubling embedded quotes.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Maps sqlx errors to domain errors once, here.
/// Most usage rows written by one statement.
const USAGE_ROWS_PER_STATEMENT: usize = 10_000;

fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => match db.constraint() {
            Some("agents_live_name") => StoreError::AgentNameExists,
            Some("orgs_name_unique") => StoreError::OrgNameExists,
            Some("idempotency_keys_pkey") => StoreError::IdempotencyKeyTaken,
            _ => StoreError::Internal(db.message().to_string()),
        },
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // Class 08: connection exceptions; 57P01-57P03: the server is shutting down or
            // starting; 53300: too many connections; 40001/40P01: serialization failure or
            // deadlock, which a retry resolves. All mean "try again", not "this is wrong".
            if code.starts_with("08")
                || code.starts_with("57P")
                || code == "53300"
                || code == "40001"
                || code == "40P01"
            {
                StoreError::Unavailable(db.message().to_string())
            } else {
                StoreError::Internal(db.message().to_string())
            }
        }
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e.to_string()),
        _ => StoreError::Internal(e.to_string()),
    }
}

impl Columns for PgRow {
    fn text(&self, col: &str) -> StoreResult<String> {
        self.try_get(col).map_err(map_err)
    }
    fn opt_text(&self, col: &str) -> StoreResult<Option<String>> {
        self.try_get(col).map_err(map_err)
    }
    fn int(&self, col: &str) -> StoreResult<i64> {
        self.try_get(col).map_err(map_err)
    }
    fn opt_int(&self, col: &str) -> StoreResult<Option<i64>> {
        self.try_get(col).map_err(map_err)
    }
    fn bytes(&self, col: &str) -> StoreResult<Vec<u8>> {
        self.try_get(col).map_err(map_err)
    }
    fn opt_bytes(&self, col: &str) -> StoreResult<Option<Vec<u8>>> {
        self.try_get(col).map_err(map_err)
    }
    fn flag(&self, col: &str) -> StoreResult<bool> {
        self.try_get(col).map_err(map_err)
    }
}

async fn insert_key_tx(tx: &mut Transaction<'static, Postgres>, k: &Key) -> StoreResult<()> {
    let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str()).collect();
    let cidrs = keyward_core::cidr::to_strings(&k.cidr_allowlist);
    sqlx::query(
        "INSERT INTO keys (id, org_id, agent_id, parent_key_id, kind, environment, name, start, \
         digest, scopes, cidr_allowlist, rate_limit, quota, alert_thresholds, requires_signature, \
         signing_secret_enc, expires_at, deprecated_at, revoked_at, successor_key_id, \
         created_at, metadata) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)",
    )
    .bind(k.id.to_string())
    .bind(k.org_id.to_string())
    .bind(k.agent_id.map(|u| u.to_string()))
    .bind(k.parent_key_id.map(|u| u.to_string()))
    .bind(k.kind.as_str())
    .bind(k.environment.as_str())
    .bind(&k.name)
    .bind(&k.start)
    .bind(k.digest.as_bytes())
    .bind(to_json(&scopes)?)
    .bind(to_json(&cidrs)?)
    .bind(k.rate_limit.as_ref().map(to_json).transpose()?)
    .bind(k.quota.as_ref().map(to_json).transpose()?)
    .bind(to_json(&k.alert_thresholds)?)
    .bind(k.requires_signature)
    .bind(k.signing_secret_enc.as_deref())
    .bind(opt_ms(k.expires_at))
    .bind(opt_ms(k.deprecated_at))
    .bind(opt_ms(k.revoked_at))
    .bind(k.successor_key_id.map(|u| u.to_string()))
    .bind(ms(k.created_at))
    .bind(to_json(&k.metadata)?)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    // A key arrives used only when it is copied (an import); its last use lives beside it.
    if let Some(at) = k.last_used_at {
        sqlx::query("INSERT INTO key_last_used (key_id, at) VALUES ($1, $2)")
            .bind(k.id.to_string())
            .bind(ms(at))
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
    }
    Ok(())
}

async fn insert_audit_tx(
    tx: &mut Transaction<'static, Postgres>,
    e: &AuditEvent,
) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO audit_events (id, org_id, occurred_at, action, outcome, error_code, \
         actor_key_id, actor_agent_id, target_type, target_id, client_ip, request_id, run_id, \
         thread_id, parent_agent, traceparent, trace_meta, details) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)",
    )
    .bind(e.id.to_string())
    .bind(e.org_id.to_string())
    .bind(ms(e.occurred_at))
    .bind(&e.action)
    .bind(e.outcome.as_str())
    .bind(&e.error_code)
    .bind(e.actor_key_id.map(|u| u.to_string()))
    .bind(e.actor_agent_id.map(|u| u.to_string()))
    .bind(&e.target_type)
    .bind(e.target_id.map(|u| u.to_string()))
    .bind(&e.client_ip)
    .bind(&e.request_id)
    .bind(&e.trace.run_id)
    .bind(&e.trace.thread_id)
    .bind(&e.trace.parent_agent)
    .bind(&e.trace.traceparent)
    .bind(to_json(&e.trace.meta)?)
    .bind(to_json(&e.details)?)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// Claims an idempotency key inside the creating transaction. An expired record (older than 24
/// hours) is replaced; a live one makes the insert fail with `IdempotencyKeyTaken`.
async fn insert_idem_tx(
    tx: &mut Transaction<'static, Postgres>,
    r: &IdempotencyRecord,
) -> StoreResult<()> {
    let cutoff = ms(r.created_at) - crate::IDEMPOTENCY_TTL_MS;
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE org_id = $1 AND idem_key = $2 AND created_at < $3",
    )
    .bind(r.org_id.to_string())
    .bind(&r.key)
    .bind(cutoff)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    sqlx::query(
        "INSERT INTO idempotency_keys (org_id, idem_key, request_hash, status, response, \
         agent_id, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(r.org_id.to_string())
    .bind(&r.key)
    .bind(&r.request_hash[..])
    .bind(r.status as i64)
    .bind(to_json(&r.response)?)
    .bind(r.agent_id.map(|u| u.to_string()))
    .bind(ms(r.created_at))
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    Ok(())
}

/// The agent's status, read under a share lock: a concurrent `update_agent` or revocation of the
/// agent (which lock it for update) waits for this transaction, and this one sees theirs.
async fn agent_status_tx(
    tx: &mut Transaction<'static, Postgres>,
    agent_id: Uuid,
) -> StoreResult<Option<AgentStatus>> {
    let row = sqlx::query("SELECT status FROM agents WHERE id = $1 FOR SHARE")
        .bind(agent_id.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?;
    row.map(|r| {
        AgentStatus::parse(&get::<String>(&r, "status")?).ok_or_else(|| corrupt("agent status"))
    })
    .transpose()
}

/// A key read inside a transaction; `lock` is appended to the query (`""`, `" FOR SHARE"` or
/// `" FOR UPDATE"`).
async fn key_tx(
    tx: &mut Transaction<'static, Postgres>,
    id: Uuid,
    lock: &str,
) -> StoreResult<Option<Key>> {
    let row = sqlx::query(&format!(
        "SELECT {KEY_COLS} FROM keys k WHERE k.id = $1{lock}"
    ))
    .bind(id.to_string())
    .fetch_optional(&mut **tx)
    .await
    .map_err(map_err)?;
    row.as_ref().map(row_to_key).transpose()
}

/// The ids of a key's live derived descendants (children, grandchildren, ...), sorted.
async fn live_descendants_tx(
    tx: &mut Transaction<'static, Postgres>,
    key_id: Uuid,
) -> StoreResult<Vec<Uuid>> {
    let rows = sqlx::query(
        "WITH RECURSIVE d(id) AS ( \
           SELECT id FROM keys WHERE parent_key_id = $1 \
           UNION SELECT k.id FROM keys k JOIN d ON k.parent_key_id = d.id) \
         SELECT keys.id FROM keys JOIN d ON keys.id = d.id WHERE keys.revoked_at IS NULL \
         ORDER BY keys.id",
    )
    .bind(key_id.to_string())
    .fetch_all(&mut **tx)
    .await
    .map_err(map_err)?;
    rows.iter()
        .map(|r| uuid(&get::<String>(r, "id")?))
        .collect()
}

/// Ids as a text array, for `= ANY($n)`.
fn ids(ids: &[Uuid]) -> Vec<String> {
    ids.iter().map(|u| u.to_string()).collect()
}

#[async_trait]
impl Store for PostgresStore {
    /// Closes the pool, waiting for connections in use to come back, so the server ends its
    /// sessions instead of seeing them dropped.
    async fn close(&self) {
        self.pool.close().await;
    }

    fn is_shared(&self) -> bool {
        true
    }

    async fn watch_changes(&self) -> StoreResult<Option<Box<dyn ChangeWatch>>> {
        spawn_change_log_pruner(self.pool.clone());
        Ok(Some(Box::new(PgChangeWatch {
            pool: self.pool.clone(),
            channel: self.channel.clone(),
            listener: None,
            backend_pid: 0,
            head: 0,
        })))
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.pool)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(())
    }

    async fn first_org(&self) -> StoreResult<Option<Org>> {
        let row = sqlx::query("SELECT * FROM orgs ORDER BY created_at, id LIMIT 1")
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(row_to_org).transpose()
    }

    async fn create_org(&self, org: &Org, root_key: &Key, audit: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO orgs (id, name, policy, created_at) VALUES ($1, $2, $3, $4)")
            .bind(org.id.to_string())
            .bind(&org.name)
            .bind(to_json(&org.policy)?)
            .bind(ms(org.created_at))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        insert_key_tx(&mut tx, root_key).await?;
        insert_audit_tx(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn get_org(&self, id: Uuid) -> StoreResult<Option<Org>> {
        let row = sqlx::query("SELECT * FROM orgs WHERE id = $1")
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(row_to_org).transpose()
    }

    async fn update_org(&self, org: &Org, audit: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let res = sqlx::query("UPDATE orgs SET name = $1, policy = $2 WHERE id = $3")
            .bind(&org.name)
            .bind(to_json(&org.policy)?)
            .bind(org.id.to_string())
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        if res.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        insert_audit_tx(&mut tx, audit).await?;
        note_change_tx(&mut tx, &self.channel, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn create_agent(
        &self,
        a: &Agent,
        key: &Key,
        audit: &[AuditEvent],
        idem: Option<&IdempotencyRecord>,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        if let Some(r) = idem {
            insert_idem_tx(&mut tx, r).await?;
        }
        if let Some(parent) = a.parent_agent_id {
            match agent_status_tx(&mut tx, parent).await? {
                Some(AgentStatus::Active) => {}
                Some(_) => return Err(StoreError::AgentRevoked),
                None => return Err(StoreError::NotFound),
            }
        }
        sqlx::query(&format!(
            "INSERT INTO agents ({AGENT_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)"
        ))
        .bind(a.id.to_string())
        .bind(a.org_id.to_string())
        .bind(&a.name)
        .bind(&a.display_name)
        .bind(a.agent_type.as_str())
        .bind(a.status.as_str())
        .bind(to_json(&a.scopes)?)
        .bind(to_json(&a.metadata)?)
        .bind(to_json(&a.policy)?)
        .bind(to_json(&a.capabilities)?)
        .bind(&a.did)
        .bind(a.owner_user_id.map(|u| u.to_string()))
        .bind(a.parent_agent_id.map(|u| u.to_string()))
        .bind(a.version)
        .bind(ms(a.created_at))
        .bind(ms(a.updated_at))
        .bind(opt_ms(a.revoked_at))
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_key_tx(&mut tx, key).await?;
        for e in audit {
            insert_audit_tx(&mut tx, e).await?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn get_agent(&self, org_id: Uuid, id: Uuid) -> StoreResult<Option<Agent>> {
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLS} FROM agents WHERE org_id = $1 AND id = $2"
        ))
        .bind(org_id.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(row_to_agent).transpose()
    }

    async fn get_agent_by_name(&self, org_id: Uuid, name: &str) -> StoreResult<Option<Agent>> {
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLS} FROM agents WHERE org_id = $1 AND name = $2 AND status <> 'revoked'"
        ))
        .bind(org_id.to_string())
        .bind(name)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        row.as_ref().map(row_to_agent).transpose()
    }

    async fn list_agents(
        &self,
        org_id: Uuid,
        include_revoked: bool,
        page: Page,
    ) -> StoreResult<Vec<Agent>> {
        let filter = if include_revoked {
            ""
        } else {
            "AND status <> 'revoked'"
        };
        let rows = sqlx::query(&format!(
            "SELECT {AGENT_COLS} FROM agents WHERE org_id = $1 {filter} \
             ORDER BY created_at, id LIMIT $2 OFFSET $3"
        ))
        .bind(org_id.to_string())
        .bind(page.limit as i64 + 1)
        .bind(page.offset as i64)
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter().map(row_to_agent).collect()
    }

    async fn update_agent(
        &self,
        a: &Agent,
        expected_version: i64,
        audit: &AuditEvent,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let current = sqlx::query(
            "SELECT status, version FROM agents WHERE org_id = $1 AND id = $2 FOR UPDATE",
        )
        .bind(a.org_id.to_string())
        .bind(a.id.to_string())
        .fetch_optional(&mut *tx)
        .await
        .map_err(map_err)?
        .ok_or(StoreError::NotFound)?;
        if get::<String>(&current, "status")? == "revoked" {
            return Err(StoreError::AgentRevoked);
        }
        if get::<i64>(&current, "version")? != expected_version {
            return Err(StoreError::Conflict);
        }
        sqlx::query(
            "UPDATE agents SET display_name = $1, status = $2, scopes = $3, metadata = $4, policy = $5, \
             capabilities = $6, did = $7, version = $8, updated_at = $9, revoked_at = $10 \
             WHERE id = $11 AND version = $12",
        )
        .bind(&a.display_name)
        .bind(a.status.as_str())
        .bind(to_json(&a.scopes)?)
        .bind(to_json(&a.metadata)?)
        .bind(to_json(&a.policy)?)
        .bind(to_json(&a.capabilities)?)
        .bind(&a.did)
        .bind(a.version)
        .bind(ms(a.updated_at))
        .bind(opt_ms(a.revoked_at))
        .bind(a.id.to_string())
        .bind(expected_version)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_audit_tx(&mut tx, audit).await?;
        note_change_tx(&mut tx, &self.channel, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn insert_key(
        &self,
        key: &Key,
        audit: &AuditEvent,
        idem: Option<&IdempotencyRecord>,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        if let Some(r) = idem {
            insert_idem_tx(&mut tx, r).await?;
        }
        if let Some(agent_id) = key.agent_id {
            match agent_status_tx(&mut tx, agent_id).await? {
                Some(AgentStatus::Revoked) => return Err(StoreError::AgentRevoked),
                Some(_) => {}
                None => return Err(StoreError::NotFound),
            }
        }
        if let Some(parent) = key.parent_key_id {
            // A share lock on the parent makes a concurrent revocation of it wait for this insert
            // (and cascade to the new key) or this insert see the revocation.
            let p = key_tx(&mut tx, parent, " FOR SHARE")
                .await?
                .ok_or(StoreError::NotFound)?;
            if p.revoked_at.is_some() {
                return Err(StoreError::KeyAlreadyRevoked);
            }
        }
        insert_key_tx(&mut tx, key).await?;
        insert_audit_tx(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn import_keys(&self, keys: &[Key], audit: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let mut checked: Vec<Uuid> = Vec::new();
        for k in keys {
            if let Some(agent_id) = k.agent_id {
                if !checked.contains(&agent_id) {
                    match agent_status_tx(&mut tx, agent_id).await? {
                        Some(AgentStatus::Revoked) => return Err(StoreError::AgentRevoked),
                        Some(_) => checked.push(agent_id),
                        None => return Err(StoreError::NotFound),
                    }
                }
            }
            insert_key_tx(&mut tx, k).await?;
        }
        insert_audit_tx(&mut tx, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn get_key(&self, id: Uuid) -> StoreResult<Option<Key>> {
        let row = sqlx::query(&format!("SELECT {KEY_COLS} FROM keys k WHERE k.id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_err)?;
        row.as_ref().map(row_to_key).transpose()
    }

    async fn find_key_by_digest(&self, digest: &TokenDigest) -> StoreResult<Option<KeyWithAgent>> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLS}, a.status AS agent_status, a.name AS agent_name, \
             a.policy AS agent_policy, \
             o.policy AS org_policy FROM keys k JOIN orgs o ON o.id = k.org_id \
             LEFT JOIN agents a ON a.id = k.agent_id WHERE k.digest = $1"
        ))
        .bind(digest.as_bytes())
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        match row {
            None => Ok(None),
            Some(row) => {
                let key = row_to_key(&row)?;
                let agent_status = get::<Option<String>>(&row, "agent_status")?
                    .map(|s| AgentStatus::parse(&s).ok_or_else(|| corrupt("agent status")))
                    .transpose()?;
                let agent_policy = get::<Option<String>>(&row, "agent_policy")?
                    .map(|s| from_json(&s, "agent policy"))
                    .transpose()?;
                let org_policy = from_json(&get::<String>(&row, "org_policy")?, "org policy")?;
                Ok(Some(KeyWithAgent {
                    key,
                    agent_status,
                    agent_name: get(&row, "agent_name")?,
                    agent_policy,
                    org_policy,
                }))
            }
        }
    }

    async fn list_keys(
        &self,
        org_id: Uuid,
        filter: &KeyFilter,
        page: Page,
    ) -> StoreResult<Vec<Key>> {
        let mut q: QueryBuilder<Postgres> =
            QueryBuilder::new(format!("SELECT {KEY_COLS} FROM keys k WHERE k.org_id = "));
        q.push_bind(org_id.to_string());
        if let Some(a) = filter.agent_id {
            q.push(" AND k.agent_id = ").push_bind(a.to_string());
        }
        if let Some(kind) = filter.kind {
            q.push(" AND k.kind = ").push_bind(kind.as_str());
        }
        if !filter.include_revoked {
            q.push(" AND k.revoked_at IS NULL");
        }
        q.push(" ORDER BY k.created_at, k.id LIMIT ")
            .push_bind(page.limit as i64 + 1)
            .push(" OFFSET ")
            .push_bind(page.offset as i64);
        let rows = q.build().fetch_all(&self.pool).await.map_err(map_err)?;
        rows.iter().map(row_to_key).collect()
    }

    async fn update_key(&self, k: &Key, audit: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let quota = k.quota.as_ref().map(to_json).transpose()?;
        // A quota set, changed or removed starts its counters again from the uses counted in
        // the store: a counter kept from before would miss the uses made without it, or count a
        // day with an hour's row.
        sqlx::query(
            "DELETE FROM quota_counters WHERE key_id = $1 AND EXISTS \
             (SELECT 1 FROM keys WHERE id = $1 AND quota IS DISTINCT FROM $2)",
        )
        .bind(k.id.to_string())
        .bind(&quota)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        let cidrs = keyward_core::cidr::to_strings(&k.cidr_allowlist);
        let res = sqlx::query(
            "UPDATE keys SET name = $1, cidr_allowlist = $2, rate_limit = $3, quota = $4, \
             alert_thresholds = $5, metadata = $6, deprecated_at = $7 \
             WHERE id = $8 AND revoked_at IS NULL",
        )
        .bind(&k.name)
        .bind(to_json(&cidrs)?)
        .bind(k.rate_limit.as_ref().map(to_json).transpose()?)
        .bind(&quota)
        .bind(to_json(&k.alert_thresholds)?)
        .bind(to_json(&k.metadata)?)
        .bind(opt_ms(k.deprecated_at))
        .bind(k.id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if res.rows_affected() == 0 {
            return match key_tx(&mut tx, k.id, "").await? {
                None => Err(StoreError::NotFound),
                Some(_) => Err(StoreError::KeyAlreadyRevoked),
            };
        }
        insert_audit_tx(&mut tx, audit).await?;
        note_change_tx(&mut tx, &self.channel, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn revoke_key(
        &self,
        key_id: Uuid,
        now: Timestamp,
        force: bool,
        audit: &AuditEvent,
    ) -> StoreResult<Revoked> {
        let mut tx = self.begin().await?;
        // First find whose key it is (unlocked), then lock the owner: the agent row, or for a key
        // without an agent (root keys and what derives from them) the org row. Every revocation
        // in one agent or org therefore runs after the previous one committed, and the guard
        // below counts what that one left.
        let key = key_tx(&mut tx, key_id, "")
            .await?
            .ok_or(StoreError::NotFound)?;
        let agent_status = match key.agent_id {
            Some(agent_id) => {
                let row = sqlx::query("SELECT status FROM agents WHERE id = $1 FOR UPDATE")
                    .bind(agent_id.to_string())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(map_err)?;
                row.map(|r| {
                    AgentStatus::parse(&get::<String>(&r, "status")?)
                        .ok_or_else(|| corrupt("agent status"))
                })
                .transpose()?
            }
            None => {
                sqlx::query("SELECT id FROM orgs WHERE id = $1 FOR UPDATE")
                    .bind(key.org_id.to_string())
                    .fetch_optional(&mut *tx)
                    .await
                    .map_err(map_err)?;
                None
            }
        };
        // Lock the key itself and read it again: a derived key being inserted under it holds a
        // share lock on it, so it either commits first (and is found by the cascade below) or
        // sees this revocation. The re-read also sees a revocation that committed meanwhile.
        let key = key_tx(&mut tx, key_id, " FOR UPDATE")
            .await?
            .ok_or(StoreError::NotFound)?;
        if key.revoked_at.is_some() {
            return Err(StoreError::KeyAlreadyRevoked);
        }
        // Find the live descendants and lock them, until no new one appears: a grandchild
        // inserted under a child while we looked is caught by the next round.
        let mut cascaded = live_descendants_tx(&mut tx, key_id).await?;
        loop {
            sqlx::query("SELECT id FROM keys WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                .bind(ids(&cascaded))
                .fetch_all(&mut *tx)
                .await
                .map_err(map_err)?;
            let again = live_descendants_tx(&mut tx, key_id).await?;
            if again == cascaded {
                break;
            }
            cascaded = again;
        }
        let mut all = cascaded.clone();
        all.push(key_id);
        if !force {
            // Count what would stay live once the key and its cascade are revoked.
            let remaining: i64 = match key.agent_id {
                // The agent is already a tombstone: the guard has nothing to protect.
                Some(_) if agent_status == Some(AgentStatus::Revoked) => 1,
                Some(agent_id) => {
                    let row = sqlx::query(
                        "SELECT COUNT(*) AS n FROM keys WHERE agent_id = $1 \
                         AND revoked_at IS NULL AND NOT (id = ANY($2))",
                    )
                    .bind(agent_id.to_string())
                    .bind(ids(&all))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(map_err)?;
                    get(&row, "n")?
                }
                None if key.kind == TokenKind::Root => {
                    let row = sqlx::query(
                        "SELECT COUNT(*) AS n FROM keys WHERE org_id = $1 AND kind = 'root' \
                         AND revoked_at IS NULL AND NOT (id = ANY($2))",
                    )
                    .bind(key.org_id.to_string())
                    .bind(ids(&all))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(map_err)?;
                    get(&row, "n")?
                }
                None => 1,
            };
            if remaining == 0 {
                return Err(StoreError::LastActiveKey);
            }
        }
        sqlx::query("UPDATE keys SET revoked_at = $1 WHERE revoked_at IS NULL AND id = ANY($2)")
            .bind(ms(now))
            .bind(ids(&all))
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        insert_audit_tx(&mut tx, audit).await?;
        note_change_tx(&mut tx, &self.channel, audit).await?;
        let key = key_tx(&mut tx, key_id, "")
            .await?
            .ok_or(StoreError::NotFound)?;
        tx.commit().await.map_err(map_err)?;
        Ok(Revoked { key, cascaded })
    }

    async fn rotate_key(
        &self,
        old: &Key,
        successor: &Key,
        audit: &AuditEvent,
        idem: Option<&IdempotencyRecord>,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        if let Some(r) = idem {
            insert_idem_tx(&mut tx, r).await?;
        }
        if let Some(agent_id) = successor.agent_id {
            if agent_status_tx(&mut tx, agent_id).await? == Some(AgentStatus::Revoked) {
                return Err(StoreError::AgentRevoked);
            }
        }
        insert_key_tx(&mut tx, successor).await?;
        let res = sqlx::query(
            "UPDATE keys SET deprecated_at = $1, expires_at = $2, successor_key_id = $3 \
             WHERE id = $4 AND revoked_at IS NULL",
        )
        .bind(opt_ms(old.deprecated_at))
        .bind(opt_ms(old.expires_at))
        .bind(old.successor_key_id.map(|u| u.to_string()))
        .bind(old.id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if res.rows_affected() == 0 {
            return Err(StoreError::KeyAlreadyRevoked);
        }
        insert_audit_tx(&mut tx, audit).await?;
        note_change_tx(&mut tx, &self.channel, audit).await?;
        tx.commit().await.map_err(map_err)
    }

    async fn append_audit(&self, events: &[AuditEvent]) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        for e in events {
            insert_audit_tx(&mut tx, e).await?;
        }
        tx.commit().await.map_err(map_err)
    }

    async fn list_audit(
        &self,
        org_id: Uuid,
        f: &AuditFilter,
        page: Page,
    ) -> StoreResult<Vec<AuditEvent>> {
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(format!(
            "SELECT {AUDIT_COLS} FROM audit_events WHERE org_id = "
        ));
        q.push_bind(org_id.to_string());
        if let Some(a) = &f.action {
            q.push(" AND action = ").push_bind(a.clone());
        }
        if let Some(a) = f.agent_id {
            q.push(" AND (actor_agent_id = ")
                .push_bind(a.to_string())
                .push(" OR target_id = ")
                .push_bind(a.to_string())
                .push(")");
        }
        if let Some(k) = f.key_id {
            q.push(" AND (actor_key_id = ")
                .push_bind(k.to_string())
                .push(" OR target_id = ")
                .push_bind(k.to_string())
                .push(")");
        }
        if let Some(r) = &f.run_id {
            q.push(" AND run_id = ").push_bind(r.clone());
        }
        if let Some(t) = &f.thread_id {
            q.push(" AND thread_id = ").push_bind(t.clone());
        }
        if let Some(o) = f.outcome {
            q.push(" AND outcome = ").push_bind(o.as_str());
        }
        if let Some(s) = f.since {
            q.push(" AND occurred_at >= ").push_bind(ms(s));
        }
        if let Some(u) = f.until {
            q.push(" AND occurred_at < ").push_bind(ms(u));
        }
        q.push(" ORDER BY occurred_at DESC, id DESC LIMIT ")
            .push_bind(page.limit as i64 + 1)
            .push(" OFFSET ")
            .push_bind(page.offset as i64);
        let rows = q.build().fetch_all(&self.pool).await.map_err(map_err)?;
        rows.iter().map(row_to_audit).collect()
    }

    async fn prune_idempotency(&self, before: Timestamp, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM idempotency_keys WHERE ctid IN \
             (SELECT ctid FROM idempotency_keys WHERE created_at < $1 LIMIT $2)",
        )
        .bind(ms(before))
        .bind(i64::from(limit))
        .execute(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(done.rows_affected())
    }

    async fn get_idempotency(
        &self,
        org_id: Uuid,
        key: &str,
    ) -> StoreResult<Option<IdempotencyRecord>> {
        let row = sqlx::query(
            "SELECT request_hash, status, response, agent_id, created_at FROM idempotency_keys \
             WHERE org_id = $1 AND idem_key = $2",
        )
        .bind(org_id.to_string())
        .bind(key)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        let Some(row) = row else { return Ok(None) };
        let hash: Vec<u8> = get(&row, "request_hash")?;
        let request_hash: [u8; 32] = hash.try_into().map_err(|_| corrupt("request hash"))?;
        Ok(Some(IdempotencyRecord {
            org_id,
            key: key.to_string(),
            request_hash,
            status: u16::try_from(get::<i64>(&row, "status")?).map_err(|_| corrupt("status"))?,
            response: from_json(&get::<String>(&row, "response")?, "stored response")?,
            agent_id: opt_uuid(get(&row, "agent_id")?)?,
            created_at: from_ms(get(&row, "created_at")?)?,
        }))
    }

    async fn record_usage(
        &self,
        deltas: &[UsageDelta],
        last_used: &[(Uuid, Timestamp)],
        alerts: &[ThresholdAlert],
    ) -> StoreResult<()> {
        if deltas.is_empty() && last_used.is_empty() && alerts.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        // One statement per kind of row (arrays that `UNNEST` unrolls), not one per row: a busy
        // node uses thousands of keys a second. Rows are sorted once, globally, and each
        // statement also aggregates and orders its own, so every flush locks rows in one fixed
        // order (key, then hour) across all its statements: two nodes flushing overlapping
        // counters wait for each other instead of deadlocking, and a batch naming one row twice
        // cannot update it twice.
        let (deltas, last_used) = crate::in_key_order(deltas, last_used);
        for chunk in deltas.chunks(USAGE_ROWS_PER_STATEMENT) {
            let key_ids: Vec<String> = chunk.iter().map(|d| d.key_id.to_string()).collect();
            let org_ids: Vec<String> = chunk.iter().map(|d| d.org_id.to_string()).collect();
            let hours: Vec<i64> = chunk.iter().map(|d| ms(d.hour)).collect();
            let allowed: Vec<i64> = chunk.iter().map(|d| d.allowed as i64).collect();
            let denied: Vec<i64> = chunk.iter().map(|d| d.denied as i64).collect();
            let limited: Vec<i64> = chunk.iter().map(|d| d.rate_limited as i64).collect();
            sqlx::query(
                "INSERT INTO usage_hourly (key_id, org_id, hour_start, allowed, denied, rate_limited) \
                 SELECT k, min(o), h, sum(a), sum(d), sum(r) \
                 FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[]) \
                 AS u(k, o, h, a, d, r) GROUP BY k, h ORDER BY k, h \
                 ON CONFLICT (key_id, hour_start) DO UPDATE SET \
                 allowed = usage_hourly.allowed + excluded.allowed, \
                 denied = usage_hourly.denied + excluded.denied, \
                 rate_limited = usage_hourly.rate_limited + excluded.rate_limited",
            )
            .bind(key_ids)
            .bind(org_ids)
            .bind(hours)
            .bind(allowed)
            .bind(denied)
            .bind(limited)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        for chunk in last_used.chunks(USAGE_ROWS_PER_STATEMENT) {
            let key_ids: Vec<String> = chunk.iter().map(|(id, _)| id.to_string()).collect();
            let ats: Vec<i64> = chunk.iter().map(|(_, at)| ms(*at)).collect();
            sqlx::query(
                "INSERT INTO key_last_used (key_id, at) \
                 SELECT k, max(t) FROM UNNEST($1::text[], $2::bigint[]) AS u(k, t) \
                 GROUP BY k ORDER BY k \
                 ON CONFLICT (key_id) DO UPDATE SET at = GREATEST(key_last_used.at, excluded.at)",
            )
            .bind(key_ids)
            .bind(ats)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
        }
        for a in alerts {
            let res = sqlx::query(
                "INSERT INTO quota_alerts (key_id, period_start, threshold) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(a.key_id.to_string())
            .bind(ms(a.period_start))
            .bind(a.threshold as i64)
            .execute(&mut *tx)
            .await
            .map_err(map_err)?;
            if res.rows_affected() == 1 {
                insert_audit_tx(&mut tx, &a.event).await?;
            }
        }
        tx.commit().await.map_err(map_err)
    }

    async fn usage_hours(
        &self,
        key_id: Uuid,
        since: Timestamp,
        until: Timestamp,
    ) -> StoreResult<Vec<UsageBucket>> {
        let rows = sqlx::query(
            "SELECT hour_start, allowed, denied, rate_limited FROM usage_hourly \
             WHERE key_id = $1 AND hour_start >= $2 AND hour_start < $3 ORDER BY hour_start",
        )
        .bind(key_id.to_string())
        .bind(ms(since))
        .bind(ms(until))
        .fetch_all(&self.pool)
        .await
        .map_err(map_err)?;
        rows.iter()
            .map(|r| {
                Ok(UsageBucket {
                    start: from_ms(get(r, "hour_start")?)?,
                    allowed: get::<i64>(r, "allowed")?.max(0) as u64,
                    denied: get::<i64>(r, "denied")?.max(0) as u64,
                    rate_limited: get::<i64>(r, "rate_limited")?.max(0) as u64,
                })
            })
            .collect()
    }

    async fn allowed_between(
        &self,
        key_id: Uuid,
        since: Timestamp,
        until: Timestamp,
    ) -> StoreResult<u64> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(allowed), 0)::BIGINT AS n FROM usage_hourly \
             WHERE key_id = $1 AND hour_start >= $2 AND hour_start < $3",
        )
        .bind(key_id.to_string())
        .bind(ms(since))
        .bind(ms(until))
        .fetch_one(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(get::<i64>(&row, "n")?.max(0) as u64)
    }

    async fn take_quota_unit(
        &self,
        key_id: Uuid,
        period_start: Timestamp,
        period_end: Timestamp,
        limit: u64,
    ) -> StoreResult<Option<u64>> {
        if limit == 0 {
            return Ok(None);
        }
        // One statement: the conflicting row is locked for the update, so concurrent takes from
        // every node run one after the other and the `used < limit` check sees each result. A
        // new row starts from the period's allowed uses already counted.
        let used: Option<i64> = sqlx::query_scalar(
            "INSERT INTO quota_counters (key_id, period_start, used) \
             SELECT $1, $2, s.n + 1 FROM (SELECT COALESCE(SUM(allowed), 0)::BIGINT AS n \
               FROM usage_hourly WHERE key_id = $1 AND hour_start >= $2 AND hour_start < $4) s \
             WHERE s.n < $3 \
             ON CONFLICT (key_id, period_start) DO UPDATE SET used = quota_counters.used + 1 \
             WHERE quota_counters.used < $3 RETURNING used",
        )
        .bind(key_id.to_string())
        .bind(ms(period_start))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(ms(period_end))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(used.map(|n| n.max(0) as u64))
    }

    async fn claim_signature(&self, id: &[u8; 32], expires_at: i64, now: i64) -> StoreResult<bool> {
        // The first insert wins; an expired claim may be taken again (its timestamp is outside
        // the window by then, so only a clock far off could present it).
        let claimed: Option<i32> = sqlx::query_scalar(
            "INSERT INTO signatures_seen (id, expires_at) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET expires_at = EXCLUDED.expires_at \
             WHERE signatures_seen.expires_at < $3 RETURNING 1",
        )
        .bind(&id[..])
        .bind(expires_at)
        .bind(now)
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(claimed.is_some())
    }

    async fn quota_units(&self, key_id: Uuid, period_start: Timestamp) -> StoreResult<u64> {
        let used: Option<i64> = sqlx::query_scalar(
            "SELECT used FROM quota_counters WHERE key_id = $1 AND period_start = $2",
        )
        .bind(key_id.to_string())
        .bind(ms(period_start))
        .fetch_optional(&self.pool)
        .await
        .map_err(map_err)?;
        Ok(used.unwrap_or(0).max(0) as u64)
    }
}
