//! The front door (`front::Front`) answers `POST /v1/keys/verify` and `GET /v1/me` itself, by
//! calling the functions the router's layers call; the router keeps the same routes. This holds
//! the two to the same answers, request by request: status, headers (apart from the request id
//! and the rate limit's remaining count, which each request moves) and body (apart from the
//! request id), for good requests and for every kind of bad one.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request};
use axum::http::{HeaderMap, Method};
use http_body_util::BodyExt;
use keyward_core::clock::{Clock, ManualClock};
use keyward_server::front::Front;
use keyward_server::{AppState, MasterKey, ServerConfig};
use keyward_store::sqlite::SqliteStore;
use keyward_store::Store;
use serde_json::{json, Value};

struct Both {
    router: axum::Router,
    front: Front,
    peer: SocketAddr,
    root: String,
    org: String,
    _dir: tempfile::TempDir,
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Both {
    async fn new() -> Both {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&dir.path().join("keyward.db"))
                .await
                .unwrap(),
        );
        let clock = Arc::new(ManualClock::new(
            chrono::DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
                .unwrap()
                .into(),
        ));
        let (org, root) =
            keyward_server::bootstrap::create_org(store.as_ref(), clock.as_ref(), "front")
                .await
                .unwrap();
        let config = ServerConfig {
            trusted_proxies: Vec::new(),
            master_key: MasterKey::from_bytes([7u8; 32]),
            clock: clock as Arc<dyn Clock>,
            cache: Default::default(),
            usage_flush_interval: std::time::Duration::from_millis(200),
            failed_auth_limit: Some(keyward_server::DEFAULT_FAILED_AUTH_LIMIT),
            rate_limit_backend: keyward_server::RateLimitBackend::Local,
        };
        let state = AppState::new(config, store);
        let router = keyward_server::app(state.clone());
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        Both {
            front: Front::new(state, router.clone(), peer),
            router,
            peer,
            root: root.expose().to_string(),
            org: org.id.to_string(),
            _dir: dir,
        }
    }

    fn request(&self, method: Method, path: &str, key: Option<&str>, body: Body) -> Request {
        let mut b = Request::builder().method(method).uri(path);
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        b.body(body).unwrap()
    }

    async fn answer(resp: axum::response::Response) -> Answer {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        Answer {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    /// Creates an agent through the router; answers its key.
    async fn agent(&self, name: &str, key: Value) -> String {
        let mut r = self.request(
            Method::POST,
            &format!("/v1/orgs/{}/agents", self.org),
            Some(&self.root),
            json_body(&json!({"name": name, "scopes": {"slack": ["chat:write"]}, "key": key})),
        );
        r.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        let created = self.via_router(r).await;
        assert_eq!(created.status, 201, "{created:?}");
        created.body["api_key"].as_str().unwrap().to_string()
    }

    async fn via_router(&self, mut req: Request) -> Answer {
        req.extensions_mut().insert(ConnectInfo(self.peer));
        let mut router = self.router.clone();
        Self::answer(tower::Service::call(&mut router, req).await.unwrap()).await
    }

    async fn via_front(&self, req: Request) -> Answer {
        let mut front = self.front.clone();
        Self::answer(tower::Service::call(&mut front, req).await.unwrap()).await
    }

    /// Sends the request `make` builds through the router, then through the front door, and
    /// asserts the answers are the same; returns the front door's.
    async fn same(&self, what: &str, make: impl Fn() -> Request) -> Answer {
        let r = self.via_router(make()).await;
        let f = self.via_front(make()).await;
        assert_eq!(
            r.status, f.status,
            "{what}: status\nrouter {r:?}\nfront {f:?}"
        );
        assert_eq!(
            scrub(&r.body),
            scrub(&f.body),
            "{what}: body\nrouter {r:?}\nfront {f:?}"
        );
        // `content-length`: axum's router sets it on the response object; for the front door's
        // responses hyper writes it on the wire from the body's exact size (the same bodies).
        let names = |h: &HeaderMap| {
            let mut n: Vec<String> = h
                .keys()
                .filter(|k| *k != "content-length")
                .map(|k| k.as_str().to_string())
                .collect();
            n.sort();
            n
        };
        assert_eq!(names(&r.headers), names(&f.headers), "{what}: header names");
        for (name, value) in &r.headers {
            if name == "x-request-id" || name == "x-ratelimit-remaining" || name == "content-length"
            {
                continue;
            }
            assert_eq!(
                Some(value),
                f.headers.get(name),
                "{what}: header {name}\nrouter {r:?}\nfront {f:?}"
            );
        }
        assert!(f.headers.contains_key("x-request-id"), "{what}: request id");
        f
    }
}

/// The body without what differs between two requests by design: the request id, and the
/// counts each use moves (a verification's rate-limit remaining and quota used).
fn scrub(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(e) = v.get_mut("error").and_then(Value::as_object_mut) {
        e.remove("request_id");
    }
    for (field, counts) in [
        ("ratelimit", &["remaining"][..]),
        ("quota", &["used", "remaining"][..]),
    ] {
        if let Some(o) = v.get_mut(field).and_then(Value::as_object_mut) {
            for c in counts {
                o.remove(*c);
            }
        }
    }
    v
}

fn json_body(v: &Value) -> Body {
    Body::from(serde_json::to_vec(v).unwrap())
}

#[tokio::test]
async fn the_front_door_answers_verify_and_me_as_the_router_does() {
    let b = Both::new().await;
    // An agent whose key has a rate limit (so the rate-limit headers are compared too) and
    // a quota (so is the quota state).
    let agent_key = b
        .agent(
            "twin",
            json!({
                "rate_limit": {"limit": 1000, "period_s": 60, "burst": 1000},
                "quota": {"limit": 1000, "period": "day"}
            }),
        )
        .await;
    // One request an hour: the first passes, then both answer 429 with the same headers.
    let limited = b
        .agent(
            "slow",
            json!({"rate_limit": {"limit": 1, "period_s": 3600, "burst": 1}}),
        )
        .await;

    let verify = |key: Option<&str>, content_type: Option<&str>, body: Body| {
        let mut r = b.request(Method::POST, "/v1/keys/verify", key, body);
        if let Some(ct) = content_type {
            r.headers_mut().insert("content-type", ct.parse().unwrap());
        }
        r
    };
    let json = Some("application/json");
    let valid = b
        .same("verify of a valid key", || {
            verify(Some(&b.root), json, json_body(&json!({"key": agent_key})))
        })
        .await;
    assert_eq!(valid.status, 200);
    assert_eq!(valid.body["code"], "VALID");
    assert_eq!(valid.body["ratelimit"]["limit"], 1000);
    let unknown = b
        .same("verify of an unknown key", || {
            verify(
                Some(&b.root),
                json,
                json_body(&json!({"key": "kw_ak_nothing"})),
            )
        })
        .await;
    assert_eq!(
        unknown.body,
        json!({"valid": false, "code": "INVALID_API_KEY"})
    );
    let insufficient = b
        .same("verify by a key without keys:verify", || {
            verify(
                Some(&agent_key),
                json,
                json_body(&json!({"key": agent_key})),
            )
        })
        .await;
    assert_eq!(insufficient.status, 403);
    assert!(insufficient.headers.contains_key("x-ratelimit-limit"));
    for (what, key, ct, body, status) in [
        ("no credential", None, json, "{}".to_string(), 401),
        (
            "a malformed credential",
            Some("nonsense"),
            json,
            "{}".to_string(),
            401,
        ),
        (
            "a body that is not JSON",
            Some(b.root.as_str()),
            Some("text/plain"),
            "{}".to_string(),
            415,
        ),
        (
            "no content type",
            Some(b.root.as_str()),
            None,
            "{}".to_string(),
            415,
        ),
        (
            "malformed JSON",
            Some(b.root.as_str()),
            json,
            "{\"key\":".to_string(),
            400,
        ),
        (
            "an unknown field",
            Some(b.root.as_str()),
            json,
            "{\"key\":\"k\",\"extra\":1}".to_string(),
            400,
        ),
        (
            "a missing key",
            Some(b.root.as_str()),
            json,
            "{}".to_string(),
            400,
        ),
        (
            "a body over 1 MiB",
            Some(b.root.as_str()),
            json,
            format!(
                "{{\"key\":\"{}\"}}",
                "a".repeat(keyward_server::MAX_BODY_BYTES)
            ),
            413,
        ),
    ] {
        let a = b
            .same(what, || verify(key, ct, Body::from(body.clone())))
            .await;
        assert_eq!(a.status, status, "{what}: {a:?}");
    }

    let me = |key: Option<&str>| b.request(Method::GET, "/v1/me", key, Body::empty());
    let mine = b.same("me of an agent key", || me(Some(&agent_key))).await;
    assert_eq!(mine.status, 200);
    assert_eq!(mine.body["name"], "twin");
    for name in [
        "x-ratelimit-limit",
        "x-ratelimit-remaining",
        "x-ratelimit-reset",
    ] {
        assert!(mine.headers.contains_key(name), "{name}");
    }
    assert_eq!(b.via_router(me(Some(&limited))).await.status, 200);
    let over = b
        .same("me over its rate limit", || me(Some(&limited)))
        .await;
    assert_eq!(over.status, 429);
    assert_eq!(over.body["error"]["code"], "RATE_LIMITED");
    assert!(over.headers.contains_key("retry-after"), "{over:?}");
    let root = b.same("me of a root key", || me(Some(&b.root))).await;
    assert_eq!(root.status, 400);
    assert_eq!(root.body["error"]["code"], "ME_REQUIRES_AGENT_KEY");
    let none = b.same("me without a credential", || me(None)).await;
    assert_eq!(none.status, 401);
    let bad_trace = b
        .same("me with a malformed trace header", || {
            let mut r = me(Some(&agent_key));
            r.headers_mut()
                .insert("keyward-run-id", "r".repeat(4096).parse().unwrap());
            r
        })
        .await;
    assert_eq!(bad_trace.status, 400, "{bad_trace:?}");
}
