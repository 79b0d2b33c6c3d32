//! API.md §0 and §1 through real HTTP: request ids, the error shape for bad bodies, routes,
//! methods and path ids, pagination, credential headers and their precedence, and the
//! operational endpoints (health, readiness, metrics, OpenAPI, docs).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Resp, TestServer};
use keyward_core::token::{self, Environment, TokenKind};
use reqwest::Method;
use serde_json::{json, Value};

/// Sends a request with arbitrary headers (no implicit credential) and an optional raw body with
/// its content type (`None` sends no `Content-Type` at all).
async fn raw(
    s: &TestServer,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<(Option<&str>, Vec<u8>)>,
) -> Resp {
    let mut rb = s.http.request(method, format!("{}{}", s.base, path));
    for (n, v) in headers {
        rb = rb.header(*n, *v);
    }
    if let Some((ct, bytes)) = body {
        if let Some(ct) = ct {
            rb = rb.header("content-type", ct);
        }
        rb = rb.body(bytes);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        body,
    }
}

/// Fetches a path and returns (status, content type, body text).
async fn text(s: &TestServer, path: &str) -> (u16, String, String) {
    let r = s
        .http
        .get(format!("{}{}", s.base, path))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    (status, ct, r.text().await.unwrap())
}

#[track_caller]
fn assert_generated_request_id(id: &str) {
    assert!(id.starts_with("req_"), "request id {id:?} starts with req_");
    assert_eq!(id.len(), 30, "request id {id:?} is req_ + 26 chars");
    assert!(
        id[4..].chars().all(|c| c.is_ascii_alphanumeric()),
        "request id {id:?} body is alphanumeric"
    );
}

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

// ---------------------------------------------------------------------------------------------
// X-Request-Id
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn every_success_response_carries_a_fresh_generated_request_id() {
    let s = TestServer::start().await;
    let a = s.get(&s.org_path(""), &s.root_key).await;
    a.assert_status(200);
    let b = s.get(&s.org_path(""), &s.root_key).await;
    b.assert_status(200);
    let h = raw(&s, Method::GET, "/healthz", &[], None).await;
    h.assert_status(200);
    let ids: Vec<&str> = [&a, &b, &h]
        .iter()
        .map(|r| r.header("x-request-id").expect("X-Request-Id present"))
        .collect();
    for id in &ids {
        assert_generated_request_id(id);
    }
    assert_ne!(ids[0], ids[1], "each request gets its own id");
    assert_ne!(ids[1], ids[2], "each request gets its own id");
}

#[tokio::test]
async fn error_responses_carry_the_same_request_id_in_header_and_body() {
    let s = TestServer::start().await;
    let cases = [
        raw(&s, Method::GET, &s.org_path(""), &[], None).await,
        raw(&s, Method::GET, "/no/such/route", &[], None).await,
        s.get("/v1/orgs/not-a-uuid", &s.root_key).await,
    ];
    for r in &cases {
        assert!(r.status >= 400, "an error: {}", r.body);
        let id = r.header("x-request-id").expect("X-Request-Id on an error");
        assert_generated_request_id(id);
        assert_eq!(
            r.body["error"]["request_id"],
            json!(id),
            "body repeats the header"
        );
    }
}

#[tokio::test]
async fn a_valid_caller_supplied_request_id_is_echoed_on_success_and_error() {
    let s = TestServer::start().await;
    let ok = s
        .send(
            Method::GET,
            &s.org_path(""),
            Some(&s.root_key),
            &[("X-Request-Id", "my-trace_ID-42")],
            None,
        )
        .await;
    ok.assert_status(200);
    assert_eq!(ok.header("x-request-id"), Some("my-trace_ID-42"));

    let sixty_four = "a".repeat(64);
    let err = raw(
        &s,
        Method::GET,
        &s.org_path(""),
        &[("X-Request-Id", &sixty_four)],
        None,
    )
    .await;
    err.assert_error(401, "MISSING_CREDENTIALS");
    assert_eq!(err.header("x-request-id"), Some(sixty_four.as_str()));
    assert_eq!(err.body["error"]["request_id"], json!(sixty_four));
}

#[tokio::test]
async fn an_invalid_caller_supplied_request_id_is_replaced_by_a_generated_one() {
    let s = TestServer::start().await;
    let too_long = "b".repeat(65);
    for bad in [
        "has spaces in it",
        too_long.as_str(),
        "semi;colon",
        "dots.not.allowed",
    ] {
        let r = s
            .send(
                Method::GET,
                &s.org_path(""),
                Some(&s.root_key),
                &[("X-Request-Id", bad)],
                None,
            )
            .await;
        r.assert_status(200);
        let id = r.header("x-request-id").unwrap();
        assert_ne!(id, bad, "{bad:?} must not be echoed");
        assert_generated_request_id(id);
    }
}

// ---------------------------------------------------------------------------------------------
// Bodies
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn malformed_json_is_rejected_with_400_validation_error() {
    let s = TestServer::start().await;
    let auth = bearer(&s.root_key);
    let r = raw(
        &s,
        Method::POST,
        &s.org_path("/agents"),
        &[("authorization", &auth)],
        Some((Some("application/json"), b"{\"name\": \"a\",".to_vec())),
    )
    .await;
    r.assert_error(400, "VALIDATION_ERROR");
    let list = s.get(&s.org_path("/agents"), &s.root_key).await;
    assert_eq!(
        list.assert_status(200)["agents"],
        json!([]),
        "nothing was created"
    );
}

#[tokio::test]
async fn unknown_json_field_is_rejected_with_400_naming_the_field() {
    let s = TestServer::start().await;
    let r = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({"name": "typo-bot", "colour": "blue"}),
        )
        .await;
    r.assert_error(400, "VALIDATION_ERROR");
    assert!(
        r.body["error"]["details"].to_string().contains("colour"),
        "details name the unknown field: {}",
        r.body
    );

    let nested = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({"name": "typo-bot", "key": {"nmae": "k"}}),
        )
        .await;
    nested.assert_error(400, "VALIDATION_ERROR");
    assert!(
        nested.body["error"]["details"].to_string().contains("nmae"),
        "{}",
        nested.body
    );

    let patch = s
        .patch(&s.org_path(""), &s.root_key, json!({"nmae": "x"}))
        .await;
    patch.assert_error(400, "VALIDATION_ERROR");
    assert!(
        patch.body["error"]["details"].to_string().contains("nmae"),
        "{}",
        patch.body
    );

    let list = s.get(&s.org_path("/agents"), &s.root_key).await;
    assert_eq!(
        list.assert_status(200)["agents"],
        json!([]),
        "nothing was created"
    );
}

#[tokio::test]
async fn a_body_that_is_not_application_json_is_rejected_with_415() {
    let s = TestServer::start().await;
    let auth = bearer(&s.root_key);
    let body = br#"{"name": "plain-bot"}"#.to_vec();
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let r = raw(
            &s,
            Method::POST,
            &s.org_path("/agents"),
            &[("authorization", &auth)],
            Some((ct, body.clone())),
        )
        .await;
        r.assert_error(415, "UNSUPPORTED_MEDIA_TYPE");
    }
    let ok = raw(
        &s,
        Method::POST,
        &s.org_path("/agents"),
        &[("authorization", &auth)],
        Some((Some("application/json; charset=utf-8"), body)),
    )
    .await;
    ok.assert_status(201);
}

#[tokio::test]
async fn a_body_over_one_mebibyte_is_rejected_with_413() {
    let s = TestServer::start().await;
    let blob = "x".repeat(1024 * 1024);
    let r = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({"name": "big", "metadata": {"blob": blob}}),
        )
        .await;
    r.assert_error(413, "PAYLOAD_TOO_LARGE");

    // Just under the limit the body is read and judged on its content instead.
    let blob = "x".repeat(1000 * 1000);
    let r = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({"name": "big", "metadata": {"blob": blob}}),
        )
        .await;
    r.assert_error(400, "VALIDATION_ERROR");
}

// ---------------------------------------------------------------------------------------------
// Routes, methods, path ids
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_unknown_route_is_404_not_found_in_the_error_shape() {
    let s = TestServer::start().await;
    for path in ["/v1/nope", "/nothing-here", "/v1/orgs"] {
        let r = s.get(path, &s.root_key).await;
        r.assert_error(404, "NOT_FOUND");
        let r = raw(&s, Method::GET, path, &[], None).await;
        r.assert_error(404, "NOT_FOUND");
    }
}

#[tokio::test]
async fn a_wrong_method_on_a_known_route_is_405_method_not_allowed() {
    let s = TestServer::start().await;
    let r = s.delete(&s.org_path(""), &s.root_key).await;
    r.assert_error(405, "METHOD_NOT_ALLOWED");
    let r = s
        .send(Method::PUT, "/v1/me", Some(&s.root_key), &[], None)
        .await;
    r.assert_error(405, "METHOD_NOT_ALLOWED");
    let r = raw(&s, Method::POST, "/healthz", &[], None).await;
    r.assert_error(405, "METHOD_NOT_ALLOWED");
}

#[tokio::test]
async fn a_malformed_uuid_in_the_path_is_400_validation_error() {
    let s = TestServer::start().await;
    let (agent, _, _) = s.create_agent("path-bot", json!({})).await;
    let agent_id = agent["id"].as_str().unwrap();
    let cases = [
        (Method::GET, "/v1/orgs/not-a-uuid".to_string()),
        (Method::GET, "/v1/orgs/12345/agents".to_string()),
        (Method::GET, s.org_path("/agents/xyz")),
        (Method::POST, s.org_path("/agents/xyz/pause")),
        (
            Method::POST,
            s.org_path(&format!("/agents/{agent_id}/keys/not-a-key/deprecate")),
        ),
        (Method::GET, "/v1/keys/zzz".to_string()),
    ];
    for (method, path) in cases {
        let r = s.send(method, &path, Some(&s.root_key), &[], None).await;
        r.assert_error(400, "VALIDATION_ERROR");
    }
}

// ---------------------------------------------------------------------------------------------
// Pagination and query strings
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_limit_outside_1_to_1000_is_400_validation_error() {
    let s = TestServer::start().await;
    for q in [
        "limit=0",
        "limit=1001",
        "limit=-1",
        "limit=ten",
        "offset=-3",
    ] {
        let r = s
            .get(&s.org_path(&format!("/agents?{q}")), &s.root_key)
            .await;
        r.assert_error(400, "VALIDATION_ERROR");
        let r = s
            .get(&s.org_path(&format!("/audit?{q}")), &s.root_key)
            .await;
        r.assert_error(400, "VALIDATION_ERROR");
    }
    for (q, l) in [("limit=1", 1), ("limit=1000", 1000)] {
        let r = s
            .get(&s.org_path(&format!("/agents?{q}")), &s.root_key)
            .await;
        assert_eq!(r.assert_status(200)["limit"], json!(l));
    }
}

#[tokio::test]
async fn lists_default_to_limit_100_and_offset_0() {
    let s = TestServer::start().await;
    s.create_agent("only-bot", json!({})).await;
    for path in [
        s.org_path("/agents"),
        s.org_path("/keys"),
        s.org_path("/audit"),
    ] {
        let r = s.get(&path, &s.root_key).await;
        let b = r.assert_status(200);
        assert_eq!(b["limit"], json!(100), "{path}");
        assert_eq!(b["offset"], json!(0), "{path}");
        assert_eq!(b["has_more"], json!(false), "{path}");
    }
    let r = s.get(&s.org_path("/agents"), &s.root_key).await;
    assert_eq!(r.body["agents"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn has_more_and_offset_page_through_a_list() {
    let s = TestServer::start().await;
    for i in 0..5 {
        s.create_agent(&format!("page-{i}"), json!({})).await;
        s.advance(chrono::Duration::seconds(1));
    }
    let names = |b: &Value| -> Vec<String> {
        b["agents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect()
    };
    let expect = [
        (0, vec!["page-0", "page-1"], true),
        (2, vec!["page-2", "page-3"], true),
        (4, vec!["page-4"], false),
        (5, vec![], false),
        (50, vec![], false),
    ];
    for (offset, want, more) in expect {
        let r = s
            .get(
                &s.org_path(&format!("/agents?limit=2&offset={offset}")),
                &s.root_key,
            )
            .await;
        let b = r.assert_status(200);
        assert_eq!(names(b), want, "offset {offset}");
        assert_eq!(b["has_more"], json!(more), "offset {offset}");
        assert_eq!(b["limit"], json!(2));
        assert_eq!(b["offset"], json!(offset));
    }
    // Exactly filling the last page is not "more".
    let r = s.get(&s.org_path("/agents?limit=5"), &s.root_key).await;
    assert_eq!(r.assert_status(200)["has_more"], json!(false));
    let r = s.get(&s.org_path("/agents?limit=4"), &s.root_key).await;
    assert_eq!(r.assert_status(200)["has_more"], json!(true));
}

#[tokio::test]
async fn an_unknown_query_parameter_is_rejected_with_400() {
    let s = TestServer::start().await;
    for path in [
        s.org_path("/agents?colour=blue"),
        s.org_path("/agents?limt=5"),
        s.org_path("/keys?agent=x"),
        s.org_path("/audit?actions=agent.create"),
    ] {
        let r = s.get(&path, &s.root_key).await;
        r.assert_error(400, "VALIDATION_ERROR");
    }
}

// ---------------------------------------------------------------------------------------------
// Credentials
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_request_without_credentials_is_401_missing_credentials() {
    let s = TestServer::start().await;
    for path in [s.org_path(""), s.org_path("/agents"), "/v1/me".to_string()] {
        let r = raw(&s, Method::GET, &path, &[], None).await;
        r.assert_error(401, "MISSING_CREDENTIALS");
    }
}

#[tokio::test]
async fn authorization_with_another_scheme_is_401_invalid_api_key() {
    let s = TestServer::start().await;
    let basic_with_token = format!("Basic {}", s.root_key);
    for v in ["Basic dXNlcjpwYXNz", basic_with_token.as_str(), "Token abc"] {
        let r = raw(
            &s,
            Method::GET,
            &s.org_path(""),
            &[("authorization", v)],
            None,
        )
        .await;
        r.assert_error(401, "INVALID_API_KEY");
    }
}

#[tokio::test]
async fn authorization_takes_precedence_over_x_api_key() {
    let s = TestServer::start().await;
    let garbage = bearer("kw_rk_garbage");
    let r = raw(
        &s,
        Method::GET,
        &s.org_path(""),
        &[("authorization", &garbage), ("x-api-key", &s.root_key)],
        None,
    )
    .await;
    r.assert_error(401, "INVALID_API_KEY");

    let good = bearer(&s.root_key);
    let r = raw(
        &s,
        Method::GET,
        &s.org_path(""),
        &[("authorization", &good), ("x-api-key", "kw_rk_garbage")],
        None,
    )
    .await;
    assert_eq!(r.assert_status(200)["id"], json!(s.org_id));
}

#[tokio::test]
async fn x_api_key_takes_precedence_over_api_key_and_each_works_alone() {
    let s = TestServer::start().await;
    let r = raw(
        &s,
        Method::GET,
        &s.org_path(""),
        &[("x-api-key", "kw_rk_garbage"), ("api-key", &s.root_key)],
        None,
    )
    .await;
    r.assert_error(401, "INVALID_API_KEY");

    let r = raw(
        &s,
        Method::GET,
        &s.org_path(""),
        &[("x-api-key", &s.root_key)],
        None,
    )
    .await;
    assert_eq!(r.assert_status(200)["id"], json!(s.org_id));
    let r = raw(
        &s,
        Method::GET,
        &s.org_path(""),
        &[("api-key", &s.root_key)],
        None,
    )
    .await;
    assert_eq!(r.assert_status(200)["id"], json!(s.org_id));
}

#[tokio::test]
async fn a_token_with_a_bad_checksum_or_shape_is_401_invalid_api_key() {
    let s = TestServer::start().await;
    // Change the last checksum character of the real root key.
    let mut bad = s.root_key.clone();
    let last = bad.pop().unwrap();
    bad.push(if last == '0' { '1' } else { '0' });
    // A well-formed token (right checksum) that was never issued.
    let unknown = token::generate(Environment::Live, TokenKind::Root).unwrap();
    let unknown = unknown.expose().to_string();
    let short = s.root_key[..s.root_key.len() - 1].to_string();
    let wrong_prefix = s.root_key.replacen("kw_", "xx_", 1);
    for t in [bad, unknown, short, wrong_prefix, "not-a-token".to_string()] {
        let r = s.get(&s.org_path(""), &t).await;
        r.assert_error(401, "INVALID_API_KEY");
    }
    // The real key still works.
    s.get(&s.org_path(""), &s.root_key).await.assert_status(200);
}

// ---------------------------------------------------------------------------------------------
// Operational endpoints
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn healthz_and_readyz_answer_200_without_credentials() {
    let s = TestServer::start().await;
    for path in ["/healthz", "/readyz"] {
        let r = raw(&s, Method::GET, path, &[], None).await;
        r.assert_status(200);
        assert!(r.body.is_object(), "{path} answers JSON: {}", r.body);
        assert_generated_request_id(r.header("x-request-id").unwrap());
    }
}

#[tokio::test]
async fn metrics_is_prometheus_text_counting_http_requests() {
    let s = TestServer::start().await;
    s.get(&s.org_path(""), &s.root_key).await.assert_status(200);
    let (status, ct, body) = text(&s, "/metrics").await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/plain"), "content type {ct:?}");
    assert!(body.contains("keyward_http_requests_total"), "{body}");
    assert!(
        body.lines()
            .any(|l| l.starts_with("# TYPE keyward_http_requests_total counter")),
        "the counter is declared as one: {body}"
    );
    assert!(
        body.lines()
            .any(|l| l.starts_with("keyward_http_requests_total{")
                && l.contains("/v1/orgs/{org_id}")),
        "labelled by route template: {body}"
    );
}

/// A client picks the method, so request metrics label any method beyond the standard ones
/// `_OTHER`: one series per extension method would let anyone grow the server's memory and
/// `/metrics` without bound.
#[tokio::test]
async fn metrics_label_methods_a_client_invents_as_other() {
    let s = TestServer::start().await;
    // Through the router (an unknown path) and through the front door (a known one).
    let paths = ["/no-such-route", "/healthz", "/v1/keys/verify"];
    for i in 0..20 {
        let m = Method::from_bytes(format!("KWMETHOD{i}").as_bytes()).unwrap();
        for path in paths {
            let r = raw(&s, m.clone(), path, &[], None).await;
            assert!(r.status == 404 || r.status == 405, "{path}: {}", r.status);
        }
    }
    let (_, _, body) = text(&s, "/metrics").await;
    assert!(!body.contains("KWMETHOD"), "{body}");
    for route in ["unmatched", "/healthz", "/v1/keys/verify"] {
        let counted: u64 = body
            .lines()
            .filter(|l| {
                l.starts_with("keyward_http_requests_total{")
                    && l.contains("method=\"_OTHER\"")
                    && l.contains(&format!("route=\"{route}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        assert!(counted >= 20, "{route}: {counted} in {body}");
    }
    // The standard methods keep their names.
    s.get(&s.org_path(""), &s.root_key).await.assert_status(200);
    let (_, _, body) = text(&s, "/metrics").await;
    assert!(
        body.lines()
            .any(|l| l.starts_with("keyward_http_requests_total{")
                && l.contains("method=\"GET\"")
                && l.contains("/v1/orgs/{org_id}")),
        "{body}"
    );
}

/// The (method, path) pairs of every `/v1` route the router declares in lib.rs.
fn router_v1_routes() -> Vec<(String, String)> {
    let src = include_str!("../src/lib.rs");
    let mut out = Vec::new();
    for chunk in src.split(".route(").skip(1) {
        let Some(start) = chunk.find('"') else {
            continue;
        };
        let rest = &chunk[start + 1..];
        let Some(end) = rest.find('"') else { continue };
        let path = &rest[..end];
        if !path.starts_with("/v1") {
            continue;
        }
        let bytes = chunk.as_bytes();
        for m in ["get", "post", "patch", "delete", "put"] {
            let needle = format!("{m}(");
            let found = chunk.match_indices(&needle).any(|(i, _)| {
                i == 0
                    || !(bytes[i - 1].is_ascii_alphanumeric()
                        || bytes[i - 1] == b'_'
                        || bytes[i - 1] == b':')
            });
            if found {
                out.push((m.to_string(), path.to_string()));
            }
        }
    }
    out
}

#[tokio::test]
async fn openapi_json_is_3_1_and_documents_every_v1_route_and_core_schemas() {
    let s = TestServer::start().await;
    let (status, ct, body) = text(&s, "/openapi.json").await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("application/json"), "content type {ct:?}");
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert!(
        doc["openapi"]
            .as_str()
            .is_some_and(|v| v.starts_with("3.1.")),
        "OpenAPI 3.1.x: {}",
        doc["openapi"]
    );
    let routes = router_v1_routes();
    assert!(routes.len() >= 25, "parsed the router's routes: {routes:?}");
    let paths = doc["paths"].as_object().expect("paths");
    let mut missing = Vec::new();
    for (method, path) in &routes {
        if paths.get(path).and_then(|p| p.get(method)).is_none() {
            missing.push(format!("{} {path}", method.to_uppercase()));
        }
    }
    assert!(
        missing.is_empty(),
        "routes missing from /openapi.json: {missing:?}"
    );
    for p in ["/healthz", "/readyz", "/metrics"] {
        assert!(paths.contains_key(p), "{p} documented");
    }
    let schemas = doc["components"]["schemas"]
        .as_object()
        .expect("component schemas");
    for name in ["Agent", "Key", "ErrorBody"] {
        assert!(schemas.contains_key(name), "schema {name} present");
    }
    assert!(schemas["Agent"].to_string().contains("parent_agent_id"));
    assert!(schemas["Key"].to_string().contains("successor_key_id"));
    // The verify request facts' limits are the ones the server enforces.
    let facts = &schemas["VerifyRequestFacts"]["properties"];
    for (field, max) in keyward_proto::VerifyRequestFacts::MAX_LENGTHS {
        assert_eq!(facts[field]["maxLength"], json!(max), "{field}: {facts}");
    }
}

#[tokio::test]
async fn docs_is_an_html_reference_rendered_from_the_spec() {
    let s = TestServer::start().await;
    let (status, ct, body) = text(&s, "/docs").await;
    assert_eq!(status, 200);
    assert!(ct.starts_with("text/html"), "content type {ct:?}");
    assert!(body.to_ascii_lowercase().contains("<html"), "an HTML page");
    for p in ["/v1/keys/verify", "/v1/orgs/{org_id}/agents", "/v1/me"] {
        assert!(body.contains(p), "docs mention {p}");
    }
}

#[tokio::test]
async fn a_store_that_went_away_answers_503_store_unavailable_without_internals() {
    let s = TestServer::start().await;
    s.get("/readyz", &s.root_key).await.assert_status(200);
    s.store.close().await;
    let ready = s.get("/readyz", &s.root_key).await;
    ready.assert_error(503, "STORE_UNAVAILABLE");
    // A token the cache has never seen needs the store: the same answer, with no SQL or paths.
    let unseen = keyward_core::token::generate(
        keyward_core::token::Environment::Live,
        keyward_core::token::TokenKind::Agent,
    )
    .unwrap();
    let r = s.get("/v1/me", unseen.expose()).await;
    r.assert_error(503, "STORE_UNAVAILABLE");
    let text = r.body.to_string().to_lowercase();
    for leak in ["sqlite", "select", "pool", ".db", "sqlx"] {
        assert!(!text.contains(leak), "the 503 leaks `{leak}`: {text}");
    }
}
