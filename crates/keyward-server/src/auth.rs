//! Authentication of every `/v1` request: the credential headers, the token parse, the digest
//! lookup and the key-state checks of API.md §1, in contract order. A request that passes gets a
//! `Caller` in its extensions; handlers then run the scope and org checks.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use keyward_core::auth::{check_key, check_scopes, Denial, KeySnapshot};
use keyward_core::model::{AgentStatus, AuditEvent, Key, Outcome, TraceContext};
use keyward_core::scope::Scope;
use keyward_core::secret::Secret;
use keyward_core::token::{self, TokenDigest, TokenKind};
use keyward_proto::ErrorCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::error::ApiError;
use crate::AppState;

/// The authenticated caller of a request, with the facts audit events need.
#[derive(Debug, Clone)]
pub struct Caller {
    pub key: Key,
    pub agent_status: Option<AgentStatus>,
    /// The scopes this request may use (the key's; narrowed by constraints later).
    pub scopes: Vec<Scope>,
    pub ctx: RequestContext,
}

/// Facts about the request every audit event records.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub client_ip: Option<IpAddr>,
    pub request_id: String,
    pub trace: TraceContext,
}

impl Caller {
    pub fn org_id(&self) -> Uuid {
        self.key.org_id
    }

    /// The endpoint's scope check: `403 INSUFFICIENT_SCOPE` with the required scopes.
    pub fn require(&self, required: &[&str]) -> Result<(), ApiError> {
        let parsed: Vec<Scope> = required
            .iter()
            .filter_map(|s| Scope::parse(s).ok())
            .collect();
        check_scopes(&self.scopes, &parsed).map_err(|_| {
            ApiError::new(ErrorCode::InsufficientScope).details(json!({ "required": required }))
        })
    }

    /// The org check: a credential of another org gets `403 NOT_A_MEMBER`.
    pub fn require_org(&self, org_id: Uuid) -> Result<(), ApiError> {
        if self.key.org_id == org_id {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::NotAMember))
        }
    }

    /// Scope check then org check, the contract's order.
    pub fn require_in(&self, org_id: Uuid, required: &[&str]) -> Result<(), ApiError> {
        self.require(required)?;
        self.require_org(org_id)
    }

    /// An audit event acted by this caller.
    pub fn event(
        &self,
        now: keyward_core::model::Timestamp,
        action: &str,
        target_type: &str,
        target_id: Uuid,
        details: Value,
    ) -> AuditEvent {
        AuditEvent {
            id: Uuid::now_v7(),
            org_id: self.key.org_id,
            occurred_at: now,
            action: action.to_string(),
            outcome: Outcome::Success,
            error_code: None,
            actor_key_id: Some(self.key.id),
            actor_agent_id: self.key.agent_id,
            target_type: Some(target_type.to_string()),
            target_id: Some(target_id),
            client_ip: self.ctx.client_ip.map(|ip| ip.to_string()),
            request_id: Some(self.ctx.request_id.clone()),
            trace: self.ctx.trace.clone(),
            details,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| ApiError::new(ErrorCode::MissingCredentials))
    }
}

/// Reads the credential: `Authorization: Bearer`, then `X-API-Key`, then `Api-Key`.
pub fn credential(headers: &HeaderMap) -> Result<Secret, ApiError> {
    if let Some(v) = headers.get("authorization") {
        let s = v
            .to_str()
            .map_err(|_| ApiError::new(ErrorCode::InvalidApiKey))?;
        let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::new(ErrorCode::InvalidApiKey)
                .msg("The Authorization header must use the Bearer scheme"));
        }
        return Ok(Secret::new(rest.trim().to_string()));
    }
    for name in ["x-api-key", "api-key"] {
        if let Some(v) = headers.get(name) {
            let s = v
                .to_str()
                .map_err(|_| ApiError::new(ErrorCode::InvalidApiKey))?;
            return Ok(Secret::new(s.trim().to_string()));
        }
    }
    Err(ApiError::new(ErrorCode::MissingCredentials))
}

/// The client address: the TCP peer, unless the peer is a trusted proxy, in which case
/// `X-Forwarded-For` is read right to left and the first address that is not a trusted proxy
/// wins. With no trusted proxies the header is ignored, so a client cannot spoof its address.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for v in headers.get_all("x-forwarded-for") {
        let Ok(s) = v.to_str() else { return client };
        for part in s.rsplit(',') {
            match part.trim().parse::<IpAddr>() {
                Ok(ip) if is_trusted(&ip) => client = ip,
                Ok(ip) => return ip,
                Err(_) => return client,
            }
        }
    }
    client
}

const MAX_TRACE_VALUE: usize = 256;
const MAX_TRACE_META: usize = 32;

fn trace_value(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => {
            let s = v
                .to_str()
                .map_err(|_| ApiError::validation(name, "header value must be printable ASCII"))?;
            if s.is_empty() || s.len() > MAX_TRACE_VALUE {
                return Err(ApiError::validation(
                    name,
                    format!("header value must be 1..={MAX_TRACE_VALUE} characters"),
                ));
            }
            Ok(Some(s.to_string()))
        }
    }
}

/// Reads the trace context headers of API.md §7.
pub fn trace_context(headers: &HeaderMap) -> Result<TraceContext, ApiError> {
    let mut meta = std::collections::BTreeMap::new();
    for (name, _) in headers.iter() {
        if let Some(key) = name.as_str().strip_prefix("keyward-meta-") {
            if key.is_empty() {
                continue;
            }
            let v = trace_value(headers, name.as_str())?.unwrap_or_default();
            meta.insert(key.to_string(), v);
            if meta.len() > MAX_TRACE_META {
                return Err(ApiError::validation(
                    "Keyward-Meta-*",
                    format!("at most {MAX_TRACE_META} metadata headers are allowed"),
                ));
            }
        }
    }
    Ok(TraceContext {
        run_id: trace_value(headers, "keyward-run-id")?,
        thread_id: trace_value(headers, "keyward-thread-id")?,
        parent_agent: trace_value(headers, "keyward-parent-agent")?,
        traceparent: trace_value(headers, "traceparent")?,
        meta,
    })
}

/// Maps a check failure to its API error.
pub fn denial_error(d: Denial) -> ApiError {
    let code = match d {
        Denial::InvalidApiKey => ErrorCode::InvalidApiKey,
        Denial::RevokedApiKey => ErrorCode::RevokedApiKey,
        Denial::ExpiredApiKey => ErrorCode::ExpiredApiKey,
        Denial::IpNotAllowed => ErrorCode::IpNotAllowed,
        Denial::AgentPaused => ErrorCode::AgentPaused,
        Denial::InsufficientScope => ErrorCode::InsufficientScope,
        Denial::NotAMember => ErrorCode::NotAMember,
    };
    ApiError::new(code)
}

/// Looks a presented token up: parse (no store access for malformed tokens), digest, find.
pub async fn lookup(
    state: &AppState,
    token: &str,
) -> Result<keyward_store::KeyWithAgent, ApiError> {
    token::parse(token).map_err(|_| ApiError::new(ErrorCode::InvalidApiKey))?;
    let digest = TokenDigest::of(token);
    let found = state.store.find_key_by_digest(&digest).await?;
    match found {
        // The lookup is by digest, so this compare is belt and braces against a store that
        // returned the wrong row; it is constant-time like every compare of secret material.
        Some(k) if keyward_core::secret::ct_eq(k.key.digest.as_bytes(), digest.as_bytes()) => Ok(k),
        _ => Err(ApiError::new(ErrorCode::InvalidApiKey)),
    }
}

fn deprecation_headers(resp: &mut Response) {
    resp.headers_mut()
        .insert("keyward-key-deprecated", HeaderValue::from_static("true"));
    resp.headers_mut().insert(
        "warning",
        HeaderValue::from_static("299 - \"API key is deprecated\""),
    );
}

/// Middleware on every `/v1` route: authenticates and attaches the `Caller`. Every response to
/// a deprecated key, success or error, carries the deprecation headers.
pub async fn middleware(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let mut deprecated = false;
    let mut resp = match authenticate(&state, peer, req, &mut deprecated).await {
        Ok(req) => next.run(req).await,
        Err(e) => e.into_response(),
    };
    if deprecated {
        deprecation_headers(&mut resp);
    }
    resp
}

/// The checks of API.md §1 up to (not including) the endpoint's scope and org checks.
async fn authenticate(
    state: &AppState,
    peer: SocketAddr,
    mut req: Request,
    deprecated: &mut bool,
) -> Result<Request, ApiError> {
    let token = credential(req.headers())?;
    let found = lookup(state, token.expose()).await?;
    let ip = client_ip(peer.ip(), req.headers(), &state.config.trusted_proxies);
    let is_me = req.uri().path() == "/v1/me";
    *deprecated = found.key.deprecated_at.is_some();
    let snapshot = KeySnapshot {
        key: found.key,
        agent_status: found.agent_status,
    };
    let now = state.now();
    check_key(&snapshot, Some(ip), now, is_me).map_err(denial_error)?;
    if snapshot.key.requires_signature {
        req = verify_signed_request(state, &snapshot.key, req, now).await?;
    }
    // Trace headers are validated once the credential is known to be good, so that a request
    // without a valid key always learns that first.
    let trace = trace_context(req.headers())?;
    let caller = Caller {
        scopes: snapshot.key.scopes.clone(),
        key: snapshot.key,
        agent_status: snapshot.agent_status,
        ctx: RequestContext {
            client_ip: Some(ip),
            request_id: crate::request_id::current(),
            trace,
        },
    };
    req.extensions_mut().insert(caller);
    Ok(req)
}

/// Buffers the body (within the 1 MiB limit), checks the request's signature and hands back an
/// equivalent request for the handler.
async fn verify_signed_request(
    state: &AppState,
    key: &Key,
    req: Request,
    now: keyward_core::model::Timestamp,
) -> Result<Request, ApiError> {
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, crate::MAX_BODY_BYTES)
        .await
        .map_err(|_| ApiError::new(ErrorCode::PayloadTooLarge))?;
    let header = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok());
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_else(|| parts.uri.path());
    crate::signing::check(
        key,
        &state.config.master_key,
        &state.replay,
        now,
        &crate::signing::Signed {
            method: parts.method.as_str(),
            path,
            timestamp: header("x-timestamp"),
            signature: header("x-signature"),
            body: &bytes,
        },
    )?;
    Ok(Request::from_parts(parts, axum::body::Body::from(bytes)))
}

/// Whether a key may act for an agent (agent keys and keys derived from them).
pub fn is_agent_credential(key: &Key) -> bool {
    key.agent_id.is_some() && matches!(key.kind, TokenKind::Agent | TokenKind::Derived)
}
