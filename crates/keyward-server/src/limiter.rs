//! The local rate limiter (API.md §6.2): one GCRA state (a theoretical arrival time) per bucket,
//! in sharded maps so concurrent keys rarely contend. A derived key draws from its parent's
//! bucket, so deriving sub-keys can never multiply what a key may do.

use std::hash::{BuildHasher, Hash};
use std::sync::Mutex;

use keyward_core::gcra::{Decision, Gcra};
use rustc_hash::{FxBuildHasher, FxHashMap};
use uuid::Uuid;

const SHARDS: usize = 64;

/// Per-bucket GCRA state, keyed by key id (rate limits) or by client IP (failed-auth throttle).
///
/// The maps use FxHash: their keys are server-generated ids or addresses the throttle already
/// bounds, so a DoS-resistant hasher buys nothing here and SipHash was a visible share of the
/// verify path's time.
#[derive(Debug)]
pub struct Limiter<K = Uuid> {
    shards: Vec<Mutex<FxHashMap<K, i64>>>,
}

impl<K> Default for Limiter<K> {
    fn default() -> Self {
        Limiter {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(FxHashMap::default()))
                .collect(),
        }
    }
}

impl<K: Hash + Eq + Copy> Limiter<K> {
    fn shard(&self, k: &K) -> &Mutex<FxHashMap<K, i64>> {
        let h = FxBuildHasher.hash_one(k);
        // The high bits: FxHash's low bits are weak for keys that differ only at the end.
        &self.shards[(h >> 58) as usize % SHARDS]
    }

    /// Decides one request for `bucket` at `now_ns`, recording it when allowed.
    pub fn check(&self, bucket: K, gcra: &Gcra, now_ns: i64) -> Decision {
        let mut map = self
            .shard(&bucket)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let tat = map.get(&bucket).copied().unwrap_or(0);
        let d = gcra.check(tat, now_ns);
        if d.allowed {
            map.insert(bucket, d.tat_ns);
        }
        d
    }

    /// Whether the next request for `bucket` would be refused, and for how long (ns), without
    /// recording anything.
    pub fn blocked_for(&self, bucket: K, gcra: &Gcra, now_ns: i64) -> Option<i64> {
        let map = self
            .shard(&bucket)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let tat = map.get(&bucket).copied()?;
        let d = gcra.check(tat, now_ns);
        (!d.allowed).then_some(d.retry_after_ns)
    }

    /// Forgets buckets that are full again (their state equals a fresh one), bounding memory.
    pub fn prune(&self, now_ns: i64) {
        for shard in &self.shards {
            shard
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|_, tat| *tat > now_ns);
        }
    }
}
