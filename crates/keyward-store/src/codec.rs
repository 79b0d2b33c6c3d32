//! Encoding shared by the SQL backends: timestamps as Unix milliseconds, ids as UUID text, JSON
//! as text, and the mapping of a result row to each domain record. Each backend implements
//! [`Columns`] for its row type; everything else here is written once.

use chrono::DateTime;
use keyward_core::model::{
    Agent, AgentStatus, AgentType, AuditEvent, Key, Org, Outcome, Timestamp, TraceContext,
};
use keyward_core::scope::Scope;
use keyward_core::token::{Environment, TokenDigest, TokenKind};
use uuid::Uuid;

use crate::{StoreError, StoreResult};

/// Reading typed columns out of a backend's result row.
pub(crate) trait Columns {
    fn text(&self, col: &str) -> StoreResult<String>;
    fn opt_text(&self, col: &str) -> StoreResult<Option<String>>;
    fn int(&self, col: &str) -> StoreResult<i64>;
    fn opt_int(&self, col: &str) -> StoreResult<Option<i64>>;
    fn bytes(&self, col: &str) -> StoreResult<Vec<u8>>;
    fn opt_bytes(&self, col: &str) -> StoreResult<Option<Vec<u8>>>;
    /// A boolean: 0 or 1 where the backend has no BOOLEAN (SQLite); a backend with one
    /// overrides this.
    fn flag(&self, col: &str) -> StoreResult<bool> {
        Ok(self.int(col)? != 0)
    }
}

/// A value that can be read from a column, so mappers can write `get(row, "col")`.
pub(crate) trait FromColumn: Sized {
    fn from_column<R: Columns + ?Sized>(row: &R, col: &str) -> StoreResult<Self>;
}

macro_rules! from_column {
    ($($t:ty => $m:ident),* $(,)?) => {$(
        impl FromColumn for $t {
            fn from_column<R: Columns + ?Sized>(row: &R, col: &str) -> StoreResult<Self> {
                row.$m(col)
            }
        }
    )*};
}

from_column!(
    String => text,
    Option<String> => opt_text,
    i64 => int,
    Option<i64> => opt_int,
    Vec<u8> => bytes,
    Option<Vec<u8>> => opt_bytes,
    bool => flag,
);

/// One typed column of a row.
pub(crate) fn get<T: FromColumn>(row: &(impl Columns + ?Sized), col: &str) -> StoreResult<T> {
    T::from_column(row, col)
}

pub(crate) fn corrupt(what: &str) -> StoreError {
    StoreError::Internal(format!("corrupt stored value: {what}"))
}

pub(crate) fn ms(t: Timestamp) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn opt_ms(t: Option<Timestamp>) -> Option<i64> {
    t.map(ms)
}

pub(crate) fn from_ms(v: i64) -> StoreResult<Timestamp> {
    DateTime::from_timestamp_millis(v).ok_or_else(|| corrupt("timestamp"))
}

pub(crate) fn opt_from_ms(v: Option<i64>) -> StoreResult<Option<Timestamp>> {
    v.map(from_ms).transpose()
}

pub(crate) fn uuid(s: &str) -> StoreResult<Uuid> {
    Uuid::parse_str(s).map_err(|_| corrupt("uuid"))
}

pub(crate) fn opt_uuid(s: Option<String>) -> StoreResult<Option<Uuid>> {
    s.as_deref().map(uuid).transpose()
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> StoreResult<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Internal(e.to_string()))
}

pub(crate) fn from_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> StoreResult<T> {
    serde_json::from_str(s).map_err(|_| corrupt(what))
}

pub(crate) fn row_to_org<R: Columns>(row: &R) -> StoreResult<Org> {
    Ok(Org {
        id: uuid(&get::<String>(row, "id")?)?,
        name: get(row, "name")?,
        policy: from_json(&get::<String>(row, "policy")?, "org policy")?,
        created_at: from_ms(get(row, "created_at")?)?,
    })
}

pub(crate) fn row_to_agent<R: Columns>(row: &R) -> StoreResult<Agent> {
    Ok(Agent {
        id: uuid(&get::<String>(row, "id")?)?,
        org_id: uuid(&get::<String>(row, "org_id")?)?,
        name: get(row, "name")?,
        display_name: get(row, "display_name")?,
        agent_type: AgentType::parse(&get::<String>(row, "agent_type")?)
            .ok_or_else(|| corrupt("agent type"))?,
        status: AgentStatus::parse(&get::<String>(row, "status")?)
            .ok_or_else(|| corrupt("agent status"))?,
        scopes: from_json(&get::<String>(row, "scopes")?, "agent scopes")?,
        metadata: from_json(&get::<String>(row, "metadata")?, "agent metadata")?,
        policy: from_json(&get::<String>(row, "policy")?, "agent policy")?,
        capabilities: from_json(&get::<String>(row, "capabilities")?, "capabilities")?,
        did: get(row, "did")?,
        owner_user_id: opt_uuid(get(row, "owner_user_id")?)?,
        parent_agent_id: opt_uuid(get(row, "parent_agent_id")?)?,
        version: get(row, "version")?,
        created_at: from_ms(get(row, "created_at")?)?,
        updated_at: from_ms(get(row, "updated_at")?)?,
        revoked_at: opt_from_ms(get(row, "revoked_at")?)?,
    })
}

pub(crate) fn row_to_key<R: Columns>(row: &R) -> StoreResult<Key> {
    let scopes: Vec<String> = from_json(&get::<String>(row, "scopes")?, "key scopes")?;
    let scopes = scopes
        .iter()
        .map(|s| Scope::parse(s).map_err(|_| corrupt("key scope")))
        .collect::<StoreResult<Vec<_>>>()?;
    let cidrs: Vec<String> = from_json(&get::<String>(row, "cidr_allowlist")?, "allowlist")?;
    let cidr_allowlist =
        keyward_core::cidr::parse_allowlist(&cidrs).map_err(|_| corrupt("allowlist"))?;
    let digest: Vec<u8> = get(row, "digest")?;
    Ok(Key {
        id: uuid(&get::<String>(row, "id")?)?,
        org_id: uuid(&get::<String>(row, "org_id")?)?,
        agent_id: opt_uuid(get(row, "agent_id")?)?,
        parent_key_id: opt_uuid(get(row, "parent_key_id")?)?,
        kind: TokenKind::parse(&get::<String>(row, "kind")?).ok_or_else(|| corrupt("kind"))?,
        environment: Environment::parse(&get::<String>(row, "environment")?)
            .ok_or_else(|| corrupt("environment"))?,
        name: get(row, "name")?,
        start: get(row, "start")?,
        digest: TokenDigest::from_slice(&digest).ok_or_else(|| corrupt("digest"))?,
        scopes: scopes.into(),
        cidr_allowlist,
        rate_limit: get::<Option<String>>(row, "rate_limit")?
            .map(|s| from_json(&s, "rate limit"))
            .transpose()?,
        quota: get::<Option<String>>(row, "quota")?
            .map(|s| from_json(&s, "quota"))
            .transpose()?,
        alert_thresholds: from_json(&get::<String>(row, "alert_thresholds")?, "thresholds")?,
        requires_signature: get::<bool>(row, "requires_signature")?,
        signing_secret_enc: get(row, "signing_secret_enc")?,
        expires_at: opt_from_ms(get(row, "expires_at")?)?,
        deprecated_at: opt_from_ms(get(row, "deprecated_at")?)?,
        revoked_at: opt_from_ms(get(row, "revoked_at")?)?,
        successor_key_id: opt_uuid(get(row, "successor_key_id")?)?,
        last_used_at: opt_from_ms(get(row, "last_used_at")?)?,
        created_at: from_ms(get(row, "created_at")?)?,
        metadata: from_json(&get::<String>(row, "metadata")?, "key metadata")?,
    })
}

pub(crate) fn row_to_audit<R: Columns>(row: &R) -> StoreResult<AuditEvent> {
    Ok(AuditEvent {
        id: uuid(&get::<String>(row, "id")?)?,
        org_id: uuid(&get::<String>(row, "org_id")?)?,
        occurred_at: from_ms(get(row, "occurred_at")?)?,
        action: get(row, "action")?,
        outcome: Outcome::parse(&get::<String>(row, "outcome")?)
            .ok_or_else(|| corrupt("outcome"))?,
        error_code: get(row, "error_code")?,
        actor_key_id: opt_uuid(get(row, "actor_key_id")?)?,
        actor_agent_id: opt_uuid(get(row, "actor_agent_id")?)?,
        target_type: get(row, "target_type")?,
        target_id: opt_uuid(get(row, "target_id")?)?,
        client_ip: get(row, "client_ip")?,
        request_id: get(row, "request_id")?,
        trace: TraceContext {
            run_id: get(row, "run_id")?,
            thread_id: get(row, "thread_id")?,
            parent_agent: get(row, "parent_agent")?,
            traceparent: get(row, "traceparent")?,
            meta: from_json(&get::<String>(row, "trace_meta")?, "trace meta")?,
        },
        details: from_json(&get::<String>(row, "details")?, "audit details")?,
    })
}
