//! The Rust SDK (keyward-client) against the real in-process server: every method of this first
//! cut is exercised once, including typed error codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use common::TestServer;
use keyward_client::{
    proto, AgentClient, App, AuditQuery, Constraints, Error, ListAgents, TraceContext,
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
    assert!(matches!(
        e,
        Error::Api {
            retry_after: Some(1),
            ..
        }
    ));
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
}
