//! Conversions from domain records to wire types (and back for limits), in one place.

use keyward_core::model::{self, QuotaPeriod, RateLimitSpec};
use keyward_proto as proto;

use crate::error::ApiError;

pub fn org(o: &model::Org) -> proto::Org {
    proto::Org {
        id: o.id,
        name: o.name.clone(),
        created_at: o.created_at,
        policy: serde_json::to_value(&o.policy).unwrap_or_default(),
    }
}

pub fn agent(a: &model::Agent) -> proto::Agent {
    proto::Agent {
        id: a.id,
        org_id: a.org_id,
        name: a.name.clone(),
        display_name: a.display_name.clone(),
        agent_type: a.agent_type.as_str().to_string(),
        status: a.status.as_str().to_string(),
        scopes: a.scopes.clone(),
        metadata: a.metadata.clone(),
        policy: a.policy.clone(),
        capabilities: a.capabilities.clone(),
        did: a.did.clone(),
        owner_user_id: a.owner_user_id,
        parent_agent_id: a.parent_agent_id,
        version: a.version,
        created_at: a.created_at,
        updated_at: a.updated_at,
        revoked_at: a.revoked_at,
    }
}

pub fn rate_limit(r: &model::RateLimit) -> proto::RateLimit {
    match r {
        model::RateLimit::Tier { tier } => proto::RateLimit::Tier { tier: tier.clone() },
        model::RateLimit::Custom(s) => proto::RateLimit::Custom {
            limit: s.limit,
            period_s: s.period_s,
            burst: s.burst,
        },
    }
}

pub fn quota(q: &model::Quota) -> proto::Quota {
    proto::Quota {
        limit: q.limit,
        period: match q.period {
            QuotaPeriod::Hour => "hour",
            QuotaPeriod::Day => "day",
            QuotaPeriod::Month => "month",
        }
        .to_string(),
    }
}

pub fn key(k: &model::Key) -> proto::Key {
    proto::Key {
        id: k.id,
        org_id: k.org_id,
        agent_id: k.agent_id,
        parent_key_id: k.parent_key_id,
        kind: k.kind.as_str().to_string(),
        environment: k.environment.as_str().to_string(),
        name: k.name.clone(),
        start: k.start.clone(),
        scopes: k.scopes.iter().map(|s| s.as_str().to_string()).collect(),
        cidr_allowlist: keyward_core::cidr::to_strings(&k.cidr_allowlist),
        rate_limit: k.rate_limit.as_ref().map(rate_limit),
        quota: k.quota.as_ref().map(quota),
        alert_thresholds: k.alert_thresholds.clone(),
        requires_signature: k.requires_signature,
        expires_at: k.expires_at,
        deprecated_at: k.deprecated_at,
        revoked_at: k.revoked_at,
        successor_key_id: k.successor_key_id,
        last_used_at: k.last_used_at,
        created_at: k.created_at,
        metadata: k.metadata.clone(),
    }
}

pub fn audit(e: &model::AuditEvent) -> proto::AuditEvent {
    proto::AuditEvent {
        id: e.id,
        org_id: e.org_id,
        occurred_at: e.occurred_at,
        action: e.action.clone(),
        outcome: e.outcome.as_str().to_string(),
        error_code: e.error_code.clone(),
        actor_key_id: e.actor_key_id,
        actor_agent_id: e.actor_agent_id,
        target_type: e.target_type.clone(),
        target_id: e.target_id,
        client_ip: e.client_ip.clone(),
        request_id: e.request_id.clone(),
        run_id: e.trace.run_id.clone(),
        thread_id: e.trace.thread_id.clone(),
        parent_agent: e.trace.parent_agent.clone(),
        traceparent: e.trace.traceparent.clone(),
        trace_meta: e.trace.meta.clone(),
        details: e.details.clone(),
    }
}

/// Validates a wire rate limit into the domain form.
pub fn parse_rate_limit(
    field: &str,
    r: &proto::RateLimit,
    policy: &model::OrgPolicy,
) -> Result<model::RateLimit, ApiError> {
    let m = match r {
        proto::RateLimit::Tier { tier } => model::RateLimit::Tier { tier: tier.clone() },
        proto::RateLimit::Custom {
            limit,
            period_s,
            burst,
        } => model::RateLimit::Custom(RateLimitSpec {
            limit: *limit,
            period_s: *period_s,
            burst: *burst,
        }),
    };
    m.validate(field, policy)?;
    Ok(m)
}

/// Validates a wire quota into the domain form.
pub fn parse_quota(field: &str, q: &proto::Quota) -> Result<model::Quota, ApiError> {
    let period = match q.period.as_str() {
        "hour" => QuotaPeriod::Hour,
        "day" => QuotaPeriod::Day,
        "month" => QuotaPeriod::Month,
        _ => {
            return Err(ApiError::validation(
                field,
                "quota.period must be `hour`, `day` or `month`",
            ))
        }
    };
    let m = model::Quota {
        limit: q.limit,
        period,
    };
    m.validate(field)?;
    Ok(m)
}

/// A `200` response carrying JSON already written.
pub fn json_bytes(body: Vec<u8>) -> axum::response::Response {
    let mut resp = axum::response::Response::new(axum::body::Body::from(body));
    resp.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    resp
}
