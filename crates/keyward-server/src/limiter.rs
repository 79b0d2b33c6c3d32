//! The local rate limiter (API.md §6.2): one GCRA state (a theoretical arrival time) per bucket,
//! in sharded maps so concurrent keys rarely contend. A derived key draws from its parent's
//! bucket, so deriving sub-keys can never multiply what a key may do.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

use keyward_core::gcra::{Decision, Gcra};
use uuid::Uuid;

const SHARDS: usize = 64;

/// Per-bucket GCRA state, keyed by key id (rate limits) or by client IP (failed-auth throttle).
#[derive(Debug)]
pub struct Limiter<K = Uuid> {
    shards: Vec<Mutex<HashMap<K, i64>>>,
}

impl<K> Default for Limiter<K> {
    fn default() -> Self {
        Limiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl<K: Hash + Eq + Copy> Limiter<K> {
    fn shard(&self, k: &K) -> &Mutex<HashMap<K, i64>> {
        let mut h = DefaultHasher::new();
        k.hash(&mut h);
        &self.shards[(h.finish() % SHARDS as u64) as usize]
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
