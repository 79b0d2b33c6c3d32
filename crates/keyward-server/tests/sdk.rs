//! The Rust SDK (keyward-client) against the real in-process server: every method of this first
//! cut is exercised once, including typed error codes.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use common::TestServer;
use keyward_client::{proto, AgentClient, App, AuditQuery, Error, ListAgents};
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
