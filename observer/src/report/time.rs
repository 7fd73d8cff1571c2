//! The stream's timestamps: RFC 3339, UTC, nanoseconds
//! (`2026-11-25T14:03:07.123456789Z`), read without allocating.

use std::time::{Duration, UNIX_EPOCH};

/// Nanoseconds since the epoch of an RFC 3339 UTC time
/// (`YYYY-MM-DDTHH:MM:SS[.fraction]Z`); `None` for anything else.
pub fn parse(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
        || !matches!(b[b.len() - 1], b'Z' | b'z')
    {
        return None;
    }
    let num = |from: usize, to: usize| -> Option<i64> {
        b[from..to].iter().try_fold(0i64, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + i64::from(c - b'0'))
        })
    };
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    let frac = &b[19..b.len() - 1];
    let nanos = match frac {
        [] => 0,
        [b'.', digits @ ..] if !digits.is_empty() => {
            let mut n = 0i64;
            for (i, &c) in digits.iter().enumerate() {
                if !c.is_ascii_digit() {
                    return None;
                }
                if i < 9 {
                    n = n * 10 + i64::from(c - b'0');
                }
            }
            n * 10i64.pow(9u32.saturating_sub(digits.len() as u32))
        }
        _ => return None,
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second;
    // Nanoseconds in an i64: 1677 to 2262.
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// RFC 3339 with nanoseconds, as the stream writes it (times before 1970 as 1970).
pub fn format_nanos(ns: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_nanos(t).to_string()
}

/// RFC 3339 with milliseconds.
pub fn format_millis(ns: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A length of time for people: `850 ms`, `12.5 s`, `3 min 20 s`, `5 h 02 min`, `2 d 03 h`.
pub fn human(ns: i64) -> String {
    let ms = ns / 1_000_000;
    let s = ms / 1000;
    match ms {
        _ if ms < 1000 => format!("{ms} ms"),
        _ if s < 60 => format!("{}.{} s", s, (ms % 1000) / 100),
        _ if s < 3600 => format!("{} min {:02} s", s / 60, s % 60),
        _ if s < 86_400 => format!("{} h {:02} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {:02} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// A bucket width for people: `100 ms`, `10 s`, `2 min`, `1 h`, `1 d`, in
/// the largest unit it is a whole number of (`70 s`, not `1 min`).
pub fn width(ms: i64) -> String {
    let units = [
        (86_400_000, "d"),
        (3_600_000, "h"),
        (60_000, "min"),
        (1000, "s"),
    ];
    match units.iter().find(|(u, _)| ms >= *u && ms % u == 0) {
        Some((u, name)) => format!("{} {name}", ms / u),
        None => format!("{ms} ms"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_stream_writes() {
        for ns in [
            0i64,
            1,
            1_764_361_708_346_163_365,
            951_782_400_000_000_000, // 2000-02-29
            4_102_444_799_999_999_999,
        ] {
            assert_eq!(parse(&format_nanos(ns)), Some(ns), "{}", format_nanos(ns));
        }
        assert_eq!(
            parse("2026-11-28T21:08:28.346163365Z"),
            Some(1_795_900_108_346_163_365)
        );
        assert_eq!(
            parse("2026-11-28T21:08:28Z"),
            Some(1_795_900_108_000_000_000)
        );
        assert_eq!(
            parse("2026-11-28T21:08:28.5Z"),
            Some(1_795_900_108_500_000_000)
        );
        assert_eq!(
            parse("2026-11-28T21:08:28.1234567891Z"),
            Some(1_795_900_108_123_456_789)
        );
        for bad in [
            "9999-12-31T23:59:59Z",
            "0000-01-01T00:00:00Z",
            "",
            "2026-11-28",
            "2026-11-28T21:08:28",
            "2026-13-28T21:08:28Z",
            "2026-11-28T25:08:28Z",
            "2026-11-28T21:08:28.Z",
            "2026-11-28T21:08:28.12aZ",
            "2026-11-28T21:08:28+01:00",
            "2026-1a-28T21:08:28Z",
            "ＸＸＸＸ-11-28T21:08:28Z",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn lengths_for_people() {
        assert_eq!(human(850_000_000), "850 ms");
        assert_eq!(human(12_500_000_000), "12.5 s");
        assert_eq!(human(200_000_000_000), "3 min 20 s");
        assert_eq!(human(18_120_000_000_000), "5 h 02 min");
        assert_eq!(width(600_000), "10 min");
        assert_eq!(width(200), "200 ms");
    }
}
