//! Extractors that answer bad input in the contract's error shape instead of axum's plain text:
//! JSON bodies (415, 413, 400 with the failing field), path ids and query strings.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use keyward_proto::ErrorCode;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::error::ApiError;

/// A JSON body that rejects unknown fields (the types say so) and answers every failure in shape.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        json_body(req).await.map(ApiJson)
    }
}

/// Reads a JSON body as axum's `Json` extractor would (content type, 1 MiB limit, then the
/// value), answering every failure in the error shape. The value is parsed with plain
/// `serde_json` first; only a body that fails is parsed again through axum, whose error names the
/// path of the field that failed (tracking that path costs every request otherwise).
///
/// Not an `async fn`: the headers are judged before the future is made, so the future holds the
/// body alone rather than the whole request (futures are copied whole as they are created and
/// again into each one that awaits them; this one sits in every verification's).
pub fn json_body<T: DeserializeOwned>(
    req: Request,
) -> impl std::future::Future<Output = Result<T, ApiError>> + Send {
    json_body_or(req, |_| None)
}

/// [`json_body`], with `fast` tried first: a parser for the body a hot route almost always gets,
/// answering `None` for any other (which is then parsed as `json_body` parses it).
pub fn json_body_or<T: DeserializeOwned>(
    req: Request,
    fast: fn(&[u8]) -> Option<T>,
) -> impl std::future::Future<Output = Result<T, ApiError>> + Send {
    let json = is_json(req.headers());
    let body = req.into_body();
    async move {
        if !json {
            return Err(ApiError::new(ErrorCode::UnsupportedMediaType));
        }
        let bytes = read_body(body).await?;
        if let Some(v) = fast(&bytes) {
            return Ok(v);
        }
        match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(v),
            Err(_) => match axum::Json::<T>::from_bytes(&bytes) {
                Ok(axum::Json(v)) => Ok(v),
                Err(rej) => Err(json_rejection(rej)),
            },
        }
    }
}

/// Reads a whole request body, at most 1 MiB (`413 PAYLOAD_TOO_LARGE` beyond).
///
/// Unlike `axum::body::to_bytes`, it stops as soon as the body says it has ended (a
/// `Content-Length` body whose bytes have all arrived) instead of polling once more for the end
/// of the stream. hyper only reports that end on its connection task's next turn, so that extra
/// poll parked every request with a body in the runtime's queue mid-request; when that worker
/// thread was then descheduled, the request waited out the kernel's time slice (4 ms here, for
/// 2-3% of verifications under load).
pub async fn read_body(mut body: axum::body::Body) -> Result<axum::body::Bytes, ApiError> {
    use http_body_util::BodyExt;
    let unreadable =
        || ApiError::new(ErrorCode::ValidationError).msg("could not read the request body");
    let mut first: Option<axum::body::Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    let mut len = 0usize;
    while !axum::body::HttpBody::is_end_stream(&body) {
        let Some(frame) = body.frame().await else {
            break;
        };
        let Ok(data) = frame.map_err(|_| unreadable())?.into_data() else {
            // Trailers carry nothing a JSON body needs.
            continue;
        };
        len += data.len();
        if len > crate::MAX_BODY_BYTES {
            return Err(ApiError::new(ErrorCode::PayloadTooLarge));
        }
        match &first {
            // Almost every body arrives in one piece: keep it without copying.
            None if rest.is_empty() => first = Some(data),
            _ => {
                if let Some(f) = first.take() {
                    rest.extend_from_slice(&f);
                }
                rest.extend_from_slice(&data);
            }
        }
    }
    Ok(first.unwrap_or_else(|| rest.into()))
}

/// Whether the content type is JSON, exactly as axum's `Json` judges it (`application/json` or
/// `application/*+json`, by the `mime` crate's parse), with the plain `application/json` that
/// nearly every client sends recognised without building a `Mime`.
fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(ct) = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    if ct == "application/json" {
        return true;
    }
    let Ok(m) = ct.parse::<mime::Mime>() else {
        return false;
    };
    m.type_() == "application" && (m.subtype() == "json" || m.suffix().is_some_and(|s| s == "json"))
}

fn json_rejection(rej: JsonRejection) -> ApiError {
    match rej {
        JsonRejection::MissingJsonContentType(_) => ApiError::new(ErrorCode::UnsupportedMediaType),
        JsonRejection::JsonDataError(e) => {
            let msg = e.body_text();
            ApiError::new(ErrorCode::ValidationError)
                .msg(format!("invalid request body: {}", clean(&msg)))
                .details(json!({ "reason": clean(&msg) }))
        }
        JsonRejection::JsonSyntaxError(e) => ApiError::new(ErrorCode::ValidationError)
            .msg(format!("malformed JSON: {}", clean(&e.body_text())))
            .details(json!({ "reason": "malformed JSON" })),
        JsonRejection::BytesRejection(e) => {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(ErrorCode::PayloadTooLarge)
            } else {
                ApiError::new(ErrorCode::ValidationError).msg("could not read the request body")
            }
        }
        other => ApiError::new(ErrorCode::ValidationError).msg(clean(&other.body_text())),
    }
}

/// Strips axum's generic prefixes so the message names the problem itself.
fn clean(s: &str) -> String {
    for prefix in [
        "Failed to deserialize the JSON body into the target type: ",
        "Failed to parse the request body as JSON: ",
        "Failed to deserialize query string: ",
        "Invalid URL: ",
    ] {
        if let Some(rest) = s.strip_prefix(prefix) {
            return rest.to_string();
        }
    }
    s.to_string()
}

/// Path parameters; a malformed id is a `400 VALIDATION_ERROR`.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(rej) => Err(path_rejection(rej)),
        }
    }
}

fn path_rejection(rej: PathRejection) -> ApiError {
    ApiError::new(ErrorCode::ValidationError)
        .msg(format!(
            "invalid path parameter: {}",
            clean(&rej.body_text())
        ))
        .details(json!({ "reason": "malformed id in path" }))
}

/// Query parameters; unknown or malformed ones are a `400 VALIDATION_ERROR`.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(rej) => Err(query_rejection(rej)),
        }
    }
}

fn query_rejection(rej: QueryRejection) -> ApiError {
    let msg = clean(&rej.body_text());
    ApiError::new(ErrorCode::ValidationError)
        .msg(format!("invalid query string: {msg}"))
        .details(json!({ "reason": msg }))
}

/// An optional JSON body: empty means `T::default()`; anything else must be valid JSON.
pub struct ApiJsonOrEmpty<T>(pub T);

impl<S, T> FromRequest<S> for ApiJsonOrEmpty<T>
where
    T: DeserializeOwned + Default,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        // The same content-type rule as `ApiJson`'s.
        let is_json = is_json(req.headers());
        let bytes = match axum::body::Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(rej) if rej.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(ApiError::new(ErrorCode::PayloadTooLarge))
            }
            Err(_) => {
                return Err(ApiError::new(ErrorCode::ValidationError)
                    .msg("could not read the request body"))
            }
        };
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(ApiJsonOrEmpty(T::default()));
        }
        if !is_json {
            return Err(ApiError::new(ErrorCode::UnsupportedMediaType));
        }
        serde_json::from_slice(&bytes)
            .map(ApiJsonOrEmpty)
            .map_err(|e| {
                ApiError::new(ErrorCode::ValidationError)
                    .msg(format!("invalid request body: {e}"))
                    .details(json!({ "reason": e.to_string() }))
            })
    }
}

/// An optional RFC 3339 timestamp from a query parameter; a malformed one is a
/// `400 VALIDATION_ERROR` naming the parameter.
pub fn query_time(
    field: &str,
    v: &Option<String>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, ApiError> {
    v.as_deref()
        .map(|s| {
            chrono::DateTime::parse_from_rfc3339(s)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|_| ApiError::validation(field, "must be an RFC 3339 timestamp"))
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cheap check must agree with axum's own `Json` extractor, case by case.
    #[tokio::test]
    async fn json_content_types_are_recognised_as_axum_recognises_them() {
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "application/json;charset=utf-8",
            "application/json ;charset=utf-8",
            "application/json; charset",
            "application/cloudevents+json",
            "Application/JSON",
            "application/vnd.api+json",
            "application/problem+JSON",
            "text/plain",
            "application/x-www-form-urlencoded",
            "application/jsonx",
            "application/json garbage",
            "application",
            "json",
            "text/json",
            "",
        ] {
            let req = || {
                Request::builder()
                    .header(axum::http::header::CONTENT_TYPE, ct)
                    .body(axum::body::Body::from("{}"))
                    .unwrap_or_default()
            };
            let axum_says = !matches!(
                axum::Json::<serde_json::Value>::from_request(req(), &()).await,
                Err(JsonRejection::MissingJsonContentType(_))
            );
            assert_eq!(is_json(req().headers()), axum_says, "{ct:?}");
        }
        assert!(!is_json(&axum::http::HeaderMap::new()));
    }
}
