//! The error body every failing response carries, and the one table of error codes.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

macro_rules! error_codes {
    ($( $variant:ident = ($code:literal, $status:literal, $msg:literal), )*) => {
        /// Every error code the API answers with (API.md §8), with its HTTP status and default
        /// message. This is the only place they are defined.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum ErrorCode { $( $variant, )* }

        impl ErrorCode {
            /// All codes, in table order.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )* ];

            /// The code as it appears on the wire.
            pub fn as_str(&self) -> &'static str {
                match self { $( ErrorCode::$variant => $code, )* }
            }

            /// The HTTP status the code is answered with.
            pub fn status(&self) -> u16 {
                match self { $( ErrorCode::$variant => $status, )* }
            }

            /// The default human-readable message.
            pub fn default_message(&self) -> &'static str {
                match self { $( ErrorCode::$variant => $msg, )* }
            }

            /// Looks a wire code up.
            pub fn parse(s: &str) -> Option<ErrorCode> {
                match s { $( $code => Some(ErrorCode::$variant), )* _ => None }
            }
        }
    };
}

error_codes! {
    ValidationError = ("VALIDATION_ERROR", 400, "The request is invalid"),
    ScopeNarrowingNotSupported = ("SCOPE_NARROWING_NOT_SUPPORTED", 400, "An agent's scopes can only be broadened"),
    ScopeNotSubset = ("SCOPE_NOT_SUBSET", 400, "The requested scopes are not a subset of the caller's"),
    CidrNotSubset = ("CIDR_NOT_SUBSET", 400, "The requested IP allowlist is not within the caller's"),
    ConstraintNotNarrowing = ("CONSTRAINT_NOT_NARROWING", 400, "Constraints may only narrow the key's scopes"),
    DerivedKeyNotRotatable = ("DERIVED_KEY_NOT_ROTATABLE", 400, "Derived keys cannot be rotated"),
    MeRequiresAgentKey = ("ME_REQUIRES_AGENT_KEY", 400, "This endpoint requires an agent key"),
    MissingCredentials = ("MISSING_CREDENTIALS", 401, "No API key was provided"),
    InvalidApiKey = ("INVALID_API_KEY", 401, "The provided API key is invalid"),
    ExpiredApiKey = ("EXPIRED_API_KEY", 401, "The provided API key has expired"),
    RevokedApiKey = ("REVOKED_API_KEY", 401, "The provided API key has been revoked"),
    SignatureInvalid = ("SIGNATURE_INVALID", 401, "The request signature is missing or invalid"),
    SignatureExpired = ("SIGNATURE_EXPIRED", 401, "The request signature timestamp is outside the allowed window"),
    SignatureReplayed = ("SIGNATURE_REPLAYED", 401, "The request signature has already been used"),
    NotAMember = ("NOT_A_MEMBER", 403, "The credential does not belong to this organization"),
    InsufficientScope = ("INSUFFICIENT_SCOPE", 403, "The API key lacks a required scope"),
    IpNotAllowed = ("IP_NOT_ALLOWED", 403, "The client IP address is not in the key's allowlist"),
    AgentPaused = ("AGENT_PAUSED", 403, "The agent is paused"),
    PolicyDenied = ("POLICY_DENIED", 403, "The request was denied by a policy rule"),
    AgentCannotMintSubagents = ("AGENT_CANNOT_MINT_SUBAGENTS", 403, "Agent keys cannot create agents unless the agent's policy allows sub-agents"),
    NotFound = ("NOT_FOUND", 404, "The requested resource was not found"),
    AgentNotFound = ("AGENT_NOT_FOUND", 404, "The agent was not found"),
    KeyNotFound = ("KEY_NOT_FOUND", 404, "The key was not found"),
    MethodNotAllowed = ("METHOD_NOT_ALLOWED", 405, "The method is not allowed on this path"),
    AgentNameExists = ("AGENT_NAME_EXISTS", 409, "An agent with this name already exists"),
    AgentRevoked = ("AGENT_REVOKED", 409, "The agent has been revoked"),
    KeyAlreadyRevoked = ("KEY_ALREADY_REVOKED", 409, "The key has already been revoked"),
    LastActiveKey = ("LAST_ACTIVE_KEY", 409, "Revoking this key would leave the agent without an active key; pass force=true to do it anyway"),
    IdempotencyKeyAgentRevoked = ("IDEMPOTENCY_KEY_AGENT_REVOKED", 409, "The agent of the original request has since been revoked"),
    IdempotencyKeyAgentInactive = ("IDEMPOTENCY_KEY_AGENT_INACTIVE", 409, "The agent of the original request is no longer active"),
    PayloadTooLarge = ("PAYLOAD_TOO_LARGE", 413, "The request body exceeds 1 MiB"),
    UnsupportedMediaType = ("UNSUPPORTED_MEDIA_TYPE", 415, "The request body must be application/json"),
    IdempotencyKeyBodyMismatch = ("IDEMPOTENCY_KEY_BODY_MISMATCH", 422, "The Idempotency-Key was already used with a different request body"),
    RateLimited = ("RATE_LIMITED", 429, "Rate limit exceeded"),
    QuotaExceeded = ("QUOTA_EXCEEDED", 429, "Quota exceeded"),
    Internal = ("INTERNAL", 500, "An internal error occurred"),
    StoreUnavailable = ("STORE_UNAVAILABLE", 503, "The store is unavailable"),
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error response body: `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

/// The inside of an error response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Machine-readable code from the table in API.md §8.
    pub code: ErrorCode,
    /// Human-readable message.
    pub message: String,
    /// The HTTP status, repeated.
    pub status: u16,
    /// The request id (`X-Request-Id`).
    pub request_id: String,
    /// Machine-readable specifics, e.g. the field that failed.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
    /// Seconds to wait, on `RATE_LIMITED` and `QUOTA_EXCEEDED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_round_trips_through_its_wire_name() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(c.as_str()), Some(*c));
            let json = serde_json::to_string(c).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
    }

    #[test]
    fn statuses_match_the_contract_table() {
        assert_eq!(ErrorCode::InvalidApiKey.status(), 401);
        assert_eq!(ErrorCode::NotAMember.status(), 403);
        assert_eq!(ErrorCode::LastActiveKey.status(), 409);
        assert_eq!(ErrorCode::IdempotencyKeyBodyMismatch.status(), 422);
        assert_eq!(ErrorCode::StoreUnavailable.status(), 503);
    }
}
