//! How long the verification path's store read takes on SQLite (a verify-cache miss: a key and
//! its agent and org by digest, `Store::find_key_by_digest`), over `n` keys (default 200,000)
//! that have each been used once (so every key has a usage row and a last use, as after a
//! flush): every key read once, in random order, on one thread. Prints the mean, p50, p99 and
//! max of the reads.
//!
//! Run: `cargo run --release -p keyward-store --example miss_cost -- 200000`.

use std::time::Instant;

use keyward_core::token::TokenKind;
use keyward_store::{conformance, sqlite::SqliteStore, Store, UsageDelta};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 200_000,
    };
    if n == 0 {
        return Err("the number of keys must be at least 1".into());
    }
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&dir.path().join("keyward.db")).await?;
    let org = conformance::org("miss-cost");
    let root = conformance::key(org.id, None, TokenKind::Root);
    store
        .create_org(&org, &root, &conformance::event(org.id, "org.create"))
        .await?;
    let mut keys = Vec::with_capacity(n);
    while keys.len() < n {
        let batch: Vec<_> = (0..(n - keys.len()).min(20_000))
            .map(|_| conformance::key(org.id, None, TokenKind::Root))
            .collect();
        store
            .import_keys(&batch, &conformance::event(org.id, "key.import"))
            .await?;
        keys.extend(batch);
    }
    // One use of every key, flushed as the meter flushes: a count for the hour and a last use.
    let at = keyward_core::clock::truncate_to_millis(chrono::Utc::now());
    let hour = keyward_core::quota::period_start(keyward_core::model::QuotaPeriod::Hour, at);
    let deltas: Vec<UsageDelta> = keys
        .iter()
        .map(|k| UsageDelta {
            key_id: k.id,
            org_id: org.id,
            hour,
            allowed: 1,
            denied: 0,
            rate_limited: 0,
        })
        .collect();
    let last_used: Vec<_> = keys.iter().map(|k| (k.id, at)).collect();
    store.record_usage(&deltas, &last_used, &[]).await?;
    // A fixed scattered order: consecutive reads do not land on neighbouring rows.
    let order: Vec<usize> = (0..n).map(|i| i * 7919 % n).collect();
    let mut us: Vec<f64> = Vec::with_capacity(n);
    for &i in &order {
        let t = Instant::now();
        let found = store.find_key_by_digest(&keys[i].digest).await?;
        us.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(found.map(|f| f.key.last_used_at), Some(Some(at)));
    }
    let mean = us.iter().sum::<f64>() / n as f64;
    us.sort_by(f64::total_cmp);
    println!(
        "{n} keys, each read once: mean {mean:.1} us, p50 {:.1} us, p99 {:.1} us, max {:.0} us",
        us[n / 2],
        us[n * 99 / 100],
        us[n - 1]
    );
    println!(
        "db size {} MiB",
        std::fs::metadata(dir.path().join("keyward.db"))?.len() >> 20
    );
    store.close().await;
    Ok(())
}
