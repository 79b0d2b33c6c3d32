//! Authentication of every `/v1` request: the credential headers, the token parse, the digest
//! lookup and the key-state checks of API.md §1, in contract order. A request that passes gets a
//! `Caller` in its extensions; handlers then run the scope and org checks.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::Arc;

use keyward_core::auth::{check_key, check_scopes, Denial};
use keyward_core::model::{AuditEvent, Key, Outcome, TraceContext};
use keyward_core::rules::{ConstraintError, RequestFacts};
use keyward_core::scope::Scope;
use keyward_core::token::{TokenDigest, TokenKind};
use keyward_proto::ErrorCode;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::cache::Prepared;
use crate::error::ApiError;
use crate::stats::{stats, Hot};
use crate::usage::{Admission, QuotaUse, Use};
use crate::AppState;

/// The authenticated caller of a request, with the facts audit events need.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The cached snapshot the request was authenticated with.
    pub prepared: Arc<Prepared>,
    /// The scopes a constraints header narrowed this request to, if it carried one.
    pub narrowed: Option<Vec<Scope>>,
    pub ctx: RequestContext,
    /// When the request was admitted, Unix ms: it was counted then as an allowed use of the
    /// key, so it is the key's latest use (the snapshot's `last_used_at` is the one the store
    /// held when the key was cached).
    pub admitted_ms: i64,
}

/// Facts about the request every audit event records.
#[derive(Debug, Clone, Default)]
pub struct RequestContext {
    pub client_ip: Option<IpAddr>,
    pub request_id: Arc<str>,
    pub trace: TraceContext,
}

impl Caller {
    /// The calling key.
    pub fn key(&self) -> &Key {
        &self.prepared.key
    }

    /// The scopes this request may use: the key's, or fewer when a constraints header narrowed
    /// them.
    pub fn scopes(&self) -> &[Scope] {
        self.narrowed
            .as_deref()
            .unwrap_or(&self.prepared.key.scopes)
    }

    pub fn org_id(&self) -> Uuid {
        self.prepared.key.org_id
    }

    /// The endpoint's scope check: `403 INSUFFICIENT_SCOPE` with the required scopes.
    pub fn require(&self, required: &[&str]) -> Result<(), ApiError> {
        let parsed: Vec<Scope> = required
            .iter()
            .filter_map(|s| Scope::parse(s).ok())
            .collect();
        self.require_parsed(&parsed, required)
    }

    /// [`Caller::require`] with the scopes parsed once (for the hot endpoints). Fails closed if
    /// `parsed` does not hold one scope per name.
    pub fn require_parsed(&self, parsed: &[Scope], required: &[&str]) -> Result<(), ApiError> {
        if parsed.len() == required.len() && check_scopes(self.scopes(), parsed).is_ok() {
            Ok(())
        } else {
            Err(ApiError::new(ErrorCode::InsufficientScope)
                .details(json!({ "required": required })))
        }
    }

    /// The org check: a credential of another org gets `403 NOT_A_MEMBER`.
    pub fn require_org(&self, org_id: Uuid) -> Result<(), ApiError> {
        if self.org_id() == org_id {
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
            org_id: self.org_id(),
            occurred_at: now,
            action: action.to_string(),
            outcome: Outcome::Success,
            error_code: None,
            actor_key_id: Some(self.key().id),
            actor_agent_id: self.key().agent_id,
            target_type: Some(target_type.to_string()),
            target_id: Some(target_id),
            client_ip: self.ctx.client_ip.map(|ip| ip.to_string()),
            request_id: Some(self.ctx.request_id.to_string()),
            trace: self.ctx.trace.clone(),
            details,
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // Taken rather than cloned: a handler extracts its caller once.
        parts
            .extensions
            .remove::<Caller>()
            .ok_or_else(|| ApiError::new(ErrorCode::MissingCredentials))
    }
}

/// Header names the hot path reads and writes, as constants: looking a header up (or inserting
/// one) by a `&str` parses and validates the name on every call, a `HeaderName` is matched as it
/// is (callgrind: about 750 instructions less per verification).
pub(crate) mod names {
    use axum::http::HeaderName;

    pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
    pub static API_KEY: HeaderName = HeaderName::from_static("api-key");
    pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub static KEYWARD_CONSTRAINTS: HeaderName = HeaderName::from_static("keyward-constraints");
    pub static X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
    pub static X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
    pub static X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
    pub static KEYWARD_KEY_DEPRECATED: HeaderName =
        HeaderName::from_static("keyward-key-deprecated");
    pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
}

/// Reads the credential: `Authorization: Bearer`, then `X-API-Key`, then `Api-Key`.
///
/// Borrowed from the request's headers, not copied: the token is only hashed and, on a cache
/// miss, parsed, and a copy would be one more allocation, and one more place holding the
/// plaintext, per request.
pub fn credential(headers: &HeaderMap) -> Result<&str, ApiError> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let s = v
            .to_str()
            .map_err(|_| ApiError::new(ErrorCode::InvalidApiKey))?;
        // The scheme is what comes before the first space. Found byte by byte: `split_once(' ')`
        // searches with the general `char` searcher, 140 instructions per request here.
        let (scheme, rest) = match s.bytes().position(|b| b == b' ') {
            Some(i) => (&s[..i], &s[i + 1..]),
            None => (s, ""),
        };
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(ApiError::new(ErrorCode::InvalidApiKey)
                .msg("The Authorization header must use the Bearer scheme"));
        }
        return Ok(rest.trim());
    }
    for name in [&names::X_API_KEY, &names::API_KEY] {
        if let Some(v) = headers.get(name) {
            let s = v
                .to_str()
                .map_err(|_| ApiError::new(ErrorCode::InvalidApiKey))?;
            return Ok(s.trim());
        }
    }
    Err(ApiError::new(ErrorCode::MissingCredentials))
}

/// The client address: the TCP peer, unless the peer is a trusted proxy, in which case
/// `X-Forwarded-For` is read right to left and the first address that is not a trusted proxy
/// wins. With no trusted proxies the header is ignored, so a client cannot spoof its address.
///
/// Addresses are taken canonical: an IPv4 client or proxy reaching a dual-stack (`[::]`)
/// listener appears as `::ffff:a.b.c.d`, and as that it would match no IPv4 allowlist, no IPv4
/// trusted proxy, and land in the throttle and the audit log under a name it is not known by.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[ipnet::IpNet]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if trusted.is_empty() || !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for v in headers.get_all(&names::X_FORWARDED_FOR) {
        let Ok(s) = v.to_str() else { return client };
        for part in s.rsplit(',') {
            match part.trim().parse::<IpAddr>().map(|ip| ip.to_canonical()) {
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

fn trace_value(name: &str, v: Option<&HeaderValue>) -> Result<Option<String>, ApiError> {
    match v {
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

/// Reads the trace context headers of API.md §7 in one pass over the headers (looking each
/// name up instead hashed five names per request). A repeated header counts by its first value;
/// metadata headers are judged first, then run, thread, parent agent and `traceparent`.
pub fn trace_context(headers: &HeaderMap) -> Result<TraceContext, ApiError> {
    let (mut run, mut thread, mut parent, mut traceparent) = (None, None, None, None);
    let mut meta = std::collections::BTreeMap::new();
    for (name, v) in headers.iter() {
        let n = name.as_str();
        // Every name below starts with `k` or `t` (names are lowercase): most headers are passed
        // over on their first byte instead of four comparisons and a prefix test.
        if !matches!(n.as_bytes().first(), Some(b'k' | b't')) {
            continue;
        }
        let slot = match n {
            "keyward-run-id" => &mut run,
            "keyward-thread-id" => &mut thread,
            "keyward-parent-agent" => &mut parent,
            "traceparent" => &mut traceparent,
            _ => {
                if let Some(key) = n.strip_prefix("keyward-meta-") {
                    if !key.is_empty() && !meta.contains_key(key) {
                        let v = trace_value(n, Some(v))?.unwrap_or_default();
                        meta.insert(key.to_string(), v);
                        if meta.len() > MAX_TRACE_META {
                            return Err(ApiError::validation(
                                "Keyward-Meta-*",
                                format!("at most {MAX_TRACE_META} metadata headers are allowed"),
                            ));
                        }
                    }
                }
                continue;
            }
        };
        slot.get_or_insert(v);
    }
    Ok(TraceContext {
        run_id: trace_value("keyward-run-id", run)?,
        thread_id: trace_value("keyward-thread-id", thread)?,
        parent_agent: trace_value("keyward-parent-agent", parent)?,
        traceparent: trace_value("traceparent", traceparent)?,
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
        Denial::PolicyDenied => ErrorCode::PolicyDenied,
        Denial::ConstraintNotNarrowing => ErrorCode::ConstraintNotNarrowing,
        Denial::RateLimited => ErrorCode::RateLimited,
    };
    ApiError::new(code)
}

/// Looks a presented token up in the verify cache (which parses it and reads the store on a
/// miss; malformed tokens never reach the store).
pub async fn lookup(state: &AppState, token: &str, now_ms: i64) -> Result<Arc<Prepared>, ApiError> {
    state
        .cache
        .lookup(state.store.as_ref(), &state.meter, token, now_ms)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey))
}

/// The rate-limit state to report on a response.
#[derive(Debug, Clone, Copy)]
pub struct RateHeaders {
    pub limit: u64,
    pub remaining: u64,
    /// Unix seconds when the bucket is full again.
    pub reset: i64,
}

impl RateHeaders {
    /// What to report of `gcra`'s bucket after decision (or peek) `d` at `now_ms`.
    pub fn of(
        gcra: &keyward_core::gcra::Gcra,
        d: &keyward_core::gcra::Decision,
        now_ms: i64,
    ) -> RateHeaders {
        let now_ns = now_ms.saturating_mul(1_000_000);
        RateHeaders {
            limit: gcra.limit,
            remaining: d.remaining,
            reset: (now_ns.saturating_add(d.reset_after_ns) + 999_999_999) / 1_000_000_000,
        }
    }

    fn apply(&self, resp: &mut Response) {
        let h = resp.headers_mut();
        h.insert(&names::X_RATELIMIT_LIMIT, HeaderValue::from(self.limit));
        h.insert(
            &names::X_RATELIMIT_REMAINING,
            HeaderValue::from(self.remaining),
        );
        h.insert(&names::X_RATELIMIT_RESET, HeaderValue::from(self.reset));
    }
}

/// The traffic controls of API.md §6.2 and §6.3 for one request of `p` at `now_ms`: the rate
/// limit, then the quota; the use is counted (as allowed when it passes, as rate-limited when
/// either refuses; a request refused later by the endpoint's own checks, such as its required
/// scopes, still counts as allowed, as API.md §5 asks of a verification too).
/// Answers the rate-limit headers to report (keys without a limit have none) and the quota
/// state, or `429 RATE_LIMITED` / `QUOTA_EXCEEDED` with `retry_after`.
///
/// A cached key on the local limiter with no quota, or whose quota counter is loaded, is decided
/// in memory under its one lock. With the Redis backend the rate decision is shared by every
/// node (and when Redis cannot decide, this node's limiter does); a quota on a shared store, or
/// one whose counter this node has not loaded yet, is taken through the store.
pub async fn admit(
    state: &AppState,
    p: &Arc<Prepared>,
    now_ms: i64,
) -> (Option<RateHeaders>, Result<Option<QuotaUse>, Box<ApiError>>) {
    let remote_rate = p.rate.is_some()
        && matches!(
            state.config.rate_limit_backend,
            crate::RateLimitBackend::Redis(_)
        );
    let local = if remote_rate {
        None
    } else {
        state.meter.try_admit(
            &p.live,
            p.bucket.as_deref(),
            &p.key,
            p.rate.as_ref(),
            state.store.is_shared(),
            now_ms,
        )
    };
    let admission = match local {
        Some(a) => a,
        // In a task of its own: its futures (Redis, the store) are not part of the request's.
        None => admit_detached(state, p, now_ms).await,
    };
    let (Some(gcra), Some(d)) = (p.rate, admission.rate) else {
        return (None, admission.quota);
    };
    let headers = RateHeaders::of(&gcra, &d, now_ms);
    if d.allowed {
        stats().add(Hot::RateAllowed);
        (Some(headers), admission.quota)
    } else {
        stats().add(Hot::RateRefused);
        let secs = ((d.retry_after_ns + 999_999_999) / 1_000_000_000).max(1) as u64;
        let mut e = ApiError::new(ErrorCode::RateLimited).details(json!({ "limit": gcra.limit }));
        e.retry_after = Some(secs);
        (Some(headers), Err(Box::new(e)))
    }
}

/// [`admit_through_store`] in a task of its own, awaited. What it takes is taken in Redis or the
/// store (a rate-limit charge, a quota unit), and a request is dropped when its client goes away:
/// run in the request's own future, a unit could be taken and then neither counted in the key's
/// usage nor announced when it crossed an alert threshold (the next unit never crosses it again,
/// so that period's `key.usage_threshold` event was lost). The task takes and counts together.
///
/// At most [`crate::DETACHED_MAX`] run at once; beyond that (a store stalled while clients keep
/// asking) the request is answered `503 STORE_UNAVAILABLE` without taking anything, and counted
/// as denied, as a store error is.
async fn admit_detached(state: &AppState, p: &Arc<Prepared>, now_ms: i64) -> Admission {
    let Ok(permit) = state.detached_admissions.clone().try_acquire_owned() else {
        state.meter.record(&p.live, Use::Denied, now_ms);
        return Admission::unavailable();
    };
    let (shared, p) = (state.clone(), p.clone());
    let task = async move {
        let _permit = permit;
        admit_through_store(&shared, &p, now_ms).await
    };
    match state.detach(task).await {
        Ok(admission) => admission,
        // A panic stays a panic (the request's catcher answers it); a task cancelled by the
        // runtime shutting down is a store that cannot answer.
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Admission::unavailable(),
    }
}

/// [`admit`] when memory alone cannot decide: the rate limit through Redis (or the local
/// fallback), the quota through the store.
async fn admit_through_store(state: &AppState, p: &Prepared, now_ms: i64) -> Admission {
    let now_ns = now_ms.saturating_mul(1_000_000);
    let local = p.bucket.as_deref().unwrap_or(&p.live);
    let rate = match p.rate {
        None => None,
        Some(g) => Some(match &state.config.rate_limit_backend {
            crate::RateLimitBackend::Local => local.gcra(&g, now_ns),
            crate::RateLimitBackend::Redis(redis) => {
                let bucket = p.key.parent_key_id.unwrap_or(p.key.id);
                match redis.check(bucket, &g, now_ns).await {
                    Some(Ok(d)) => d,
                    _ => {
                        stats().add(Hot::RateFallback);
                        local.gcra(&g, now_ns)
                    }
                }
            }
        }),
    };
    if rate.is_some_and(|d| !d.allowed) {
        state.meter.record(&p.live, Use::RateLimited, now_ms);
        return Admission {
            rate,
            quota: Ok(None),
        };
    }
    let quota = state
        .meter
        .take_quota(state.store.as_ref(), &p.live, &p.key, now_ms)
        .await
        .map_err(Box::new);
    let outcome = match &quota {
        Ok(_) => Use::Allowed,
        Err(e) if e.code == ErrorCode::QuotaExceeded => Use::RateLimited,
        Err(_) => Use::Denied,
    };
    state.meter.record(&p.live, outcome, now_ms);
    Admission { rate, quota }
}

/// The facts of a request to Keyward's own API, for deny rules.
fn api_facts(key: &Key, method: &str, ip: IpAddr) -> RequestFacts {
    RequestFacts {
        method: Some(method.to_string()),
        provider_id: None,
        app_id: None,
        agent_id: key.agent_id.map(|a| a.to_string()),
        api_key_id: Some(key.id.to_string()),
        environment: Some(key.environment.as_str().to_string()),
        client_ip: Some(ip),
        resource_kind: None,
    }
}

/// Applies a constraints value to the key's scopes: the narrowed scopes and the extra rule.
pub fn apply_constraints(
    value: &str,
    key_scopes: &[Scope],
) -> Result<(Vec<Scope>, Option<keyward_core::model::Rule>), ApiError> {
    match keyward_core::rules::parse_constraints_header(value, key_scopes) {
        Ok(c) => Ok((c.scopes.unwrap_or_else(|| key_scopes.to_vec()), c.rule)),
        Err(ConstraintError::NotNarrowing) => Err(ApiError::new(ErrorCode::ConstraintNotNarrowing)
            .details(json!({ "field": "Keyward-Constraints" }))),
        Err(ConstraintError::Invalid(e)) => Err(e.into()),
    }
}

fn deprecation_headers(resp: &mut Response) {
    resp.headers_mut().insert(
        &names::KEYWARD_KEY_DEPRECATED,
        HeaderValue::from_static("true"),
    );
    resp.headers_mut().insert(
        axum::http::header::WARNING,
        HeaderValue::from_static("299 - \"API key is deprecated\""),
    );
}

/// Middleware on every `/v1` route: authenticates and attaches the `Caller`. Every response to
/// a deprecated key, success or error, carries the deprecation headers, and every response to a
/// rate-limited key carries the `X-RateLimit-*` headers. Denials of a known key (here or by the
/// handler's scope and org checks) are audited as `auth.denied`, off the hot path.
pub async fn middleware(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    guard(&state, peer, None, req, |mut req, caller| {
        req.extensions_mut().insert(caller);
        next.run(req)
    })
    .await
}

/// A connection's copy of the snapshot its steady caller authenticates with.
///
/// A service calls Keyward over a few connections with one key, so every request of a
/// connection authenticates the same key. Answering it from the shared cache touches that
/// key's shard lock and snapshot reference count on every request, from every core: cache lines
/// that then bounce between cores. The connection keeps its own copy (its own allocation, with
/// its own count; the live traffic state inside is still the key's one shared state), valid
/// exactly as long as the cache entry it was copied from.
///
/// The copy is only made once a key authenticates twice in a row on the connection: a
/// connection that carries many agents' keys (a proxy's) would otherwise copy a snapshot on
/// every request and never use the copy.
#[derive(Debug, Default)]
pub struct CallerCache(std::sync::Mutex<Callers>);

#[derive(Debug, Default)]
struct Callers {
    copy: Option<Arc<Prepared>>,
    /// The key of the previous request, when it was not `copy`'s.
    last: Option<TokenDigest>,
}

impl CallerCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Callers> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn get(&self, state: &AppState, digest: &TokenDigest, now_ms: i64) -> Option<Arc<Prepared>> {
        let mut g = self.lock();
        let hit = g
            .copy
            .as_ref()
            .filter(|p| p.key.digest == *digest && state.cache.is_current(p, now_ms))
            .cloned();
        if hit.is_some() {
            // The copy's key made this request: another key must now repeat to replace it.
            g.last = None;
        }
        hit
    }

    /// The snapshot to authenticate with, after a miss of [`CallerCache::get`]: the connection's
    /// own copy of `shared` when its key also made the previous request, else `shared` itself.
    fn put(&self, shared: Arc<Prepared>) -> Arc<Prepared> {
        let mut g = self.lock();
        if g.last.as_ref() != Some(&shared.key.digest) {
            g.last = Some(shared.key.digest);
            return shared;
        }
        let mine = Arc::new(Prepared::clone(&shared));
        g.copy = Some(mine.clone());
        g.last = None;
        mine
    }
}

/// What [`middleware`] does around `next`, for the router's routes and the front door's alike:
/// `next` gets the request and its authenticated caller (the router's handlers find it in the
/// request's extensions; the front door hands it straight to its handler). The front door
/// passes its connection's [`CallerCache`].
///
/// Not an `async fn`: what it reads from the request's head is read before the future is made,
/// and the future holds only what it needs across its awaits. (An `async fn` keeps its arguments
/// twice, as they came and as moved into its body, and this future sits in every authenticated
/// request's, which is copied whole as it is created: see `front`'s future sizes.)
pub fn guard<'a, F, Fut>(
    state: &'a AppState,
    peer: SocketAddr,
    callers: Option<&'a CallerCache>,
    mut req: Request,
    next: F,
) -> impl std::future::Future<Output = Response> + 'a
where
    F: FnOnce(Request, Caller) -> Fut + 'a,
    Fut: std::future::Future<Output = Response> + 'a,
{
    let ip = client_ip(peer.ip(), req.headers(), &state.config.trusted_proxies);
    // Cheap copies (no allocation for standard methods; the URI is reference-counted): they
    // only become strings if the request is denied and audited.
    let method = req.method().clone();
    let uri = req.uri().clone();
    let trace = trace_context(req.headers());
    async move {
        let mut meta = Meta::default();
        // Boxed for the reason the front door boxes its handlers: it would otherwise sit inline
        // in every future around it, copied whole as each is created. Only the handler's future
        // (a box too) is held across the handler's await, not the authentication's result.
        // The request is lent to the checks, not moved through them: it is 240 bytes, and each
        // move in and out of a future was a `memcpy`. (Not rebound here: a `let` would give this
        // future a second copy of it.)
        let handler = match Box::pin(authenticate(
            state, ip, callers, &mut req, &trace, &mut meta,
        ))
        .await
        {
            Ok(caller) => Ok(next(req, caller)),
            Err(e) => Err(e),
        };
        let mut resp = match handler {
            Ok(handler) => handler.await,
            Err(e) => e.into_response(),
        };
        if meta.deprecated {
            deprecation_headers(&mut resp);
        }
        if let Some(r) = meta.rate {
            r.apply(&mut resp);
        }
        if let Some(code) = resp.extensions().get::<ErrorCode>().copied() {
            let auth_failure = code.status() == 401;
            let denial = auth_failure
                || matches!(
                    code,
                    ErrorCode::InsufficientScope
                        | ErrorCode::NotAMember
                        | ErrorCode::IpNotAllowed
                        | ErrorCode::AgentPaused
                        | ErrorCode::PolicyDenied
                        | ErrorCode::ConstraintNotNarrowing
                        | ErrorCode::RateLimited
                        | ErrorCode::QuotaExceeded
                        | ErrorCode::AgentCannotMintSubagents
                );
            if denial {
                let now = state.now();
                match &meta.prepared {
                    Some(p) => state.decisions.record(crate::decisions::Decision {
                        key: &p.key,
                        action: "auth.denied",
                        code: code.as_str(),
                        client_ip: Some(ip),
                        request_id: Some(crate::request_id::current().to_string()),
                        trace: trace.unwrap_or_default(),
                        method: Some(method.to_string()),
                        path: Some(uri.path().to_string()),
                        at: now,
                    }),
                    None => {
                        metrics::counter!("keyward_auth_failures_total", "code" => code.as_str())
                            .increment(1);
                    }
                }
                if auth_failure && !meta.throttled {
                    let now_ns = now.timestamp_nanos_opt().unwrap_or(i64::MAX);
                    if let Some(Err(retry_after_ns)) = state.auth_throttle.fail(ip, now_ns) {
                        // Concurrent requests from this address all passed the check before
                        // authenticating, and this failure is over its budget: it is answered
                        // as throttled, so no address learns more 401s than its budget allows
                        // however many requests it has in flight.
                        // Boxed: rare, and its timer would otherwise sit in every request's
                        // future (see `front`'s future sizes).
                        resp = Box::pin(throttled(retry_after_ns)).await.into_response();
                    }
                }
            }
        }
        resp
    }
}

/// The longest a throttled address's refusal is held back.
const THROTTLED_DELAY_MAX: std::time::Duration = std::time::Duration::from_millis(250);

/// The refusal of an address over the failed-auth throttle, which may try again in `wait_ns`.
///
/// It is held back until the address may try again (at most [`THROTTLED_DELAY_MAX`]): a client
/// that ignores `Retry-After` and asks again at once, as a flood does, then waits on its own
/// connections instead of taking the server's CPU from everyone else (a held request is a
/// timer, not work). `Retry-After` is what is left of the wait after the hold.
async fn throttled(wait_ns: i64) -> ApiError {
    let wait = std::time::Duration::from_nanos(wait_ns.max(0) as u64);
    let mut left = wait;
    if let Some(_held) = Held::enter() {
        let hold = wait.min(THROTTLED_DELAY_MAX);
        tokio::time::sleep(hold).await;
        left = wait - hold;
    }
    let mut e = ApiError::new(ErrorCode::RateLimited)
        .msg("Too many failed authentications from this address");
    e.retry_after = Some(left.as_secs_f64().ceil().max(1.0) as u64);
    e
}

/// At most this many refusals are held back at once (each is a parked request: a timer and its
/// future); beyond it, refusals are answered at once. Bounds what held requests can cost when
/// many connections (or HTTP/2 streams) are throttled together.
const THROTTLED_HELD_MAX: usize = 4096;

/// One refusal being held back, counted in [`THROTTLED_HELD_MAX`] until dropped (also when the
/// client goes away mid-hold and its request future is dropped).
struct Held;

static HELD: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Held {
    fn enter() -> Option<Held> {
        use std::sync::atomic::Ordering;
        HELD.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < THROTTLED_HELD_MAX).then_some(n + 1)
        })
        .ok()
        .map(|_| Held)
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What the middleware learns while authenticating that every response reports.
#[derive(Debug, Default)]
struct Meta {
    deprecated: bool,
    rate: Option<RateHeaders>,
    /// The key, once found (for auditing denials).
    prepared: Option<Arc<Prepared>>,
    /// Refused by the failed-auth throttle (which then must not count its own refusal).
    throttled: bool,
}

/// A failed authentication charged to an address whose request is dropped while its token is
/// being looked up, once the token is found to name no key: its client went away while the store
/// was read (a PostgreSQL read of a token the cache does not know; SQLite's hot read never
/// waits).
///
/// Without it a client guessing keys could cut each guess off once it was sent, before its
/// `401` was decided, and never be charged by the failed-auth throttle: every guess is a token
/// the cache has not seen, so every one waits on the store, and a read of every guess still
/// reached the store. The lookup is finished in a task of its own ([`charge_if_unknown`]), so a
/// valid key whose client leaves (or gives up on a slow store) is not charged.
struct ChargeIfLeft<'a> {
    state: &'a AppState,
    ip: IpAddr,
    token: &'a str,
    armed: bool,
}

impl<'a> ChargeIfLeft<'a> {
    fn arm(state: &'a AppState, ip: IpAddr, token: &'a str) -> ChargeIfLeft<'a> {
        ChargeIfLeft {
            state,
            ip,
            token,
            armed: state.auth_throttle.enabled(),
        }
    }

    /// The lookup returned: what it found is judged (and a failure charged) as usual.
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ChargeIfLeft<'_> {
    fn drop(&mut self) {
        // A lookup that panicked is the server's fault, not the client's.
        if self.armed && !std::thread::panicking() {
            charge_if_unknown(self.state, self.ip, self.token);
        }
    }
}

/// Finishes the lookup of `token`, whose request was dropped, in a task of its own, and charges
/// `ip` a failure if it names no key (a store error charges nothing). With
/// [`crate::DETACHED_MAX`] such lookups running already (the store stalled), or no runtime to
/// run one, nothing is charged: a valid key retried by a client that keeps giving up must not
/// be, and a guesser's reads are then bounded by the store's pace anyway.
fn charge_if_unknown(state: &AppState, ip: IpAddr, token: &str) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let Ok(permit) = state.detached_lookups.clone().try_acquire_owned() else {
        return;
    };
    let shared = state.clone();
    // A copy of the secret, in memory only, for as long as the lookup takes.
    let token = keyward_core::secret::Secret::new(token.to_string());
    drop(state.detach(async move {
        let _permit = permit;
        let now_ms = shared.now_ms();
        let found = shared
            .cache
            .lookup(shared.store.as_ref(), &shared.meter, token.expose(), now_ms)
            .await;
        if matches!(found, Ok(None)) {
            let now_ns = shared.now_ms().saturating_mul(1_000_000);
            let _ = shared.auth_throttle.fail(ip, now_ns);
            metrics::counter!("keyward_auth_failures_total", "code" => ErrorCode::InvalidApiKey.as_str())
                .increment(1);
        }
    }));
}

/// Whether org and agent rules are waived for this request: a root key changing its own org
/// (`PATCH /v1/orgs/{org}`), so a rule that denies too much can always be repaired through the
/// API. The caller's own constraints header still applies.
fn rules_waived(key: &Key, method: &axum::http::Method, path: &str) -> bool {
    key.kind == TokenKind::Root
        && method == axum::http::Method::PATCH
        && path
            .strip_prefix("/v1/orgs/")
            .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
}

/// The checks of API.md §1 up to (not including) the endpoint's scope and org checks, in
/// contract order: key state, agent state, signature, constraints and rules, rate limit, quota.
async fn authenticate(
    state: &AppState,
    ip: IpAddr,
    callers: Option<&CallerCache>,
    req: &mut Request,
    trace: &Result<TraceContext, ApiError>,
    meta: &mut Meta,
) -> Result<Caller, ApiError> {
    let now_ms = state.now_ms();
    // An address that keeps failing to authenticate is refused before its token is even
    // parsed, so guessing keys is slow and costs the server nothing.
    if state.auth_throttle.enabled() {
        let now_ns = now_ms.saturating_mul(1_000_000);
        if let Some(wait_ns) = state.auth_throttle.blocked_for(ip, now_ns) {
            meta.throttled = true;
            return Err(throttled(wait_ns).await);
        }
    }
    let token = credential(req.headers())?;
    let prepared = match callers {
        None => {
            let left = ChargeIfLeft::arm(state, ip, token);
            let found = lookup(state, token, now_ms).await;
            left.disarm();
            found?
        }
        Some(callers) => {
            let digest = crate::cache::VerifyCache::digest_of(token)
                .ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey))?;
            match callers.get(state, &digest, now_ms) {
                Some(p) => {
                    stats().add(Hot::CacheHit);
                    p
                }
                None => {
                    let left = ChargeIfLeft::arm(state, ip, token);
                    let found = state
                        .cache
                        .lookup_digest(state.store.as_ref(), &state.meter, token, digest, now_ms)
                        .await;
                    left.disarm();
                    callers.put(found?.ok_or_else(|| ApiError::new(ErrorCode::InvalidApiKey))?)
                }
            }
        }
    };
    meta.prepared = Some(prepared.clone());
    let (narrowed, trace) = match check(state, &prepared, ip, req, trace, meta, now_ms).await {
        Ok(passed) => passed,
        Err(e) => {
            state.meter.record(&prepared.live, Use::Denied, now_ms);
            return Err(e);
        }
    };
    // The traffic controls count the use themselves (allowed or rate-limited).
    let (rate, admitted) = admit(state, &prepared, now_ms).await;
    meta.rate = rate;
    admitted.map_err(|e| *e)?;
    let caller = Caller {
        narrowed,
        prepared,
        ctx: RequestContext {
            client_ip: Some(ip),
            request_id: crate::request_id::current(),
            trace,
        },
        admitted_ms: now_ms,
    };
    Ok(caller)
}

/// The checks before the traffic controls: key state, agent state, signature, constraints and
/// rules, then the trace headers (so a malformed request uses none of the key's limits). Answers
/// the scopes a constraints header narrowed the request to, and its trace context (the request's
/// body is replaced by its bytes when it was read for the signature).
async fn check(
    state: &AppState,
    prepared: &Arc<Prepared>,
    ip: IpAddr,
    req: &mut Request,
    trace: &Result<TraceContext, ApiError>,
    meta: &mut Meta,
    now_ms: i64,
) -> Result<(Option<Vec<Scope>>, TraceContext), ApiError> {
    let key = &prepared.key;
    let is_me = req.uri().path() == "/v1/me";
    meta.deprecated = key.deprecated_at.is_some();
    check_key(key, prepared.agent_status, Some(ip), now_ms, is_me).map_err(denial_error)?;
    if key.requires_signature {
        let now = keyward_core::clock::from_millis(now_ms);
        Box::pin(verify_signed_request(state, key, req, now)).await?;
    }
    // Scopes are only copied when a constraints header narrows them.
    let mut narrowed = None;
    let mut own_rule = None;
    if let Some(v) = req.headers().get(&names::KEYWARD_CONSTRAINTS) {
        let v = v.to_str().map_err(|_| {
            ApiError::validation("Keyward-Constraints", "must be base64url-encoded JSON")
        })?;
        let (scopes, rule) = apply_constraints(v, &key.scopes)?;
        narrowed = Some(scopes);
        own_rule = rule;
    }
    // Facts are only built when there is a rule to match them against.
    let waived = rules_waived(key, req.method(), req.uri().path());
    let org_rules: &[keyward_core::model::Rule] = if waived { &[] } else { &prepared.rules };
    if own_rule.is_some() || !org_rules.is_empty() {
        let facts = api_facts(key, req.method().as_str(), ip);
        let denied = own_rule
            .as_ref()
            .is_some_and(|r| keyward_core::rules::matches(r, &facts))
            || keyward_core::rules::first_denial(org_rules, &facts).is_some();
        if denied {
            return Err(ApiError::new(ErrorCode::PolicyDenied));
        }
    }
    // Trace headers are validated once the credential is known to be good, so that a request
    // without a valid key always learns that first.
    let trace = trace.clone()?;
    Ok((narrowed, trace))
}

/// Buffers the body (within the 1 MiB limit) and checks the request's signature; the request
/// then holds the buffered bytes as its body, for the handler.
async fn verify_signed_request(
    state: &AppState,
    key: &Key,
    req: &mut Request,
    now: keyward_core::model::Timestamp,
) -> Result<(), ApiError> {
    let bytes = crate::extract::read_body(std::mem::take(req.body_mut())).await?;
    // The head's parts, not the request: its body is not `Sync`, so a closure over the request
    // would make this future not `Send`.
    let (headers, uri, method) = (req.headers(), req.uri(), req.method());
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or_else(|| uri.path());
    crate::signing::check(
        key,
        &state.config.master_key,
        &state.replay,
        state.store.as_ref(),
        now,
        &crate::signing::Signed {
            method: method.as_str(),
            path,
            timestamp: header("x-timestamp"),
            signature: header("x-signature"),
            body: &bytes,
        },
    )
    .await?;
    *req.body_mut() = axum::body::Body::from(bytes);
    Ok(())
}

/// Whether a key may act for an agent (agent keys and keys derived from them).
pub fn is_agent_credential(key: &Key) -> bool {
    key.agent_id.is_some() && matches!(key.kind, TokenKind::Agent | TokenKind::Derived)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// IPv4 peers and forwarded addresses written IPv4-mapped (as a dual-stack listener sees
    /// IPv4 clients) are read as the IPv4 addresses they are.
    #[test]
    fn ipv4_mapped_addresses_are_read_as_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let xff = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                names::X_FORWARDED_FOR.clone(),
                HeaderValue::from_str(v).unwrap(),
            );
            h
        };
        // An IPv4 client, directly.
        assert_eq!(
            client_ip(ip("::ffff:203.0.113.9"), &HeaderMap::new(), &[]),
            ip("203.0.113.9")
        );
        // An IPv4 proxy is recognised as trusted, so its header is read.
        assert_eq!(
            client_ip(ip("::ffff:10.1.2.3"), &xff("203.0.113.9"), &trusted),
            ip("203.0.113.9")
        );
        // Mapped addresses in the header: a trusted hop is skipped, the client is IPv4.
        assert_eq!(
            client_ip(
                ip("10.1.2.3"),
                &xff("::ffff:198.51.100.2, ::ffff:10.9.9.9"),
                &trusted
            ),
            ip("198.51.100.2")
        );
        // A real IPv6 address is left alone.
        assert_eq!(
            client_ip(ip("2001:db8::1"), &HeaderMap::new(), &[]),
            ip("2001:db8::1")
        );
    }

    /// An Authorization value's scheme is what comes before its first space, matched without
    /// regard to case, and the token is the rest, trimmed (`general` says it the plain way).
    #[test]
    fn authorization_is_read_as_scheme_space_token() {
        fn general(s: &str) -> Option<&str> {
            let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
            scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
        }
        for v in [
            "Bearer kw_ak_abc",
            "bearer kw_ak_abc",
            "BEARER kw_ak_abc",
            "Bearer  kw_ak_abc ",
            "Bearer ",
            "Bearer",
            "Bearerx kw_ak_abc",
            "Bearer\tkw_ak_abc",
            "Basic dXNlcg==",
            "Bear kw_ak_abc",
            "bearer",
            "",
            " Bearer kw_ak_abc",
            "Bearer kw ak",
        ] {
            let mut headers = HeaderMap::new();
            headers.insert(
                axum::http::header::AUTHORIZATION,
                axum::http::HeaderValue::from_str(v).unwrap(),
            );
            assert_eq!(credential(&headers).ok(), general(v), "{v:?}");
        }
    }

    /// At most `THROTTLED_HELD_MAX` refusals are held at once; a slot frees when its hold
    /// ends (or its request is dropped). Beyond the cap a refusal is answered at once, with
    /// the whole wait as its `Retry-After`; a held one gets what is left after the hold.
    #[tokio::test]
    async fn held_refusals_are_capped_and_retry_after_counts_the_hold() {
        let wait_ns = 1_100_000_000; // 1.1 s
        let asked = std::time::Instant::now();
        let held = throttled(wait_ns).await;
        assert!(asked.elapsed() >= THROTTLED_DELAY_MAX);
        assert_eq!(held.retry_after, Some(1), "0.85 s left after the hold");

        let all: Vec<Held> = std::iter::from_fn(Held::enter)
            .take(THROTTLED_HELD_MAX)
            .collect();
        assert_eq!(all.len(), THROTTLED_HELD_MAX);
        assert!(Held::enter().is_none(), "the cap is reached");
        let at_once = throttled(wait_ns).await;
        // Not held (a held one would have 0.85 s left): the whole 1.1 s, rounded up.
        assert_eq!(at_once.retry_after, Some(2));
        drop(all);
        assert!(Held::enter().is_some(), "slots free when holds end");
    }
}
