//! The Store trait, in domain words, and its backends.
//!
//! Every backend owns its SQL and its migrations; the server only ever sees this trait. Rules that
//! must hold under concurrency (agent name uniqueness, the last-active-key guard, the revocation
//! cascade, idempotency) are enforced here, inside one database transaction each, never only in
//! the caller. Every state change takes the audit event(s) to commit in the same transaction.

use async_trait::async_trait;
use keyward_core::model::{
    Agent, AgentStatus, AuditEvent, AuditFilter, IdempotencyRecord, JsonObject, Key, KeyFilter,
    Org, OrgPolicy, Page, Timestamp,
};
use keyward_core::token::TokenDigest;
use uuid::Uuid;

mod codec;
pub mod conformance;
pub mod postgres;
pub mod sqlite;

/// What can go wrong in a store call, in domain words. Backends map their own errors (unique
/// violations, busy databases) to these once.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("an agent with this name already exists in the org")]
    AgentNameExists,
    #[error("an org with this name already exists")]
    OrgNameExists,
    #[error("not found")]
    NotFound,
    #[error("the agent has been revoked")]
    AgentRevoked,
    #[error("the key has already been revoked")]
    KeyAlreadyRevoked,
    #[error("revoking would leave no active key")]
    LastActiveKey,
    #[error("the record changed concurrently")]
    Conflict,
    #[error("the idempotency key was claimed concurrently")]
    IdempotencyKeyTaken,
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    #[error("store error: {0}")]
    Internal(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The key record with what the credential checks need of its agent and org: everything the
/// hot path reads, in one lookup.
#[derive(Debug, Clone)]
pub struct KeyWithAgent {
    pub key: Key,
    pub agent_status: Option<AgentStatus>,
    /// The agent's name, for answers that summarise it (verify).
    pub agent_name: Option<String>,
    /// The agent's `policy` object (its `rules` apply to every request of the agent).
    pub agent_policy: Option<JsonObject>,
    /// The org's policy (tiers, default rate limit, org-wide rules).
    pub org_policy: OrgPolicy,
}

/// The result of a revocation: every key id whose `revoked_at` was set by it.
#[derive(Debug, Clone)]
pub struct Revoked {
    pub key: Key,
    pub cascaded: Vec<Uuid>,
}

/// Counts to add to one key's hour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageDelta {
    pub key_id: Uuid,
    pub org_id: Uuid,
    /// The start of the UTC hour the uses fell in.
    pub hour: Timestamp,
    pub allowed: u64,
    pub denied: u64,
    pub rate_limited: u64,
}

/// A usage batch in the usage tables' key order: counts by key, then hour; last uses by key.
/// (A UUID's byte order is the order of its lowercase hex text, the stored key.) Both backends
/// write in this order: PostgreSQL so that flushes lock rows in one order and never deadlock,
/// SQLite so that consecutive upserts land on B-tree pages its cache still holds.
pub(crate) fn in_key_order<'a>(
    deltas: &'a [UsageDelta],
    last_used: &'a [(Uuid, Timestamp)],
) -> (Vec<&'a UsageDelta>, Vec<&'a (Uuid, Timestamp)>) {
    let mut deltas: Vec<&UsageDelta> = deltas.iter().collect();
    deltas.sort_by_key(|d| (d.key_id, d.hour));
    let mut last_used: Vec<&(Uuid, Timestamp)> = last_used.iter().collect();
    last_used.sort_by_key(|(id, _)| *id);
    (deltas, last_used)
}

/// One hour's (or, summed, one day's) counts of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageBucket {
    pub start: Timestamp,
    pub allowed: u64,
    pub denied: u64,
    pub rate_limited: u64,
}

/// A quota threshold crossed: its event is written only the first time for the period.
#[derive(Debug, Clone)]
pub struct ThresholdAlert {
    pub key_id: Uuid,
    pub period_start: Timestamp,
    pub threshold: u8,
    pub event: AuditEvent,
}

/// What a [`ChangeWatch`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// A write through some node changed what an existing key may do: caches must be dropped.
    Changed,
    /// The watch (re)connected: anything may have changed while it was away, so caches must be
    /// dropped too.
    Resumed,
    /// Nothing changed, and a round trip over the watching connection just proved it live.
    Quiet,
}

/// A live view of the writes other processes make to a shared store (PostgreSQL's
/// LISTEN/NOTIFY plus its change log).
#[async_trait]
pub trait ChangeWatch: Send {
    /// Waits at most about `wait` (twice it when the store does not answer) for the next signal.
    /// An error means the watch is down; the next call tries to reconnect and, when it does,
    /// answers [`Signal::Resumed`].
    async fn next(&mut self, wait: std::time::Duration) -> StoreResult<Signal>;
}

/// Keyward's persistence, in domain words.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Checks that the store answers.
    async fn ping(&self) -> StoreResult<()>;

    /// Whether other processes may write to this store while this one runs (PostgreSQL shared
    /// by several nodes). A server over a shared store watches for their changes and counts
    /// quotas in the store rather than in memory.
    fn is_shared(&self) -> bool {
        false
    }

    /// Starts watching the writes of every process; `None` for a store only this process writes.
    async fn watch_changes(&self) -> StoreResult<Option<Box<dyn ChangeWatch>>> {
        Ok(None)
    }

    /// Closes connections, flushing what the backend buffers (SQLite: checkpoints the WAL).
    async fn close(&self) {}

    /// The first org created, if any (used by bootstrap to tell an empty store).
    async fn first_org(&self) -> StoreResult<Option<Org>>;
    /// Creates an org with its first root key.
    async fn create_org(&self, org: &Org, root_key: &Key, audit: &AuditEvent) -> StoreResult<()>;
    async fn get_org(&self, id: Uuid) -> StoreResult<Option<Org>>;
    async fn update_org(&self, org: &Org, audit: &AuditEvent) -> StoreResult<()>;

    /// Creates an agent and its first key; with an idempotency record, claims it in the same
    /// transaction (`IdempotencyKeyTaken` when another request claimed it first).
    async fn create_agent(
        &self,
        agent: &Agent,
        key: &Key,
        audit: &[AuditEvent],
        idem: Option<&IdempotencyRecord>,
    ) -> StoreResult<()>;
    async fn get_agent(&self, org_id: Uuid, id: Uuid) -> StoreResult<Option<Agent>>;
    /// The active or paused agent with this exact name.
    async fn get_agent_by_name(&self, org_id: Uuid, name: &str) -> StoreResult<Option<Agent>>;
    /// Agents by `created_at`; returns up to `page.limit + 1` rows so callers can tell `has_more`.
    async fn list_agents(
        &self,
        org_id: Uuid,
        include_revoked: bool,
        page: Page,
    ) -> StoreResult<Vec<Agent>>;
    /// Writes the agent's new state if its stored version is still `expected_version`
    /// (`Conflict` otherwise, `AgentRevoked` when it is revoked).
    async fn update_agent(
        &self,
        agent: &Agent,
        expected_version: i64,
        audit: &AuditEvent,
    ) -> StoreResult<()>;

    /// Inserts a key (agent, root or derived). Fails with `AgentRevoked` when its agent is
    /// revoked and `KeyAlreadyRevoked` when a derived key's parent is.
    async fn insert_key(
        &self,
        key: &Key,
        audit: &AuditEvent,
        idem: Option<&IdempotencyRecord>,
    ) -> StoreResult<()>;
    /// Inserts many keys in one transaction with one audit event for the whole import (bulk
    /// provisioning and load tests). Every key's agent must exist and not be revoked.
    async fn import_keys(&self, keys: &[Key], audit: &AuditEvent) -> StoreResult<()>;
    async fn get_key(&self, id: Uuid) -> StoreResult<Option<Key>>;
    async fn find_key_by_digest(&self, digest: &TokenDigest) -> StoreResult<Option<KeyWithAgent>>;
    /// Keys by `created_at`; returns up to `page.limit + 1` rows.
    async fn list_keys(
        &self,
        org_id: Uuid,
        filter: &KeyFilter,
        page: Page,
    ) -> StoreResult<Vec<Key>>;
    /// Writes a key's mutable fields (name, allowlist, limits, thresholds, metadata,
    /// deprecation) unless it has been revoked meanwhile (`KeyAlreadyRevoked`).
    async fn update_key(&self, key: &Key, audit: &AuditEvent) -> StoreResult<()>;
    /// Revokes a key and every derived descendant. Without `force`, refuses with
    /// `LastActiveKey` when the agent (or, for a root key, the org) would have no
    /// non-revoked key left.
    async fn revoke_key(
        &self,
        key_id: Uuid,
        now: Timestamp,
        force: bool,
        audit: &AuditEvent,
    ) -> StoreResult<Revoked>;
    /// Inserts the successor and marks the old key deprecated, expiring and succeeded, unless
    /// the old key was revoked meanwhile.
    async fn rotate_key(
        &self,
        old: &Key,
        successor: &Key,
        audit: &AuditEvent,
        idem: Option<&IdempotencyRecord>,
    ) -> StoreResult<()>;

    /// Appends audit events that belong to no state change (denials, verifications).
    async fn append_audit(&self, events: &[AuditEvent]) -> StoreResult<()>;
    /// Events newest first; returns up to `page.limit + 1` rows.
    async fn list_audit(
        &self,
        org_id: Uuid,
        filter: &AuditFilter,
        page: Page,
    ) -> StoreResult<Vec<AuditEvent>>;

    async fn get_idempotency(
        &self,
        org_id: Uuid,
        key: &str,
    ) -> StoreResult<Option<IdempotencyRecord>>;

    /// Deletes up to `limit` idempotency records created before `before` (past their 24 hours
    /// they are never honoured again) and says how many went. A sweep repeats it while it
    /// deletes `limit`, so no one statement holds the writer for long.
    async fn prune_idempotency(&self, before: Timestamp, limit: u32) -> StoreResult<u64>;

    /// Adds usage counts, moves `last_used_at` forward (never back) and writes the events of
    /// quota thresholds not announced before for their period, all in one transaction.
    async fn record_usage(
        &self,
        deltas: &[UsageDelta],
        last_used: &[(Uuid, Timestamp)],
        alerts: &[ThresholdAlert],
    ) -> StoreResult<()>;
    /// A key's hourly buckets with `since <= start < until`, oldest first.
    async fn usage_hours(
        &self,
        key_id: Uuid,
        since: Timestamp,
        until: Timestamp,
    ) -> StoreResult<Vec<UsageBucket>>;
    /// Allowed uses of a key with `since <= hour < until` (a quota period's count so far).
    async fn allowed_between(
        &self,
        key_id: Uuid,
        since: Timestamp,
        until: Timestamp,
    ) -> StoreResult<u64>;

    /// Takes one unit of a key's quota for the period `[period_start, period_end)`, atomically
    /// for every process: the count after taking it, or `None` when `limit` units are taken
    /// already (nothing is taken then). The period's first take starts from the allowed uses the
    /// usage counters already hold for it (uses before the quota was set count, as they do on a
    /// single node).
    async fn take_quota_unit(
        &self,
        key_id: Uuid,
        period_start: Timestamp,
        period_end: Timestamp,
        limit: u64,
    ) -> StoreResult<Option<u64>>;
    /// Claims a request signature (its hash) until `expires_at` (Unix seconds): true for the
    /// first claim, false when it was claimed before and has not expired at `now` (a replay).
    /// Stores only one process writes answer true: that process's own replay cache suffices.
    async fn claim_signature(&self, id: &[u8; 32], expires_at: i64, now: i64) -> StoreResult<bool> {
        let _ = (id, expires_at, now);
        Ok(true)
    }
    /// Units taken by [`Store::take_quota_unit`] for a key and period.
    async fn quota_units(&self, key_id: Uuid, period_start: Timestamp) -> StoreResult<u64>;
}

/// How long an idempotency record is honoured: 24 hours.
pub const IDEMPOTENCY_TTL_MS: i64 = 24 * 3600 * 1000;
