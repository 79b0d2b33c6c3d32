//! The failed-auth throttle's limiter (API.md §6.2's GCRA, one state per client address): a
//! theoretical arrival time per bucket, in sharded maps so concurrent addresses rarely contend.
//! (Keys' own rate limits live in their live state, `usage::KeyState`.)

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use keyward_core::gcra::{Decision, Gcra};

const SHARDS: usize = 64;

/// `v6`'s first `bits` bits: the network of that size it lies in.
fn network(v6: std::net::Ipv6Addr, bits: u32) -> std::net::IpAddr {
    std::net::IpAddr::V6(std::net::Ipv6Addr::from(
        u128::from(v6) & (u128::MAX << (128 - bits)),
    ))
}

/// The failed-auth throttle: one budget per address and, for IPv6, per network around it. An
/// IPv6 address counts as its /64: the /64 is what one subscriber or host is given (RFC 6177),
/// and its holder picks the low 64 bits at will, so per full address every one of them would
/// get a fresh budget. Over that come larger budgets for the /56 and the /48. A site
/// is usually given a /56 or a /48 (RFC 6177; tunnel brokers hand out /48s for free), so per
/// /64 alone its holder would still have 256 to 65,536 budgets. The wider budgets are 16 and
/// 256 times the address's, so the /64s of one network do not starve each other before a
/// single one of them would have been throttled on its own.
#[derive(Debug)]
pub struct AuthThrottle {
    buckets: Limiter<(std::net::IpAddr, u8)>,
    /// The budget of one address, then of a /56 and of a /48.
    budgets: Option<[Gcra; 3]>,
}

impl AuthThrottle {
    /// A throttle of `per_address` failures per address (`None`: off).
    pub fn new(per_address: Option<Gcra>) -> AuthThrottle {
        let budgets = per_address.map(|g| {
            let times = |k: u64| Gcra {
                emission_ns: (g.emission_ns / k).max(1),
                burst: g.burst.saturating_mul(k),
                limit: g.limit.saturating_mul(k),
            };
            [g, times(16), times(256)]
        });
        AuthThrottle {
            buckets: Limiter::default(),
            budgets,
        }
    }

    /// Whether the throttle is on.
    pub fn enabled(&self) -> bool {
        self.budgets.is_some()
    }

    /// The buckets `ip` counts against (keyed with their prefix length, so that a /56 never
    /// shares a bucket with the /64 written the same), with their budgets. `ip` is as
    /// `auth::client_ip` gives it: IPv4-mapped addresses already read as IPv4.
    fn of(&self, ip: std::net::IpAddr) -> impl Iterator<Item = ((std::net::IpAddr, u8), &Gcra)> {
        use std::net::IpAddr;
        let keys = match ip {
            IpAddr::V4(_) => [Some((ip, 32)), None, None],
            IpAddr::V6(v6) => [
                Some((network(v6, 64), 64)),
                Some((network(v6, 56), 56)),
                Some((network(v6, 48), 48)),
            ],
        };
        self.budgets
            .iter()
            .flat_map(move |b| keys.into_iter().zip(b.iter()))
            .filter_map(|(k, g)| k.map(|k| (k, g)))
    }

    /// How long `ip` must wait before it may fail again, when any of its budgets is spent
    /// (nanoseconds; the longest wait). Records nothing.
    pub fn blocked_for(&self, ip: std::net::IpAddr, now_ns: i64) -> Option<i64> {
        if self.buckets.is_empty() {
            return None;
        }
        self.of(ip)
            .filter_map(|(k, g)| self.buckets.blocked_for(k, g, now_ns))
            .max()
    }

    /// Counts one failed authentication from `ip` against each of its budgets; `Err` with the
    /// wait (nanoseconds) when it is over one of them, and then it counts against none: a
    /// failure refused by its /64's budget does not also spend its network's. `None` when the
    /// throttle is off.
    pub fn fail(&self, ip: std::net::IpAddr, now_ns: i64) -> Option<Result<(), i64>> {
        self.budgets.as_ref()?;
        if let Some(wait_ns) = self.blocked_for(ip, now_ns) {
            return Some(Err(wait_ns));
        }
        // All had room a moment ago; one that a concurrent failure filled since refuses now.
        let refused = self
            .of(ip)
            .map(|(k, g)| self.buckets.check(k, g, now_ns))
            .filter(|d| !d.allowed)
            .map(|d| d.retry_after_ns)
            .max();
        Some(refused.map_or(Ok(()), Err))
    }

    /// Forgets buckets that are full again.
    pub fn prune(&self, now_ns: i64) {
        self.buckets.prune(now_ns);
    }
}

/// Per-bucket GCRA state, keyed by client IP.
///
/// Hashed with std's keyed SipHash (`RandomState`, a random key per process), not FxHash: the
/// keys are addresses the client picks, and an IPv6 client holding a /64 picks 64 bits of them.
/// FxHash is a multiply by a public constant, so such a client can compute as many addresses as
/// it likes that hash alike, and every one of them would land in one shard and one probe
/// sequence: each request (this map is read on every authenticated request) would then scan
/// them all under that shard's lock.
#[derive(Debug)]
pub struct Limiter<K> {
    hasher: RandomState,
    shards: Vec<Mutex<HashMap<K, i64>>>,
    /// How many buckets the shards hold, kept beside them so that the usual case, no address
    /// failing anywhere, is answered without hashing or locking: every authenticated request
    /// asks, and through the map a check measured 40 ns for an IPv4 address and 118 ns for an
    /// IPv6 one's three buckets, against 7.7 ns for both this way (`part_throttle_check_ipv4`
    /// and `_ipv6` in `benches/verify.rs`, 3 runs each; `AuthThrottle::blocked_for` asks before
    /// it computes an address's networks). Relaxed: the throttle is a budget, not a fence; a
    /// failure being recorded on another core at that instant is caught when this request
    /// fails in turn.
    held: AtomicUsize,
}

impl<K> Default for Limiter<K> {
    fn default() -> Self {
        Limiter {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            held: AtomicUsize::new(0),
        }
    }
}

impl<K: Hash + Eq + Copy> Limiter<K> {
    fn shard(&self, k: &K) -> &Mutex<HashMap<K, i64>> {
        &self.shards[(self.hasher.hash_one(k) >> 58) as usize % SHARDS]
    }

    /// Decides one request for `bucket` at `now_ns`, recording it when allowed.
    pub fn check(&self, bucket: K, gcra: &Gcra, now_ns: i64) -> Decision {
        let mut map = self
            .shard(&bucket)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let tat = map.get(&bucket).copied().unwrap_or(0);
        let d = gcra.check(tat, now_ns);
        if d.allowed && map.insert(bucket, d.tat_ns).is_none() {
            self.held.fetch_add(1, Ordering::Relaxed);
        }
        d
    }

    /// Whether no bucket is held (see `held`).
    pub fn is_empty(&self) -> bool {
        self.held.load(Ordering::Relaxed) == 0
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
            let mut map = shard.lock().unwrap_or_else(|e| e.into_inner());
            let before = map.len();
            map.retain(|_, tat| *tat > now_ns);
            // Under the shard's lock, as every insert's increment is: never below zero.
            self.held.fetch_sub(before - map.len(), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv6Addr};

    /// The count of held buckets follows inserts and pruning, so an empty throttle answers
    /// without looking, and one that held buckets answers from them again once pruned.
    #[test]
    fn the_held_count_follows_inserts_and_pruning() {
        let limiter = Limiter::<IpAddr>::default();
        let gcra = Gcra::new(60, 60, 1).unwrap();
        let a: IpAddr = "203.0.113.1".parse().unwrap();
        assert_eq!(limiter.blocked_for(a, &gcra, 0), None);
        assert!(limiter.check(a, &gcra, 0).allowed);
        assert!(!limiter.check(a, &gcra, 0).allowed);
        assert_eq!(
            limiter.held.load(Ordering::Relaxed),
            1,
            "a refusal adds no bucket"
        );
        assert!(limiter.blocked_for(a, &gcra, 0).is_some());
        limiter.prune(2_000_000_000);
        assert_eq!(limiter.held.load(Ordering::Relaxed), 0);
        assert_eq!(limiter.blocked_for(a, &gcra, 2_000_000_000), None);
    }

    /// Addresses of one /64 share its budget; another /64 has its own.
    #[test]
    fn an_ipv6_address_is_throttled_by_its_64() {
        let throttle = AuthThrottle::new(Gcra::new(60, 60, 1));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let now = 1_000_000_000_000;
        assert_eq!(throttle.fail(ip("2001:db8:1:2::1"), now), Some(Ok(())));
        assert!(throttle
            .blocked_for(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), now)
            .is_some());
        assert_eq!(throttle.blocked_for(ip("2001:db8:1:3::1"), now), None);
    }

    /// A network's /64s share a budget 16 times an address's per /56 (and 256 times per /48):
    /// moving to a fresh /64 of one's /56 buys no fresh failures once the /56's are spent,
    /// while a /64 of another /56 still has its own.
    #[test]
    fn the_64s_of_one_56_share_a_wider_budget() {
        let throttle = AuthThrottle::new(Gcra::new(60, 60, 3));
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let now = 1_000_000_000_000;
        let refused = |d: Option<Result<(), i64>>| matches!(d, Some(Err(_)));
        for net in 0..16 {
            for _ in 0..3 {
                let d = throttle.fail(ip(&format!("2001:db8:1:{net:x}::1")), now);
                assert_eq!(d, Some(Ok(())), "the /64 {net:x} has its own three");
            }
            let d = throttle.fail(ip(&format!("2001:db8:1:{net:x}::2")), now);
            assert!(refused(d), "a /64's fourth failure is over its budget");
        }
        // 48 failures in the /56 (the refused ones spent nothing): a fresh /64 of it is
        // refused before it fails once.
        assert!(throttle.blocked_for(ip("2001:db8:1:10::1"), now).is_some());
        assert!(refused(throttle.fail(ip("2001:db8:1:10::1"), now)));
        // Another /56 of the same /48 is not.
        assert_eq!(throttle.blocked_for(ip("2001:db8:1:100::1"), now), None);
        assert_eq!(throttle.fail(ip("2001:db8:1:100::1"), now), Some(Ok(())));
        // IPv4 addresses have one budget each, and the throttle can be off.
        let v4 = AuthThrottle::new(Gcra::new(60, 60, 1));
        assert_eq!(v4.fail(ip("203.0.113.1"), now), Some(Ok(())));
        assert!(refused(v4.fail(ip("203.0.113.1"), now)));
        assert_eq!(v4.fail(ip("203.0.113.2"), now), Some(Ok(())));
        let off = AuthThrottle::new(None);
        assert!(!off.enabled());
        assert_eq!(off.fail(ip("203.0.113.1"), now), None);
        assert_eq!(off.blocked_for(ip("203.0.113.1"), now), None);
    }

    /// Addresses of one /64 that an unkeyed hash would put in one shard still spread over the
    /// shards: where an address lands is not something its sender can work out.
    #[test]
    fn addresses_that_fxhash_puts_in_one_shard_spread_over_the_shards() {
        let fx_shard =
            |ip: &IpAddr| (rustc_hash::FxBuildHasher.hash_one(ip) >> 58) as usize % SHARDS;
        let in_prefix = |i: u64| {
            IpAddr::V6(Ipv6Addr::from(
                (0x2001_0db8_0000_0001_u128 << 64) | u128::from(i),
            ))
        };
        let target = fx_shard(&in_prefix(0));
        let chosen: Vec<IpAddr> = (0u64..1_000_000)
            .map(in_prefix)
            .filter(|ip| fx_shard(ip) == target)
            .take(2_000)
            .collect();
        // FxHash hardly mixes the low half of an address into the bits that pick a shard: the
        // first 2,000 addresses of a /64 nearly all land in the first one's.
        assert_eq!(chosen.len(), 2_000);
        let limiter = Limiter::<IpAddr>::default();
        let gcra = Gcra::new(10, 60, 10).unwrap();
        for ip in &chosen {
            assert!(limiter.check(*ip, &gcra, 0).allowed);
        }
        let sizes: Vec<usize> = limiter
            .shards
            .iter()
            .map(|s| s.lock().unwrap().len())
            .collect();
        assert_eq!(sizes.iter().sum::<usize>(), chosen.len());
        // Uniform would be about 31 per shard; one shard holding them all is the attack.
        assert!(sizes.iter().all(|&n| n < 100), "{sizes:?}");
    }
}
