//! The injected clock: every "now" in Keyward comes from a `Clock`, so expiry, rate limits and
//! quotas can be tested by moving a `ManualClock` instead of sleeping.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time in UTC.
    fn now(&self) -> DateTime<Utc>;

    /// The current time as Unix milliseconds: what the hot path works with (API timestamps have
    /// millisecond precision), without building a calendar date.
    fn now_ms(&self) -> i64 {
        self.now().timestamp_millis()
    }
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    /// Reads the time-stamp counter against a wall-clock anchor (see [`TscWall`]): 9 ns here,
    /// against 20 ns for the system clock and 57 ns for `Utc::now()` truncated to the
    /// millisecond, on a verification path of about 150 ns.
    fn now_ms(&self) -> i64 {
        static WALL: std::sync::OnceLock<TscWall> = std::sync::OnceLock::new();
        WALL.get_or_init(TscWall::new)
            .now_ns()
            .div_euclid(1_000_000)
    }
}

/// Nanoseconds since the Unix epoch from the system clock.
fn system_ns() -> i64 {
    match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => d.as_nanos().min(i64::MAX as u128) as i64,
        Err(e) => -(e.duration().as_nanos().min(i64::MAX as u128) as i64),
    }
}

/// The wall clock read through the CPU's time-stamp counter (the `quanta` crate, which falls
/// back to the OS's monotonic clock where the counter is not invariant): one wall-clock reading
/// is the anchor, and the counter says how far the present is from it. The anchor is read again
/// once it is [`REANCHOR_NS`] old, so the answer strays from the system clock by at most the
/// counter's rate error over that span, and follows the system clock's own adjustments as
/// quickly.
///
/// The rate error is not negligible: quanta calibrates the counter against the monotonic clock
/// over about half a millisecond, so one interruption during calibration on a loaded machine
/// puts its rate off by a few tenths of a percent. Over a one-second anchor that was 1.4 ms
/// (seen on CI); over 10 ms it is tens of microseconds, well inside the millisecond the hot path
/// works in. Re-anchoring costs one system-clock read per 10 ms across all threads.
///
/// The anchor is two numbers, published under a sequence lock so a reader never pairs one
/// anchor's counter value with another's wall time.
pub struct TscWall {
    clock: quanta::Clock,
    /// Even: the anchor is stable; odd: being replaced.
    seq: AtomicU64,
    anchor_raw: AtomicU64,
    anchor_ns: AtomicI64,
    replacing: AtomicBool,
    /// The wall clock in Unix nanoseconds: the system clock, or a test's own.
    wall: fn() -> i64,
}

/// How old an anchor may get before it is read again.
const REANCHOR_NS: u64 = 10_000_000;

impl fmt::Debug for TscWall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TscWall").finish_non_exhaustive()
    }
}

impl Default for TscWall {
    fn default() -> Self {
        TscWall::new()
    }
}

impl TscWall {
    /// Calibrates the counter (under a millisecond here) and reads the first anchor.
    pub fn new() -> TscWall {
        TscWall::with_sources(quanta::Clock::new(), system_ns)
    }

    /// A counter and a wall clock of the caller's choosing (tests use mocks of both).
    fn with_sources(clock: quanta::Clock, wall: fn() -> i64) -> TscWall {
        let (raw, ns) = anchor(&clock, wall);
        TscWall {
            anchor_raw: AtomicU64::new(raw),
            anchor_ns: AtomicI64::new(ns),
            clock,
            seq: AtomicU64::new(0),
            replacing: AtomicBool::new(false),
            wall,
        }
    }

    /// Nanoseconds since the Unix epoch.
    pub fn now_ns(&self) -> i64 {
        loop {
            let raw = self.clock.raw();
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                // A new anchor is being written: a few stores, under way right now.
                std::hint::spin_loop();
                continue;
            }
            let anchor_raw = self.anchor_raw.load(Ordering::Relaxed);
            let anchor_ns = self.anchor_ns.load(Ordering::Relaxed);
            std::sync::atomic::fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) != s1 {
                continue;
            }
            // A counter read taken just before a new anchor was published counts as the anchor.
            let since = self.clock.delta_as_nanos(anchor_raw, raw);
            if since < REANCHOR_NS || !self.reanchor() {
                // A thread that finds another already re-anchoring answers from the old anchor
                // (barely older than REANCHOR_NS) rather than wait for it.
                return anchor_ns.saturating_add(since as i64);
            }
        }
    }

    /// Reads a new anchor, unless another thread is already doing so; whether it did.
    fn reanchor(&self) -> bool {
        if self.replacing.swap(true, Ordering::Acquire) {
            return false;
        }
        let (raw, ns) = anchor(&self.clock, self.wall);
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::Release);
        self.anchor_raw.store(raw, Ordering::Relaxed);
        self.anchor_ns.store(ns, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
        self.replacing.store(false, Ordering::Release);
        true
    }
}

/// A counter reading and the system clock's time at that reading. The two are read one after
/// the other, so the system clock is read between two counter readings, and a pair whose
/// readings are far apart (the thread was descheduled in between) is read again: an anchor
/// taken across a pause would put every answer off by the pause for the anchor's lifetime.
fn anchor(clock: &quanta::Clock, wall: fn() -> i64) -> (u64, i64) {
    /// A system-clock read takes well under a microsecond; this much means an interruption.
    const CLOSE_NS: u64 = 20_000;
    let mut best = None;
    for _ in 0..8 {
        let before = clock.raw();
        let ns = wall();
        let after = clock.raw();
        let gap = clock.delta_as_nanos(before, after);
        // The system clock was read somewhere between the two: credit it to their midpoint.
        let mid = before.wrapping_add(after.wrapping_sub(before) / 2);
        if gap <= CLOSE_NS {
            return (mid, ns);
        }
        if best.is_none_or(|(g, _, _)| gap < g) {
            best = Some((gap, mid, ns));
        }
    }
    best.map(|(_, raw, ns)| (raw, ns))
        .unwrap_or_else(|| (clock.raw(), wall()))
}

/// The instant `ms` Unix milliseconds name; out of chrono's range, the nearest end of it.
pub fn from_millis(ms: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(ms).unwrap_or(if ms < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

/// A clock that only moves when told to, for tests.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<DateTime<Utc>>,
}

impl ManualClock {
    /// A clock standing still at `start`.
    pub fn new(start: DateTime<Utc>) -> ManualClock {
        ManualClock {
            now: Mutex::new(start),
        }
    }

    /// Moves the clock to `t` (which may be in the past).
    pub fn set(&self, t: DateTime<Utc>) {
        *self.lock() = t;
    }

    /// Moves the clock forward by `d` (backwards if `d` is negative). An overflowing result leaves
    /// the clock where it was, since such a date is far outside anything a test means.
    pub fn advance(&self, d: Duration) {
        let mut now = self.lock();
        if let Some(t) = now.checked_add_signed(d) {
            *now = t;
        }
    }

    /// Locks the time. A poisoned lock only means another test thread panicked while holding it;
    /// the stored time is still a valid value, so it is used rather than propagating the panic.
    fn lock(&self) -> std::sync::MutexGuard<'_, DateTime<Utc>> {
        self.now.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.lock()
    }
}

/// Drops everything below the millisecond, because API timestamps have millisecond precision and a
/// value stored with more precision would not compare equal to the one the API returned.
pub fn truncate_to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    // Truncation towards the past only fails for dates near the end of chrono's range, where
    // keeping the value unchanged is the least surprising answer.
    // Integer maths: this runs on every request, and `duration_trunc` is several times slower.
    DateTime::from_timestamp_millis(t.timestamp_millis()).unwrap_or(t)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Timelike};
    use std::sync::Arc;

    fn at(secs: i64, nanos: u32) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, nanos).unwrap()
    }

    #[test]
    fn manual_clock_stands_still_until_moved() {
        let clock = ManualClock::new(at(1_700_000_000, 0));
        assert_eq!(clock.now(), at(1_700_000_000, 0));
        assert_eq!(clock.now(), at(1_700_000_000, 0));
        clock.advance(Duration::seconds(90));
        assert_eq!(clock.now(), at(1_700_000_090, 0));
        clock.advance(Duration::milliseconds(-500));
        assert_eq!(clock.now(), at(1_700_000_089, 500_000_000));
        clock.set(at(5, 0));
        assert_eq!(clock.now(), at(5, 0));
    }

    #[test]
    fn manual_clock_survives_an_overflowing_advance() {
        let clock = ManualClock::new(DateTime::<Utc>::MAX_UTC);
        clock.advance(Duration::days(1));
        assert_eq!(clock.now(), DateTime::<Utc>::MAX_UTC);
    }

    #[test]
    fn manual_clock_keeps_working_after_a_poisoned_lock() {
        let clock = Arc::new(ManualClock::new(at(10, 0)));
        let c = Arc::clone(&clock);
        let _ = std::thread::spawn(move || {
            let _guard = c.now.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(clock.now.is_poisoned());
        clock.advance(Duration::seconds(1));
        assert_eq!(clock.now(), at(11, 0));
    }

    #[test]
    fn clocks_work_as_trait_objects() {
        let clocks: Vec<Box<dyn Clock>> =
            vec![Box::new(SystemClock), Box::new(ManualClock::new(at(0, 0)))];
        let before = Utc::now();
        assert!(clocks[0].now() >= before);
        assert_eq!(clocks[1].now(), at(0, 0));
    }

    #[test]
    fn the_system_clock_reads_the_same_milliseconds_both_ways() {
        let c = SystemClock;
        let before = c.now().timestamp_millis();
        let ms = c.now_ms();
        let after = c.now().timestamp_millis();
        // The counter clock may sit a few microseconds either side of the system clock (its
        // anchor pairs a counter reading with a system-clock one), so at a millisecond boundary
        // it can name the neighbouring millisecond.
        assert!(
            before - 1 <= ms && ms <= after + 1,
            "{before} <= {ms} <= {after} (±1)"
        );
        assert_eq!(from_millis(ms).timestamp_millis(), ms);
        assert_eq!(from_millis(i64::MAX), DateTime::<Utc>::MAX_UTC);
    }

    #[test]
    fn the_counter_clock_stays_with_the_system_clock_across_anchors() {
        let w = TscWall::new();
        let start = std::time::Instant::now();
        let mut last = 0i64;
        // How far the counter may stray from the system clock: its drift over one anchor's
        // lifetime (tens of microseconds even with a badly calibrated counter; see
        // `a_miscalibrated_counter_strays_only_within_one_anchor`) plus the step at a
        // re-anchor, with a wide margin. Each reading is bracketed by system-clock readings
        // taken before and after it, so a thread that is descheduled between the readings (a
        // loaded CI machine) widens the bracket instead of failing the test.
        const SLACK_NS: i64 = 1_000_000;
        // Long enough to cross many anchors, from two threads at once.
        while start.elapsed() < std::time::Duration::from_millis(400) {
            let before = system_ns();
            let (a, b) = std::thread::scope(|s| {
                let t = s.spawn(|| w.now_ns());
                (w.now_ns(), t.join().unwrap())
            });
            let after = system_ns();
            for t in [a, b] {
                assert!(
                    before - SLACK_NS <= t && t <= after + SLACK_NS,
                    "{t} is outside [{before}, {after}] by more than {SLACK_NS} ns"
                );
            }
            // Within one thread, it never goes back by more than an anchor's correction.
            assert!(a > last - SLACK_NS, "went back from {last} to {a}");
            last = a;
            std::thread::sleep(std::time::Duration::from_millis(15));
        }
    }

    /// The mock wall clock of the test below, in Unix nanoseconds.
    static MOCK_WALL_NS: AtomicI64 = AtomicI64::new(1_700_000_000_000_000_000);

    #[test]
    fn a_miscalibrated_counter_strays_only_within_one_anchor() {
        // A counter whose calibrated rate is 0.5% fast (quanta's half-millisecond calibration,
        // interrupted once): every simulated millisecond of wall time it reports 1.005 ms.
        let (counter, mock) = quanta::Clock::mock();
        let w = TscWall::with_sources(counter, || MOCK_WALL_NS.load(Ordering::Relaxed));
        let step_ns: u64 = 1_000_000;
        let fast_ns = step_ns + step_ns / 200;
        let mut worst = 0i64;
        for _ in 0..3_000 {
            MOCK_WALL_NS.fetch_add(step_ns as i64, Ordering::Relaxed);
            mock.increment(fast_ns);
            let err = w.now_ns() - MOCK_WALL_NS.load(Ordering::Relaxed);
            worst = worst.max(err.abs());
        }
        // Three simulated seconds: without re-anchoring the error would reach 15 ms, with a
        // one-second anchor 5 ms. The hot path works in milliseconds, so a tenth of one is the
        // most it may stray (10 ms anchors give at most 0.5% of 11 ms, 55 µs).
        let bound = 100_000;
        assert!(worst > 0, "the mock counter was meant to be off");
        assert!(worst <= bound, "strayed {worst} ns, more than {bound} ns");
    }

    #[test]
    fn a_manual_clock_reports_its_milliseconds() {
        let c = ManualClock::new(at(1_700_000_000, 123_456_789));
        assert_eq!(c.now_ms(), 1_700_000_000_123);
    }

    #[test]
    fn truncation_drops_sub_millisecond_precision() {
        let t = at(1_700_000_000, 123_456_789);
        let tr = truncate_to_millis(t);
        assert_eq!(tr.nanosecond(), 123_000_000);
        assert_eq!(tr.timestamp(), 1_700_000_000);
        assert_eq!(truncate_to_millis(tr), tr);
        assert_eq!(
            tr.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "2023-11-14T22:13:20.123Z"
        );
        // Before the epoch, truncation still moves towards the past.
        let neg = at(-1, 999_999_999);
        assert_eq!(truncate_to_millis(neg), at(-1, 999_000_000));
    }
}
