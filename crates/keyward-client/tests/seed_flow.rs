//! Runs the crate docs' end-to-end example (`examples/seed_flow.rs`) against a real in-process
//! server, configured from the environment as a user would run it, and checks what it left.
#![allow(clippy::unwrap_used, clippy::expect_used)]
#[path = "../../keyward-server/tests/common/mod.rs"]
mod common;
#[path = "../examples/seed_flow.rs"]
#[allow(dead_code)]
mod seed_flow;

use keyward_client::{App, AuditQuery, Error};

// The only test of this binary: it sets the process environment, which no other thread reads.
#[tokio::test]
async fn the_seed_flow_runs_end_to_end_from_the_environment() {
    let s = common::TestServer::start().await;
    std::env::set_var("KEYWARD_BASE_URL", &s.base);
    std::env::set_var("KEYWARD_API_KEY", &s.root_key);
    std::env::set_var("KEYWARD_ORG_ID", &s.org_id);
    let app = App::from_env().unwrap();
    let done = seed_flow::seed_flow(&app, &s.base).await.unwrap();

    let old = app.keys().get(done.old_key_id).await.unwrap();
    assert!(old.revoked_at.is_some());
    assert_eq!(old.successor_key_id, Some(done.new_key_id));
    let derived = app.keys().get(done.derived_key_id).await.unwrap();
    assert!(
        derived.revoked_at.is_some(),
        "revocation cascades to derived keys"
    );
    assert!(app
        .keys()
        .get(done.new_key_id)
        .await
        .unwrap()
        .revoked_at
        .is_none());

    // The derivation inside the trace is audited with its run and thread.
    let events = app
        .audit()
        .list(&AuditQuery {
            run_id: Some("seed-run-1".into()),
            ..Default::default()
        })
        .await
        .unwrap()
        .events;
    assert!(events
        .iter()
        .any(|e| e.action == "key.derive" && e.thread_id.as_deref() == Some("ticket-1001")));

    // Running it again starts clean: the previous agent is deleted, a new one created.
    let again = seed_flow::seed_flow(&app, &s.base).await.unwrap();
    assert_ne!(again.agent_id, done.agent_id);
    let first = app.agents().get(done.agent_id).await.unwrap();
    assert_eq!(first.status, "revoked");
    assert!(matches!(
        App::new("not a url", "k", done.agent_id),
        Err(Error::Config(_))
    ));
}
