//! Agents: create (with the first key), list, get, by-name, broadening-only update, pause,
//! resume and tombstone delete (API.md §3, §4).

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use keyward_core::model::{self, Agent, AgentStatus, AgentType};
use keyward_core::scope;
use keyward_core::token::TokenKind;
use keyward_proto::{self as proto, ErrorCode};
use keyward_store::StoreError;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::auth::{is_agent_credential, Caller};
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath, ApiQuery};
use crate::idempotency::{self, Decision};
use crate::keys::{load_agent, load_org, mint, to_value, validate_metadata};
use crate::{page, render, AppState};

/// How many times a read-modify-write of an agent is retried when another writer got there first.
const UPDATE_RETRIES: usize = 8;

fn validate_policy(field: &str, p: &Map<String, Value>) -> ApiResult<()> {
    validate_metadata(field, p)?;
    model::validate_policy_rules(field, p)?;
    if let Some(v) = p.get("allow_subagents") {
        if !v.is_boolean() {
            return Err(ApiError::validation(
                &format!("{field}.allow_subagents"),
                "must be a boolean",
            ));
        }
    }
    Ok(())
}

fn validate_display_name(v: &Option<String>) -> ApiResult<()> {
    if let Some(d) = v {
        if d.chars().count() > 256 || d.chars().any(char::is_control) {
            return Err(ApiError::validation(
                "display_name",
                "must be at most 256 characters without control characters",
            ));
        }
    }
    Ok(())
}

fn validate_scopes(field: &str, s: &scope::ProviderScopes) -> ApiResult<()> {
    scope::validate_provider_scopes(s).map_err(|e| ApiError::validation(field, e.to_string()))
}

fn allows_subagents(a: &Agent) -> bool {
    a.policy.get("allow_subagents").and_then(Value::as_bool) == Some(true)
}

/// `POST /v1/orgs/{org}/agents`
#[utoipa::path(post, path = "/v1/orgs/{org_id}/agents", tag = "agents",
    params(("org_id" = Uuid, Path), ("Idempotency-Key" = Option<String>, Header)),
    request_body = proto::CreateAgentRequest,
    responses((status = 201, body = proto::CreateAgentResponse), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(org_id): ApiPath<Uuid>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<proto::CreateAgentRequest>,
) -> ApiResult<Response> {
    // An agent credential may only create agents when its agent's policy allows sub-agents;
    // the new agent then records its parent and stays within the parent's scopes.
    let mut parent: Option<Agent> = None;
    if is_agent_credential(caller.key()) {
        // Another org's agent is simply not a member here, whatever its policy says.
        caller.require_org(org_id)?;
        let agent_id = caller
            .key()
            .agent_id
            .ok_or_else(|| ApiError::internal("agent key without agent"))?;
        let p = load_agent(&state, caller.org_id(), agent_id).await?;
        if !allows_subagents(&p) {
            return Err(ApiError::new(ErrorCode::AgentCannotMintSubagents));
        }
        parent = Some(p);
    }
    caller.require_in(org_id, &["agents:write"])?;
    let org = load_org(&state, org_id).await?;

    keyward_core::validate::agent_name(&body.name)?;
    validate_display_name(&body.display_name)?;
    let agent_type = match body.agent_type.as_deref() {
        None => AgentType::Agent,
        Some(t) => AgentType::parse(t)
            .ok_or_else(|| ApiError::validation("type", "must be `agent` or `service`"))?,
    };
    let scopes = body.scopes.clone().unwrap_or_default();
    validate_scopes("scopes", &scopes)?;
    if let Some(p) = &parent {
        if !scope::is_subset(&scope::flatten(&scopes), &scope::flatten(&p.scopes)) {
            return Err(ApiError::new(ErrorCode::ScopeNotSubset)
                .msg("A sub-agent's scopes must be within its parent agent's scopes")
                .details(json!({ "field": "scopes" })));
        }
    }
    let metadata = body.metadata.clone().unwrap_or_default();
    validate_metadata("metadata", &metadata)?;
    let policy = body.policy.clone().unwrap_or_default();
    validate_policy("policy", &policy)?;
    let capabilities = body.capabilities.clone().unwrap_or_default();
    if capabilities.len() > 256 || capabilities.iter().any(|c| c.is_empty() || c.len() > 256) {
        return Err(ApiError::validation(
            "capabilities",
            "at most 256 non-empty strings of at most 256 characters",
        ));
    }
    if let Some(did) = &body.did {
        if did.is_empty() || did.len() > 512 {
            return Err(ApiError::validation("did", "must be 1..=512 characters"));
        }
    }

    let path = format!("POST /v1/orgs/{org_id}/agents");
    let claim = match idempotency::check(&state, org_id, &headers, &path, &to_value(&body)).await? {
        Decision::Replay(r) => return Ok(r),
        Decision::Proceed(c) => c,
    };
    let now = state.now();
    let agent = Agent {
        id: Uuid::now_v7(),
        org_id,
        name: body.name.clone(),
        display_name: body.display_name.clone(),
        agent_type,
        status: AgentStatus::Active,
        scopes,
        metadata,
        policy,
        capabilities,
        did: body.did.clone(),
        owner_user_id: None,
        parent_agent_id: parent.as_ref().map(|p| p.id),
        version: 1,
        created_at: now,
        updated_at: now,
        revoked_at: None,
    };
    let spec = body.key.clone().unwrap_or_default();
    let minted = mint(&state, &org, &spec, TokenKind::Agent, Some(&agent), now)?;
    let resp = proto::CreateAgentResponse {
        agent: render::agent(&agent),
        key: render::key(&minted.key),
        api_key: Some(minted.api_key.expose().to_string()),
        signing_secret: minted
            .signing_secret
            .as_ref()
            .map(|s| s.expose().to_string()),
    };
    let record = claim
        .as_ref()
        .map(|c| c.record(201, to_value(&resp), Some(agent.id)));
    let events = [
        caller.event(
            now,
            "agent.create",
            "agent",
            agent.id,
            json!({ "name": agent.name }),
        ),
        caller.event(
            now,
            "key.create",
            "key",
            minted.key.id,
            json!({ "kind": "agent", "agent_id": agent.id, "start": minted.key.start }),
        ),
    ];
    let written = {
        let (agent, key) = (agent.clone(), minted.key.clone());
        state
            .key_write(move |store| async move {
                store
                    .create_agent(&agent, &key, &events, record.as_ref())
                    .await
            })
            .await
    };
    match written {
        Ok(()) => Ok((StatusCode::CREATED, Json(resp)).into_response()),
        Err(StoreError::IdempotencyKeyTaken) => match &claim {
            Some(c) => idempotency::replay_after_race(&state, c).await,
            None => Err(ApiError::internal("idempotency conflict without a claim")),
        },
        Err(StoreError::AgentNameExists) => {
            Err(ApiError::new(ErrorCode::AgentNameExists).details(json!({ "name": agent.name })))
        }
        Err(StoreError::AgentRevoked) => {
            Err(ApiError::new(ErrorCode::AgentRevoked).msg("The parent agent is no longer active"))
        }
        Err(e) => Err(e.into()),
    }
}

/// Filters of the agent list.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListAgentsQuery {
    /// Include revoked agents (tombstones).
    pub include_revoked: Option<bool>,
    pub limit: Option<u32>,
    pub offset: Option<u64>,
}

/// `GET /v1/orgs/{org}/agents`
#[utoipa::path(get, path = "/v1/orgs/{org_id}/agents", tag = "agents",
    params(("org_id" = Uuid, Path), ListAgentsQuery),
    responses((status = 200, body = proto::AgentList), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<ListAgentsQuery>,
) -> ApiResult<Json<proto::AgentList>> {
    caller.require_in(org_id, &["agents:read"])?;
    let p = page::parse(&proto::PageQuery {
        limit: q.limit,
        offset: q.offset,
    })?;
    let mut agents = state
        .store
        .list_agents(org_id, q.include_revoked.unwrap_or(false), p)
        .await?;
    let has_more = page::trim(&mut agents, p);
    Ok(Json(proto::AgentList {
        agents: agents.iter().map(render::agent).collect(),
        limit: p.limit,
        offset: p.offset,
        has_more,
    }))
}

/// `GET /v1/orgs/{org}/agents/{id}`
#[utoipa::path(get, path = "/v1/orgs/{org_id}/agents/{agent_id}", tag = "agents",
    params(("org_id" = Uuid, Path), ("agent_id" = Uuid, Path)),
    responses((status = 200, body = proto::Agent), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((org_id, agent_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<proto::Agent>> {
    caller.require_in(org_id, &["agents:read"])?;
    Ok(Json(render::agent(
        &load_agent(&state, org_id, agent_id).await?,
    )))
}

/// `GET /v1/orgs/{org}/agents/by-name/{name}`
#[utoipa::path(get, path = "/v1/orgs/{org_id}/agents/by-name/{name}", tag = "agents",
    params(("org_id" = Uuid, Path), ("name" = String, Path)),
    responses((status = 200, body = proto::Agent), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_by_name(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((org_id, name)): ApiPath<(Uuid, String)>,
) -> ApiResult<Json<proto::Agent>> {
    caller.require_in(org_id, &["agents:read"])?;
    if keyward_core::validate::agent_name(&name).is_err() {
        return Err(ApiError::new(ErrorCode::AgentNotFound));
    }
    state
        .store
        .get_agent_by_name(org_id, &name)
        .await?
        .map(|a| Json(render::agent(&a)))
        .ok_or_else(|| ApiError::new(ErrorCode::AgentNotFound))
}

/// Applies `change` to the agent and writes it if anything changed, retrying on a concurrent
/// update. A no-op leaves the version alone and writes nothing.
async fn modify<F>(
    state: &AppState,
    caller: &Caller,
    org_id: Uuid,
    agent_id: Uuid,
    action: &str,
    change: F,
) -> ApiResult<Agent>
where
    F: Fn(&mut Agent) -> ApiResult<Vec<&'static str>>,
{
    for _ in 0..UPDATE_RETRIES {
        let current = load_agent(state, org_id, agent_id).await?;
        if current.status == AgentStatus::Revoked {
            return Err(ApiError::new(ErrorCode::AgentRevoked));
        }
        let mut next = current.clone();
        let changed = change(&mut next)?;
        if next == current {
            return Ok(current);
        }
        let now = state.now();
        next.version = current.version + 1;
        next.updated_at = now;
        let audit = caller.event(
            now,
            action,
            "agent",
            agent_id,
            json!({ "changed": changed }),
        );
        let written = {
            let (updated, version) = (next.clone(), current.version);
            state
                .key_write(move |store| async move {
                    store.update_agent(&updated, version, &audit).await
                })
                .await
        };
        match written {
            Ok(()) => return Ok(next),
            Err(StoreError::Conflict) => continue,
            Err(StoreError::NotFound) => return Err(ApiError::new(ErrorCode::AgentNotFound)),
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::new(ErrorCode::StoreUnavailable)
        .msg("The agent is being changed concurrently; retry the request"))
}

/// `PATCH /v1/orgs/{org}/agents/{id}`
#[utoipa::path(patch, path = "/v1/orgs/{org_id}/agents/{agent_id}", tag = "agents",
    params(("org_id" = Uuid, Path), ("agent_id" = Uuid, Path)),
    request_body = proto::UpdateAgentRequest,
    responses((status = 200, body = proto::Agent), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((org_id, agent_id)): ApiPath<(Uuid, Uuid)>,
    ApiJson(body): ApiJson<proto::UpdateAgentRequest>,
) -> ApiResult<Json<proto::Agent>> {
    caller.require_in(org_id, &["agents:write"])?;
    if let Some(d) = &body.display_name {
        validate_display_name(d)?;
    }
    if let Some(m) = &body.metadata {
        validate_metadata("metadata", m)?;
    }
    if let Some(p) = &body.policy {
        validate_policy("policy", p)?;
    }
    if let Some(s) = &body.scopes {
        validate_scopes("scopes", s)?;
    }
    let agent = modify(&state, &caller, org_id, agent_id, "agent.update", |a| {
        let mut changed = Vec::new();
        if let Some(d) = &body.display_name {
            if &a.display_name != d {
                a.display_name = d.clone();
                changed.push("display_name");
            }
        }
        if let Some(m) = &body.metadata {
            if &a.metadata != m {
                a.metadata = m.clone();
                changed.push("metadata");
            }
        }
        if let Some(s) = &body.scopes {
            if !scope::is_broadening(&a.scopes, s) {
                return Err(ApiError::new(ErrorCode::ScopeNarrowingNotSupported)
                    .details(json!({ "field": "scopes" })));
            }
            if &a.scopes != s {
                a.scopes = s.clone();
                changed.push("scopes");
            }
        }
        if let Some(p) = &body.policy {
            if &a.policy != p {
                a.policy = p.clone();
                changed.push("policy");
            }
        }
        Ok(changed)
    })
    .await?;
    Ok(Json(render::agent(&agent)))
}

async fn set_status(
    state: &AppState,
    caller: &Caller,
    org_id: Uuid,
    agent_id: Uuid,
    from: AgentStatus,
    to: AgentStatus,
    action: &str,
) -> ApiResult<Json<proto::Agent>> {
    caller.require_in(org_id, &["agents:write"])?;
    let agent = modify(state, caller, org_id, agent_id, action, |a| {
        if a.status == from {
            a.status = to;
            Ok(vec!["status"])
        } else {
            Ok(vec![])
        }
    })
    .await?;
    Ok(Json(render::agent(&agent)))
}

/// `POST /v1/orgs/{org}/agents/{id}/pause`
#[utoipa::path(post, path = "/v1/orgs/{org_id}/agents/{agent_id}/pause", tag = "agents",
    params(("org_id" = Uuid, Path), ("agent_id" = Uuid, Path)),
    responses((status = 200, body = proto::Agent), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((org_id, agent_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<proto::Agent>> {
    set_status(
        &state,
        &caller,
        org_id,
        agent_id,
        AgentStatus::Active,
        AgentStatus::Paused,
        "agent.pause",
    )
    .await
}

/// `POST /v1/orgs/{org}/agents/{id}/resume`
#[utoipa::path(post, path = "/v1/orgs/{org_id}/agents/{agent_id}/resume", tag = "agents",
    params(("org_id" = Uuid, Path), ("agent_id" = Uuid, Path)),
    responses((status = 200, body = proto::Agent), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((org_id, agent_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<proto::Agent>> {
    set_status(
        &state,
        &caller,
        org_id,
        agent_id,
        AgentStatus::Paused,
        AgentStatus::Active,
        "agent.resume",
    )
    .await
}

/// `DELETE /v1/orgs/{org}/agents/{id}`: tombstone. Repeating it returns the same tombstone.
#[utoipa::path(delete, path = "/v1/orgs/{org_id}/agents/{agent_id}", tag = "agents",
    params(("org_id" = Uuid, Path), ("agent_id" = Uuid, Path)),
    responses((status = 200, body = proto::Agent), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath((org_id, agent_id)): ApiPath<(Uuid, Uuid)>,
) -> ApiResult<Json<proto::Agent>> {
    caller.require_in(org_id, &["agents:write"])?;
    let now = state.now();
    let result = modify(&state, &caller, org_id, agent_id, "agent.delete", |a| {
        a.status = AgentStatus::Revoked;
        a.revoked_at = Some(now);
        Ok(vec!["status"])
    })
    .await;
    match result {
        Ok(a) => Ok(Json(render::agent(&a))),
        // Already a tombstone: answer it as it is.
        Err(e) if e.code == ErrorCode::AgentRevoked => Ok(Json(render::agent(
            &load_agent(&state, org_id, agent_id).await?,
        ))),
        Err(e) => Err(e),
    }
}
