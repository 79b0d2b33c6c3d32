//! Criterion benchmark of the hot path: the whole in-process verification of a cached key
//! (validation, parse, hash, cache lookup, every check, limiter, quota, usage increment, decision
//! audit) next to the bare primitive it cannot beat (SHA-256 of the token plus one hash-map lookup
//! over 1,000,000 keys), in the same run so the ratio is meaningful on any machine.
//!
//! Run: `cargo bench -p keyward-server --bench verify`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use keyward_core::clock::{Clock, SystemClock};
use keyward_core::model::{Agent, AgentStatus, AgentType};
use keyward_core::token::{self, Environment, TokenKind};
use keyward_proto as proto;
use keyward_server::auth::RequestContext;
use keyward_server::{AppState, MasterKey, ServerConfig};
use keyward_store::sqlite::SqliteStore;
use keyward_store::Store;
use sha2::{Digest, Sha256};
use uuid::Uuid;

struct Setup {
    state: AppState,
    org_id: Uuid,
    token: String,
    /// Tokens of `MANY` more keys of the same agent, all cached.
    many: Vec<String>,
    _dir: tempfile::TempDir,
}

/// How many keys the many-keys benchmark verifies, each in turn: the load tool's smaller key set.
const MANY: usize = 10_000;

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&dir.path().join("k.db")).await.unwrap());
    let (org, _) = keyward_server::bootstrap::create_org(store.as_ref(), &SystemClock, "bench")
        .await
        .unwrap();
    let config = ServerConfig {
        trusted_proxies: Vec::new(),
        master_key: MasterKey::from_bytes([1; 32]),
        clock: Arc::new(SystemClock) as Arc<dyn Clock>,
        cache: Default::default(),
        usage_flush_interval: Duration::from_secs(1),
        failed_auth_limit: Some(keyward_server::DEFAULT_FAILED_AUTH_LIMIT),
        rate_limit_backend: keyward_server::RateLimitBackend::Local,
    };
    let state = AppState::new(config, store.clone());
    let now = state.now();
    let agent = Agent {
        id: Uuid::now_v7(),
        org_id: org.id,
        name: "bench-agent".into(),
        display_name: None,
        agent_type: AgentType::Agent,
        status: AgentStatus::Active,
        scopes: [("slack".to_string(), vec!["chat:write".to_string()])].into(),
        metadata: Default::default(),
        policy: Default::default(),
        capabilities: vec![],
        did: None,
        owner_user_id: None,
        parent_agent_id: None,
        version: 1,
        created_at: now,
        updated_at: now,
        revoked_at: None,
    };
    // A limit and a quota that never refuse, so the limiter and the quota counter run on every
    // iteration without ending the benchmark early.
    let spec = proto::CreateKeyRequest {
        rate_limit: Some(proto::RateLimit::Custom {
            limit: 1_000_000_000,
            period_s: 1,
            burst: 1_000_000_000,
        }),
        quota: Some(proto::Quota {
            limit: 1_000_000_000_000,
            period: "month".into(),
        }),
        ..Default::default()
    };
    let minted =
        keyward_server::keys::mint(&state, &org, &spec, TokenKind::Agent, Some(&agent), now)
            .unwrap();
    let event = keyward_core::model::AuditEvent {
        id: Uuid::now_v7(),
        org_id: org.id,
        occurred_at: now,
        action: "agent.create".into(),
        outcome: keyward_core::model::Outcome::Success,
        error_code: None,
        actor_key_id: None,
        actor_agent_id: None,
        target_type: None,
        target_id: None,
        client_ip: None,
        request_id: None,
        trace: Default::default(),
        details: serde_json::json!({}),
    };
    store
        .create_agent(&agent, &minted.key, std::slice::from_ref(&event), None)
        .await
        .unwrap();
    let scopes = minted.key.scopes.to_vec();
    let (keys, many): (Vec<_>, Vec<_>) = (0..MANY)
        .map(|_| {
            let (k, plain) = keyward_core::model::Key::mint(
                org.id,
                Some(agent.id),
                TokenKind::Agent,
                Environment::Live,
                scopes.clone(),
                now,
            )
            .unwrap();
            // The one key's limit and quota, so the limiter and the quota counter run here too.
            let k = keyward_core::model::Key {
                rate_limit: minted.key.rate_limit.clone(),
                quota: minted.key.quota,
                ..k
            };
            (k, plain.expose().to_string())
        })
        .unzip();
    let imported = keyward_core::model::AuditEvent {
        id: Uuid::now_v7(),
        action: "key.import".into(),
        ..event
    };
    store.import_keys(&keys, &imported).await.unwrap();
    Setup {
        state,
        org_id: org.id,
        token: minted.api_key.expose().to_string(),
        many,
        _dir: dir,
    }
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(setup());
    let body = proto::VerifyRequest {
        key: s.token.clone(),
        ..Default::default()
    };
    let ctx = RequestContext::default();
    // Warm the cache and check the path really succeeds.
    let first = rt
        .block_on(keyward_server::verify::verify_key(
            &s.state, s.org_id, &body, &ctx,
        ))
        .unwrap();
    assert_eq!(first.code(), "VALID");

    let mut g = c.benchmark_group("verify");
    // The credential path every request of a cached key takes in the middleware (auth.rs): hash
    // and look the token up, key and agent checks, then the traffic controls (limiter, quota,
    // usage count) under the key's lock. (Signature, constraints and rules are skipped, as in the
    // middleware, because the key has none.)
    let ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    g.bench_function("cached_key_core", |b| {
        b.to_async(&rt).iter(|| async {
            let now_ms = s.state.now_ms();
            let p = keyward_server::auth::lookup(&s.state, black_box(&s.token), now_ms)
                .await
                .unwrap();
            keyward_core::auth::check_key(&p.key, p.agent_status, Some(ip), now_ms, false).unwrap();
            let (_, admitted) = keyward_server::auth::admit(&s.state, &p, now_ms).await;
            admitted.unwrap();
            black_box(p)
        })
    });
    // The verify endpoint's whole work without HTTP: the above plus request validation, the
    // answer and its serialization.
    g.bench_function("cached_key_in_process", |b| {
        b.to_async(&rt).iter(|| async {
            let r = keyward_server::verify::verify_key(&s.state, s.org_id, black_box(&body), &ctx)
                .await
                .unwrap();
            // The handler serializes into a buffer of this size.
            let mut out = Vec::with_capacity(512);
            r.write_json(&mut out);
            black_box(out)
        })
    });

    // The same, for each of 10,000 keys in turn, as under load: their snapshots and live states
    // no longer fit the processor's caches, so this one also shows a verification's memory
    // stalls (the one-key benchmark above reads everything from the first-level cache). The
    // tokens are read in order from one buffer and the request is built afresh each time, as a
    // request arrives in a buffer just read; the cache is filled in a scattered order, so that
    // consecutive keys' snapshots are not neighbours in memory.
    let len = s.many[0].len();
    assert!(s.many.iter().all(|t| t.len() == len));
    let packed: String = s.many.concat();
    let n = s.many.len();
    for i in 0..n {
        let t = &s.many[i * 7919 % n];
        let b = proto::VerifyRequest {
            key: t.clone(),
            ..Default::default()
        };
        let r = rt
            .block_on(keyward_server::verify::verify_key(
                &s.state, s.org_id, &b, &ctx,
            ))
            .unwrap();
        assert_eq!(r.code(), "VALID");
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    g.bench_function("cached_key_in_process_of_10k", |b| {
        b.to_async(&rt).iter(|| async {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % n;
            let body = proto::VerifyRequest {
                key: packed[i * len..(i + 1) * len].to_string(),
                ..Default::default()
            };
            let r = keyward_server::verify::verify_key(&s.state, s.org_id, &body, &ctx)
                .await
                .unwrap();
            let mut out = Vec::with_capacity(512);
            r.write_json(&mut out);
            black_box(out)
        })
    });

    let mut map: HashMap<[u8; 32], u32> = HashMap::with_capacity(1_000_001);
    for i in 0..1_000_000u32 {
        let t = token::generate(Environment::Live, TokenKind::Agent).unwrap();
        map.insert(Sha256::digest(t.expose().as_bytes()).into(), i);
    }
    map.insert(Sha256::digest(s.token.as_bytes()).into(), u32::MAX);
    g.bench_function("bare_sha256_plus_hashmap_lookup_1m", |b| {
        b.iter(|| {
            let d: [u8; 32] = Sha256::digest(black_box(s.token.as_bytes())).into();
            black_box(map.get(&d).copied())
        })
    });
    // The failed-auth throttle's check, which every authenticated request makes before its
    // credential is read: one keyed-hash bucket for an IPv4 address, three for IPv6 (its /64,
    // /56 and /48). The default budget, with the address never having failed.
    let throttle =
        keyward_server::limiter::AuthThrottle::new(keyward_core::gcra::Gcra::new(600, 60, 100));
    for (name, ip) in [
        ("part_throttle_check_ipv4", "203.0.113.7"),
        ("part_throttle_check_ipv6", "2001:db8:1:2::7"),
    ] {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        let now_ns = SystemClock.now_ms() * 1_000_000;
        g.bench_function(name, |b| {
            b.iter(|| black_box(throttle.blocked_for(black_box(ip), now_ns)))
        });
    }
    // The parts, to see where the time of the whole goes.
    g.bench_function("part_digest", |b| {
        b.iter(|| black_box(keyward_core::token::TokenDigest::of(black_box(&s.token))))
    });
    g.bench_function("part_parse", |b| {
        b.iter(|| black_box(token::parse(black_box(&s.token)).is_ok()))
    });
    g.bench_function("part_cache_lookup_with_digest", |b| {
        b.to_async(&rt).iter(|| async {
            black_box(
                s.state
                    .cache
                    .lookup(
                        s.state.store.as_ref(),
                        &s.state.meter,
                        black_box(&s.token),
                        s.state.now_ms(),
                    )
                    .await
                    .unwrap(),
            )
        })
    });
    let prepared = rt
        .block_on(s.state.cache.lookup(
            s.state.store.as_ref(),
            &s.state.meter,
            &s.token,
            s.state.now_ms(),
        ))
        .unwrap()
        .unwrap();
    g.bench_function("part_admit", |b| {
        b.to_async(&rt).iter(|| async {
            let (_, r) = keyward_server::auth::admit(&s.state, &prepared, s.state.now_ms()).await;
            black_box(r.unwrap())
        })
    });
    g.bench_function("part_clock_now_ms", |b| {
        b.iter(|| black_box(s.state.now_ms()))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
