//! `POST /v1/keys/verify` (API.md §5): lets the caller's own services check a key they received.
//! Always `200` for a well-formed request; the answer says whether the key is valid and why not.

use std::net::IpAddr;

use axum::extract::State;
use axum::Json;
use keyward_core::auth::{check_key, check_scopes, KeySnapshot};
use keyward_proto::{self as proto, ErrorCode};

use crate::auth::{lookup, Caller};
use crate::error::{ApiError, ApiResult};
use crate::keys::parse_scopes;
use crate::AppState;

fn invalid() -> proto::VerifyResponse {
    proto::VerifyResponse {
        valid: false,
        code: ErrorCode::InvalidApiKey.as_str().to_string(),
        key_id: None,
        agent_id: None,
        org_id: None,
        kind: None,
        environment: None,
        scopes: None,
        expires_at: None,
        deprecated: None,
        ratelimit: None,
        quota: None,
        agent: None,
    }
}

/// The signature check of a verified key that requires one, from the body's `signature`.
fn signature(
    state: &AppState,
    snapshot: &KeySnapshot,
    body: &proto::VerifyRequest,
    now: keyward_core::model::Timestamp,
) -> Result<(), ErrorCode> {
    if !snapshot.key.requires_signature {
        return Ok(());
    }
    let Some(sig) = &body.signature else {
        return Err(ErrorCode::SignatureInvalid);
    };
    let ts = sig.timestamp.to_string();
    crate::signing::check(
        &snapshot.key,
        &state.config.master_key,
        &state.replay,
        now,
        &crate::signing::Signed {
            method: &sig.method,
            path: &sig.path,
            timestamp: Some(&ts),
            signature: Some(&sig.value),
            body: sig.body.as_bytes(),
        },
    )
    .map_err(|e| e.code)
}

#[utoipa::path(post, path = "/v1/keys/verify", tag = "verify",
    request_body = proto::VerifyRequest,
    responses((status = 200, body = proto::VerifyResponse), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    crate::extract::ApiJson(body): crate::extract::ApiJson<proto::VerifyRequest>,
) -> ApiResult<Json<proto::VerifyResponse>> {
    caller.require(&["keys:verify"])?;
    // Validate the whole request before looking at the key, so a malformed request is a 400
    // whatever the key is.
    let required = parse_scopes(
        "required_scopes",
        body.required_scopes.as_deref().unwrap_or(&[]),
    )?;
    let facts = body.request.clone().unwrap_or_default();
    let client_ip: Option<IpAddr> = facts
        .client_ip
        .as_deref()
        .map(|s| {
            s.parse::<IpAddr>()
                .map_err(|_| ApiError::validation("request.client_ip", "must be an IP address"))
        })
        .transpose()?;
    if body.key.len() > 1024 {
        return Err(ApiError::validation(
            "key",
            "must be at most 1024 characters",
        ));
    }

    let found = match lookup(&state, &body.key).await {
        Ok(f) if f.key.org_id == caller.org_id() => f,
        // Unknown, malformed, or another org's key: nothing more is said.
        Ok(_) => return Ok(Json(invalid())),
        Err(e) if e.code == ErrorCode::InvalidApiKey => return Ok(Json(invalid())),
        Err(e) => return Err(e),
    };
    let agent = match found.key.agent_id {
        Some(id) => state.store.get_agent(found.key.org_id, id).await?,
        None => None,
    };
    let snapshot = KeySnapshot {
        key: found.key,
        agent_status: found.agent_status,
    };
    let now = state.now();
    let code = match check_key(&snapshot, client_ip, now, false) {
        Err(d) => d.code().to_string(),
        Ok(()) => match signature(&state, &snapshot, &body, now) {
            Err(code) => code.as_str().to_string(),
            Ok(()) => match check_scopes(&snapshot.key.scopes, &required) {
                Ok(()) => "VALID".to_string(),
                Err(d) => d.code().to_string(),
            },
        },
    };
    let key = &snapshot.key;
    Ok(Json(proto::VerifyResponse {
        valid: code == "VALID",
        code,
        key_id: Some(key.id),
        agent_id: key.agent_id,
        org_id: Some(key.org_id),
        kind: Some(key.kind.as_str().to_string()),
        environment: Some(key.environment.as_str().to_string()),
        scopes: Some(key.scopes.iter().map(|s| s.as_str().to_string()).collect()),
        expires_at: key.expires_at,
        deprecated: Some(key.deprecated_at.is_some()),
        ratelimit: None,
        quota: None,
        agent: agent.map(|a| proto::VerifyAgent {
            id: a.id,
            name: a.name,
            status: a.status.as_str().to_string(),
        }),
    }))
}
