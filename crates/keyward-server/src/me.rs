//! `GET /v1/me`: the calling agent and the calling key, for self-diagnosis. It works while the
//! agent is paused or revoked (the credential middleware skips the agent checks here).

use axum::extract::State;
use axum::Json;
use keyward_proto::{self as proto, ErrorCode};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::{render, AppState};

#[utoipa::path(get, path = "/v1/me", tag = "me",
    responses((status = 200, body = proto::MeResponse), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn me(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Json<proto::MeResponse>> {
    answer(&state, caller).await
}

/// The handler's work, for the router and the front door.
pub async fn answer(state: &AppState, caller: Caller) -> ApiResult<Json<proto::MeResponse>> {
    let Some(agent_id) = caller.key().agent_id else {
        return Err(ApiError::new(ErrorCode::MeRequiresAgentKey));
    };
    let agent = state
        .cache
        .agent(state.store.as_ref(), caller.org_id(), agent_id)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::AgentNotFound))?;
    let mut key = render::key(caller.key());
    // The snapshot's `last_used_at` is the store's when the key was cached; this request is
    // itself a use of the key, counted when it was admitted, so it is the latest.
    let admitted = keyward_core::clock::from_millis(caller.admitted_ms);
    key.last_used_at = Some(key.last_used_at.map_or(admitted, |t| t.max(admitted)));
    Ok(Json(proto::MeResponse {
        agent: render::agent(&agent),
        key,
    }))
}
