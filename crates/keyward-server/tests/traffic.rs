//! Traffic controls through the real server (API.md §6.2, §6.4): per-key GCRA rate limits with
//! their headers, refills on the manual clock, tiers and org defaults, derived keys sharing
//! their parent's bucket, verify counting like a direct call; the `Keyward-Constraints` header;
//! org and agent deny rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use base64::Engine;
use chrono::Duration;
use common::TestServer;
use reqwest::Method;
use serde_json::{json, Value};

async fn limited_agent(s: &TestServer, rate_limit: Value) -> (String, String) {
    let b = s
        .create_agent_with(json!({
            "name": "limited",
            "scopes": {"keys": ["derive", "verify"], "slack": ["chat:write", "files:read"]},
            "key": {"rate_limit": rate_limit}
        }))
        .await;
    (
        b["agent"]["id"].as_str().unwrap().to_string(),
        b["api_key"].as_str().unwrap().to_string(),
    )
}

fn constraints(v: Value) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(serde_json::to_vec(&v).unwrap())
}

#[tokio::test]
async fn a_key_is_limited_to_its_burst_then_refills_at_the_sustained_rate() {
    let s = TestServer::start().await;
    let (_, key) = limited_agent(&s, json!({"limit": 60, "period_s": 60, "burst": 3})).await;
    for expected_remaining in ["2", "1", "0"] {
        let r = s.get("/v1/me", &key).await;
        r.assert_status(200);
        assert_eq!(r.header("x-ratelimit-limit"), Some("60"));
        assert_eq!(r.header("x-ratelimit-remaining"), Some(expected_remaining));
        let reset: i64 = r.header("x-ratelimit-reset").unwrap().parse().unwrap();
        assert!(reset > common::t0().timestamp());
    }
    let r = s.get("/v1/me", &key).await;
    r.assert_error(429, "RATE_LIMITED");
    assert_eq!(r.body["error"]["retry_after"], json!(1));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("0"));
    // One request per second sustained: a second later exactly one more is allowed.
    s.advance(Duration::seconds(1));
    s.get("/v1/me", &key).await.assert_status(200);
    s.get("/v1/me", &key)
        .await
        .assert_error(429, "RATE_LIMITED");
}

#[tokio::test]
async fn tiers_and_the_org_default_apply_and_unlimited_keys_carry_no_headers() {
    let s = TestServer::start().await;
    let (_, free) = limited_agent(&s, json!({"tier": "free"})).await;
    let r = s.get("/v1/me", &free).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
    assert_eq!(r.header("x-ratelimit-remaining"), Some("9"));

    let (_, _, unlimited) = s
        .create_agent("plain", json!({"slack": ["chat:write"]}))
        .await;
    let r = s.get("/v1/me", &unlimited).await;
    assert!(r.header("x-ratelimit-limit").is_none());

    // The org default applies to keys with rate_limit null (after the org policy changes).
    s.patch(
        &s.org_path(""),
        &s.root_key,
        json!({"policy": {"default_rate_limit": {"tier": "pro"}}}),
    )
    .await
    .assert_status(200);
    let r = s.get("/v1/me", &unlimited).await;
    assert_eq!(r.header("x-ratelimit-limit"), Some("1000"));
}

#[tokio::test]
async fn a_derived_key_draws_from_its_parents_bucket() {
    let s = TestServer::start().await;
    let (_, key) = limited_agent(&s, json!({"limit": 1, "period_s": 3600, "burst": 2})).await;
    let d = s
        .post(
            "/v1/keys/derive",
            &key,
            json!({"scopes": ["slack:chat:write"], "expires_in": 60}),
        )
        .await;
    let derived = d.assert_status(201)["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    // The derive used one of two; the derived key gets the last one, then both are limited.
    s.get("/v1/me", &derived).await.assert_status(200);
    s.get("/v1/me", &derived)
        .await
        .assert_error(429, "RATE_LIMITED");
    s.get("/v1/me", &key)
        .await
        .assert_error(429, "RATE_LIMITED");
}

#[tokio::test]
async fn verify_counts_against_the_verified_keys_limit_and_reports_it() {
    let s = TestServer::start().await;
    let (_, key) = limited_agent(&s, json!({"limit": 10, "period_s": 10, "burst": 2})).await;
    let v = |k: String| s.post("/v1/keys/verify", &s.root_key, json!({"key": k}));
    let first = v(key.clone()).await;
    let b = first.assert_status(200);
    assert_eq!(b["code"], "VALID");
    assert_eq!(b["ratelimit"]["limit"], 10);
    assert_eq!(b["ratelimit"]["remaining"], 1);
    assert_eq!(v(key.clone()).await.body["code"], "VALID");
    let limited = v(key.clone()).await;
    assert_eq!(limited.body["valid"], false);
    assert_eq!(limited.body["code"], "RATE_LIMITED");
    // A direct call is limited too: they share the bucket.
    s.get("/v1/me", &key)
        .await
        .assert_error(429, "RATE_LIMITED");
}

#[tokio::test]
async fn constraints_narrow_the_scopes_of_one_request() {
    let s = TestServer::start().await;
    let (_, key) = limited_agent(&s, json!(null)).await;
    let body = json!({"scopes": ["slack:chat:write"], "expires_in": 60});
    // Narrowed to slack only, the key loses keys:derive for this request.
    let h = constraints(json!({"scopes": ["slack:chat:write"]}));
    let r = s
        .send(
            Method::POST,
            "/v1/keys/derive",
            Some(&key),
            &[("keyward-constraints", &h)],
            Some(body.clone()),
        )
        .await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
    // Without the header the same request works.
    s.post("/v1/keys/derive", &key, body)
        .await
        .assert_status(201);
    // A constraint can never widen.
    let wide = constraints(json!({"scopes": ["github:repo"]}));
    s.send(
        Method::GET,
        "/v1/me",
        Some(&key),
        &[("keyward-constraints", &wide)],
        None,
    )
    .await
    .assert_error(400, "CONSTRAINT_NOT_NARROWING");
    // Garbage and empty constraints are validation errors; padding is optional.
    s.send(
        Method::GET,
        "/v1/me",
        Some(&key),
        &[("keyward-constraints", "%%%")],
        None,
    )
    .await
    .assert_error(400, "VALIDATION_ERROR");
    s.send(
        Method::GET,
        "/v1/me",
        Some(&key),
        &[("keyward-constraints", &constraints(json!({})))],
        None,
    )
    .await
    .assert_error(400, "VALIDATION_ERROR");
    let padded = base64::engine::general_purpose::URL_SAFE
        .encode(serde_json::to_vec(&json!({"scopes": ["slack:chat:write"]})).unwrap());
    s.send(
        Method::GET,
        "/v1/me",
        Some(&key),
        &[("keyward-constraints", &padded)],
        None,
    )
    .await
    .assert_status(200);
}

#[tokio::test]
async fn a_constraint_rule_denies_matching_requests_only() {
    let s = TestServer::start().await;
    let (_, key) = limited_agent(&s, json!(null)).await;
    let deny_post = constraints(
        json!({"rule": {"rule_type": "json_match", "rule_body": {"when": {"method": "POST"}, "effect": "deny"}}}),
    );
    s.send(
        Method::GET,
        "/v1/me",
        Some(&key),
        &[("keyward-constraints", &deny_post)],
        None,
    )
    .await
    .assert_status(200);
    s.send(
        Method::POST,
        "/v1/keys/derive",
        Some(&key),
        &[("keyward-constraints", &deny_post)],
        Some(json!({"scopes": ["slack:chat:write"], "expires_in": 60})),
    )
    .await
    .assert_error(403, "POLICY_DENIED");
}

#[tokio::test]
async fn agent_and_org_rules_deny_every_matching_request_of_the_agent_or_org() {
    let s = TestServer::start().await;
    let deny_delete = json!([{"rule_type": "json_match", "rule_body": {"when": {"method": "DELETE"}, "effect": "deny"}}]);
    let b = s
        .create_agent_with(json!({
            "name": "ruled", "scopes": {"agents": ["write", "read"]},
            "policy": {"rules": [{"rule_type": "json_match", "rule_body": {"when": {"method": "GET"}, "effect": "deny"}}]}
        }))
        .await;
    let key = b["api_key"].as_str().unwrap().to_string();
    s.get(&s.org_path("/agents"), &key)
        .await
        .assert_error(403, "POLICY_DENIED");
    // The root key is not that agent: unaffected.
    s.get(&s.org_path("/agents"), &s.root_key)
        .await
        .assert_status(200);

    // An org rule applies to every key of the org, root keys included ...
    let (victim, _, _) = s.create_agent("victim", json!({})).await;
    s.patch(
        &s.org_path(""),
        &s.root_key,
        json!({"policy": {"rules": deny_delete}}),
    )
    .await
    .assert_status(200);
    let path = s.org_path(&format!("/agents/{}", victim["id"].as_str().unwrap()));
    s.delete(&path, &s.root_key)
        .await
        .assert_error(403, "POLICY_DENIED");
    // ... except a root key changing the org's own policy, so a bad rule can be repaired.
    s.patch(&s.org_path(""), &s.root_key, json!({"policy": {}}))
        .await
        .assert_status(200);
    s.delete(&path, &s.root_key).await.assert_status(200);
}

#[tokio::test]
async fn verify_applies_rules_and_constraints_to_the_facts_in_its_body() {
    let s = TestServer::start().await;
    let b = s
        .create_agent_with(json!({
            "name": "gh", "scopes": {"github": ["repo"]},
            "policy": {"rules": [{"rule_type": "json_match", "rule_body": {"when": {"provider_id": "github", "method": "DELETE"}, "effect": "deny"}}]}
        }))
        .await;
    let key = b["api_key"].as_str().unwrap().to_string();
    let v = |req: Value| s.post("/v1/keys/verify", &s.root_key, req);
    let get = v(json!({"key": key, "request": {"method": "GET", "provider_id": "github"}})).await;
    assert_eq!(get.body["code"], "VALID");
    let del =
        v(json!({"key": key, "request": {"method": "DELETE", "provider_id": "github"}})).await;
    assert_eq!(del.body["code"], "POLICY_DENIED");
    // The rule names provider_id: a request that does not carry it does not match.
    let bare = v(json!({"key": key, "request": {"method": "DELETE"}})).await;
    assert_eq!(bare.body["code"], "VALID");
    let wide = v(json!({"key": key, "constraints": {"scopes": ["slack:chat:write"]}})).await;
    assert_eq!(wide.body["code"], "CONSTRAINT_NOT_NARROWING");
    let narrowed = v(json!({"key": key, "constraints": {"scopes": ["github:repo"]}, "required_scopes": ["github:repo"]})).await;
    assert_eq!(narrowed.body["code"], "VALID");
    let bad = v(json!({"key": key, "constraints": {"nope": 1}})).await;
    bad.assert_error(400, "VALIDATION_ERROR");
}

#[tokio::test]
async fn a_cached_key_is_refused_the_moment_it_is_revoked_or_paused() {
    let s = TestServer::start().await;
    let (agent, key_json, key) = s
        .create_agent("cached", json!({"slack": ["chat:write"]}))
        .await;
    let agent_id = agent["id"].as_str().unwrap();
    // Warm the cache.
    for _ in 0..3 {
        s.get(&s.org_path(""), &key).await.assert_status(200);
    }
    s.post(
        &s.org_path(&format!("/agents/{agent_id}/pause")),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    s.get(&s.org_path(""), &key)
        .await
        .assert_error(403, "AGENT_PAUSED");
    s.post(
        &s.org_path(&format!("/agents/{agent_id}/resume")),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    s.get(&s.org_path(""), &key).await.assert_status(200);
    let kid = key_json["id"].as_str().unwrap();
    s.post(
        &format!("/v1/keys/{kid}/revoke?force=true"),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    s.get(&s.org_path(""), &key)
        .await
        .assert_error(401, "REVOKED_API_KEY");
}
