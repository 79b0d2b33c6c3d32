//! Orgs: read and change an org's name and policy (API.md §3).

use axum::extract::State;
use axum::Json;
use keyward_core::model::OrgPolicy;
use keyward_proto as proto;
use serde_json::json;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{ApiJson, ApiPath};
use crate::keys::load_org;
use crate::{render, AppState};

/// `GET /v1/orgs/{org}`: any key of the org.
#[utoipa::path(get, path = "/v1/orgs/{org_id}", tag = "orgs",
    params(("org_id" = Uuid, Path)),
    responses((status = 200, body = proto::Org), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn get_org(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(org_id): ApiPath<Uuid>,
) -> ApiResult<Json<proto::Org>> {
    caller.require_org(org_id)?;
    Ok(Json(render::org(&load_org(&state, org_id).await?)))
}

/// `PATCH /v1/orgs/{org}`: `org:admin`.
#[utoipa::path(patch, path = "/v1/orgs/{org_id}", tag = "orgs",
    params(("org_id" = Uuid, Path)),
    request_body = proto::UpdateOrgRequest,
    responses((status = 200, body = proto::Org), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn patch_org(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiJson(body): ApiJson<proto::UpdateOrgRequest>,
) -> ApiResult<Json<proto::Org>> {
    caller.require_in(org_id, &["org:admin"])?;
    let mut org = load_org(&state, org_id).await?;
    let before = org.clone();
    if let Some(name) = body.name {
        keyward_core::validate::org_name(&name)?;
        org.name = name;
    }
    if let Some(policy) = body.policy {
        let parsed: OrgPolicy = serde_json::from_value(policy)
            .map_err(|e| ApiError::validation("policy", e.to_string()))?;
        parsed.validate()?;
        org.policy = parsed;
    }
    if org == before {
        return Ok(Json(render::org(&org)));
    }
    let now = state.now();
    let audit = caller.event(now, "org.update", "org", org.id, json!({}));
    let updated = org.clone();
    state
        .key_write(move |store| async move { store.update_org(&updated, &audit).await })
        .await?;
    Ok(Json(render::org(&org)))
}
