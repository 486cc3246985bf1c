//! Times as the API shows and reads them: RFC 3339 in UTC with milliseconds, through jiff.

use jiff::Timestamp;
use jiff::fmt::temporal::DateTimePrinter;

/// Every time in an answer: UTC, three fractional digits.
const PRINTER: DateTimePrinter = DateTimePrinter::new().precision(Some(3));

/// Unix milliseconds as RFC 3339 in UTC, e.g. `2026-11-22T10:04:05.123Z`. A time outside the
/// years -9999 to 9999 (which no clock gives) shows as the nearest one there is.
pub fn rfc3339(ms: i64) -> String {
    let ts = Timestamp::from_millisecond(ms).unwrap_or(if ms < 0 { Timestamp::MIN } else { Timestamp::MAX });
    PRINTER.timestamp_to_string(&ts)
}

/// Parses a time given as unix seconds (`1763800000`) or RFC 3339 with its offset
/// (`2026-11-22T10:00:00Z`, `2026-11-22T11:00:00.5+01:00`) into unix milliseconds; `None` for
/// anything else.
pub fn parse_time(s: &str) -> Option<i64> {
    if let Ok(secs) = s.parse::<i64>() {
        return secs.checked_mul(1000);
    }
    s.parse::<Timestamp>().ok().map(Timestamp::as_millisecond)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_and_agrees_with_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(parse_time("2000-02-29T00:00:00Z"), Some(951_782_400_000));
        assert_eq!(parse_time("2000-02-29T01:30:00.5+01:30"), Some(951_782_400_500));
        for ms in [0, 1_763_800_000_123, 4_102_444_800_000] {
            assert_eq!(parse_time(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(parse_time("1763800000"), Some(1_763_800_000_000));
        assert_eq!(rfc3339(1_764_806_645_007), "2025-12-04T00:04:05.007Z");
        assert_eq!(rfc3339(253_402_128_000_001), "9999-12-30T00:00:00.001Z");
        // Past the last instant there is (jiff's, in the last day of 9999): that one, not a panic.
        assert!(rfc3339(i64::MAX).starts_with("9999-12-"), "{}", rfc3339(i64::MAX));
        assert!(rfc3339(i64::MIN).starts_with("-009999-"), "{}", rfc3339(i64::MIN));
    }

    #[test]
    fn malformed_times_are_refused() {
        for bad in ["", "yesterday", "2026-13-01T00:00:00Z", "2026-11-22T10:00:00", "2026-11-22T10:00:00.Z"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_multibyte_character_anywhere_is_refused_not_a_panic() {
        for bad in ["2026-11-22T10:00:00+€:0", "2026-11-22T10:00:00é", "2026-11-2€T10:00:00Z", "ǅ"] {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
    }
}
