//! Reads an event's `timestamp` (RFC 3339, the ISO-8601 profile Comapi sends) as a
//! point in time, for the gate's replay window.

use std::time::{Duration, SystemTime};

/// Seconds in a day.
const DAY: i64 = 86_400;

/// Parses `2017-08-31T09:26:14.604Z` and the rest of RFC 3339: `T`, `t` or a space
/// between date and time, any number of fraction digits (nanoseconds are kept), and
/// `Z`, `z` or a `±HH:MM` offset. A leap second (`:60`) reads as the second before
/// the next minute.
///
/// `None` for anything else, a time without an offset included: whose clock it was
/// cannot be known, and guessing UTC could date a real event hours into the future.
pub(crate) fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let b = text.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let year = digits(&b[0..4])?;
    let month = digits(&b[5..7])?;
    let day = digits(&b[8..10])?;
    let hour = digits(&b[11..13])?;
    let minute = digits(&b[14..16])?;
    let second = digits(&b[17..19])?;
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }

    let mut rest = &b[19..];
    let mut nanos = 0u32;
    if let [b'.', fraction @ ..] = rest {
        let count = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if count == 0 {
            return None;
        }
        for (i, &c) in fraction[..count].iter().enumerate() {
            if i < 9 {
                nanos = nanos * 10 + u32::from(c - b'0');
            }
        }
        nanos *= 10u32.pow(9u32.saturating_sub(count as u32));
        rest = &fraction[count..];
    }
    let offset_seconds = match rest {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let hours = digits(&[*h1, *h2])?;
            let minutes = digits(&[*m1, *m2])?;
            if hours > 23 || minutes > 59 {
                return None;
            }
            let offset = i64::from(hours * 3600 + minutes * 60);
            if *sign == b'-' { -offset } else { offset }
        }
        _ => return None,
    };

    let seconds = days_from_civil(i64::from(year), month, day) * DAY
        + i64::from(hour) * 3600
        + i64::from(minute) * 60
        + i64::from(second.min(59))
        - offset_seconds;
    let since_epoch = Duration::new(seconds.unsigned_abs(), 0);
    let whole = if seconds >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(since_epoch)?
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(since_epoch)?
    };
    whole.checked_add(Duration::from_nanos(u64::from(nanos)))
}

/// A run of ASCII digits as a number; `None` if any byte is not a digit.
fn digits(bytes: &[u8]) -> Option<u32> {
    bytes.iter().try_fold(0u32, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
    })
}

fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month = i64::from(month);
    let day_of_year =
        (153 * (if month > 2 { month - 3 } else { month + 9 }) + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unix(text: &str) -> Option<f64> {
        parse_rfc3339(text).map(|t| match t.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(after) => after.as_secs_f64(),
            Err(before) => -before.duration().as_secs_f64(),
        })
    }

    #[test]
    fn reads_comapi_timestamps_and_rfc3339() {
        // `date -u -d 2017-08-31T09:26:14Z +%s` is 1504171574.
        assert_eq!(unix("2017-08-31T09:26:14.604Z"), Some(1_504_171_574.604));
        assert_eq!(unix("2017-08-31T09:26:14Z"), Some(1_504_171_574.0));
        assert_eq!(unix("2017-08-31t09:26:14z"), Some(1_504_171_574.0));
        assert_eq!(unix("2017-08-31 11:26:14+02:00"), Some(1_504_171_574.0));
        assert_eq!(unix("2017-08-31T04:56:14-04:30"), Some(1_504_171_574.0));
        assert_eq!(unix("1970-01-01T00:00:00Z"), Some(0.0));
        assert_eq!(unix("1969-12-31T23:59:59Z"), Some(-1.0));
        assert_eq!(unix("2000-02-29T00:00:00Z"), Some(951_782_400.0));
        assert_eq!(unix("2016-12-31T23:59:60Z"), Some(1_483_228_799.0));
        // Nanoseconds are kept; digits past them are read and dropped.
        assert_eq!(
            parse_rfc3339("2017-08-31T09:26:14.123456789123Z"),
            Some(SystemTime::UNIX_EPOCH + Duration::new(1_504_171_574, 123_456_789))
        );
    }

    #[test]
    fn refuses_what_is_not_a_complete_rfc3339_time() {
        for text in [
            "",
            "2017-08-31",
            "2017-08-31T09:26:14",       // no offset: whose clock?
            "2017-08-31T09:26:14.Z",     // empty fraction
            "2017-08-31T09:26:14+0200",  // offset without a colon
            "2017-13-01T00:00:00Z",      // month 13
            "2017-02-29T00:00:00Z",      // not a leap year
            "1900-02-29T00:00:00Z",      // nor is 1900
            "2017-08-31T24:00:00Z",      // hour 24
            "2017-08-31T09:60:00Z",      // minute 60
            "2017-08-31T09:26:14Zjunk",  // trailing bytes
            "2017-08-31T09:26:14+24:00", // offset out of range
            "+017-08-31T09:26:14Z",
            "2017-08-31T09:26:1éZ",
            "1504171574",
        ] {
            assert_eq!(parse_rfc3339(text), None, "{text}");
        }
    }

    #[test]
    fn days_from_civil_counts_every_day_since_1970() {
        let mut days = 0;
        for year in 1970..2100 {
            for month in 1..=12 {
                for day in 1..=days_in_month(year, month) {
                    assert_eq!(days_from_civil(i64::from(year), month, day), days);
                    days += 1;
                }
            }
        }
    }
}
