//! Time: the clock, and the handful of date formats AWS protocols use.

use std::fmt::Write;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A control-plane `timestamp`: epoch seconds with millisecond fraction.
pub fn epoch_seconds(ms: i64) -> serde_json::Value {
    if ms % 1000 == 0 {
        serde_json::Value::from(ms / 1000)
    } else {
        serde_json::Number::from_f64(ms as f64 / 1000.0)
            .map(serde_json::Value::Number)
            .unwrap_or_else(|| serde_json::Value::from(ms / 1000))
    }
}

/// Days since 1970-01-01 for a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// (year, month, day) for days since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

struct Parts {
    y: i64,
    mo: i64,
    d: i64,
    h: i64,
    mi: i64,
    s: i64,
    ms: i64,
    weekday: usize,
}

fn parts(ms: i64) -> Parts {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, mo, d) = civil_from_days(days);
    Parts {
        y,
        mo,
        d,
        h: rem / 3600,
        mi: rem % 3600 / 60,
        s: rem % 60,
        ms: ms.rem_euclid(1000),
        // 1970-01-01 was a Thursday.
        weekday: usize::try_from((days + 4).rem_euclid(7)).unwrap_or(0),
    }
}

/// The UTC (year, month, day) of an instant.
pub fn civil(ms: i64) -> (i64, i64, i64) {
    civil_from_days(ms.div_euclid(1000).div_euclid(86400))
}

/// `2024-01-02T03:04:05.678Z`, as S3 XML listings carry dates.
pub fn iso8601(ms: i64) -> String {
    let p = parts(ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        p.y, p.mo, p.d, p.h, p.mi, p.s, p.ms
    )
}

/// `Tue, 02 Jan 2024 03:04:05 GMT`, the HTTP date of `Last-Modified`.
pub fn http_date(ms: i64) -> String {
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let p = parts(ms);
    // Sized once: it is on every object download's answer.
    let mut out = String::with_capacity(32);
    let _ = write!(
        out,
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[p.weekday],
        p.d,
        MONTHS[usize::try_from(p.mo - 1).unwrap_or(0)],
        p.y,
        p.h,
        p.mi,
        p.s
    );
    out
}

/// The SigV4 `X-Amz-Date` form `20240102T030405Z`.
pub fn amz_date(ms: i64) -> String {
    let p = parts(ms);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        p.y, p.mo, p.d, p.h, p.mi, p.s
    )
}

/// Parses the SigV4 `X-Amz-Date` form `20240102T030405Z` into epoch milliseconds.
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        if !t.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        t.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, sec) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    Some((days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + sec) * 1000)
}

/// Parses an ISO-8601 UTC timestamp (`2024-01-02T03:04:05Z`, optional fraction) into epoch ms.
pub fn parse_iso8601(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, mo, day) = (d.next()??, d.next()??, d.next()??);
    let (time, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = time.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, sec) = (t.next()??, t.next()??, t.next()??);
    let frac_ms: i64 = format!("{frac:0<3}").get(0..3)?.parse().ok()?;
    Some((days_from_civil(y, mo, day) * 86400 + h * 3600 + mi * 60 + sec) * 1000 + frac_ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        // 2024-02-29T12:34:56.789Z
        let ms = 1_709_210_096_789;
        assert_eq!(iso8601(ms), "2024-02-29T12:34:56.789Z");
        assert_eq!(http_date(ms), "Thu, 29 Feb 2024 12:34:56 GMT");
        assert_eq!(parse_amz_date("20240229T123456Z"), Some(ms - 789));
        assert_eq!(amz_date(ms), "20240229T123456Z");
        assert_eq!(parse_iso8601("2024-02-29T12:34:56.789Z"), Some(ms));
        assert_eq!(parse_amz_date("2024-02-29T12:34:56Z"), None);
        assert_eq!(parse_amz_date("20241329T123456Z"), None);
        assert_eq!(epoch_seconds(1500), serde_json::json!(1.5));
        assert_eq!(epoch_seconds(2000), serde_json::json!(2));
    }

    #[test]
    fn civil_round_trip() {
        for days in [-1000, 0, 1, 59, 365, 11016, 19782, 50000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }
}
