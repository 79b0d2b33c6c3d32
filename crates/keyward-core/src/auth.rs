//! The credential checks of API.md §1 as pure functions over (key snapshot, request facts, now).
//!
//! The server runs these in order after parsing a token and finding its record; the traffic
//! controls of §6 (signature, constraints, rate limit, quota) slot in after the agent checks.

use std::net::IpAddr;

use crate::model::{AgentStatus, Key};
use crate::scope::{self, Scope};

/// Why a credential was refused. Each maps to one API error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denial {
    InvalidApiKey,
    RevokedApiKey,
    ExpiredApiKey,
    IpNotAllowed,
    AgentPaused,
    InsufficientScope,
    NotAMember,
    PolicyDenied,
    ConstraintNotNarrowing,
    RateLimited,
}

impl Denial {
    /// The API error code (API.md §8).
    pub fn code(&self) -> &'static str {
        match self {
            Denial::InvalidApiKey => "INVALID_API_KEY",
            Denial::RevokedApiKey => "REVOKED_API_KEY",
            Denial::ExpiredApiKey => "EXPIRED_API_KEY",
            Denial::IpNotAllowed => "IP_NOT_ALLOWED",
            Denial::AgentPaused => "AGENT_PAUSED",
            Denial::InsufficientScope => "INSUFFICIENT_SCOPE",
            Denial::NotAMember => "NOT_A_MEMBER",
            Denial::PolicyDenied => "POLICY_DENIED",
            Denial::ConstraintNotNarrowing => "CONSTRAINT_NOT_NARROWING",
            Denial::RateLimited => "RATE_LIMITED",
        }
    }
}

/// Runs the key-state checks in contract order: revoked, expired, client IP, then agent paused /
/// revoked unless `skip_agent_checks` (only `GET /v1/me` skips them). `now_ms` is Unix
/// milliseconds (the hot path's time, with no calendar date built).
pub fn check_key(
    key: &Key,
    agent_status: Option<AgentStatus>,
    client_ip: Option<IpAddr>,
    now_ms: i64,
    skip_agent_checks: bool,
) -> Result<(), Denial> {
    if key.revoked_at.is_some() {
        return Err(Denial::RevokedApiKey);
    }
    if key.is_expired(now_ms) {
        return Err(Denial::ExpiredApiKey);
    }
    if !key.cidr_allowlist.is_empty() {
        match client_ip {
            Some(ip) if crate::cidr::allows(&key.cidr_allowlist, ip) => {}
            _ => return Err(Denial::IpNotAllowed),
        }
    }
    if !skip_agent_checks {
        match agent_status {
            Some(AgentStatus::Paused) => return Err(Denial::AgentPaused),
            Some(AgentStatus::Revoked) => return Err(Denial::RevokedApiKey),
            _ => {}
        }
    }
    Ok(())
}

/// Checks that `effective` scopes imply every required scope.
pub fn check_scopes(effective: &[Scope], required: &[Scope]) -> Result<(), Denial> {
    if required.iter().all(|r| scope::implies(effective, r)) {
        Ok(())
    } else {
        Err(Denial::InsufficientScope)
    }
}
