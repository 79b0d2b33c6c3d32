//! Request and response bodies of the v1 API (API.md §3-§5, §7). Request bodies reject unknown
//! fields so that typos never pass silently.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

/// Distinguishes "absent" (outer `None`) from "explicitly null" (`Some(None)`) in PATCH bodies.
fn double_option<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// A rate limit: `{"tier": "pro"}` or `{"limit": N, "period_s": S, "burst": B}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum RateLimit {
    Tier {
        tier: String,
    },
    Custom {
        limit: u64,
        period_s: u64,
        burst: u64,
    },
}

/// A quota: a hard cap on successful uses per UTC calendar period.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub limit: u64,
    /// `hour`, `day` or `month`.
    pub period: String,
}

/// An organization.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Org {
    pub id: Uuid,
    pub name: String,
    #[serde(with = "crate::ts")]
    pub created_at: DateTime<Utc>,
    /// `max_key_ttl_s`, `rate_limit_tiers`, `default_rate_limit`, `rules`.
    #[schema(value_type = Object)]
    pub policy: Value,
}

/// `PATCH /v1/orgs/{org}` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateOrgRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Replaces the whole policy; omitted fields take their defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub policy: Option<Value>,
}

/// An agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Agent {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub display_name: Option<String>,
    /// `agent` or `service`.
    #[serde(rename = "type")]
    pub agent_type: String,
    /// `active`, `paused` or `revoked`.
    pub status: String,
    /// Per-provider allowlist, e.g. `{"slack": ["chat:write"]}`.
    pub scopes: BTreeMap<String, Vec<String>>,
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
    #[schema(value_type = Object)]
    pub policy: Map<String, Value>,
    pub capabilities: Vec<String>,
    pub did: Option<String>,
    pub owner_user_id: Option<Uuid>,
    pub parent_agent_id: Option<Uuid>,
    pub version: i64,
    #[serde(with = "crate::ts")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "crate::ts")]
    pub updated_at: DateTime<Utc>,
    #[serde(with = "crate::ts::option")]
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A key. The plaintext and the digest appear in no key body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Key {
    pub id: Uuid,
    pub org_id: Uuid,
    pub agent_id: Option<Uuid>,
    pub parent_key_id: Option<Uuid>,
    /// `root`, `agent` or `derived`.
    pub kind: String,
    /// `live` or `test`.
    pub environment: String,
    pub name: Option<String>,
    /// The first 12 characters of the token, to tell keys apart.
    pub start: String,
    pub scopes: Vec<String>,
    pub cidr_allowlist: Vec<String>,
    pub rate_limit: Option<RateLimit>,
    pub quota: Option<Quota>,
    pub alert_thresholds: Vec<u8>,
    pub requires_signature: bool,
    #[serde(with = "crate::ts::option")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::ts::option")]
    pub deprecated_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::ts::option")]
    pub revoked_at: Option<DateTime<Utc>>,
    pub successor_key_id: Option<Uuid>,
    #[serde(with = "crate::ts::option")]
    pub last_used_at: Option<DateTime<Utc>>,
    #[serde(with = "crate::ts")]
    pub created_at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub metadata: Map<String, Value>,
}

/// The settings of a new key (agent key or root key).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Defaults to the agent's whole flat allowlist (root keys: `["*"]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<Vec<String>>,
    /// Lifetime in seconds; none means the key does not expire.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_allowlist: Option<Vec<String>>,
    /// `live` (default) or `test`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Quota>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_thresholds: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires_signature: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

/// `POST /v1/orgs/{org}/agents` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateAgentRequest {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// `agent` (default) or `service`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub agent_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub policy: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capabilities: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<CreateKeyRequest>,
}

/// `201` answer to creating an agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateAgentResponse {
    pub agent: Agent,
    pub key: Key,
    /// The plaintext key, shown once (`null` on an idempotent replay).
    pub api_key: Option<String>,
    /// The request-signing secret when the key requires signatures, shown once.
    pub signing_secret: Option<String>,
}

/// `201` answer to minting, deriving or rotating a key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateKeyResponse {
    pub key: Key,
    /// The plaintext key, shown once (`null` on an idempotent replay).
    pub api_key: Option<String>,
    /// The request-signing secret when the key requires signatures, shown once.
    pub signing_secret: Option<String>,
}

/// `PATCH /v1/orgs/{org}/agents/{id}` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateAgentRequest {
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub display_name: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub policy: Option<Map<String, Value>>,
}

/// `PATCH /v1/keys/{key_id}` body. `null` clears `rate_limit` / `quota`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateKeyRequest {
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>)]
    pub name: Option<Option<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_allowlist: Option<Vec<String>>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<RateLimit>)]
    pub rate_limit: Option<Option<RateLimit>>,
    #[serde(
        default,
        deserialize_with = "double_option",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<Quota>)]
    pub quota: Option<Option<Quota>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alert_thresholds: Option<Vec<u8>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

/// `POST /v1/keys/derive` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeriveKeyRequest {
    /// Non-empty, implied by the caller's effective scopes, never `keys:derive`.
    pub scopes: Vec<String>,
    /// Seconds; capped at the org's `max_key_ttl_s` and the caller's remaining lifetime.
    pub expires_in: u64,
    /// Within the caller's allowlist; inherits it when omitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cidr_allowlist: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Map<String, Value>>,
}

/// `POST /v1/keys/{key_id}/rotate` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RotateKeyRequest {
    /// 0..=30, default 7.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlap_days: Option<u32>,
}

/// A list of agents.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AgentList {
    pub agents: Vec<Agent>,
    pub limit: u32,
    pub offset: u64,
    pub has_more: bool,
}

/// A list of keys.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<Key>,
    pub limit: u32,
    pub offset: u64,
    pub has_more: bool,
}

/// The answer of `GET /v1/me`: the calling agent plus the calling key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MeResponse {
    #[serde(flatten)]
    pub agent: Agent,
    pub key: Key,
}

/// Facts about the request a verified key is being used for.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequestFacts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 32)]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 4096)]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub provider_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub resource_kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub app_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(max_length = 256)]
    pub environment: Option<String>,
}

impl VerifyRequestFacts {
    /// The longest each text fact may be, by field name (the `request.` prefix omitted). A
    /// failed verification keeps its method and path in the audit log, so they are bounded
    /// like every other input rather than by the body limit alone.
    pub const MAX_LENGTHS: [(&'static str, usize); 6] = [
        ("method", 32),
        ("path", 4096),
        ("provider_id", 256),
        ("resource_kind", 256),
        ("app_id", 256),
        ("environment", 256),
    ];

    /// The text facts, in the order of [`VerifyRequestFacts::MAX_LENGTHS`].
    pub fn texts(&self) -> [Option<&str>; 6] {
        [
            self.method.as_deref(),
            self.path.as_deref(),
            self.provider_id.as_deref(),
            self.resource_kind.as_deref(),
            self.app_id.as_deref(),
            self.environment.as_deref(),
        ]
    }
}

/// The signature of the request being verified.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifySignature {
    pub value: String,
    pub timestamp: i64,
    pub method: String,
    pub path: String,
    #[serde(default)]
    pub body: String,
}

/// `POST /v1/keys/verify` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub required_scopes: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<VerifyRequestFacts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<VerifySignature>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub constraints: Option<Value>,
}

impl VerifyRequest {
    /// The body almost every verification sends, `{"key":"<token>"}` (JSON whitespace allowed
    /// between the tokens), read without serde; `None` for any other body (another field, an
    /// escape or a byte outside printable ASCII in the key, anything malformed), which the caller
    /// then parses with serde. Where it answers, it answers what serde would (a test holds the two
    /// together).
    ///
    /// Written by hand because it is on the hot path: serde_json's general parser cost 1,404
    /// instructions per verification for this one field, this 432 (callgrind, key included).
    pub fn parse_key_only(body: &[u8]) -> Option<VerifyRequest> {
        fn ws(s: &mut &[u8]) {
            while let [b' ' | b'\t' | b'\n' | b'\r', rest @ ..] = *s {
                *s = rest;
            }
        }
        fn lit(s: &mut &[u8], l: &[u8]) -> Option<()> {
            ws(s);
            *s = s.strip_prefix(l)?;
            Some(())
        }
        /// The bytes a JSON string holds as themselves: printable ASCII but `"` and `\`.
        const PLAIN: [bool; 256] = {
            let mut t = [false; 256];
            let mut b = 0x20;
            while b < 0x7f {
                t[b] = b != b'"' as usize && b != b'\\' as usize;
                b += 1;
            }
            t
        };
        let mut s = body;
        lit(&mut s, b"{")?;
        lit(&mut s, b"\"key\"")?;
        lit(&mut s, b":")?;
        lit(&mut s, b"\"")?;
        let end = s.iter().position(|&b| !PLAIN[usize::from(b)])?;
        let (key, rest) = s.split_at(end);
        s = rest.strip_prefix(b"\"")?;
        lit(&mut s, b"}")?;
        ws(&mut s);
        if !s.is_empty() {
            return None;
        }
        Some(VerifyRequest {
            key: std::str::from_utf8(key).ok()?.to_owned(),
            ..Default::default()
        })
    }
}

/// Rate-limit state reported by verify.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RateLimitState {
    pub limit: u64,
    pub remaining: u64,
    pub reset: i64,
}

/// The agent summary in a verify answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct VerifyAgent {
    pub id: Uuid,
    pub name: String,
    pub status: String,
}

/// Quota state reported by verify and usage.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct QuotaState {
    pub limit: u64,
    pub used: u64,
    pub remaining: u64,
    #[serde(with = "crate::ts")]
    pub resets_at: DateTime<Utc>,
}

/// `POST /v1/keys/verify` answer: always 200 for a well-formed request.
///
/// For a key the caller may see, every field is present (`null` when the key has none: no
/// expiry, no quota, no rate limit, a root key's agent), as in API.md §5's example. A key
/// refused before its traffic controls ran reports its rate limit as it stands, without taking
/// from it, and its quota as the answering node's counter has it (`null` when the node has
/// none for the period, as on a shared store: the refusal does not read the store for it). For an
/// unknown, malformed or other org's key (`key_id` is `None`) only `valid` and `code` are
/// written, and nothing else is said.
#[derive(Debug, Clone, Deserialize, ToSchema)]
pub struct VerifyResponse {
    pub valid: bool,
    /// `VALID`, or the error code the key would get.
    pub code: String,
    #[serde(default)]
    pub key_id: Option<Uuid>,
    #[serde(default)]
    pub agent_id: Option<Uuid>,
    #[serde(default)]
    pub org_id: Option<Uuid>,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub environment: Option<String>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    #[serde(default, with = "crate::ts::option")]
    pub expires_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub deprecated: Option<bool>,
    #[serde(default)]
    pub ratelimit: Option<RateLimitState>,
    #[serde(default)]
    pub quota: Option<QuotaState>,
    #[serde(default)]
    pub agent: Option<VerifyAgent>,
}

impl Serialize for VerifyResponse {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        /// `expires_at` in the house timestamp format.
        struct Ts<'a>(&'a Option<DateTime<Utc>>);
        impl Serialize for Ts<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                crate::ts::option::serialize(self.0, s)
            }
        }
        let Some(key_id) = &self.key_id else {
            let mut m = s.serialize_map(Some(2))?;
            m.serialize_entry("valid", &self.valid)?;
            m.serialize_entry("code", &self.code)?;
            return m.end();
        };
        let mut m = s.serialize_map(Some(13))?;
        m.serialize_entry("valid", &self.valid)?;
        m.serialize_entry("code", &self.code)?;
        m.serialize_entry("key_id", key_id)?;
        m.serialize_entry("agent_id", &self.agent_id)?;
        m.serialize_entry("org_id", &self.org_id)?;
        m.serialize_entry("kind", &self.kind)?;
        m.serialize_entry("environment", &self.environment)?;
        m.serialize_entry("scopes", &self.scopes)?;
        m.serialize_entry("expires_at", &Ts(&self.expires_at))?;
        m.serialize_entry("deprecated", &self.deprecated)?;
        m.serialize_entry("ratelimit", &self.ratelimit)?;
        m.serialize_entry("quota", &self.quota)?;
        m.serialize_entry("agent", &self.agent)?;
        m.end()
    }
}

/// An audit event.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditEvent {
    pub id: Uuid,
    pub org_id: Uuid,
    #[serde(with = "crate::ts")]
    pub occurred_at: DateTime<Utc>,
    /// e.g. `agent.create`, `key.revoke`.
    pub action: String,
    /// `success`, `denied` or `failure`.
    pub outcome: String,
    pub error_code: Option<String>,
    pub actor_key_id: Option<Uuid>,
    pub actor_agent_id: Option<Uuid>,
    pub target_type: Option<String>,
    pub target_id: Option<Uuid>,
    pub client_ip: Option<String>,
    pub request_id: Option<String>,
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
    pub parent_agent: Option<String>,
    pub traceparent: Option<String>,
    pub trace_meta: BTreeMap<String, String>,
    #[schema(value_type = Object)]
    pub details: Value,
}

/// A list of audit events, newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct AuditList {
    pub events: Vec<AuditEvent>,
    pub limit: u32,
    pub offset: u64,
    pub has_more: bool,
}

/// Pagination query parameters.
#[derive(Debug, Clone, Default, Serialize, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// 1..=1000, default 100.
    pub limit: Option<u32>,
    /// Default 0.
    pub offset: Option<u64>,
}

/// Service health answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

/// Usage counts of a key.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageTotals {
    pub allowed: u64,
    pub denied: u64,
    pub rate_limited: u64,
}

/// One hour's or day's counts.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageBucket {
    #[serde(with = "crate::ts")]
    pub start: DateTime<Utc>,
    pub allowed: u64,
    pub denied: u64,
    pub rate_limited: u64,
}

/// `GET /v1/keys/{key_id}/usage` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UsageResponse {
    pub key_id: Uuid,
    pub total: UsageTotals,
    pub buckets: Vec<UsageBucket>,
    pub quota: Option<QuotaState>,
}

#[cfg(test)]
mod tests {
    use super::VerifyRequest;
    use proptest::prelude::*;

    fn serde_key_only(body: &[u8]) -> Option<String> {
        let v: VerifyRequest = serde_json::from_slice(body).ok()?;
        let only = v.required_scopes.is_none()
            && v.request.is_none()
            && v.signature.is_none()
            && v.constraints.is_none();
        only.then_some(v.key)
    }

    #[test]
    fn the_usual_body_is_read_without_serde() {
        for body in [
            r#"{"key":"kw_ak_abc123"}"#,
            " {\n\t\"key\" :\r\n \"kw_ak_abc123\" } \n",
        ] {
            let key = VerifyRequest::parse_key_only(body.as_bytes()).map(|v| v.key);
            assert_eq!(key.as_deref(), Some("kw_ak_abc123"), "{body:?}");
        }
        for body in [
            r#"{"key":"kw_ak_\u0061"}"#,
            r#"{"key":"kw_ak_é"}"#,
            r#"{"key":"kw_ak_abc","key":"x"}"#,
            r#"{"key":"kw_ak_abc","request":{}}"#,
            r#"{"key":"kw_ak_abc"}x"#,
            r#"{"key":"kw_ak_abc"#,
            r#"{"key":1}"#,
            "",
        ] {
            assert!(
                VerifyRequest::parse_key_only(body.as_bytes()).is_none(),
                "{body}"
            );
        }
    }

    /// Pieces from which bodies near the usual one are assembled: valid ones, broken ones, and
    /// ones the fast path must leave to serde.
    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "{",
            "}",
            "\"key\"",
            "\"kEy\"",
            ":",
            "\"",
            "kw_ak_",
            "abcXYZ019",
            " ",
            "\n",
            "\t",
            "\r",
            "\u{b}",
            ",",
            "\"request\"",
            "{}",
            "null",
            "\\",
            "\\\"",
            "\\u0041",
            "é",
            "\u{1}",
            "\u{7f}",
            "1",
            "[]",
            "\"x\"",
        ])
    }

    proptest! {
        /// Whatever the fast path reads, serde reads the same (and nothing besides the key), for
        /// the usual body with pieces inserted, replaced and removed.
        #[test]
        fn the_fast_path_agrees_with_serde(
            edits in prop::collection::vec((0usize..16, 0u8..3, piece()), 0..4),
        ) {
            let mut pieces = vec!["{", "\"key\"", ":", "\"", "kw_ak_", "abcXYZ019", "\"", "}"];
            for (at, what, p) in edits {
                let at = at % (pieces.len() + 1);
                match what {
                    0 => pieces.insert(at, p),
                    1 if at < pieces.len() => pieces[at] = p,
                    _ if at < pieces.len() => { pieces.remove(at); }
                    _ => pieces.push(p),
                }
            }
            let body = pieces.concat();
            let fast = VerifyRequest::parse_key_only(body.as_bytes()).map(|v| v.key);
            if fast.is_some() {
                prop_assert_eq!(fast, serde_key_only(body.as_bytes()), "{:?}", body);
            }
        }

        /// Every body of the usual shape with a printable key is read by the fast path.
        #[test]
        fn the_usual_shape_is_always_read(
            key in "[ -!#-\\[\\]-~]{0,80}",
            ws in prop::collection::vec("[ \t\r\n]{0,2}", 6),
        ) {
            let body = format!(
                "{}{{{}\"key\"{}:{}\"{key}\"{}}}{}",
                ws[0], ws[1], ws[2], ws[3], ws[4], ws[5]
            );
            let fast = VerifyRequest::parse_key_only(body.as_bytes()).map(|v| v.key);
            prop_assert!(fast.is_some(), "{:?}", body);
            prop_assert_eq!(fast, serde_key_only(body.as_bytes()));
        }
    }
}
