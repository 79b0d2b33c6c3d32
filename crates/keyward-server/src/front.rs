//! The front door: the service every connection's requests enter. The routes Keyward exists
//! for (`POST /v1/keys/verify`, `GET /v1/me`) and the static `GET /healthz` are dispatched
//! here, on their exact method and path, straight to their handlers; everything else goes to the
//! axum router.
//!
//! Why: the router wraps each route in boxed, cloned services (the route itself, each
//! `from_fn` layer, the handler), allocates a future per layer and matches the path against
//! every template; for a verification that was a visible share of the server's own CPU time. A
//! request dispatched here passes through exactly the same steps, in the same order, by calling
//! the same functions the router's layers call: request id and metrics
//! (`request_id::around`), panic catching, the credential checks
//! (`auth::guard`), the extractors and the handler. The routes stay in the router as well (so
//! `app` alone is the whole API, and `/openapi.json` lists them), where they behave the same.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;

use axum::extract::{ConnectInfo, Request};
use axum::http::Method;
use axum::response::{IntoResponse, Response};
use axum::Router;
use futures_util::FutureExt;

use crate::auth::{Caller, CallerCache};
use crate::error::ApiError;
use crate::AppState;

/// A route the front door answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hot {
    Healthz,
    Verify,
    Me,
}

impl Hot {
    fn of(method: &Method, path: &str) -> Option<Hot> {
        match (path, *method == Method::GET, *method == Method::POST) {
            ("/v1/keys/verify", _, true) => Some(Hot::Verify),
            ("/v1/me", true, _) => Some(Hot::Me),
            ("/healthz", true, _) => Some(Hot::Healthz),
            _ => None,
        }
    }

    /// The route template, as the router's metrics name it.
    fn template(self) -> &'static str {
        match self {
            Hot::Healthz => "/healthz",
            Hot::Verify => "/v1/keys/verify",
            Hot::Me => "/v1/me",
        }
    }
}

/// The service of one connection. Cloned for every request (hyper's service contract), so it is
/// one pointer to what the connection keeps: a request touches no reference count that other
/// connections, on other cores, touch too.
#[derive(Clone)]
pub struct Front(Arc<Conn>);

struct Conn {
    state: AppState,
    router: Router,
    peer: SocketAddr,
    callers: CallerCache,
}

impl Front {
    /// The front door of a connection from `peer`, in front of `router` (built by [`crate::app`]
    /// over the same state).
    pub fn new(state: AppState, router: Router, peer: SocketAddr) -> Front {
        Front(Arc::new(Conn {
            state,
            router,
            peer,
            callers: CallerCache::default(),
        }))
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

impl tower::Service<Request> for Front {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // The router is always ready (axum's `Router` answers `Ready` unconditionally).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request) -> BoxFuture {
        match Hot::of(req.method(), req.uri().path()) {
            Some(hot) => Box::pin(hot_route(self.0.clone(), hot, req).map(Ok)),
            None => {
                // What `into_make_service_with_connect_info` would have added.
                req.extensions_mut().insert(ConnectInfo(self.0.peer));
                let mut router = self.0.router.clone();
                Box::pin(async move { tower::Service::call(&mut router, req).await })
            }
        }
    }
}

/// A front-door route: the router's layers, in the router's order, around its handler.
///
/// Built of the layers' own futures (no `async fn` of its own around them, which would hold
/// them all inline once more and be copied whole as it is created).
fn hot_route(conn: Arc<Conn>, hot: Hot, req: Request) -> impl Future<Output = Response> + Send {
    // The 1 MiB body limit is applied where bodies are read (`extract::json_body`, the signature
    // check), as the router's `DefaultBodyLimit` is.
    crate::request_id::around(hot.template(), req, move |req| {
        AssertUnwindSafe(async move {
            let (state, peer, callers) = (&conn.state, conn.peer, Some(&conn.callers));
            match hot {
                Hot::Healthz => crate::ops::healthz().await.into_response(),
                // The handlers' futures are boxed: every future around them (the guard's, the
                // request id's, the panic catcher's) would otherwise hold them inline, and each
                // is copied whole when it is created: one allocation instead of kilobytes of
                // copying per request (see `the_hot_routes_futures_stay_small` below).
                Hot::Verify => {
                    crate::auth::guard(state, peer, callers, req, |req, caller| {
                        Box::pin(verify(state, req, caller))
                    })
                    .await
                }
                Hot::Me => {
                    crate::auth::guard(state, peer, callers, req, |_, caller| {
                        Box::pin(me(state, caller))
                    })
                    .await
                }
            }
        })
        .catch_unwind()
        .map(|handled| handled.unwrap_or_else(|_| crate::panic_response()))
    })
}

/// `POST /v1/keys/verify` with its body extractor, as the router would run it (the extractor
/// is [`crate::verify::Body`], which calls [`crate::verify::body`]).
///
/// Not an `async fn`: the body's future is made here, so this future holds the body, not the
/// whole request. One `async` block rather than a `then`: the combinator moved the second stage
/// (the answer's future) whole three times as it started (336 instructions of `memcpy` per
/// verification); the block builds it in place. The parsed body is boxed.
fn verify(state: &AppState, req: Request, caller: Caller) -> impl Future<Output = Response> + '_ {
    let body = crate::verify::body(req);
    async move {
        match body.await {
            Ok(body) => into_response(crate::verify::answer(state, &caller, &body).await),
            Err(e) => e.into_response(),
        }
    }
}

/// `GET /v1/me`, as the router would run it.
async fn me(state: &AppState, caller: Caller) -> Response {
    into_response(crate::me::answer(state, caller).await)
}

fn into_response<T: IntoResponse>(r: Result<T, ApiError>) -> Response {
    match r {
        Ok(v) => v.into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::future_size;

    /// A future is copied whole when it is created and again into each future that awaits it,
    /// so the request's chain of futures costs its sizes added up in copying on every request
    /// (`memmove` was 5% of the server's CPU time under load when the front door's future was
    /// 4.9 KB). The handlers and the authentication are boxed, and the layers hold neither the
    /// request twice nor their inner futures twice (see `guard`, `around`, `json_body`); this pins
    /// the sizes so a change that inlines something large again is noticed. (At 2,992 bytes for
    /// the front door, 1,496 for the guard and 2,048 for verify, `memmove` was 4.4% of the
    /// server's CPU time verifying, 0.38 us per verification more than per static request.)
    #[test]
    fn the_hot_routes_futures_stay_small() {
        let route = future_size!(hot_route, Arc<Conn>, Hot, Request);
        assert!(route <= 1_280, "the front door's future is {route} bytes");
        let guard = |state: &'static AppState, req: Request| {
            crate::auth::guard(
                state,
                ([127, 0, 0, 1], 1).into(),
                None,
                req,
                |req, caller| Box::pin(verify(state, req, caller)),
            )
        };
        let guard = future_size!(guard, &'static AppState, Request);
        assert!(guard <= 896, "the guard's future is {guard} bytes");
        let verify = future_size!(verify, &AppState, Request, Caller);
        // 960 since it is one `async` block (the `then` it replaced was 824 but moved its second
        // stage whole three times as it started).
        assert!(verify <= 1_024, "verify's future is {verify} bytes");
        let me = future_size!(me, &AppState, Caller);
        assert!(me <= 1_024, "me's future is {me} bytes");
    }
}
