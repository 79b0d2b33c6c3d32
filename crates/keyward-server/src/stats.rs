//! Metric handles of the hot path, registered once. `metrics::counter!` with labels looks the
//! series up in the registry on every call (hashing and allocating its labels); the verify path
//! runs millions of times a second, so it holds its handles instead.

use std::sync::OnceLock;

use keyward_proto::ErrorCode;
use metrics::Counter;

/// The hot path's counters.
pub struct Stats {
    pub cache_hit: Counter,
    pub cache_miss: Counter,
    pub cache_negative_hit: Counter,
    pub ratelimit_allowed: Counter,
    pub ratelimit_refused: Counter,
    /// Decisions the local limiter made because the shared (Redis) one could not.
    pub ratelimit_fallback: Counter,
    /// Verifications by outcome: one per error code (table order), then `VALID`.
    verifications: Vec<Counter>,
}

impl Stats {
    /// The verification counter of an outcome code (`None` = `VALID`).
    pub fn verification(&self, code: Option<ErrorCode>) -> &Counter {
        let i = match code {
            Some(c) => ErrorCode::ALL.iter().position(|x| *x == c).unwrap_or(0),
            None => ErrorCode::ALL.len(),
        };
        &self.verifications[i.min(self.verifications.len() - 1)]
    }
}

/// The handles, registered with the process recorder on first use.
pub fn stats() -> &'static Stats {
    static STATS: OnceLock<Stats> = OnceLock::new();
    STATS.get_or_init(|| {
        crate::ops::prometheus();
        let mut verifications: Vec<Counter> = ErrorCode::ALL
            .iter()
            .map(|c| metrics::counter!("keyward_verifications_total", "code" => c.as_str()))
            .collect();
        verifications.push(metrics::counter!("keyward_verifications_total", "code" => "VALID"));
        Stats {
            cache_hit: metrics::counter!("keyward_verify_cache_total", "result" => "hit"),
            cache_miss: metrics::counter!("keyward_verify_cache_total", "result" => "miss"),
            cache_negative_hit: metrics::counter!("keyward_verify_cache_total", "result" => "negative_hit"),
            ratelimit_allowed: metrics::counter!("keyward_ratelimit_decisions_total", "allowed" => "true"),
            ratelimit_refused: metrics::counter!("keyward_ratelimit_decisions_total", "allowed" => "false"),
            ratelimit_fallback: metrics::counter!("keyward_ratelimit_fallback_total"),
            verifications,
        }
    })
}
