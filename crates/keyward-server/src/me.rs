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
    Ok(Json(proto::MeResponse {
        agent: render::agent(&agent),
        key: render::key(caller.key()),
    }))
}
