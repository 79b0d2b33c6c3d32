//! `ApiError`: the one error type handlers return, rendered in the contract's error shape.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use keyward_proto::{ErrorBody, ErrorCode, ErrorDetail};
use keyward_store::StoreError;
use serde_json::{json, Value};

use crate::request_id;

/// An API error: a code from the table, a message, and machine-readable details.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub details: Value,
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with the code's default message.
    pub fn new(code: ErrorCode) -> ApiError {
        ApiError {
            code,
            message: code.default_message().to_string(),
            details: json!({}),
            retry_after: None,
        }
    }

    /// Replaces the message.
    pub fn msg(mut self, message: impl Into<String>) -> ApiError {
        self.message = message.into();
        self
    }

    /// Replaces the details.
    pub fn details(mut self, details: Value) -> ApiError {
        self.details = details;
        self
    }

    /// A `VALIDATION_ERROR` naming the field that failed.
    pub fn validation(field: &str, message: impl Into<String>) -> ApiError {
        let message = message.into();
        ApiError::new(ErrorCode::ValidationError)
            .msg(format!("{field}: {message}"))
            .details(json!({ "field": field, "reason": message }))
    }

    /// An internal error: the cause is logged, never answered.
    pub fn internal(cause: impl std::fmt::Display) -> ApiError {
        tracing::error!(error = %cause, "internal error");
        ApiError::new(ErrorCode::Internal)
    }
}

impl From<keyward_core::validate::ValidationError> for ApiError {
    fn from(e: keyward_core::validate::ValidationError) -> ApiError {
        ApiError::validation(&e.field, e.message)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::AgentNameExists => ApiError::new(ErrorCode::AgentNameExists),
            StoreError::AgentRevoked => ApiError::new(ErrorCode::AgentRevoked),
            StoreError::KeyAlreadyRevoked => ApiError::new(ErrorCode::KeyAlreadyRevoked),
            StoreError::LastActiveKey => ApiError::new(ErrorCode::LastActiveKey),
            StoreError::NotFound => ApiError::new(ErrorCode::NotFound),
            StoreError::OrgNameExists => {
                ApiError::validation("name", "an org with this name already exists")
            }
            StoreError::Unavailable(cause) => {
                tracing::error!(error = %cause, "store unavailable");
                ApiError::new(ErrorCode::StoreUnavailable)
            }
            other => ApiError::internal(other),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                status: self.code.status(),
                request_id: request_id::current().to_string(),
                details: self.details,
                retry_after: self.retry_after,
            },
        };
        let mut resp = (status, axum::Json(body)).into_response();
        // The code travels with the response so middleware can audit denials made by handlers.
        resp.extensions_mut().insert(self.code);
        if let Some(secs) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                resp.headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
