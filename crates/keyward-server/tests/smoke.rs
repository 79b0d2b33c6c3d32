//! A first end-to-end check of the harness: the server starts, answers health, and the
//! bootstrap root key can create an agent whose key works.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use common::TestServer;
use serde_json::json;

#[tokio::test]
async fn a_fresh_server_creates_an_agent_whose_key_can_call_me() {
    let s = TestServer::start().await;
    let (agent, key, api_key) = s
        .create_agent("smoke-bot", json!({"slack": ["chat:write"]}))
        .await;
    let me = s.get("/v1/me", &api_key).await;
    let body = me.assert_status(200);
    assert_eq!(body["id"], agent["id"]);
    assert_eq!(body["key"]["id"], key["id"]);
    assert_eq!(body["key"]["scopes"], json!(["slack:chat:write"]));
}

/// A caller that stops serving by dropping `serve`'s future takes the background tasks (usage
/// flusher, change watch, metrics upkeep, throttle pruner) with it: none is left holding the
/// server's state, and so its store, once the future is gone.
#[tokio::test]
async fn dropping_serve_stops_its_background_tasks() {
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn keyward_store::Store> = Arc::new(
        keyward_store::sqlite::SqliteStore::open(&dir.path().join("k.db"))
            .await
            .unwrap(),
    );
    let config = common::quiet_config(Arc::new(
        keyward_core::clock::ManualClock::new(common::t0()),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Boxed, so that dropping it drops the future (`tokio::pin!` would leave it on the stack).
    let mut serving = Box::pin(keyward_server::serve(
        config,
        store.clone(),
        listener,
        std::future::pending(),
    ));
    // Served once: `serve` spawns its tasks (each taking its clone of the state, which holds the
    // store) before it accepts, so by this answer every one of them holds it.
    let answered = tokio::select! {
        ended = &mut serving => panic!("serve ended before answering: {ended:?}"),
        r = reqwest::get(format!("http://{addr}/healthz")) => r.unwrap().status(),
    };
    assert_eq!(answered, 200);
    assert!(Arc::strong_count(&store) > 1, "the server holds the store");
    drop(serving);
    // Aborted tasks are dropped by the runtime, soon after but not within the drop.
    for _ in 0..100 {
        if Arc::strong_count(&store) == 1 {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!(
        "{} holders of the store remain after serve was dropped",
        Arc::strong_count(&store) - 1
    );
}
