//! Request ids: every response carries `X-Request-Id`; a well-formed caller-supplied one is
//! echoed. The id lives in a task-local for the request's lifetime so that error bodies and
//! audit events can name it without threading it through every call.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;

tokio::task_local! {
    static REQUEST_ID: Arc<str>;
}

/// The current request's id, or a fresh one outside a request. Shared, not copied: a request's
/// caller holds it for audit events.
pub fn current() -> Arc<str> {
    REQUEST_ID
        .try_with(|id| id.clone())
        .unwrap_or_else(|_| keyward_core::validate::new_request_id().into())
}

/// Middleware: picks the id, runs the request inside its scope, sets the response header, and
/// counts and times the request for `/metrics` (one layer for both: every `from_fn` layer clones
/// the inner service on each request).
pub async fn middleware(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .cloned();
    let route = route.as_ref().map(|p| p.as_str()).unwrap_or("unmatched");
    around(route, req, |req| next.run(req)).await
}

/// What [`middleware`] does around `next` for a request to `route` (its template), for the
/// router's routes and the front door's alike.
pub async fn around<F, Fut>(route: &str, req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let start = std::time::Instant::now();
    let method = req.method().clone();
    let id: Arc<str> = match req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| keyward_core::validate::request_id(s))
    {
        Some(given) => given.into(),
        None => keyward_core::validate::new_request_id().into(),
    };
    // A request id is ASCII by construction or by the check above.
    let header = HeaderValue::from_str(&id).ok();
    let mut resp = REQUEST_ID.scope(id, next(req)).await;
    if let Some(v) = header {
        resp.headers_mut().insert("x-request-id", v);
    }
    crate::ops::record(route, &method, resp.status().as_u16(), start.elapsed());
    resp
}
