//! API.md §3 and §4 for orgs and agents through real HTTP: reading and patching the org, the
//! agent lifecycle (create, list, get, by-name, broadening-only update, pause/resume, tombstone
//! delete), sub-agents, the cross-org `NOT_A_MEMBER` guard and concurrent creation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{t0, Resp, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

/// A well-formed UUID (v7 shape) that names nothing.
const MISSING_ID: &str = "01900000-0000-7000-8000-000000000000";

fn ts(d: chrono::Duration) -> String {
    (t0() + d).format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn id(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

fn sorted(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    out.sort();
    out
}

fn names(list: &Value, field: &str) -> Vec<String> {
    list[field]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap().to_string())
        .collect()
}

async fn get_agent(s: &TestServer, agent_id: &str) -> Value {
    s.get(&s.org_path(&format!("/agents/{agent_id}")), &s.root_key)
        .await
        .assert_status(200)
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Orgs
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn any_key_of_the_org_reads_the_org_even_an_agent_key_without_scopes() {
    let s = TestServer::start().await;
    let root = s.get(&s.org_path(""), &s.root_key).await;
    let b = root.assert_status(200).clone();
    assert_eq!(b["id"], json!(s.org_id));
    assert_eq!(b["name"], json!("test-org"));
    assert_eq!(b["created_at"], json!("2026-11-23T10:00:00.000Z"));
    let p = &b["policy"];
    assert_eq!(p["max_key_ttl_s"], json!(86400));
    assert_eq!(
        p["rate_limit_tiers"]["free"],
        json!({"limit": 100, "period_s": 3600, "burst": 10})
    );
    assert_eq!(
        p["rate_limit_tiers"]["pro"],
        json!({"limit": 1000, "period_s": 3600, "burst": 100})
    );
    assert_eq!(p["default_rate_limit"], Value::Null);

    let (_, key, api_key) = s.create_agent("no-scopes", json!({})).await;
    assert_eq!(key["scopes"], json!([]));
    let as_agent = s.get(&s.org_path(""), &api_key).await;
    assert_eq!(
        as_agent.assert_status(200),
        &b,
        "the agent key sees the same org"
    );
}

#[tokio::test]
async fn patching_the_org_requires_org_admin() {
    let s = TestServer::start().await;
    let (_, _, api_key) = s
        .create_agent(
            "writer",
            json!({"agents": ["write", "read"], "keys": ["admin"]}),
        )
        .await;
    let r = s
        .patch(&s.org_path(""), &api_key, json!({"name": "hijacked"}))
        .await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_eq!(r.body["error"]["details"]["required"], json!(["org:admin"]));
    let org = s.get(&s.org_path(""), &s.root_key).await;
    assert_eq!(org.assert_status(200)["name"], json!("test-org"));

    let (_, _, admin) = s.create_agent("org-admin", json!({"org": ["admin"]})).await;
    let r = s
        .patch(&s.org_path(""), &admin, json!({"name": "by-agent"}))
        .await;
    assert_eq!(r.assert_status(200)["name"], json!("by-agent"));
}

#[tokio::test]
async fn patching_the_org_changes_its_name_and_policy() {
    let s = TestServer::start().await;
    let r = s
        .patch(&s.org_path(""), &s.root_key, json!({"name": "Renamed Org"}))
        .await;
    let b = r.assert_status(200);
    assert_eq!(b["name"], json!("Renamed Org"));
    assert_eq!(
        b["policy"]["max_key_ttl_s"],
        json!(86400),
        "policy untouched"
    );

    let r = s
        .patch(
            &s.org_path(""),
            &s.root_key,
            json!({"policy": {"max_key_ttl_s": 3600}}),
        )
        .await;
    let b = r.assert_status(200);
    assert_eq!(b["name"], json!("Renamed Org"), "name untouched");
    assert_eq!(b["policy"]["max_key_ttl_s"], json!(3600));

    let got = s.get(&s.org_path(""), &s.root_key).await;
    let g = got.assert_status(200);
    assert_eq!(g["name"], json!("Renamed Org"));
    assert_eq!(g["policy"]["max_key_ttl_s"], json!(3600));

    // The new ceiling is enforced: a derived key asking for a day is capped at an hour.
    let r = s
        .post(
            "/v1/keys/derive",
            &s.root_key,
            json!({"scopes": ["reports:read"], "expires_in": 86400}),
        )
        .await;
    assert_eq!(
        r.assert_status(201)["key"]["expires_at"],
        json!(ts(chrono::Duration::hours(1)))
    );
}

#[tokio::test]
async fn an_invalid_org_patch_is_400_and_changes_nothing() {
    let s = TestServer::start().await;
    for body in [
        json!({"policy": {"max_key_ttl_s": 0}}),
        json!({"policy": {"max_key_ttl_s": "soon"}}),
        json!({"policy": {"rules": [{"rule_type": "json_match", "rule_body": {"when": {"method": "GET"}, "effect": "allow"}}]}}),
        json!({"policy": "strict"}),
        json!({"name": ""}),
    ] {
        let r = s.patch(&s.org_path(""), &s.root_key, body.clone()).await;
        r.assert_error(400, "VALIDATION_ERROR");
    }
    let org = s.get(&s.org_path(""), &s.root_key).await;
    let b = org.assert_status(200);
    assert_eq!(b["name"], json!("test-org"));
    assert_eq!(b["policy"]["max_key_ttl_s"], json!(86400));
}

#[tokio::test]
async fn another_orgs_key_gets_403_not_a_member_on_every_org_scoped_route() {
    let s = TestServer::start().await;
    let (agent, key, _) = s
        .create_agent("target", json!({"slack": ["chat:write"]}))
        .await;
    let (a, k) = (id(&agent), id(&key));
    let (_, other_root) = s.new_org("other-org").await;
    let o = |suffix: &str| s.org_path(suffix);
    let cases: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, o(""), None),
        (Method::PATCH, o(""), Some(json!({"name": "stolen"}))),
        (
            Method::POST,
            o("/agents"),
            Some(json!({"name": "intruder"})),
        ),
        (Method::GET, o("/agents"), None),
        (Method::GET, o(&format!("/agents/{a}")), None),
        (Method::GET, o(&format!("/agents/{MISSING_ID}")), None),
        (Method::GET, o("/agents/by-name/target"), None),
        (
            Method::PATCH,
            o(&format!("/agents/{a}")),
            Some(json!({"display_name": "x"})),
        ),
        (Method::POST, o(&format!("/agents/{a}/pause")), None),
        (Method::POST, o(&format!("/agents/{a}/resume")), None),
        (Method::DELETE, o(&format!("/agents/{a}")), None),
        (
            Method::POST,
            o(&format!("/agents/{a}/keys")),
            Some(json!({})),
        ),
        (Method::GET, o(&format!("/agents/{a}/keys")), None),
        (
            Method::POST,
            o(&format!("/agents/{a}/keys/{k}/deprecate")),
            None,
        ),
        (
            Method::POST,
            o(&format!("/agents/{a}/keys/{k}/undeprecate")),
            None,
        ),
        (
            Method::POST,
            o(&format!("/agents/{a}/keys/{k}/revoke?force=true")),
            None,
        ),
        (Method::POST, o("/keys"), Some(json!({}))),
        (Method::GET, o("/keys"), None),
        (Method::GET, o("/audit"), None),
    ];
    for (method, path, body) in cases {
        let r = s
            .send(method.clone(), &path, Some(&other_root), &[], body)
            .await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        r.assert_error(403, "NOT_A_MEMBER");
        assert!(
            r.body.get("agents").is_none() && r.body.get("id").is_none(),
            "no data"
        );
    }
    // Nothing changed in the target org.
    let ag = get_agent(&s, &a).await;
    assert_eq!(ag["status"], json!("active"));
    assert_eq!(ag["version"], json!(1));
    let list = s.get(&s.org_path("/agents"), &s.root_key).await;
    assert_eq!(names(list.assert_status(200), "agents"), vec!["target"]);
    let org = s.get(&s.org_path(""), &s.root_key).await;
    assert_eq!(org.assert_status(200)["name"], json!("test-org"));
    let key_now = s.get(&format!("/v1/keys/{k}"), &s.root_key).await;
    let kb = key_now.assert_status(200);
    assert_eq!(kb["revoked_at"], Value::Null);
    assert_eq!(kb["deprecated_at"], Value::Null);
}

#[tokio::test]
async fn another_orgs_agent_key_gets_403_not_a_member_on_org_scoped_reads_and_writes() {
    let s = TestServer::start().await;
    let (agent, _, _) = s.create_agent("target", json!({})).await;
    let a = id(&agent);
    let (other_org, other_root) = s.new_org("other-org").await;
    let r = s
        .post(
            &format!("/v1/orgs/{other_org}/agents"),
            &other_root,
            json!({"name": "outsider", "scopes": {"agents": ["read", "write"], "keys": ["read", "write"], "audit": ["read"]}}),
        )
        .await;
    let outsider = r.assert_status(201)["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let o = |suffix: &str| s.org_path(suffix);
    let cases: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, o(""), None),
        (Method::GET, o("/agents"), None),
        (Method::GET, o(&format!("/agents/{a}")), None),
        (Method::GET, o("/agents/by-name/target"), None),
        (
            Method::PATCH,
            o(&format!("/agents/{a}")),
            Some(json!({"display_name": "x"})),
        ),
        (Method::POST, o(&format!("/agents/{a}/pause")), None),
        (Method::DELETE, o(&format!("/agents/{a}")), None),
        (
            Method::POST,
            o(&format!("/agents/{a}/keys")),
            Some(json!({})),
        ),
        (Method::GET, o(&format!("/agents/{a}/keys")), None),
        (Method::GET, o("/keys"), None),
        (Method::GET, o("/audit"), None),
    ];
    for (method, path, body) in cases {
        let r = s
            .send(method.clone(), &path, Some(&outsider), &[], body)
            .await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.body);
        r.assert_error(403, "NOT_A_MEMBER");
    }
    assert_eq!(get_agent(&s, &a).await["version"], json!(1));
}

#[tokio::test]
async fn another_orgs_agent_key_creating_an_agent_gets_403_not_a_member() {
    let s = TestServer::start().await;
    let (other_org, other_root) = s.new_org("other-org").await;
    let r = s
        .post(
            &format!("/v1/orgs/{other_org}/agents"),
            &other_root,
            json!({"name": "outsider", "scopes": {"agents": ["write"]}}),
        )
        .await;
    let outsider = r.assert_status(201)["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let r = s
        .post(
            &s.org_path("/agents"),
            &outsider,
            json!({"name": "intruder"}),
        )
        .await;
    r.assert_error(403, "NOT_A_MEMBER");
    let list = s.get(&s.org_path("/agents"), &s.root_key).await;
    assert_eq!(list.assert_status(200)["agents"], json!([]));
}

// ---------------------------------------------------------------------------------------------
// Agents: create
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn creating_an_agent_returns_201_with_the_agent_its_first_key_and_the_plaintext() {
    let s = TestServer::start().await;
    let r = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({
                "name": "support-bot",
                "display_name": "Support Bot",
                "scopes": {"slack": ["chat:write", "channels:read"], "github": ["repo"]},
                "metadata": {"team": "cx"},
                "capabilities": ["chat"],
            }),
        )
        .await;
    let b = r.assert_status(201).clone();
    let agent = &b["agent"];
    let key = &b["key"];
    assert_eq!(agent["org_id"], json!(s.org_id));
    assert_eq!(agent["name"], json!("support-bot"));
    assert_eq!(agent["display_name"], json!("Support Bot"));
    assert_eq!(agent["type"], json!("agent"), "type defaults to agent");
    assert_eq!(agent["status"], json!("active"));
    assert_eq!(agent["version"], json!(1));
    assert_eq!(
        agent["scopes"],
        json!({"slack": ["chat:write", "channels:read"], "github": ["repo"]})
    );
    assert_eq!(agent["metadata"], json!({"team": "cx"}));
    assert_eq!(agent["policy"], json!({}));
    assert_eq!(agent["capabilities"], json!(["chat"]));
    assert_eq!(agent["did"], Value::Null);
    assert_eq!(agent["owner_user_id"], Value::Null);
    assert_eq!(agent["parent_agent_id"], Value::Null);
    assert_eq!(agent["created_at"], json!("2026-11-23T10:00:00.000Z"));
    assert_eq!(agent["updated_at"], json!("2026-11-23T10:00:00.000Z"));
    assert_eq!(agent["revoked_at"], Value::Null);
    let agent_id = id(agent);
    assert_eq!(agent_id.len(), 36);
    assert_eq!(agent_id, agent_id.to_lowercase(), "ids are lowercase");
    assert_eq!(&agent_id[14..15], "7", "ids are UUID v7");

    assert_eq!(key["agent_id"], json!(agent_id));
    assert_eq!(key["org_id"], json!(s.org_id));
    assert_eq!(key["kind"], json!("agent"));
    assert_eq!(key["environment"], json!("live"));
    assert_eq!(key["parent_key_id"], Value::Null);
    assert_eq!(
        sorted(&key["scopes"]),
        vec!["github:repo", "slack:channels:read", "slack:chat:write"],
        "key scopes default to the flat allowlist"
    );
    assert_eq!(key["revoked_at"], Value::Null);
    assert_eq!(key["expires_at"], Value::Null);

    let api_key = b["api_key"].as_str().unwrap();
    let body = api_key.strip_prefix("kw_ak_").expect("kw_ak_ prefix");
    assert_eq!(body.len(), 36);
    assert!(body.chars().all(|c| c.is_ascii_alphanumeric()));
    assert_eq!(key["start"], json!(&api_key[..12]));
    assert_eq!(b["signing_secret"], Value::Null);
    assert!(
        !key.to_string().contains(api_key),
        "plaintext only in api_key"
    );

    // The plaintext works and is never shown again.
    let me = s.get("/v1/me", api_key).await;
    assert_eq!(me.assert_status(200)["id"], json!(agent_id));
    let got = get_agent(&s, &agent_id).await;
    assert_eq!(&got, agent);
    let keys = s
        .get(
            &s.org_path(&format!("/agents/{agent_id}/keys")),
            &s.root_key,
        )
        .await;
    assert!(!keys.assert_status(200).to_string().contains(api_key));
}

#[tokio::test]
async fn agent_type_service_is_accepted_and_other_types_are_400() {
    let s = TestServer::start().await;
    let b = s
        .create_agent_with(json!({"name": "svc", "type": "service"}))
        .await;
    assert_eq!(b["agent"]["type"], json!("service"));
    let r = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({"name": "bot", "type": "robot"}),
        )
        .await;
    r.assert_error(400, "VALIDATION_ERROR");
}

#[tokio::test]
async fn invalid_agent_names_are_rejected_with_400() {
    let s = TestServer::start().await;
    let long = "a".repeat(64);
    for name in [
        "Upper",
        "has space",
        "-leading-dash",
        "_leading",
        "",
        "dot.name",
        "ünï",
        long.as_str(),
    ] {
        let r = s
            .post(&s.org_path("/agents"), &s.root_key, json!({"name": name}))
            .await;
        r.assert_error(400, "VALIDATION_ERROR");
    }
    // The boundaries that are allowed.
    let max = "b".repeat(63);
    for name in ["0", "a_b-c", max.as_str()] {
        let b = s.create_agent_with(json!({"name": name})).await;
        assert_eq!(b["agent"]["name"], json!(name));
    }
    let list = s.get(&s.org_path("/agents"), &s.root_key).await;
    assert_eq!(
        list.assert_status(200)["agents"].as_array().unwrap().len(),
        3
    );
}

#[tokio::test]
async fn a_taken_name_is_409_agent_name_exists_and_reusable_after_delete() {
    let s = TestServer::start().await;
    let (first, _, _) = s.create_agent("dup", json!({})).await;
    let r = s
        .post(&s.org_path("/agents"), &s.root_key, json!({"name": "dup"}))
        .await;
    r.assert_error(409, "AGENT_NAME_EXISTS");

    // A paused agent still holds its name.
    s.post(
        &s.org_path(&format!("/agents/{}/pause", id(&first))),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    let r = s
        .post(&s.org_path("/agents"), &s.root_key, json!({"name": "dup"}))
        .await;
    r.assert_error(409, "AGENT_NAME_EXISTS");

    s.delete(&s.org_path(&format!("/agents/{}", id(&first))), &s.root_key)
        .await
        .assert_status(200);
    let (second, _, _) = s.create_agent("dup", json!({})).await;
    assert_ne!(id(&second), id(&first));
    let by_name = s.get(&s.org_path("/agents/by-name/dup"), &s.root_key).await;
    assert_eq!(by_name.assert_status(200)["id"], json!(id(&second)));
}

#[tokio::test]
async fn key_scopes_outside_the_agents_scopes_are_400_scope_not_subset() {
    let s = TestServer::start().await;
    let r = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({"name": "narrow", "scopes": {"slack": ["chat:write"]}, "key": {"scopes": ["slack:files:write"]}}),
        )
        .await;
    r.assert_error(400, "SCOPE_NOT_SUBSET");
    let r = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({"name": "narrow", "scopes": {"slack": ["chat:write"]}, "key": {"scopes": ["slack:*"]}}),
        )
        .await;
    r.assert_error(400, "SCOPE_NOT_SUBSET");
    let list = s.get(&s.org_path("/agents"), &s.root_key).await;
    assert_eq!(
        list.assert_status(200)["agents"],
        json!([]),
        "nothing was created"
    );

    let b = s
        .create_agent_with(json!({
            "name": "narrow",
            "scopes": {"slack": ["chat:write", "files:read"]},
            "key": {"scopes": ["slack:chat:write"]},
        }))
        .await;
    assert_eq!(b["key"]["scopes"], json!(["slack:chat:write"]));
}

#[tokio::test]
async fn metadata_over_16_kib_is_rejected_with_400() {
    let s = TestServer::start().await;
    let big = "x".repeat(17 * 1024);
    let r = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({"name": "meta", "metadata": {"blob": big}}),
        )
        .await;
    r.assert_error(400, "VALIDATION_ERROR");
    assert!(
        r.body["error"]["details"].to_string().contains("metadata"),
        "{}",
        r.body
    );

    let fits = "y".repeat(15 * 1024);
    let b = s
        .create_agent_with(json!({"name": "meta", "metadata": {"blob": fits}}))
        .await;
    assert_eq!(
        b["agent"]["metadata"]["blob"].as_str().unwrap().len(),
        15 * 1024
    );

    let r = s
        .patch(
            &s.org_path(&format!("/agents/{}", id(&b["agent"]))),
            &s.root_key,
            json!({"metadata": {"blob": "z".repeat(17 * 1024)}}),
        )
        .await;
    r.assert_error(400, "VALIDATION_ERROR");
}

// ---------------------------------------------------------------------------------------------
// Agents: read
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn agents_are_listed_by_created_at_and_include_revoked_adds_tombstones() {
    let s = TestServer::start().await;
    for n in ["charlie", "alpha", "bravo"] {
        s.create_agent(n, json!({})).await;
        s.advance(chrono::Duration::seconds(1));
    }
    let alpha = s
        .get(&s.org_path("/agents/by-name/alpha"), &s.root_key)
        .await;
    let alpha_id = id(alpha.assert_status(200));
    s.delete(&s.org_path(&format!("/agents/{alpha_id}")), &s.root_key)
        .await
        .assert_status(200);

    let list = s.get(&s.org_path("/agents"), &s.root_key).await;
    assert_eq!(
        names(list.assert_status(200), "agents"),
        vec!["charlie", "bravo"]
    );
    let list = s
        .get(&s.org_path("/agents?include_revoked=false"), &s.root_key)
        .await;
    assert_eq!(
        names(list.assert_status(200), "agents"),
        vec!["charlie", "bravo"]
    );
    let all = s
        .get(&s.org_path("/agents?include_revoked=true"), &s.root_key)
        .await;
    let b = all.assert_status(200);
    assert_eq!(names(b, "agents"), vec!["charlie", "alpha", "bravo"]);
    assert_eq!(b["agents"][1]["status"], json!("revoked"));
}

#[tokio::test]
async fn listing_and_reading_agents_requires_agents_read() {
    let s = TestServer::start().await;
    let (target, _, _) = s.create_agent("target", json!({})).await;
    let (_, _, nope) = s.create_agent("nope", json!({"keys": ["read"]})).await;
    let (_, _, reader) = s.create_agent("reader", json!({"agents": ["read"]})).await;
    let paths = [
        s.org_path("/agents"),
        s.org_path(&format!("/agents/{}", id(&target))),
        s.org_path("/agents/by-name/target"),
    ];
    for p in &paths {
        let r = s.get(p, &nope).await;
        r.assert_error(403, "INSUFFICIENT_SCOPE");
        assert_eq!(
            r.body["error"]["details"]["required"],
            json!(["agents:read"])
        );
        s.get(p, &reader).await.assert_status(200);
    }
    let r = s
        .patch(&paths[1], &reader, json!({"display_name": "x"}))
        .await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_eq!(
        r.body["error"]["details"]["required"],
        json!(["agents:write"])
    );
}

#[tokio::test]
async fn by_name_finds_active_and_paused_agents_but_not_revoked_ones() {
    let s = TestServer::start().await;
    let (active, _, _) = s.create_agent("active-one", json!({})).await;
    let (paused, _, _) = s.create_agent("paused-one", json!({})).await;
    let (revoked, _, _) = s.create_agent("revoked-one", json!({})).await;
    s.post(
        &s.org_path(&format!("/agents/{}/pause", id(&paused))),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    s.delete(
        &s.org_path(&format!("/agents/{}", id(&revoked))),
        &s.root_key,
    )
    .await
    .assert_status(200);

    let r = s
        .get(&s.org_path("/agents/by-name/active-one"), &s.root_key)
        .await;
    assert_eq!(r.assert_status(200)["id"], json!(id(&active)));
    let r = s
        .get(&s.org_path("/agents/by-name/paused-one"), &s.root_key)
        .await;
    let b = r.assert_status(200);
    assert_eq!(b["id"], json!(id(&paused)));
    assert_eq!(b["status"], json!("paused"));
    for n in ["revoked-one", "never-existed", "Active-One"] {
        let r = s
            .get(&s.org_path(&format!("/agents/by-name/{n}")), &s.root_key)
            .await;
        r.assert_error(404, "AGENT_NOT_FOUND");
    }
}

#[tokio::test]
async fn unknown_agent_ids_are_404_agent_not_found() {
    let s = TestServer::start().await;
    let p = |suffix: &str| s.org_path(&format!("/agents/{MISSING_ID}{suffix}"));
    let cases: Vec<(Method, String, Option<Value>)> = vec![
        (Method::GET, p(""), None),
        (Method::PATCH, p(""), Some(json!({"display_name": "x"}))),
        (Method::DELETE, p(""), None),
        (Method::POST, p("/pause"), None),
        (Method::POST, p("/resume"), None),
        (Method::POST, p("/keys"), Some(json!({}))),
        (Method::GET, p("/keys"), None),
    ];
    for (method, path, body) in cases {
        let r = s
            .send(method.clone(), &path, Some(&s.root_key), &[], body)
            .await;
        assert_eq!(r.status, 404, "{method} {path}: {}", r.body);
        r.assert_error(404, "AGENT_NOT_FOUND");
    }
}

// ---------------------------------------------------------------------------------------------
// Agents: update
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn patch_with_an_empty_body_returns_the_agent_unchanged_with_the_same_version() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("steady", json!({"slack": ["chat:write"]}))
        .await;
    s.advance(chrono::Duration::minutes(5));
    let r = s
        .patch(
            &s.org_path(&format!("/agents/{}", id(&agent))),
            &s.root_key,
            json!({}),
        )
        .await;
    assert_eq!(r.assert_status(200), &agent);
    assert_eq!(get_agent(&s, &id(&agent)).await, agent);
}

#[tokio::test]
async fn broadening_scopes_bumps_the_version_by_exactly_one() {
    let s = TestServer::start().await;
    let (agent, key, _) = s
        .create_agent("grower", json!({"slack": ["chat:write"]}))
        .await;
    let path = s.org_path(&format!("/agents/{}", id(&agent)));
    s.advance(chrono::Duration::minutes(5));
    let r = s
        .patch(
            &path,
            &s.root_key,
            json!({"scopes": {"slack": ["chat:write", "files:read"], "github": ["repo"]}}),
        )
        .await;
    let b = r.assert_status(200).clone();
    assert_eq!(b["version"], json!(2));
    assert_eq!(
        b["scopes"],
        json!({"slack": ["chat:write", "files:read"], "github": ["repo"]})
    );
    assert_eq!(b["updated_at"], json!(ts(chrono::Duration::minutes(5))));
    assert_eq!(b["created_at"], agent["created_at"]);

    // Widening a scope to a wildcard that implies the old ones is broadening too.
    let r = s
        .patch(
            &path,
            &s.root_key,
            json!({"scopes": {"slack": ["*"], "github": ["repo"]}}),
        )
        .await;
    assert_eq!(r.assert_status(200)["version"], json!(3));
    assert_eq!(get_agent(&s, &id(&agent)).await["version"], json!(3));

    // Existing keys keep the scopes they were minted with.
    let k = s.get(&format!("/v1/keys/{}", id(&key)), &s.root_key).await;
    assert_eq!(k.assert_status(200)["scopes"], json!(["slack:chat:write"]));
}

#[tokio::test]
async fn dropping_a_scope_or_a_provider_is_400_scope_narrowing_not_supported() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent(
            "shrinker",
            json!({"slack": ["chat:write", "files:read"], "github": ["repo"]}),
        )
        .await;
    let path = s.org_path(&format!("/agents/{}", id(&agent)));
    for scopes in [
        json!({"slack": ["chat:write"], "github": ["repo"]}),
        json!({"slack": ["chat:write", "files:read"]}),
        json!({}),
        json!({"slack": ["chat:write", "files:read"], "gitlab": ["repo"]}),
    ] {
        let r = s.patch(&path, &s.root_key, json!({"scopes": scopes})).await;
        r.assert_error(400, "SCOPE_NARROWING_NOT_SUPPORTED");
    }
    let now = get_agent(&s, &id(&agent)).await;
    assert_eq!(now["version"], json!(1));
    assert_eq!(now["scopes"], agent["scopes"]);
}

#[tokio::test]
async fn patch_metadata_and_policy_replace_them_whole() {
    let s = TestServer::start().await;
    let b = s
        .create_agent_with(
            json!({"name": "meta", "metadata": {"a": 1, "b": {"c": 2}}, "policy": {"note": "x"}}),
        )
        .await;
    let path = s.org_path(&format!("/agents/{}", id(&b["agent"])));
    let r = s
        .patch(&path, &s.root_key, json!({"metadata": {"b": {"d": 3}}}))
        .await;
    let a = r.assert_status(200);
    assert_eq!(
        a["metadata"],
        json!({"b": {"d": 3}}),
        "replaced, not merged"
    );
    assert_eq!(a["version"], json!(2));
    let r = s
        .patch(
            &path,
            &s.root_key,
            json!({"policy": {"allow_subagents": false}}),
        )
        .await;
    let a = r.assert_status(200);
    assert_eq!(a["policy"], json!({"allow_subagents": false}));
    assert_eq!(a["version"], json!(3));
    let r = s
        .patch(&path, &s.root_key, json!({"display_name": "Meta"}))
        .await;
    let a = r.assert_status(200);
    assert_eq!(a["display_name"], json!("Meta"));
    assert_eq!(a["version"], json!(4));
    let r = s
        .patch(&path, &s.root_key, json!({"display_name": null}))
        .await;
    let a = r.assert_status(200);
    assert_eq!(a["display_name"], Value::Null);
    assert_eq!(a["version"], json!(5));
    assert_eq!(get_agent(&s, &id(&b["agent"])).await, *a);
}

#[tokio::test]
async fn a_noop_patch_with_the_same_values_keeps_the_version() {
    let s = TestServer::start().await;
    let b = s
        .create_agent_with(json!({
            "name": "same",
            "display_name": "Same",
            "scopes": {"slack": ["chat:write"]},
            "metadata": {"k": "v"},
            "policy": {"note": "n"},
        }))
        .await;
    let path = s.org_path(&format!("/agents/{}", id(&b["agent"])));
    s.advance(chrono::Duration::minutes(1));
    let r = s
        .patch(
            &path,
            &s.root_key,
            json!({
                "display_name": "Same",
                "scopes": {"slack": ["chat:write"]},
                "metadata": {"k": "v"},
                "policy": {"note": "n"},
            }),
        )
        .await;
    let a = r.assert_status(200);
    assert_eq!(a["version"], json!(1));
    assert_eq!(a["updated_at"], b["agent"]["updated_at"]);
}

#[tokio::test]
async fn patching_a_revoked_agent_is_409_agent_revoked() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("gone", json!({"slack": ["chat:write"]}))
        .await;
    let path = s.org_path(&format!("/agents/{}", id(&agent)));
    s.delete(&path, &s.root_key).await.assert_status(200);
    for body in [
        json!({"display_name": "back"}),
        json!({"scopes": {"slack": ["*"]}}),
        json!({}),
    ] {
        let r = s.patch(&path, &s.root_key, body).await;
        r.assert_error(409, "AGENT_REVOKED");
    }
    for action in ["pause", "resume"] {
        let r = s
            .post(&format!("{path}/{action}"), &s.root_key, json!({}))
            .await;
        r.assert_error(409, "AGENT_REVOKED");
    }
    let r = s
        .post(&format!("{path}/keys"), &s.root_key, json!({}))
        .await;
    r.assert_error(409, "AGENT_REVOKED");
    assert_eq!(get_agent(&s, &id(&agent)).await["status"], json!("revoked"));
}

#[tokio::test]
async fn invalid_policy_rules_are_rejected_with_400_and_valid_ones_kept_as_given() {
    let s = TestServer::start().await;
    let bad_rules = [
        json!("not-a-list"),
        json!([{"rule_type": "json_match", "rule_body": {"when": {"method": "GET"}, "effect": "allow"}}]),
        json!([{"rule_type": "regex", "rule_body": {"when": {"method": "GET"}, "effect": "deny"}}]),
        json!([{"rule_type": "json_match", "rule_body": {"when": {"colour": "red"}, "effect": "deny"}}]),
        json!([{"rule_type": "json_match", "rule_body": {"when": {}, "effect": "deny"}}]),
        json!([{"rule_type": "json_match", "rule_body": {"when": {"client_ip": "not-an-ip"}, "effect": "deny"}}]),
    ];
    for rules in &bad_rules {
        let r = s
            .post(
                &s.org_path("/agents"),
                &s.root_key,
                json!({"name": "ruled", "policy": {"rules": rules}}),
            )
            .await;
        r.assert_error(400, "VALIDATION_ERROR");
    }
    let good = json!({
        "rules": [{"rule_type": "json_match", "rule_body": {"when": {"method": ["DELETE", "PATCH"], "client_ip": "10.0.0.0/8"}, "effect": "deny"}}],
        "owner": "ops",
    });
    let b = s
        .create_agent_with(json!({"name": "ruled", "policy": good}))
        .await;
    assert_eq!(b["agent"]["policy"], good, "other keys kept as given");
    let path = s.org_path(&format!("/agents/{}", id(&b["agent"])));
    for rules in &bad_rules {
        let r = s
            .patch(&path, &s.root_key, json!({"policy": {"rules": rules}}))
            .await;
        r.assert_error(400, "VALIDATION_ERROR");
    }
    let r = s
        .patch(
            &path,
            &s.root_key,
            json!({"policy": {"allow_subagents": "yes"}}),
        )
        .await;
    r.assert_error(400, "VALIDATION_ERROR");
    let now = get_agent(&s, &id(&b["agent"])).await;
    assert_eq!(now["policy"], good);
    assert_eq!(now["version"], json!(1));
}

// ---------------------------------------------------------------------------------------------
// Pause, resume, delete
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn pause_and_resume_are_idempotent() {
    let s = TestServer::start().await;
    let (agent, _, _) = s.create_agent("toggler", json!({})).await;
    let path = s.org_path(&format!("/agents/{}", id(&agent)));
    let r = s
        .post(&format!("{path}/resume"), &s.root_key, json!({}))
        .await;
    let b = r.assert_status(200);
    assert_eq!(
        (b["status"].clone(), b["version"].clone()),
        (json!("active"), json!(1))
    );
    for _ in 0..2 {
        let r = s
            .post(&format!("{path}/pause"), &s.root_key, json!({}))
            .await;
        let b = r.assert_status(200);
        assert_eq!(b["status"], json!("paused"));
        assert_eq!(b["version"], json!(2), "a second pause changes nothing");
    }
    for _ in 0..2 {
        let r = s
            .post(&format!("{path}/resume"), &s.root_key, json!({}))
            .await;
        let b = r.assert_status(200);
        assert_eq!(b["status"], json!("active"));
        assert_eq!(b["version"], json!(3), "a second resume changes nothing");
    }
    // No body at all works too.
    let r = s
        .send(
            Method::POST,
            &format!("{path}/pause"),
            Some(&s.root_key),
            &[],
            None,
        )
        .await;
    assert_eq!(r.assert_status(200)["status"], json!("paused"));
}

#[tokio::test]
async fn a_paused_agents_key_is_403_agent_paused_but_me_still_works() {
    let s = TestServer::start().await;
    let (agent, key, api_key) = s.create_agent("sleepy", json!({"agents": ["read"]})).await;
    let path = s.org_path(&format!("/agents/{}", id(&agent)));
    s.get(&s.org_path(""), &api_key).await.assert_status(200);
    s.post(&format!("{path}/pause"), &s.root_key, json!({}))
        .await
        .assert_status(200);

    for p in [s.org_path(""), s.org_path("/agents"), path.clone()] {
        let r = s.get(&p, &api_key).await;
        r.assert_error(403, "AGENT_PAUSED");
    }
    let me = s.get("/v1/me", &api_key).await;
    let b = me.assert_status(200);
    assert_eq!(b["id"], json!(id(&agent)));
    assert_eq!(b["status"], json!("paused"));
    assert_eq!(b["key"]["id"], json!(id(&key)));

    s.post(&format!("{path}/resume"), &s.root_key, json!({}))
        .await
        .assert_status(200);
    s.get(&s.org_path(""), &api_key).await.assert_status(200);
}

#[tokio::test]
async fn deleting_an_agent_tombstones_it_and_repeating_returns_the_same_tombstone() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("doomed", json!({"slack": ["chat:write"]}))
        .await;
    let path = s.org_path(&format!("/agents/{}", id(&agent)));
    s.advance(chrono::Duration::minutes(3));
    let r = s.delete(&path, &s.root_key).await;
    let tomb = r.assert_status(200).clone();
    assert_eq!(tomb["id"], agent["id"]);
    assert_eq!(tomb["status"], json!("revoked"));
    assert_eq!(tomb["revoked_at"], json!(ts(chrono::Duration::minutes(3))));
    assert_eq!(tomb["version"], json!(2));
    assert_eq!(tomb["name"], json!("doomed"));

    s.advance(chrono::Duration::minutes(3));
    let again = s.delete(&path, &s.root_key).await;
    assert_eq!(again.assert_status(200), &tomb, "the same tombstone");
    assert_eq!(
        get_agent(&s, &id(&agent)).await,
        tomb,
        "readable by id as revoked"
    );
}

#[tokio::test]
async fn after_delete_the_agents_keys_are_401_revoked_everywhere_but_me() {
    let s = TestServer::start().await;
    let (agent, key, api_key) = s
        .create_agent(
            "retired",
            json!({"agents": ["read"], "keys": ["derive", "read"]}),
        )
        .await;
    let r = s
        .post(
            "/v1/keys/derive",
            &api_key,
            json!({"scopes": ["agents:read"], "expires_in": 600}),
        )
        .await;
    let derived = r.assert_status(201).clone();
    let derived_key = derived["api_key"].as_str().unwrap().to_string();
    s.get(&s.org_path("/agents"), &derived_key)
        .await
        .assert_status(200);

    let path = s.org_path(&format!("/agents/{}", id(&agent)));
    s.delete(&path, &s.root_key).await.assert_status(200);

    for k in [&api_key, &derived_key] {
        for p in [
            s.org_path(""),
            s.org_path("/agents"),
            path.clone(),
            format!("/v1/keys/{}", id(&key)),
        ] {
            let r = s.get(&p, k).await;
            r.assert_error(401, "REVOKED_API_KEY");
        }
        let r = s
            .post(
                "/v1/keys/derive",
                k,
                json!({"scopes": ["agents:read"], "expires_in": 60}),
            )
            .await;
        r.assert_error(401, "REVOKED_API_KEY");
    }
    let me = s.get("/v1/me", &api_key).await;
    let b = me.assert_status(200);
    assert_eq!(b["status"], json!("revoked"));
    assert_eq!(b["key"]["id"], json!(id(&key)));

    // The keys' own records still show what was live.
    let k = s.get(&format!("/v1/keys/{}", id(&key)), &s.root_key).await;
    assert_eq!(k.assert_status(200)["revoked_at"], Value::Null);
    let d = s
        .get(&format!("/v1/keys/{}", id(&derived["key"])), &s.root_key)
        .await;
    assert_eq!(d.assert_status(200)["revoked_at"], Value::Null);
}

// ---------------------------------------------------------------------------------------------
// Sub-agents
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_agent_key_cannot_create_agents_without_allow_subagents() {
    let s = TestServer::start().await;
    let (_, _, api_key) = s
        .create_agent("minter", json!({"agents": ["write", "read"]}))
        .await;
    let r = s
        .post(&s.org_path("/agents"), &api_key, json!({"name": "child"}))
        .await;
    r.assert_error(403, "AGENT_CANNOT_MINT_SUBAGENTS");
    let list = s.get(&s.org_path("/agents"), &s.root_key).await;
    assert_eq!(names(list.assert_status(200), "agents"), vec!["minter"]);

    let b = s
        .create_agent_with(json!({"name": "explicit-no", "scopes": {"agents": ["write"]}, "policy": {"allow_subagents": false}}))
        .await;
    let r = s
        .post(
            &s.org_path("/agents"),
            b["api_key"].as_str().unwrap(),
            json!({"name": "child"}),
        )
        .await;
    r.assert_error(403, "AGENT_CANNOT_MINT_SUBAGENTS");
}

#[tokio::test]
async fn with_allow_subagents_an_agent_key_creates_a_child_that_records_its_parent() {
    let s = TestServer::start().await;
    let parent = s
        .create_agent_with(json!({
            "name": "planner",
            "scopes": {"agents": ["write"], "slack": ["chat:write", "files:read"]},
            "policy": {"allow_subagents": true},
        }))
        .await;
    let parent_key = parent["api_key"].as_str().unwrap();
    let r = s
        .post(
            &s.org_path("/agents"),
            parent_key,
            json!({"name": "worker", "scopes": {"slack": ["chat:write"]}}),
        )
        .await;
    let b = r.assert_status(201);
    assert_eq!(b["agent"]["parent_agent_id"], json!(id(&parent["agent"])));
    assert_eq!(b["agent"]["scopes"], json!({"slack": ["chat:write"]}));
    assert_eq!(b["key"]["scopes"], json!(["slack:chat:write"]));
    let child_key = b["api_key"].as_str().unwrap();
    let me = s.get("/v1/me", child_key).await;
    assert_eq!(
        me.assert_status(200)["parent_agent_id"],
        json!(id(&parent["agent"]))
    );
}

#[tokio::test]
async fn a_subagents_scopes_outside_its_parents_are_400_scope_not_subset() {
    let s = TestServer::start().await;
    let parent = s
        .create_agent_with(json!({
            "name": "planner",
            "scopes": {"agents": ["write"], "slack": ["chat:write"]},
            "policy": {"allow_subagents": true},
        }))
        .await;
    let parent_key = parent["api_key"].as_str().unwrap();
    for scopes in [
        json!({"slack": ["files:write"]}),
        json!({"slack": ["*"]}),
        json!({"github": ["repo"]}),
        json!({"org": ["admin"]}),
    ] {
        let r = s
            .post(
                &s.org_path("/agents"),
                parent_key,
                json!({"name": "worker", "scopes": scopes}),
            )
            .await;
        r.assert_error(400, "SCOPE_NOT_SUBSET");
    }
    let list = s.get(&s.org_path("/agents"), &s.root_key).await;
    assert_eq!(names(list.assert_status(200), "agents"), vec!["planner"]);
}

// ---------------------------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creation_of_one_name_yields_exactly_one_201_and_409s_for_the_rest() {
    let s = TestServer::start().await;
    let path = s.org_path("/agents");
    let futs = (0..8).map(|_| s.post(&path, &s.root_key, json!({"name": "racer"})));
    let results: Vec<Resp> = futures_util::future::join_all(futs).await;
    let created: Vec<&Resp> = results.iter().filter(|r| r.status == 201).collect();
    assert_eq!(
        created.len(),
        1,
        "statuses: {:?}",
        results.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    for r in results.iter().filter(|r| r.status != 201) {
        r.assert_error(409, "AGENT_NAME_EXISTS");
    }
    let list = s.get(&s.org_path("/agents"), &s.root_key).await;
    let b = list.assert_status(200);
    assert_eq!(names(b, "agents"), vec!["racer"]);
    assert_eq!(b["agents"][0]["id"], created[0].body["agent"]["id"]);
}
