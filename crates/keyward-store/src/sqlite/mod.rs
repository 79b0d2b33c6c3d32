//! The embedded SQLite backend: one file under the data dir, no setup.
//!
//! Durability: WAL journal with `synchronous = FULL`. WAL lets readers run while a write commits;
//! FULL makes SQLite fsync the WAL at every commit, so a write that was acknowledged survives not
//! only a `kill -9` of the process (which NORMAL would also survive) but a power loss or kernel
//! crash too. Writes are rare next to verifications (which hit the cache), so the fsync per
//! commit is a price worth paying for "nothing acknowledged is ever lost".
//!
//! Concurrency: all writes go through a pool of exactly one connection and start with
//! `BEGIN IMMEDIATE`, so in-process writers queue in Rust instead of failing with SQLITE_BUSY,
//! and a writer in another process (`keyward orgs create` next to a running server) takes the
//! write lock up front and waits on `busy_timeout` rather than failing mid-transaction. Reads use
//! a separate pool and never block on the writer thanks to WAL.

mod hot;

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use keyward_core::model::{
    Agent, AgentStatus, AuditEvent, AuditFilter, IdempotencyRecord, Key, KeyFilter, Org, Page,
    Timestamp,
};
use keyward_core::token::{TokenDigest, TokenKind};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite, Transaction};
use uuid::Uuid;

use crate::codec::{
    corrupt, from_json, from_ms, get, ms, opt_ms, opt_uuid, row_to_agent, row_to_audit, row_to_key,
    row_to_org, to_json, uuid, Columns,
};

use crate::{
    KeyWithAgent, Revoked, Store, StoreError, StoreResult, ThresholdAlert, UsageBucket, UsageDelta,
};

/// The migrations, embedded in the binary so a fresh data dir needs nothing else.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "init", include_str!("migrations/0001_init.sql")),
    (2, "usage", include_str!("migrations/0002_usage.sql")),
    (
        3,
        "quota_counters",
        include_str!("migrations/0003_quota_counters.sql"),
    ),
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
        ..Migrator::DEFAULT
    }
}

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
    hot: std::sync::Arc<hot::HotReads>,
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

impl SqliteStore {
    /// Opens (creating if needed) the database file `path` and runs the migrations.
    pub async fn open(path: &Path) -> StoreResult<SqliteStore> {
        let base = SqliteConnectOptions::new()
            .filename(path)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(base.clone().create_if_missing(true))
            .await
            .map_err(map_err)?;
        migrator()
            .run(&writer)
            .await
            .map_err(|e| StoreError::Internal(format!("migration failed: {e}")))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(base.read_only(true))
            .await
            .map_err(map_err)?;
        Ok(SqliteStore {
            writer,
            reader,
            hot: std::sync::Arc::new(hot::HotReads::new(path.to_path_buf())),
        })
    }

    async fn begin(&self) -> StoreResult<Transaction<'static, Sqlite>> {
        self.writer
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(map_err)
    }
}

/// A key's allowed uses in a range of hours, for its quota.
const ALLOWED_BETWEEN: &str = "SELECT COALESCE(SUM(allowed), 0) AS n FROM usage_hourly \
     WHERE key_id = ? AND hour_start >= ? AND hour_start < ?";

/// A key with its agent's status, name and policy and its org's policy, by digest.
static KEY_BY_DIGEST: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "SELECT {KEY_COLS}, a.status AS agent_status, a.name AS agent_name, \
         a.policy AS agent_policy, \
         o.policy AS org_policy FROM keys k JOIN orgs o ON o.id = k.org_id \
         LEFT JOIN agents a ON a.id = k.agent_id WHERE k.digest = ?"
    )
});

/// A row of [`KEY_BY_DIGEST`], from either of the paths that read it.
fn key_with_agent<R: Columns>(row: &R) -> StoreResult<KeyWithAgent> {
    let key = row_to_key(row)?;
    let agent_status = get::<Option<String>>(row, "agent_status")?
        .map(|s| AgentStatus::parse(&s).ok_or_else(|| corrupt("agent status")))
        .transpose()?;
    let agent_policy = get::<Option<String>>(row, "agent_policy")?
        .map(|s| from_json(&s, "agent policy"))
        .transpose()?;
    let org_policy = from_json(&get::<String>(row, "org_policy")?, "org policy")?;
    Ok(KeyWithAgent {
        key,
        agent_status,
        agent_name: get(row, "agent_name")?,
        agent_policy,
        org_policy,
    })
}

/// Rows per multi-row upsert of the usage flush. A batch runs as statements of this many rows,
/// then its remainder in powers of two (see [`statement_sizes`]): whatever the batch's size, at
/// most nine distinct statement texts per table, each prepared once per connection (sqlx caches
/// prepared statements by their text). 256 rows of 6 values stay far below SQLite's limit of
/// 32,766 bound values per statement.
const UPSERT_ROWS: usize = 256;

/// The row counts of the statements a batch of `n` rows is written in: as many full
/// [`UPSERT_ROWS`] as fit, then the remainder's binary digits, largest first.
fn statement_sizes(n: usize) -> impl Iterator<Item = usize> {
    let rest = n % UPSERT_ROWS;
    std::iter::repeat_n(UPSERT_ROWS, n / UPSERT_ROWS).chain(
        (0..UPSERT_ROWS.trailing_zeros())
            .rev()
            .map(|bit| 1usize << bit)
            .filter(move |size| rest & size != 0),
    )
}

/// `head`, then `row` `n` times separated by commas, then `tail`: a multi-row `INSERT`.
fn values_sql(head: &str, row: &str, n: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + (row.len() + 2) * n + tail.len());
    sql.push_str(head);
    for i in 0..n {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(row);
    }
    sql.push_str(tail);
    sql
}

/// Maps sqlx errors to domain errors once, here.
fn map_err(e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(db) if db.is_unique_violation() => {
            let msg = db.message();
            if msg.contains("agents.") {
                StoreError::AgentNameExists
            } else if msg.contains("orgs.") {
                StoreError::OrgNameExists
            } else if msg.contains("idempotency_keys.") {
                StoreError::IdempotencyKeyTaken
            } else {
                StoreError::Internal(msg.to_string())
            }
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            StoreError::Unavailable(e.to_string())
        }
        sqlx::Error::Database(db)
            if db.message().contains("locked") || db.message().contains("busy") =>
        {
            StoreError::Unavailable(db.message().to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

impl Columns for SqliteRow {
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
}

async fn insert_key_tx(tx: &mut Transaction<'static, Sqlite>, k: &Key) -> StoreResult<()> {
    let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str()).collect();
    let cidrs = keyward_core::cidr::to_strings(&k.cidr_allowlist);
    sqlx::query(
        "INSERT INTO keys (id, org_id, agent_id, parent_key_id, kind, environment, name, start, \
         digest, scopes, cidr_allowlist, rate_limit, quota, alert_thresholds, requires_signature, \
         signing_secret_enc, expires_at, deprecated_at, revoked_at, successor_key_id, \
         created_at, metadata) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    .bind(k.requires_signature as i64)
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
        sqlx::query("INSERT INTO key_last_used (key_id, at) VALUES (?, ?)")
            .bind(k.id.to_string())
            .bind(ms(at))
            .execute(&mut **tx)
            .await
            .map_err(map_err)?;
    }
    Ok(())
}

async fn insert_audit_tx(tx: &mut Transaction<'static, Sqlite>, e: &AuditEvent) -> StoreResult<()> {
    sqlx::query(
        "INSERT INTO audit_events (id, org_id, occurred_at, action, outcome, error_code, \
         actor_key_id, actor_agent_id, target_type, target_id, client_ip, request_id, run_id, \
         thread_id, parent_agent, traceparent, trace_meta, details) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    tx: &mut Transaction<'static, Sqlite>,
    r: &IdempotencyRecord,
) -> StoreResult<()> {
    let cutoff = ms(r.created_at) - crate::IDEMPOTENCY_TTL_MS;
    sqlx::query(
        "DELETE FROM idempotency_keys WHERE org_id = ? AND idem_key = ? AND created_at < ?",
    )
    .bind(r.org_id.to_string())
    .bind(&r.key)
    .bind(cutoff)
    .execute(&mut **tx)
    .await
    .map_err(map_err)?;
    sqlx::query(
        "INSERT INTO idempotency_keys (org_id, idem_key, request_hash, status, response, \
         agent_id, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
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

async fn agent_status_tx(
    tx: &mut Transaction<'static, Sqlite>,
    agent_id: Uuid,
) -> StoreResult<Option<AgentStatus>> {
    let row = sqlx::query("SELECT status FROM agents WHERE id = ?")
        .bind(agent_id.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?;
    row.map(|r| {
        AgentStatus::parse(&get::<String>(&r, "status")?).ok_or_else(|| corrupt("agent status"))
    })
    .transpose()
}

async fn key_tx(tx: &mut Transaction<'static, Sqlite>, id: Uuid) -> StoreResult<Option<Key>> {
    let row = sqlx::query(&format!("SELECT {KEY_COLS} FROM keys k WHERE k.id = ?"))
        .bind(id.to_string())
        .fetch_optional(&mut **tx)
        .await
        .map_err(map_err)?;
    row.as_ref().map(row_to_key).transpose()
}

#[async_trait]
impl Store for SqliteStore {
    /// Closes every connection, the writer's last, after checkpointing the WAL into the main
    /// file and truncating it. The last connection to close would checkpoint too, but only if
    /// no other connection to the file is open at that moment, which nothing here can see (a CI
    /// run once found a 284 KB WAL left after a graceful stop; a connection still attached
    /// leaves one, see the test): the explicit checkpoint leaves the data file complete whatever
    /// closes when.
    async fn close(&self) {
        self.hot.close();
        self.reader.close().await;
        match sqlx::query_as::<_, (i64, i64, i64)>("PRAGMA wal_checkpoint(TRUNCATE)")
            .fetch_one(&self.writer)
            .await
        {
            Ok((0, _, _)) => {}
            Ok((busy, log, done)) => tracing::warn!(
                busy,
                log,
                done,
                "the WAL could not be checkpointed in full at close"
            ),
            Err(e) => tracing::warn!(error = %e, "the WAL could not be checkpointed at close"),
        }
        self.writer.close().await;
    }

    async fn ping(&self) -> StoreResult<()> {
        sqlx::query("SELECT 1")
            .execute(&self.reader)
            .await
            .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        Ok(())
    }

    async fn first_org(&self) -> StoreResult<Option<Org>> {
        let row = sqlx::query("SELECT * FROM orgs ORDER BY created_at, id LIMIT 1")
            .fetch_optional(&self.writer)
            .await
            .map_err(map_err)?;
        row.as_ref().map(row_to_org).transpose()
    }

    async fn create_org(&self, org: &Org, root_key: &Key, audit: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query("INSERT INTO orgs (id, name, policy, created_at) VALUES (?, ?, ?, ?)")
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
        let row = sqlx::query("SELECT * FROM orgs WHERE id = ?")
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(row_to_org).transpose()
    }

    async fn update_org(&self, org: &Org, audit: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let res = sqlx::query("UPDATE orgs SET name = ?, policy = ? WHERE id = ?")
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
            "INSERT INTO agents ({AGENT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
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
            "SELECT {AGENT_COLS} FROM agents WHERE org_id = ? AND id = ?"
        ))
        .bind(org_id.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.reader)
        .await
        .map_err(map_err)?;
        row.as_ref().map(row_to_agent).transpose()
    }

    async fn get_agent_by_name(&self, org_id: Uuid, name: &str) -> StoreResult<Option<Agent>> {
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLS} FROM agents WHERE org_id = ? AND name = ? AND status <> 'revoked'"
        ))
        .bind(org_id.to_string())
        .bind(name)
        .fetch_optional(&self.reader)
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
            "SELECT {AGENT_COLS} FROM agents WHERE org_id = ? {filter} \
             ORDER BY created_at, id LIMIT ? OFFSET ?"
        ))
        .bind(org_id.to_string())
        .bind(page.limit as i64 + 1)
        .bind(page.offset as i64)
        .fetch_all(&self.reader)
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
        let current = sqlx::query("SELECT status, version FROM agents WHERE org_id = ? AND id = ?")
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
            "UPDATE agents SET display_name = ?, status = ?, scopes = ?, metadata = ?, policy = ?, \
             capabilities = ?, did = ?, version = ?, updated_at = ?, revoked_at = ? \
             WHERE id = ? AND version = ?",
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
            let p = key_tx(&mut tx, parent).await?.ok_or(StoreError::NotFound)?;
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
        let row = sqlx::query(&format!("SELECT {KEY_COLS} FROM keys k WHERE k.id = ?"))
            .bind(id.to_string())
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(row_to_key).transpose()
    }

    async fn find_key_by_digest(&self, digest: &TokenDigest) -> StoreResult<Option<KeyWithAgent>> {
        // The verification path's read: synchronous, unless it cannot be had now (see `hot`).
        if let Some(found) = self.hot.key_by_digest(digest) {
            return found;
        }
        let row = sqlx::query(&KEY_BY_DIGEST)
            .bind(digest.as_bytes())
            .fetch_optional(&self.reader)
            .await
            .map_err(map_err)?;
        row.as_ref().map(key_with_agent).transpose()
    }

    async fn list_keys(
        &self,
        org_id: Uuid,
        filter: &KeyFilter,
        page: Page,
    ) -> StoreResult<Vec<Key>> {
        let mut q: QueryBuilder<Sqlite> =
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
        let rows = q.build().fetch_all(&self.reader).await.map_err(map_err)?;
        rows.iter().map(row_to_key).collect()
    }

    async fn update_key(&self, k: &Key, audit: &AuditEvent) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let cidrs = keyward_core::cidr::to_strings(&k.cidr_allowlist);
        let res = sqlx::query(
            "UPDATE keys SET name = ?, cidr_allowlist = ?, rate_limit = ?, quota = ?, \
             alert_thresholds = ?, metadata = ?, deprecated_at = ? \
             WHERE id = ? AND revoked_at IS NULL",
        )
        .bind(&k.name)
        .bind(to_json(&cidrs)?)
        .bind(k.rate_limit.as_ref().map(to_json).transpose()?)
        .bind(k.quota.as_ref().map(to_json).transpose()?)
        .bind(to_json(&k.alert_thresholds)?)
        .bind(to_json(&k.metadata)?)
        .bind(opt_ms(k.deprecated_at))
        .bind(k.id.to_string())
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        if res.rows_affected() == 0 {
            return match key_tx(&mut tx, k.id).await? {
                None => Err(StoreError::NotFound),
                Some(_) => Err(StoreError::KeyAlreadyRevoked),
            };
        }
        insert_audit_tx(&mut tx, audit).await?;
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
        let key = key_tx(&mut tx, key_id).await?.ok_or(StoreError::NotFound)?;
        if key.revoked_at.is_some() {
            return Err(StoreError::KeyAlreadyRevoked);
        }
        let rows = sqlx::query(
            "WITH RECURSIVE d(id) AS ( \
               SELECT id FROM keys WHERE parent_key_id = ? \
               UNION SELECT k.id FROM keys k JOIN d ON k.parent_key_id = d.id) \
             SELECT keys.id FROM keys JOIN d ON keys.id = d.id WHERE keys.revoked_at IS NULL",
        )
        .bind(key_id.to_string())
        .fetch_all(&mut *tx)
        .await
        .map_err(map_err)?;
        let cascaded: Vec<Uuid> = rows
            .iter()
            .map(|r| uuid(&get::<String>(r, "id")?))
            .collect::<StoreResult<_>>()?;
        if !force {
            // Count what would stay live once the key and its cascade are revoked. The whole
            // check runs inside the write transaction, so two concurrent revocations of an
            // agent's last two keys cannot both pass it.
            let mut doomed: Vec<String> = cascaded.iter().map(|u| u.to_string()).collect();
            doomed.push(key_id.to_string());
            let doomed_json = to_json(&doomed)?;
            let remaining: i64 = match key.agent_id {
                Some(agent_id) => {
                    let status = agent_status_tx(&mut tx, agent_id).await?;
                    if status == Some(AgentStatus::Revoked) {
                        1 // The agent is already a tombstone: the guard has nothing to protect.
                    } else {
                        let row = sqlx::query(
                            "SELECT COUNT(*) AS n FROM keys WHERE agent_id = ? \
                             AND revoked_at IS NULL \
                             AND id NOT IN (SELECT value FROM json_each(?))",
                        )
                        .bind(agent_id.to_string())
                        .bind(&doomed_json)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(map_err)?;
                        get(&row, "n")?
                    }
                }
                None if key.kind == TokenKind::Root => {
                    let row = sqlx::query(
                        "SELECT COUNT(*) AS n FROM keys WHERE org_id = ? AND kind = 'root' \
                         AND revoked_at IS NULL AND id NOT IN (SELECT value FROM json_each(?))",
                    )
                    .bind(key.org_id.to_string())
                    .bind(&doomed_json)
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
        let mut all = cascaded.clone();
        all.push(key_id);
        let all_json = to_json(&all.iter().map(|u| u.to_string()).collect::<Vec<_>>())?;
        sqlx::query(
            "UPDATE keys SET revoked_at = ? WHERE revoked_at IS NULL \
             AND id IN (SELECT value FROM json_each(?))",
        )
        .bind(ms(now))
        .bind(&all_json)
        .execute(&mut *tx)
        .await
        .map_err(map_err)?;
        insert_audit_tx(&mut tx, audit).await?;
        let key = key_tx(&mut tx, key_id).await?.ok_or(StoreError::NotFound)?;
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
            "UPDATE keys SET deprecated_at = ?, expires_at = ?, successor_key_id = ? \
             WHERE id = ? AND revoked_at IS NULL",
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
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(format!(
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
        let rows = q.build().fetch_all(&self.reader).await.map_err(map_err)?;
        rows.iter().map(row_to_audit).collect()
    }

    async fn prune_idempotency(&self, before: Timestamp, limit: u32) -> StoreResult<u64> {
        let done = sqlx::query(
            "DELETE FROM idempotency_keys WHERE rowid IN \
             (SELECT rowid FROM idempotency_keys WHERE created_at < ? LIMIT ?)",
        )
        .bind(ms(before))
        .bind(i64::from(limit))
        .execute(&self.writer)
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
             WHERE org_id = ? AND idem_key = ?",
        )
        .bind(org_id.to_string())
        .bind(key)
        .fetch_optional(&self.writer)
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
        // In the tables' key order: consecutive rows then land on the same or the next B-tree
        // page, which the writer's page cache still holds, instead of a random page each (a
        // million keys' rows are far larger than the cache, and each miss is a read).
        let (deltas, last_used) = crate::in_key_order(deltas, last_used);
        let mut tx = self.begin().await?;
        // Multi-row upserts with bound values: sqlx runs every SQLite statement on the
        // connection's worker thread, so a statement per row cost two thread hand-offs each
        // (10,000 used keys: a tenth of the server's CPU under load). Bound values rather than
        // one JSON array unrolled by `json_each`: parsing the rows back out of JSON took a quarter to a
        // third of the flush (10,000 keys: 35-37 ms per flush with JSON, 24-31 ms bound, 3 runs each of
        // `examples/flush_cost.rs`).
        let mut rows = deltas.iter();
        for n in statement_sizes(deltas.len()) {
            let sql = values_sql(
                "INSERT INTO usage_hourly \
                 (key_id, org_id, hour_start, allowed, denied, rate_limited) VALUES ",
                "(?, ?, ?, ?, ?, ?)",
                n,
                " ON CONFLICT (key_id, hour_start) DO UPDATE SET \
                 allowed = allowed + excluded.allowed, denied = denied + excluded.denied, \
                 rate_limited = rate_limited + excluded.rate_limited",
            );
            let mut q = sqlx::query(&sql);
            for d in rows.by_ref().take(n) {
                q = q
                    .bind(d.key_id.to_string())
                    .bind(d.org_id.to_string())
                    .bind(ms(d.hour))
                    .bind(d.allowed as i64)
                    .bind(d.denied as i64)
                    .bind(d.rate_limited as i64);
            }
            q.execute(&mut *tx).await.map_err(map_err)?;
        }
        let mut rows = last_used.iter();
        for n in statement_sizes(last_used.len()) {
            let sql = values_sql(
                "INSERT INTO key_last_used (key_id, at) VALUES ",
                "(?, ?)",
                n,
                " ON CONFLICT (key_id) DO UPDATE SET at = max(at, excluded.at)",
            );
            let mut q = sqlx::query(&sql);
            for (key_id, at) in rows.by_ref().take(n) {
                q = q.bind(key_id.to_string()).bind(ms(*at));
            }
            q.execute(&mut *tx).await.map_err(map_err)?;
        }
        for a in alerts {
            let res = sqlx::query(
                "INSERT INTO quota_alerts (key_id, period_start, threshold) VALUES (?, ?, ?) \
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
             WHERE key_id = ? AND hour_start >= ? AND hour_start < ? ORDER BY hour_start",
        )
        .bind(key_id.to_string())
        .bind(ms(since))
        .bind(ms(until))
        .fetch_all(&self.reader)
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
        // The first use of a period of a key with a quota reads this on the verification path:
        // synchronous, as the key's own read is, unless it cannot be had now (see `hot`).
        let key_id = key_id.to_string();
        if let Some(n) = self.hot.allowed_between(&key_id, ms(since), ms(until)) {
            return n;
        }
        let row = sqlx::query(ALLOWED_BETWEEN)
            .bind(key_id)
            .bind(ms(since))
            .bind(ms(until))
            .fetch_one(&self.reader)
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
        // One statement on the single writer: the check and the increment cannot interleave. A
        // new row starts from the period's allowed uses already counted.
        let row = sqlx::query(
            "INSERT INTO quota_counters (key_id, period_start, used) \
             SELECT ?1, ?2, s.n + 1 FROM (SELECT COALESCE(SUM(allowed), 0) AS n \
               FROM usage_hourly WHERE key_id = ?1 AND hour_start >= ?2 AND hour_start < ?4) s \
             WHERE s.n < ?3 \
             ON CONFLICT (key_id, period_start) DO UPDATE SET used = used + 1 \
             WHERE quota_counters.used < ?3 RETURNING used",
        )
        .bind(key_id.to_string())
        .bind(ms(period_start))
        .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        .bind(ms(period_end))
        .fetch_optional(&self.writer)
        .await
        .map_err(map_err)?;
        row.map(|r| get::<i64>(&r, "used").map(|n| n.max(0) as u64))
            .transpose()
    }

    async fn quota_units(&self, key_id: Uuid, period_start: Timestamp) -> StoreResult<u64> {
        let row =
            sqlx::query("SELECT used FROM quota_counters WHERE key_id = ? AND period_start = ?")
                .bind(key_id.to_string())
                .bind(ms(period_start))
                .fetch_optional(&self.reader)
                .await
                .map_err(map_err)?;
        Ok(match row {
            Some(r) => get::<i64>(&r, "used")?.max(0) as u64,
            None => 0,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A batch of any size is cut into statements that add up to it, with few distinct sizes
    /// (each distinct size is one more prepared statement per connection).
    #[test]
    fn a_batch_is_cut_into_few_statement_sizes_that_add_up() {
        let mut seen = std::collections::BTreeSet::new();
        for n in (0..3 * UPSERT_ROWS).chain([10_000, 25_003]) {
            let sizes: Vec<usize> = statement_sizes(n).collect();
            assert_eq!(sizes.iter().sum::<usize>(), n, "{n}: {sizes:?}");
            assert!(sizes.iter().all(|s| (1..=UPSERT_ROWS).contains(s)));
            seen.extend(sizes);
        }
        assert_eq!(seen.len(), 9, "{seen:?}");
        assert_eq!(
            values_sql("INSERT INTO t (a) VALUES ", "(?)", 3, ";"),
            "INSERT INTO t (a) VALUES (?), (?), (?);"
        );
    }

    /// Reads by digest go through the direct connections, and the answers are the suite's,
    /// write after write (each read sees the last commit).
    #[tokio::test]
    async fn digest_reads_take_the_direct_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("k.db")).await.unwrap();
        assert_eq!(store.hot.opened(), 0);
        crate::conformance::find_key_by_digest_returns_the_key_and_its_agent_status(&store).await;
        assert_eq!(store.hot.opened(), 1, "one thread read, on one connection");
        store.close().await;
        assert_eq!(store.hot.opened(), 0, "closed with the store");
        assert!(
            matches!(
                store.find_key_by_digest(&TokenDigest([0; 32])).await,
                Err(StoreError::Unavailable(_))
            ),
            "a closed store reads nothing"
        );
    }

    /// With no direct connection to be had, reads by digest take the sqlx pool, with the same
    /// answers.
    #[tokio::test]
    async fn digest_reads_fall_back_to_the_pool() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let mut store = SqliteStore::open(&path).await.unwrap();
        store.hot = std::sync::Arc::new(hot::HotReads::with_cap(path, 0));
        crate::conformance::find_key_by_digest_returns_the_key_and_its_agent_status(&store).await;
        store.close().await;
    }

    /// Closing the store leaves every write in the database file and the WAL empty even while
    /// another connection to the file is still open (when the writer's own close would not
    /// checkpoint: SQLite does that only for the last connection to close).
    #[tokio::test]
    async fn close_checkpoints_the_wal_though_another_connection_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.db");
        let store = SqliteStore::open(&path).await.unwrap();
        crate::conformance::find_key_by_digest_returns_the_key_and_its_agent_status(&store).await;
        let wal = dir.path().join("k.db-wal");
        assert!(
            std::fs::metadata(&wal).unwrap().len() > 0,
            "the writes are in the WAL"
        );
        // Open, and attached to the WAL by a read (an idle handle that never read holds no lock).
        let other = rusqlite::Connection::open(&path).unwrap();
        let _: i64 = other
            .query_row("SELECT count(*) FROM keys", [], |r| r.get(0))
            .unwrap();
        store.close().await;
        assert_eq!(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0), 0);
        drop(other);
        // The database file alone holds the writes: read it without its WAL.
        std::fs::remove_file(&wal).ok();
        let keys: i64 = rusqlite::Connection::open(&path)
            .unwrap()
            .query_row("SELECT count(*) FROM keys", [], |r| r.get(0))
            .unwrap();
        assert!(keys > 0);
    }

    /// A data dir from before `key_last_used` keeps every key's last use through the migration.
    #[tokio::test]
    async fn the_last_used_migration_keeps_every_recorded_last_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        let opts = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(opts)
            .await
            .unwrap();
        let mut old = migrator();
        old.migrations = Cow::Owned(old.migrations[..3].to_vec());
        old.run(&pool).await.unwrap();
        let (org, key, used_at) = (Uuid::now_v7(), Uuid::now_v7(), 1_795_000_000_123i64);
        sqlx::query("INSERT INTO orgs (id, name, created_at, policy) VALUES (?, 'old', 0, '{}')")
            .bind(org.to_string())
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO keys (id, org_id, kind, environment, start, digest, scopes, \
             cidr_allowlist, alert_thresholds, requires_signature, created_at, metadata, \
             last_used_at) \
             VALUES (?, ?, 'root', 'live', 'kw_rk_abcdef', ?, '[]', '[]', '[]', 0, 0, '{}', ?)",
        )
        .bind(key.to_string())
        .bind(org.to_string())
        .bind(vec![7u8; 32])
        .bind(used_at)
        .execute(&pool)
        .await
        .unwrap();
        pool.close().await;

        let store = SqliteStore::open(&path).await.unwrap();
        let k = store
            .get_key(key)
            .await
            .unwrap()
            .expect("the key is still there");
        assert_eq!(k.last_used_at.map(|t| t.timestamp_millis()), Some(used_at));
        store.close().await;
    }
}
