//! Keys over HTTP (API.md §3, §4): minting agent and root keys, listing, reading, patching,
//! deprecation with its headers, revocation with the last-active guard and the cascade.
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

/// The members of a JSON string array, sorted.
fn sorted(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

/// The ids of a `{"keys": [...]}` list, in order.
fn ids(body: &Value) -> Vec<String> {
    body["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("no keys list: {body}"))
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect()
}

fn id(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {v}"))
        .to_string()
}

/// Every field of a Key the contract lists.
const KEY_FIELDS: [&str; 21] = [
    "id",
    "org_id",
    "agent_id",
    "parent_key_id",
    "kind",
    "environment",
    "name",
    "start",
    "scopes",
    "cidr_allowlist",
    "rate_limit",
    "quota",
    "alert_thresholds",
    "requires_signature",
    "expires_at",
    "deprecated_at",
    "revoked_at",
    "successor_key_id",
    "last_used_at",
    "created_at",
    "metadata",
];

/// A Key body has the contract's fields and nothing that looks like a digest or a plaintext.
#[track_caller]
fn assert_key_shape(key: &Value) {
    let obj = key
        .as_object()
        .unwrap_or_else(|| panic!("key is not an object: {key}"));
    for f in KEY_FIELDS {
        assert!(obj.contains_key(f), "key lacks `{f}`: {key}");
    }
    for name in obj.keys() {
        let n = name.to_ascii_lowercase();
        for bad in ["digest", "hash", "secret", "plaintext", "api_key", "token"] {
            assert!(!n.contains(bad), "key body has a `{name}` field: {key}");
        }
    }
}

/// The plaintext appears nowhere in a serialized body.
#[track_caller]
fn assert_no_plaintext(body: &Value, api_key: &str) {
    let text = body.to_string();
    assert!(!text.contains(api_key), "plaintext leaked in {text}");
    // Not even the random part after the display start.
    assert!(
        !text.contains(&api_key[12..]),
        "plaintext body leaked in {text}"
    );
}

fn agent_keys_path(s: &TestServer, agent_id: &str) -> String {
    s.org_path(&format!("/agents/{agent_id}/keys"))
}

async fn mint(s: &TestServer, agent_id: &str, body: Value) -> Resp {
    s.post(&agent_keys_path(s, agent_id), &s.root_key, body)
        .await
}

/// Mints a key for an agent (must succeed); returns (key JSON, api_key).
async fn mint_ok(s: &TestServer, agent_id: &str, body: Value) -> (Value, String) {
    let b = mint(s, agent_id, body).await.assert_status(201).clone();
    (b["key"].clone(), b["api_key"].as_str().unwrap().to_string())
}

async fn post_empty(s: &TestServer, path: &str, key: &str) -> Resp {
    s.send(Method::POST, path, Some(key), &[], None).await
}

async fn get_key(s: &TestServer, key_id: &str) -> Value {
    s.get(&format!("/v1/keys/{key_id}"), &s.root_key)
        .await
        .assert_status(200)
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Minting agent keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn minting_another_agent_key_returns_201_with_a_kw_ak_token_and_its_display_start() {
    let s = TestServer::start().await;
    let (agent, first, _) = s
        .create_agent("minter", json!({"slack": ["chat:write", "files:read"]}))
        .await;
    let r = mint(&s, &id(&agent), json!({"name": "second"})).await;
    let b = r.assert_status(201);
    let api_key = b["api_key"].as_str().unwrap();
    assert!(api_key.starts_with("kw_ak_"), "{api_key}");
    assert_eq!(api_key.len(), "kw_ak_".len() + 36);
    assert!(b["signing_secret"].is_null());
    let key = &b["key"];
    assert_key_shape(key);
    assert_no_plaintext(key, api_key);
    assert_eq!(key["start"], json!(&api_key[..12]));
    assert_eq!(key["kind"], "agent");
    assert_eq!(key["environment"], "live");
    assert_eq!(key["name"], "second");
    assert_eq!(key["agent_id"], agent["id"]);
    assert_eq!(key["org_id"], json!(s.org_id));
    assert!(key["parent_key_id"].is_null());
    assert_ne!(key["id"], first["id"]);
    assert_eq!(
        sorted(&key["scopes"]),
        vec!["slack:chat:write", "slack:files:read"]
    );
    assert_eq!(key["requires_signature"], false);
    assert!(key["expires_at"].is_null());
    assert!(key["revoked_at"].is_null());
    assert!(key["deprecated_at"].is_null());
    assert_eq!(key["created_at"], json!(ts(t0())));

    // The new key authenticates as the agent.
    let me = s.get("/v1/me", api_key).await;
    let me = me.assert_status(200);
    assert_eq!(me["id"], agent["id"]);
    assert_eq!(me["key"]["id"], key["id"]);
}

#[tokio::test]
async fn key_bodies_never_carry_a_digest_or_the_plaintext_in_any_response() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("leaky", json!({"slack": ["chat:write"]}))
        .await;
    let (key, api_key) = mint_ok(&s, &id(&agent), json!({})).await;
    let kid = id(&key);

    let one = get_key(&s, &kid).await;
    assert_key_shape(&one);
    assert_no_plaintext(&one, &api_key);

    let list = s.get(&agent_keys_path(&s, &id(&agent)), &s.root_key).await;
    let list = list.assert_status(200);
    assert_no_plaintext(list, &api_key);
    for k in list["keys"].as_array().unwrap() {
        assert_key_shape(k);
    }

    let org_list = s.get(&s.org_path("/keys"), &s.root_key).await;
    let org_list = org_list.assert_status(200);
    assert_no_plaintext(org_list, &api_key);
    for k in org_list["keys"].as_array().unwrap() {
        assert_key_shape(k);
    }

    let me = s.get("/v1/me", &api_key).await;
    assert_no_plaintext(me.assert_status(200), &api_key);
    assert_key_shape(&me.body["key"]);
}

#[tokio::test]
async fn minting_scopes_outside_the_agents_is_400_scope_not_subset() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("narrow", json!({"slack": ["chat:write", "files:read"]}))
        .await;
    let aid = id(&agent);
    for scopes in [
        json!(["slack:admin"]),
        json!(["slack:*"]),
        json!(["github:repo"]),
        json!(["slack:chat:write", "keys:admin"]),
    ] {
        mint(&s, &aid, json!({ "scopes": scopes }))
            .await
            .assert_error(400, "SCOPE_NOT_SUBSET");
    }
    // A subset is kept exactly.
    let (key, _) = mint_ok(&s, &aid, json!({"scopes": ["slack:files:read"]})).await;
    assert_eq!(key["scopes"], json!(["slack:files:read"]));
}

#[tokio::test]
async fn a_test_environment_key_has_the_kwt_ak_prefix() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("sandbox", json!({"slack": ["chat:write"]}))
        .await;
    let (key, api_key) = mint_ok(&s, &id(&agent), json!({"environment": "test"})).await;
    assert!(api_key.starts_with("kwt_ak_"), "{api_key}");
    assert_eq!(api_key.len(), "kwt_ak_".len() + 36);
    assert_eq!(key["environment"], "test");
    assert_eq!(key["start"], json!(&api_key[..12]));
    s.get("/v1/me", &api_key).await.assert_status(200);
}

#[tokio::test]
async fn an_unknown_environment_is_400_validation_error() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("envy", json!({"slack": ["chat:write"]}))
        .await;
    for env in ["prod", "LIVE", ""] {
        mint(&s, &id(&agent), json!({ "environment": env }))
            .await
            .assert_error(400, "VALIDATION_ERROR");
    }
}

#[tokio::test]
async fn expires_in_zero_is_400_and_a_positive_one_sets_expires_at() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("mortal", json!({"slack": ["chat:write"]}))
        .await;
    mint(&s, &id(&agent), json!({"expires_in": 0}))
        .await
        .assert_error(400, "VALIDATION_ERROR");
    let (key, _) = mint_ok(&s, &id(&agent), json!({"expires_in": 3600})).await;
    assert_eq!(key["expires_at"], json!(ts(t0() + Duration::seconds(3600))));
}

#[tokio::test]
async fn a_garbage_cidr_is_400_validation_error() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("netty", json!({"slack": ["chat:write"]}))
        .await;
    for cidr in ["not-a-cidr", "10.0.0.0/33", "300.1.1.1", ""] {
        mint(&s, &id(&agent), json!({ "cidr_allowlist": [cidr] }))
            .await
            .assert_error(400, "VALIDATION_ERROR");
    }
    let (key, _) = mint_ok(&s, &id(&agent), json!({"cidr_allowlist": ["10.0.0.0/8"]})).await;
    assert_eq!(key["cidr_allowlist"], json!(["10.0.0.0/8"]));
}

#[tokio::test]
async fn an_unknown_rate_limit_tier_is_400_and_a_known_one_is_stored() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("tiered", json!({"slack": ["chat:write"]}))
        .await;
    mint(&s, &id(&agent), json!({"rate_limit": {"tier": "platinum"}}))
        .await
        .assert_error(400, "VALIDATION_ERROR");
    let (key, _) = mint_ok(&s, &id(&agent), json!({"rate_limit": {"tier": "pro"}})).await;
    assert_eq!(key["rate_limit"], json!({"tier": "pro"}));
    assert_eq!(
        get_key(&s, &id(&key)).await["rate_limit"],
        json!({"tier": "pro"})
    );
}

#[tokio::test]
async fn a_custom_rate_limit_and_a_quota_are_stored_as_given() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("limited", json!({"slack": ["chat:write"]}))
        .await;
    let rl = json!({"limit": 5000, "period_s": 60, "burst": 500});
    let quota = json!({"limit": 100000, "period": "day"});
    let (key, _) = mint_ok(
        &s,
        &id(&agent),
        json!({"rate_limit": rl, "quota": quota, "alert_thresholds": [80, 100]}),
    )
    .await;
    assert_eq!(key["rate_limit"], rl);
    assert_eq!(key["quota"], quota);
    assert_eq!(key["alert_thresholds"], json!([80, 100]));
    let read = get_key(&s, &id(&key)).await;
    assert_eq!(read["rate_limit"], rl);
    assert_eq!(read["quota"], quota);
    assert_eq!(read["alert_thresholds"], json!([80, 100]));
}

#[tokio::test]
async fn alert_thresholds_of_0_or_101_are_400_validation_error() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("alerty", json!({"slack": ["chat:write"]}))
        .await;
    for t in [json!([0]), json!([101]), json!([50, 101])] {
        mint(
            &s,
            &id(&agent),
            json!({"quota": {"limit": 1000, "period": "day"}, "alert_thresholds": t}),
        )
        .await
        .assert_error(400, "VALIDATION_ERROR");
    }
    let (key, _) = mint_ok(
        &s,
        &id(&agent),
        json!({"quota": {"limit": 1000, "period": "day"}, "alert_thresholds": [1, 100]}),
    )
    .await;
    assert_eq!(key["alert_thresholds"], json!([1, 100]));
}

#[tokio::test]
async fn requires_signature_returns_a_kwss_signing_secret_once() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("signer", json!({"slack": ["chat:write"]}))
        .await;
    let b = mint(&s, &id(&agent), json!({"requires_signature": true}))
        .await
        .assert_status(201)
        .clone();
    let secret = b["signing_secret"]
        .as_str()
        .expect("signing_secret present");
    assert!(secret.starts_with("kwss_"), "{secret}");
    assert_eq!(secret.len(), 48);
    assert!(
        secret[5..].bytes().all(|c| c.is_ascii_alphanumeric()),
        "{secret}"
    );
    assert_eq!(b["key"]["requires_signature"], true);
    assert_key_shape(&b["key"]);
    // Never again: reading the key shows neither the secret nor the plaintext.
    let read = get_key(&s, &id(&b["key"])).await;
    assert_eq!(read["requires_signature"], true);
    assert!(!read.to_string().contains(secret));
    assert_no_plaintext(&read, b["api_key"].as_str().unwrap());
}

#[tokio::test]
async fn minting_for_a_revoked_agent_is_409_agent_revoked() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("goner", json!({"slack": ["chat:write"]}))
        .await;
    s.delete(&s.org_path(&format!("/agents/{}", id(&agent))), &s.root_key)
        .await
        .assert_status(200);
    mint(&s, &id(&agent), json!({}))
        .await
        .assert_error(409, "AGENT_REVOKED");
}

#[tokio::test]
async fn minting_for_an_unknown_agent_is_404_agent_not_found() {
    let s = TestServer::start().await;
    mint(&s, "0190f5c2-0000-7000-8000-000000000000", json!({}))
        .await
        .assert_error(404, "AGENT_NOT_FOUND");
}

#[tokio::test]
async fn minting_needs_keys_write() {
    let s = TestServer::start().await;
    let (agent, _, reader) = s.create_agent("reader", json!({"keys": ["read"]})).await;
    let r = s
        .post(&agent_keys_path(&s, &id(&agent)), &reader, json!({}))
        .await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_eq!(
        r.body["error"]["details"]["required"],
        json!(["keys:write"])
    );
}

// ---------------------------------------------------------------------------------------------
// Listing and reading
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn listing_an_agents_keys_returns_every_key_incl_revoked_and_derived_oldest_first() {
    let s = TestServer::start().await;
    let (agent, k1, k1_key) = s
        .create_agent(
            "lister",
            json!({"keys": ["derive"], "slack": ["chat:write"]}),
        )
        .await;
    let (other, other_key, _) = s
        .create_agent("other", json!({"slack": ["chat:write"]}))
        .await;
    let aid = id(&agent);
    s.advance(Duration::seconds(1));
    let (k2, _) = mint_ok(&s, &aid, json!({"name": "k2"})).await;
    s.advance(Duration::seconds(1));
    let d = s
        .post(
            "/v1/keys/derive",
            &k1_key,
            json!({"scopes": ["slack:chat:write"], "expires_in": 3600}),
        )
        .await
        .assert_status(201)
        .clone();
    s.advance(Duration::seconds(1));
    let (k3, _) = mint_ok(&s, &aid, json!({"name": "k3"})).await;
    s.post(
        &format!("/v1/keys/{}/revoke", id(&k2)),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);

    let r = s.get(&agent_keys_path(&s, &aid), &s.root_key).await;
    let b = r.assert_status(200);
    assert_eq!(ids(b), vec![id(&k1), id(&k2), id(&d["key"]), id(&k3)]);
    let keys = b["keys"].as_array().unwrap();
    assert!(keys[0]["revoked_at"].is_null());
    assert_eq!(keys[1]["revoked_at"], json!(ts(now(&s))));
    assert_eq!(keys[2]["kind"], "derived");
    assert_eq!(keys[2]["parent_key_id"], k1["id"]);
    assert!(!ids(b).contains(&id(&other_key)));
    assert_eq!(b["limit"], 100);
    assert_eq!(b["offset"], 0);
    assert_eq!(b["has_more"], false);

    let theirs = s.get(&agent_keys_path(&s, &id(&other)), &s.root_key).await;
    assert_eq!(ids(theirs.assert_status(200)), vec![id(&other_key)]);

    // Paged in the same order.
    let first = s
        .get(
            &format!("{}?limit=2", agent_keys_path(&s, &aid)),
            &s.root_key,
        )
        .await;
    let first = first.assert_status(200);
    assert_eq!(ids(first), vec![id(&k1), id(&k2)]);
    assert_eq!(first["has_more"], true);
    assert_eq!(first["limit"], 2);
    let second = s
        .get(
            &format!("{}?limit=2&offset=2", agent_keys_path(&s, &aid)),
            &s.root_key,
        )
        .await;
    let second = second.assert_status(200);
    assert_eq!(ids(second), vec![id(&d["key"]), id(&k3)]);
    assert_eq!(second["has_more"], false);
    assert_eq!(second["offset"], 2);
}

#[tokio::test]
async fn listing_keys_of_an_unknown_agent_is_404_and_of_another_org_is_403() {
    let s = TestServer::start().await;
    s.get(
        &agent_keys_path(&s, "0190f5c2-0000-7000-8000-000000000000"),
        &s.root_key,
    )
    .await
    .assert_error(404, "AGENT_NOT_FOUND");
    let (agent, _, _) = s
        .create_agent("mine", json!({"slack": ["chat:write"]}))
        .await;
    let (_, root_b) = s.new_org("org-b").await;
    s.get(&agent_keys_path(&s, &id(&agent)), &root_b)
        .await
        .assert_error(403, "NOT_A_MEMBER");
    s.get(&s.org_path("/keys"), &root_b)
        .await
        .assert_error(403, "NOT_A_MEMBER");
}

#[tokio::test]
async fn reading_a_key_needs_keys_read_and_returns_it() {
    let s = TestServer::start().await;
    let (_, key, _) = s
        .create_agent("target", json!({"slack": ["chat:write"]}))
        .await;
    let (_, _, reader) = s.create_agent("reader", json!({"keys": ["read"]})).await;
    let (_, _, nobody) = s
        .create_agent("nobody", json!({"slack": ["chat:write"]}))
        .await;
    let path = format!("/v1/keys/{}", id(&key));

    let by_root = s.get(&path, &s.root_key).await;
    assert_eq!(by_root.assert_status(200), &key);
    let by_reader = s.get(&path, &reader).await;
    assert_eq!(by_reader.assert_status(200), &key);

    let denied = s.get(&path, &nobody).await;
    denied.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_eq!(
        denied.body["error"]["details"]["required"],
        json!(["keys:read"])
    );
}

#[tokio::test]
async fn another_orgs_key_id_is_404_key_not_found() {
    let s = TestServer::start().await;
    let (org_b, root_b) = s.new_org("org-b").await;
    let b_keys = s
        .get(&format!("/v1/orgs/{org_b}/keys"), &root_b)
        .await
        .assert_status(200)
        .clone();
    let b_key_id = ids(&b_keys)[0].clone();
    // Org B sees its own key, org A's root does not.
    s.get(&format!("/v1/keys/{b_key_id}"), &root_b)
        .await
        .assert_status(200);
    s.get(&format!("/v1/keys/{b_key_id}"), &s.root_key)
        .await
        .assert_error(404, "KEY_NOT_FOUND");
    s.patch(
        &format!("/v1/keys/{b_key_id}"),
        &s.root_key,
        json!({"name": "x"}),
    )
    .await
    .assert_error(404, "KEY_NOT_FOUND");
    s.post(
        &format!("/v1/keys/{b_key_id}/revoke?force=true"),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_error(404, "KEY_NOT_FOUND");
    // And it was not revoked.
    s.get(&format!("/v1/orgs/{org_b}"), &root_b)
        .await
        .assert_status(200);
}

#[tokio::test]
async fn an_unknown_key_id_is_404_and_a_malformed_one_is_400() {
    let s = TestServer::start().await;
    s.get("/v1/keys/0190f5c2-0000-7000-8000-000000000000", &s.root_key)
        .await
        .assert_error(404, "KEY_NOT_FOUND");
    s.get("/v1/keys/not-a-uuid", &s.root_key)
        .await
        .assert_error(400, "VALIDATION_ERROR");
}

// ---------------------------------------------------------------------------------------------
// Patching
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn patching_a_key_changes_name_allowlist_limits_quota_thresholds_and_metadata() {
    let s = TestServer::start().await;
    let (_, key, _) = s
        .create_agent("patchy", json!({"slack": ["chat:write"]}))
        .await;
    let path = format!("/v1/keys/{}", id(&key));
    let body = json!({
        "name": "renamed",
        "cidr_allowlist": ["10.0.0.0/8", "192.168.0.0/16"],
        "rate_limit": {"limit": 600, "period_s": 60, "burst": 20},
        "quota": {"limit": 5000, "period": "month"},
        "alert_thresholds": [50, 90],
        "metadata": {"team": "infra", "n": 3}
    });
    let r = s.patch(&path, &s.root_key, body.clone()).await;
    let b = r.assert_status(200).clone();
    for f in [
        "name",
        "cidr_allowlist",
        "rate_limit",
        "quota",
        "alert_thresholds",
        "metadata",
    ] {
        assert_eq!(b[f], body[f], "field {f}");
    }
    assert_eq!(b["id"], key["id"]);
    assert_eq!(b["scopes"], key["scopes"]);
    let read = get_key(&s, &id(&key)).await;
    assert_eq!(read, b);

    // A tier works too.
    let r = s
        .patch(&path, &s.root_key, json!({"rate_limit": {"tier": "free"}}))
        .await;
    assert_eq!(r.assert_status(200)["rate_limit"], json!({"tier": "free"}));
    s.patch(&path, &s.root_key, json!({"rate_limit": {"tier": "nope"}}))
        .await
        .assert_error(400, "VALIDATION_ERROR");
    s.patch(&path, &s.root_key, json!({"alert_thresholds": [101]}))
        .await
        .assert_error(400, "VALIDATION_ERROR");
    s.patch(&path, &s.root_key, json!({"cidr_allowlist": ["garbage"]}))
        .await
        .assert_error(400, "VALIDATION_ERROR");
    // Rejected patches changed nothing.
    assert_eq!(
        get_key(&s, &id(&key)).await["rate_limit"],
        json!({"tier": "free"})
    );
}

#[tokio::test]
async fn patching_rate_limit_and_quota_to_null_clears_them() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("clearer", json!({"slack": ["chat:write"]}))
        .await;
    let (key, _) = mint_ok(
        &s,
        &id(&agent),
        json!({
            "rate_limit": {"tier": "pro"},
            "quota": {"limit": 10, "period": "hour"},
            "metadata": {"a": 1}
        }),
    )
    .await;
    let path = format!("/v1/keys/{}", id(&key));
    let r = s
        .patch(
            &path,
            &s.root_key,
            json!({"rate_limit": null, "quota": null}),
        )
        .await;
    let b = r.assert_status(200);
    assert!(b["rate_limit"].is_null(), "{b}");
    assert!(b["quota"].is_null(), "{b}");
    assert_eq!(b["metadata"], json!({"a": 1}), "untouched fields stay");
    let read = get_key(&s, &id(&key)).await;
    assert!(read["rate_limit"].is_null());
    assert!(read["quota"].is_null());
}

#[tokio::test]
async fn patching_a_revoked_key_is_409_key_already_revoked() {
    let s = TestServer::start().await;
    let (_, key, _) = s
        .create_agent("revpatch", json!({"slack": ["chat:write"]}))
        .await;
    s.post(
        &format!("/v1/keys/{}/revoke?force=true", id(&key)),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    s.patch(
        &format!("/v1/keys/{}", id(&key)),
        &s.root_key,
        json!({"name": "late"}),
    )
    .await
    .assert_error(409, "KEY_ALREADY_REVOKED");
}

#[tokio::test]
async fn patching_a_derived_keys_allowlist_outside_its_parents_is_400_cidr_not_subset() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent(
            "parent",
            json!({"keys": ["derive"], "slack": ["chat:write"]}),
        )
        .await;
    let (parent, parent_key) =
        mint_ok(&s, &id(&agent), json!({"cidr_allowlist": ["127.0.0.0/8"]})).await;
    let d = s
        .post(
            "/v1/keys/derive",
            &parent_key,
            json!({"scopes": ["slack:chat:write"], "expires_in": 3600}),
        )
        .await
        .assert_status(201)
        .clone();
    assert_eq!(d["key"]["cidr_allowlist"], parent["cidr_allowlist"]);
    let path = format!("/v1/keys/{}", id(&d["key"]));
    let r = s
        .patch(
            &path,
            &s.root_key,
            json!({"cidr_allowlist": ["10.0.0.0/8"]}),
        )
        .await;
    r.assert_error(400, "CIDR_NOT_SUBSET");
    // "Any" is wider than the parent's allowlist, so emptying it is not a subset either.
    s.patch(&path, &s.root_key, json!({"cidr_allowlist": []}))
        .await
        .assert_error(400, "CIDR_NOT_SUBSET");
    let ok = s
        .patch(
            &path,
            &s.root_key,
            json!({"cidr_allowlist": ["127.0.0.0/24"]}),
        )
        .await;
    assert_eq!(
        ok.assert_status(200)["cidr_allowlist"],
        json!(["127.0.0.0/24"])
    );
}

#[tokio::test]
async fn patching_with_an_unknown_field_is_400_validation_error() {
    let s = TestServer::start().await;
    let (_, key, _) = s
        .create_agent("typo", json!({"slack": ["chat:write"]}))
        .await;
    let path = format!("/v1/keys/{}", id(&key));
    s.patch(&path, &s.root_key, json!({"nmae": "oops"}))
        .await
        .assert_error(400, "VALIDATION_ERROR");
    // Scopes are not patchable.
    s.patch(&path, &s.root_key, json!({"scopes": ["slack:chat:write"]}))
        .await
        .assert_error(400, "VALIDATION_ERROR");
    assert!(get_key(&s, &id(&key)).await["name"].is_null());
}

#[tokio::test]
async fn patching_needs_keys_write() {
    let s = TestServer::start().await;
    let (_, key, reader) = s.create_agent("ro", json!({"keys": ["read"]})).await;
    let r = s
        .patch(
            &format!("/v1/keys/{}", id(&key)),
            &reader,
            json!({"name": "x"}),
        )
        .await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_eq!(
        r.body["error"]["details"]["required"],
        json!(["keys:write"])
    );
}

// ---------------------------------------------------------------------------------------------
// Deprecation
// ---------------------------------------------------------------------------------------------

fn deprecate_path(s: &TestServer, agent_id: &str, key_id: &str, verb: &str) -> String {
    s.org_path(&format!("/agents/{agent_id}/keys/{key_id}/{verb}"))
}

#[tokio::test]
async fn deprecating_sets_deprecated_at_and_undeprecating_clears_it_both_idempotent() {
    let s = TestServer::start().await;
    let (agent, key, _) = s
        .create_agent("oldie", json!({"slack": ["chat:write"]}))
        .await;
    let (aid, kid) = (id(&agent), id(&key));
    s.advance(Duration::seconds(10));
    let first_at = ts(now(&s));
    let r = post_empty(
        &s,
        &deprecate_path(&s, &aid, &kid, "deprecate"),
        &s.root_key,
    )
    .await;
    assert_eq!(r.assert_status(200)["deprecated_at"], json!(first_at));
    s.advance(Duration::seconds(10));
    let again = post_empty(
        &s,
        &deprecate_path(&s, &aid, &kid, "deprecate"),
        &s.root_key,
    )
    .await;
    assert_eq!(
        again.assert_status(200)["deprecated_at"],
        json!(first_at),
        "kept"
    );
    assert_eq!(get_key(&s, &kid).await["deprecated_at"], json!(first_at));

    let un = post_empty(
        &s,
        &deprecate_path(&s, &aid, &kid, "undeprecate"),
        &s.root_key,
    )
    .await;
    assert!(un.assert_status(200)["deprecated_at"].is_null());
    let un2 = post_empty(
        &s,
        &deprecate_path(&s, &aid, &kid, "undeprecate"),
        &s.root_key,
    )
    .await;
    assert!(un2.assert_status(200)["deprecated_at"].is_null());
    assert!(get_key(&s, &kid).await["deprecated_at"].is_null());
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

#[tokio::test]
async fn a_deprecated_key_still_works_and_every_response_to_it_carries_the_deprecation_headers() {
    let s = TestServer::start().await;
    let (agent, key, api_key) = s
        .create_agent("legacy", json!({"slack": ["chat:write"]}))
        .await;
    let (aid, kid) = (id(&agent), id(&key));
    let fresh = s.get("/v1/me", &api_key).await;
    fresh.assert_status(200);
    assert_eq!(fresh.header("keyward-key-deprecated"), None);
    assert_eq!(fresh.header("warning"), None);

    post_empty(
        &s,
        &deprecate_path(&s, &aid, &kid, "deprecate"),
        &s.root_key,
    )
    .await
    .assert_status(200);

    // Success.
    let ok = s.get("/v1/me", &api_key).await;
    assert_eq!(ok.assert_status(200)["key"]["id"], json!(kid));
    assert_deprecation_headers(&ok);
    let org = s.get(&s.org_path(""), &api_key).await;
    org.assert_status(200);
    assert_deprecation_headers(&org);
    // An error of the endpoint (scope check).
    let denied = s.get(&s.org_path("/agents"), &api_key).await;
    denied.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_deprecation_headers(&denied);
    // An error of the credential checks (agent paused).
    s.post(
        &s.org_path(&format!("/agents/{aid}/pause")),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    let paused = s.get(&s.org_path(""), &api_key).await;
    paused.assert_error(403, "AGENT_PAUSED");
    assert_deprecation_headers(&paused);
    s.post(
        &s.org_path(&format!("/agents/{aid}/resume")),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);

    // The caller who deprecated it (a different key) gets no such headers.
    let admin = post_empty(
        &s,
        &deprecate_path(&s, &aid, &kid, "undeprecate"),
        &s.root_key,
    )
    .await;
    admin.assert_status(200);
    assert_eq!(admin.header("keyward-key-deprecated"), None);
    let back = s.get("/v1/me", &api_key).await;
    back.assert_status(200);
    assert_eq!(back.header("keyward-key-deprecated"), None);
    assert_eq!(back.header("warning"), None);
}

#[tokio::test]
async fn deprecating_a_revoked_key_is_409_key_already_revoked() {
    let s = TestServer::start().await;
    let (agent, key, _) = s
        .create_agent("dead", json!({"slack": ["chat:write"]}))
        .await;
    let (aid, kid) = (id(&agent), id(&key));
    s.post(
        &format!("/v1/keys/{kid}/revoke?force=true"),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    post_empty(
        &s,
        &deprecate_path(&s, &aid, &kid, "deprecate"),
        &s.root_key,
    )
    .await
    .assert_error(409, "KEY_ALREADY_REVOKED");
    post_empty(
        &s,
        &deprecate_path(&s, &aid, &kid, "undeprecate"),
        &s.root_key,
    )
    .await
    .assert_error(409, "KEY_ALREADY_REVOKED");
}

#[tokio::test]
async fn a_key_of_another_agent_in_the_path_is_404_key_not_found() {
    let s = TestServer::start().await;
    let (a, _, _) = s
        .create_agent("alpha", json!({"slack": ["chat:write"]}))
        .await;
    let (_, b_key, b_api) = s
        .create_agent("beta", json!({"slack": ["chat:write"]}))
        .await;
    let (aid, bkid) = (id(&a), id(&b_key));
    for verb in ["deprecate", "undeprecate", "revoke?force=true"] {
        post_empty(&s, &deprecate_path(&s, &aid, &bkid, verb), &s.root_key)
            .await
            .assert_error(404, "KEY_NOT_FOUND");
    }
    // Nothing happened to beta's key.
    let me = s.get("/v1/me", &b_api).await;
    me.assert_status(200);
    assert_eq!(me.header("keyward-key-deprecated"), None);
}

// ---------------------------------------------------------------------------------------------
// Revocation
// ---------------------------------------------------------------------------------------------

fn revoke_path(s: &TestServer, agent_id: &str, key_id: &str) -> String {
    s.org_path(&format!("/agents/{agent_id}/keys/{key_id}/revoke"))
}

#[tokio::test]
async fn revoking_needs_keys_admin_on_both_routes() {
    let s = TestServer::start().await;
    let (agent, key, writer) = s
        .create_agent("writer", json!({"keys": ["write", "read"]}))
        .await;
    let (aid, kid) = (id(&agent), id(&key));
    mint_ok(&s, &aid, json!({})).await;
    for path in [
        format!("/v1/keys/{kid}/revoke"),
        revoke_path(&s, &aid, &kid),
        format!("/v1/keys/{kid}/revoke?force=true"),
    ] {
        let r = post_empty(&s, &path, &writer).await;
        r.assert_error(403, "INSUFFICIENT_SCOPE");
        assert_eq!(
            r.body["error"]["details"]["required"],
            json!(["keys:admin"])
        );
    }
    assert!(get_key(&s, &kid).await["revoked_at"].is_null());
}

#[tokio::test]
async fn revoking_an_agents_only_key_is_409_last_active_key_unless_forced() {
    let s = TestServer::start().await;
    let (agent, key, api_key) = s
        .create_agent("solo", json!({"slack": ["chat:write"]}))
        .await;
    let (aid, kid) = (id(&agent), id(&key));
    post_empty(&s, &format!("/v1/keys/{kid}/revoke"), &s.root_key)
        .await
        .assert_error(409, "LAST_ACTIVE_KEY");
    post_empty(&s, &revoke_path(&s, &aid, &kid), &s.root_key)
        .await
        .assert_error(409, "LAST_ACTIVE_KEY");
    post_empty(
        &s,
        &format!("/v1/keys/{kid}/revoke?force=false"),
        &s.root_key,
    )
    .await
    .assert_error(409, "LAST_ACTIVE_KEY");
    s.get("/v1/me", &api_key).await.assert_status(200);

    s.advance(Duration::seconds(5));
    let r = post_empty(
        &s,
        &format!("/v1/keys/{kid}/revoke?force=true"),
        &s.root_key,
    )
    .await;
    let b = r.assert_status(200);
    assert_eq!(b["id"], json!(kid));
    assert_eq!(b["revoked_at"], json!(ts(now(&s))));
    s.get("/v1/me", &api_key)
        .await
        .assert_error(401, "REVOKED_API_KEY");
}

#[tokio::test]
async fn revoking_through_the_agent_route_with_force_works() {
    let s = TestServer::start().await;
    let (agent, key, api_key) = s
        .create_agent("forced", json!({"slack": ["chat:write"]}))
        .await;
    let r = post_empty(
        &s,
        &format!("{}?force=true", revoke_path(&s, &id(&agent), &id(&key))),
        &s.root_key,
    )
    .await;
    assert_eq!(r.assert_status(200)["revoked_at"], json!(ts(now(&s))));
    s.get("/v1/me", &api_key)
        .await
        .assert_error(401, "REVOKED_API_KEY");
}

#[tokio::test]
async fn with_two_keys_the_first_revoke_succeeds_and_the_second_is_409_last_active_key() {
    let s = TestServer::start().await;
    let (agent, k1, k1_api) = s
        .create_agent("pair", json!({"slack": ["chat:write"]}))
        .await;
    let aid = id(&agent);
    let (k2, k2_api) = mint_ok(&s, &aid, json!({})).await;
    let r = post_empty(&s, &revoke_path(&s, &aid, &id(&k1)), &s.root_key).await;
    assert!(r.assert_status(200)["revoked_at"].is_string());
    post_empty(&s, &revoke_path(&s, &aid, &id(&k2)), &s.root_key)
        .await
        .assert_error(409, "LAST_ACTIVE_KEY");
    s.get("/v1/me", &k1_api)
        .await
        .assert_error(401, "REVOKED_API_KEY");
    s.get("/v1/me", &k2_api).await.assert_status(200);
}

#[tokio::test]
async fn revoking_an_already_revoked_key_is_409_key_already_revoked() {
    let s = TestServer::start().await;
    let (agent, k1, _) = s
        .create_agent("twice", json!({"slack": ["chat:write"]}))
        .await;
    let aid = id(&agent);
    mint_ok(&s, &aid, json!({})).await;
    let kid = id(&k1);
    post_empty(&s, &format!("/v1/keys/{kid}/revoke"), &s.root_key)
        .await
        .assert_status(200);
    post_empty(&s, &format!("/v1/keys/{kid}/revoke"), &s.root_key)
        .await
        .assert_error(409, "KEY_ALREADY_REVOKED");
    post_empty(
        &s,
        &format!("/v1/keys/{kid}/revoke?force=true"),
        &s.root_key,
    )
    .await
    .assert_error(409, "KEY_ALREADY_REVOKED");
    post_empty(&s, &revoke_path(&s, &aid, &kid), &s.root_key)
        .await
        .assert_error(409, "KEY_ALREADY_REVOKED");
}

#[tokio::test]
async fn revoking_a_key_cascades_to_its_derived_keys() {
    let s = TestServer::start().await;
    let (agent, k1, k1_api) = s
        .create_agent(
            "cascade",
            json!({"keys": ["derive"], "slack": ["chat:write", "files:read"]}),
        )
        .await;
    let aid = id(&agent);
    let (_, k2_api) = mint_ok(&s, &aid, json!({})).await;
    let mut derived = Vec::new();
    for scope in ["slack:chat:write", "slack:files:read"] {
        let d = s
            .post(
                "/v1/keys/derive",
                &k1_api,
                json!({"scopes": [scope], "expires_in": 3600}),
            )
            .await
            .assert_status(201)
            .clone();
        s.get("/v1/me", d["api_key"].as_str().unwrap())
            .await
            .assert_status(200);
        derived.push(d);
    }
    // A key derived from k2 is not k1's descendant.
    let k2_child = s
        .post(
            "/v1/keys/derive",
            &k2_api,
            json!({"scopes": ["slack:chat:write"], "expires_in": 3600}),
        )
        .await
        .assert_status(201)
        .clone();

    s.advance(Duration::seconds(3));
    post_empty(&s, &revoke_path(&s, &aid, &id(&k1)), &s.root_key)
        .await
        .assert_status(200);
    for d in &derived {
        s.get("/v1/me", d["api_key"].as_str().unwrap())
            .await
            .assert_error(401, "REVOKED_API_KEY");
        assert_eq!(
            get_key(&s, &id(&d["key"])).await["revoked_at"],
            json!(ts(now(&s)))
        );
    }
    s.get("/v1/me", &k1_api)
        .await
        .assert_error(401, "REVOKED_API_KEY");
    s.get("/v1/me", &k2_api).await.assert_status(200);
    s.get("/v1/me", k2_child["api_key"].as_str().unwrap())
        .await
        .assert_status(200);
}

#[tokio::test]
async fn the_last_active_key_guard_counts_the_cascade_on_both_routes() {
    let s = TestServer::start().await;
    let (agent, k1, k1_api) = s
        .create_agent(
            "guarded",
            json!({"keys": ["derive"], "slack": ["chat:write"]}),
        )
        .await;
    let (aid, kid) = (id(&agent), id(&k1));
    let d = s
        .post(
            "/v1/keys/derive",
            &k1_api,
            json!({"scopes": ["slack:chat:write"], "expires_in": 3600}),
        )
        .await
        .assert_status(201)
        .clone();
    let d_api = d["api_key"].as_str().unwrap();
    // The derived key is live, but revoking k1 takes it too, leaving nothing.
    post_empty(&s, &format!("/v1/keys/{kid}/revoke"), &s.root_key)
        .await
        .assert_error(409, "LAST_ACTIVE_KEY");
    post_empty(&s, &revoke_path(&s, &aid, &kid), &s.root_key)
        .await
        .assert_error(409, "LAST_ACTIVE_KEY");
    s.get("/v1/me", &k1_api).await.assert_status(200);
    s.get("/v1/me", d_api).await.assert_status(200);

    // Revoking only the derived key leaves k1: fine.
    post_empty(
        &s,
        &format!("/v1/keys/{}/revoke", id(&d["key"])),
        &s.root_key,
    )
    .await
    .assert_status(200);
    s.get("/v1/me", d_api)
        .await
        .assert_error(401, "REVOKED_API_KEY");
    s.get("/v1/me", &k1_api).await.assert_status(200);
}

#[tokio::test]
async fn forcing_the_revocation_of_a_key_with_derived_keys_revokes_them_all() {
    let s = TestServer::start().await;
    let (agent, k1, k1_api) = s
        .create_agent(
            "forceall",
            json!({"keys": ["derive"], "slack": ["chat:write"]}),
        )
        .await;
    let d = s
        .post(
            "/v1/keys/derive",
            &k1_api,
            json!({"scopes": ["slack:chat:write"], "expires_in": 3600}),
        )
        .await
        .assert_status(201)
        .clone();
    post_empty(
        &s,
        &format!("{}?force=true", revoke_path(&s, &id(&agent), &id(&k1))),
        &s.root_key,
    )
    .await
    .assert_status(200);
    s.get("/v1/me", &k1_api)
        .await
        .assert_error(401, "REVOKED_API_KEY");
    s.get("/v1/me", d["api_key"].as_str().unwrap())
        .await
        .assert_error(401, "REVOKED_API_KEY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_revocations_of_an_agents_two_keys_let_exactly_one_through() {
    let s = TestServer::start().await;
    for round in 0..5 {
        let (agent, k1, k1_api) = s
            .create_agent(&format!("racer-{round}"), json!({"slack": ["chat:write"]}))
            .await;
        let (k2, k2_api) = mint_ok(&s, &id(&agent), json!({})).await;
        let p1 = format!("/v1/keys/{}/revoke", id(&k1));
        let p2 = revoke_path(&s, &id(&agent), &id(&k2));
        let (r1, r2) = tokio::join!(
            post_empty(&s, &p1, &s.root_key),
            post_empty(&s, &p2, &s.root_key)
        );
        let mut statuses = [r1.status, r2.status];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 409], "round {round}: {r1:?} / {r2:?}");
        let (ok_api, loser) = if r1.status == 200 {
            (&k2_api, &r2)
        } else {
            (&k1_api, &r1)
        };
        loser.assert_error(409, "LAST_ACTIVE_KEY");
        // Exactly one key of the agent is still live, and it is the loser's.
        let live = s
            .get(
                &s.org_path(&format!("/keys?agent_id={}", id(&agent))),
                &s.root_key,
            )
            .await
            .assert_status(200)
            .clone();
        assert_eq!(live["keys"].as_array().unwrap().len(), 1, "round {round}");
        s.get("/v1/me", ok_api).await.assert_status(200);
    }
}

// ---------------------------------------------------------------------------------------------
// Root keys
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn creating_a_root_key_returns_a_kw_rk_key_with_scopes_star() {
    let s = TestServer::start().await;
    let r = s
        .post(&s.org_path("/keys"), &s.root_key, json!({"name": "ops"}))
        .await;
    let b = r.assert_status(201).clone();
    let api_key = b["api_key"].as_str().unwrap();
    assert!(api_key.starts_with("kw_rk_"), "{api_key}");
    assert_eq!(api_key.len(), "kw_rk_".len() + 36);
    let key = &b["key"];
    assert_key_shape(key);
    assert_no_plaintext(key, api_key);
    assert_eq!(key["kind"], "root");
    assert_eq!(key["name"], "ops");
    assert!(key["agent_id"].is_null());
    assert_eq!(key["org_id"], json!(s.org_id));
    assert_eq!(key["scopes"], json!(["*"]));
    assert_eq!(key["start"], json!(&api_key[..12]));
    // It works as an org admin.
    s.get(&s.org_path("/agents"), api_key)
        .await
        .assert_status(200);
    s.post(&s.org_path("/keys"), api_key, json!({}))
        .await
        .assert_status(201);
    // A test-environment root key.
    let t = s
        .post(
            &s.org_path("/keys"),
            &s.root_key,
            json!({"environment": "test"}),
        )
        .await
        .assert_status(201)
        .clone();
    assert!(t["api_key"].as_str().unwrap().starts_with("kwt_rk_"));
}

#[tokio::test]
async fn creating_a_root_key_needs_org_admin() {
    let s = TestServer::start().await;
    let (_, _, keyadmin) = s
        .create_agent("almost", json!({"keys": ["read", "write", "admin"]}))
        .await;
    let r = s.post(&s.org_path("/keys"), &keyadmin, json!({})).await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_eq!(r.body["error"]["details"]["required"], json!(["org:admin"]));
    // Another org's root key.
    let (_, root_b) = s.new_org("org-b").await;
    s.post(&s.org_path("/keys"), &root_b, json!({}))
        .await
        .assert_error(403, "NOT_A_MEMBER");
}

async fn org_key_ids(s: &TestServer, query: &str) -> Vec<String> {
    let r = s
        .get(&s.org_path(&format!("/keys{query}")), &s.root_key)
        .await;
    ids(r.assert_status(200))
}

#[tokio::test]
async fn listing_org_keys_filters_by_agent_kind_and_revoked() {
    let s = TestServer::start().await;
    let root0 = ids(s
        .get(&s.org_path("/keys"), &s.root_key)
        .await
        .assert_status(200));
    assert_eq!(root0.len(), 1);
    let root0 = root0[0].clone();
    s.advance(Duration::seconds(1));
    let (a1, k1, k1_api) = s
        .create_agent("one", json!({"keys": ["derive"], "slack": ["chat:write"]}))
        .await;
    s.advance(Duration::seconds(1));
    let (k1b, _) = mint_ok(&s, &id(&a1), json!({})).await;
    s.advance(Duration::seconds(1));
    let (a2, k2, _) = s
        .create_agent("two", json!({"slack": ["chat:write"]}))
        .await;
    s.advance(Duration::seconds(1));
    let d = s
        .post(
            "/v1/keys/derive",
            &k1_api,
            json!({"scopes": ["slack:chat:write"], "expires_in": 60}),
        )
        .await
        .assert_status(201)
        .clone();
    let did = id(&d["key"]);
    post_empty(&s, &format!("/v1/keys/{}/revoke", id(&k1b)), &s.root_key)
        .await
        .assert_status(200);

    let list = |q: &'static str| org_key_ids(&s, q);
    assert_eq!(
        list("").await,
        vec![root0.clone(), id(&k1), id(&k2), did.clone()]
    );
    assert_eq!(
        list("?include_revoked=true").await,
        vec![root0.clone(), id(&k1), id(&k1b), id(&k2), did.clone()]
    );
    assert_eq!(list("?include_revoked=false").await.len(), 4);
    assert_eq!(list("?kind=root").await, vec![root0.clone()]);
    assert_eq!(list("?kind=derived").await, vec![did.clone()]);
    assert_eq!(list("?kind=agent").await, vec![id(&k1), id(&k2)]);
    assert_eq!(
        list("?kind=agent&include_revoked=true").await,
        vec![id(&k1), id(&k1b), id(&k2)]
    );
    let by_agent = s
        .get(
            &s.org_path(&format!("/keys?agent_id={}", id(&a1))),
            &s.root_key,
        )
        .await;
    assert_eq!(ids(by_agent.assert_status(200)), vec![id(&k1), did.clone()]);
    let by_agent_all = s
        .get(
            &s.org_path(&format!("/keys?agent_id={}&include_revoked=true", id(&a1))),
            &s.root_key,
        )
        .await;
    assert_eq!(
        ids(by_agent_all.assert_status(200)),
        vec![id(&k1), id(&k1b), did.clone()]
    );
    let by_a2 = s
        .get(
            &s.org_path(&format!("/keys?agent_id={}&kind=agent", id(&a2))),
            &s.root_key,
        )
        .await;
    assert_eq!(ids(by_a2.assert_status(200)), vec![id(&k2)]);

    for bad in [
        "?kind=bogus",
        "?kind=",
        "?agent_id=nope",
        "?include_revoked=maybe",
    ] {
        s.get(&s.org_path(&format!("/keys{bad}")), &s.root_key)
            .await
            .assert_error(400, "VALIDATION_ERROR");
    }
}

#[tokio::test]
async fn revoking_the_orgs_last_root_key_is_409_last_active_key() {
    let s = TestServer::start().await;
    let root0 = ids(s
        .get(&s.org_path("/keys"), &s.root_key)
        .await
        .assert_status(200))[0]
        .clone();
    post_empty(&s, &format!("/v1/keys/{root0}/revoke"), &s.root_key)
        .await
        .assert_error(409, "LAST_ACTIVE_KEY");
    s.get(&s.org_path(""), &s.root_key).await.assert_status(200);

    let second = s
        .post(&s.org_path("/keys"), &s.root_key, json!({}))
        .await
        .assert_status(201)
        .clone();
    let second_api = second["api_key"].as_str().unwrap();
    post_empty(&s, &format!("/v1/keys/{root0}/revoke"), second_api)
        .await
        .assert_status(200);
    s.get(&s.org_path(""), &s.root_key)
        .await
        .assert_error(401, "REVOKED_API_KEY");
    post_empty(
        &s,
        &format!("/v1/keys/{}/revoke", id(&second["key"])),
        second_api,
    )
    .await
    .assert_error(409, "LAST_ACTIVE_KEY");
    s.get(&s.org_path(""), second_api).await.assert_status(200);
}

/// A revocation whose request is dropped while the store is writing (its client went away)
/// still drops the verify cache once the write lands: `AppState::key_write` runs the write and
/// the invalidation in a task of their own. In the handler's own future, a write the store
/// finished after the future was gone never reached the invalidation, and the revoked key was
/// answered from the cache until its snapshot expired.
#[tokio::test]
async fn a_revocation_whose_caller_goes_away_still_drops_the_cached_key() {
    let common::Bare {
        state,
        clock,
        org,
        root: token,
        dir: _dir,
        ..
    } = common::Bare::start().await;
    let cached = || async {
        state
            .cache
            .lookup(
                state.store.as_ref(),
                &state.meter,
                token.expose(),
                clock.now_ms(),
            )
            .await
            .unwrap()
            .unwrap()
    };
    let key = cached().await.key.clone();
    assert!(key.revoked_at.is_none());

    let audit = keyward_store::conformance::event(org.id, "key.revoke");
    let (go, gate) = tokio::sync::oneshot::channel::<()>();
    let (landed, written) = tokio::sync::oneshot::channel::<()>();
    let now = clock.now();
    let mut request = Box::pin(state.key_write(move |store| async move {
        let _ = gate.await;
        let r = store.revoke_key(key.id, now, true, &audit).await;
        let _ = landed.send(());
        r
    }));
    // The request starts its write and is dropped before the store has answered.
    std::future::poll_fn(|cx| {
        let _ = std::future::Future::poll(request.as_mut(), cx);
        std::task::Poll::Ready(())
    })
    .await;
    drop(request);
    assert!(
        cached().await.key.revoked_at.is_none(),
        "not revoked yet: the snapshot is still the one cached"
    );

    go.send(()).unwrap();
    written.await.unwrap();
    // On this single-threaded runtime the write's task ran on from the store's answer to the
    // invalidation before this test was polled again.
    assert!(
        cached().await.key.revoked_at.is_some(),
        "the revocation dropped the cached snapshot"
    );
}
