//! Cache coherence across nodes (DESIGN.md "The hot path", issue: many nodes).
//!
//! Writes through this node drop its verify cache at once (`AppState::on_key_change`). Writes
//! through other nodes reach it through the store's [`ChangeWatch`]: on PostgreSQL, a NOTIFY sent
//! in the writing transaction, heard on a dedicated LISTEN connection, drops the cache within a
//! round trip of the commit. The watch proves its connection live with a heartbeat every
//! `heartbeat` when quiet; each signal or heartbeat moves `synced`, the instant up to which this
//! node's caches are known to reflect every write.
//!
//! When the watch is down (the store restarted, the network failed), `synced` stops moving. For
//! `max_staleness` the node keeps answering from its cache (writes made meanwhile may be missed
//! for that long: that is the bound it promises); after that every lookup reads the store, and
//! if the store cannot answer either, the request fails with `503 STORE_UNAVAILABLE` rather than
//! honour a key that may have been revoked. `/readyz` reports not-ready for as long. When the
//! watch reconnects it drops every cache (anything may have changed while it was away) before it
//! reports the node in sync again.
//!
//! A store only this process writes (SQLite) has no watch, and its caches are always in sync.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use keyward_store::Signal;

use crate::AppState;

/// The sync state the hot path reads. Time here is monotonic (milliseconds since the node
/// started), so a wall clock stepped back by NTP cannot stretch the staleness bound.
#[derive(Debug)]
pub struct Coherence {
    epoch: Instant,
    /// Milliseconds since `epoch` up to which the caches reflect every write.
    synced_ms: AtomicI64,
    /// The longest a node answers from its cache without a live watch.
    max_staleness_ms: i64,
    /// Whether the store is shared, so that staleness applies at all.
    shared: bool,
}

impl Coherence {
    pub fn new(shared: bool, max_staleness: Duration) -> Coherence {
        Coherence {
            epoch: Instant::now(),
            synced_ms: AtomicI64::new(0),
            max_staleness_ms: max_staleness.as_millis().min(i64::MAX as u128) as i64,
            shared,
        }
    }

    fn elapsed_ms(&self) -> i64 {
        self.epoch.elapsed().as_millis().min(i64::MAX as u128) as i64
    }

    /// Whether cached answers may be served now (always, on a store only this node writes).
    #[inline]
    pub fn fresh(&self) -> bool {
        !self.shared || self.lag_ms() <= self.max_staleness_ms
    }

    /// How far behind the caches may be: zero on a store only this process writes.
    pub fn lag_ms(&self) -> i64 {
        if self.shared {
            self.elapsed_ms()
                .saturating_sub(self.synced_ms.load(Ordering::Acquire))
                .max(0)
        } else {
            0
        }
    }

    fn synced(&self) {
        self.synced_ms
            .fetch_max(self.elapsed_ms(), Ordering::AcqRel);
    }
}

/// How long the watch waits quietly before proving its connection with a round trip: a quarter
/// of the staleness bound (so a dead connection is noticed well within it), at most a second.
pub fn heartbeat(max_staleness: Duration) -> Duration {
    (max_staleness / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// Runs the change watch of a shared store until the server stops.
pub async fn run(state: AppState) {
    let mut watch = loop {
        match state.store.watch_changes().await {
            Ok(Some(w)) => break w,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start the change watch; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let wait = heartbeat(state.config.cache.max_staleness);
    let mut backoff = Duration::from_millis(100);
    let mut down_since: Option<Instant> = None;
    loop {
        match watch.next(wait).await {
            Ok(signal) => {
                if signal != Signal::Quiet {
                    state.cache.invalidate_all();
                    let source = if signal == Signal::Changed {
                        "remote_change"
                    } else {
                        "resumed"
                    };
                    metrics::counter!("keyward_cache_invalidations_total", "source" => source)
                        .increment(1);
                }
                state.cache.coherence.synced();
                metrics::gauge!("keyward_change_watch_up").set(1.0);
                if let Some(since) = down_since.take() {
                    tracing::info!(
                        down_ms = since.elapsed().as_millis() as u64,
                        "change watch is back; caches dropped and in sync again"
                    );
                }
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                metrics::gauge!("keyward_change_watch_up").set(0.0);
                metrics::counter!("keyward_change_watch_errors_total").increment(1);
                if down_since.is_none() {
                    down_since = Some(Instant::now());
                    tracing::warn!(
                        error = %e,
                        max_staleness_ms = state.cache.coherence.max_staleness_ms,
                        "change watch lost; cached answers are served for at most the staleness bound"
                    );
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}
