//! API.md §7 through real HTTP: every state change writes its audit event (actor, target,
//! request id, client IP, trace context), and `GET /v1/orgs/{org}/audit` lists them newest first
//! with its filters, pagination, scope and org checks.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{t0, Resp, TestServer};
use reqwest::Method;
use serde_json::{json, Value};

fn id(v: &Value) -> String {
    v["id"].as_str().expect("an id").to_string()
}

fn ts(secs: i64) -> String {
    (t0() + chrono::Duration::seconds(secs))
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string()
}

/// The audit events matching `query` (root key), newest first.
async fn events(s: &TestServer, query: &str) -> Vec<Value> {
    let r = s
        .get(&s.org_path(&format!("/audit?{query}")), &s.root_key)
        .await;
    r.assert_status(200)["events"].as_array().unwrap().clone()
}

fn actions(evs: &[Value]) -> Vec<String> {
    evs.iter()
        .map(|e| e["action"].as_str().unwrap().to_string())
        .collect()
}

/// The one event with this action written by the request with this id.
async fn event_of(s: &TestServer, action: &str, resp: &Resp) -> Value {
    let rid = resp
        .header("x-request-id")
        .expect("X-Request-Id")
        .to_string();
    let found: Vec<Value> = events(s, &format!("action={action}&limit=1000"))
        .await
        .into_iter()
        .filter(|e| e["request_id"] == json!(rid))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "exactly one {action} event for request {rid}: {found:?}"
    );
    found.into_iter().next().unwrap()
}

async fn root_key_id(s: &TestServer) -> String {
    let r = s.get(&s.org_path("/keys?kind=root"), &s.root_key).await;
    id(&r.assert_status(200)["keys"][0])
}

#[track_caller]
fn assert_event(e: &Value, org: &str, actor_key: &str, actor_agent: Option<&str>, target: &str) {
    assert_eq!(e["org_id"], json!(org), "{e}");
    assert_eq!(e["outcome"], json!("success"), "{e}");
    assert_eq!(e["error_code"], Value::Null, "{e}");
    assert_eq!(e["actor_key_id"], json!(actor_key), "{e}");
    assert_eq!(e["actor_agent_id"], json!(actor_agent), "{e}");
    assert_eq!(e["target_id"], json!(target), "{e}");
    assert_eq!(e["client_ip"], json!("127.0.0.1"), "{e}");
}

// ---------------------------------------------------------------------------------------------
// What is recorded
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn creating_an_agent_records_agent_create_and_key_create_with_the_request_id() {
    let s = TestServer::start().await;
    let root = root_key_id(&s).await;
    let r = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({"name": "audited"}),
        )
        .await;
    r.assert_status(201);
    let (agent, key) = (id(&r.body["agent"]), id(&r.body["key"]));

    let e = event_of(&s, "agent.create", &r).await;
    assert_event(&e, &s.org_id, &root, None, &agent);
    assert_eq!(e["occurred_at"], json!(ts(0)));
    let k = event_of(&s, "key.create", &r).await;
    assert_event(&k, &s.org_id, &root, None, &key);
    assert_eq!(k["request_id"], e["request_id"]);
    assert!(
        !k.to_string().contains(r.body["api_key"].as_str().unwrap()),
        "no plaintext in audit"
    );
}

#[tokio::test]
async fn a_caller_supplied_request_id_is_the_events_request_id() {
    let s = TestServer::start().await;
    let r = s
        .send(
            Method::POST,
            &s.org_path("/agents"),
            Some(&s.root_key),
            &[("X-Request-Id", "caller-chosen-1")],
            Some(json!({"name": "traced"})),
        )
        .await;
    r.assert_status(201);
    assert_eq!(r.header("x-request-id"), Some("caller-chosen-1"));
    let e = event_of(&s, "agent.create", &r).await;
    assert_eq!(e["request_id"], json!("caller-chosen-1"));
}

#[tokio::test]
async fn trace_headers_are_recorded_on_the_event() {
    let s = TestServer::start().await;
    let (agent, _, _) = s.create_agent("traced", json!({})).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = s
        .send(
            Method::PATCH,
            &s.org_path(&format!("/agents/{}", id(&agent))),
            Some(&s.root_key),
            &[
                ("Keyward-Run-Id", "run-42"),
                ("Keyward-Thread-Id", "thread-7"),
                ("Keyward-Parent-Agent", "planner"),
                ("traceparent", traceparent),
                ("Keyward-Meta-foo", "bar baz"),
                ("Keyward-Meta-ticket", "OPS-1"),
            ],
            Some(json!({"display_name": "Traced"})),
        )
        .await;
    r.assert_status(200);
    let e = event_of(&s, "agent.update", &r).await;
    assert_eq!(e["run_id"], json!("run-42"));
    assert_eq!(e["thread_id"], json!("thread-7"));
    assert_eq!(e["parent_agent"], json!("planner"));
    assert_eq!(e["traceparent"], json!(traceparent));
    assert_eq!(
        e["trace_meta"],
        json!({"foo": "bar baz", "ticket": "OPS-1"})
    );

    // Without trace headers the fields are empty.
    let creates = events(&s, "action=agent.create").await;
    assert_eq!(creates.len(), 1);
    let plain = &creates[0];
    assert_eq!(plain["run_id"], Value::Null);
    assert_eq!(plain["thread_id"], Value::Null);
    assert_eq!(plain["parent_agent"], Value::Null);
    assert_eq!(plain["traceparent"], Value::Null);
    assert_eq!(plain["trace_meta"], json!({}));
}

#[tokio::test]
async fn an_agent_key_acting_is_recorded_as_actor_agent_and_actor_key() {
    let s = TestServer::start().await;
    let (actor, actor_key, api_key) = s
        .create_agent("operator", json!({"agents": ["write"], "keys": ["write"]}))
        .await;
    let (target, _, _) = s.create_agent("worker", json!({})).await;
    let r = s
        .post(
            &s.org_path(&format!("/agents/{}/pause", id(&target))),
            &api_key,
            json!({}),
        )
        .await;
    r.assert_status(200);
    let e = event_of(&s, "agent.pause", &r).await;
    assert_event(
        &e,
        &s.org_id,
        &id(&actor_key),
        Some(&id(&actor)),
        &id(&target),
    );

    let r = s
        .post(
            &s.org_path(&format!("/agents/{}/keys", id(&actor))),
            &api_key,
            json!({}),
        )
        .await;
    r.assert_status(201);
    let e = event_of(&s, "key.create", &r).await;
    assert_event(
        &e,
        &s.org_id,
        &id(&actor_key),
        Some(&id(&actor)),
        &id(&r.body["key"]),
    );
}

#[tokio::test]
async fn agent_state_changes_write_update_pause_resume_and_delete_events() {
    let s = TestServer::start().await;
    let root = root_key_id(&s).await;
    let (agent, _, _) = s
        .create_agent("lifecycle", json!({"slack": ["chat:write"]}))
        .await;
    let a = id(&agent);
    let path = s.org_path(&format!("/agents/{a}"));
    let steps = [
        (
            "agent.update",
            s.patch(&path, &s.root_key, json!({"scopes": {"slack": ["*"]}}))
                .await,
        ),
        (
            "agent.pause",
            s.post(&format!("{path}/pause"), &s.root_key, json!({}))
                .await,
        ),
        (
            "agent.resume",
            s.post(&format!("{path}/resume"), &s.root_key, json!({}))
                .await,
        ),
        ("agent.delete", s.delete(&path, &s.root_key).await),
    ];
    for (action, r) in &steps {
        r.assert_status(200);
        let e = event_of(&s, action, r).await;
        assert_event(&e, &s.org_id, &root, None, &a);
    }
}

#[tokio::test]
async fn key_state_changes_write_deprecate_rotate_derive_revoke_and_create_events() {
    let s = TestServer::start().await;
    let root = root_key_id(&s).await;
    let (agent, key, _) = s
        .create_agent("keyed", json!({"slack": ["chat:write"]}))
        .await;
    let (a, k) = (id(&agent), id(&key));

    let r = s
        .post(
            &s.org_path(&format!("/agents/{a}/keys/{k}/deprecate")),
            &s.root_key,
            json!({}),
        )
        .await;
    r.assert_status(200);
    assert_event(
        &event_of(&s, "key.deprecate", &r).await,
        &s.org_id,
        &root,
        None,
        &k,
    );

    let r = s
        .post(
            &format!("/v1/keys/{k}/rotate"),
            &s.root_key,
            json!({"overlap_days": 1}),
        )
        .await;
    r.assert_status(201);
    let successor = id(&r.body["key"]);
    let e = event_of(&s, "key.rotate", &r).await;
    assert_event(&e, &s.org_id, &root, None, &k);
    assert_eq!(e["details"]["successor_key_id"], json!(successor));

    let r = s
        .post(
            "/v1/keys/derive",
            &s.root_key,
            json!({"scopes": ["reports:read"], "expires_in": 60}),
        )
        .await;
    r.assert_status(201);
    assert_event(
        &event_of(&s, "key.derive", &r).await,
        &s.org_id,
        &root,
        None,
        &id(&r.body["key"]),
    );

    let r = s
        .post(&s.org_path("/keys"), &s.root_key, json!({"name": "ops"}))
        .await;
    r.assert_status(201);
    assert_event(
        &event_of(&s, "key.create", &r).await,
        &s.org_id,
        &root,
        None,
        &id(&r.body["key"]),
    );

    let r = s
        .post(&format!("/v1/keys/{k}/revoke"), &s.root_key, json!({}))
        .await;
    r.assert_status(200);
    assert_event(
        &event_of(&s, "key.revoke", &r).await,
        &s.org_id,
        &root,
        None,
        &k,
    );
}

#[tokio::test]
async fn patching_the_org_writes_org_update() {
    let s = TestServer::start().await;
    let root = root_key_id(&s).await;
    let r = s
        .patch(&s.org_path(""), &s.root_key, json!({"name": "renamed"}))
        .await;
    r.assert_status(200);
    assert_event(
        &event_of(&s, "org.update", &r).await,
        &s.org_id,
        &root,
        None,
        &s.org_id,
    );
}

#[tokio::test]
async fn failed_requests_write_no_success_event() {
    let s = TestServer::start().await;
    let (agent, _, reader) = s.create_agent("taken", json!({"agents": ["read"]})).await;
    let dup = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({"name": "taken"}),
        )
        .await;
    dup.assert_error(409, "AGENT_NAME_EXISTS");
    let bad = s
        .post(
            &s.org_path("/agents"),
            &s.root_key,
            json!({"name": "Bad Name"}),
        )
        .await;
    bad.assert_error(400, "VALIDATION_ERROR");
    let denied = s
        .patch(
            &s.org_path(&format!("/agents/{}", id(&agent))),
            &reader,
            json!({"display_name": "x"}),
        )
        .await;
    denied.assert_error(403, "INSUFFICIENT_SCOPE");
    let narrowing = s
        .patch(
            &s.org_path(&format!("/agents/{}", id(&agent))),
            &s.root_key,
            json!({"scopes": {}}),
        )
        .await;
    narrowing.assert_error(400, "SCOPE_NARROWING_NOT_SUPPORTED");

    let all = events(&s, "outcome=success").await;
    let mut acts = actions(&all);
    acts.sort();
    assert_eq!(
        acts,
        ["agent.create", "key.create", "org.create"],
        "only the bootstrap's and the first create's events: {all:?}"
    );
    for r in [&dup, &bad, &denied, &narrowing] {
        let rid = r.header("x-request-id").unwrap();
        assert!(
            all.iter().all(|e| e["request_id"] != json!(rid)),
            "no success event for the failed request {rid}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Listing and filters
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn audit_is_listed_newest_first() {
    let s = TestServer::start().await;
    let (agent, _, _) = s.create_agent("ordered", json!({})).await;
    let path = s.org_path(&format!("/agents/{}", id(&agent)));
    s.advance(chrono::Duration::seconds(1));
    s.post(&format!("{path}/pause"), &s.root_key, json!({}))
        .await
        .assert_status(200);
    s.advance(chrono::Duration::seconds(1));
    s.post(&format!("{path}/resume"), &s.root_key, json!({}))
        .await
        .assert_status(200);
    s.advance(chrono::Duration::seconds(1));
    s.patch(&s.org_path(""), &s.root_key, json!({"name": "later"}))
        .await
        .assert_status(200);

    let evs = events(&s, "").await;
    let acts = actions(&evs);
    // The bootstrap's org.create and the agent's two creation events all happened at t0.
    assert_eq!(acts.len(), 6, "{acts:?}");
    assert_eq!(acts[..3], ["org.update", "agent.resume", "agent.pause"]);
    let mut at_t0 = acts[3..].to_vec();
    at_t0.sort();
    assert_eq!(at_t0, ["agent.create", "key.create", "org.create"]);
    let times: Vec<&str> = evs
        .iter()
        .map(|e| e["occurred_at"].as_str().unwrap())
        .collect();
    assert_eq!(times, [ts(3), ts(2), ts(1), ts(0), ts(0), ts(0)]);
}

#[tokio::test]
async fn audit_filters_by_action_agent_and_key() {
    let s = TestServer::start().await;
    let (a, a_key, a_api) = s.create_agent("alpha", json!({"agents": ["write"]})).await;
    let (b, b_key, _) = s.create_agent("bravo", json!({})).await;
    // alpha's key pauses bravo; root pauses alpha.
    s.post(
        &s.org_path(&format!("/agents/{}/pause", id(&b))),
        &a_api,
        json!({}),
    )
    .await
    .assert_status(200);
    s.post(
        &s.org_path(&format!("/agents/{}/pause", id(&a))),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);

    let pauses = events(&s, "action=agent.pause").await;
    assert_eq!(pauses.len(), 2);
    assert!(pauses.iter().all(|e| e["action"] == json!("agent.pause")));
    assert!(events(&s, "action=agent.nothing").await.is_empty());

    let (a_id, b_id) = (id(&a), id(&b));
    let of_a = events(&s, &format!("agent_id={a_id}")).await;
    assert!(!of_a.is_empty());
    for e in &of_a {
        assert!(
            e["actor_agent_id"] == json!(a_id)
                || e["target_id"] == json!(a_id)
                || e["details"]["agent_id"] == json!(a_id),
            "every event concerns alpha: {e}"
        );
    }
    let acts = actions(&of_a);
    assert!(acts.contains(&"agent.create".to_string()), "{acts:?}");
    assert_eq!(
        acts.iter().filter(|x| *x == "agent.pause").count(),
        2,
        "alpha paused and was paused: {acts:?}"
    );
    assert!(
        of_a.iter()
            .all(|e| !(e["action"] == json!("agent.create") && e["target_id"] == json!(b_id))),
        "bravo's creation is not alpha's"
    );

    let by_key = events(&s, &format!("key_id={}", id(&a_key))).await;
    let acts = actions(&by_key);
    assert!(
        acts.contains(&"agent.pause".to_string()),
        "the pause alpha's key did: {acts:?}"
    );
    assert!(
        acts.contains(&"key.create".to_string()),
        "the key's creation: {acts:?}"
    );
    assert!(by_key
        .iter()
        .all(|e| e["actor_key_id"] == json!(id(&a_key)) || e["target_id"] == json!(id(&a_key))));
    let of_b_key = events(&s, &format!("key_id={}", id(&b_key))).await;
    assert_eq!(actions(&of_b_key), ["key.create"]);

    let r = s
        .get(&s.org_path("/audit?agent_id=nope"), &s.root_key)
        .await;
    r.assert_error(400, "VALIDATION_ERROR");
}

#[tokio::test]
async fn audit_filters_by_run_thread_and_outcome() {
    let s = TestServer::start().await;
    let (agent, _, _) = s.create_agent("runner", json!({})).await;
    let path = s.org_path(&format!("/agents/{}", id(&agent)));
    for (action, run, thread) in [
        ("pause", "run-1", "thread-a"),
        ("resume", "run-1", "thread-b"),
        ("pause", "run-2", "thread-a"),
    ] {
        s.advance(chrono::Duration::seconds(1));
        s.send(
            Method::POST,
            &format!("{path}/{action}"),
            Some(&s.root_key),
            &[("Keyward-Run-Id", run), ("Keyward-Thread-Id", thread)],
            Some(json!({})),
        )
        .await
        .assert_status(200);
    }

    let run1 = events(&s, "run_id=run-1").await;
    assert_eq!(actions(&run1), ["agent.resume", "agent.pause"]);
    assert!(run1.iter().all(|e| e["run_id"] == json!("run-1")));
    let thread_a = events(&s, "thread_id=thread-a").await;
    assert_eq!(actions(&thread_a), ["agent.pause", "agent.pause"]);
    let both = events(&s, "run_id=run-2&thread_id=thread-a").await;
    assert_eq!(both.len(), 1);
    assert_eq!(both[0]["run_id"], json!("run-2"));
    assert!(events(&s, "run_id=run-9").await.is_empty());

    let ok = events(&s, "outcome=success").await;
    assert_eq!(
        ok.len(),
        6,
        "org.create, agent and key create, three status changes"
    );
    assert!(events(&s, "outcome=failure").await.is_empty());
    let r = s.get(&s.org_path("/audit?outcome=meh"), &s.root_key).await;
    r.assert_error(400, "VALIDATION_ERROR");
}

#[tokio::test]
async fn audit_filters_by_since_inclusive_and_until_exclusive() {
    let s = TestServer::start().await;
    let (agent, _, _) = s.create_agent("timed", json!({})).await; // t0
    let path = s.org_path(&format!("/agents/{}", id(&agent)));
    s.advance(chrono::Duration::minutes(10));
    s.post(&format!("{path}/pause"), &s.root_key, json!({}))
        .await
        .assert_status(200); // +600 s
    s.advance(chrono::Duration::minutes(10));
    s.post(&format!("{path}/resume"), &s.root_key, json!({}))
        .await
        .assert_status(200); // +1200 s

    let since = events(&s, &format!("since={}", ts(600))).await;
    assert_eq!(actions(&since), ["agent.resume", "agent.pause"]);
    let until = events(&s, &format!("until={}", ts(600))).await;
    let mut acts = actions(&until);
    acts.sort();
    assert_eq!(acts, ["agent.create", "key.create", "org.create"]);
    let window = events(&s, &format!("since={}&until={}", ts(1), ts(1200))).await;
    assert_eq!(actions(&window), ["agent.pause"]);
    // An offset other than Z is understood too (10:10 UTC is 12:10 at +02:00).
    let offset = events(&s, "since=2026-11-23T12:10:00%2B02:00").await;
    assert_eq!(actions(&offset), ["agent.resume", "agent.pause"]);

    for bad in [
        "since=yesterday",
        "until=2026-13-01T00:00:00Z",
        "since=1795000000",
        "until=2026-11-23",
    ] {
        let r = s
            .get(&s.org_path(&format!("/audit?{bad}")), &s.root_key)
            .await;
        r.assert_error(400, "VALIDATION_ERROR");
    }
}

#[tokio::test]
async fn audit_is_paginated_with_has_more() {
    let s = TestServer::start().await;
    let (agent, _, _) = s.create_agent("paged", json!({})).await;
    let path = s.org_path(&format!("/agents/{}", id(&agent)));
    for i in 0..3 {
        s.advance(chrono::Duration::seconds(1));
        let action = if i % 2 == 0 { "pause" } else { "resume" };
        s.post(&format!("{path}/{action}"), &s.root_key, json!({}))
            .await
            .assert_status(200);
    }
    // 6 events: pause(3s), resume(2s), pause(1s), then agent, key and org creation at 0s.
    let all = events(&s, "").await;
    assert_eq!(all.len(), 6);
    let page = |offset: usize| {
        let s = &s;
        async move {
            let r = s
                .get(
                    &s.org_path(&format!("/audit?limit=2&offset={offset}")),
                    &s.root_key,
                )
                .await;
            r.assert_status(200).clone()
        }
    };
    let p0 = page(0).await;
    assert_eq!(p0["has_more"], json!(true));
    assert_eq!(p0["limit"], json!(2));
    assert_eq!(p0["offset"], json!(0));
    assert_eq!(p0["events"].as_array().unwrap(), &all[0..2]);
    let p1 = page(2).await;
    assert_eq!(p1["has_more"], json!(true));
    assert_eq!(p1["events"].as_array().unwrap(), &all[2..4]);
    let p2 = page(4).await;
    assert_eq!(
        p2["has_more"],
        json!(false),
        "exactly filling the last page is not more"
    );
    assert_eq!(p2["events"].as_array().unwrap(), &all[4..6]);
    let p3 = page(6).await;
    assert_eq!(p3["has_more"], json!(false));
    assert_eq!(p3["events"], json!([]));
}

// ---------------------------------------------------------------------------------------------
// Access and trace header validation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reading_audit_requires_audit_read() {
    let s = TestServer::start().await;
    let (_, _, no) = s
        .create_agent("no-audit", json!({"agents": ["read", "write"]}))
        .await;
    let (_, _, yes) = s.create_agent("auditor", json!({"audit": ["read"]})).await;
    let r = s.get(&s.org_path("/audit"), &no).await;
    r.assert_error(403, "INSUFFICIENT_SCOPE");
    assert_eq!(
        r.body["error"]["details"]["required"],
        json!(["audit:read"])
    );
    let r = s.get(&s.org_path("/audit"), &yes).await;
    let evs = r.assert_status(200)["events"].as_array().unwrap().clone();
    assert_eq!(
        evs.len(),
        5,
        "org.create and two agent creations, two events each"
    );
}

#[tokio::test]
async fn another_orgs_key_reading_audit_is_403_not_a_member() {
    let s = TestServer::start().await;
    s.create_agent("private", json!({})).await;
    let (other_org, other_root) = s.new_org("other-org").await;
    let r = s.get(&s.org_path("/audit"), &other_root).await;
    r.assert_error(403, "NOT_A_MEMBER");
    assert!(r.body.get("events").is_none());
    // The other org's own log does not contain this org's events.
    let r = s
        .get(&format!("/v1/orgs/{other_org}/audit"), &other_root)
        .await;
    let evs = r.assert_status(200)["events"].as_array().unwrap().clone();
    assert!(evs.iter().all(|e| e["org_id"] == json!(other_org)));
    assert!(evs.iter().all(|e| e["action"] != json!("agent.create")));
}

#[tokio::test]
async fn a_trace_header_that_is_too_long_is_400_and_changes_nothing() {
    let s = TestServer::start().await;
    let long = "r".repeat(300);
    for header in [
        "Keyward-Run-Id",
        "Keyward-Thread-Id",
        "Keyward-Parent-Agent",
        "traceparent",
        "Keyward-Meta-foo",
    ] {
        let r = s
            .send(
                Method::POST,
                &s.org_path("/agents"),
                Some(&s.root_key),
                &[(header, &long)],
                Some(json!({"name": "too-long"})),
            )
            .await;
        r.assert_error(400, "VALIDATION_ERROR");
    }
    let list = s.get(&s.org_path("/agents"), &s.root_key).await;
    assert_eq!(list.assert_status(200)["agents"], json!([]));
    assert_eq!(
        actions(&events(&s, "").await),
        ["org.create"],
        "no event written"
    );
}

#[tokio::test]
async fn an_authentication_failure_of_a_known_key_is_recorded_as_auth_denied() {
    let s = TestServer::start().await;
    let (agent, key, api_key) = s.create_agent("sleeper", json!({"agents": ["read"]})).await;
    s.post(
        &s.org_path(&format!("/agents/{}/pause", id(&agent))),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    let r = s.get(&s.org_path("/agents"), &api_key).await;
    r.assert_error(403, "AGENT_PAUSED");
    let rid = r.header("x-request-id").unwrap().to_string();
    // Denial events may be written asynchronously but are visible within 2 seconds (§6.3).
    let mut found = None;
    for _ in 0..20 {
        let denied = events(&s, "outcome=denied").await;
        if let Some(e) = denied.into_iter().find(|e| e["request_id"] == json!(rid)) {
            found = Some(e);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let e = found.expect("an auth.denied event within 2 s");
    assert_eq!(e["action"], json!("auth.denied"));
    assert_eq!(e["error_code"], json!("AGENT_PAUSED"));
    assert_eq!(e["actor_key_id"], json!(id(&key)));
    assert_eq!(e["actor_agent_id"], json!(id(&agent)));
    assert_eq!(e["client_ip"], json!("127.0.0.1"));
}
