//! Access decisions on the hot path (API.md §7 and the traffic-controls issue): denials of a
//! known key are audited as `auth.denied` in batches, identical ones aggregated into one event
//! with a count; failed verifications are audited as `key.verify` (successful ones are counted
//! in the key's usage); an address that keeps failing to
//! authenticate is throttled before its tokens are even looked at.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use chrono::Duration;
use common::TestServer;
use keyward_core::model::RateLimitSpec;
use serde_json::{json, Value};

async fn wait_for_events(s: &TestServer, query: &str, n: usize) -> Vec<Value> {
    let path = s.org_path(&format!("/audit?{query}"));
    for _ in 0..100 {
        let r = s.get(&path, &s.root_key).await;
        let events = r.body["events"].as_array().cloned().unwrap_or_default();
        if events.len() >= n {
            return events;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("fewer than {n} events for {query}");
}

/// The denials the aggregated events count, together.
fn counted(events: &[Value]) -> u64 {
    events
        .iter()
        .map(|e| e["details"]["count"].as_u64().unwrap_or(0))
        .sum()
}

/// A server whose failed-auth throttle allows 3 failures at once, then one a second.
async fn throttled_server() -> TestServer {
    throttled_server_with(|_| {}).await
}

/// [`throttled_server`] after `configure` adjusted its other settings.
async fn throttled_server_with(
    configure: impl FnOnce(&mut keyward_server::ServerConfig),
) -> TestServer {
    TestServer::start_configured(|c| {
        c.failed_auth_limit = Some(RateLimitSpec {
            limit: 60,
            period_s: 60,
            burst: 3,
        });
        configure(c);
    })
    .await
}

/// What `n` failures in a row from one address are answered with at [`throttled_server`]'s
/// budget: the first three looked up, the rest refused before that.
fn three_then_throttled(n: usize) -> Vec<&'static str> {
    (0..n)
        .map(|i| {
            if i < 3 {
                "INVALID_API_KEY"
            } else {
                "RATE_LIMITED"
            }
        })
        .collect()
}

/// A well-formed agent token (valid checksum) that no key has.
fn never_issued() -> String {
    keyward_core::token::generate(
        keyward_core::token::Environment::Live,
        keyward_core::token::TokenKind::Agent,
    )
    .unwrap()
    .expose()
    .to_string()
}

#[tokio::test]
async fn a_flood_of_identical_denials_becomes_one_event_with_a_count() {
    let s = TestServer::start().await;
    let (agent, key_json, key) = s
        .create_agent("flooded", json!({"slack": ["chat:write"]}))
        .await;
    let kid = key_json["id"].as_str().unwrap();
    s.post(
        &s.org_path(&format!("/agents/{}/pause", agent["id"].as_str().unwrap())),
        &s.root_key,
        json!({}),
    )
    .await
    .assert_status(200);
    let org_path = s.org_path("");
    let calls = (0..200).map(|_| s.get(&org_path, &key));
    for r in futures_util::future::join_all(calls).await {
        r.assert_error(403, "AGENT_PAUSED");
    }
    let events = wait_for_events(&s, &format!("action=auth.denied&key_id={kid}"), 1).await;
    // Give a second flush the chance to (wrongly) write more, then count.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let events_after = wait_for_events(&s, &format!("action=auth.denied&key_id={kid}"), 1).await;
    let total: u64 = events_after
        .iter()
        .map(|e| e["details"]["count"].as_u64().unwrap())
        .sum();
    assert_eq!(total, 200, "every denial is counted, none dropped");
    assert!(
        events_after.len() <= 2,
        "aggregated into at most one event per flush, got {}",
        events_after.len()
    );
    let e = &events[0];
    assert_eq!(e["outcome"], "denied");
    assert_eq!(e["error_code"], "AGENT_PAUSED");
    assert_eq!(e["details"]["path"], format!("/v1/orgs/{}", s.org_id));
}

#[tokio::test]
async fn handler_denials_of_scope_and_org_are_audited_too() {
    let s = TestServer::start().await;
    let (_, key_json, key) = s
        .create_agent("narrow", json!({"slack": ["chat:write"]}))
        .await;
    let kid = key_json["id"].as_str().unwrap();
    s.get(&s.org_path("/agents"), &key)
        .await
        .assert_error(403, "INSUFFICIENT_SCOPE");
    let events = wait_for_events(&s, &format!("action=auth.denied&key_id={kid}"), 1).await;
    assert_eq!(events[0]["error_code"], "INSUFFICIENT_SCOPE");
}

#[tokio::test]
async fn failed_verifications_are_audited_and_successful_ones_counted_in_usage() {
    let s = TestServer::start().await;
    let (_, key_json, key) = s
        .create_agent("verified", json!({"slack": ["chat:write"]}))
        .await;
    let kid = key_json["id"].as_str().unwrap();
    for _ in 0..3 {
        s.post("/v1/keys/verify", &s.root_key, json!({"key": key}))
            .await
            .assert_status(200);
    }
    for _ in 0..2 {
        s.post(
            "/v1/keys/verify",
            &s.root_key,
            json!({"key": key, "required_scopes": ["github:repo"]}),
        )
        .await
        .assert_status(200);
    }
    // The two failures are one event with a count, or two if a flush (every 200 ms here) fell
    // between them: wait until both are counted.
    let query = format!("action=key.verify&key_id={kid}");
    let mut events = wait_for_events(&s, &query, 1).await;
    for _ in 0..100 {
        if counted(&events) >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        events = wait_for_events(&s, &query, 1).await;
    }
    assert_eq!(
        counted(&events),
        2,
        "only the failed verifications: {events:?}"
    );
    assert!(events.len() <= 2, "aggregated per flush: {events:?}");
    for e in &events {
        assert_eq!(e["outcome"], "denied");
        assert_eq!(e["error_code"], "INSUFFICIENT_SCOPE");
    }
    // All five passed the traffic controls, so all five count in the key's usage as allowed,
    // as a direct call that fails its endpoint's scope check after them does (API.md §1 order,
    // §5 "exactly like a direct call"); the failures are told apart by the audit event above.
    let usage = s.get(&format!("/v1/keys/{kid}/usage"), &s.root_key).await;
    assert_eq!(usage.body["total"]["allowed"], 5);
    assert_eq!(usage.body["total"]["denied"], 0);
}

#[tokio::test]
async fn an_address_that_keeps_failing_is_throttled_then_recovers() {
    let s = throttled_server().await;
    let (_, _, key) = s
        .create_agent("innocent", json!({"slack": ["chat:write"]}))
        .await;
    let bogus = "kw_ak_000000000000000000000000000000000000";
    for _ in 0..3 {
        s.get("/v1/me", bogus)
            .await
            .assert_error(401, "INVALID_API_KEY");
    }
    // The fourth attempt from this address is refused before the token is looked at; so is a
    // valid key from the same address, for a second. The refusal is held back (up to 250 ms)
    // so that a client that asks again at once slows itself down, not the server.
    let asked = std::time::Instant::now();
    let r = s.get("/v1/me", bogus).await;
    assert!(
        asked.elapsed() >= std::time::Duration::from_millis(250),
        "a throttled refusal is held back"
    );
    r.assert_error(429, "RATE_LIMITED");
    assert_eq!(r.body["error"]["retry_after"], 1);
    s.get("/v1/me", &key)
        .await
        .assert_error(429, "RATE_LIMITED");
    s.advance(Duration::seconds(1));
    s.get("/v1/me", &key).await.assert_status(200);
    // Successes do not count as failures: the valid key keeps working.
    for _ in 0..10 {
        s.get("/v1/me", &key).await.assert_status(200);
    }
}

/// An IPv6 client picks the low 64 bits of its address: its /64 shares one budget, so moving
/// within it buys no fresh failures; another /64 has its own.
#[tokio::test]
async fn addresses_of_one_ipv6_64_share_one_failure_budget() {
    let s =
        throttled_server_with(|c| c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()]).await;
    let s = &s;
    let from = |xff: String| async move {
        s.send(
            reqwest::Method::GET,
            "/v1/me",
            Some(&never_issued()),
            &[("X-Forwarded-For", &xff)],
            None,
        )
        .await
        .code()
        .to_string()
    };
    let mut codes = Vec::new();
    for i in 1..=5 {
        codes.push(from(format!("2001:db8:1:2::{i:x}")).await);
    }
    assert_eq!(codes, three_then_throttled(5));
    assert_eq!(from("2001:db8:1:3::1".into()).await, "INVALID_API_KEY");
}

#[tokio::test]
async fn well_formed_unknown_tokens_count_against_the_throttle_too() {
    let s = throttled_server().await;
    let mut codes = Vec::new();
    for _ in 0..6 {
        codes.push(s.get("/v1/me", &never_issued()).await.code().to_string());
    }
    assert_eq!(codes, three_then_throttled(6));
}

/// Holds every read of the keys' table (behind a lock taken in a transaction of its own) while
/// `during` runs: the PostgreSQL server's lookups of tokens its cache does not know wait. Then
/// lets them go, and gives a lookup left running by a dropped request the time to finish.
async fn with_key_reads_held<F: std::future::Future>(url: &str, schema: &str, during: F) {
    use sqlx::Connection;
    let mut lock = sqlx::postgres::PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(&format!(
        "SET search_path TO \"{schema}\"; BEGIN; LOCK TABLE keys IN ACCESS EXCLUSIVE MODE;"
    ))
    .execute(&mut lock)
    .await
    .unwrap();
    during.await;
    // Time for the server to see a connection close and drop its request (were the read to
    // finish first instead, the request would be judged the usual way).
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
    lock.close().await.unwrap();
    // A dropped request's lookup, finished in a task of its own, takes a read of the store; a
    // second leaves room for a loaded CI machine.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}

/// Two failures from this address: one left of [`throttled_server`]'s budget.
async fn fail_twice(s: &TestServer) {
    for _ in 0..2 {
        s.get("/v1/me", &never_issued())
            .await
            .assert_error(401, "INVALID_API_KEY");
    }
}

/// Sends `GET /v1/me` with `key` and gives up after 300 ms, closing the connection.
async fn give_up_on(s: &TestServer, key: &str) {
    let cut_off =
        tokio::time::timeout(std::time::Duration::from_millis(300), s.get("/v1/me", key)).await;
    assert!(cut_off.is_err(), "the read waits behind the lock");
}

/// A client that cuts its request off while its unknown token is being read from the store is
/// still charged a failure, once the read finds no key: otherwise a guesser could drop every
/// guess once sent and never be throttled, each guess still reaching the store. PostgreSQL only:
/// there the read can be held, while SQLite's hot read never waits.
#[tokio::test]
async fn a_client_that_leaves_during_the_store_read_is_charged_a_failure() {
    let s = throttled_server().await;
    let Some((url, schema)) = s.postgres_or_skip("can hold a read") else {
        return;
    };
    fail_twice(&s).await;
    with_key_reads_held(url, schema, give_up_on(&s, &never_issued())).await;
    // That was the third failure of the budget: the fourth guess is refused.
    s.get("/v1/me", &never_issued())
        .await
        .assert_error(429, "RATE_LIMITED");
}

/// ...but a valid key whose client gives up on a slow store is not charged: its lookup finds
/// the key. (Charged, a proxy that times out on every request while the store stalls would get
/// its own valid keys refused.)
#[tokio::test]
async fn a_valid_key_whose_client_leaves_during_the_store_read_is_not_charged() {
    let s = throttled_server().await;
    let Some((url, schema)) = s.postgres_or_skip("can hold a read") else {
        return;
    };
    let (_, _, key) = s
        .create_agent("patient", json!({"slack": ["chat:write"]}))
        .await;
    fail_twice(&s).await;
    with_key_reads_held(url, schema, give_up_on(&s, &key)).await;
    let codes = [
        s.get("/v1/me", &never_issued()).await.code().to_string(),
        s.get("/v1/me", &never_issued()).await.code().to_string(),
    ];
    assert_eq!(
        codes,
        ["INVALID_API_KEY", "RATE_LIMITED"],
        "one failure of the budget left"
    );
    s.advance(Duration::seconds(1));
    s.get("/v1/me", &key).await.assert_status(200);
}

/// The throttle's budget holds however many requests an address has in flight: they all pass
/// the check at the start together, but a failure over the budget is answered as throttled, so
/// no more 401s are ever answered than the budget allows (the manual clock does not move, so
/// nothing refills). On PostgreSQL each unknown token's lookup awaits the database, so the
/// requests overlap: without the check at the end, all 64 were answered 401. (On SQLite the
/// lookup runs on the calling thread and rarely overlaps, so there the test seldom could fail.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_failures_from_one_address_get_no_more_than_the_budget() {
    let s = throttled_server().await;
    let tokens: Vec<String> = (0..64).map(|_| never_issued()).collect();
    let calls = tokens.iter().map(|t| s.get("/v1/me", t));
    let results = futures_util::future::join_all(calls).await;
    let invalid = results
        .iter()
        .filter(|r| r.code() == "INVALID_API_KEY")
        .count();
    let throttled = results
        .iter()
        .filter(|r| r.status == 429 && r.code() == "RATE_LIMITED")
        .count();
    assert_eq!(invalid, 3, "the burst, and no more");
    assert_eq!(throttled, 61);
    for r in results.iter().filter(|r| r.status == 429) {
        assert!(r.body["error"]["retry_after"].as_u64().unwrap() >= 1);
    }
}
