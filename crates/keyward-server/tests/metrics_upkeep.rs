//! The server's metrics recorder keeps every histogram sample until it is folded into its
//! buckets; `ops::metrics_upkeep`, which `serve` runs, does that on an interval, so a server that
//! nobody scrapes does not grow with every request it answers. Checked through `serve` itself,
//! then for the interval.
//!
//! Alone in its binary: it counts every byte the process holds through the global allocator.
#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use keyward_core::clock::ManualClock;
use keyward_server::ops;
use keyward_store::{sqlite::SqliteStore, Store};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<std::alloc::System> = &INSTRUMENTED_SYSTEM;

const SAMPLES: usize = 100_000;

/// Bytes allocated and not yet freed since the region began.
fn held(region: &Region<'_, std::alloc::System>) -> isize {
    let c = region.change();
    c.bytes_allocated as isize - c.bytes_deallocated as isize + c.bytes_reallocated
}

/// One request's worth of metrics, `n` times: what the request layer records.
fn answer_requests(n: usize) {
    for _ in 0..n {
        ops::record(
            "/upkeep-test",
            &Method::GET,
            200,
            Duration::from_micros(250),
        );
    }
}

/// Requests answered after an upkeep. The recorder frees the blocks an upkeep emptied through
/// epoch-based reclamation (`crossbeam-epoch`), when later operations advance the epoch: as
/// the next requests do on a server that is being used.
const LATER: usize = 1_000;

/// The process's metrics are global, and so is the count of bytes held: the two halves run in
/// one test, one after the other.
#[test]
fn request_latency_samples_are_folded_away_on_an_interval_without_a_scrape() {
    // As `serve` does first: install the recorder (handles taken before it are no-ops).
    ops::prometheus();
    // The route's handles are registered on first use: not part of what is measured.
    answer_requests(1);
    ops::upkeep();
    let recorded = serve_folds_the_samples_as_it_starts();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap()
        .block_on(the_upkeep_runs_again_every_interval());

    // The samples were kept, not lost: the scrape shows every one of them.
    let text = ops::prometheus().render();
    let count = text
        .lines()
        .find(|l| {
            l.starts_with("keyward_http_request_duration_seconds_count")
                && l.contains("/upkeep-test")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert_eq!(count, Some(1 + recorded + (SAMPLES + 2 * LATER) as u64));
}

/// `serve` itself runs the upkeep (its first at once): samples recorded before it starts are
/// folded away while nobody scrapes. Without the upkeep task in `serve`, they stay held.
/// Returns how many requests it recorded.
fn serve_folds_the_samples_as_it_starts() -> u64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut recorded = SAMPLES as u64;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(&dir.path().join("keyward.db"))
                .await
                .unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let config = common::quiet_config(Arc::new(ManualClock::new(common::t0())));

        let region = Region::new(GLOBAL);
        answer_requests(SAMPLES);
        let pending = held(&region);
        assert!(
            pending >= (SAMPLES * 8) as isize,
            "{SAMPLES} samples held only {pending} bytes"
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(keyward_server::serve(config, store, listener, async {
            let _ = stopped.await;
        }));
        // What the server holds of its own (its state, its tasks, its connection pool) counts
        // too: 100-120 KB when measured, against 1.6 MB of samples, so half of them is the
        // bound.
        let mut now_held = held(&region);
        for _ in 0..500 {
            answer_requests(LATER);
            recorded += LATER as u64;
            now_held = held(&region);
            if now_held < pending / 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            now_held < pending / 2,
            "serve running, {now_held} bytes still held of {pending}"
        );
        let _ = stop.send(());
        served.await.unwrap().unwrap();
        recorded
    })
}

/// And the task keeps running: another batch is gone one interval later, with no scrape between.
async fn the_upkeep_runs_again_every_interval() {
    let task = tokio::spawn(ops::metrics_upkeep(ops::METRICS_UPKEEP_INTERVAL));
    // The first upkeep runs at once.
    tokio::task::yield_now().await;
    answer_requests(LATER);
    let region = Region::new(GLOBAL);
    answer_requests(SAMPLES);
    let pending = held(&region);
    assert!(pending >= (SAMPLES * 8) as isize);
    tokio::time::sleep(ops::METRICS_UPKEEP_INTERVAL + Duration::from_millis(1)).await;
    answer_requests(LATER);
    let after = held(&region);
    assert!(
        after < pending / 10,
        "after the second upkeep {after} bytes still held of {pending}"
    );
    task.abort();
}
