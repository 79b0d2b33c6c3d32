//! `POST /v1/keys/verify` (API.md §5): lets the caller's own services check a key they received.
//! Always `200` for a well-formed request; the answer says whether the key is valid and why not.
//! The verified key goes through the same pipeline as a direct call (key state, agent state,
//! signature, constraints and deny rules, rate limit, then the required scopes), and counts
//! against its rate limit exactly like one.

use std::net::IpAddr;

use axum::extract::State;
use keyward_core::auth::{check_key, check_scopes};
use keyward_core::rules::{self, RequestFacts};
use keyward_core::scope::Scope;
use keyward_proto::{self as proto, ErrorCode};

use std::sync::Arc;

use crate::auth::{admit, lookup, Caller, RateHeaders};
use crate::cache::Prepared;
use crate::error::{ApiError, ApiResult};
use crate::keys::parse_scopes;
use crate::stats::{stats, Hot};
use crate::usage::{QuotaUse, Use};
use crate::AppState;
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
    p: &Arc<Prepared>,
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
    // Boxed (out of every verification's future), and only for a key that signs.
    if key.requires_signature {
        if let Err(code) = Box::pin(signature(state, p, body, now_ms)).await {
            return Decided::denied(code);
        }
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
    // The required scopes are judged after the traffic controls, the order of a direct call
    // (whose endpoint checks its scope after the use was counted as allowed).
    let (rate, admitted) = admit(state, p, now_ms).await;
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
        result: check_scopes(narrowed.as_deref().unwrap_or(&key.scopes), required)
            .map_err(|_| ErrorCode::InsufficientScope),
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
    Body(body): Body,
) -> Result<axum::response::Response, ApiError> {
    answer(&state, &caller, &body).await
}

/// A verify request's body, read as [`crate::extract::json_body`] reads any JSON body, but with
/// the usual `{"key": ...}` read by hand first ([`proto::VerifyRequest::parse_key_only`]). The
/// router's handler and the front door both read it through [`body`]. Boxed: it is 352 bytes,
/// and it sits in the handler's future.
pub struct Body(pub Box<proto::VerifyRequest>);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(req: axum::extract::Request, _: &S) -> Result<Self, ApiError> {
        body(req).await.map(Body)
    }
}

/// Reads a verify request's body (see [`Body`]).
pub fn body(
    req: axum::extract::Request,
) -> impl std::future::Future<Output = Result<Box<proto::VerifyRequest>, ApiError>> + Send {
    crate::extract::json_body_or(req, |b| {
        proto::VerifyRequest::parse_key_only(b).map(Box::new)
    })
}

/// The handler's work, for the router and the front door.
///
/// It borrows the caller and the body: its future then holds two pointers instead of both
/// values (and every future around it a copy of them).
pub async fn answer(
    state: &AppState,
    caller: &Caller,
    body: &proto::VerifyRequest,
) -> Result<axum::response::Response, ApiError> {
    static KEYS_VERIFY: std::sync::LazyLock<Vec<Scope>> =
        std::sync::LazyLock::new(|| Scope::parse("keys:verify").into_iter().collect());
    caller.require_parsed(&KEYS_VERIFY, &["keys:verify"])?;
    let verified = verify_key(state, caller.org_id(), body, &caller.ctx).await?;
    let mut out = Vec::with_capacity(512);
    verified.write_json(&mut out);
    Ok(crate::render::json_bytes(out))
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

impl Verified {
    /// The answer as the wire type (what [`Verified::write_json`] writes, built with serde; the
    /// tests hold the two to the same bytes).
    pub fn to_wire(&self) -> proto::VerifyResponse {
        let mut w = proto::VerifyResponse {
            valid: self.valid(),
            code: self.code().to_string(),
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
            w.key_id = Some(key.id);
            w.agent_id = key.agent_id;
            w.org_id = Some(key.org_id);
            w.kind = Some(key.kind.as_str().to_string());
            w.environment = Some(key.environment.as_str().to_string());
            w.scopes = Some(key.scopes.iter().map(|s| s.as_str().to_string()).collect());
            w.expires_at = key.expires_at;
            w.deprecated = Some(key.deprecated_at.is_some());
            w.ratelimit = self.rate.map(|r| proto::RateLimitState {
                limit: r.limit,
                remaining: r.remaining,
                reset: r.reset,
            });
            w.quota = self.quota.map(|q| proto::QuotaState {
                limit: q.limit,
                used: q.used,
                remaining: q.limit.saturating_sub(q.used),
                resets_at: q.resets_at(),
            });
            w.agent = match (key.agent_id, &p.agent_name, p.agent_status) {
                (Some(id), Some(name), Some(status)) => Some(proto::VerifyAgent {
                    id,
                    name: name.to_string(),
                    status: status.as_str().to_string(),
                }),
                _ => None,
            };
        }
        w
    }

    /// Writes the answer as JSON, byte for byte what serde writes for [`Verified::to_wire`].
    ///
    /// Written by hand because it is the hot path's answer: serde_json's general serializer
    /// (escaping every string byte by byte, a field at a time) took 0.47 us per verification
    /// under load, a fifth of the verify handler. Almost everything here needs no escaping:
    /// field names, codes, kinds and statuses are constants, ids are hex, scopes and agent names
    /// are validated to `[a-z0-9_.:*-]`; any string that does need it goes through serde_json.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if self.valid() {
            b"{\"valid\":true,\"code\":"
        } else {
            b"{\"valid\":false,\"code\":"
        });
        json_const(out, self.code());
        let Some(p) = &self.prepared else {
            out.push(b'}');
            return;
        };
        let key = &p.key;
        out.extend_from_slice(b",\"key_id\":");
        json_uuid(out, &key.id);
        out.extend_from_slice(b",\"agent_id\":");
        match &key.agent_id {
            Some(a) => json_uuid(out, a),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"org_id\":");
        json_uuid(out, &key.org_id);
        out.extend_from_slice(b",\"kind\":");
        json_const(out, key.kind.as_str());
        out.extend_from_slice(b",\"environment\":");
        json_const(out, key.environment.as_str());
        out.extend_from_slice(b",\"scopes\":[");
        for (i, scope) in key.scopes.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            json_str(out, scope.as_str());
        }
        out.push(b']');
        out.extend_from_slice(b",\"expires_at\":");
        match &key.expires_at {
            Some(t) => json_str(out, &keyward_proto::ts::format(t)),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(if key.deprecated_at.is_some() {
            b",\"deprecated\":true"
        } else {
            b",\"deprecated\":false"
        });
        let mut n = itoa::Buffer::new();
        if let Some(r) = &self.rate {
            out.extend_from_slice(b",\"ratelimit\":{\"limit\":");
            out.extend_from_slice(n.format(r.limit).as_bytes());
            out.extend_from_slice(b",\"remaining\":");
            out.extend_from_slice(n.format(r.remaining).as_bytes());
            out.extend_from_slice(b",\"reset\":");
            out.extend_from_slice(n.format(r.reset).as_bytes());
            out.push(b'}');
        } else {
            out.extend_from_slice(b",\"ratelimit\":null");
        }
        if let Some(q) = &self.quota {
            out.extend_from_slice(b",\"quota\":{\"limit\":");
            out.extend_from_slice(n.format(q.limit).as_bytes());
            out.extend_from_slice(b",\"used\":");
            out.extend_from_slice(n.format(q.used).as_bytes());
            out.extend_from_slice(b",\"remaining\":");
            out.extend_from_slice(n.format(q.limit.saturating_sub(q.used)).as_bytes());
            out.extend_from_slice(b",\"resets_at\":");
            json_str(out, &keyward_proto::ts::format(&q.resets_at()));
            out.push(b'}');
        } else {
            out.extend_from_slice(b",\"quota\":null");
        }
        if let (Some(id), Some(name), Some(status)) = (&key.agent_id, &p.agent_name, p.agent_status)
        {
            out.extend_from_slice(b",\"agent\":{\"id\":");
            json_uuid(out, id);
            out.extend_from_slice(b",\"name\":");
            json_str(out, name);
            out.extend_from_slice(b",\"status\":");
            json_const(out, status.as_str());
            out.push(b'}');
        } else {
            out.extend_from_slice(b",\"agent\":null");
        }
        out.push(b'}');
    }
}

/// A JSON string: copied between quotes when nothing in it needs escaping, else by serde_json.
fn json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, s).is_err() {
        // Writing into a Vec cannot fail; an empty string keeps the document valid regardless.
        out.extend_from_slice(b"\"\"");
    }
}

/// A name the code itself defines (a code, a kind, an environment, a status: `&'static str`s of
/// `[A-Z_a-z]`), between quotes: nothing in it can need escaping, so it is not scanned.
fn json_const(out: &mut Vec<u8>, s: &'static str) {
    debug_assert!(s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// A UUID as a lowercase hyphenated JSON string.
///
/// By hand, a byte at a time through a table of hex pairs: `uuid`'s encoder works a nibble at a
/// time and was a third of the answer's writing (four UUIDs per answer: 156 instructions each
/// with it, 88 here, counted by callgrind). A test holds it to serde's bytes.
fn json_uuid(out: &mut Vec<u8>, id: &Uuid) {
    static HEX: [[u8; 2]; 256] = {
        let digits = b"0123456789abcdef";
        let mut t = [[0u8; 2]; 256];
        let mut i = 0;
        while i < 256 {
            t[i] = [digits[i >> 4], digits[i & 15]];
            i += 1;
        }
        t
    };
    let b = id.as_bytes();
    let mut buf = [b'"'; 38];
    let mut at = 1;
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            buf[at] = b'-';
            at += 1;
        }
        buf[at..at + 2].copy_from_slice(&HEX[*byte as usize]);
        at += 2;
    }
    out.extend_from_slice(&buf);
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
    for ((field, max), text) in proto::VerifyRequestFacts::MAX_LENGTHS
        .iter()
        .zip(given.texts())
    {
        if text.is_some_and(|t| t.chars().count() > *max) {
            return Err(ApiError::validation(
                &format!("request.{field}"),
                format!("must be at most {max} characters"),
            ));
        }
    }
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
            request_id: Some(ctx.request_id.to_string()),
            trace: ctx.trace.clone(),
            method: given.method.clone(),
            path: given.path.clone(),
            at: keyward_core::clock::from_millis(now_ms),
        });
    }
    // A key refused before its traffic controls ran (or by its quota) still reports its
    // limits as they stand, read from memory only (see `standing_quota`).
    let (mut rate, mut quota) = (d.rate, d.quota);
    if rate.is_none() {
        rate = p.rate.map(|g| {
            let bucket = p.bucket.as_deref().unwrap_or(&p.live);
            crate::auth::RateHeaders::of(
                &g,
                &bucket.peek(&g, now_ms.saturating_mul(1_000_000)),
                now_ms,
            )
        });
    }
    if quota.is_none() {
        quota = standing_quota(&p, d.result, now_ms);
    }
    Ok(count(Verified {
        prepared: Some(p),
        result: d.result,
        rate,
        quota,
    }))
}

/// The quota of a key its verification did not take from: exhausted when that is why it was
/// refused, else as this node's counter has it. No store read: a refused key (one over its rate
/// limit, say) may be verified again and again, and its refusal does not depend on the quota.
/// `None` when the node has no counter for the period (always on a shared store).
fn standing_quota(p: &Prepared, result: Result<(), ErrorCode>, now_ms: i64) -> Option<QuotaUse> {
    let q = p.key.quota?;
    let used = if result == Err(ErrorCode::QuotaExceeded) {
        q.limit
    } else {
        p.live.quota_used(q.period, now_ms)?
    };
    let end = keyward_core::quota::period_end(q.period, keyward_core::clock::from_millis(now_ms));
    Some(QuotaUse {
        limit: q.limit,
        used: used.min(q.limit),
        resets_at_ms: end.timestamp_millis(),
    })
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
    use keyward_core::model::{AgentStatus, Key};
    use keyward_core::token::{Environment, TokenKind};

    fn written(v: &Verified) -> String {
        let mut out = Vec::new();
        v.write_json(&mut out);
        String::from_utf8(out).unwrap()
    }

    fn prepared(key: Key, agent_name: Option<&str>, status: Option<AgentStatus>) -> Arc<Prepared> {
        let meter = crate::usage::Meter::default();
        Arc::new(Prepared {
            live: meter.state(key.id, key.org_id),
            bucket: None,
            agent_status: status,
            agent_name: agent_name.map(Arc::from),
            rules: Box::default(),
            rate: None,
            stamp: Default::default(),
            key,
        })
    }

    /// The hand-written answer must be byte for byte what serde writes for the wire type, in
    /// every shape an answer takes.
    #[test]
    fn the_written_answer_is_what_serde_writes_for_the_wire_type() {
        let now = keyward_core::clock::from_millis(1_795_000_000_123);
        let scopes = ["slack:chat:write", "keys:*", "*"]
            .iter()
            .map(|s| Scope::parse(s).unwrap())
            .collect();
        let (mut agent_key, _) = Key::mint(
            Uuid::now_v7(),
            Some(Uuid::now_v7()),
            TokenKind::Agent,
            Environment::Live,
            scopes,
            now,
        )
        .unwrap();
        let (root, _) = Key::mint(
            Uuid::now_v7(),
            None,
            TokenKind::Root,
            Environment::Test,
            vec![],
            now,
        )
        .unwrap();
        let mut cases = vec![
            Verified::invalid(),
            Verified {
                prepared: Some(prepared(root, None, None)),
                result: Ok(()),
                rate: None,
                quota: None,
            },
            Verified {
                prepared: Some(prepared(
                    agent_key.clone(),
                    Some("support-bot"),
                    Some(AgentStatus::Active),
                )),
                result: Err(ErrorCode::InsufficientScope),
                rate: Some(RateHeaders {
                    limit: 100,
                    remaining: 0,
                    reset: 1_795_000_060,
                }),
                quota: Some(QuotaUse {
                    limit: 1000,
                    used: 1000,
                    resets_at_ms: 1_795_003_600_000,
                }),
            },
        ];
        agent_key.expires_at = Some(now);
        agent_key.deprecated_at = Some(now);
        cases.push(Verified {
            // A name no validation would let through, to exercise escaping.
            prepared: Some(prepared(
                agent_key,
                Some("quote\"back\\slash\u{1}é"),
                Some(AgentStatus::Paused),
            )),
            result: Err(ErrorCode::AgentPaused),
            rate: None,
            quota: None,
        });
        for v in &cases {
            assert_eq!(
                written(v),
                serde_json::to_string(&v.to_wire()).unwrap(),
                "{v:?}"
            );
        }
    }

    /// The hand-written UUID encoder writes what serde writes, for every byte value in every
    /// position (and the edges: all zeros, all ones).
    #[test]
    fn uuids_are_written_as_serde_writes_them() {
        let mut ids = vec![Uuid::nil(), Uuid::max()];
        for b in 0..=255u8 {
            let mut bytes = [0u8; 16];
            for (i, x) in bytes.iter_mut().enumerate() {
                *x = b.wrapping_add(i as u8 * 17);
            }
            ids.push(Uuid::from_bytes(bytes));
        }
        ids.extend((0..100).map(|_| Uuid::now_v7()));
        for id in ids {
            let mut out = Vec::new();
            json_uuid(&mut out, &id);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                serde_json::to_string(&id).unwrap()
            );
        }
    }
}
