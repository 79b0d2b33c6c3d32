//! The generic cell rate algorithm (GCRA) for per-key rate limits (API.md §6.2): `limit`
//! requests per `period` sustained, `burst` at once.
//!
//! Written here rather than taken from a crate because it is a dozen lines on the hot path and
//! must work over state kept anywhere (in memory now, a Redis script later): the whole state of
//! a key's limiter is one number, its theoretical arrival time (TAT), in nanoseconds.

/// A limit in the form GCRA works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    /// Nanoseconds between requests at the sustained rate (period / limit).
    pub emission_ns: u64,
    /// How many requests may arrive at once.
    pub burst: u64,
    /// The configured numbers, for the `X-RateLimit-Limit` header.
    pub limit: u64,
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The new TAT to store (unchanged when refused).
    pub tat_ns: i64,
    /// Requests still allowed at once after this one.
    pub remaining: u64,
    /// Nanoseconds from now until the bucket is full again.
    pub reset_after_ns: i64,
    /// Nanoseconds from now until one more request would be allowed (0 when allowed).
    pub retry_after_ns: i64,
}

impl Gcra {
    /// Builds the limiter for `limit` per `period_s` seconds with `burst`; `None` when a number
    /// is zero.
    pub fn new(limit: u64, period_s: u64, burst: u64) -> Option<Gcra> {
        if limit == 0 || period_s == 0 || burst == 0 {
            return None;
        }
        let emission_ns = (period_s as u128 * 1_000_000_000 / limit as u128).max(1) as u64;
        Some(Gcra {
            emission_ns,
            burst,
            limit,
        })
    }

    fn capacity_ns(&self) -> i64 {
        (self.emission_ns as i128 * self.burst as i128).min(i64::MAX as i128) as i64
    }

    /// The bucket's state at `now_ns` without a request: what is left (`remaining`) and when
    /// it is full again (`reset_after_ns`). `allowed` says whether a request now would pass.
    pub fn peek(&self, tat_ns: i64, now_ns: i64) -> Decision {
        let t = self.emission_ns as i64;
        let cap = self.capacity_ns();
        let used = tat_ns.max(now_ns) - now_ns;
        // What one more request would take the bucket to (as `check` computes it).
        let after = used.saturating_add(t);
        Decision {
            allowed: after <= cap,
            tat_ns,
            remaining: ((cap - used).max(0) / t) as u64,
            reset_after_ns: used,
            retry_after_ns: (after - cap).max(0),
        }
    }

    /// Decides one request arriving at `now_ns` given the stored `tat_ns` (0 when none).
    pub fn check(&self, tat_ns: i64, now_ns: i64) -> Decision {
        let t = self.emission_ns as i64;
        let cap = self.capacity_ns();
        let tat = tat_ns.max(now_ns);
        let new_tat = tat.saturating_add(t);
        let used = new_tat - now_ns;
        if used <= cap {
            Decision {
                allowed: true,
                tat_ns: new_tat,
                remaining: ((cap - used) / t) as u64,
                reset_after_ns: used,
                retry_after_ns: 0,
            }
        } else {
            let current = tat - now_ns;
            Decision {
                allowed: false,
                tat_ns,
                remaining: 0,
                reset_after_ns: current,
                retry_after_ns: used - cap,
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const S: i64 = 1_000_000_000;

    /// A peek reports what a request would see before it, and changes nothing.
    #[test]
    fn a_peek_reports_the_bucket_without_taking_from_it() {
        let g = Gcra::new(100, 3600, 10).unwrap();
        let now = 1_000 * S;
        let full = g.peek(0, now);
        assert!(full.allowed);
        assert_eq!((full.remaining, full.reset_after_ns), (10, 0));
        let mut tat = 0;
        for taken in 1..=10u64 {
            let d = g.check(tat, now);
            tat = d.tat_ns;
            let p = g.peek(tat, now);
            assert_eq!(p.remaining, 10 - taken);
            assert_eq!(p.reset_after_ns, d.reset_after_ns);
            assert_eq!(p.tat_ns, tat, "nothing taken");
        }
        let empty = g.peek(tat, now);
        assert!(!empty.allowed);
        assert_eq!(empty.remaining, 0);
        assert_eq!(empty.retry_after_ns, g.check(tat, now).retry_after_ns);
    }

    #[test]
    fn a_full_bucket_admits_exactly_the_burst_at_once() {
        let g = Gcra::new(100, 3600, 10).unwrap();
        let mut tat = 0;
        let mut admitted = 0;
        for _ in 0..50 {
            let d = g.check(tat, 1_000 * S);
            if d.allowed {
                admitted += 1;
                tat = d.tat_ns;
            }
        }
        assert_eq!(admitted, 10);
    }

    #[test]
    fn the_bucket_refills_at_the_sustained_rate() {
        // 100 per hour: one every 36 s.
        let g = Gcra::new(100, 3600, 1).unwrap();
        let d1 = g.check(0, 0);
        assert!(d1.allowed);
        let d2 = g.check(d1.tat_ns, 35 * S);
        assert!(!d2.allowed);
        assert_eq!(d2.retry_after_ns, S);
        let d3 = g.check(d1.tat_ns, 36 * S);
        assert!(d3.allowed);
    }

    #[test]
    fn remaining_counts_down_and_reset_is_when_the_bucket_is_full() {
        let g = Gcra::new(10, 10, 5).unwrap();
        let d = g.check(0, 0);
        assert_eq!(d.remaining, 4);
        assert_eq!(d.reset_after_ns, S);
        let d = g.check(d.tat_ns, 0);
        assert_eq!(d.remaining, 3);
        assert_eq!(d.reset_after_ns, 2 * S);
    }

    proptest! {
        /// Over any window, admitted requests never exceed burst + window / emission interval.
        #[test]
        fn never_admits_more_than_limit_plus_burst_over_any_window(
            limit in 1u64..50, period_s in 1u64..20, burst in 1u64..20,
            gaps in proptest::collection::vec(0i64..3 * S, 1..200),
        ) {
            let g = Gcra::new(limit, period_s, burst).unwrap();
            let mut now = 0i64;
            let mut tat = 0i64;
            let mut admitted: Vec<i64> = Vec::new();
            for gap in gaps {
                now += gap;
                let d = g.check(tat, now);
                if d.allowed {
                    tat = d.tat_ns;
                    admitted.push(now);
                }
            }
            for (i, start) in admitted.iter().enumerate() {
                for (j, end) in admitted.iter().enumerate().skip(i) {
                    let window = end - start;
                    let n = (j - i + 1) as i128;
                    let bound = burst as i128 + (window as i128) / g.emission_ns as i128;
                    prop_assert!(n <= bound, "{n} admitted in {window} ns, bound {bound}");
                }
            }
        }

        /// A request refused now is admitted once its retry-after has passed.
        #[test]
        fn retry_after_is_exactly_enough(limit in 1u64..100, period_s in 1u64..100, burst in 1u64..10) {
            let g = Gcra::new(limit, period_s, burst).unwrap();
            let mut tat = 0;
            let mut d = g.check(tat, 0);
            while d.allowed {
                tat = d.tat_ns;
                d = g.check(tat, 0);
            }
            prop_assert!(d.retry_after_ns > 0);
            prop_assert!(!g.check(tat, d.retry_after_ns - 1).allowed);
            prop_assert!(g.check(tat, d.retry_after_ns).allowed);
        }
    }
}
