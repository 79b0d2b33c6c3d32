//! A first end-to-end check of the harness: the server starts, answers health, and the
//! bootstrap root key can create an agent whose key works.
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
