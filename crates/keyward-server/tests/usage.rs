//! Quotas, usage counters and alert thresholds through the real server (API.md §6.3): exact
//! quota counting under concurrency, calendar-period resets on the manual clock, one threshold
//! event per period, the usage endpoint's buckets, and `last_used_at` after a flush.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::sync::Arc;

use chrono::Duration;
use common::TestServer;
use keyward_core::clock::Clock;
use serde_json::{json, Value};

async fn quota_agent(s: &TestServer, quota: Value, thresholds: Value) -> (String, String) {
    let b = s
        .create_agent_with(json!({
            "name": "metered",
            "scopes": {"slack": ["chat:write"]},
            "key": {"quota": quota, "alert_thresholds": thresholds}
        }))
        .await;
    (
        b["key"]["id"].as_str().unwrap().to_string(),
        b["api_key"].as_str().unwrap().to_string(),
    )
}

/// Polls until `f` holds (the flusher writes on a real-time interval), failing after 10 s.
async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_concurrent_calls_against_a_quota_of_100_succeed_exactly_100_times() {
    let s = TestServer::start().await;
    let (_, key) = quota_agent(&s, json!({"limit": 100, "period": "day"}), json!([])).await;
    let calls = (0..1000).map(|_| s.get("/v1/me", &key));
    let results = futures_util::future::join_all(calls).await;
    let ok = results.iter().filter(|r| r.status == 200).count();
    let exceeded = results
        .iter()
        .filter(|r| r.code() == "QUOTA_EXCEEDED")
        .count();
    assert_eq!(ok, 100);
    assert_eq!(exceeded, 900);
}

#[tokio::test]
async fn an_exhausted_quota_answers_429_until_the_period_ends() {
    let s = TestServer::start().await;
    let (_, key) = quota_agent(&s, json!({"limit": 2, "period": "hour"}), json!([])).await;
    s.get("/v1/me", &key).await.assert_status(200);
    s.get("/v1/me", &key).await.assert_status(200);
    let r = s.get("/v1/me", &key).await;
    r.assert_error(429, "QUOTA_EXCEEDED");
    // The clock starts at 10:00:00; the hour resets at 11:00:00.
    assert_eq!(r.body["error"]["retry_after"], json!(3600));
    assert_eq!(r.header("retry-after"), Some("3600"));
    s.advance(Duration::minutes(59));
    s.get("/v1/me", &key)
        .await
        .assert_error(429, "QUOTA_EXCEEDED");
    s.advance(Duration::minutes(1));
    s.get("/v1/me", &key).await.assert_status(200);
}

/// Waits until the store holds every use of `kid` up to its last one, made at the server's
/// current time (on PostgreSQL a changed quota starts from the uses the store has counted).
async fn flushed(s: &TestServer, kid: &str) {
    let last = keyward_proto::ts::format(&s.clock.now());
    eventually("the last use to be flushed", || async {
        s.get(&format!("/v1/keys/{kid}"), &s.root_key).await.body["last_used_at"] == json!(last)
    })
    .await;
}

#[tokio::test]
async fn a_quota_moved_to_a_longer_period_counts_the_uses_already_made_in_it() {
    let s = TestServer::start().await;
    let (kid, key) = quota_agent(&s, json!({"limit": 5, "period": "hour"}), json!([])).await;
    // Four uses this hour, then one in the next (the hour's counter holds one).
    for _ in 0..4 {
        s.get("/v1/me", &key).await.assert_status(200);
    }
    s.advance(Duration::hours(1));
    s.get("/v1/me", &key).await.assert_status(200);
    flushed(&s, &kid).await;
    // The same day has seen five uses: a daily quota of five is spent.
    s.patch(
        &format!("/v1/keys/{kid}"),
        &s.root_key,
        json!({"quota": {"limit": 5, "period": "day"}}),
    )
    .await
    .assert_status(200);
    s.get("/v1/me", &key)
        .await
        .assert_error(429, "QUOTA_EXCEEDED");
}

#[tokio::test]
async fn a_quota_removed_and_set_again_counts_the_uses_made_without_it() {
    let s = TestServer::start().await;
    let (kid, key) = quota_agent(&s, json!({"limit": 3, "period": "day"}), json!([])).await;
    s.get("/v1/me", &key).await.assert_status(200);
    let path = format!("/v1/keys/{kid}");
    let set = |q: Value| s.patch(&path, &s.root_key, json!({"quota": q}));
    set(Value::Null).await.assert_status(200);
    s.get("/v1/me", &key).await.assert_status(200);
    s.advance(Duration::seconds(1));
    s.get("/v1/me", &key).await.assert_status(200);
    flushed(&s, &kid).await;
    set(json!({"limit": 3, "period": "day"}))
        .await
        .assert_status(200);
    s.get("/v1/me", &key)
        .await
        .assert_error(429, "QUOTA_EXCEEDED");
}

#[tokio::test]
async fn verify_takes_from_the_verified_keys_quota_and_reports_it() {
    let s = TestServer::start().await;
    let (_, key) = quota_agent(&s, json!({"limit": 2, "period": "month"}), json!([])).await;
    let v = || s.post("/v1/keys/verify", &s.root_key, json!({"key": key}));
    let first = v().await;
    assert_eq!(first.body["code"], "VALID");
    assert_eq!(first.body["quota"]["limit"], 2);
    assert_eq!(first.body["quota"]["used"], 1);
    assert_eq!(first.body["quota"]["remaining"], 1);
    assert_eq!(first.body["quota"]["resets_at"], "2026-12-01T00:00:00.000Z");
    assert_eq!(v().await.body["code"], "VALID");
    let exceeded = v().await;
    assert_eq!(exceeded.body["code"], "QUOTA_EXCEEDED");
    // The refusal reports the quota it ran into, not null.
    assert_eq!(exceeded.body["quota"]["used"], 2, "{}", exceeded.body);
    assert_eq!(exceeded.body["quota"]["remaining"], 0);
    assert_eq!(
        exceeded.body["quota"]["resets_at"],
        "2026-12-01T00:00:00.000Z"
    );
    s.get("/v1/me", &key)
        .await
        .assert_error(429, "QUOTA_EXCEEDED");
}

/// API.md §5: a verify counts "exactly like a direct call". A direct call that passes the traffic
/// controls and then fails its endpoint's scope check counted as allowed and took a quota unit;
/// a verification failing its `required_scopes` must count the same way, so the quota's `used`
/// and the usage report's `allowed` agree (a counter rebuilt from the store must not forget it).
#[tokio::test]
async fn a_verify_failing_its_required_scopes_counts_like_a_direct_call_failing_its_scope() {
    let s = TestServer::start().await;
    let (key_id, key) = quota_agent(&s, json!({"limit": 10, "period": "day"}), json!([])).await;
    let b = s
        .post(
            "/v1/keys/verify",
            &s.root_key,
            json!({"key": key, "required_scopes": ["github:repo:read"]}),
        )
        .await;
    assert_eq!(b.body["code"], "INSUFFICIENT_SCOPE");
    assert_eq!(b.body["quota"]["used"], 1);
    // The direct call: the key lacks `usage:read`.
    s.get(&format!("/v1/keys/{key_id}/usage"), &key)
        .await
        .assert_error(403, "INSUFFICIENT_SCOPE");
    let usage = format!("/v1/keys/{key_id}/usage");
    let report = s.get(&usage, &s.root_key).await;
    let u = report.assert_status(200);
    assert_eq!(
        u["total"],
        json!({"allowed": 2, "denied": 0, "rate_limited": 0})
    );
    assert_eq!(u["quota"]["used"], 2);
}

/// A request whose client goes away while its quota unit is being taken from the shared store
/// still has that unit counted in the key's usage and, crossing a threshold, announced: the unit
/// is taken either way (the statement runs once sent), and the next unit never crosses that
/// threshold again. PostgreSQL only: there the take can be held (behind a lock on the counters'
/// table); on SQLite a quota is counted in memory.
#[tokio::test]
async fn a_quota_unit_taken_for_a_client_that_left_is_counted_and_announced() {
    use sqlx::Connection;
    let s = TestServer::start().await;
    let Some((url, schema)) = s.postgres_or_skip("can hold a quota unit's take") else {
        return;
    };
    let (key_id, key) = quota_agent(&s, json!({"limit": 2, "period": "day"}), json!([50])).await;
    let mut lock = sqlx::postgres::PgConnection::connect(url).await.unwrap();
    sqlx::raw_sql(&format!(
        "SET search_path TO \"{schema}\"; BEGIN; \
         LOCK TABLE quota_counters IN ACCESS EXCLUSIVE MODE;"
    ))
    .execute(&mut lock)
    .await
    .unwrap();
    let cut_off =
        tokio::time::timeout(std::time::Duration::from_millis(300), s.get("/v1/me", &key)).await;
    assert!(cut_off.is_err(), "the take waits behind the lock");
    // Time for the server to see the connection close and drop the request.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
    lock.close().await.unwrap();
    let usage = format!("/v1/keys/{key_id}/usage");
    eventually("the use counted", || async {
        s.get(&usage, &s.root_key).await.body["total"]["allowed"] == 1
    })
    .await;
    let report = s.get(&usage, &s.root_key).await;
    assert_eq!(report.body["quota"]["used"], 1, "{}", report.body);
    let path = s.org_path(&format!(
        "/audit?action=key.usage_threshold&key_id={key_id}"
    ));
    eventually("the 50% threshold announced", || async {
        s.get(&path, &s.root_key).await.body["events"]
            .as_array()
            .map(Vec::len)
            == Some(1)
    })
    .await;
}

#[tokio::test]
async fn each_alert_threshold_is_announced_once_per_period() {
    let s = TestServer::start().await;
    let (key_id, key) =
        quota_agent(&s, json!({"limit": 10, "period": "hour"}), json!([50, 100])).await;
    for _ in 0..12 {
        s.get("/v1/me", &key).await;
    }
    let path = s.org_path(&format!(
        "/audit?action=key.usage_threshold&key_id={key_id}"
    ));
    eventually("two threshold events", || async {
        s.get(&path, &s.root_key).await.body["events"]
            .as_array()
            .map(Vec::len)
            == Some(2)
    })
    .await;
    let events = s.get(&path, &s.root_key).await.body["events"].clone();
    let mut thresholds: Vec<u64> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["details"]["threshold"].as_u64().unwrap())
        .collect();
    thresholds.sort();
    assert_eq!(thresholds, vec![50, 100]);
    // The next hour starts a new period: 50% fires again.
    s.advance(Duration::hours(1));
    for _ in 0..5 {
        s.get("/v1/me", &key).await.assert_status(200);
    }
    eventually("a third threshold event", || async {
        s.get(&path, &s.root_key).await.body["events"]
            .as_array()
            .map(Vec::len)
            == Some(3)
    })
    .await;
}

/// A request whose clock reading is from just before a period boundary, arriving after another
/// request started the new period, is counted in its own period; the new period's count stays
/// exact (the counter is loaded again from the store and what is pending) and its threshold is
/// announced once (the store keeps one announcement per threshold per period).
#[tokio::test]
async fn a_straggler_from_the_previous_period_leaves_the_new_periods_count_exact() {
    let s = TestServer::start().await;
    let (key_id, key) = quota_agent(&s, json!({"limit": 10, "period": "hour"}), json!([50])).await;
    s.advance(Duration::hours(1));
    for _ in 0..5 {
        s.get("/v1/me", &key).await.assert_status(200);
    }
    s.advance(Duration::milliseconds(-1));
    s.get("/v1/me", &key).await.assert_status(200);
    s.advance(Duration::milliseconds(1));
    for _ in 0..2 {
        s.get("/v1/me", &key).await.assert_status(200);
    }
    let path = s.org_path(&format!(
        "/audit?action=key.usage_threshold&key_id={key_id}"
    ));
    // Every use in the store means every flush that could write an announcement has run (a
    // flush writes the announcements made before it with the counts).
    let id: uuid::Uuid = key_id.parse().unwrap();
    eventually("every use flushed", || async {
        let hours = s
            .store
            .usage_hours(id, common::t0(), common::t0() + Duration::hours(2))
            .await
            .unwrap();
        hours.iter().map(|h| h.allowed).sum::<u64>() == 8
    })
    .await;
    let events = s.get(&path, &s.root_key).await.body["events"].clone();
    assert_eq!(events.as_array().unwrap().len(), 1, "{events}");
    // 7 of the new period's 10 are used; the straggler is in the hour before.
    let used = s
        .get(&format!("/v1/keys/{key_id}/usage"), &s.root_key)
        .await;
    assert_eq!(
        used.body["quota"]["used"].as_u64().unwrap(),
        7,
        "{}",
        used.body
    );
    let buckets = used.body["buckets"].as_array().unwrap();
    assert_eq!(buckets[buckets.len() - 2]["allowed"], 1, "{}", used.body);
    assert_eq!(buckets[buckets.len() - 1]["allowed"], 7, "{}", used.body);
    // And the live counter agrees: three more, then the quota is exhausted.
    for _ in 0..3 {
        s.get("/v1/me", &key).await.assert_status(200);
    }
    s.get("/v1/me", &key)
        .await
        .assert_error(429, "QUOTA_EXCEEDED");
}

#[tokio::test]
async fn the_usage_endpoint_counts_allowed_denied_and_rate_limited_uses_by_hour_and_day() {
    let s = TestServer::start().await;
    let b = s
        .create_agent_with(json!({
            "name": "counted", "scopes": {"slack": ["chat:write"]},
            "key": {"rate_limit": {"limit": 1, "period_s": 3600, "burst": 2}, "quota": {"limit": 1000, "period": "day"}}
        }))
        .await;
    let key_id = b["key"]["id"].as_str().unwrap().to_string();
    let key = b["api_key"].as_str().unwrap().to_string();
    s.get("/v1/me", &key).await.assert_status(200);
    s.get("/v1/me", &key).await.assert_status(200);
    s.get("/v1/me", &key)
        .await
        .assert_error(429, "RATE_LIMITED");
    // A denial of a known key counts as denied (IP allowlist set on a second call path:
    // simplest is a paused agent).
    let agent_id = b["agent"]["id"].as_str().unwrap();
    s.post(
        &s.org_path(&format!("/agents/{agent_id}/pause")),
        &s.root_key,
        json!({}),
    )
    .await;
    s.get(&s.org_path(""), &key)
        .await
        .assert_error(403, "AGENT_PAUSED");

    let hourly = s
        .get(
            &format!(
                "/v1/keys/{key_id}/usage?since=2026-11-23T08:00:00Z&until=2026-11-23T11:00:00Z"
            ),
            &s.root_key,
        )
        .await;
    let u = hourly.assert_status(200);
    assert_eq!(u["key_id"], key_id.as_str());
    assert_eq!(
        u["total"],
        json!({"allowed": 2, "denied": 1, "rate_limited": 1})
    );
    let buckets = u["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 3, "08:00, 09:00 and 10:00");
    assert_eq!(buckets[2]["start"], "2026-11-23T10:00:00.000Z");
    assert_eq!(buckets[2]["allowed"], 2);
    assert_eq!(buckets[0]["allowed"], 0);
    assert_eq!(u["quota"]["used"], 2);
    assert_eq!(u["quota"]["remaining"], 998);

    let daily = s
        .get(
            &format!("/v1/keys/{key_id}/usage?granularity=day"),
            &s.root_key,
        )
        .await;
    let d = daily.assert_status(200);
    assert_eq!(d["buckets"].as_array().unwrap().len(), 30);
    assert_eq!(d["buckets"][29]["start"], "2026-11-23T00:00:00.000Z");
    assert_eq!(d["total"]["allowed"], 2);

    // The counts survive the flush to the store unchanged (no double counting).
    eventually("last_used_at after a flush", || async {
        !s.get(&format!("/v1/keys/{key_id}"), &s.root_key).await.body["last_used_at"].is_null()
    })
    .await;
    let again = s
        .get(
            &format!(
                "/v1/keys/{key_id}/usage?since=2026-11-23T08:00:00Z&until=2026-11-23T11:00:00Z"
            ),
            &s.root_key,
        )
        .await;
    assert_eq!(
        again.body["total"],
        json!({"allowed": 2, "denied": 1, "rate_limited": 1})
    );
}

#[tokio::test]
async fn the_usage_endpoint_validates_its_query_and_scope() {
    let s = TestServer::start().await;
    let (_, key_json, key) = s
        .create_agent("plain", json!({"slack": ["chat:write"]}))
        .await;
    let id = key_json["id"].as_str().unwrap();
    s.get(&format!("/v1/keys/{id}/usage"), &key)
        .await
        .assert_error(403, "INSUFFICIENT_SCOPE");
    s.get(
        &format!("/v1/keys/{id}/usage?granularity=week"),
        &s.root_key,
    )
    .await
    .assert_error(400, "VALIDATION_ERROR");
    s.get(&format!("/v1/keys/{id}/usage?since=yesterday"), &s.root_key)
        .await
        .assert_error(400, "VALIDATION_ERROR");
    s.get(
        &format!("/v1/keys/{id}/usage?since=2026-11-23T10:00:00Z&until=2026-11-23T09:00:00Z"),
        &s.root_key,
    )
    .await
    .assert_error(400, "VALIDATION_ERROR");
    s.get(
        &format!("/v1/keys/{id}/usage?since=2020-01-01T00:00:00Z"),
        &s.root_key,
    )
    .await
    .assert_error(400, "VALIDATION_ERROR");
    let r = s.get(&format!("/v1/keys/{id}/usage"), &s.root_key).await;
    assert!(r.assert_status(200)["quota"].is_null());
    let buckets = r.body["buckets"].as_array().unwrap();
    assert_eq!(buckets.len(), 24);
    assert_eq!(buckets[23]["start"], "2026-11-23T10:00:00.000Z");
}

/// A quota removed and set again in the same period starts from what the store counted in
/// between, not from the old counter, also when the key's rate limit is shared through Redis
/// (that path takes the quota without the in-memory shortcut). Without Redis the node falls
/// back to its own limiter, along the same path. On PostgreSQL the store's counter starts
/// again from the uses it has counted, which the node changing the quota flushes first.
#[tokio::test]
async fn a_quota_removed_and_set_again_counts_the_uses_in_between_on_the_redis_path() {
    let url = std::env::var("KEYWARD_TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_string());
    let s = TestServer::start_configured(|c| {
        c.rate_limit_backend = keyward_server::RateLimitBackend::Redis(Arc::new(
            keyward_server::redis_limiter::RedisLimiter::new(&url).unwrap(),
        ));
    })
    .await;
    let b = s
        .create_agent_with(json!({
            "name": "requota",
            "scopes": {"slack": ["chat:write"]},
            "key": {
                "rate_limit": {"limit": 1000, "period_s": 60, "burst": 1000},
                "quota": {"limit": 2, "period": "day"}
            }
        }))
        .await;
    let key_id = b["key"]["id"].as_str().unwrap();
    let key = b["api_key"].as_str().unwrap();
    for _ in 0..2 {
        s.get("/v1/me", key).await.assert_status(200);
    }
    s.get("/v1/me", key)
        .await
        .assert_error(429, "QUOTA_EXCEEDED");
    let path = format!("/v1/keys/{key_id}");
    s.patch(&path, &s.root_key, json!({"quota": null}))
        .await
        .assert_status(200);
    s.get("/v1/me", key).await.assert_status(200);
    s.patch(
        &path,
        &s.root_key,
        json!({"quota": {"limit": 5, "period": "day"}}),
    )
    .await
    .assert_status(200);
    // Three allowed uses so far today (the refused one is not a use of the quota): this is
    // the fourth.
    let v = s
        .post("/v1/keys/verify", &s.root_key, json!({"key": key}))
        .await;
    assert_eq!(v.body["quota"]["used"], 4, "{}", v.body);
}

/// `GET /v1/me` is itself a use of the calling key: it shows that use as the key's
/// `last_used_at` (what the key's own record shows once the use is flushed), not the value the
/// verify cache took from the store when it cached the key (none, for a key never used before).
#[tokio::test]
async fn me_shows_its_own_request_as_the_keys_last_use() {
    let s = TestServer::start().await;
    let (_, key, api_key) = s
        .create_agent("diagnosed", json!({"slack": ["chat:write"]}))
        .await;
    let kid = key["id"].as_str().unwrap().to_string();
    assert!(key["last_used_at"].is_null(), "a new key has no use");

    let first = s.get("/v1/me", &api_key).await;
    let now = keyward_proto::ts::format(&s.clock.now());
    assert_eq!(first.assert_status(200)["key"]["last_used_at"], json!(now));

    // Later, with the key cached all along: the later request is the latest use.
    s.advance(Duration::minutes(5));
    let later = s.get("/v1/me", &api_key).await;
    let now = keyward_proto::ts::format(&s.clock.now());
    assert_eq!(later.assert_status(200)["key"]["last_used_at"], json!(now));
    // And the key's record agrees once the use is flushed.
    flushed(&s, &kid).await;
}

/// A flush run for a request (a quota changed on a shared store) is not lost when the request
/// is: dropped after its first poll, as hyper drops a handler whose client went away, the flush
/// still writes the counts it took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_usage_flush_whose_caller_goes_away_still_writes_its_counts() {
    use keyward_store::Store;
    let common::Bare {
        state,
        store,
        clock,
        org,
        root: token,
        dir: _dir,
        ..
    } = common::Bare::start().await;
    let digest = keyward_core::token::TokenDigest::of(token.expose());
    let key = store
        .find_key_by_digest(&digest)
        .await
        .unwrap()
        .unwrap()
        .key;
    let live = state.meter.state(key.id, org.id);
    for _ in 0..3 {
        state
            .meter
            .record(&live, keyward_server::usage::Use::Allowed, clock.now_ms());
    }
    // This catches a flush run in the caller's own future only while the SQLite store's write
    // is asynchronous (sqlx): the first poll takes the counts and then waits for the write. A
    // store whose write completed within one poll would pass either way.
    let mut flush = Box::pin(state.flush_usage());
    std::future::poll_fn(|cx| {
        let _ = std::future::Future::poll(flush.as_mut(), cx);
        std::task::Poll::Ready(())
    })
    .await;
    drop(flush);
    let (since, until) = (
        clock.now() - Duration::hours(1),
        clock.now() + Duration::hours(1),
    );
    eventually("the dropped flush's counts are written", || async {
        let hours = store.usage_hours(key.id, since, until).await.unwrap();
        hours.iter().map(|h| h.allowed).sum::<u64>() == 3
    })
    .await;
}

/// A graceful shutdown's final flush waits for the work requests handed off: a use counted by a
/// task still running when the last request ended (a quota unit being taken for a client that
/// left) is in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_flush_waits_for_work_handed_off_by_requests() {
    use keyward_store::Store;
    let bare = common::Bare::start().await;
    let (state, store, clock) = (&bare.state, &bare.store, &bare.clock);
    let root = bare.root_snapshot().await;
    let (key, live) = (&root.key, root.live.clone());
    let go = Arc::new(tokio::sync::Notify::new());
    let (gate, counting, now_ms) = (go.clone(), state.clone(), clock.now_ms());
    let handed_off = state.detach(async move {
        gate.notified().await;
        counting
            .meter
            .record(&live, keyward_server::usage::Use::Allowed, now_ms);
    });
    let finishing = tokio::spawn({
        let state = state.clone();
        async move { state.finish(std::time::Duration::from_secs(10)).await }
    });
    // Real time, so that without the wait the flushes would be long done (the task's use then
    // missing from the store); with it, nothing can finish before the task is let go.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    assert!(!finishing.is_finished(), "the shutdown waits for the task");
    go.notify_one();
    finishing.await.unwrap();
    assert!(handed_off.is_finished());
    let (since, until) = (
        clock.now() - Duration::hours(1),
        clock.now() + Duration::hours(1),
    );
    let hours = store.usage_hours(key.id, since, until).await.unwrap();
    assert_eq!(hours.iter().map(|h| h.allowed).sum::<u64>(), 1);
}

/// A graceful shutdown's final flushes are each given up on after their bound when the store
/// hangs, rather than hanging the shutdown with it; a usage flush given up on does not keep the
/// pending denials from being written after it. PostgreSQL only (the usage tables are locked to
/// hold the flush; SQLite's writes give up on a lock by themselves).
#[tokio::test]
async fn the_final_flushes_give_up_on_a_store_that_hangs() {
    use keyward_core::model::{AuditFilter, Page};
    use keyward_server::decisions::Decision;
    use sqlx::Connection;
    let Some((store, url, schema)) = common::postgres_store().await else {
        eprintln!("skipped: needs KEYWARD_TEST_DATABASE_URL (only PostgreSQL can hold a flush)");
        return;
    };
    let clock = Arc::new(keyward_core::clock::ManualClock::new(common::t0()));
    let (org, root) = keyward_server::bootstrap::create_org(store.as_ref(), clock.as_ref(), "o")
        .await
        .unwrap();
    let state = common::Bare::state_over(store.clone(), clock.clone());
    let p = state
        .cache
        .lookup(store.as_ref(), &state.meter, root.expose(), clock.now_ms())
        .await
        .unwrap()
        .unwrap();
    let mut lock = sqlx::postgres::PgConnection::connect(&url).await.unwrap();
    // First the usage tables are held: the decisions are still written after the usage flush
    // is given up on. Then the audit table too: the decisions' flush has a bound of its own.
    for (code, held, written) in [
        ("AGENT_PAUSED", "usage_hourly, key_last_used", Some(1)),
        // (Whether a write given up on lands once the lock goes is up to the store: not asked.)
        (
            "KEY_EXPIRED",
            "usage_hourly, key_last_used, audit_events",
            None,
        ),
    ] {
        state
            .meter
            .record(&p.live, keyward_server::usage::Use::Allowed, clock.now_ms());
        state.decisions.record(Decision {
            key: &p.key,
            action: "auth.denied",
            code,
            client_ip: None,
            request_id: None,
            trace: Default::default(),
            method: None,
            path: None,
            at: clock.now(),
        });
        // The schema is named each time: a rollback undoes a `SET` made in its transaction.
        sqlx::raw_sql(&format!(
            "SET search_path TO \"{schema}\"; BEGIN; LOCK TABLE {held} IN ACCESS EXCLUSIVE MODE;"
        ))
        .execute(&mut lock)
        .await
        .unwrap();
        // Without the bounds the flushes would wait for the lock, held until after this.
        let finished = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            state.finish(std::time::Duration::from_millis(500)),
        )
        .await;
        sqlx::raw_sql("ROLLBACK").execute(&mut lock).await.unwrap();
        assert!(finished.is_ok(), "the shutdown hung with {held} held");
        let Some(written) = written else { continue };
        let denied = store
            .list_audit(
                org.id,
                &AuditFilter {
                    action: Some("auth.denied".into()),
                    ..Default::default()
                },
                Page {
                    limit: 10,
                    offset: 0,
                },
            )
            .await
            .unwrap();
        assert_eq!(
            denied
                .iter()
                .filter(|e| e.error_code.as_deref() == Some(code))
                .count(),
            written,
            "{code}: the denial written after the usage flush was given up on"
        );
    }
    lock.close().await.unwrap();
    common::drop_schema(&url, &schema);
}

/// Handed-off admissions are bounded: with `DETACHED_MAX` of them running (a store stalled
/// while clients keep asking), a use that must go through the store is answered `503` without
/// taking anything; with one place free it is admitted, counted from nothing taken. Other
/// handed-off work (a key write, a flush) takes no admission's place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admissions_through_the_store_are_refused_while_too_many_are_handed_off() {
    use keyward_core::model::{Quota, QuotaPeriod};
    let bare = common::Bare::start().await;
    let (state, clock) = (&bare.state, &bare.clock);
    let root = bare.root_snapshot().await;
    // A quota's first use in a period reads the store: the admission is handed off.
    let mut metered = (*root).clone();
    metered.key.quota = Some(Quota {
        limit: 10,
        period: QuotaPeriod::Day,
    });
    let metered = Arc::new(metered);
    let (release, mut released) = tokio::sync::watch::channel(false);
    let other = state.detach(async move {
        let _ = released.wait_for(|r| *r).await;
    });
    let mut held: Vec<_> = (0..keyward_server::DETACHED_MAX)
        .map(|_| {
            state
                .detached_admissions
                .clone()
                .try_acquire_owned()
                .unwrap()
        })
        .collect();
    let (_, refused) = keyward_server::auth::admit(state, &metered, clock.now_ms()).await;
    assert_eq!(
        refused.unwrap_err().code,
        keyward_proto::ErrorCode::StoreUnavailable
    );
    held.pop();
    let (_, admitted) = keyward_server::auth::admit(state, &metered, clock.now_ms()).await;
    assert_eq!(
        admitted.unwrap().unwrap().used,
        1,
        "the refusal took nothing"
    );
    release.send(true).unwrap();
    other.await.unwrap();
}
