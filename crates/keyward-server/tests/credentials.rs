//! The credential checks of API.md §1 in their contract order (token shape, revoked, expired, IP
//! allowlist with `X-Forwarded-For` and trusted proxies, agent paused / revoked, scope then org),
//! and `GET /v1/me`'s exceptions to them.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use chrono::Duration;
use common::{Resp, TestServer};
use keyward_core::token::{self, Environment, TokenKind};
use reqwest::Method;
use serde_json::{json, Value};

fn id(v: &Value) -> String {
    v["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no id: {v}"))
        .to_string()
}

/// CRC-32 (IEEE, reflected, polynomial 0xEDB88320), written out here so the tests build
/// well-checksummed tokens independently of the server's code.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xEDB8_8320 & mask);
        }
    }
    !crc
}

/// Base62 (`0-9A-Za-z`), most significant digit first, left-padded with `0` to `width`.
fn base62(mut v: u32, width: usize) -> String {
    const ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    while v > 0 {
        out.push(ALPHABET[(v % 62) as usize]);
        v /= 62;
    }
    while out.len() < width {
        out.push(b'0');
    }
    out.reverse();
    String::from_utf8(out).unwrap()
}

/// `head` followed by its contract checksum.
fn with_checksum(head: &str) -> String {
    format!("{head}{}", base62(crc32(head.as_bytes()), 6))
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

async fn revoke(s: &TestServer, key_id: &str) {
    s.post(
        &format!("/v1/keys/{key_id}/revoke?force=true"),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
}

async fn set_status(s: &TestServer, agent_id: &str, verb: &str) {
    s.post(
        &s.org_path(&format!("/agents/{agent_id}/{verb}")),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
}

async fn delete_agent(s: &TestServer, agent_id: &str) {
    s.delete(&s.org_path(&format!("/agents/{agent_id}")), &s.root_key)
        .await
        .assert_status(200);
}

/// A request that any valid key of the org may make and that runs every agent check.
async fn org_get(s: &TestServer, key: &str, headers: &[(&str, &str)]) -> Resp {
    s.send(Method::GET, &s.org_path(""), Some(key), headers, None)
        .await
}

// ---------------------------------------------------------------------------------------------
// Token shape
// ---------------------------------------------------------------------------------------------

#[test]
fn the_test_checksum_helper_matches_tokens_the_server_issues() {
    for kind in [TokenKind::Root, TokenKind::Agent, TokenKind::Derived] {
        let t = token::generate(Environment::Test, kind).unwrap();
        let t = t.expose();
        let head = &t[..t.len() - 6];
        assert_eq!(with_checksum(head), t);
    }
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(base62(61, 3), "00z");
}

#[tokio::test]
async fn malformed_and_unknown_tokens_are_401_invalid_api_key() {
    let s = TestServer::start().await;
    let random30 = "a".repeat(10) + &"B".repeat(10) + &"7".repeat(10);
    let never_issued = token::generate(Environment::Live, TokenKind::Agent).unwrap();
    let real = s.root_key.clone();
    let mut bad_checksum = real.clone();
    let last = bad_checksum.pop().unwrap();
    bad_checksum.push(if last == '0' { '1' } else { '0' });
    let cases: Vec<(&str, String)> = vec![
        ("wrong prefix", with_checksum(&format!("kx_ak_{random30}"))),
        (
            "upper-case prefix",
            with_checksum(&format!("KW_ak_{random30}")),
        ),
        (
            "wrong kind code",
            with_checksum(&format!("kw_xk_{random30}")),
        ),
        (
            "35-char body",
            with_checksum(&format!("kw_ak_{}", &random30[..29])),
        ),
        ("37-char body", with_checksum(&format!("kw_ak_{random30}a"))),
        (
            "non-base62 char",
            with_checksum(&format!("kw_ak_{}-", &random30[..29])),
        ),
        (
            "non-ascii char",
            with_checksum(&format!("kw_ak_{}é", &random30[..28])),
        ),
        ("bad checksum", bad_checksum),
        ("no separators", real.replace('_', "")),
        ("empty", String::new()),
        (
            "valid shape, never issued",
            never_issued.expose().to_string(),
        ),
        (
            "valid shape and checksum, never issued",
            with_checksum(&format!("kw_ak_{random30}")),
        ),
    ];
    for (what, tok) in cases {
        let r = s
            .send(
                Method::GET,
                "/v1/me",
                None,
                &[("Authorization", &format!("Bearer {tok}"))],
                None,
            )
            .await;
        assert_eq!(r.status, 401, "{what}: {tok:?} -> {}", r.body);
        r.assert_error(401, "INVALID_API_KEY");
        let r = s
            .send(
                Method::GET,
                &s.org_path(""),
                None,
                &[("X-API-Key", &tok)],
                None,
            )
            .await;
        if tok.is_empty() {
            // An empty X-API-Key is either missing or invalid; never a success.
            assert_eq!(r.status, 401, "{what}");
        } else {
            r.assert_error(401, "INVALID_API_KEY");
        }
    }
    // The real key itself is fine through all three headers.
    for h in ["X-API-Key", "Api-Key"] {
        s.send(Method::GET, &s.org_path(""), None, &[(h, &real)], None)
            .await
            .assert_status(200);
    }
}

#[tokio::test]
async fn no_credential_is_401_missing_credentials_and_another_scheme_is_invalid_api_key() {
    let s = TestServer::start().await;
    s.send(Method::GET, "/v1/me", None, &[], None)
        .await
        .assert_error(401, "MISSING_CREDENTIALS");
    let basic = format!("Basic {}", s.root_key);
    s.send(
        Method::GET,
        &s.org_path(""),
        None,
        &[("Authorization", &basic)],
        None,
    )
    .await
    .assert_error(401, "INVALID_API_KEY");
}

// ---------------------------------------------------------------------------------------------
// Revoked and expired
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn an_expired_key_is_401_expired_api_key() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("mortal", json!({"slack": ["chat:write"]}))
        .await;
    let (_, k) = mint_ok(&s, &id(&agent), json!({"expires_in": 60})).await;
    org_get(&s, &k, &[]).await.assert_status(200);
    s.advance(Duration::seconds(59));
    org_get(&s, &k, &[]).await.assert_status(200);
    s.advance(Duration::seconds(2));
    org_get(&s, &k, &[])
        .await
        .assert_error(401, "EXPIRED_API_KEY");
    s.get("/v1/me", &k)
        .await
        .assert_error(401, "EXPIRED_API_KEY");
}

#[tokio::test]
async fn a_revoked_key_is_401_revoked_api_key_everywhere_including_me() {
    let s = TestServer::start().await;
    let (_, key, k) = s
        .create_agent("revokee", json!({"slack": ["chat:write"]}))
        .await;
    revoke(&s, &id(&key)).await;
    org_get(&s, &k, &[])
        .await
        .assert_error(401, "REVOKED_API_KEY");
    s.get("/v1/me", &k)
        .await
        .assert_error(401, "REVOKED_API_KEY");
}

/// A connection keeps its own copy of the snapshot of a key that authenticates on it again and
/// again; the copy must go stale with the cache entry it came from.
#[tokio::test]
async fn a_key_used_over_and_over_on_one_connection_is_refused_at_once_when_revoked() {
    let s = TestServer::start().await;
    let (_, key, k) = s
        .create_agent("steady", json!({"slack": ["chat:write"]}))
        .await;
    // One connection for everything (the requests are sequential on one pooled connection):
    // the key's requests in a row (the front door's `GET /v1/me` keeps the copy), the root
    // key's writes in between.
    for _ in 0..3 {
        s.get("/v1/me", &k).await.assert_status(200);
    }
    let path = format!("/v1/keys/{}", id(&key));
    s.patch(
        &path,
        &s.root_key,
        json!({"cidr_allowlist": ["10.0.0.0/8"]}),
    )
    .await
    .assert_status(200);
    s.get("/v1/me", &k)
        .await
        .assert_error(403, "IP_NOT_ALLOWED");
    s.patch(&path, &s.root_key, json!({"cidr_allowlist": []}))
        .await
        .assert_status(200);
    for _ in 0..3 {
        s.get("/v1/me", &k).await.assert_status(200);
    }
    revoke(&s, &id(&key)).await;
    s.get("/v1/me", &k)
        .await
        .assert_error(401, "REVOKED_API_KEY");
}

#[tokio::test]
async fn revoked_is_checked_before_expired() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("both", json!({"slack": ["chat:write"]}))
        .await;
    let (key, k) = mint_ok(&s, &id(&agent), json!({"expires_in": 60})).await;
    revoke(&s, &id(&key)).await;
    s.advance(Duration::seconds(120));
    org_get(&s, &k, &[])
        .await
        .assert_error(401, "REVOKED_API_KEY");
}

#[tokio::test]
async fn expired_is_checked_before_the_ip_allowlist() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("faraway", json!({"slack": ["chat:write"]}))
        .await;
    let (_, k) = mint_ok(
        &s,
        &id(&agent),
        json!({"expires_in": 60, "cidr_allowlist": ["10.0.0.0/8"]}),
    )
    .await;
    org_get(&s, &k, &[])
        .await
        .assert_error(403, "IP_NOT_ALLOWED");
    s.advance(Duration::seconds(61));
    org_get(&s, &k, &[])
        .await
        .assert_error(401, "EXPIRED_API_KEY");
}

// ---------------------------------------------------------------------------------------------
// IP allowlist
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_key_whose_allowlist_excludes_the_caller_is_403_ip_not_allowed() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("fenced", json!({"slack": ["chat:write"]}))
        .await;
    let aid = id(&agent);
    let (_, outside) = mint_ok(&s, &aid, json!({"cidr_allowlist": ["10.0.0.0/8"]})).await;
    org_get(&s, &outside, &[])
        .await
        .assert_error(403, "IP_NOT_ALLOWED");
    let (_, bare) = mint_ok(&s, &aid, json!({"cidr_allowlist": ["127.0.0.1"]})).await;
    org_get(&s, &bare, &[]).await.assert_status(200);
    let (_, mixed) = mint_ok(
        &s,
        &aid,
        json!({"cidr_allowlist": ["10.0.0.0/8", "127.0.0.0/8", "::1"]}),
    )
    .await;
    org_get(&s, &mixed, &[]).await.assert_status(200);
    let (_, neighbour) = mint_ok(&s, &aid, json!({"cidr_allowlist": ["127.0.0.2"]})).await;
    org_get(&s, &neighbour, &[])
        .await
        .assert_error(403, "IP_NOT_ALLOWED");
    // The allowlist applies to /v1/me too.
    s.get("/v1/me", &outside)
        .await
        .assert_error(403, "IP_NOT_ALLOWED");
}

#[tokio::test]
async fn x_forwarded_for_changes_nothing_without_trusted_proxies() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("spoofer", json!({"slack": ["chat:write"]}))
        .await;
    let aid = id(&agent);
    let (_, ten) = mint_ok(&s, &aid, json!({"cidr_allowlist": ["10.0.0.0/8"]})).await;
    for xff in ["10.1.2.3", "10.1.2.3, 10.9.9.9", "127.0.0.1, 10.1.2.3"] {
        org_get(&s, &ten, &[("X-Forwarded-For", xff)])
            .await
            .assert_error(403, "IP_NOT_ALLOWED");
    }
    let (_, local) = mint_ok(&s, &aid, json!({"cidr_allowlist": ["127.0.0.1"]})).await;
    org_get(&s, &local, &[("X-Forwarded-For", "10.1.2.3")])
        .await
        .assert_status(200);
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_rightmost_untrusted_forwarded_address_is_the_client() {
    let s = TestServer::start_with(vec!["127.0.0.1/32".parse().unwrap()]).await;
    let (agent, _, _) = s
        .create_agent("proxied", json!({"slack": ["chat:write"]}))
        .await;
    let (_, k) = mint_ok(&s, &id(&agent), json!({"cidr_allowlist": ["10.0.0.0/8"]})).await;
    for xff in ["10.1.2.3", "10.1.2.3, 127.0.0.1", "192.168.1.1, 10.1.2.3"] {
        let r = org_get(&s, &k, &[("X-Forwarded-For", xff)]).await;
        assert_eq!(r.status, 200, "XFF {xff}: {}", r.body);
    }
    for xff in [
        "192.168.1.1",
        "10.1.2.3, 192.168.1.1",
        "10.1.2.3, 192.168.1.1, 127.0.0.1",
    ] {
        let r = org_get(&s, &k, &[("X-Forwarded-For", xff)]).await;
        assert_eq!(r.status, 403, "XFF {xff}: {}", r.body);
        r.assert_error(403, "IP_NOT_ALLOWED");
    }
    // Without the header the client is the proxy itself.
    org_get(&s, &k, &[])
        .await
        .assert_error(403, "IP_NOT_ALLOWED");
}

// ---------------------------------------------------------------------------------------------
// Agent state
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_paused_agents_key_is_403_agent_paused_but_me_works() {
    let s = TestServer::start().await;
    let (agent, _, k) = s
        .create_agent("sleepy", json!({"slack": ["chat:write"]}))
        .await;
    let aid = id(&agent);
    set_status(&s, &aid, "pause").await;
    org_get(&s, &k, &[]).await.assert_error(403, "AGENT_PAUSED");
    let me = s.get("/v1/me", &k).await;
    let me = me.assert_status(200);
    assert_eq!(me["id"], json!(aid));
    assert_eq!(me["status"], "paused");
    set_status(&s, &aid, "resume").await;
    org_get(&s, &k, &[]).await.assert_status(200);
}

#[tokio::test]
async fn the_ip_allowlist_is_checked_before_the_agent_state() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("layered", json!({"slack": ["chat:write"]}))
        .await;
    let aid = id(&agent);
    let (_, k) = mint_ok(&s, &aid, json!({"cidr_allowlist": ["10.0.0.0/8"]})).await;
    set_status(&s, &aid, "pause").await;
    org_get(&s, &k, &[])
        .await
        .assert_error(403, "IP_NOT_ALLOWED");
}

#[tokio::test]
async fn a_deleted_agents_key_is_401_revoked_api_key_but_me_works() {
    let s = TestServer::start().await;
    let (agent, key, k) = s
        .create_agent("tombstone", json!({"slack": ["chat:write"]}))
        .await;
    let aid = id(&agent);
    delete_agent(&s, &aid).await;
    org_get(&s, &k, &[])
        .await
        .assert_error(401, "REVOKED_API_KEY");
    let me = s.get("/v1/me", &k).await;
    let me = me.assert_status(200);
    assert_eq!(me["id"], json!(aid));
    assert_eq!(me["status"], "revoked");
    assert!(me["revoked_at"].is_string());
    assert_eq!(me["key"]["id"], key["id"]);
    assert!(
        me["key"]["revoked_at"].is_null(),
        "the key's own record is left as it was"
    );
}

// ---------------------------------------------------------------------------------------------
// GET /v1/me
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_root_key_on_me_is_400_me_requires_agent_key() {
    let s = TestServer::start().await;
    s.get("/v1/me", &s.root_key)
        .await
        .assert_error(400, "ME_REQUIRES_AGENT_KEY");
}

#[tokio::test]
async fn me_with_a_derived_key_returns_the_agent_and_the_derived_key() {
    let s = TestServer::start().await;
    let (agent, parent, k) = s
        .create_agent(
            "parent",
            json!({"keys": ["derive"], "slack": ["chat:write"]}),
        )
        .await;
    let d = s
        .post(
            "/v1/keys/derive",
            &k,
            json!({"scopes": ["slack:chat:write"], "expires_in": 600}),
        )
        .await
        .assert_status(201)
        .clone();
    let me = s.get("/v1/me", d["api_key"].as_str().unwrap()).await;
    let me = me.assert_status(200);
    assert_eq!(me["id"], agent["id"]);
    assert_eq!(me["name"], "parent");
    assert_eq!(me["key"]["id"], d["key"]["id"]);
    assert_eq!(me["key"]["kind"], "derived");
    assert_eq!(me["key"]["parent_key_id"], parent["id"]);
}

// ---------------------------------------------------------------------------------------------
// Scope and org checks
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_scope_check_comes_before_the_org_check() {
    let s = TestServer::start().await;
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
    let agents_of_a = s.org_path("/agents");

    let r = s.get(&agents_of_a, b_key).await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_eq!(
        r.body["error"]["details"]["required"],
        json!(["agents:read"])
    );
    s.get(&agents_of_a, &root_b)
        .await
        .assert_error(403, "NOT_A_MEMBER");
    // Any key of the org may read the org; another org's may not.
    s.get(&s.org_path(""), &root_b)
        .await
        .assert_error(403, "NOT_A_MEMBER");
    s.get(&s.org_path(""), b_key)
        .await
        .assert_error(403, "NOT_A_MEMBER");
}
