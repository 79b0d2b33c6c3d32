//! Counters of the hot path, kept per thread and published to the metrics registry when
//! `/metrics` is rendered (and on every flush tick).
//!
//! A `metrics::Counter` is one shared atomic: two cores verifying at once bounce its cache line
//! between them on every increment, and the verify path counts two or three things per request.
//! Here each thread counts in its own block, which only that thread writes (so an increment is a
//! plain load and store, no locked instruction), and `publish` sums the blocks into the
//! registered counters. What `/metrics` shows is exact at the moment it is rendered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use keyward_proto::ErrorCode;
use metrics::Counter;

/// One hot-path counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hot {
    CacheHit,
    CacheMiss,
    CacheNegativeHit,
    RateAllowed,
    RateRefused,
    /// Decisions the local limiter made because the shared (Redis) one could not.
    RateFallback,
    /// A verification by outcome: an error code, or `None` for `VALID`.
    Verification(Option<ErrorCode>),
}

const FIXED: usize = 6;

impl Hot {
    fn slot(self) -> usize {
        match self {
            Hot::CacheHit => 0,
            Hot::CacheMiss => 1,
            Hot::CacheNegativeHit => 2,
            Hot::RateAllowed => 3,
            Hot::RateRefused => 4,
            Hot::RateFallback => 5,
            Hot::Verification(None) => FIXED,
            Hot::Verification(Some(c)) => {
                FIXED + 1 + ErrorCode::ALL.iter().position(|x| *x == c).unwrap_or(0)
            }
        }
    }
}

impl Hot {
    /// Every counter, in slot order (a unit test holds the order to [`Hot::slot`]).
    fn all() -> impl Iterator<Item = Hot> {
        [
            Hot::CacheHit,
            Hot::CacheMiss,
            Hot::CacheNegativeHit,
            Hot::RateAllowed,
            Hot::RateRefused,
            Hot::RateFallback,
            Hot::Verification(None),
        ]
        .into_iter()
        .chain(ErrorCode::ALL.iter().map(|c| Hot::Verification(Some(*c))))
    }

    /// The registered series this counter is published to.
    fn series(self) -> Counter {
        match self {
            Hot::CacheHit => metrics::counter!("keyward_verify_cache_total", "result" => "hit"),
            Hot::CacheMiss => metrics::counter!("keyward_verify_cache_total", "result" => "miss"),
            Hot::CacheNegativeHit => {
                metrics::counter!("keyward_verify_cache_total", "result" => "negative_hit")
            }
            Hot::RateAllowed => {
                metrics::counter!("keyward_ratelimit_decisions_total", "allowed" => "true")
            }
            Hot::RateRefused => {
                metrics::counter!("keyward_ratelimit_decisions_total", "allowed" => "false")
            }
            Hot::RateFallback => metrics::counter!("keyward_ratelimit_fallback_total"),
            Hot::Verification(None) => {
                metrics::counter!("keyward_verifications_total", "code" => "VALID")
            }
            Hot::Verification(Some(c)) => {
                metrics::counter!("keyward_verifications_total", "code" => c.as_str())
            }
        }
    }
}

/// One thread's counts, by slot. Only its thread writes them.
struct Block(Vec<AtomicU64>);

/// The hot path's counters.
pub struct Stats {
    /// Every live thread's block.
    blocks: Mutex<Vec<Arc<Block>>>,
    /// What threads that have exited counted.
    retired: Block,
    /// The registered series, by slot.
    handles: Vec<Counter>,
}

/// A thread's block; on thread exit its counts move to `retired` so none are lost.
struct Mine(Arc<Block>);

impl Drop for Mine {
    fn drop(&mut self) {
        let s = stats();
        // Moved under the blocks' lock, which `totals` holds too: a sum never sees the counts
        // both in the block and in `retired`.
        let mut blocks = s.blocks.lock().unwrap_or_else(|e| e.into_inner());
        for (slot, c) in self.0 .0.iter().enumerate() {
            s.retired.0[slot].fetch_add(c.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        blocks.retain(|b| !Arc::ptr_eq(b, &self.0));
    }
}

thread_local! {
    static MINE: Mine = {
        let s = stats();
        let b = Arc::new(s.block());
        s.blocks.lock().unwrap_or_else(|e| e.into_inner()).push(b.clone());
        Mine(b)
    };
}

impl Stats {
    fn block(&self) -> Block {
        Block((0..self.handles.len()).map(|_| AtomicU64::new(0)).collect())
    }

    /// Counts one event.
    #[inline]
    pub fn add(&self, c: Hot) {
        let slot = c.slot();
        // Single writer: a load and a store cannot lose an increment. During thread teardown
        // (no thread-local left) the event goes to `retired` instead.
        if MINE
            .try_with(|m| {
                let x = &m.0 .0[slot];
                x.store(x.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            })
            .is_err()
        {
            self.retired.0[slot].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The sum of one counter over every thread.
    pub fn total(&self, c: Hot) -> u64 {
        self.totals()[c.slot()]
    }

    fn totals(&self) -> Vec<u64> {
        let blocks = self.blocks.lock().unwrap_or_else(|e| e.into_inner());
        let mut sums: Vec<u64> = self
            .retired
            .0
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .collect();
        for b in blocks.iter() {
            for (sum, c) in sums.iter_mut().zip(&b.0) {
                *sum += c.load(Ordering::Relaxed);
            }
        }
        sums
    }

    /// Writes every total into its registered counter.
    pub fn publish(&self) {
        for (h, sum) in self.handles.iter().zip(self.totals()) {
            h.absolute(sum);
        }
    }
}

/// The counters, registered with the process recorder on first use.
pub fn stats() -> &'static Stats {
    static STATS: OnceLock<Stats> = OnceLock::new();
    STATS.get_or_init(|| {
        crate::ops::prometheus();
        // Each slot's series, in slot order.
        let handles: Vec<Counter> = Hot::all().map(Hot::series).collect();
        Stats {
            blocks: Mutex::default(),
            retired: Block((0..handles.len()).map(|_| AtomicU64::new(0)).collect()),
            handles,
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// `publish` writes slot i's total into handle i, and the handles are built in the order of
    /// `Hot::all`: that order must be the slots' own, one slot each, or a count would be
    /// published under another counter's name.
    #[test]
    fn every_counter_has_its_own_slot_in_publishing_order() {
        for (i, hot) in Hot::all().enumerate() {
            assert_eq!(hot.slot(), i, "{hot:?}");
        }
        assert_eq!(Hot::all().count(), stats().handles.len());
        assert_eq!(Hot::all().count(), FIXED + 1 + ErrorCode::ALL.len());
    }

    /// What `/metrics` shows under a counter's name is that counter's count (a code no
    /// verification ever ends with, so no other test counts it; a misplaced handle would show
    /// another counter's count here).
    #[test]
    fn a_count_is_published_under_its_own_name() {
        let s = stats();
        let hot = Hot::Verification(Some(ErrorCode::MeRequiresAgentKey));
        for _ in 0..3 {
            s.add(hot);
        }
        s.publish();
        let rendered = crate::ops::prometheus().render();
        let line = rendered
            .lines()
            .find(|l| l.starts_with("keyward_verifications_total{code=\"ME_REQUIRES_AGENT_KEY\"}"))
            .unwrap_or_else(|| panic!("no series in {rendered}"));
        assert_eq!(line.rsplit(' ').next(), Some("3"), "{line}");
    }

    #[test]
    fn counts_from_many_threads_add_up() {
        let s = stats();
        let c = Hot::Verification(Some(ErrorCode::SignatureReplayed));
        let before = s.total(c);
        std::thread::scope(|scope| {
            for _ in 0..8 {
                scope.spawn(|| {
                    for _ in 0..1000 {
                        s.add(c);
                    }
                });
            }
        });
        assert_eq!(s.total(c) - before, 8000);
    }
}
