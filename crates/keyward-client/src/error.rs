//! The SDK's one error type: a variant for every error code of API.md §8, plus the failures that
//! happen before or after the server answers (transport, decoding, configuration).
//!
//! The API variants are generated from one list below, and the conversion from the wire code is
//! an exhaustive `match` over [`ErrorCode`]: a code added to the proto table without a variant
//! here does not compile.

use std::fmt;
use std::time::Duration;

use keyward_proto::ErrorCode;
use serde::Deserialize;

/// What the server said about a failed call; every API variant of [`Error`] carries one.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// The HTTP status (repeated inside the error body by the server).
    pub status: u16,
    /// The human-readable message.
    pub message: String,
    /// The request id (`X-Request-Id`), to quote when asking an operator about the call.
    pub request_id: String,
    /// Machine-readable specifics, e.g. `{"field": "name"}` or `{"required": ["keys:derive"]}`.
    pub details: serde_json::Value,
}

macro_rules! api_errors {
    ($( $(#[$doc:meta])* $variant:ident, )*) => {
        /// Everything that can go wrong in a call.
        ///
        /// Each error code of the API has its own variant (named like the code: `AGENT_NAME_EXISTS`
        /// is [`Error::AgentNameExists`]) carrying the server's [`ApiError`]; the two `429` codes
        /// also carry `retry_after`. [`Error::code`] gives the wire code of any of them, so
        /// callers can match on variants or compare codes, whichever reads better.
        #[derive(Debug)]
        #[non_exhaustive]
        pub enum Error {
            $( $(#[$doc])* $variant(ApiError), )*
            /// `429 RATE_LIMITED`: the key's rate limit is exhausted; try again after
            /// `retry_after` seconds. The SDK already retried calls that are safe to repeat.
            RateLimited {
                /// Seconds until a request will be accepted again (at least 1).
                retry_after: u64,
                /// What the server said.
                error: ApiError,
            },
            /// `429 QUOTA_EXCEEDED`: the key's quota for this period is used up; it resets in
            /// `retry_after` seconds.
            QuotaExceeded {
                /// Seconds until the quota period resets.
                retry_after: u64,
                /// What the server said.
                error: ApiError,
            },
            /// An error code this version of the SDK does not know (a newer server).
            UnknownCode {
                /// The code as the server sent it.
                code: String,
                /// What the server said.
                error: ApiError,
            },
            /// The request did not complete (connection refused, timeout, TLS ...).
            Transport(reqwest::Error),
            /// The answer was not what the contract promises (not JSON, or not the expected shape).
            Decode {
                /// The HTTP status of the answer.
                status: u16,
                /// What did not decode (the start of the body, or the decoder's message).
                message: String,
            },
            /// The client was configured or called wrongly (missing URL or key, bad org id,
            /// malformed trace context or constraints); nothing was sent.
            Config(String),
        }

        impl Error {
            /// The API error code, when the server answered with one this SDK knows.
            pub fn code(&self) -> Option<ErrorCode> {
                match self {
                    $( Error::$variant(_) => Some(ErrorCode::$variant), )*
                    Error::RateLimited { .. } => Some(ErrorCode::RateLimited),
                    Error::QuotaExceeded { .. } => Some(ErrorCode::QuotaExceeded),
                    Error::UnknownCode { .. }
                    | Error::Transport(_)
                    | Error::Decode { .. }
                    | Error::Config(_) => None,
                }
            }

            /// What the server said, for any error the server answered with.
            pub fn api(&self) -> Option<&ApiError> {
                match self {
                    $( Error::$variant(e) => Some(e), )*
                    Error::RateLimited { error, .. }
                    | Error::QuotaExceeded { error, .. }
                    | Error::UnknownCode { error, .. } => Some(error),
                    Error::Transport(_) | Error::Decode { .. } | Error::Config(_) => None,
                }
            }

            /// Builds the variant for a wire code. The `match` is exhaustive on purpose.
            pub(crate) fn from_code(code: ErrorCode, error: ApiError, retry_after: Option<u64>) -> Error {
                match code {
                    $( ErrorCode::$variant => Error::$variant(error), )*
                    ErrorCode::RateLimited => Error::RateLimited {
                        retry_after: retry_after.unwrap_or(1),
                        error,
                    },
                    ErrorCode::QuotaExceeded => Error::QuotaExceeded {
                        retry_after: retry_after.unwrap_or(1),
                        error,
                    },
                }
            }
        }
    };
}

api_errors! {
    /// `400 VALIDATION_ERROR`: the request is invalid; `details` names the field.
    ValidationError,
    /// `400 SCOPE_NARROWING_NOT_SUPPORTED`: an agent's scopes can only be broadened.
    ScopeNarrowingNotSupported,
    /// `400 SCOPE_NOT_SUBSET`: the requested scopes are not within the caller's.
    ScopeNotSubset,
    /// `400 CIDR_NOT_SUBSET`: the requested IP allowlist is not within the caller's.
    CidrNotSubset,
    /// `400 CONSTRAINT_NOT_NARROWING`: constraints asked for scopes the key does not have.
    ConstraintNotNarrowing,
    /// `400 DERIVED_KEY_NOT_ROTATABLE`: derived keys cannot be rotated.
    DerivedKeyNotRotatable,
    /// `400 ME_REQUIRES_AGENT_KEY`: `me()` needs an agent (or derived) key, not a root key.
    MeRequiresAgentKey,
    /// `401 MISSING_CREDENTIALS`: no key was sent.
    MissingCredentials,
    /// `401 INVALID_API_KEY`: the key is malformed or unknown.
    InvalidApiKey,
    /// `401 EXPIRED_API_KEY`: the key has expired.
    ExpiredApiKey,
    /// `401 REVOKED_API_KEY`: the key (or its agent) has been revoked.
    RevokedApiKey,
    /// `401 SIGNATURE_INVALID`: the key requires signed requests and the signature is missing or
    /// wrong.
    SignatureInvalid,
    /// `401 SIGNATURE_EXPIRED`: the signature's timestamp is more than 300 s off.
    SignatureExpired,
    /// `401 SIGNATURE_REPLAYED`: the same signature was seen before.
    SignatureReplayed,
    /// `403 NOT_A_MEMBER`: the key belongs to another org.
    NotAMember,
    /// `403 INSUFFICIENT_SCOPE`: the key lacks a scope; `details.required` lists it.
    InsufficientScope,
    /// `403 IP_NOT_ALLOWED`: the client address is outside the key's allowlist.
    IpNotAllowed,
    /// `403 AGENT_PAUSED`: the key's agent is paused.
    AgentPaused,
    /// `403 POLICY_DENIED`: a deny rule (org, agent or constraints) matched the request.
    PolicyDenied,
    /// `403 AGENT_CANNOT_MINT_SUBAGENTS`: an agent key tried to create an agent.
    AgentCannotMintSubagents,
    /// `404 NOT_FOUND`: no such path or resource.
    NotFound,
    /// `404 AGENT_NOT_FOUND`: no such agent in the org.
    AgentNotFound,
    /// `404 KEY_NOT_FOUND`: no such key in the org.
    KeyNotFound,
    /// `405 METHOD_NOT_ALLOWED`: the path exists but not with this method.
    MethodNotAllowed,
    /// `409 AGENT_NAME_EXISTS`: a live agent of the org already has this name.
    AgentNameExists,
    /// `409 AGENT_REVOKED`: the agent has been deleted (tombstoned).
    AgentRevoked,
    /// `409 KEY_ALREADY_REVOKED`: the key has already been revoked.
    KeyAlreadyRevoked,
    /// `409 LAST_ACTIVE_KEY`: revoking would leave the agent without an active key; pass
    /// `force` to do it anyway.
    LastActiveKey,
    /// `409 IDEMPOTENCY_KEY_AGENT_REVOKED`: a replayed request's agent has since been revoked.
    IdempotencyKeyAgentRevoked,
    /// `409 IDEMPOTENCY_KEY_AGENT_INACTIVE`: a replayed request's agent has since been paused.
    IdempotencyKeyAgentInactive,
    /// `413 PAYLOAD_TOO_LARGE`: the body exceeds 1 MiB.
    PayloadTooLarge,
    /// `415 UNSUPPORTED_MEDIA_TYPE`: the body is not JSON.
    UnsupportedMediaType,
    /// `422 IDEMPOTENCY_KEY_BODY_MISMATCH`: the `Idempotency-Key` was used with another body.
    IdempotencyKeyBodyMismatch,
    /// `500 INTERNAL`: the server failed; the request id finds the cause in its logs.
    Internal,
    /// `503 STORE_UNAVAILABLE`: the server's database does not answer (retried for calls that
    /// are safe to repeat).
    StoreUnavailable,
}

impl Error {
    /// The HTTP status, for any error the server answered with.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Decode { status, .. } => Some(*status),
            other => other.api().map(|e| e.status),
        }
    }

    /// The request id, for any error the server answered with.
    pub fn request_id(&self) -> Option<&str> {
        self.api().map(|e| e.request_id.as_str())
    }

    /// How long the server asked to wait, for `RATE_LIMITED` and `QUOTA_EXCEEDED`.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::RateLimited { retry_after, .. } | Error::QuotaExceeded { retry_after, .. } => {
                Some(Duration::from_secs(*retry_after))
            }
            _ => None,
        }
    }

    /// The wire code as text, including codes this SDK does not know.
    pub fn code_str(&self) -> Option<&str> {
        match self {
            Error::UnknownCode { code, .. } => Some(code),
            other => other.code().map(|c| c.as_str()),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Transport(e) => write!(f, "transport error: {e}"),
            Error::Decode { status, message } => {
                write!(f, "could not decode the response ({status}): {message}")
            }
            Error::Config(m) => write!(f, "configuration error: {m}"),
            other => {
                let code = other.code_str().unwrap_or("UNKNOWN");
                match other.api() {
                    Some(e) => write!(f, "{code} ({}): {}", e.status, e.message),
                    None => f.write_str(code),
                }
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Transport(e) => Some(e),
            _ => None,
        }
    }
}

impl From<reqwest::Error> for Error {
    fn from(e: reqwest::Error) -> Error {
        Error::Transport(e)
    }
}

/// The error body as received: the code is kept as text so that a code this SDK does not know
/// still decodes (into [`Error::UnknownCode`]) instead of failing as a decode error.
#[derive(Deserialize)]
struct WireErrorBody {
    error: WireError,
}

#[derive(Deserialize)]
struct WireError {
    code: String,
    #[serde(default)]
    message: String,
    status: Option<u16>,
    #[serde(default)]
    request_id: String,
    #[serde(default)]
    details: serde_json::Value,
    retry_after: Option<u64>,
}

/// Turns a failed answer (status and body) into the matching [`Error`].
pub(crate) fn from_response(status: u16, body: &[u8], retry_after_header: Option<u64>) -> Error {
    match serde_json::from_slice::<WireErrorBody>(body) {
        Ok(w) => {
            let e = w.error;
            let api = ApiError {
                status: e.status.unwrap_or(status),
                message: e.message,
                request_id: e.request_id,
                details: e.details,
            };
            let retry_after = e.retry_after.or(retry_after_header);
            match ErrorCode::parse(&e.code) {
                Some(code) => Error::from_code(code, api, retry_after),
                None => Error::UnknownCode {
                    code: e.code,
                    error: api,
                },
            }
        }
        Err(_) => Error::Decode {
            status,
            message: String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> ApiError {
        ApiError {
            status: 400,
            message: "m".into(),
            request_id: "req_1".into(),
            details: serde_json::json!({}),
        }
    }

    #[test]
    fn every_code_maps_to_a_variant_that_reports_the_same_code() {
        for code in ErrorCode::ALL {
            let e = Error::from_code(*code, api(), Some(3));
            assert_eq!(e.code(), Some(*code));
            assert_eq!(e.code_str(), Some(code.as_str()));
            assert!(e.api().is_some());
            assert!(e.to_string().starts_with(code.as_str()));
        }
    }

    #[test]
    fn rate_limited_keeps_retry_after_from_the_body_or_the_header() {
        let body = br#"{"error": {"code": "RATE_LIMITED", "message": "slow down", "status": 429,
            "request_id": "req_x", "details": {}, "retry_after": 7}}"#;
        let e = from_response(429, body, Some(2));
        assert!(matches!(e, Error::RateLimited { retry_after: 7, .. }));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        let body = br#"{"error": {"code": "QUOTA_EXCEEDED", "message": "q", "status": 429,
            "request_id": "req_x", "details": {}}}"#;
        assert!(matches!(
            from_response(429, body, Some(2)),
            Error::QuotaExceeded { retry_after: 2, .. }
        ));
    }

    #[test]
    fn an_unknown_code_and_a_non_json_body_are_told_apart() {
        let body = br#"{"error": {"code": "SOMETHING_NEW", "message": "m", "status": 418,
            "request_id": "req_x", "details": {}}}"#;
        let e = from_response(418, body, None);
        assert_eq!(e.code(), None);
        assert_eq!(e.code_str(), Some("SOMETHING_NEW"));
        assert_eq!(e.status(), Some(418));
        let e = from_response(502, b"<html>bad gateway</html>", None);
        assert!(matches!(e, Error::Decode { status: 502, .. }));
    }
}
