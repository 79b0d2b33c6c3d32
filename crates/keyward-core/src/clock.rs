//! The injected clock: every "now" in Keyward comes from a `Clock`, so expiry, rate limits and
//! quotas can be tested by moving a `ManualClock` instead of sleeping.

use std::fmt;
use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time in UTC.
    fn now(&self) -> DateTime<Utc>;
}

/// The real wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
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
