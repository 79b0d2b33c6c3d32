//! API.md §0 `Idempotency-Key` through real HTTP: replays (secrets nulled, `Idempotent-Replayed`),
//! canonical bodies, body mismatch, replays of paused or revoked agents, the 24 h window, header
//! validation, per-org scoping, concurrent duplicates, and every creating endpoint that takes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Resp, TestServer};
use reqwest::header::HeaderValue;
use reqwest::Method;
use serde_json::{json, Value};

fn id(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

/// POST with an `Idempotency-Key` and a JSON body, as `key`.
async fn post_idem(s: &TestServer, path: &str, key: &str, idem: &str, body: Value) -> Resp {
    s.send(
        Method::POST,
        path,
        Some(key),
        &[("Idempotency-Key", idem)],
        Some(body),
    )
    .await
}

/// POST with a raw JSON text body and any `Idempotency-Key` bytes.
async fn post_raw(s: &TestServer, path: &str, key: &str, idem: HeaderValue, body: &str) -> Resp {
    let r = s
        .http
        .post(format!("{}{}", s.base, path))
        .bearer_auth(key)
        .header("Idempotency-Key", idem)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let bytes = r.bytes().await.unwrap();
    Resp {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

#[track_caller]
fn assert_fresh(r: &Resp) {
    assert_eq!(
        r.header("idempotent-replayed"),
        None,
        "a fresh response is not marked replayed"
    );
    assert!(
        r.body["api_key"].as_str().is_some(),
        "a fresh response carries the plaintext: {}",
        r.body
    );
}

#[track_caller]
fn assert_replay_of(r: &Resp, first: &Resp) {
    assert_eq!(r.status, first.status, "replayed status; body: {}", r.body);
    assert_eq!(r.header("idempotent-replayed"), Some("true"));
    assert_eq!(r.body["api_key"], Value::Null, "no plaintext on a replay");
    assert_eq!(
        r.body["signing_secret"],
        Value::Null,
        "no signing secret on a replay"
    );
    let mut expected = first.body.clone();
    expected["api_key"] = Value::Null;
    expected["signing_secret"] = Value::Null;
    assert_eq!(r.body, expected, "the stored response, secrets nulled");
}

async fn agent_count(s: &TestServer) -> usize {
    let r = s
        .get(&s.org_path("/agents?include_revoked=true"), &s.root_key)
        .await;
    r.assert_status(200)["agents"].as_array().unwrap().len()
}

#[tokio::test]
async fn the_same_key_and_body_replay_the_response_without_secrets() {
    let s = TestServer::start().await;
    let path = s.org_path("/agents");
    let body = json!({"name": "once", "scopes": {"slack": ["chat:write"]}, "key": {"requires_signature": true}});
    let first = post_idem(&s, &path, &s.root_key, "create-once-1", body.clone()).await;
    first.assert_status(201);
    assert_fresh(&first);
    assert!(first.body["signing_secret"]
        .as_str()
        .is_some_and(|x| x.starts_with("kwss_")));

    s.advance(chrono::Duration::hours(1));
    let second = post_idem(&s, &path, &s.root_key, "create-once-1", body).await;
    assert_replay_of(&second, &first);
    assert_eq!(second.body["agent"]["id"], first.body["agent"]["id"]);
    assert_eq!(second.body["key"]["id"], first.body["key"]["id"]);
    assert_eq!(agent_count(&s).await, 1);

    // The first plaintext is the one that works.
    let me = s
        .get("/v1/me", first.body["api_key"].as_str().unwrap())
        .await;
    // The key requires signing, so an unsigned call is refused as unsigned, not as unknown.
    me.assert_error(401, "SIGNATURE_INVALID");
}

#[tokio::test]
async fn the_same_body_with_a_different_key_order_still_replays() {
    let s = TestServer::start().await;
    let path = s.org_path("/agents");
    let a = r#"{"name": "ordered", "metadata": {"x": 1, "y": {"p": true, "q": [1, 2]}}, "scopes": {"slack": ["chat:write"], "github": ["repo"]}}"#;
    let b = r#"{"scopes": {"github": ["repo"], "slack": ["chat:write"]}, "metadata": {"y": {"q": [1, 2], "p": true}, "x": 1}, "name": "ordered"}"#;
    let first = post_raw(
        &s,
        &path,
        &s.root_key,
        HeaderValue::from_static("order-1"),
        a,
    )
    .await;
    first.assert_status(201);
    assert_fresh(&first);
    let second = post_raw(
        &s,
        &path,
        &s.root_key,
        HeaderValue::from_static("order-1"),
        b,
    )
    .await;
    assert_replay_of(&second, &first);
    assert_eq!(agent_count(&s).await, 1);
}

#[tokio::test]
async fn a_different_body_with_the_same_key_is_422_body_mismatch() {
    let s = TestServer::start().await;
    let path = s.org_path("/agents");
    let first = post_idem(&s, &path, &s.root_key, "mismatch-1", json!({"name": "one"})).await;
    first.assert_status(201);
    for other in [
        json!({"name": "two"}),
        json!({"name": "one", "display_name": "One"}),
        json!({"name": "one", "metadata": {"a": 1}}),
    ] {
        let r = post_idem(&s, &path, &s.root_key, "mismatch-1", other).await;
        r.assert_error(422, "IDEMPOTENCY_KEY_BODY_MISMATCH");
    }
    // Array order is part of the body.
    let first = post_idem(
        &s,
        &path,
        &s.root_key,
        "mismatch-2",
        json!({"name": "arr", "capabilities": ["a", "b"]}),
    )
    .await;
    first.assert_status(201);
    let r = post_idem(
        &s,
        &path,
        &s.root_key,
        "mismatch-2",
        json!({"name": "arr", "capabilities": ["b", "a"]}),
    )
    .await;
    r.assert_error(422, "IDEMPOTENCY_KEY_BODY_MISMATCH");
    assert_eq!(agent_count(&s).await, 2);
}

#[tokio::test]
async fn a_replay_after_the_agent_was_paused_is_409_agent_inactive() {
    let s = TestServer::start().await;
    let path = s.org_path("/agents");
    let body = json!({"name": "napper"});
    let first = post_idem(&s, &path, &s.root_key, "pause-1", body.clone()).await;
    first.assert_status(201);
    let agent_path = s.org_path(&format!("/agents/{}", id(&first.body["agent"])));
    s.post(&format!("{agent_path}/pause"), &s.root_key, json!({}))
        .await
        .assert_status(200);
    let r = post_idem(&s, &path, &s.root_key, "pause-1", body.clone()).await;
    r.assert_error(409, "IDEMPOTENCY_KEY_AGENT_INACTIVE");

    s.post(&format!("{agent_path}/resume"), &s.root_key, json!({}))
        .await
        .assert_status(200);
    let r = post_idem(&s, &path, &s.root_key, "pause-1", body).await;
    assert_replay_of(&r, &first);
    assert_eq!(agent_count(&s).await, 1);
}

#[tokio::test]
async fn a_replay_after_the_agent_was_deleted_is_409_agent_revoked() {
    let s = TestServer::start().await;
    let path = s.org_path("/agents");
    let body = json!({"name": "ghost"});
    let first = post_idem(&s, &path, &s.root_key, "delete-1", body.clone()).await;
    first.assert_status(201);
    let agent_path = s.org_path(&format!("/agents/{}", id(&first.body["agent"])));
    s.delete(&agent_path, &s.root_key).await.assert_status(200);
    let r = post_idem(&s, &path, &s.root_key, "delete-1", body).await;
    r.assert_error(409, "IDEMPOTENCY_KEY_AGENT_REVOKED");
    assert_eq!(agent_count(&s).await, 1, "no new agent with the freed name");
}

#[tokio::test]
async fn a_mint_key_replay_after_the_agent_was_paused_is_409_agent_inactive() {
    let s = TestServer::start().await;
    let (agent, _, _) = s.create_agent("minted-for", json!({})).await;
    let agent_path = s.org_path(&format!("/agents/{}", id(&agent)));
    let keys = format!("{agent_path}/keys");
    let first = post_idem(
        &s,
        &keys,
        &s.root_key,
        "mint-then-pause",
        json!({"name": "k"}),
    )
    .await;
    first.assert_status(201);
    s.post(&format!("{agent_path}/pause"), &s.root_key, json!({}))
        .await
        .assert_status(200);
    let r = post_idem(
        &s,
        &keys,
        &s.root_key,
        "mint-then-pause",
        json!({"name": "k"}),
    )
    .await;
    r.assert_error(409, "IDEMPOTENCY_KEY_AGENT_INACTIVE");
}

#[tokio::test]
async fn mint_key_and_rotate_replays_after_the_agent_was_deleted_are_409_idempotency_agent_revoked()
{
    let s = TestServer::start().await;
    let (agent, key, _) = s.create_agent("minted-for", json!({})).await;
    let agent_path = s.org_path(&format!("/agents/{}", id(&agent)));
    let keys = format!("{agent_path}/keys");
    let rotate = format!("/v1/keys/{}/rotate", id(&key));
    let first = post_idem(
        &s,
        &keys,
        &s.root_key,
        "mint-then-delete",
        json!({"name": "k"}),
    )
    .await;
    first.assert_status(201);
    let rotated = post_idem(&s, &rotate, &s.root_key, "rotate-then-delete", json!({})).await;
    rotated.assert_status(201);
    s.delete(&agent_path, &s.root_key).await.assert_status(200);
    let r = post_idem(
        &s,
        &keys,
        &s.root_key,
        "mint-then-delete",
        json!({"name": "k"}),
    )
    .await;
    r.assert_error(409, "IDEMPOTENCY_KEY_AGENT_REVOKED");
    let r = post_idem(&s, &rotate, &s.root_key, "rotate-then-delete", json!({})).await;
    r.assert_error(409, "IDEMPOTENCY_KEY_AGENT_REVOKED");
}

#[tokio::test]
async fn an_idempotency_key_is_fresh_again_after_24_hours() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("keyholder", json!({"slack": ["chat:write"]}))
        .await;
    let path = s.org_path(&format!("/agents/{}/keys", id(&agent)));
    let body = json!({"name": "daily"});
    let first = post_idem(&s, &path, &s.root_key, "daily-key", body.clone()).await;
    first.assert_status(201);
    assert_fresh(&first);

    s.advance(chrono::Duration::hours(23));
    let within = post_idem(&s, &path, &s.root_key, "daily-key", body.clone()).await;
    assert_replay_of(&within, &first);

    s.advance(chrono::Duration::hours(2));
    let later = post_idem(&s, &path, &s.root_key, "daily-key", body.clone()).await;
    later.assert_status(201);
    assert_fresh(&later);
    assert_ne!(
        later.body["key"]["id"], first.body["key"]["id"],
        "a new key was minted"
    );

    // And the renewed claim replays in turn.
    let again = post_idem(&s, &path, &s.root_key, "daily-key", body).await;
    assert_replay_of(&again, &later);

    let keys = s.get(&path, &s.root_key).await;
    assert_eq!(
        keys.assert_status(200)["keys"].as_array().unwrap().len(),
        3,
        "first key + two minted"
    );
}

#[tokio::test]
async fn an_invalid_idempotency_key_is_400_and_creates_nothing() {
    let s = TestServer::start().await;
    let path = s.org_path("/agents");
    let body = r#"{"name": "strict"}"#;
    let too_long = HeaderValue::from_str(&"k".repeat(256)).unwrap();
    let non_ascii = HeaderValue::from_bytes("schlüssel".as_bytes()).unwrap();
    let tab = HeaderValue::from_bytes(b"tab\there").unwrap();
    let empty = HeaderValue::from_static("");
    for bad in [too_long, non_ascii, tab, empty] {
        let r = post_raw(&s, &path, &s.root_key, bad.clone(), body).await;
        r.assert_error(400, "VALIDATION_ERROR");
        assert!(
            r.body["error"]["details"]
                .to_string()
                .to_lowercase()
                .contains("idempotency-key")
                || r.body["error"]["message"]
                    .to_string()
                    .to_lowercase()
                    .contains("idempotency"),
            "the error names the header: {}",
            r.body
        );
    }
    assert_eq!(agent_count(&s).await, 0);

    // 255 printable characters, spaces included, are fine.
    let max = format!("a b~{}", "z".repeat(251));
    assert_eq!(max.len(), 255);
    let r = post_raw(
        &s,
        &path,
        &s.root_key,
        HeaderValue::from_str(&max).unwrap(),
        body,
    )
    .await;
    r.assert_status(201);
    let again = post_raw(
        &s,
        &path,
        &s.root_key,
        HeaderValue::from_str(&max).unwrap(),
        body,
    )
    .await;
    assert_replay_of(&again, &r);
}

#[tokio::test]
async fn idempotency_keys_are_scoped_per_org() {
    let s = TestServer::start().await;
    let (other_org, other_root) = s.new_org("other-org").await;
    let body = json!({"name": "twin"});
    let mine = post_idem(
        &s,
        &s.org_path("/agents"),
        &s.root_key,
        "shared-key",
        body.clone(),
    )
    .await;
    mine.assert_status(201);
    let theirs = post_idem(
        &s,
        &format!("/v1/orgs/{other_org}/agents"),
        &other_root,
        "shared-key",
        body.clone(),
    )
    .await;
    theirs.assert_status(201);
    assert_fresh(&theirs);
    assert_eq!(theirs.body["agent"]["org_id"], json!(other_org));
    assert_ne!(theirs.body["agent"]["id"], mine.body["agent"]["id"]);

    // The first org's record is untouched by the second org's use of the key, and any caller of
    // the same org (here a second root key) gets the replay.
    let r = post_idem(
        &s,
        &s.org_path("/agents"),
        &s.root_key,
        "shared-key",
        body.clone(),
    )
    .await;
    assert_replay_of(&r, &mine);
    let second_root = s.post(&s.org_path("/keys"), &s.root_key, json!({})).await;
    let second_root = second_root.assert_status(201)["api_key"]
        .as_str()
        .unwrap()
        .to_string();
    let r = post_idem(&s, &s.org_path("/agents"), &second_root, "shared-key", body).await;
    assert_replay_of(&r, &mine);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_identical_requests_create_exactly_one_agent() {
    let s = TestServer::start().await;
    let path = s.org_path("/agents");
    let body = json!({"name": "stampede", "scopes": {"slack": ["chat:write"]}});
    let futs = (0..8).map(|_| post_idem(&s, &path, &s.root_key, "stampede-1", body.clone()));
    let results: Vec<Resp> = futures_util::future::join_all(futs).await;
    for r in &results {
        assert_eq!(r.status, 201, "every request answers 201: {}", r.body);
    }
    let ids: Vec<&Value> = results.iter().map(|r| &r.body["agent"]["id"]).collect();
    assert!(
        ids.iter().all(|i| *i == ids[0]),
        "one agent id for all: {ids:?}"
    );
    let with_secret = results
        .iter()
        .filter(|r| !r.body["api_key"].is_null())
        .count();
    assert_eq!(
        with_secret, 1,
        "exactly the creating response carries the plaintext"
    );
    let replayed = results
        .iter()
        .filter(|r| r.header("idempotent-replayed") == Some("true"))
        .count();
    assert_eq!(replayed, 7, "the other seven are replays");
    let list = s.get(&path, &s.root_key).await;
    let agents = list.assert_status(200)["agents"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(agents.len(), 1);
    assert_eq!(&agents[0]["id"], ids[0]);
    let keys = s.get(&s.org_path("/keys?kind=agent"), &s.root_key).await;
    assert_eq!(
        keys.assert_status(200)["keys"].as_array().unwrap().len(),
        1,
        "one key too"
    );
}

#[tokio::test]
async fn minting_an_agent_key_replays_with_the_same_key_id() {
    let s = TestServer::start().await;
    let (agent, _, _) = s
        .create_agent("minty", json!({"slack": ["chat:write"]}))
        .await;
    let path = s.org_path(&format!("/agents/{}/keys", id(&agent)));
    let body = json!({"name": "second", "scopes": ["slack:chat:write"]});
    let first = post_idem(&s, &path, &s.root_key, "mint-1", body.clone()).await;
    first.assert_status(201);
    assert_fresh(&first);
    let second = post_idem(&s, &path, &s.root_key, "mint-1", body).await;
    assert_replay_of(&second, &first);
    assert_eq!(second.body["key"]["id"], first.body["key"]["id"]);
    let keys = s.get(&path, &s.root_key).await;
    assert_eq!(keys.assert_status(200)["keys"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn creating_a_root_key_replays_with_the_same_key_id() {
    let s = TestServer::start().await;
    let path = s.org_path("/keys");
    let body = json!({"name": "ops"});
    let first = post_idem(&s, &path, &s.root_key, "root-1", body.clone()).await;
    first.assert_status(201);
    assert_fresh(&first);
    assert_eq!(first.body["key"]["kind"], json!("root"));
    let second = post_idem(&s, &path, &s.root_key, "root-1", body).await;
    assert_replay_of(&second, &first);
    assert_eq!(second.body["key"]["id"], first.body["key"]["id"]);
    let keys = s.get(&s.org_path("/keys?kind=root"), &s.root_key).await;
    assert_eq!(
        keys.assert_status(200)["keys"].as_array().unwrap().len(),
        2,
        "bootstrap + one"
    );
}

#[tokio::test]
async fn deriving_a_key_replays_with_the_same_key_id() {
    let s = TestServer::start().await;
    let (_, parent, api_key) = s
        .create_agent(
            "deriver",
            json!({"keys": ["derive"], "slack": ["chat:write"]}),
        )
        .await;
    let body = json!({"scopes": ["slack:chat:write"], "expires_in": 3600, "name": "task"});
    let first = post_idem(&s, "/v1/keys/derive", &api_key, "derive-1", body.clone()).await;
    first.assert_status(201);
    assert_fresh(&first);
    assert_eq!(first.body["key"]["parent_key_id"], json!(id(&parent)));
    let second = post_idem(&s, "/v1/keys/derive", &api_key, "derive-1", body).await;
    assert_replay_of(&second, &first);
    assert_eq!(second.body["key"]["id"], first.body["key"]["id"]);
    let keys = s.get(&s.org_path("/keys?kind=derived"), &s.root_key).await;
    assert_eq!(keys.assert_status(200)["keys"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn rotating_a_key_replays_with_the_same_successor() {
    let s = TestServer::start().await;
    let (agent, key, _) = s
        .create_agent("rotor", json!({"slack": ["chat:write"]}))
        .await;
    let path = format!("/v1/keys/{}/rotate", id(&key));
    let body = json!({"overlap_days": 3});
    let first = post_idem(&s, &path, &s.root_key, "rotate-1", body.clone()).await;
    first.assert_status(201);
    assert_fresh(&first);
    let second = post_idem(&s, &path, &s.root_key, "rotate-1", body).await;
    assert_replay_of(&second, &first);
    assert_eq!(second.body["key"]["id"], first.body["key"]["id"]);
    let old = s.get(&format!("/v1/keys/{}", id(&key)), &s.root_key).await;
    assert_eq!(
        old.assert_status(200)["successor_key_id"],
        first.body["key"]["id"]
    );
    let keys = s
        .get(
            &s.org_path(&format!("/agents/{}/keys", id(&agent))),
            &s.root_key,
        )
        .await;
    assert_eq!(
        keys.assert_status(200)["keys"].as_array().unwrap().len(),
        2,
        "old + one successor"
    );
}

#[tokio::test]
async fn without_an_idempotency_key_identical_requests_create_twice() {
    let s = TestServer::start().await;
    let path = s.org_path("/keys");
    let a = s.post(&path, &s.root_key, json!({"name": "dup"})).await;
    let b = s.post(&path, &s.root_key, json!({"name": "dup"})).await;
    a.assert_status(201);
    b.assert_status(201);
    assert_fresh(&b);
    assert_ne!(a.body["key"]["id"], b.body["key"]["id"]);
}

/// Records past their 24 hours are deleted by the server's sweep (`AppState::sweep_idempotency`,
/// run hourly by `serve`); live ones stay and still replay.
#[tokio::test]
async fn the_sweep_deletes_records_past_their_24_hours_and_keeps_live_ones() {
    use keyward_core::clock::Clock;
    use keyward_core::model::IdempotencyRecord;
    use keyward_store::Store;

    let common::Bare {
        state,
        store,
        clock,
        org,
        dir: _dir,
        ..
    } = common::Bare::start().await;
    // 2,500 records (more than one batch) from now, and one an hour later.
    let record = |key: String| IdempotencyRecord {
        org_id: org.id,
        key,
        request_hash: [7u8; 32],
        status: 201,
        response: json!({}),
        agent_id: None,
        created_at: clock.now(),
    };
    let root = || {
        keyward_core::model::Key::mint(
            org.id,
            None,
            keyward_core::token::TokenKind::Root,
            keyward_core::token::Environment::Live,
            Vec::new(),
            clock.now(),
        )
        .unwrap()
        .0
    };
    let event = |n: usize| keyward_store::conformance::event(org.id, &format!("key.create.{n}"));
    for n in 0..2_500 {
        store
            .insert_key(&root(), &event(n), Some(&record(format!("old-{n}"))))
            .await
            .unwrap();
    }
    clock.advance(chrono::Duration::hours(1));
    store
        .insert_key(&root(), &event(0), Some(&record("young".into())))
        .await
        .unwrap();

    // 24 hours after the first ones: they are honoured through their 24th hour (the server's
    // rule and the stores' alike), so nothing goes.
    clock.advance(chrono::Duration::hours(23));
    assert_eq!(state.sweep_idempotency().await.unwrap(), 0);
    clock.advance(chrono::Duration::minutes(1));
    assert_eq!(state.sweep_idempotency().await.unwrap(), 2_500);
    assert!(store
        .get_idempotency(org.id, "old-0")
        .await
        .unwrap()
        .is_none());
    assert!(store
        .get_idempotency(org.id, "old-2499")
        .await
        .unwrap()
        .is_none());
    assert!(store
        .get_idempotency(org.id, "young")
        .await
        .unwrap()
        .is_some());
    assert_eq!(state.sweep_idempotency().await.unwrap(), 0);
}
