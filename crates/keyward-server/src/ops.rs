//! Operational endpoints without auth: health, readiness, Prometheus metrics, the OpenAPI
//! document and its browsable reference; plus the fallbacks that keep unknown routes and
//! methods in the error shape.

use std::sync::{OnceLock, RwLock};

use axum::extract::State;
use axum::http::{header, Method};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use keyward_proto::{self as proto, ErrorCode};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rustc_hash::FxHashMap;

use crate::error::ApiError;
use crate::AppState;
use serde_json::json;

/// `GET /healthz`: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = proto::Health)))]
pub async fn healthz() -> Json<proto::Health> {
    Json(proto::Health {
        status: "ok".into(),
    })
}

/// `GET /readyz`: the store answers and, on a store several nodes share, this node's caches are
/// in sync with the other nodes' writes (its change watch is live or was within the staleness
/// bound).
#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = proto::Health), (status = 503, body = proto::ErrorBody)))]
pub async fn readyz(State(state): State<AppState>) -> Response {
    if !state.cache.coherence.fresh() {
        tracing::warn!(
            lag_ms = state.cache.coherence.lag_ms(),
            "not ready: the change watch has been down for longer than the staleness bound"
        );
        return ApiError::new(ErrorCode::StoreUnavailable)
            .msg("not in sync with the other nodes: the store's change watch is down")
            .details(json!({ "stale_for_ms": state.cache.coherence.lag_ms() }))
            .into_response();
    }
    let ping = tokio::time::timeout(std::time::Duration::from_secs(1), state.store.ping())
        .await
        .unwrap_or_else(|_| {
            Err(keyward_store::StoreError::Unavailable(
                "the store did not answer within 1 s".into(),
            ))
        });
    match ping {
        Ok(()) => Json(proto::Health {
            status: "ready".into(),
        })
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            ApiError::new(ErrorCode::StoreUnavailable).into_response()
        }
    }
}

/// The process-wide Prometheus recorder. Installed once; several in-process servers (tests)
/// share it.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ])
            .map(|b| b.build_recorder())
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let handle = recorder.handle();
        // Another recorder may already be installed by the embedding program; then metrics go
        // there and this handle renders only what it saw.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// How often a server folds the histogram samples recorded since the last time into their
/// buckets (the exporter's own default for the same chore).
pub const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Folds the histogram samples recorded since the last upkeep or scrape into their buckets.
/// The recorder keeps every sample until one of the two happens (a recorder built with
/// `build_recorder`, as this one is, gets no upkeep task of its own), so without this a server
/// that nobody scrapes grew by every request's sample: 394 MiB of RSS after one `keyward-load`
/// run at 10,000 keys, against tens of MiB with it.
pub fn upkeep() {
    prometheus().run_upkeep();
}

/// Runs [`upkeep`] every `period` (the first at once), until the task is aborted.
pub async fn metrics_upkeep(period: std::time::Duration) {
    crate::every(period, || async { upkeep() }).await
}

/// `GET /metrics`: Prometheus text.
#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics() -> Response {
    crate::stats::stats().publish();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        prometheus().render(),
    )
        .into_response()
}

/// The request counter and timer of one (route, method, status), registered once.
#[derive(Clone)]
struct RouteHandles {
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

type RouteTable = RwLock<FxHashMap<String, FxHashMap<(&'static str, u16), RouteHandles>>>;

/// A request's method as a metrics label: the standard methods by name, any other as `_OTHER`
/// (as OpenTelemetry's HTTP conventions name it). The client picks the method, and every
/// distinct label is a series kept for the life of the process: labelled as sent, extension
/// methods (`FOO1`, `FOO2`, ...) let anyone, without a key, grow the server's memory and
/// `/metrics` without bound. Routes are templates and statuses three digits, so they are
/// bounded already.
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

/// Handles by route template, then (method, status): looking a labelled series up in the
/// registry hashes and allocates its labels, which every request would otherwise pay.
fn route_handles(route: &str, method: &Method, status: u16) -> RouteHandles {
    static TABLE: OnceLock<RouteTable> = OnceLock::new();
    let table = TABLE.get_or_init(Default::default);
    let method = method_label(method);
    if let Some(h) = table
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(route)
        .and_then(|m| m.get(&(method, status)))
    {
        return h.clone();
    }
    let labels = [
        ("method", method.to_string()),
        ("route", route.to_string()),
        ("status", status.to_string()),
    ];
    let h = RouteHandles {
        requests: metrics::counter!("keyward_http_requests_total", &labels),
        duration: metrics::histogram!("keyward_http_request_duration_seconds", &labels[..2]),
    };
    table
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .entry(route.to_string())
        .or_default()
        .insert((method, status), h.clone());
    h
}

/// Counts and times one request by route template (never by raw path, so ids do not explode
/// the label space).
pub fn record(route: &str, method: &Method, status: u16, elapsed: std::time::Duration) {
    let h = route_handles(route, method, status);
    h.requests.increment(1);
    h.duration.record(elapsed.as_secs_f64());
}

/// Unknown routes: `404 NOT_FOUND` in the error shape.
pub async fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound).msg("No such route")
}

/// Known route, wrong method: `405 METHOD_NOT_ALLOWED` in the error shape.
pub async fn method_not_allowed() -> ApiError {
    ApiError::new(ErrorCode::MethodNotAllowed)
}

/// `GET /openapi.json`
pub async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::json().to_string(),
    )
        .into_response()
}

/// `GET /docs`
pub async fn docs() -> Html<String> {
    Html(crate::openapi::html().to_string())
}
