//! Quota periods (API.md §6.3): the UTC calendar hour, day or month a use counts in.

use chrono::{Datelike, Duration, TimeZone, Timelike, Utc};

use crate::model::{QuotaPeriod, Timestamp};

/// The start of the period containing `t`.
pub fn period_start(period: QuotaPeriod, t: Timestamp) -> Timestamp {
    let day = Utc
        .with_ymd_and_hms(t.year(), t.month(), t.day(), 0, 0, 0)
        .single()
        .unwrap_or(t);
    match period {
        QuotaPeriod::Hour => day + Duration::hours(t.hour() as i64),
        QuotaPeriod::Day => day,
        QuotaPeriod::Month => Utc
            .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
            .single()
            .unwrap_or(day),
    }
}

/// The start of the next period: when the quota resets.
pub fn period_end(period: QuotaPeriod, t: Timestamp) -> Timestamp {
    let start = period_start(period, t);
    match period {
        QuotaPeriod::Hour => start + Duration::hours(1),
        QuotaPeriod::Day => start + Duration::days(1),
        QuotaPeriod::Month => {
            let (y, m) = if start.month() == 12 {
                (start.year() + 1, 1)
            } else {
                (start.year(), start.month() + 1)
            };
            Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
                .single()
                .unwrap_or(start + Duration::days(31))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(s: &str) -> Timestamp {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn periods_are_utc_calendar_units() {
        let x = t("2026-12-31T23:59:59.999Z");
        assert_eq!(
            period_start(QuotaPeriod::Hour, x),
            t("2026-12-31T23:00:00Z")
        );
        assert_eq!(period_end(QuotaPeriod::Hour, x), t("2027-01-01T00:00:00Z"));
        assert_eq!(period_start(QuotaPeriod::Day, x), t("2026-12-31T00:00:00Z"));
        assert_eq!(period_end(QuotaPeriod::Month, x), t("2027-01-01T00:00:00Z"));
        assert_eq!(
            period_end(QuotaPeriod::Month, t("2028-02-10T00:00:00Z")),
            t("2028-03-01T00:00:00Z")
        );
    }

    proptest! {
        #[test]
        fn every_instant_lies_in_its_period(secs in 0i64..4_000_000_000, p in 0u8..3) {
            let period = [QuotaPeriod::Hour, QuotaPeriod::Day, QuotaPeriod::Month][p as usize];
            let x = chrono::DateTime::from_timestamp(secs, 0).unwrap();
            prop_assert!(period_start(period, x) <= x);
            prop_assert!(x < period_end(period, x));
            prop_assert_eq!(period_start(period, period_end(period, x)), period_end(period, x));
        }
    }
}
