//! The domain records Keyward keeps: orgs, agents, keys, audit events and idempotency records.
//!
//! These are plain data with validated parts; the store persists them and the proto crate renders
//! them on the wire. Limits and policies are typed here so that every layer agrees on their shape.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::scope::{ProviderScopes, Scope};
use crate::token::{Environment, TokenDigest, TokenKind};
use crate::validate::ValidationError;

/// A point in time, always UTC; the API renders it with millisecond precision.
pub type Timestamp = DateTime<Utc>;

/// A JSON object, as kept for metadata and free-form policy keys.
pub type JsonObject = Map<String, Value>;

/// The largest serialized size of an agent's or key's `metadata`.
pub const MAX_METADATA_BYTES: usize = 16 * 1024;

/// Default ceiling, in seconds, on a derived key's lifetime.
pub const DEFAULT_MAX_KEY_TTL_S: u64 = 86_400;

/// A rate limit as configured on a key or as the org default: a named tier of the org's policy,
/// or explicit numbers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RateLimit {
    /// Use the org's tier of this name.
    Tier { tier: String },
    /// `limit` requests per `period_s` seconds sustained, `burst` at once.
    Custom(RateLimitSpec),
}

/// Explicit rate-limit numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub limit: u64,
    pub period_s: u64,
    pub burst: u64,
}

impl RateLimitSpec {
    /// Checks that the numbers describe a usable limit.
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        if self.limit == 0 || self.limit > 1_000_000_000 {
            return Err(ValidationError::new(
                field,
                "rate_limit.limit must be between 1 and 1000000000",
            ));
        }
        if self.period_s == 0 || self.period_s > 31 * 86_400 {
            return Err(ValidationError::new(
                field,
                "rate_limit.period_s must be between 1 and 2678400 (31 days)",
            ));
        }
        if self.burst == 0 || self.burst > 1_000_000_000 {
            return Err(ValidationError::new(
                field,
                "rate_limit.burst must be between 1 and 1000000000",
            ));
        }
        Ok(())
    }
}

impl RateLimit {
    /// Validates the limit against the org's tiers (a tier must exist).
    pub fn validate(&self, field: &str, policy: &OrgPolicy) -> Result<(), ValidationError> {
        match self {
            RateLimit::Tier { tier } => {
                if policy.rate_limit_tiers.contains_key(tier) {
                    Ok(())
                } else {
                    Err(ValidationError::new(
                        field,
                        format!("unknown rate limit tier `{tier}`"),
                    ))
                }
            }
            RateLimit::Custom(spec) => spec.validate(field),
        }
    }
}

/// The calendar period a quota counts over (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuotaPeriod {
    Hour,
    Day,
    Month,
}

/// A hard cap on successful uses per calendar period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quota {
    pub limit: u64,
    pub period: QuotaPeriod,
}

impl Quota {
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        if self.limit == 0 || self.limit > 1_000_000_000_000 {
            return Err(ValidationError::new(
                field,
                "quota.limit must be between 1 and 1000000000000",
            ));
        }
        Ok(())
    }
}

/// Checks a list of alert thresholds: percentages 1..=100, at most 10, no duplicates.
pub fn validate_alert_thresholds(field: &str, t: &[u8]) -> Result<(), ValidationError> {
    if t.len() > 10 {
        return Err(ValidationError::new(
            field,
            "at most 10 alert thresholds are allowed",
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for v in t {
        if *v == 0 || *v > 100 {
            return Err(ValidationError::new(
                field,
                "alert thresholds are percentages between 1 and 100",
            ));
        }
        if !seen.insert(*v) {
            return Err(ValidationError::new(
                field,
                "alert thresholds must be unique",
            ));
        }
    }
    Ok(())
}

/// A deny rule (API.md §6.4). Rules can only deny; nothing widens access.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub rule_type: String,
    pub rule_body: RuleBody,
}

/// The body of a `json_match` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleBody {
    pub when: BTreeMap<String, OneOrMany>,
    pub effect: String,
}

/// A rule attribute's value: one string or a list that matches any member.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// The attributes a rule may name.
pub const RULE_ATTRS: [&str; 8] = [
    "method",
    "provider_id",
    "app_id",
    "agent_id",
    "api_key_id",
    "environment",
    "client_ip",
    "resource_kind",
];

impl Rule {
    /// Checks the rule's shape: `json_match`, `deny`, known attributes, non-empty values.
    pub fn validate(&self, field: &str) -> Result<(), ValidationError> {
        if self.rule_type != "json_match" {
            return Err(ValidationError::new(
                field,
                "rule_type must be `json_match`",
            ));
        }
        if self.rule_body.effect != "deny" {
            return Err(ValidationError::new(
                field,
                "rule_body.effect must be `deny` (rules can only deny)",
            ));
        }
        if self.rule_body.when.is_empty() {
            return Err(ValidationError::new(
                field,
                "rule_body.when must name at least one attribute",
            ));
        }
        for (attr, v) in &self.rule_body.when {
            if !RULE_ATTRS.contains(&attr.as_str()) {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "unknown rule attribute `{attr}`; expected one of {}",
                        RULE_ATTRS.join(", ")
                    ),
                ));
            }
            let values: Vec<&String> = match v {
                OneOrMany::One(s) => vec![s],
                OneOrMany::Many(list) => list.iter().collect(),
            };
            if values.is_empty() || values.iter().any(|s| s.is_empty() || s.len() > 256) {
                return Err(ValidationError::new(
                    field,
                    format!(
                        "rule attribute `{attr}` needs non-empty values of at most 256 characters"
                    ),
                ));
            }
            if attr == "client_ip" {
                let owned: Vec<String> = values.iter().map(|s| (*s).clone()).collect();
                crate::cidr::parse_allowlist(&owned)
                    .map_err(|e| ValidationError::new(field, e.to_string()))?;
            }
        }
        Ok(())
    }
}

/// Validates a `policy` object's `rules` list (other keys are kept as given).
pub fn validate_policy_rules(
    field: &str,
    policy: &JsonObject,
) -> Result<Vec<Rule>, ValidationError> {
    match policy.get("rules") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(v) => {
            let rules: Vec<Rule> = serde_json::from_value(v.clone()).map_err(|e| {
                ValidationError::new(field, format!("policy.rules is not a list of rules: {e}"))
            })?;
            if rules.len() > 100 {
                return Err(ValidationError::new(field, "at most 100 rules are allowed"));
            }
            for (i, r) in rules.iter().enumerate() {
                r.validate(&format!("{field}.rules[{i}]"))?;
            }
            Ok(rules)
        }
    }
}

/// An org's policy (API.md §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgPolicy {
    #[serde(default = "default_max_key_ttl")]
    pub max_key_ttl_s: u64,
    #[serde(default = "default_tiers")]
    pub rate_limit_tiers: BTreeMap<String, RateLimitSpec>,
    #[serde(default)]
    pub default_rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub rules: Vec<Rule>,
}

fn default_max_key_ttl() -> u64 {
    DEFAULT_MAX_KEY_TTL_S
}

fn default_tiers() -> BTreeMap<String, RateLimitSpec> {
    let mut t = BTreeMap::new();
    t.insert(
        "free".to_string(),
        RateLimitSpec {
            limit: 100,
            period_s: 3600,
            burst: 10,
        },
    );
    t.insert(
        "pro".to_string(),
        RateLimitSpec {
            limit: 1000,
            period_s: 3600,
            burst: 100,
        },
    );
    t
}

impl Default for OrgPolicy {
    fn default() -> Self {
        OrgPolicy {
            max_key_ttl_s: DEFAULT_MAX_KEY_TTL_S,
            rate_limit_tiers: default_tiers(),
            default_rate_limit: None,
            rules: Vec::new(),
        }
    }
}

impl OrgPolicy {
    /// Checks every part of the policy.
    pub fn validate(&self) -> Result<(), ValidationError> {
        if self.max_key_ttl_s == 0 || self.max_key_ttl_s > 365 * 86_400 {
            return Err(ValidationError::new(
                "policy.max_key_ttl_s",
                "max_key_ttl_s must be between 1 and 31536000 (one year)",
            ));
        }
        if self.rate_limit_tiers.len() > 64 {
            return Err(ValidationError::new(
                "policy.rate_limit_tiers",
                "at most 64 tiers are allowed",
            ));
        }
        for (name, spec) in &self.rate_limit_tiers {
            if crate::validate::agent_name(name).is_err() {
                return Err(ValidationError::new(
                    "policy.rate_limit_tiers",
                    format!("invalid tier name `{name}`"),
                ));
            }
            spec.validate(&format!("policy.rate_limit_tiers.{name}"))?;
        }
        if let Some(d) = &self.default_rate_limit {
            d.validate("policy.default_rate_limit", self)?;
        }
        for (i, r) in self.rules.iter().enumerate() {
            r.validate(&format!("policy.rules[{i}]"))?;
        }
        Ok(())
    }
}

/// An organization: the tenant every agent and key belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Org {
    pub id: Uuid,
    pub name: String,
    pub policy: OrgPolicy,
    pub created_at: Timestamp,
}

/// Whether an agent is a model-driven agent or a plain service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentType {
    Agent,
    Service,
}

impl AgentType {
    pub fn as_str(&self) -> &'static str {
        match self {
            AgentType::Agent => "agent",
            AgentType::Service => "service",
        }
    }
    pub fn parse(s: &str) -> Option<AgentType> {
        match s {
            "agent" => Some(AgentType::Agent),
            "service" => Some(AgentType::Service),
            _ => None,
        }
    }
}

/// An agent's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentStatus {
    Active,
    Paused,
    Revoked,
}

impl AgentStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            AgentStatus::Active => "active",
            AgentStatus::Paused => "paused",
            AgentStatus::Revoked => "revoked",
        }
    }
    pub fn parse(s: &str) -> Option<AgentStatus> {
        match s {
            "active" => Some(AgentStatus::Active),
            "paused" => Some(AgentStatus::Paused),
            "revoked" => Some(AgentStatus::Revoked),
            _ => None,
        }
    }
}

/// An agent: an identity that holds keys.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub id: Uuid,
    pub org_id: Uuid,
    pub name: String,
    pub display_name: Option<String>,
    pub agent_type: AgentType,
    pub status: AgentStatus,
    pub scopes: ProviderScopes,
    pub metadata: JsonObject,
    pub policy: JsonObject,
    pub capabilities: Vec<String>,
    pub did: Option<String>,
    pub owner_user_id: Option<Uuid>,
    pub parent_agent_id: Option<Uuid>,
    pub version: i64,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub revoked_at: Option<Timestamp>,
}

/// A key record. The plaintext is never here: only its digest and a display `start`.
///
/// Laid out in this order (`repr(C)`): what every verification of a cached key reads (the
/// digest, by the cache lookup; the ids, state, times, scopes, allowlist and quota, by the checks
/// and the answer) comes first, so that it shares as few cache lines as it can; with many keys
/// each verification's snapshot is a cache miss, one per line it touches. Then what only other
/// endpoints read. The order also packs the one-byte fields and the 17-byte optional ids
/// together, so the record stays 400 bytes (see the verify cache's snapshot size test).
#[derive(Debug, Clone, PartialEq)]
#[repr(C)]
pub struct Key {
    pub id: Uuid,
    pub digest: TokenDigest,
    pub org_id: Uuid,
    pub agent_id: Option<Uuid>,
    pub parent_key_id: Option<Uuid>,
    pub successor_key_id: Option<Uuid>,
    pub kind: TokenKind,
    pub environment: Environment,
    pub requires_signature: bool,
    pub expires_at: Option<Timestamp>,
    pub deprecated_at: Option<Timestamp>,
    pub revoked_at: Option<Timestamp>,
    pub scopes: crate::scope::Scopes,
    pub cidr_allowlist: Vec<IpNet>,
    pub quota: Option<Quota>,
    pub rate_limit: Option<RateLimit>,
    pub name: Option<String>,
    pub start: String,
    pub alert_thresholds: Vec<u8>,
    /// The signing secret, encrypted under the master key (nonce || ciphertext).
    pub signing_secret_enc: Option<Vec<u8>>,
    pub metadata: JsonObject,
    pub last_used_at: Option<Timestamp>,
    pub created_at: Timestamp,
}

impl Key {
    /// A new key of `kind` with a fresh token: the record (holding only the token's digest and
    /// display `start`) and the plaintext, to be shown once. Everything optional starts empty
    /// (no name, allowlist, limits, expiry or metadata); callers set what their request asks.
    pub fn mint(
        org_id: Uuid,
        agent_id: Option<Uuid>,
        kind: TokenKind,
        environment: Environment,
        scopes: Vec<Scope>,
        now: Timestamp,
    ) -> Result<(Key, crate::secret::Secret), crate::token::TokenError> {
        let plaintext = crate::token::generate(environment, kind)?;
        let key = Key {
            id: Uuid::now_v7(),
            org_id,
            agent_id,
            parent_key_id: None,
            kind,
            environment,
            name: None,
            start: crate::token::display_start(plaintext.expose()),
            digest: TokenDigest::of(plaintext.expose()),
            scopes: scopes.into(),
            cidr_allowlist: Vec::new(),
            rate_limit: None,
            quota: None,
            alert_thresholds: Vec::new(),
            requires_signature: false,
            signing_secret_enc: None,
            expires_at: None,
            deprecated_at: None,
            revoked_at: None,
            successor_key_id: None,
            last_used_at: None,
            created_at: now,
            metadata: JsonObject::new(),
        };
        Ok((key, plaintext))
    }

    /// Whether the key has passed its expiry at `now_ms` (Unix milliseconds, what the hot path
    /// reads the clock as).
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at
            .is_some_and(|e| e.timestamp_millis() <= now_ms)
    }
}

/// How an audited action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Success,
    Denied,
    Failure,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
            Outcome::Failure => "failure",
        }
    }
    pub fn parse(s: &str) -> Option<Outcome> {
        match s {
            "success" => Some(Outcome::Success),
            "denied" => Some(Outcome::Denied),
            "failure" => Some(Outcome::Failure),
            _ => None,
        }
    }
}

/// The agent trace context a request carried (API.md §7).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
    pub parent_agent: Option<String>,
    pub traceparent: Option<String>,
    pub meta: BTreeMap<String, String>,
}

/// One audit event: who did what to what, how it ended, and in which trace.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    pub id: Uuid,
    pub org_id: Uuid,
    pub occurred_at: Timestamp,
    pub action: String,
    pub outcome: Outcome,
    pub error_code: Option<String>,
    pub actor_key_id: Option<Uuid>,
    pub actor_agent_id: Option<Uuid>,
    pub target_type: Option<String>,
    pub target_id: Option<Uuid>,
    pub client_ip: Option<String>,
    pub request_id: Option<String>,
    pub trace: TraceContext,
    pub details: Value,
}

/// The stored outcome of a creating request made with an `Idempotency-Key`.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyRecord {
    pub org_id: Uuid,
    pub key: String,
    /// SHA-256 of the method, path and canonical JSON body.
    pub request_hash: [u8; 32],
    pub status: u16,
    /// The response body with every plaintext secret already set to `null`.
    pub response: Value,
    /// The agent the response concerns, so a replay can notice it was revoked or paused since.
    pub agent_id: Option<Uuid>,
    pub created_at: Timestamp,
}

/// Filters for listing audit events.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub action: Option<String>,
    pub agent_id: Option<Uuid>,
    pub key_id: Option<Uuid>,
    pub run_id: Option<String>,
    pub thread_id: Option<String>,
    pub outcome: Option<Outcome>,
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
}

/// Filters for listing an org's keys.
#[derive(Debug, Clone, Default)]
pub struct KeyFilter {
    pub agent_id: Option<Uuid>,
    pub kind: Option<TokenKind>,
    pub include_revoked: bool,
}

/// A page request: offset pagination.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub limit: u32,
    pub offset: u64,
}
