//! Request signing (API.md §6.5) through the real server: the secret is shown once, every
//! request of a signing key must carry a fresh HMAC over method, path (with query), timestamp
//! and body, and verify checks signatures given in its body.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use common::{t0, TestServer};
use keyward_core::token::sign_request;
use reqwest::Method;
use serde_json::json;

async fn signing_agent(s: &TestServer) -> (String, String, String) {
    let b = s
        .create_agent_with(json!({
            "name": "signer",
            "scopes": {"keys": ["derive"], "slack": ["chat:write"]},
            "key": {"requires_signature": true}
        }))
        .await;
    let secret = b["signing_secret"].as_str().unwrap().to_string();
    assert!(
        secret.starts_with("kwss_") && secret.len() == 48,
        "{secret}"
    );
    assert_eq!(b["key"]["requires_signature"], json!(true));
    (
        b["agent"]["id"].as_str().unwrap().to_string(),
        b["api_key"].as_str().unwrap().to_string(),
        secret,
    )
}

fn signed(secret: &str, method: &str, path: &str, ts: i64, body: &[u8]) -> (String, String) {
    (ts.to_string(), sign_request(secret, method, path, ts, body))
}

#[tokio::test]
async fn a_correctly_signed_request_is_accepted_once_and_its_replay_refused() {
    let s = TestServer::start().await;
    let (_, key, secret) = signing_agent(&s).await;
    let ts = t0().timestamp();
    let (t, sig) = signed(&secret, "GET", "/v1/me", ts, b"");
    let h = [("x-timestamp", t.as_str()), ("x-signature", sig.as_str())];
    let r = s.send(Method::GET, "/v1/me", Some(&key), &h, None).await;
    r.assert_status(200);
    let again = s.send(Method::GET, "/v1/me", Some(&key), &h, None).await;
    again.assert_error(401, "SIGNATURE_REPLAYED");
}

#[tokio::test]
async fn missing_or_wrong_signatures_are_signature_invalid() {
    let s = TestServer::start().await;
    let (_, key, secret) = signing_agent(&s).await;
    s.get("/v1/me", &key)
        .await
        .assert_error(401, "SIGNATURE_INVALID");
    let ts = t0().timestamp();
    // Signed for another path.
    let (t, sig) = signed(&secret, "GET", "/v1/other", ts, b"");
    let h = [("x-timestamp", t.as_str()), ("x-signature", sig.as_str())];
    s.send(Method::GET, "/v1/me", Some(&key), &h, None)
        .await
        .assert_error(401, "SIGNATURE_INVALID");
    // Signed with another secret.
    let (t, sig) = signed("kwss_not-the-secret", "GET", "/v1/me", ts, b"");
    let h = [("x-timestamp", t.as_str()), ("x-signature", sig.as_str())];
    s.send(Method::GET, "/v1/me", Some(&key), &h, None)
        .await
        .assert_error(401, "SIGNATURE_INVALID");
}

#[tokio::test]
async fn a_timestamp_outside_300_seconds_is_signature_expired() {
    let s = TestServer::start().await;
    let (_, key, secret) = signing_agent(&s).await;
    for ts in [t0().timestamp() - 301, t0().timestamp() + 301] {
        let (t, sig) = signed(&secret, "GET", "/v1/me", ts, b"");
        let h = [("x-timestamp", t.as_str()), ("x-signature", sig.as_str())];
        s.send(Method::GET, "/v1/me", Some(&key), &h, None)
            .await
            .assert_error(401, "SIGNATURE_EXPIRED");
    }
    // Exactly at the edge is still inside the window.
    let (t, sig) = signed(&secret, "GET", "/v1/me", t0().timestamp() - 300, b"");
    let h = [("x-timestamp", t.as_str()), ("x-signature", sig.as_str())];
    s.send(Method::GET, "/v1/me", Some(&key), &h, None)
        .await
        .assert_status(200);
}

#[tokio::test]
async fn the_signature_covers_the_body_and_the_query_string() {
    let s = TestServer::start().await;
    let (agent_id, key, secret) = signing_agent(&s).await;
    let body = json!({"scopes": ["slack:chat:write"], "expires_in": 60});
    let bytes = serde_json::to_vec(&body).unwrap();
    let ts = t0().timestamp();
    let (t, sig) = signed(&secret, "POST", "/v1/keys/derive", ts, &bytes);
    let send = |b: Vec<u8>, t: String, sig: String| {
        s.http
            .post(format!("{}/v1/keys/derive", s.base))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .header("x-timestamp", t)
            .header("x-signature", sig)
            .body(b)
            .send()
    };
    // A tampered body fails; the exact body signed succeeds.
    let tampered =
        serde_json::to_vec(&json!({"scopes": ["slack:chat:write"], "expires_in": 61})).unwrap();
    let r = send(tampered, t.clone(), sig.clone()).await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let r = send(bytes, t, sig).await.unwrap();
    assert_eq!(r.status().as_u16(), 201);

    let path = format!("/v1/orgs/{}/agents/{agent_id}", s.org_id);
    let with_query = format!("{path}?x=1");
    let (t, sig) = signed(&secret, "GET", &path, ts, b"");
    let h = [("x-timestamp", t.as_str()), ("x-signature", sig.as_str())];
    // Signed without the query string but sent with one: refused before any scope check.
    s.send(Method::GET, &with_query, Some(&key), &h, None)
        .await
        .assert_error(401, "SIGNATURE_INVALID");
}

#[tokio::test]
async fn verify_checks_the_signature_given_in_its_body() {
    let s = TestServer::start().await;
    let (_, key, secret) = signing_agent(&s).await;
    let ts = t0().timestamp();
    let sig = sign_request(&secret, "POST", "/charge", ts, b"{}");
    let verify = |sig: serde_json::Value| {
        s.post(
            "/v1/keys/verify",
            &s.root_key,
            json!({"key": key, "signature": sig}),
        )
    };
    let ok = verify(
        json!({"value": sig, "timestamp": ts, "method": "POST", "path": "/charge", "body": "{}"}),
    )
    .await;
    assert_eq!(ok.assert_status(200)["code"], "VALID");
    let replay = verify(
        json!({"value": sig, "timestamp": ts, "method": "POST", "path": "/charge", "body": "{}"}),
    )
    .await;
    assert_eq!(replay.assert_status(200)["code"], "SIGNATURE_REPLAYED");
    let missing = s
        .post("/v1/keys/verify", &s.root_key, json!({"key": key}))
        .await;
    assert_eq!(missing.assert_status(200)["code"], "SIGNATURE_INVALID");
    let old = sign_request(&secret, "POST", "/charge", ts - 1000, b"{}");
    let expired = verify(json!({"value": old, "timestamp": ts - 1000, "method": "POST", "path": "/charge", "body": "{}"})).await;
    assert_eq!(expired.assert_status(200)["code"], "SIGNATURE_EXPIRED");
}

#[tokio::test]
async fn the_signing_secret_is_never_returned_again() {
    let s = TestServer::start().await;
    let (agent_id, _, secret) = signing_agent(&s).await;
    let list = s
        .get(
            &s.org_path(&format!("/agents/{agent_id}/keys")),
            &s.root_key,
        )
        .await;
    let text = list.assert_status(200).to_string();
    assert!(!text.contains(&secret));
    assert!(!text.contains("signing_secret"));
}
