//! Keys: minting (agent, root, derived), listing, reading, patching, deprecation, revocation with
//! the last-active guard and cascade, and rotation with an overlap window (API.md §4).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::Duration;
use keyward_core::model::{self, Agent, Key, KeyFilter, Org, Timestamp};
use keyward_core::scope::{self, Scope};
use keyward_core::secret::Secret;
use keyward_core::token::{self, Environment, TokenDigest, TokenKind};
use keyward_proto::{self as proto, ErrorCode};
use keyward_store::StoreError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiJsonOrEmpty, ApiPath, ApiQuery};
use crate::idempotency::{self, Decision};
use crate::{page, render, AppState};

/// The longest lifetime a minted key may ask for: ten years.
const MAX_EXPIRES_IN_S: u64 = 10 * 365 * 86_400;

/// A freshly minted key with its one-time plaintexts.
pub struct Minted {
    pub key: Key,
    pub api_key: Secret,
    pub signing_secret: Option<Secret>,
}

impl Minted {
    pub fn response(&self) -> proto::CreateKeyResponse {
        proto::CreateKeyResponse {
            key: render::key(&self.key),
            api_key: Some(self.api_key.expose().to_string()),
            signing_secret: self.signing_secret.as_ref().map(|s| s.expose().to_string()),
        }
    }
}

pub fn validate_metadata(field: &str, m: &Map<String, Value>) -> ApiResult<()> {
    let size = serde_json::to_vec(m).map(|v| v.len()).unwrap_or(usize::MAX);
    if size > model::MAX_METADATA_BYTES {
        return Err(ApiError::validation(
            field,
            format!(
                "must be at most {} bytes serialized",
                model::MAX_METADATA_BYTES
            ),
        ));
    }
    Ok(())
}

fn validate_key_name(field: &str, name: &Option<String>) -> ApiResult<()> {
    if let Some(n) = name {
        if n.is_empty() || n.chars().count() > 128 || n.chars().any(char::is_control) {
            return Err(ApiError::validation(
                field,
                "must be 1..=128 characters without control characters",
            ));
        }
    }
    Ok(())
}

pub fn parse_scopes(field: &str, items: &[String]) -> ApiResult<Vec<Scope>> {
    if items.len() > 256 {
        return Err(ApiError::validation(
            field,
            "at most 256 scopes are allowed",
        ));
    }
    scope::parse_list(items).map_err(|e| ApiError::validation(field, e.to_string()))
}

pub fn parse_cidrs(field: &str, items: &[String]) -> ApiResult<Vec<ipnet::IpNet>> {
    keyward_core::cidr::parse_allowlist(items)
        .map_err(|e| ApiError::validation(field, e.to_string()))
}

/// Makes a new key record and its plaintexts from a creation spec. `agent` bounds the scopes
/// (a key's scopes are always within its agent's flat allowlist).
pub fn mint(
    state: &AppState,
    org: &Org,
    spec: &proto::CreateKeyRequest,
    kind: TokenKind,
    agent: Option<&Agent>,
    now: Timestamp,
) -> ApiResult<Minted> {
    let environment = match spec.environment.as_deref() {
        None => Environment::Live,
        Some(s) => Environment::parse(s)
            .ok_or_else(|| ApiError::validation("key.environment", "must be `live` or `test`"))?,
    };
    validate_key_name("key.name", &spec.name)?;
    let allowed = agent.map(|a| scope::flatten(&a.scopes));
    let scopes = match (&spec.scopes, &allowed) {
        (Some(s), _) => {
            let parsed = parse_scopes("key.scopes", s)?;
            if let Some(allowed) = &allowed {
                if !scope::is_subset(&parsed, allowed) {
                    return Err(ApiError::new(ErrorCode::ScopeNotSubset)
                        .msg("The key's scopes must be within the agent's scopes")
                        .details(json!({ "field": "key.scopes" })));
                }
            }
            parsed
        }
        (None, Some(allowed)) => allowed.clone(),
        (None, None) => vec![Scope::parse("*").map_err(ApiError::internal)?],
    };
    let expires_at = match spec.expires_in {
        None => None,
        Some(0) => {
            return Err(ApiError::validation(
                "key.expires_in",
                "must be greater than 0",
            ))
        }
        Some(s) if s > MAX_EXPIRES_IN_S => {
            return Err(ApiError::validation(
                "key.expires_in",
                format!("must be at most {MAX_EXPIRES_IN_S} seconds"),
            ))
        }
        Some(s) => Some(now + Duration::seconds(s as i64)),
    };
    let cidr_allowlist = parse_cidrs(
        "key.cidr_allowlist",
        spec.cidr_allowlist.as_deref().unwrap_or(&[]),
    )?;
    let rate_limit = spec
        .rate_limit
        .as_ref()
        .map(|r| render::parse_rate_limit("key.rate_limit", r, &org.policy))
        .transpose()?;
    let quota = spec
        .quota
        .as_ref()
        .map(|q| render::parse_quota("key.quota", q))
        .transpose()?;
    let alert_thresholds = spec.alert_thresholds.clone().unwrap_or_default();
    model::validate_alert_thresholds("key.alert_thresholds", &alert_thresholds)?;
    let metadata = spec.metadata.clone().unwrap_or_default();
    validate_metadata("key.metadata", &metadata)?;
    let requires_signature = spec.requires_signature.unwrap_or(false);
    let signing_secret = if requires_signature {
        Some(token::generate_signing_secret().map_err(ApiError::internal)?)
    } else {
        None
    };
    let signing_secret_enc = signing_secret
        .as_ref()
        .map(|s| state.config.master_key.seal(s.expose().as_bytes()))
        .transpose()
        .map_err(ApiError::internal)?;
    let (mut key, api_key) = Key::mint(org.id, agent.map(|a| a.id), kind, environment, scopes, now)
        .map_err(ApiError::internal)?;
    key.name = spec.name.clone();
    key.cidr_allowlist = cidr_allowlist;
    key.rate_limit = rate_limit;
    key.quota = quota;
    key.alert_thresholds = alert_thresholds;
    key.requires_signature = requires_signature;
    key.signing_secret_enc = signing_secret_enc;
    key.expires_at = expires_at;
    key.metadata = metadata;
    Ok(Minted {
        key,
        api_key,
        signing_secret,
    })
}

pub async fn load_org(state: &AppState, org_id: Uuid) -> ApiResult<Org> {
    state
        .store
        .get_org(org_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound).msg("The org was not found"))
}

pub async fn load_agent(state: &AppState, org_id: Uuid, agent_id: Uuid) -> ApiResult<Agent> {
    state
        .store
        .get_agent(org_id, agent_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::AgentNotFound))
}

/// A key of the caller's org; anything else (including another org's key) is `KEY_NOT_FOUND`,
/// so ids of other orgs' keys cannot be probed.
pub async fn load_key(state: &AppState, org_id: Uuid, key_id: Uuid) -> ApiResult<Key> {
    match state.store.get_key(key_id).await? {
        Some(k) if k.org_id == org_id => Ok(k),
        _ => Err(ApiError::new(ErrorCode::KeyNotFound)),
    }
}

fn not_found_as_key(e: StoreError) -> ApiError {
    match e {
        StoreError::NotFound => ApiError::new(ErrorCode::KeyNotFound),
        other => other.into(),
    }
}

fn created(resp: &proto::CreateKeyResponse) -> Response {
    (StatusCode::CREATED, Json(resp)).into_response()
}

/// Writes a minted key with its audit event and idempotency claim, replaying on a lost race.
async fn insert_minted(
    state: &AppState,
    minted: &Minted,
    audit: model::AuditEvent,
    claim: Option<idempotency::Claim>,
) -> ApiResult<Response> {
    let resp = minted.response();
    let record = claim.as_ref().map(|c| {
        c.record(
            201,
            serde_json::to_value(&resp).unwrap_or_default(),
            minted.key.agent_id,
        )
    });
    let key = minted.key.clone();
    let written = state
        .key_write(
            move |store| async move { store.insert_key(&key, &audit, record.as_ref()).await },
        )
        .await;
    match written {
        Ok(()) => Ok(created(&resp)),
        Err(StoreError::IdempotencyKeyTaken) => match &claim {
            Some(c) => idempotency::replay_after_race(state, c).await,
            None => Err(ApiError::internal("idempotency conflict without a claim")),
        },
        Err(StoreError::NotFound) => Err(ApiError::new(ErrorCode::AgentNotFound)),
        Err(e) => Err(e.into()),
    }
}

fn key_event_details(k: &Key) -> Value {
    json!({
        "kind": k.kind.as_str(),
        "environment": k.environment.as_str(),
        "scopes": k.scopes.iter().map(|s| s.as_str()).collect::<Vec<_>>(),
        "start": k.start,
    })
}

/// `POST /v1/orgs/{org}/agents/{id}/keys`
#[utoipa::path(post, path = "/v1/orgs/{org_id}/agents/{agent_id}/keys", tag = "keys",
    params(("org_id" = Uuid, Path), ("agent_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = proto::CreateKeyRequest,
    responses((status = 201, body = proto::CreateKeyResponse), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn mint_agent_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((org_id, agent_id)): ApiPath<(Uuid, Uuid)>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<proto::CreateKeyRequest>,
) -> ApiResult<Response> {
    caller.require_in(org_id, &["keys:write"])?;
    let org = load_org(&state, org_id).await?;
    let agent = load_agent(&state, org_id, agent_id).await?;
    // A replay is answered (or refused with IDEMPOTENCY_KEY_AGENT_*) before the agent's state is
    // judged, so the caller learns what happened to its original request.
    let path = format!("POST /v1/orgs/{org_id}/agents/{agent_id}/keys");
    let claim = match idempotency::check(&state, org_id, &headers, &path, &to_value(&body)).await? {
        Decision::Replay(r) => return Ok(r),
        Decision::Proceed(c) => c,
    };
    if agent.status == model::AgentStatus::Revoked {
        return Err(ApiError::new(ErrorCode::AgentRevoked));
    }
    let now = state.now();
    let minted = mint(&state, &org, &body, TokenKind::Agent, Some(&agent), now)?;
    let audit = caller.event(
        now,
        "key.create",
        "key",
        minted.key.id,
        key_event_details(&minted.key),
    );
    insert_minted(&state, &minted, audit, claim).await
}

pub fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// `GET /v1/orgs/{org}/agents/{id}/keys`
#[utoipa::path(get, path = "/v1/orgs/{org_id}/agents/{agent_id}/keys", tag = "keys",
    params(("org_id" = Uuid, Path), ("agent_id" = Uuid, Path), proto::PageQuery),
    responses((status = 200, body = proto::KeyList), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_agent_keys(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((org_id, agent_id)): ApiPath<(Uuid, Uuid)>,
    ApiQuery(q): ApiQuery<proto::PageQuery>,
) -> ApiResult<Json<proto::KeyList>> {
    caller.require_in(org_id, &["keys:read"])?;
    let p = page::parse(&q)?;
    load_agent(&state, org_id, agent_id).await?;
    let filter = KeyFilter {
        agent_id: Some(agent_id),
        kind: None,
        include_revoked: true,
    };
    let mut keys = state.store.list_keys(org_id, &filter, p).await?;
    let has_more = page::trim(&mut keys, p);
    Ok(Json(proto::KeyList {
        keys: keys.iter().map(render::key).collect(),
        limit: p.limit,
        offset: p.offset,
        has_more,
    }))
}

async fn agent_key(state: &AppState, org_id: Uuid, agent_id: Uuid, key_id: Uuid) -> ApiResult<Key> {
    load_agent(state, org_id, agent_id).await?;
    let key = load_key(state, org_id, key_id).await?;
    if key.agent_id != Some(agent_id) {
        return Err(ApiError::new(ErrorCode::KeyNotFound));
    }
    Ok(key)
}

async fn set_deprecated(
    state: &AppState,
    caller: &Caller,
    mut key: Key,
    deprecate: bool,
) -> ApiResult<Json<proto::Key>> {
    if key.revoked_at.is_some() {
        return Err(ApiError::new(ErrorCode::KeyAlreadyRevoked));
    }
    if key.deprecated_at.is_some() == deprecate {
        return Ok(Json(render::key(&key)));
    }
    let now = state.now();
    key.deprecated_at = if deprecate { Some(now) } else { None };
    let action = if deprecate {
        "key.deprecate"
    } else {
        "key.undeprecate"
    };
    let audit = caller.event(now, action, "key", key.id, json!({}));
    let updated = key.clone();
    state
        .key_write(move |store| async move { store.update_key(&updated, &audit).await })
        .await
        .map_err(not_found_as_key)?;
    Ok(Json(render::key(&key)))
}

/// `POST /v1/orgs/{org}/agents/{id}/keys/{key_id}/deprecate`
#[utoipa::path(post, path = "/v1/orgs/{org_id}/agents/{agent_id}/keys/{key_id}/deprecate", tag = "keys",
    params(("org_id" = Uuid, Path), ("agent_id" = Uuid, Path), ("key_id" = Uuid, Path)),
    responses((status = 200, body = proto::Key), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn deprecate(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((org_id, agent_id, key_id)): ApiPath<(Uuid, Uuid, Uuid)>,
) -> ApiResult<Json<proto::Key>> {
    caller.require_in(org_id, &["keys:write"])?;
    let key = agent_key(&state, org_id, agent_id, key_id).await?;
    set_deprecated(&state, &caller, key, true).await
}

/// `POST /v1/orgs/{org}/agents/{id}/keys/{key_id}/undeprecate`
#[utoipa::path(post, path = "/v1/orgs/{org_id}/agents/{agent_id}/keys/{key_id}/undeprecate", tag = "keys",
    params(("org_id" = Uuid, Path), ("agent_id" = Uuid, Path), ("key_id" = Uuid, Path)),
    responses((status = 200, body = proto::Key), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn undeprecate(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((org_id, agent_id, key_id)): ApiPath<(Uuid, Uuid, Uuid)>,
) -> ApiResult<Json<proto::Key>> {
    caller.require_in(org_id, &["keys:write"])?;
    let key = agent_key(&state, org_id, agent_id, key_id).await?;
    set_deprecated(&state, &caller, key, false).await
}

/// `?force=true` on revocations.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ForceQuery {
    /// Revoke even when it leaves the agent without an active key.
    pub force: Option<bool>,
}

async fn revoke(
    state: &AppState,
    caller: &Caller,
    key: Key,
    force: bool,
) -> ApiResult<Json<proto::Key>> {
    if key.revoked_at.is_some() {
        return Err(ApiError::new(ErrorCode::KeyAlreadyRevoked));
    }
    let now = state.now();
    // The cascade list is only known inside the transaction; the event records the request and
    // the store's answer below records how many keys went with it.
    let audit = caller.event(now, "key.revoke", "key", key.id, json!({ "force": force }));
    let id = key.id;
    let revoked = state
        .key_write(move |store| async move { store.revoke_key(id, now, force, &audit).await })
        .await
        .map_err(not_found_as_key)?;
    tracing::info!(key_id = %key.id, cascaded = revoked.cascaded.len(), "key revoked");
    Ok(Json(render::key(&revoked.key)))
}

/// `POST /v1/orgs/{org}/agents/{id}/keys/{key_id}/revoke`
#[utoipa::path(post, path = "/v1/orgs/{org_id}/agents/{agent_id}/keys/{key_id}/revoke", tag = "keys",
    params(("org_id" = Uuid, Path), ("agent_id" = Uuid, Path), ("key_id" = Uuid, Path), ForceQuery),
    responses((status = 200, body = proto::Key), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn revoke_agent_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((org_id, agent_id, key_id)): ApiPath<(Uuid, Uuid, Uuid)>,
    ApiQuery(q): ApiQuery<ForceQuery>,
) -> ApiResult<Json<proto::Key>> {
    caller.require_in(org_id, &["keys:admin"])?;
    let key = agent_key(&state, org_id, agent_id, key_id).await?;
    revoke(&state, &caller, key, q.force.unwrap_or(false)).await
}

/// `POST /v1/keys/{key_id}/revoke`
#[utoipa::path(post, path = "/v1/keys/{key_id}/revoke", tag = "keys",
    params(("key_id" = Uuid, Path), ForceQuery),
    responses((status = 200, body = proto::Key), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(key_id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<ForceQuery>,
) -> ApiResult<Json<proto::Key>> {
    caller.require(&["keys:admin"])?;
    let key = load_key(&state, caller.org_id(), key_id).await?;
    revoke(&state, &caller, key, q.force.unwrap_or(false)).await
}

/// `POST /v1/orgs/{org}/keys`
#[utoipa::path(post, path = "/v1/orgs/{org_id}/keys", tag = "keys",
    params(("org_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = proto::CreateKeyRequest,
    responses((status = 201, body = proto::CreateKeyResponse), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn create_root_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(org_id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<proto::CreateKeyRequest>,
) -> ApiResult<Response> {
    caller.require_in(org_id, &["org:admin"])?;
    let org = load_org(&state, org_id).await?;
    let path = format!("POST /v1/orgs/{org_id}/keys");
    let claim = match idempotency::check(&state, org_id, &headers, &path, &to_value(&body)).await? {
        Decision::Replay(r) => return Ok(r),
        Decision::Proceed(c) => c,
    };
    let now = state.now();
    let minted = mint(&state, &org, &body, TokenKind::Root, None, now)?;
    let audit = caller.event(
        now,
        "key.create",
        "key",
        minted.key.id,
        key_event_details(&minted.key),
    );
    insert_minted(&state, &minted, audit, claim).await
}

/// Filters of `GET /v1/orgs/{org}/keys`.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OrgKeysQuery {
    pub agent_id: Option<Uuid>,
    /// `root`, `agent` or `derived`.
    pub kind: Option<String>,
    pub include_revoked: Option<bool>,
    pub limit: Option<u32>,
    pub offset: Option<u64>,
}

/// `GET /v1/orgs/{org}/keys`
#[utoipa::path(get, path = "/v1/orgs/{org_id}/keys", tag = "keys",
    params(("org_id" = Uuid, Path), OrgKeysQuery),
    responses((status = 200, body = proto::KeyList), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn list_org_keys(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<OrgKeysQuery>,
) -> ApiResult<Json<proto::KeyList>> {
    caller.require_in(org_id, &["keys:read"])?;
    let p = page::parse(&proto::PageQuery {
        limit: q.limit,
        offset: q.offset,
    })?;
    let kind = q
        .kind
        .as_deref()
        .map(|k| {
            TokenKind::parse(k)
                .filter(|k| matches!(k, TokenKind::Root | TokenKind::Agent | TokenKind::Derived))
                .ok_or_else(|| ApiError::validation("kind", "must be `root`, `agent` or `derived`"))
        })
        .transpose()?;
    let filter = KeyFilter {
        agent_id: q.agent_id,
        kind,
        include_revoked: q.include_revoked.unwrap_or(false),
    };
    let mut keys = state.store.list_keys(org_id, &filter, p).await?;
    let has_more = page::trim(&mut keys, p);
    Ok(Json(proto::KeyList {
        keys: keys.iter().map(render::key).collect(),
        limit: p.limit,
        offset: p.offset,
        has_more,
    }))
}

/// `GET /v1/keys/{key_id}`
#[utoipa::path(get, path = "/v1/keys/{key_id}", tag = "keys",
    params(("key_id" = Uuid, Path)),
    responses((status = 200, body = proto::Key), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(key_id): ApiPath<Uuid>,
) -> ApiResult<Json<proto::Key>> {
    caller.require(&["keys:read"])?;
    let key = load_key(&state, caller.org_id(), key_id).await?;
    Ok(Json(render::key(&key)))
}

/// `PATCH /v1/keys/{key_id}`
#[utoipa::path(patch, path = "/v1/keys/{key_id}", tag = "keys",
    params(("key_id" = Uuid, Path)),
    request_body = proto::UpdateKeyRequest,
    responses((status = 200, body = proto::Key), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn patch_key(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(key_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<proto::UpdateKeyRequest>,
) -> ApiResult<Json<proto::Key>> {
    caller.require(&["keys:write"])?;
    let org = load_org(&state, caller.org_id()).await?;
    let mut key = load_key(&state, caller.org_id(), key_id).await?;
    if key.revoked_at.is_some() {
        return Err(ApiError::new(ErrorCode::KeyAlreadyRevoked));
    }
    let before = key.clone();
    let mut changed = Vec::new();
    if let Some(name) = body.name {
        validate_key_name("name", &name)?;
        key.name = name;
        changed.push("name");
    }
    if let Some(list) = &body.cidr_allowlist {
        let parsed = parse_cidrs("cidr_allowlist", list)?;
        if let Some(parent_id) = key.parent_key_id {
            let parent = load_key(&state, caller.org_id(), parent_id).await?;
            if !keyward_core::cidr::is_subset(&parsed, &parent.cidr_allowlist) {
                return Err(ApiError::new(ErrorCode::CidrNotSubset)
                    .msg("A derived key's allowlist must stay within its parent's")
                    .details(json!({ "field": "cidr_allowlist" })));
            }
        }
        key.cidr_allowlist = parsed;
        changed.push("cidr_allowlist");
    }
    if let Some(r) = &body.rate_limit {
        key.rate_limit = r
            .as_ref()
            .map(|r| render::parse_rate_limit("rate_limit", r, &org.policy))
            .transpose()?;
        changed.push("rate_limit");
    }
    if let Some(q) = &body.quota {
        key.quota = q
            .as_ref()
            .map(|q| render::parse_quota("quota", q))
            .transpose()?;
        changed.push("quota");
    }
    if let Some(t) = body.alert_thresholds {
        model::validate_alert_thresholds("alert_thresholds", &t)?;
        key.alert_thresholds = t;
        changed.push("alert_thresholds");
    }
    if let Some(m) = body.metadata {
        validate_metadata("metadata", &m)?;
        key.metadata = m;
        changed.push("metadata");
    }
    if key == before {
        return Ok(Json(render::key(&key)));
    }
    if key.quota != before.quota && state.store.is_shared() {
        // A shared store starts the changed quota's counter from the uses it has counted:
        // write this node's pending ones first, so they are among them. (Another node's
        // uses not flushed before the counter's first take, at most one flush interval's,
        // are not counted by it.)
        state.flush_usage().await?;
    }
    let now = state.now();
    let audit = caller.event(
        now,
        "key.update",
        "key",
        key.id,
        json!({ "changed": changed }),
    );
    let updated = key.clone();
    state
        .key_write(move |store| async move { store.update_key(&updated, &audit).await })
        .await
        .map_err(not_found_as_key)?;
    Ok(Json(render::key(&key)))
}

/// `POST /v1/keys/derive`
#[utoipa::path(post, path = "/v1/keys/derive", tag = "keys",
    params(("Idempotency-Key" = Option<String>, Header)),
    request_body = proto::DeriveKeyRequest,
    responses((status = 201, body = proto::CreateKeyResponse), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn derive(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<proto::DeriveKeyRequest>,
) -> ApiResult<Response> {
    if caller.key().kind == TokenKind::Derived {
        return Err(ApiError::new(ErrorCode::InsufficientScope)
            .msg("A derived key cannot derive further keys")
            .details(json!({ "required": ["keys:derive"] })));
    }
    caller.require(&["keys:derive"])?;
    let org = load_org(&state, caller.org_id()).await?;
    if body.scopes.is_empty() {
        return Err(ApiError::validation("scopes", "must not be empty"));
    }
    let scopes = parse_scopes("scopes", &body.scopes)?;
    let derive_scope = Scope::parse("keys:derive").map_err(ApiError::internal)?;
    if scope::implies(&scopes, &derive_scope) {
        return Err(ApiError::validation(
            "scopes",
            "a derived key cannot hold `keys:derive` (derived keys never derive further)",
        ));
    }
    if !scope::is_subset(&scopes, caller.scopes()) {
        return Err(ApiError::new(ErrorCode::ScopeNotSubset).details(json!({ "field": "scopes" })));
    }
    if body.expires_in == 0 {
        return Err(ApiError::validation("expires_in", "must be greater than 0"));
    }
    let cidr_allowlist = match &body.cidr_allowlist {
        None => caller.key().cidr_allowlist.clone(),
        Some(list) => {
            let parsed = parse_cidrs("cidr_allowlist", list)?;
            if !keyward_core::cidr::is_subset(&parsed, &caller.key().cidr_allowlist) {
                return Err(ApiError::new(ErrorCode::CidrNotSubset)
                    .details(json!({ "field": "cidr_allowlist" })));
            }
            parsed
        }
    };
    validate_key_name("name", &body.name)?;
    let metadata = body.metadata.clone().unwrap_or_default();
    validate_metadata("metadata", &metadata)?;
    let claim = match idempotency::check(
        &state,
        caller.org_id(),
        &headers,
        "POST /v1/keys/derive",
        &to_value(&body),
    )
    .await?
    {
        Decision::Replay(r) => return Ok(r),
        Decision::Proceed(c) => c,
    };
    let now = state.now();
    // The lifetime is capped, not refused: by the org's ceiling and by the parent's own expiry.
    let ttl = body.expires_in.min(org.policy.max_key_ttl_s);
    let mut expires_at = now + Duration::seconds(ttl as i64);
    if let Some(parent_exp) = caller.key().expires_at {
        expires_at = expires_at.min(parent_exp);
    }
    let parent = caller.key();
    let (mut key, api_key) = Key::mint(
        parent.org_id,
        parent.agent_id,
        TokenKind::Derived,
        parent.environment,
        scopes,
        now,
    )
    .map_err(ApiError::internal)?;
    key.parent_key_id = Some(parent.id);
    key.name = body.name.clone();
    key.cidr_allowlist = cidr_allowlist;
    key.rate_limit = parent.rate_limit.clone();
    key.quota = parent.quota;
    key.expires_at = Some(expires_at);
    key.metadata = metadata;
    let minted = Minted {
        key,
        api_key,
        signing_secret: None,
    };
    let audit = caller.event(
        now,
        "key.derive",
        "key",
        minted.key.id,
        key_event_details(&minted.key),
    );
    insert_minted(&state, &minted, audit, claim).await
}

/// `POST /v1/keys/{key_id}/rotate`
#[utoipa::path(post, path = "/v1/keys/{key_id}/rotate", tag = "keys",
    params(("key_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = proto::RotateKeyRequest,
    responses((status = 201, body = proto::CreateKeyResponse), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn rotate(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(key_id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiJsonOrEmpty(body): ApiJsonOrEmpty<proto::RotateKeyRequest>,
) -> ApiResult<Response> {
    caller.require(&["keys:admin"])?;
    let overlap_days = body.overlap_days.unwrap_or(7);
    if overlap_days > 30 {
        return Err(ApiError::validation(
            "overlap_days",
            "must be between 0 and 30",
        ));
    }
    let org = load_org(&state, caller.org_id()).await?;
    let mut old = load_key(&state, caller.org_id(), key_id).await?;
    // A replay answers with the original result before the key's or agent's state is judged.
    let path = format!("POST /v1/keys/{key_id}/rotate");
    let claim = match idempotency::check(&state, org.id, &headers, &path, &to_value(&body)).await? {
        Decision::Replay(r) => return Ok(r),
        Decision::Proceed(c) => c,
    };
    if old.kind == TokenKind::Derived {
        return Err(ApiError::new(ErrorCode::DerivedKeyNotRotatable));
    }
    if old.revoked_at.is_some() {
        return Err(ApiError::new(ErrorCode::KeyAlreadyRevoked));
    }
    let agent = match old.agent_id {
        Some(a) => Some(load_agent(&state, org.id, a).await?),
        None => None,
    };
    if agent
        .as_ref()
        .is_some_and(|a| a.status == model::AgentStatus::Revoked)
    {
        return Err(ApiError::new(ErrorCode::AgentRevoked));
    }
    let now = state.now();
    let api_key = token::generate(old.environment, old.kind).map_err(ApiError::internal)?;
    let signing_secret = if old.requires_signature {
        Some(token::generate_signing_secret().map_err(ApiError::internal)?)
    } else {
        None
    };
    let signing_secret_enc = signing_secret
        .as_ref()
        .map(|s| state.config.master_key.seal(s.expose().as_bytes()))
        .transpose()
        .map_err(ApiError::internal)?;
    // The successor keeps the old key's lifetime length, counted from now.
    let successor_expiry = old.expires_at.map(|e| now + (e - old.created_at));
    let successor = Key {
        id: Uuid::now_v7(),
        start: token::display_start(api_key.expose()),
        digest: TokenDigest::of(api_key.expose()),
        signing_secret_enc,
        expires_at: successor_expiry,
        deprecated_at: None,
        revoked_at: None,
        successor_key_id: None,
        last_used_at: None,
        created_at: now,
        ..old.clone()
    };
    let overlap_end = now + Duration::days(overlap_days as i64);
    old.deprecated_at = Some(now);
    old.expires_at = Some(old.expires_at.map_or(overlap_end, |e| e.min(overlap_end)));
    old.successor_key_id = Some(successor.id);
    let minted = Minted {
        key: successor,
        api_key,
        signing_secret,
    };
    let resp = minted.response();
    let record = claim.as_ref().map(|c| {
        c.record(
            201,
            serde_json::to_value(&resp).unwrap_or_default(),
            minted.key.agent_id,
        )
    });
    let audit = caller.event(
        now,
        "key.rotate",
        "key",
        old.id,
        json!({ "successor_key_id": minted.key.id, "overlap_days": overlap_days }),
    );
    let (previous, key) = (old.clone(), minted.key.clone());
    let written = state
        .key_write(move |store| async move {
            store
                .rotate_key(&previous, &key, &audit, record.as_ref())
                .await
        })
        .await;
    match written {
        Ok(()) => Ok(created(&resp)),
        Err(StoreError::IdempotencyKeyTaken) => match &claim {
            Some(c) => idempotency::replay_after_race(&state, c).await,
            None => Err(ApiError::internal("idempotency conflict without a claim")),
        },
        Err(e) => Err(not_found_as_key(e)),
    }
}
