//! `POST /v1/keys/verify` (API.md §5): lets the caller's own services check a key they received.
//! Always `200` for a well-formed request; the answer says whether the key is valid and why not.
//! The verified key goes through the same pipeline as a direct call (key state, agent state,
//! signature, constraints and deny rules, rate limit, then the required scopes), and counts
//! against its rate limit exactly like one.

use std::net::IpAddr;

use axum::extract::State;
use keyward_core::auth::{check_key, check_scopes};
use keyward_core::model::Timestamp;
use keyward_core::rules::{self, RequestFacts};
use keyward_core::scope::Scope;
use keyward_proto::{self as proto, ErrorCode};

use std::sync::Arc;

use crate::auth::{admit, lookup, Caller, RateHeaders};
use crate::cache::Prepared;
use crate::error::{ApiError, ApiResult};
use crate::extract::ApiJson;
use crate::keys::parse_scopes;
use crate::stats::{stats, Hot};
use crate::usage::{QuotaUse, Use};
use crate::AppState;
use serde::Serialize;
use uuid::Uuid;

/// The signature check of a verified key that requires one, from the body's `signature`.
async fn signature(
    state: &AppState,
    p: &Prepared,
    body: &proto::VerifyRequest,
    now_ms: i64,
) -> Result<(), ErrorCode> {
    if !p.key.requires_signature {
        return Ok(());
    }
    let now = keyward_core::clock::from_millis(now_ms);
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

/// How the pipeline ended for a verified key.
struct Decided {
    result: Result<(), ErrorCode>,
    /// Whether the traffic controls ran (and so counted the use themselves).
    counted: bool,
    rate: Option<RateHeaders>,
    quota: Option<QuotaUse>,
}

impl Decided {
    fn denied(code: ErrorCode) -> Decided {
        Decided {
            result: Err(code),
            counted: false,
            rate: None,
            quota: None,
        }
    }
}

/// Runs the whole pipeline for the verified key, in the order of a direct call: key and agent
/// state, signature, constraints and rules, rate limit and quota, then the required scopes (the
/// endpoint's own check, after the use was counted, as for a direct call).
async fn decide(
    state: &AppState,
    p: &Prepared,
    body: &proto::VerifyRequest,
    given: &proto::VerifyRequestFacts,
    client_ip: Option<IpAddr>,
    required: &[Scope],
    now_ms: i64,
) -> Decided {
    let key = &p.key;
    if let Err(d) = check_key(key, p.agent_status, client_ip, now_ms, false) {
        return Decided::denied(crate::auth::denial_error(d).code);
    }
    if let Err(code) = signature(state, p, body, now_ms).await {
        return Decided::denied(code);
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
                    return Decided::denied(ErrorCode::PolicyDenied);
                }
            }
            Err(rules::ConstraintError::NotNarrowing) => {
                return Decided::denied(ErrorCode::ConstraintNotNarrowing)
            }
            Err(rules::ConstraintError::Invalid(_)) => {
                return Decided::denied(ErrorCode::ValidationError)
            }
        }
    }
    if !p.rules.is_empty() && rules::first_denial(&p.rules, &facts()).is_some() {
        return Decided::denied(ErrorCode::PolicyDenied);
    }
    // The required scopes are judged now but reported after the traffic controls (the order of
    // a direct call); a use that passes them but lacks the scopes counts as denied.
    let scoped = check_scopes(narrowed.as_deref().unwrap_or(&key.scopes), required)
        .map_err(|_| ErrorCode::InsufficientScope);
    let admitted_as = if scoped.is_ok() {
        Use::Allowed
    } else {
        Use::Denied
    };
    let (rate, admitted) = admit(state, p, admitted_as, now_ms).await;
    let quota = match admitted {
        Ok(q) => q,
        Err(e) => {
            return Decided {
                result: Err(e.code),
                counted: true,
                rate,
                quota: None,
            }
        }
    };
    Decided {
        result: scoped,
        counted: true,
        rate,
        quota,
    }
}

#[utoipa::path(post, path = "/v1/keys/verify", tag = "verify",
    request_body = proto::VerifyRequest,
    responses((status = 200, body = proto::VerifyResponse), (status = "4XX", body = proto::ErrorBody)),
    security(("api_key" = [])))]
pub async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<proto::VerifyRequest>,
) -> Result<axum::response::Response, ApiError> {
    caller.require(&["keys:verify"])?;
    let verified = verify_key(&state, caller.org_id(), &body, &caller.ctx).await?;
    Ok(crate::render::json_response(&verified))
}

/// The answer of a verification: serialized as `proto::VerifyResponse` (borrowing from the
/// cached snapshot instead of copying its strings into one).
#[derive(Debug)]
pub struct Verified {
    /// The key, unless it is unknown, malformed or another org's (then nothing more is said).
    prepared: Option<Arc<Prepared>>,
    result: Result<(), ErrorCode>,
    rate: Option<RateHeaders>,
    quota: Option<QuotaUse>,
}

impl Verified {
    fn invalid() -> Verified {
        Verified {
            prepared: None,
            result: Err(ErrorCode::InvalidApiKey),
            rate: None,
            quota: None,
        }
    }

    /// Whether the key is valid for the request.
    pub fn valid(&self) -> bool {
        self.result.is_ok()
    }

    /// `VALID`, or the error code the key would get.
    pub fn code(&self) -> &'static str {
        match self.result {
            Ok(()) => "VALID",
            Err(c) => c.as_str(),
        }
    }
}

/// `proto::VerifyResponse`'s fields, borrowed.
#[derive(Serialize)]
struct Answer<'a> {
    valid: bool,
    code: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    key_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    org_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    environment: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scopes: Option<&'a [Scope]>,
    #[serde(
        with = "keyward_proto::ts::option",
        skip_serializing_if = "Option::is_none"
    )]
    expires_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deprecated: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ratelimit: Option<proto::RateLimitState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quota: Option<proto::QuotaState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<AgentAnswer<'a>>,
}

#[derive(Serialize)]
struct AgentAnswer<'a> {
    id: Uuid,
    name: &'a str,
    status: &'a str,
}

impl Serialize for Verified {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut a = Answer {
            valid: self.valid(),
            code: self.code(),
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
        };
        if let Some(p) = &self.prepared {
            let key = &p.key;
            a.key_id = Some(key.id);
            a.agent_id = key.agent_id;
            a.org_id = Some(key.org_id);
            a.kind = Some(key.kind.as_str());
            a.environment = Some(key.environment.as_str());
            a.scopes = Some(&key.scopes);
            a.expires_at = key.expires_at;
            a.deprecated = Some(key.deprecated_at.is_some());
            a.ratelimit = self.rate.map(|r| proto::RateLimitState {
                limit: r.limit,
                remaining: r.remaining,
                reset: r.reset,
            });
            a.quota = self.quota.map(|q| proto::QuotaState {
                limit: q.limit,
                used: q.used,
                remaining: q.limit.saturating_sub(q.used),
                resets_at: q.resets_at(),
            });
            a.agent = match (key.agent_id, &p.agent_name, p.agent_status) {
                (Some(id), Some(name), Some(status)) => Some(AgentAnswer {
                    id,
                    name,
                    status: status.as_str(),
                }),
                _ => None,
            };
        }
        a.serialize(s)
    }
}

/// An empty `request` object: what a verification without request facts matches rules with.
static NO_FACTS: std::sync::LazyLock<proto::VerifyRequestFacts> =
    std::sync::LazyLock::new(Default::default);

/// The whole verification of a presented key on behalf of `org_id`, without HTTP: validation,
/// cache lookup, every check, limiter, quota, usage and audit. Benchmarks call it directly.
pub async fn verify_key(
    state: &AppState,
    org_id: uuid::Uuid,
    body: &proto::VerifyRequest,
    ctx: &crate::auth::RequestContext,
) -> ApiResult<Verified> {
    // Validate the whole request before looking at the key, so a malformed request is a 400
    // whatever the key is.
    let required = match body.required_scopes.as_deref() {
        None | Some([]) => Vec::new(),
        Some(r) => parse_scopes("required_scopes", r)?,
    };
    let given = body.request.as_ref().unwrap_or(&NO_FACTS);
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

    let now_ms = state.now_ms();
    let p = match lookup(state, &body.key, now_ms).await {
        Ok(p) if p.key.org_id == org_id => p,
        // Unknown, malformed, or another org's key: nothing more is said.
        Ok(_) => return Ok(count(Verified::invalid())),
        Err(e) if e.code == ErrorCode::InvalidApiKey => return Ok(count(Verified::invalid())),
        Err(e) => return Err(e),
    };
    let d = decide(state, &p, body, given, client_ip, &required, now_ms).await;
    // A verification counts against the verified key exactly like a direct call: the traffic
    // controls counted it if it reached them; a denial before them is counted here.
    if !d.counted {
        state.meter.record(&p.live, Use::Denied, now_ms);
    }
    // Failed verifications are audited (aggregated); successful ones are counted in the key's
    // usage instead, so a busy service does not write an audit row per key per second.
    if let Err(code) = d.result {
        state.decisions.record(crate::decisions::Decision {
            key: &p.key,
            action: "key.verify",
            code: code.as_str(),
            client_ip,
            request_id: Some(ctx.request_id.clone()),
            trace: ctx.trace.clone(),
            method: given.method.clone(),
            path: given.path.clone(),
            at: keyward_core::clock::from_millis(now_ms),
        });
    }
    Ok(count(Verified {
        prepared: Some(p),
        result: d.result,
        rate: d.rate,
        quota: d.quota,
    }))
}

/// Counts a verification by its outcome code for `/metrics`.
fn count(v: Verified) -> Verified {
    stats().add(Hot::Verification(v.result.err()));
    v
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The borrowed answer must serialize exactly as the wire type the SDK reads.
    #[test]
    fn the_answer_serializes_as_the_wire_type() {
        let answer = Verified::invalid();
        let wire = proto::VerifyResponse {
            valid: false,
            code: "INVALID_API_KEY".into(),
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
        };
        assert_eq!(
            serde_json::to_string(&answer).unwrap(),
            serde_json::to_string(&wire).unwrap()
        );
    }
}
