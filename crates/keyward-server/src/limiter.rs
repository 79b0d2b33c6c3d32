//! The local rate limiter (API.md §6.2): one GCRA state (a theoretical arrival time) per bucket,
//! in sharded maps so concurrent keys rarely contend. A derived key draws from its parent's
//! bucket, so deriving sub-keys can never multiply what a key may do.

use std::collections::HashMap;
use std::sync::Mutex;

use keyward_core::gcra::{Decision, Gcra};
use uuid::Uuid;

const SHARDS: usize = 64;

/// Per-bucket GCRA state.
#[derive(Debug)]
pub struct Limiter {
    shards: Vec<Mutex<HashMap<Uuid, i64>>>,
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl Limiter {
    /// Decides one request for `bucket` at `now_ns`, recording it when allowed.
    pub fn check(&self, bucket: Uuid, gcra: &Gcra, now_ns: i64) -> Decision {
        let shard = &self.shards[(bucket.as_u128() % SHARDS as u128) as usize];
        let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
        let tat = map.get(&bucket).copied().unwrap_or(0);
        let d = gcra.check(tat, now_ns);
        if d.allowed {
            map.insert(bucket, d.tat_ns);
        }
        d
    }
}
