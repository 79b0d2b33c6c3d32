//! `POST /v1/keys/verify` (API.md §5): the caller's scope, the answer for valid keys and for each
//! failure (expired, revoked, paused, deleted agent, IP, scopes), other orgs' keys, bad requests.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use common::{t0, Resp, TestServer};
use keyward_core::token::{self, Environment, TokenKind};
use serde_json::{json, Value};

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn id(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {v}"))
        .to_string()
}

/// A key allowed to verify (an agent key with `keys:verify`).
async fn verifier(s: &TestServer) -> String {
    s.create_agent("verifier", json!({"keys": ["verify"]}))
        .await
        .2
}

async fn verify(s: &TestServer, caller: &str, body: Value) -> Resp {
    s.post("/v1/keys/verify", caller, body).await
}

/// Verifies (must be a well-formed request); returns the 200 body.
async fn verify_ok(s: &TestServer, caller: &str, body: Value) -> Value {
    verify(s, caller, body).await.assert_status(200).clone()
}

async fn mint_ok(s: &TestServer, agent_id: &str, body: Value) -> (Value, String) {
    let b = s
        .post(
            &s.org_path(&format!("/agents/{agent_id}/keys")),
            &s.root_key,
            body,
        )
        .await
        .assert_status(201)
        .clone();
    (b["key"].clone(), b["api_key"].as_str().unwrap().to_string())
}

#[track_caller]
fn assert_code(b: &Value, valid: bool, code: &str) {
    assert_eq!(b["valid"], json!(valid), "{b}");
    assert_eq!(b["code"], json!(code), "{b}");
}

#[tokio::test]
async fn verifying_needs_keys_verify() {
    let s = TestServer::start().await;
    let (_, _, target) = s
        .create_agent("worker", json!({"slack": ["chat:write"]}))
        .await;
    let (_, _, nope) = s
        .create_agent("nope", json!({"keys": ["read", "write", "derive"]}))
        .await;
    let r = verify(&s, &nope, json!({ "key": target })).await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_eq!(
        r.body["error"]["details"]["required"],
        json!(["keys:verify"])
    );
    // A key cannot verify itself without the scope either.
    verify(&s, &target, json!({ "key": target }))
        .await
        .assert_error(403, "INSUFFICIENT_SCOPE");
    // The root key (`*`) can.
    assert_code(
        &verify_ok(&s, &s.root_key, json!({ "key": target })).await,
        true,
        "VALID",
    );
}

#[tokio::test]
async fn a_valid_key_verifies_as_valid_with_its_details() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (agent, key, target) = s
        .create_agent("worker", json!({"slack": ["chat:write", "files:read"]}))
        .await;
    let b = verify_ok(&s, &v, json!({ "key": target })).await;
    assert_code(&b, true, "VALID");
    assert_eq!(b["key_id"], key["id"]);
    assert_eq!(b["agent_id"], agent["id"]);
    assert_eq!(b["org_id"], json!(s.org_id));
    assert_eq!(b["kind"], "agent");
    assert_eq!(b["environment"], "live");
    assert_eq!(b["scopes"], key["scopes"]);
    assert_eq!(b["deprecated"], false);
    // API.md §5's example: what the key does not have is present as null, not left out.
    let fields = b.as_object().unwrap();
    for absent in ["expires_at", "quota", "ratelimit"] {
        assert_eq!(fields.get(absent), Some(&Value::Null), "{absent} in {b}");
    }
    assert_eq!(fields.len(), 13, "every field of API.md §5: {b}");
    assert_eq!(
        b["agent"],
        json!({"id": agent["id"], "name": "worker", "status": "active"})
    );
    assert!(
        !b.to_string().contains(&target),
        "the plaintext is not echoed"
    );
}

#[tokio::test]
async fn a_test_key_with_an_expiry_reports_both() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (agent, _, _) = s
        .create_agent("sandboxed", json!({"slack": ["chat:write"]}))
        .await;
    let (key, target) = mint_ok(
        &s,
        &id(&agent),
        json!({"environment": "test", "expires_in": 600}),
    )
    .await;
    let b = verify_ok(&s, &v, json!({ "key": target })).await;
    assert_code(&b, true, "VALID");
    assert_eq!(b["key_id"], key["id"]);
    assert_eq!(b["environment"], "test");
    assert_eq!(b["expires_at"], json!(ts(t0() + Duration::seconds(600))));
}

#[tokio::test]
async fn a_derived_key_verifies_as_kind_derived() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (agent, _, parent) = s
        .create_agent(
            "deriver",
            json!({"keys": ["derive"], "slack": ["chat:write"]}),
        )
        .await;
    let d = s
        .post(
            "/v1/keys/derive",
            &parent,
            json!({"scopes": ["slack:chat:write"], "expires_in": 600}),
        )
        .await
        .assert_status(201)
        .clone();
    let b = verify_ok(&s, &v, json!({"key": d["api_key"]})).await;
    assert_code(&b, true, "VALID");
    assert_eq!(b["kind"], "derived");
    assert_eq!(b["key_id"], d["key"]["id"]);
    assert_eq!(b["agent_id"], agent["id"]);
    assert_eq!(b["scopes"], json!(["slack:chat:write"]));
}

#[tokio::test]
async fn required_scopes_that_are_implied_are_valid_and_others_are_insufficient_scope() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (_, key, target) = s
        .create_agent("worker", json!({"slack": ["chat:write", "files:read"]}))
        .await;
    let ok = verify_ok(
        &s,
        &v,
        json!({"key": target, "required_scopes": ["slack:chat:write", "slack:files:read"]}),
    )
    .await;
    assert_code(&ok, true, "VALID");
    let empty = verify_ok(&s, &v, json!({"key": target, "required_scopes": []})).await;
    assert_code(&empty, true, "VALID");
    for missing in [
        json!(["slack:admin"]),
        json!(["slack:chat:write", "github:repo"]),
        json!(["slack:*"]),
    ] {
        let b = verify_ok(&s, &v, json!({"key": target, "required_scopes": missing})).await;
        assert_code(&b, false, "INSUFFICIENT_SCOPE");
        assert_eq!(b["key_id"], key["id"], "details of the key are still given");
    }
}

#[tokio::test]
async fn a_wildcard_scope_implies_everything_under_it() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (_, _, target) = s.create_agent("wild", json!({"slack": ["*"]})).await;
    for (required, valid) in [
        (json!(["slack:chat:write"]), true),
        (json!(["slack:files:*"]), true),
        (json!(["slack:*"]), true),
        (json!(["slack:chat:write", "slack:users:read"]), true),
        (json!(["github:repo"]), false),
        (json!(["*"]), false),
    ] {
        let b = verify_ok(&s, &v, json!({"key": target, "required_scopes": required})).await;
        let code = if valid { "VALID" } else { "INSUFFICIENT_SCOPE" };
        assert_eq!(b["code"], json!(code), "required {required}: {b}");
        assert_eq!(b["valid"], json!(valid), "required {required}: {b}");
    }
}

/// Request facts are bounded at the edge: a failed verification keeps its method and path in
/// the audit log, and nothing a caller sends is kept at the size of the body limit.
#[tokio::test]
async fn request_facts_longer_than_their_limits_are_400_validation_error() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (_, _, target) = s
        .create_agent("worker", json!({"slack": ["chat:write"]}))
        .await;
    // The limits the docs and the OpenAPI document state (held here as numbers, so that a
    // change to the constant is a change to this test too).
    assert_eq!(
        keyward_proto::VerifyRequestFacts::MAX_LENGTHS,
        [
            ("method", 32),
            ("path", 4096),
            ("provider_id", 256),
            ("resource_kind", 256),
            ("app_id", 256),
            ("environment", 256),
        ]
    );
    for (field, max) in keyward_proto::VerifyRequestFacts::MAX_LENGTHS {
        // At the limit (counted in characters, here two bytes each): answered.
        let at = "é".repeat(max);
        let b = verify_ok(&s, &v, json!({"key": target, "request": {field: at}})).await;
        assert!(b["code"].is_string(), "{field}: {b}");
        let over = "é".repeat(max + 1);
        let r = verify(&s, &v, json!({"key": target, "request": {field: over}})).await;
        r.assert_error(400, "VALIDATION_ERROR");
        let message = r.body["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.starts_with(&format!("request.{field}:")),
            "{message}"
        );
    }
}

#[tokio::test]
async fn malformed_required_scopes_are_400_validation_error() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (_, _, target) = s
        .create_agent("worker", json!({"slack": ["chat:write"]}))
        .await;
    for bad in ["Slack:Chat", "slack::write", "", "slack:*:write"] {
        verify(&s, &v, json!({"key": target, "required_scopes": [bad]}))
            .await
            .assert_error(400, "VALIDATION_ERROR");
    }
}

#[tokio::test]
async fn an_expired_key_verifies_as_expired_api_key() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (agent, _, _) = s
        .create_agent("mortal", json!({"slack": ["chat:write"]}))
        .await;
    let (key, target) = mint_ok(&s, &id(&agent), json!({"expires_in": 60})).await;
    assert_code(
        &verify_ok(&s, &v, json!({ "key": target })).await,
        true,
        "VALID",
    );
    s.advance(Duration::seconds(61));
    let b = verify_ok(&s, &v, json!({ "key": target })).await;
    assert_code(&b, false, "EXPIRED_API_KEY");
    assert_eq!(b["key_id"], key["id"]);
    assert_eq!(b["expires_at"], json!(ts(t0() + Duration::seconds(60))));
}

/// API.md §5's example: a key refused before its traffic controls (here: expired) still reports
/// its rate limit as it stands, without taking from it, and its quota as this node's counter
/// has it (on a shared store the counter is the store's, which a refusal does not read: null).
#[tokio::test]
async fn an_expired_key_reports_its_limits_as_they_stand() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (agent, _, _) = s
        .create_agent("limited", json!({"slack": ["chat:write"]}))
        .await;
    let (_, target) = mint_ok(
        &s,
        &id(&agent),
        json!({
            "expires_in": 60,
            "rate_limit": {"limit": 100, "period_s": 60, "burst": 10},
            "quota": {"limit": 50, "period": "day"}
        }),
    )
    .await;
    let ok = verify_ok(&s, &v, json!({ "key": target })).await;
    assert_eq!(ok["ratelimit"]["remaining"], 9);
    assert_eq!(ok["quota"]["used"], 1);
    s.advance(Duration::seconds(61));
    for _ in 0..2 {
        let b = verify_ok(&s, &v, json!({ "key": target })).await;
        assert_code(&b, false, "EXPIRED_API_KEY");
        assert_eq!(b["ratelimit"]["limit"], 100, "{b}");
        // 61 s refilled the bucket (one token per 0.6 s) and the refusals took nothing.
        assert_eq!(b["ratelimit"]["remaining"], 10, "{b}");
        if s.store.is_shared() {
            assert!(b["quota"].is_null(), "{b}");
        } else {
            assert_eq!(b["quota"]["limit"], 50, "{b}");
            assert_eq!(b["quota"]["used"], 1, "{b}");
            assert_eq!(b["quota"]["remaining"], 49, "{b}");
        }
    }
}

#[tokio::test]
async fn a_revoked_key_verifies_as_revoked_api_key() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (_, key, target) = s
        .create_agent("revokee", json!({"slack": ["chat:write"]}))
        .await;
    s.post(
        &format!("/v1/keys/{}/revoke?force=true", id(&key)),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    let b = verify_ok(&s, &v, json!({ "key": target })).await;
    assert_code(&b, false, "REVOKED_API_KEY");
    assert_eq!(b["key_id"], key["id"]);
}

#[tokio::test]
async fn a_paused_agents_key_verifies_as_agent_paused() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (agent, _, target) = s
        .create_agent("sleepy", json!({"slack": ["chat:write"]}))
        .await;
    s.post(
        &s.org_path(&format!("/agents/{}/pause", id(&agent))),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    let b = verify_ok(&s, &v, json!({ "key": target })).await;
    assert_code(&b, false, "AGENT_PAUSED");
    assert_eq!(b["agent"]["status"], "paused");
}

#[tokio::test]
async fn a_deleted_agents_key_verifies_as_revoked_api_key() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (agent, _, target) = s
        .create_agent("gone", json!({"slack": ["chat:write"]}))
        .await;
    s.delete(&s.org_path(&format!("/agents/{}", id(&agent))), &s.root_key)
        .await
        .assert_status(200);
    let b = verify_ok(&s, &v, json!({ "key": target })).await;
    assert_code(&b, false, "REVOKED_API_KEY");
    assert_eq!(b["agent"]["status"], "revoked");
}

#[tokio::test]
async fn another_orgs_key_verifies_as_invalid_api_key_and_nothing_else() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (org_b, root_b) = s.new_org("org-b").await;
    let b_agent = s
        .post(
            &format!("/v1/orgs/{org_b}/agents"),
            &root_b,
            json!({"name": "outsider", "scopes": {"slack": ["chat:write"]}}),
        )
        .await
        .assert_status(201)
        .clone();
    let b_key = b_agent["api_key"].as_str().unwrap();
    for (caller, key) in [
        (v.as_str(), b_key),
        (v.as_str(), root_b.as_str()),
        (s.root_key.as_str(), b_key),
    ] {
        let b = verify_ok(
            &s,
            caller,
            json!({"key": key, "required_scopes": ["slack:chat:write"]}),
        )
        .await;
        assert_eq!(b, json!({"valid": false, "code": "INVALID_API_KEY"}));
    }
    // The same key is valid to its own org.
    let own = verify_ok(&s, &root_b, json!({ "key": b_key })).await;
    assert_code(&own, true, "VALID");
}

#[tokio::test]
async fn a_garbage_or_unknown_token_verifies_as_invalid_api_key_and_nothing_else() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let never_issued = token::generate(Environment::Live, TokenKind::Agent).unwrap();
    let mut bad_checksum = s.root_key.clone();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == 'a' { 'b' } else { 'a' });
    for key in [
        "garbage".to_string(),
        String::new(),
        "kw_ak_short".to_string(),
        bad_checksum,
        never_issued.expose().to_string(),
    ] {
        let b = verify_ok(&s, &v, json!({ "key": key })).await;
        assert_eq!(
            b,
            json!({"valid": false, "code": "INVALID_API_KEY"}),
            "key {key:?}"
        );
    }
}

#[tokio::test]
async fn the_request_client_ip_is_checked_against_the_keys_allowlist() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (agent, _, _) = s
        .create_agent("fenced", json!({"slack": ["chat:write"]}))
        .await;
    let (key, target) = mint_ok(
        &s,
        &id(&agent),
        json!({"cidr_allowlist": ["10.0.0.0/8", "2001:db8::/32"]}),
    )
    .await;
    for (ip, code) in [
        ("10.1.2.3", "VALID"),
        ("2001:db8::1", "VALID"),
        ("192.168.1.1", "IP_NOT_ALLOWED"),
        ("11.0.0.1", "IP_NOT_ALLOWED"),
        ("2001:db9::1", "IP_NOT_ALLOWED"),
    ] {
        let b = verify_ok(&s, &v, json!({"key": target, "request": {"client_ip": ip}})).await;
        assert_eq!(b["code"], json!(code), "client_ip {ip}: {b}");
        assert_eq!(b["valid"], json!(code == "VALID"), "client_ip {ip}");
        assert_eq!(b["key_id"], key["id"]);
    }
    // A key without an allowlist is valid from anywhere.
    let (_, open) = mint_ok(&s, &id(&agent), json!({})).await;
    let b = verify_ok(
        &s,
        &v,
        json!({"key": open, "request": {"client_ip": "192.168.1.1"}}),
    )
    .await;
    assert_code(&b, true, "VALID");
}

#[tokio::test]
async fn a_bad_client_ip_is_400_validation_error() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (_, _, target) = s
        .create_agent("worker", json!({"slack": ["chat:write"]}))
        .await;
    for bad in ["not-an-ip", "10.0.0.0/8", "300.1.1.1", ""] {
        verify(
            &s,
            &v,
            json!({"key": target, "request": {"client_ip": bad}}),
        )
        .await
        .assert_error(400, "VALIDATION_ERROR");
    }
}

#[tokio::test]
async fn an_unknown_body_field_is_400_validation_error() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (_, _, target) = s
        .create_agent("worker", json!({"slack": ["chat:write"]}))
        .await;
    verify(
        &s,
        &v,
        json!({"key": target, "scopes": ["slack:chat:write"]}),
    )
    .await
    .assert_error(400, "VALIDATION_ERROR");
    verify(
        &s,
        &v,
        json!({"key": target, "request": {"client_address": "10.0.0.1"}}),
    )
    .await
    .assert_error(400, "VALIDATION_ERROR");
    verify(&s, &v, json!({"token": target}))
        .await
        .assert_error(400, "VALIDATION_ERROR");
}

#[tokio::test]
async fn a_deprecated_key_verifies_as_valid_and_deprecated() {
    let s = TestServer::start().await;
    let v = verifier(&s).await;
    let (agent, key, target) = s
        .create_agent("legacy", json!({"slack": ["chat:write"]}))
        .await;
    s.post(
        &s.org_path(&format!(
            "/agents/{}/keys/{}/deprecate",
            id(&agent),
            id(&key)
        )),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    let b = verify_ok(&s, &v, json!({ "key": target })).await;
    assert_code(&b, true, "VALID");
    assert_eq!(b["deprecated"], true);
}
