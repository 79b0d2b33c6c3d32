//! Derived keys (`POST /v1/keys/derive`: scope and allowlist attenuation, lifetime caps, expiry,
//! agent deletion) and rotation (`POST /v1/keys/{id}/rotate`: successor, overlap window).
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use chrono::{DateTime, Duration, SecondsFormat, Utc};
use common::{t0, Resp, TestServer};
use keyward_core::clock::Clock;
use reqwest::Method;
use serde_json::{json, Value};

fn ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn now(s: &TestServer) -> DateTime<Utc> {
    s.clock.now()
}

fn id(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {v}"))
        .to_string()
}

fn api_key(b: &Value) -> String {
    b["api_key"]
        .as_str()
        .unwrap_or_else(|| panic!("no api_key: {b}"))
        .to_string()
}

/// The agent scopes every deriving test uses.
fn deriver_scopes() -> Value {
    json!({"keys": ["derive"], "slack": ["chat:write", "files:read"]})
}

/// An agent allowed to derive; returns (agent, key, api_key).
async fn deriver(s: &TestServer) -> (Value, Value, String) {
    s.create_agent("deriver", deriver_scopes()).await
}

async fn derive(s: &TestServer, caller: &str, body: Value) -> Resp {
    s.post("/v1/keys/derive", caller, body).await
}

/// Derives (must succeed); returns the whole 201 body.
async fn derive_ok(s: &TestServer, caller: &str, body: Value) -> Value {
    derive(s, caller, body).await.assert_status(201).clone()
}

async fn mint_ok(s: &TestServer, agent_id: &str, body: Value) -> Value {
    s.post(
        &s.org_path(&format!("/agents/{agent_id}/keys")),
        &s.root_key,
        body,
    )
    .await
    .assert_status(201)
    .clone()
}

async fn get_key(s: &TestServer, key_id: &str) -> Value {
    s.get(&format!("/v1/keys/{key_id}"), &s.root_key)
        .await
        .assert_status(200)
        .clone()
}

async fn rotate(s: &TestServer, key_id: &str, body: Option<Value>) -> Resp {
    s.send(
        Method::POST,
        &format!("/v1/keys/{key_id}/rotate"),
        Some(&s.root_key),
        &[],
        body,
    )
    .await
}

#[track_caller]
fn assert_deprecation_headers(r: &Resp) {
    assert_eq!(r.header("keyward-key-deprecated"), Some("true"), "{r:?}");
    assert_eq!(
        r.header("warning"),
        Some("299 - \"API key is deprecated\""),
        "{r:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Derive
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn deriving_returns_a_kw_dk_key_whose_parent_is_the_calling_key() {
    let s = TestServer::start().await;
    let (agent, key, caller) = deriver(&s).await;
    let b = derive_ok(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 3600, "name": "task-42",
               "metadata": {"run": "r1"}}),
    )
    .await;
    let dk = api_key(&b);
    assert!(dk.starts_with("kw_dk_"), "{dk}");
    assert_eq!(dk.len(), "kw_dk_".len() + 36);
    assert!(b["signing_secret"].is_null());
    let k = &b["key"];
    assert_eq!(k["kind"], "derived");
    assert_eq!(k["parent_key_id"], key["id"]);
    assert_eq!(k["agent_id"], agent["id"]);
    assert_eq!(k["org_id"], json!(s.org_id));
    assert_eq!(k["environment"], "live");
    assert_eq!(k["scopes"], json!(["slack:chat:write"]));
    assert_eq!(k["start"], json!(&dk[..12]));
    assert_eq!(k["name"], "task-42");
    assert_eq!(k["metadata"], json!({"run": "r1"}));
    assert_eq!(k["expires_at"], json!(ts(t0() + Duration::seconds(3600))));
    assert_eq!(k["created_at"], json!(ts(t0())));
    assert!(k.get("digest").is_none());
    assert!(!k.to_string().contains(&dk));

    // It works, as the same agent, with its own narrower scopes.
    let me = s.get("/v1/me", &dk).await;
    let me = me.assert_status(200);
    assert_eq!(me["id"], agent["id"]);
    assert_eq!(me["key"]["id"], k["id"]);
    assert_eq!(me["key"]["scopes"], json!(["slack:chat:write"]));
}

#[tokio::test]
async fn a_derived_key_of_a_test_key_is_a_kwt_dk_key() {
    let s = TestServer::start().await;
    let (agent, _, _) = deriver(&s).await;
    let test_key = mint_ok(&s, &id(&agent), json!({"environment": "test"})).await;
    let b = derive_ok(
        &s,
        &api_key(&test_key),
        json!({"scopes": ["slack:files:read"], "expires_in": 60}),
    )
    .await;
    assert!(api_key(&b).starts_with("kwt_dk_"));
    assert_eq!(b["key"]["environment"], "test");
}

#[tokio::test]
async fn deriving_needs_keys_derive_on_the_caller() {
    let s = TestServer::start().await;
    let (_, _, caller) = s
        .create_agent(
            "plain",
            json!({"slack": ["chat:write"], "keys": ["read", "write"]}),
        )
        .await;
    let r = derive(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 60}),
    )
    .await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_eq!(
        r.body["error"]["details"]["required"],
        json!(["keys:derive"])
    );
}

#[tokio::test]
async fn deriving_with_empty_scopes_is_400_validation_error() {
    let s = TestServer::start().await;
    let (_, _, caller) = deriver(&s).await;
    derive(&s, &caller, json!({"scopes": [], "expires_in": 60}))
        .await
        .assert_error(400, "VALIDATION_ERROR");
    // Scopes are required.
    derive(&s, &caller, json!({"expires_in": 60}))
        .await
        .assert_error(400, "VALIDATION_ERROR");
}

#[tokio::test]
async fn deriving_scopes_containing_keys_derive_is_400_validation_error() {
    let s = TestServer::start().await;
    let (_, _, caller) = deriver(&s).await;
    for scopes in [
        json!(["keys:derive"]),
        json!(["slack:chat:write", "keys:derive"]),
    ] {
        derive(&s, &caller, json!({"scopes": scopes, "expires_in": 60}))
            .await
            .assert_error(400, "VALIDATION_ERROR");
    }
}

#[tokio::test]
async fn deriving_scopes_outside_the_callers_is_400_scope_not_subset() {
    let s = TestServer::start().await;
    let (_, _, caller) = deriver(&s).await;
    for scopes in [
        json!(["slack:admin"]),
        json!(["slack:*"]),
        json!(["github:repo"]),
        json!(["slack:chat:write", "keys:read"]),
    ] {
        derive(&s, &caller, json!({"scopes": scopes, "expires_in": 60}))
            .await
            .assert_error(400, "SCOPE_NOT_SUBSET");
    }
}

#[tokio::test]
async fn deriving_an_allowlist_outside_the_callers_is_400_cidr_not_subset_and_omitted_inherits() {
    let s = TestServer::start().await;
    let (agent, _, _) = deriver(&s).await;
    let parent = mint_ok(&s, &id(&agent), json!({"cidr_allowlist": ["127.0.0.0/8"]})).await;
    let caller = api_key(&parent);
    for cidr in [
        json!(["10.0.0.0/8"]),
        json!(["127.0.0.0/8", "10.0.0.1"]),
        json!([]),
    ] {
        derive(
            &s,
            &caller,
            json!({"scopes": ["slack:chat:write"], "expires_in": 60, "cidr_allowlist": cidr}),
        )
        .await
        .assert_error(400, "CIDR_NOT_SUBSET");
    }
    let inherited = derive_ok(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 60}),
    )
    .await;
    assert_eq!(inherited["key"]["cidr_allowlist"], json!(["127.0.0.0/8"]));
    let narrower = derive_ok(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 60, "cidr_allowlist": ["127.0.0.0/16"]}),
    )
    .await;
    assert_eq!(narrower["key"]["cidr_allowlist"], json!(["127.0.0.0/16"]));
    s.get("/v1/me", &api_key(&narrower))
        .await
        .assert_status(200);

    // A caller without an allowlist may give its derived key any allowlist.
    let (_, _, open) = s.create_agent("open", deriver_scopes()).await;
    let fenced = derive_ok(
        &s,
        &open,
        json!({"scopes": ["slack:chat:write"], "expires_in": 60, "cidr_allowlist": ["10.0.0.0/8"]}),
    )
    .await;
    assert_eq!(fenced["key"]["cidr_allowlist"], json!(["10.0.0.0/8"]));
    s.get("/v1/me", &api_key(&fenced))
        .await
        .assert_error(403, "IP_NOT_ALLOWED");
}

#[tokio::test]
async fn expires_in_is_capped_at_the_orgs_max_key_ttl() {
    let s = TestServer::start().await;
    s.patch(
        &s.org_path(""),
        &s.root_key,
        json!({"policy": {"max_key_ttl_s": 3600}}),
    )
    .await
    .assert_status(200);
    let (_, _, caller) = deriver(&s).await;
    s.advance(Duration::seconds(30));
    let capped = derive_ok(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 7200}),
    )
    .await;
    assert_eq!(
        capped["key"]["expires_at"],
        json!(ts(now(&s) + Duration::seconds(3600)))
    );
    let under = derive_ok(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 1800}),
    )
    .await;
    assert_eq!(
        under["key"]["expires_at"],
        json!(ts(now(&s) + Duration::seconds(1800)))
    );
}

#[tokio::test]
async fn expires_in_defaults_to_a_cap_of_one_day_without_an_org_policy() {
    let s = TestServer::start().await;
    let (_, _, caller) = deriver(&s).await;
    let capped = derive_ok(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 10 * 86_400}),
    )
    .await;
    assert_eq!(
        capped["key"]["expires_at"],
        json!(ts(t0() + Duration::seconds(86_400)))
    );
}

#[tokio::test]
async fn expires_in_is_capped_at_the_callers_remaining_lifetime() {
    let s = TestServer::start().await;
    let (agent, _, _) = deriver(&s).await;
    let parent = mint_ok(&s, &id(&agent), json!({"expires_in": 600})).await;
    let parent_exp = parent["key"]["expires_at"].clone();
    assert_eq!(parent_exp, json!(ts(t0() + Duration::seconds(600))));
    s.advance(Duration::seconds(100));
    let b = derive_ok(
        &s,
        &api_key(&parent),
        json!({"scopes": ["slack:chat:write"], "expires_in": 3600}),
    )
    .await;
    assert_eq!(b["key"]["expires_at"], parent_exp);
    // Shorter than the parent's remaining lifetime: kept.
    let short = derive_ok(
        &s,
        &api_key(&parent),
        json!({"scopes": ["slack:chat:write"], "expires_in": 60}),
    )
    .await;
    assert_eq!(
        short["key"]["expires_at"],
        json!(ts(now(&s) + Duration::seconds(60)))
    );
}

#[tokio::test]
async fn expires_in_zero_is_400_validation_error() {
    let s = TestServer::start().await;
    let (_, _, caller) = deriver(&s).await;
    derive(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 0}),
    )
    .await
    .assert_error(400, "VALIDATION_ERROR");
    derive(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": -5}),
    )
    .await
    .assert_error(400, "VALIDATION_ERROR");
}

#[tokio::test]
async fn deriving_with_an_unknown_field_is_400_validation_error() {
    let s = TestServer::start().await;
    let (_, _, caller) = deriver(&s).await;
    derive(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 60, "environment": "test"}),
    )
    .await
    .assert_error(400, "VALIDATION_ERROR");
}

#[tokio::test]
async fn a_derived_key_calling_derive_is_403_insufficient_scope() {
    let s = TestServer::start().await;
    let (_, _, caller) = deriver(&s).await;
    let b = derive_ok(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 600}),
    )
    .await;
    let r = derive(
        &s,
        &api_key(&b),
        json!({"scopes": ["slack:chat:write"], "expires_in": 60}),
    )
    .await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
}

#[tokio::test]
async fn a_derived_key_expires_and_then_gets_401_expired_api_key() {
    let s = TestServer::start().await;
    let (_, _, caller) = deriver(&s).await;
    let b = derive_ok(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 60}),
    )
    .await;
    let dk = api_key(&b);
    s.get("/v1/me", &dk).await.assert_status(200);
    s.advance(Duration::seconds(59));
    s.get("/v1/me", &dk).await.assert_status(200);
    s.advance(Duration::seconds(2));
    s.get("/v1/me", &dk)
        .await
        .assert_error(401, "EXPIRED_API_KEY");
    s.get(&s.org_path(""), &dk)
        .await
        .assert_error(401, "EXPIRED_API_KEY");
    // The parent, which has no expiry, still works.
    s.get("/v1/me", &caller).await.assert_status(200);
}

#[tokio::test]
async fn derived_keys_of_a_deleted_agent_get_401_revoked_api_key() {
    let s = TestServer::start().await;
    let (agent, _, caller) = deriver(&s).await;
    let b = derive_ok(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 600}),
    )
    .await;
    let dk = api_key(&b);
    s.get(&s.org_path(""), &dk).await.assert_status(200);
    s.delete(&s.org_path(&format!("/agents/{}", id(&agent))), &s.root_key)
        .await
        .assert_status(200);
    s.get(&s.org_path(""), &dk)
        .await
        .assert_error(401, "REVOKED_API_KEY");
    s.get(&s.org_path(""), &caller)
        .await
        .assert_error(401, "REVOKED_API_KEY");
    // The derived key's own record is left as it was.
    assert!(get_key(&s, &id(&b["key"])).await["revoked_at"].is_null());
    // Self-diagnosis still works and shows the tombstone.
    let me = s.get("/v1/me", &dk).await;
    assert_eq!(me.assert_status(200)["status"], "revoked");
}

// ---------------------------------------------------------------------------------------------
// Rotate
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn rotating_needs_keys_admin() {
    let s = TestServer::start().await;
    let (_, key, writer) = s
        .create_agent("writer", json!({"keys": ["read", "write"]}))
        .await;
    let r = s
        .post(&format!("/v1/keys/{}/rotate", id(&key)), &writer, json!({}))
        .await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_eq!(
        r.body["error"]["details"]["required"],
        json!(["keys:admin"])
    );
    assert!(get_key(&s, &id(&key)).await["successor_key_id"].is_null());
}

#[tokio::test]
async fn rotating_mints_a_successor_with_the_same_settings_and_deprecates_the_old_key() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("rotor", json!({"slack": ["chat:write", "files:read"]}))
        .await;
    let old = mint_ok(
        &s,
        &id(&agent),
        json!({
            "name": "prod",
            "scopes": ["slack:chat:write"],
            "environment": "test",
            "cidr_allowlist": ["127.0.0.0/8", "10.0.0.0/8"],
            "rate_limit": {"limit": 5000, "period_s": 60, "burst": 500},
            "quota": {"limit": 100000, "period": "month"},
            "alert_thresholds": [75, 100],
            "metadata": {"owner": "ops"}
        }),
    )
    .await;
    let old_key = &old["key"];
    s.advance(Duration::hours(2));
    let r = rotate(&s, &id(old_key), Some(json!({"overlap_days": 3}))).await;
    let b = r.assert_status(201).clone();
    let new_api = api_key(&b);
    assert!(new_api.starts_with("kwt_ak_"), "{new_api}");
    let new = &b["key"];
    assert_ne!(new["id"], old_key["id"]);
    assert_eq!(new["start"], json!(&new_api[..12]));
    for f in [
        "kind",
        "environment",
        "agent_id",
        "org_id",
        "scopes",
        "cidr_allowlist",
        "rate_limit",
        "quota",
        "alert_thresholds",
        "metadata",
        "requires_signature",
    ] {
        assert_eq!(new[f], old_key[f], "successor's `{f}`");
    }
    assert_eq!(new["created_at"], json!(ts(now(&s))));
    assert!(new["deprecated_at"].is_null());
    assert!(new["revoked_at"].is_null());
    assert!(new["successor_key_id"].is_null());
    assert!(new["expires_at"].is_null());

    let after = get_key(&s, &id(old_key)).await;
    assert_eq!(after["deprecated_at"], json!(ts(now(&s))));
    assert_eq!(after["expires_at"], json!(ts(now(&s) + Duration::days(3))));
    assert_eq!(after["successor_key_id"], new["id"]);
    assert!(after["revoked_at"].is_null());

    // Both work; the successor has no deprecation headers.
    let me_new = s.get("/v1/me", &new_api).await;
    assert_eq!(me_new.assert_status(200)["key"]["id"], new["id"]);
    assert_eq!(me_new.header("keyward-key-deprecated"), None);
    let me_old = s.get("/v1/me", &api_key(&old)).await;
    me_old.assert_status(200);
    assert_deprecation_headers(&me_old);
}

#[tokio::test]
async fn rotating_a_root_key_mints_a_root_successor() {
    let s = TestServer::start().await;
    let root_id = s
        .get(&s.org_path("/keys?kind=root"), &s.root_key)
        .await
        .assert_status(200)["keys"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = rotate(&s, &root_id, None).await;
    let b = r.assert_status(201).clone();
    assert!(api_key(&b).starts_with("kw_rk_"));
    assert_eq!(b["key"]["kind"], "root");
    assert_eq!(b["key"]["scopes"], json!(["*"]));
    s.get(&s.org_path("/agents"), &api_key(&b))
        .await
        .assert_status(200);
}

#[tokio::test]
async fn rotating_with_an_empty_body_uses_a_seven_day_overlap() {
    let s = TestServer::start().await;
    let (_, key, _) = s
        .create_agent("defaults", json!({"slack": ["chat:write"]}))
        .await;
    let r = rotate(&s, &id(&key), None).await;
    let b = r.assert_status(201).clone();
    let old = get_key(&s, &id(&key)).await;
    assert_eq!(old["expires_at"], json!(ts(t0() + Duration::days(7))));
    assert_eq!(old["deprecated_at"], json!(ts(t0())));
    assert_eq!(old["successor_key_id"], b["key"]["id"]);

    // `{}` means the same.
    let (_, key2, _) = s
        .create_agent("defaults-2", json!({"slack": ["chat:write"]}))
        .await;
    rotate(&s, &id(&key2), Some(json!({})))
        .await
        .assert_status(201);
    assert_eq!(
        get_key(&s, &id(&key2)).await["expires_at"],
        json!(ts(t0() + Duration::days(7)))
    );
}

#[tokio::test]
async fn the_old_key_works_during_the_overlap_and_expires_after_it() {
    let s = TestServer::start().await;
    let (_, key, old_api) = s
        .create_agent("overlap", json!({"slack": ["chat:write"]}))
        .await;
    let b = rotate(&s, &id(&key), Some(json!({"overlap_days": 1})))
        .await
        .assert_status(201)
        .clone();
    let new_api = api_key(&b);
    s.advance(Duration::hours(23));
    let during = s.get(&s.org_path(""), &old_api).await;
    during.assert_status(200);
    assert_deprecation_headers(&during);
    s.advance(Duration::hours(2));
    let after = s.get(&s.org_path(""), &old_api).await;
    after.assert_error(401, "EXPIRED_API_KEY");
    assert_deprecation_headers(&after);
    let succ = s.get(&s.org_path(""), &new_api).await;
    succ.assert_status(200);
    assert_eq!(succ.header("keyward-key-deprecated"), None);
}

#[tokio::test]
async fn a_zero_day_overlap_expires_the_old_key_at_once() {
    let s = TestServer::start().await;
    let (_, key, old_api) = s
        .create_agent("instant", json!({"slack": ["chat:write"]}))
        .await;
    let b = rotate(&s, &id(&key), Some(json!({"overlap_days": 0})))
        .await
        .assert_status(201)
        .clone();
    assert_eq!(get_key(&s, &id(&key)).await["expires_at"], json!(ts(t0())));
    s.advance(Duration::seconds(1));
    s.get("/v1/me", &old_api)
        .await
        .assert_error(401, "EXPIRED_API_KEY");
    s.get("/v1/me", &api_key(&b)).await.assert_status(200);
}

#[tokio::test]
async fn an_old_expiry_sooner_than_the_overlap_is_kept() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("shortlived", json!({"slack": ["chat:write"]}))
        .await;
    let old = mint_ok(&s, &id(&agent), json!({"expires_in": 3600})).await;
    let exp = old["key"]["expires_at"].clone();
    assert_eq!(exp, json!(ts(t0() + Duration::seconds(3600))));
    rotate(&s, &id(&old["key"]), Some(json!({"overlap_days": 7})))
        .await
        .assert_status(201);
    let after = get_key(&s, &id(&old["key"])).await;
    assert_eq!(after["expires_at"], exp);
    assert_eq!(after["deprecated_at"], json!(ts(t0())));
}

#[tokio::test]
async fn overlap_days_outside_0_to_30_is_400_validation_error() {
    let s = TestServer::start().await;
    let (_, key, _) = s
        .create_agent("bounds", json!({"slack": ["chat:write"]}))
        .await;
    for bad in [
        json!({"overlap_days": 31}),
        json!({"overlap_days": -1}),
        json!({"overlap": 3}),
    ] {
        rotate(&s, &id(&key), Some(bad))
            .await
            .assert_error(400, "VALIDATION_ERROR");
    }
    // Nothing was rotated by the rejected requests.
    let k = get_key(&s, &id(&key)).await;
    assert!(k["successor_key_id"].is_null());
    assert!(k["deprecated_at"].is_null());
    rotate(&s, &id(&key), Some(json!({"overlap_days": 30})))
        .await
        .assert_status(201);
    assert_eq!(
        get_key(&s, &id(&key)).await["expires_at"],
        json!(ts(t0() + Duration::days(30)))
    );
}

#[tokio::test]
async fn rotating_a_derived_key_is_400_derived_key_not_rotatable() {
    let s = TestServer::start().await;
    let (_, _, caller) = deriver(&s).await;
    let d = derive_ok(
        &s,
        &caller,
        json!({"scopes": ["slack:chat:write"], "expires_in": 600}),
    )
    .await;
    rotate(&s, &id(&d["key"]), None)
        .await
        .assert_error(400, "DERIVED_KEY_NOT_ROTATABLE");
}

#[tokio::test]
async fn rotating_a_revoked_key_is_409_key_already_revoked() {
    let s = TestServer::start().await;
    let (_, key, _) = s
        .create_agent("revrot", json!({"slack": ["chat:write"]}))
        .await;
    s.post(
        &format!("/v1/keys/{}/revoke?force=true", id(&key)),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    rotate(&s, &id(&key), None)
        .await
        .assert_error(409, "KEY_ALREADY_REVOKED");
}

#[tokio::test]
async fn rotating_an_unknown_key_is_404_key_not_found() {
    let s = TestServer::start().await;
    rotate(&s, "0190f5c2-0000-7000-8000-000000000000", None)
        .await
        .assert_error(404, "KEY_NOT_FOUND");
}

#[tokio::test]
async fn revoking_the_old_key_after_rotation_needs_no_force_and_the_successor_survives() {
    let s = TestServer::start().await;
    let (agent, key, old_api) = s
        .create_agent("handover", json!({"slack": ["chat:write"]}))
        .await;
    let b = rotate(&s, &id(&key), None).await.assert_status(201).clone();
    let new_id = id(&b["key"]);
    s.post(
        &s.org_path(&format!("/agents/{}/keys/{}/revoke", id(&agent), id(&key))),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    s.get("/v1/me", &old_api)
        .await
        .assert_error(401, "REVOKED_API_KEY");
    let me = s.get("/v1/me", &api_key(&b)).await;
    assert_eq!(me.assert_status(200)["key"]["id"], json!(new_id));
    assert!(get_key(&s, &new_id).await["revoked_at"].is_null());
    // The successor is now the agent's last key.
    s.post(&format!("/v1/keys/{new_id}/revoke"), &s.root_key, json!({}))
        .await
        .assert_error(409, "LAST_ACTIVE_KEY");
}
