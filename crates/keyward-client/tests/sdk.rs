//! The Rust SDK against the real in-process server: every public method is exercised at least
//! once, including the typed error variants.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// The server crate's own HTTP test harness, shared so that both crates start servers the same way.
#[path = "../../keyward-server/tests/common/mod.rs"]
mod common;

use common::TestServer;
use keyward_client::{
    proto, AgentClient, App, AuditQuery, Constraints, Error, ListAgents, ListKeys, TraceContext,
};
use keyward_proto::ErrorCode;
use std::collections::BTreeMap;
use uuid::Uuid;

fn scopes(pairs: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
    pairs
        .iter()
        .map(|(p, s)| (p.to_string(), s.iter().map(|x| x.to_string()).collect()))
        .collect()
}

#[tokio::test]
async fn the_sdk_drives_an_agent_through_its_whole_life() {
    let s = TestServer::start().await;
    let app = App::new(&s.base, &s.root_key, s.org_id.parse().unwrap()).unwrap();
    assert_eq!(app.org().await.unwrap().name, "test-org");

    let created = app
        .agents()
        .create(&proto::CreateAgentRequest {
            name: "sdk-bot".into(),
            scopes: Some(scopes(&[("slack", &["chat:write"]), ("keys", &["derive"])])),
            ..Default::default()
        })
        .await
        .unwrap();
    let agent_id = created.agent.id;
    let api_key = created.api_key.clone().unwrap();

    // Names are unique: the second create is a typed error.
    let dup = app
        .agents()
        .create(&proto::CreateAgentRequest {
            name: "sdk-bot".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Some(ErrorCode::AgentNameExists));

    assert_eq!(app.agents().get(agent_id).await.unwrap().name, "sdk-bot");
    assert_eq!(
        app.agents()
            .get_by_name("sdk-bot")
            .await
            .unwrap()
            .unwrap()
            .id,
        agent_id
    );
    assert!(app.agents().get_by_name("nobody").await.unwrap().is_none());
    let page = app
        .agents()
        .list(&ListAgents {
            limit: Some(10),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.agents.len(), 1);
    assert_eq!(app.agents().list_all(false).await.unwrap().len(), 1);

    // Broadening works and bumps the version; narrowing is refused with its code.
    let wider = app
        .agents()
        .update(
            agent_id,
            &proto::UpdateAgentRequest {
                scopes: Some(scopes(&[
                    ("slack", &["chat:write", "files:read"]),
                    ("keys", &["derive"]),
                ])),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(wider.version, 2);
    let narrow = app
        .agents()
        .update(
            agent_id,
            &proto::UpdateAgentRequest {
                scopes: Some(scopes(&[])),
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    assert_eq!(narrow.code(), Some(ErrorCode::ScopeNarrowingNotSupported));

    // The agent's own client: me() works while paused; derive does not.
    let agent = AgentClient::new(&s.base, &api_key).unwrap();
    assert_eq!(app.agents().pause(agent_id).await.unwrap().status, "paused");
    assert_eq!(agent.me().await.unwrap().body.agent.status, "paused");
    let paused = agent
        .keys()
        .derive(&proto::DeriveKeyRequest {
            scopes: vec!["slack:chat:write".into()],
            expires_in: 60,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(paused.code(), Some(ErrorCode::AgentPaused));
    app.agents().resume(agent_id).await.unwrap();
    let derived = agent
        .keys()
        .derive(&proto::DeriveKeyRequest {
            scopes: vec!["slack:chat:write".into()],
            expires_in: 60,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(derived.key.kind, "derived");

    // Verify through the SDK.
    let v = app
        .keys()
        .verify(&proto::VerifyRequest {
            key: api_key.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(v.valid);

    // Mint, deprecate, undeprecate, rotate, update, revoke.
    let second = app
        .agents()
        .mint_key(agent_id, &proto::CreateKeyRequest::default())
        .await
        .unwrap();
    let kid = second.key.id;
    assert!(app
        .agents()
        .deprecate_key(agent_id, kid)
        .await
        .unwrap()
        .deprecated_at
        .is_some());
    assert!(app
        .agents()
        .undeprecate_key(agent_id, kid)
        .await
        .unwrap()
        .deprecated_at
        .is_none());
    let rotated = app.keys().rotate(kid, Some(1)).await.unwrap();
    assert_eq!(
        app.keys().get(kid).await.unwrap().successor_key_id,
        Some(rotated.key.id)
    );
    let renamed = app
        .keys()
        .update(
            rotated.key.id,
            &proto::UpdateKeyRequest {
                name: Some(Some("renamed".into())),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(renamed.name.as_deref(), Some("renamed"));
    app.keys().revoke(kid, false).await.unwrap();
    let keys = app.agents().list_keys(agent_id).await.unwrap();
    assert_eq!(keys.keys.len(), 4);
    // Revoke everything but the original key; then the original is the last one (its derived
    // key goes with it in the cascade), so the guard refuses it.
    for k in &keys.keys {
        if k.revoked_at.is_none() && k.kind != "derived" && k.id != created.key.id {
            app.agents()
                .revoke_key(agent_id, k.id, false)
                .await
                .unwrap();
        }
    }
    let last = app
        .agents()
        .revoke_key(agent_id, created.key.id, false)
        .await
        .unwrap_err();
    assert_eq!(last.code(), Some(ErrorCode::LastActiveKey));

    // The audit log records it all, filterable by agent.
    let events = app
        .audit()
        .list(&AuditQuery {
            agent_id: Some(agent_id),
            action: Some("agent.pause".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(events.events.len(), 1);

    // Delete: the tombstone answers, the agent's key stops working, its own me() still answers.
    assert_eq!(
        app.agents().delete(agent_id).await.unwrap().status,
        "revoked"
    );
    let gone = app.keys().get(Uuid::now_v7()).await.unwrap_err();
    assert_eq!(gone.code(), Some(ErrorCode::KeyNotFound));
    assert_eq!(agent.me().await.unwrap().body.agent.status, "revoked");
}

#[tokio::test]
async fn configuration_errors_and_transport_errors_are_distinct() {
    assert!(matches!(
        App::new("ftp://x", "k", Uuid::nil()),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        AgentClient::new("http://127.0.0.1:1", " "),
        Err(Error::Config(_))
    ));
    let c = AgentClient::new("http://127.0.0.1:1", "kw_ak_x").unwrap();
    assert!(matches!(c.me().await, Err(Error::Transport(_))));
}

async fn agent_with(s: &TestServer, body: serde_json::Value) -> (serde_json::Value, String) {
    let b = s.create_agent_with(body).await;
    let key = b["api_key"].as_str().unwrap().to_string();
    (b, key)
}

#[tokio::test]
async fn a_rate_limited_idempotent_call_is_retried_after_retry_after() {
    let s = TestServer::start().await;
    let (_, key) = agent_with(
        &s,
        serde_json::json!({"name": "limited", "scopes": {}, "key": {"rate_limit": {"limit": 1, "period_s": 1, "burst": 1}}}),
    )
    .await;
    let agent = AgentClient::new(&s.base, &key).unwrap();
    agent.me().await.unwrap();
    // The second call is refused with retry_after 1; the SDK waits and retries. The server's
    // clock is manual: move it on while the SDK waits.
    let clock = s.clock.clone();
    let mover = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        clock.advance(chrono::Duration::seconds(1));
    });
    let started = std::time::Instant::now();
    let me = agent.me().await.unwrap();
    mover.await.unwrap();
    assert_eq!(me.body.agent.name, "limited");
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(900),
        "it waited retry_after"
    );
    // With retries off, the same situation is an error carrying the code and retry_after.
    let no_retry =
        AgentClient::new(&s.base, &key)
            .unwrap()
            .with_retry(keyward_client::RetryPolicy {
                max_retries: 0,
                ..Default::default()
            });
    let e = no_retry.me().await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::RateLimited));
    assert!(matches!(e, Error::RateLimited { retry_after: 1, .. }));
}

#[tokio::test]
async fn calls_inside_a_trace_carry_it_and_nested_traces_inherit_run_and_thread() {
    let s = TestServer::start().await;
    let (outer_body, outer_key) = agent_with(&s, serde_json::json!({"name": "planner", "scopes": {"keys": ["derive"], "slack": ["chat:write"]}})).await;
    let (_, inner_key) = agent_with(&s, serde_json::json!({"name": "worker", "scopes": {"keys": ["derive"], "slack": ["chat:write"]}})).await;
    let outer_id = outer_body["agent"]["id"].as_str().unwrap().to_string();
    let planner = AgentClient::new(&s.base, &outer_key)
        .unwrap()
        .with_agent_id(outer_id.clone());
    let worker = AgentClient::new(&s.base, &inner_key).unwrap();
    let derive = proto::DeriveKeyRequest {
        scopes: vec!["slack:chat:write".into()],
        expires_in: 60,
        ..Default::default()
    };
    let ctx = TraceContext {
        run_id: Some("run-7".into()),
        thread_id: Some("thread-a".into()),
        metadata: [("step".to_string(), "plan".to_string())].into(),
        ..Default::default()
    };
    planner
        .trace(ctx, async {
            planner.keys().derive(&derive).await.unwrap();
            worker
                .trace(TraceContext::default(), async {
                    worker.keys().derive(&derive).await.unwrap()
                })
                .await
                .unwrap();
        })
        .await
        .unwrap();
    let app = App::new(&s.base, &s.root_key, s.org_id.parse().unwrap()).unwrap();
    let events = app
        .audit()
        .list(&AuditQuery {
            run_id: Some("run-7".into()),
            action: Some("key.derive".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .events;
    assert_eq!(events.len(), 2, "both derivations carry the run");
    for e in &events {
        assert_eq!(e.thread_id.as_deref(), Some("thread-a"));
        assert_eq!(e.trace_meta.get("step").map(String::as_str), Some("plan"));
    }
    let nested = events
        .iter()
        .find(|e| e.parent_agent.is_some())
        .expect("the nested call names its parent");
    assert_eq!(nested.parent_agent.as_deref(), Some(outer_id.as_str()));
    // Outside any trace, nothing is sent.
    planner.keys().derive(&derive).await.unwrap();
    let all = app
        .audit()
        .list(&AuditQuery {
            action: Some("key.derive".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(all.events.iter().filter(|e| e.run_id.is_none()).count(), 1);
}

#[tokio::test]
async fn reserved_or_malformed_trace_metadata_is_refused_before_any_call() {
    let agent = AgentClient::new("http://127.0.0.1:1", "kw_ak_x").unwrap();
    for name in ["run-id", "Thread_Id", "bad name", ""] {
        let ctx = TraceContext {
            metadata: [(name.to_string(), "v".to_string())].into(),
            ..Default::default()
        };
        let r = agent.trace(ctx, async {}).await;
        assert!(
            matches!(r, Err(Error::Config(_))),
            "{name:?} must be refused"
        );
    }
}

#[tokio::test]
async fn a_constrained_client_can_only_do_less_and_cannot_be_constrained_again() {
    let s = TestServer::start().await;
    let (_, key) = agent_with(&s, serde_json::json!({"name": "narrowed", "scopes": {"keys": ["derive"], "slack": ["chat:write"]}})).await;
    let agent = AgentClient::new(&s.base, &key).unwrap();
    let narrow = agent
        .with_constraints(Constraints {
            scopes: Some(vec!["slack:chat:write".into()]),
            rule: None,
        })
        .unwrap();
    let derive = proto::DeriveKeyRequest {
        scopes: vec!["slack:chat:write".into()],
        expires_in: 60,
        ..Default::default()
    };
    let e = narrow.keys().derive(&derive).await.unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::InsufficientScope));
    agent.keys().derive(&derive).await.unwrap();
    assert!(matches!(
        narrow.with_constraints(Constraints {
            scopes: Some(vec![]),
            rule: None
        }),
        Err(Error::Config(_))
    ));
    assert!(matches!(
        agent.with_constraints(Constraints::default()),
        Err(Error::Config(_))
    ));
    let wider = agent
        .with_constraints(Constraints {
            scopes: Some(vec!["github:repo".into()]),
            rule: None,
        })
        .unwrap();
    assert_eq!(
        wider.me().await.unwrap_err().code(),
        Some(ErrorCode::ConstraintNotNarrowing)
    );
}

#[tokio::test]
async fn a_signing_client_signs_every_request_for_its_key() {
    let s = TestServer::start().await;
    let b = s
        .create_agent_with(serde_json::json!({"name": "signer", "scopes": {"keys": ["derive"], "slack": ["chat:write"]}, "key": {"requires_signature": true}}))
        .await;
    let key = b["api_key"].as_str().unwrap();
    let secret = b["signing_secret"].as_str().unwrap();
    // The server's clock is manual (10:00 on the test day); the SDK signs with the real clock,
    // so bring the server to now for this test.
    s.clock.set(chrono::Utc::now());
    let unsigned = AgentClient::new(&s.base, key).unwrap();
    assert_eq!(
        unsigned.me().await.unwrap_err().code(),
        Some(ErrorCode::SignatureInvalid)
    );
    let signed = AgentClient::new(&s.base, key)
        .unwrap()
        .with_signing_secret(secret);
    signed.me().await.unwrap();
    signed.me().await.unwrap();
    let derive = proto::DeriveKeyRequest {
        scopes: vec!["slack:chat:write".into()],
        expires_in: 60,
        ..Default::default()
    };
    signed.keys().derive(&derive).await.unwrap();

    // An operator key can require signatures too.
    let app = App::new(&s.base, &s.root_key, s.org_id.parse().unwrap()).unwrap();
    let root = app
        .keys()
        .create_root(&proto::CreateKeyRequest {
            requires_signature: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    let signed_root = root.api_key.unwrap();
    let unsigned_app = App::new(&s.base, &signed_root, app.org_id()).unwrap();
    assert!(matches!(
        unsigned_app.org().await.unwrap_err(),
        Error::SignatureInvalid(_)
    ));
    let signed_app = unsigned_app.with_signing_secret(&root.signing_secret.unwrap());
    assert_eq!(signed_app.org().await.unwrap().name, "test-org");
}

fn app_of(s: &TestServer) -> App {
    App::new(&s.base, &s.root_key, s.org_id.parse().unwrap()).unwrap()
}

#[tokio::test]
async fn a_revoked_key_and_a_deprecated_key_are_told_apart() {
    let s = TestServer::start().await;
    let app = app_of(&s);
    let (b, key) = agent_with(&s, serde_json::json!({"name": "old-keys", "scopes": {}})).await;
    let agent_id: Uuid = b["agent"]["id"].as_str().unwrap().parse().unwrap();
    let key_id: Uuid = b["key"]["id"].as_str().unwrap().parse().unwrap();
    let agent = AgentClient::new(&s.base, &key).unwrap();
    assert!(!agent.me().await.unwrap().key_deprecated);
    app.agents().deprecate_key(agent_id, key_id).await.unwrap();
    let me = agent.me().await.unwrap();
    assert!(
        me.key_deprecated,
        "the deprecation header surfaces as a flag"
    );
    assert!(me.request_id.unwrap().starts_with("req_"));
    app.keys().revoke(key_id, true).await.unwrap();
    let e = agent.me().await.unwrap_err();
    assert!(matches!(e, Error::RevokedApiKey(_)), "{e:?}");
    assert_eq!(e.status(), Some(401));
    assert!(e.request_id().unwrap().starts_with("req_"));
    let again = app.keys().revoke(key_id, true).await.unwrap_err();
    assert!(matches!(again, Error::KeyAlreadyRevoked(_)), "{again:?}");
    let bad = AgentClient::new(&s.base, "kw_ak_nonsense").unwrap();
    assert!(matches!(
        bad.me().await.unwrap_err(),
        Error::InvalidApiKey(_)
    ));
    let root_me = AgentClient::new(&s.base, &s.root_key)
        .unwrap()
        .me()
        .await
        .unwrap_err();
    assert!(matches!(root_me, Error::MeRequiresAgentKey(_)));
}

#[tokio::test]
async fn a_quota_exceeded_call_is_not_waited_for() {
    let s = TestServer::start().await;
    let (_, key) = agent_with(
        &s,
        serde_json::json!({"name": "metered", "scopes": {}, "key": {"quota": {"limit": 1, "period": "day"}}}),
    )
    .await;
    let agent = AgentClient::new(&s.base, &key).unwrap();
    agent.me().await.unwrap();
    let started = std::time::Instant::now();
    let e = agent.me().await.unwrap_err();
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "a reset hours away is not waited for"
    );
    match e {
        Error::QuotaExceeded { retry_after, .. } => assert!(retry_after > 60, "{retry_after}"),
        other => panic!("expected QUOTA_EXCEEDED, got {other:?}"),
    }
}

#[tokio::test]
async fn the_org_and_its_keys_agents_and_events_can_be_walked_page_by_page() {
    let s = TestServer::start().await;
    let app = app_of(&s);
    let org = app
        .update_org(&proto::UpdateOrgRequest {
            name: Some("renamed-org".into()),
            policy: None,
        })
        .await
        .unwrap();
    assert_eq!(org.name, "renamed-org");
    assert_eq!(app.org_id().to_string(), s.org_id);

    let root = app
        .keys()
        .create_root(&proto::CreateKeyRequest {
            name: Some("second-root".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(root.key.kind, "root");
    assert!(root.api_key.unwrap().starts_with("kw_rk_"));

    let mut ids = Vec::new();
    for name in ["a-one", "a-two", "a-three"] {
        let c = app
            .agents()
            .create(&proto::CreateAgentRequest {
                name: name.into(),
                ..Default::default()
            })
            .await
            .unwrap();
        ids.push(c.agent.id);
    }
    app.agents().delete(ids[2]).await.unwrap();

    // One agent per page: three pages with revoked agents, two without.
    let mut pages = app.agents().pages(ListAgents {
        include_revoked: true,
        limit: Some(1),
        offset: None,
    });
    let mut seen = Vec::new();
    let mut count = 0;
    while let Some(page) = pages.next_page().await.unwrap() {
        count += 1;
        seen.extend(page.into_iter().map(|a| a.id));
    }
    assert_eq!(seen, ids);
    assert_eq!(pages.fetched(), 3);
    assert!(count >= 3);
    let live = app
        .agents()
        .pages(ListAgents {
            limit: Some(1),
            ..Default::default()
        })
        .all()
        .await
        .unwrap();
    assert_eq!(live.len(), 2);

    // The org's keys: filter by agent and kind, walk pages.
    let of_one = app
        .keys()
        .list(&ListKeys {
            agent_id: Some(ids[0]),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(of_one.keys.len(), 1);
    let roots = app
        .keys()
        .list(&ListKeys {
            kind: Some("root".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(roots.keys.len(), 2);
    let all_keys = app
        .keys()
        .pages(ListKeys {
            include_revoked: true,
            limit: Some(2),
            ..Default::default()
        })
        .all()
        .await
        .unwrap();
    assert_eq!(all_keys.len(), 5, "two root keys and three agent keys");

    let events = app
        .audit()
        .pages(AuditQuery {
            action: Some("agent.create".into()),
            limit: Some(2),
            since: Some(common::t0() - chrono::Duration::hours(1)),
            until: Some(common::t0() + chrono::Duration::hours(1)),
            ..Default::default()
        })
        .all()
        .await
        .unwrap();
    assert_eq!(events.len(), 3);

    // An agent client does not know its org, so it cannot list the org's keys.
    let agent_key = app
        .agents()
        .mint_key(ids[0], &proto::CreateKeyRequest::default())
        .await
        .unwrap()
        .api_key
        .unwrap();
    let agent = AgentClient::new(&s.base, &agent_key).unwrap();
    assert!(matches!(
        agent.keys().list(&ListKeys::default()).await,
        Err(Error::Config(_))
    ));
}

#[tokio::test]
async fn usage_answers_totals_and_hourly_buckets() {
    let s = TestServer::start().await;
    let app = app_of(&s);
    let (b, key) = agent_with(&s, serde_json::json!({"name": "busy", "scopes": {}})).await;
    let key_id: Uuid = b["key"]["id"].as_str().unwrap().parse().unwrap();
    let agent = AgentClient::new(&s.base, &key).unwrap();
    for _ in 0..3 {
        agent.me().await.unwrap();
    }
    let q = keyward_client::UsageQuery {
        granularity: Some(keyward_client::Granularity::Hour),
        since: Some(common::t0() - chrono::Duration::hours(2)),
        until: Some(common::t0() + chrono::Duration::hours(1)),
    };
    // Usage is flushed asynchronously (every 200 ms in tests); it is visible within 2 s.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let usage = loop {
        let u = app.keys().usage(key_id, &q).await.unwrap();
        if u.total.allowed >= 3 || std::time::Instant::now() > deadline {
            break u;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(usage.total.allowed, 3);
    assert_eq!(usage.buckets.len(), 3);
    assert_eq!(usage.buckets.iter().map(|b| b.allowed).sum::<u64>(), 3);
    let daily = app
        .keys()
        .usage(
            key_id,
            &keyward_client::UsageQuery {
                granularity: Some(keyward_client::Granularity::Day),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(daily.total.allowed, 3);
}

#[tokio::test]
async fn clients_built_from_a_config_use_its_key_org_and_agent_id() {
    let s = TestServer::start().await;
    let (b, key) = agent_with(&s, serde_json::json!({"name": "configured", "scopes": {}})).await;
    let config = keyward_client::ClientConfig::new(s.base.clone(), s.root_key.clone())
        .with_org_id(s.org_id.parse().unwrap());
    let app = App::from_config(&config).unwrap();
    assert_eq!(app.org().await.unwrap().id.to_string(), s.org_id);
    let mut agent_config = keyward_client::ClientConfig::new(s.base.clone(), "unused")
        .with_api_key(key)
        .with_signing_secret("kwss_not_needed");
    agent_config.agent_id = Some(b["agent"]["id"].as_str().unwrap().to_string());
    assert_eq!(agent_config.signing_secret(), Some("kwss_not_needed"));
    // The key does not require signatures, so the (bogus) signature headers are ignored.
    let agent = AgentClient::from_config(&agent_config).unwrap();
    assert_eq!(agent.me().await.unwrap().body.agent.name, "configured");
    // An app needs an org id; neither needs more than a key and a URL otherwise.
    let no_org = keyward_client::ClientConfig::new(s.base.clone(), s.root_key.clone());
    assert!(matches!(App::from_config(&no_org), Err(Error::Config(_))));
    let no_key = keyward_client::ClientConfig::from_lookup(|_| None).unwrap();
    assert!(matches!(
        AgentClient::from_config(&no_key),
        Err(Error::Config(_))
    ));
}

/// A service of the caller's own that checks every request it receives through Keyward: it
/// passes the bearer key, the constraints header and the signature on to `POST /v1/keys/verify`
/// and answers the verdict with the trace run id it saw. `/flaky` answers 503 on its first call.
async fn start_service(app: App) -> String {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, Method, StatusCode, Uri};
    use axum::response::IntoResponse;
    use base64::Engine;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    let hits = Arc::new(AtomicU32::new(0));
    let handler = move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
        let app = app.clone();
        let hits = hits.clone();
        async move {
            if uri.path() == "/flaky" && hits.fetch_add(1, Ordering::SeqCst) == 0 {
                return (StatusCode::SERVICE_UNAVAILABLE, "try again").into_response();
            }
            let h = |n: &str| {
                headers
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
            };
            let key = h("authorization")
                .and_then(|a| a.strip_prefix("Bearer ").map(str::to_string))
                .unwrap_or_default();
            let constraints = h("keyward-constraints").map(|c| {
                let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(c)
                    .unwrap();
                serde_json::from_slice::<serde_json::Value>(&json).unwrap()
            });
            let path = uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            let signature = match (h("x-signature"), h("x-timestamp")) {
                (Some(value), Some(ts)) => Some(proto::VerifySignature {
                    value,
                    timestamp: ts.parse().unwrap(),
                    method: method.to_string(),
                    path: path.clone(),
                    body: String::from_utf8_lossy(&body).into_owned(),
                }),
                _ => None,
            };
            let v = app
                .keys()
                .verify(&proto::VerifyRequest {
                    key,
                    required_scopes: Some(vec!["tickets:read".into()]),
                    request: Some(proto::VerifyRequestFacts {
                        method: Some(method.to_string()),
                        path: Some(path),
                        ..Default::default()
                    }),
                    signature,
                    constraints,
                })
                .await
                .unwrap();
            axum::Json(serde_json::json!({
                "valid": v.valid, "code": v.code, "run_id": h("keyward-run-id"),
                "agent": v.agent.map(|a| a.name),
            }))
            .into_response()
        }
    };
    let router = axum::Router::new().fallback(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    format!("http://{addr}")
}

async fn verdict(r: keyward_client::AgentRequest) -> serde_json::Value {
    let resp = r.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

#[tokio::test]
async fn request_carries_the_key_trace_constraints_and_signature_to_a_service_that_verifies() {
    use keyward_client::Method;
    let s = TestServer::start().await;
    // The SDK signs with the real clock; bring the server's manual clock to now.
    s.clock.set(chrono::Utc::now());
    let app = app_of(&s);
    let svc = start_service(app.clone()).await;
    let (_, key) = agent_with(
        &s,
        serde_json::json!({"name": "caller", "scopes": {"tickets": ["read", "write"]}}),
    )
    .await;
    let agent = AgentClient::new(&s.base, &key).unwrap();

    let v = verdict(agent.request(Method::GET, &format!("{svc}/tickets?open=true"))).await;
    assert_eq!(v["valid"], true, "{v}");
    assert_eq!(v["agent"], "caller");

    // Inside a trace the service sees the run id.
    let ctx = TraceContext {
        run_id: Some("svc-run".into()),
        ..Default::default()
    };
    let v = agent
        .trace(
            ctx,
            verdict(agent.request(Method::GET, &format!("{svc}/tickets"))),
        )
        .await
        .unwrap();
    assert_eq!(v["run_id"], "svc-run");

    // Constraints travel too: a rule denying GETs makes the service's verify say POLICY_DENIED,
    // and scopes without tickets:read make it INSUFFICIENT_SCOPE.
    let no_gets = agent
        .with_constraints(Constraints {
            scopes: None,
            rule: Some(serde_json::json!({"rule_type": "json_match",
                "rule_body": {"when": {"method": "GET"}, "effect": "deny"}})),
        })
        .unwrap();
    let v = verdict(no_gets.request(Method::GET, &format!("{svc}/tickets"))).await;
    assert_eq!(v["code"], "POLICY_DENIED", "{v}");
    let write_only = agent
        .with_constraints(Constraints {
            scopes: Some(vec!["tickets:write".into()]),
            rule: None,
        })
        .unwrap();
    let v = verdict(write_only.request(Method::GET, &format!("{svc}/tickets"))).await;
    assert_eq!(v["code"], "INSUFFICIENT_SCOPE", "{v}");

    // A key that requires signatures: signed requests (with a JSON body) verify, unsigned ones
    // do not.
    let signed_body = s
        .create_agent_with(
            serde_json::json!({"name": "signer", "scopes": {"tickets": ["read"]},
            "key": {"requires_signature": true}}),
        )
        .await;
    let signed_key = signed_body["api_key"].as_str().unwrap();
    let secret = signed_body["signing_secret"].as_str().unwrap();
    let unsigned = AgentClient::new(&s.base, signed_key).unwrap();
    let v = verdict(unsigned.request(Method::GET, &format!("{svc}/tickets"))).await;
    assert_eq!(v["code"], "SIGNATURE_INVALID", "{v}");
    let signer = unsigned.clone().with_signing_secret(secret);
    let v = verdict(
        signer
            .request(Method::POST, &format!("{svc}/tickets?x=1"))
            .header("X-Extra", "yes")
            .json(&serde_json::json!({"title": "printer on fire"})),
    )
    .await;
    assert_eq!(v["valid"], true, "{v}");
    let v = verdict(
        signer
            .request(Method::PUT, &format!("{svc}/tickets/1"))
            .body("text/plain", "closed"),
    )
    .await;
    assert_eq!(v["valid"], true, "{v}");

    // A GET answered 503 is retried; the second answer is the service's verdict.
    let v = verdict(agent.request(Method::GET, &format!("{svc}/flaky"))).await;
    assert_eq!(v["valid"], true, "{v}");

    // A path goes to Keyward itself, and send_json decodes Keyward's answers and errors.
    let me = agent
        .request(Method::GET, "/v1/me")
        .send_json::<proto::MeResponse>()
        .await
        .unwrap();
    assert_eq!(me.body.agent.name, "caller");
    let e = agent
        .request(Method::GET, &format!("/v1/keys/{}", Uuid::now_v7()))
        .send_json::<proto::Key>()
        .await
        .unwrap_err();
    assert!(matches!(e, Error::InsufficientScope(_)), "{e:?}");

    // Malformed URLs and headers fail before anything is sent.
    for r in [
        agent.request(Method::GET, "ftp://example.invalid/"),
        agent.request(Method::GET, "tickets"),
        agent
            .request(Method::GET, "/v1/me")
            .header("bad header", "x"),
    ] {
        assert!(matches!(r.send().await, Err(Error::Config(_))));
    }
}

/// Each request's path and `Idempotency-Key`, in arrival order.
type Seen = std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>;

/// A stand-in for Keyward that answers `503 STORE_UNAVAILABLE` to the first request of each
/// path and then what `ok` says, recording every request's `Idempotency-Key`.
async fn start_flaky_keyward(
    ok: serde_json::Value,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Vec<(String, Option<String>)>>>,
) {
    use axum::http::{HeaderMap, StatusCode, Uri};
    use axum::response::IntoResponse;
    use std::sync::Arc;

    let seen: Seen = Arc::default();
    let log = seen.clone();
    let handler = move |uri: Uri, headers: HeaderMap| {
        let log = log.clone();
        let ok = ok.clone();
        async move {
            let key = headers
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let first = {
                let mut log = log.lock().unwrap();
                let first = !log.iter().any(|(p, _)| p == uri.path());
                log.push((uri.path().to_string(), key));
                first
            };
            if first {
                let body = serde_json::json!({"error": {"code": "STORE_UNAVAILABLE",
                    "message": "The store is unavailable", "status": 503,
                    "request_id": "req_flaky", "details": {}}});
                (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
            } else {
                (StatusCode::CREATED, axum::Json(ok)).into_response()
            }
        }
    };
    let router = axum::Router::new().fallback(handler);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn a_creating_call_retried_after_503_reuses_its_idempotency_key_and_updates_are_sent_once() {
    // A real creation answer, replayed by the stand-in after its 503.
    let s = TestServer::start().await;
    let real = s
        .create_agent_with(serde_json::json!({"name": "replayed", "scopes": {}}))
        .await;
    let (base, seen) = start_flaky_keyward(real.clone()).await;
    let app = App::new(&base, &s.root_key, s.org_id.parse().unwrap())
        .unwrap()
        .with_retry(keyward_client::RetryPolicy {
            max_retries: 2,
            base_delay: std::time::Duration::from_millis(10),
            max_delay: std::time::Duration::from_secs(1),
        });
    let created = app
        .agents()
        .create(&proto::CreateAgentRequest {
            name: "replayed".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        created.agent.id.to_string(),
        real["agent"]["id"].as_str().unwrap()
    );
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "one 503, one retry: {seen:?}");
        let key = seen[0]
            .1
            .clone()
            .expect("a creating call carries an Idempotency-Key");
        assert_eq!(
            seen[1].1.as_deref(),
            Some(key.as_str()),
            "the retry reuses it"
        );
    }
    // An update is not repeated: the 503 comes back as its typed error.
    let e = app
        .agents()
        .update(created.agent.id, &proto::UpdateAgentRequest::default())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::StoreUnavailable(_)), "{e:?}");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 3, "sent once");
    assert_eq!(seen[2].1, None, "updates carry no Idempotency-Key");
}
