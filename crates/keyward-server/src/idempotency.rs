//! `Idempotency-Key` on creating POSTs (API.md §0): same key + same body within 24 h replays the
//! stored response (secrets nulled) with `Idempotent-Replayed: true`; a different body is `422`;
//! a replay whose agent has since been revoked or paused is `409`. The key is claimed inside the
//! creating transaction, so concurrent duplicates create one resource and the losers replay.

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keyward_core::model::{AgentStatus, IdempotencyRecord, Timestamp};
use keyward_proto::ErrorCode;
use serde_json::Value;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::ApiError;
use crate::AppState;

/// A claim to make with the creating write.
#[derive(Debug, Clone)]
pub struct Claim {
    pub org_id: Uuid,
    pub key: String,
    pub hash: [u8; 32],
    pub now: Timestamp,
}

impl Claim {
    /// The record to store: the response with every plaintext secret already `null`.
    pub fn record(
        &self,
        status: u16,
        response: Value,
        agent_id: Option<Uuid>,
    ) -> IdempotencyRecord {
        IdempotencyRecord {
            org_id: self.org_id,
            key: self.key.clone(),
            request_hash: self.hash,
            status,
            response: redact(response),
            agent_id,
            created_at: self.now,
        }
    }
}

/// Nulls the plaintext secrets of a creating response.
pub fn redact(mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        for field in ["api_key", "signing_secret"] {
            if obj.contains_key(field) {
                obj.insert(field.to_string(), Value::Null);
            }
        }
    }
    v
}

/// Sorts object keys recursively so equal bodies hash equally whatever their key order.
fn canonical(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let sorted: std::collections::BTreeMap<&String, Value> =
                m.iter().map(|(k, v)| (k, canonical(v))).collect();
            Value::Object(sorted.into_iter().map(|(k, v)| (k.clone(), v)).collect())
        }
        Value::Array(a) => Value::Array(a.iter().map(canonical).collect()),
        other => other.clone(),
    }
}

/// What to do with a creating request.
pub enum Decision {
    /// No header, or a fresh key: go ahead (claiming it in the write when present).
    Proceed(Option<Claim>),
    /// The answer was already given: send this.
    Replay(Response),
}

/// Checks the header and any stored record for it.
pub async fn check(
    state: &AppState,
    org_id: Uuid,
    headers: &HeaderMap,
    method_path: &str,
    body: &Value,
) -> Result<Decision, ApiError> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(Decision::Proceed(None));
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|s| keyward_core::validate::idempotency_key(s))
        .ok_or_else(|| {
            ApiError::validation(
                "Idempotency-Key",
                "must be 1..=255 printable ASCII characters",
            )
        })?
        .to_string();
    let mut h = Sha256::new();
    h.update(method_path.as_bytes());
    h.update(b"\n");
    h.update(serde_json::to_vec(&canonical(body)).unwrap_or_default());
    let claim = Claim {
        org_id,
        key,
        hash: h.finalize().into(),
        now: state.now(),
    };
    match stored(state, &claim).await? {
        Some(resp) => Ok(Decision::Replay(resp)),
        None => Ok(Decision::Proceed(Some(claim))),
    }
}

/// After losing the race to claim the key: replay what the winner stored.
pub async fn replay_after_race(state: &AppState, claim: &Claim) -> Result<Response, ApiError> {
    stored(state, claim)
        .await?
        .ok_or_else(|| ApiError::internal("idempotency record vanished after a conflict"))
}

async fn stored(state: &AppState, claim: &Claim) -> Result<Option<Response>, ApiError> {
    let Some(rec) = state
        .store
        .get_idempotency(claim.org_id, &claim.key)
        .await?
    else {
        return Ok(None);
    };
    let age_ms = claim.now.timestamp_millis() - rec.created_at.timestamp_millis();
    // Honoured through its 24th hour, as the stores count it (they replace, and the sweep
    // deletes, only records created more than 24 hours ago): with `>=` here, a retry at exactly
    // 24 hours proceeded as new, collided with the record the store still kept, and failed.
    if age_ms > keyward_store::IDEMPOTENCY_TTL_MS {
        return Ok(None);
    }
    if !keyward_core::secret::ct_eq(&rec.request_hash, &claim.hash) {
        return Err(ApiError::new(ErrorCode::IdempotencyKeyBodyMismatch));
    }
    if let Some(agent_id) = rec.agent_id {
        if let Some(agent) = state.store.get_agent(claim.org_id, agent_id).await? {
            match agent.status {
                AgentStatus::Revoked => {
                    return Err(ApiError::new(ErrorCode::IdempotencyKeyAgentRevoked))
                }
                AgentStatus::Paused => {
                    return Err(ApiError::new(ErrorCode::IdempotencyKeyAgentInactive))
                }
                AgentStatus::Active => {}
            }
        }
    }
    let status = StatusCode::from_u16(rec.status).unwrap_or(StatusCode::OK);
    let mut resp = (status, axum::Json(rec.response)).into_response();
    resp.headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(Some(resp))
}
