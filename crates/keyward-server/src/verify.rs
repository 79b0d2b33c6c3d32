//! `POST /v1/keys/verify` (API.md §5): lets the caller's own services check a key they received.
//! Always `200` for a well-formed request; the answer says whether the key is valid and why not.
//! The verified key goes through the same pipeline as a direct call (key state, agent state,
//! signature, constraints and deny rules, rate limit, then the required scopes), and counts
//! against its rate limit exactly like one.

use std::net::IpAddr;

use axum::extract::State;
use axum::Json;
use keyward_core::auth::{check_key, check_scopes};
use keyward_core::model::Timestamp;
use keyward_core::rules::{self, RequestFacts};
use keyward_core::scope::Scope;
use keyward_proto::{self as proto, ErrorCode};

use crate::auth::{lookup, rate_limit, Caller, RateHeaders};
use crate::cache::Prepared;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::keys::parse_scopes;
use crate::usage::{QuotaUse, Use};
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
async fn signature(
    state: &AppState,
    p: &Prepared,
    body: &proto::VerifyRequest,
    now: Timestamp,
) -> Result<(), ErrorCode> {
    if !p.key.requires_signature {
        return Ok(());
    }
    let Some(sig) = &body.signature else {
        return Err(ErrorCode::SignatureInvalid);
    };
    let ts = sig.timestamp.to_string();
    crate::signing::check(
        &p.key,
        &state.config.master_key,
        &state.replay,
        state.store.as_ref(),
        now,
        &crate::signing::Signed {
            method: &sig.method,
            path: &sig.path,
            timestamp: Some(&ts),
            signature: Some(&sig.value),
            body: sig.body.as_bytes(),
        },
    )
    .await
    .map_err(|e| e.code)
}

/// Runs the whole pipeline for the verified key; the code it ends with, the rate state and the
/// quota state.
async fn decide(
    state: &AppState,
    p: &Prepared,
    body: &proto::VerifyRequest,
    given: &proto::VerifyRequestFacts,
    client_ip: Option<IpAddr>,
    required: &[Scope],
    now: Timestamp,
) -> (Result<(), ErrorCode>, Option<RateHeaders>, Option<QuotaUse>) {
    let key = &p.key;
    if let Err(d) = check_key(key, p.agent_status, client_ip, now, false) {
        return (Err(crate::auth::denial_error(d).code), None, None);
    }
    if let Err(code) = signature(state, p, body, now).await {
        return (Err(code), None, None);
    }
    // Facts are only built when a rule needs them, scopes only copied when narrowed.
    let facts = || RequestFacts {
        method: given.method.clone(),
        provider_id: given.provider_id.clone(),
        app_id: given.app_id.clone(),
        agent_id: key.agent_id.map(|a| a.to_string()),
        api_key_id: Some(key.id.to_string()),
        environment: given
            .environment
            .clone()
            .or_else(|| Some(key.environment.as_str().to_string())),
        client_ip,
        resource_kind: given.resource_kind.clone(),
    };
    let mut narrowed: Option<Vec<Scope>> = None;
    if let Some(c) = &body.constraints {
        match rules::parse_constraints_json(c, &key.scopes) {
            Ok(c) => {
                narrowed = c.scopes;
                if c.rule.as_ref().is_some_and(|r| rules::matches(r, &facts())) {
                    return (Err(ErrorCode::PolicyDenied), None, None);
                }
            }
            Err(rules::ConstraintError::NotNarrowing) => {
                return (Err(ErrorCode::ConstraintNotNarrowing), None, None)
            }
            Err(rules::ConstraintError::Invalid(_)) => {
                return (Err(ErrorCode::ValidationError), None, None)
            }
        }
    }
    if !p.rules.is_empty() && rules::first_denial(&p.rules, &facts()).is_some() {
        return (Err(ErrorCode::PolicyDenied), None, None);
    }
    let (rate, limited) = rate_limit(state, p, now).await;
    if limited.is_err() {
        return (Err(ErrorCode::RateLimited), rate, None);
    }
    let quota = match state.meter.take_quota(state.store.as_ref(), key, now).await {
        Ok(q) => q,
        Err(e) => return (Err(e.code), rate, None),
    };
    if check_scopes(narrowed.as_deref().unwrap_or(&key.scopes), required).is_err() {
        return (Err(ErrorCode::InsufficientScope), rate, quota);
    }
    (Ok(()), rate, quota)
}

#[utoipa::path(post, path = "/v1/keys/verify", tag = "verify",
    request_body = proto::VerifyRequest,
    responses((status = 200, body = proto::VerifyResponse), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<proto::VerifyRequest>,
) -> ApiResult<Json<proto::VerifyResponse>> {
    caller.require(&["keys:verify"])?;
    verify_key(&state, caller.org_id(), &body, &caller.ctx)
        .await
        .map(Json)
}

/// The whole verification of a presented key on behalf of `org_id`, without HTTP: validation,
/// cache lookup, every check, limiter, quota, usage and audit. Benchmarks call it directly.
pub async fn verify_key(
    state: &AppState,
    org_id: uuid::Uuid,
    body: &proto::VerifyRequest,
    ctx: &crate::auth::RequestContext,
) -> ApiResult<proto::VerifyResponse> {
    // Validate the whole request before looking at the key, so a malformed request is a 400
    // whatever the key is.
    let required = parse_scopes(
        "required_scopes",
        body.required_scopes.as_deref().unwrap_or(&[]),
    )?;
    let given = body.request.clone().unwrap_or_default();
    let client_ip: Option<IpAddr> = given
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
    if let Some(c) = &body.constraints {
        // Shape errors are the caller's mistake (400); narrowing is judged against the key.
        if let Err(rules::ConstraintError::Invalid(e)) =
            rules::parse_constraints_json(c, &[Scope::all()])
        {
            return Err(e.into());
        }
    }

    let now = state.now();
    let p = match lookup(state, &body.key, now).await {
        Ok(p) if p.key.org_id == org_id => p,
        // Unknown, malformed, or another org's key: nothing more is said.
        Ok(_) => return Ok(count(invalid())),
        Err(e) if e.code == ErrorCode::InvalidApiKey => return Ok(count(invalid())),
        Err(e) => return Err(e),
    };
    let key = &p.key;
    let (decision, rate, quota) = decide(state, &p, body, &given, client_ip, &required, now).await;
    // A verification counts against the verified key exactly like a direct call.
    let outcome = match decision {
        Ok(()) => Use::Allowed,
        Err(ErrorCode::RateLimited | ErrorCode::QuotaExceeded) => Use::RateLimited,
        Err(_) => Use::Denied,
    };
    state.meter.record(key, outcome, now);
    // Failed verifications are audited (aggregated); successful ones are counted in the key's
    // usage instead, so a busy service does not write an audit row per key per second.
    if decision.is_err() {
        state.decisions.record(crate::decisions::Decision {
            key,
            action: "key.verify",
            code: match decision {
                Ok(()) => "VALID",
                Err(c) => c.as_str(),
            },
            client_ip,
            request_id: Some(ctx.request_id.clone()),
            trace: ctx.trace.clone(),
            method: given.method.clone(),
            path: given.path.clone(),
            at: now,
        });
    }
    let code = match decision {
        Ok(()) => "VALID".to_string(),
        Err(c) => c.as_str().to_string(),
    };
    Ok(count(proto::VerifyResponse {
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
        ratelimit: rate.map(|r| proto::RateLimitState {
            limit: r.limit,
            remaining: r.remaining,
            reset: r.reset,
        }),
        quota: quota.map(|q| proto::QuotaState {
            limit: q.limit,
            used: q.used,
            remaining: q.limit.saturating_sub(q.used),
            resets_at: q.resets_at,
        }),
        agent: match (key.agent_id, &p.agent_name, p.agent_status) {
            (Some(id), Some(name), Some(status)) => Some(proto::VerifyAgent {
                id,
                name: name.clone(),
                status: status.as_str().to_string(),
            }),
            _ => None,
        },
    }))
}

/// Counts a verification by its outcome code for `/metrics`.
fn count(r: proto::VerifyResponse) -> proto::VerifyResponse {
    let code = if r.valid {
        None
    } else {
        ErrorCode::parse(&r.code)
    };
    crate::stats::stats().verification(code).increment(1);
    r
}
