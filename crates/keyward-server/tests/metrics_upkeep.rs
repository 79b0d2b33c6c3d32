//! The server's metrics recorder keeps every histogram sample until it is folded into its
//! buckets; `ops::metrics_upkeep`, which `serve` runs, does that on an interval, so a server that
//! nobody scrapes does not grow with every request it answers.
//!
//! Alone in its binary: it counts every byte the process holds through the global allocator.

use std::time::Duration;

use axum::http::Method;
use keyward_server::ops;
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

#[tokio::test(start_paused = true)]
async fn request_latency_samples_are_folded_away_on_an_interval_without_a_scrape() {
    // As `serve` does first: install the recorder (handles taken before it are no-ops).
    ops::prometheus();
    // The route's handles are registered on first use: not part of what is measured.
    answer_requests(1);
    ops::upkeep();
    let region = Region::new(GLOBAL);

    answer_requests(SAMPLES);
    let pending = held(&region);
    // The hazard itself: each sample is held (8 bytes, in blocks) until upkeep or a scrape.
    assert!(
        pending >= (SAMPLES * 8) as isize,
        "{SAMPLES} samples held only {pending} bytes"
    );

    let task = tokio::spawn(ops::metrics_upkeep(ops::METRICS_UPKEEP_INTERVAL));
    // The first upkeep runs at once.
    tokio::task::yield_now().await;
    answer_requests(LATER);
    let after_first = held(&region);
    assert!(
        after_first < pending / 10,
        "after upkeep {after_first} bytes still held of {pending}"
    );

    // And it keeps running: another batch is gone one interval later, with no scrape between.
    answer_requests(SAMPLES);
    assert!(held(&region) >= after_first + (SAMPLES * 8) as isize);
    tokio::time::sleep(ops::METRICS_UPKEEP_INTERVAL + Duration::from_millis(1)).await;
    answer_requests(LATER);
    let after_second = held(&region);
    assert!(
        after_second < pending / 10,
        "after the second upkeep {after_second} bytes still held"
    );
    task.abort();

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
    assert_eq!(count, Some(2 * (SAMPLES + LATER) as u64 + 1));
}
