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
    let config = keyward_server::ServerConfig {
        trusted_proxies: Vec::new(),
        master_key: keyward_server::MasterKey::from_bytes([42u8; 32]),
        clock: Arc::new(keyward_core::clock::ManualClock::new(common::t0())),
        cache: Default::default(),
        usage_flush_interval: std::time::Duration::from_secs(1),
        failed_auth_limit: None,
        rate_limit_backend: keyward_server::RateLimitBackend::Local,
    };
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
        r = get_healthz(addr) => r,
    };
    assert!(answered.starts_with("HTTP/1.1 200"), "{answered}");
    assert_eq!(
        Arc::strong_count(&store),
        2,
        "the server's state holds the store"
    );
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

/// `GET /healthz` on a connection of its own, closed by the client once answered.
async fn get_healthz(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: keyward\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 4096];
    let n = conn.read(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer[..n]).into_owned()
}
