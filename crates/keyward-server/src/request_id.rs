//! Request ids: every response carries `X-Request-Id`; a well-formed caller-supplied one is
//! echoed. The id lives in a task-local for the request's lifetime so that error bodies and
//! audit events can name it without threading it through every call.

use std::sync::Arc;

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use futures_util::FutureExt;

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
///
/// Not an `async fn`: the id is picked and `next`'s future made before this future is, so the
/// future holds the request's scope and what the response needs, not the request as well
/// (every request's future is copied whole as it is created: see `front`'s future sizes).
/// `next` is called outside the request's scope, so it must only build its future and do the
/// request's work in it (as `Next::run` and the front door's handlers do), where
/// [`current`] answers the request's id.
pub fn around<'a, F, Fut>(
    route: &'a str,
    req: Request,
    next: F,
) -> impl std::future::Future<Output = Response> + 'a
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response> + 'a,
{
    let start = std::time::Instant::now();
    let method = req.method().clone();
    let id: Arc<str> = match req
        .headers()
        .get(&crate::auth::names::X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|s| keyward_core::validate::request_id(s))
    {
        Some(given) => given.into(),
        None => keyward_core::validate::new_request_id().into(),
    };
    // A request id is ASCII by construction or by the check above.
    let header = HeaderValue::from_str(&id).ok();
    // `next` only builds its future here; the request runs when it is polled, in the scope.
    // A `map` rather than an `async` block, which would hold the scoped future twice (as it
    // captured it and as it awaits it).
    REQUEST_ID.scope(id, next(req)).map(move |mut resp| {
        if let Some(v) = header {
            resp.headers_mut()
                .insert(&crate::auth::names::X_REQUEST_ID, v);
        }
        crate::ops::record(route, &method, resp.status().as_u16(), start.elapsed());
        resp
    })
}
