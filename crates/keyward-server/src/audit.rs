//! `GET /v1/orgs/{org}/audit`: the org's audit events, newest first, with filters (API.md §7).

use axum::extract::State;
use axum::Json;
use keyward_core::model::{AuditFilter, Outcome, Page};
use keyward_proto as proto;
use serde::Deserialize;
use uuid::Uuid;

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::extract::{query_time, ApiPath, ApiQuery};
use crate::{page, render, AppState};

/// Filters of the audit list.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditQuery {
    /// e.g. `agent.create`.
    pub action: Option<String>,
    /// Events acted by or targeting this agent.
    pub agent_id: Option<Uuid>,
    /// Events acted by or targeting this key.
    pub key_id: Option<Uuid>,
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
    /// `success`, `denied` or `failure`.
    pub outcome: Option<String>,
    /// RFC 3339; inclusive.
    pub since: Option<String>,
    /// RFC 3339; exclusive.
    pub until: Option<String>,
    pub limit: Option<u32>,
    pub offset: Option<u64>,
}

#[utoipa::path(get, path = "/v1/orgs/{org_id}/audit", tag = "audit",
    params(("org_id" = Uuid, Path), AuditQuery),
    responses((status = 200, body = proto::AuditList), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(org_id): ApiPath<Uuid>,
    ApiQuery(q): ApiQuery<AuditQuery>,
) -> ApiResult<Json<proto::AuditList>> {
    caller.require_in(org_id, &["audit:read"])?;
    let p: Page = page::parse(&proto::PageQuery {
        limit: q.limit,
        offset: q.offset,
    })?;
    let outcome = q
        .outcome
        .as_deref()
        .map(|o| {
            Outcome::parse(o).ok_or_else(|| {
                ApiError::validation("outcome", "must be success, denied or failure")
            })
        })
        .transpose()?;
    let filter = AuditFilter {
        action: q.action.clone(),
        agent_id: q.agent_id,
        key_id: q.key_id,
        run_id: q.run_id.clone(),
        thread_id: q.thread_id.clone(),
        outcome,
        since: query_time("since", &q.since)?,
        until: query_time("until", &q.until)?,
    };
    let mut events = state.store.list_audit(org_id, &filter, p).await?;
    let has_more = page::trim(&mut events, p);
    Ok(Json(proto::AuditList {
        events: events.iter().map(render::audit).collect(),
        limit: p.limit,
        offset: p.offset,
        has_more,
    }))
}
