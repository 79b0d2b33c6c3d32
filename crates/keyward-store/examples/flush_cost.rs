//! How long one usage flush takes on SQLite: `n` keys' counts and last uses (default 10,000,
//! what a node verifying 10,000 keys evenly writes every second), in the steady state where
//! every row already exists. Prints the min, median and max of 20 flushes.
//!
//! Run: `cargo run --release -p keyward-store --example flush_cost -- 10000`.

use std::time::Instant;

use keyward_store::{sqlite::SqliteStore, Store, UsageDelta};
use uuid::Uuid;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = match std::env::args().nth(1) {
        Some(s) => s.parse()?,
        None => 10_000,
    };
    let dir = tempfile::tempdir()?;
    let store = SqliteStore::open(&dir.path().join("keyward.db")).await?;
    let org_id = Uuid::now_v7();
    let at = keyward_core::clock::from_millis(1_700_000_000_000);
    let hour = keyward_core::clock::from_millis(1_700_000_000_000 / 3_600_000 * 3_600_000);
    // Usage rows carry no foreign key: the keys need not exist.
    let keys: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let deltas: Vec<UsageDelta> = keys
        .iter()
        .map(|&key_id| UsageDelta {
            key_id,
            org_id,
            hour,
            allowed: 10,
            denied: 0,
            rate_limited: 0,
        })
        .collect();
    let last_used: Vec<_> = keys.iter().map(|&k| (k, at)).collect();
    // The first flush inserts the rows; the timed ones update them.
    store.record_usage(&deltas, &last_used, &[]).await?;
    let mut ms: Vec<f64> = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        store.record_usage(&deltas, &last_used, &[]).await?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    println!(
        "{n} keys: min {:.1} ms, median {:.1} ms, max {:.1} ms per flush",
        ms[0],
        ms[ms.len() / 2],
        ms[ms.len() - 1]
    );
    store.close().await;
    Ok(())
}
