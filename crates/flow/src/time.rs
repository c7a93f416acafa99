//! RFC 3339 timestamps with nanoseconds (UTC), as Hubble prints them. Fixed width, so they sort
//! as strings.

/// Formats nanoseconds since the Unix epoch as `2026-11-29T18:49:15.123456789Z`.
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = unix_ns / 1_000_000_000;
    let nanos = unix_ns % 1_000_000_000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// `Nov 29 18:49:15.123` (Hubble's compact format), from an RFC 3339 string we produced.
pub fn compact(rfc: &str) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = rfc
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)));
    match (month, rfc.get(8..10), rfc.get(11..23)) {
        (Some(month), Some(day), Some(clock)) => format!("{month} {day} {clock}"),
        _ => rfc.to_string(),
    }
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        // 2026-11-29T18:49:15Z = 1795978155
        assert_eq!(
            rfc3339(1_795_978_155_000_000_123),
            "2026-11-29T18:49:15.000000123Z"
        );
        // Leap day.
        assert_eq!(
            rfc3339(951_782_400_000_000_000),
            "2000-02-29T00:00:00.000000000Z"
        );
        assert_eq!(
            compact("2026-11-29T18:49:15.123456789Z"),
            "Nov 29 18:49:15.123"
        );
    }

    proptest::proptest! {
        #[test]
        fn order_of_strings_is_order_of_time(a in 0u64..4_000_000_000_000_000_000, b in 0u64..4_000_000_000_000_000_000) {
            proptest::prop_assert_eq!(a.cmp(&b), rfc3339(a).cmp(&rfc3339(b)));
        }
    }
}
