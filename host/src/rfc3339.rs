//! Times on the wire: RFC 3339, as the API sends them (UTC, milliseconds)
//! and as it accepts them (any offset, either case).

use std::time::{Duration, UNIX_EPOCH};

use crate::store::Millis;

/// RFC 3339 with milliseconds, in UTC: `2026-01-31T12:00:00.000Z`.
pub fn format(millis: Millis) -> String {
    let time = UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// An RFC 3339 time (`2026-01-31T12:00:00Z`, `2026-01-31t13:00:00.5+01:00`)
/// as milliseconds since the epoch; `None` if it is not one, or is before
/// 1970.
pub fn parse(text: &str) -> Option<Millis> {
    let text = text.trim().to_ascii_uppercase();
    let (local, offset_secs) = match text.strip_suffix('Z') {
        Some(local) => (local, 0),
        None => {
            let split = text.len().checked_sub(6)?;
            let (local, offset) = (text.get(..split)?, text.get(split..)?);
            let sign = match offset.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let (hours, minutes) = offset[1..].split_once(':')?;
            let digits = |s: &str| -> Option<i64> {
                (s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| s.parse().ok())
                    .flatten()
            };
            let (hours, minutes) = (digits(hours)?, digits(minutes)?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            (local, sign * (hours * 3600 + minutes * 60))
        }
    };
    // The date and time must be separated by `T` (or, as RFC 3339 allows
    // by agreement, a space), and the local part carry no offset of its own.
    if local.len() < 19 || local.contains(['Z', '+']) || local[10..].contains('-') {
        return None;
    }
    let utc = humantime::parse_rfc3339_weak(&format!("{local}Z")).ok()?;
    let millis = utc.duration_since(UNIX_EPOCH).ok()?.as_millis() as Millis;
    let millis = millis - offset_secs * 1000;
    (millis >= 0).then_some(millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOON: Millis = 1_769_860_800_000; // 2026-01-31T12:00:00Z

    #[test]
    fn utc_offsets_and_either_case_are_the_same_instant() {
        for text in [
            "2026-01-31T12:00:00Z",
            "2026-01-31t12:00:00z",
            "2026-01-31T13:00:00+01:00",
            "2026-01-31T07:30:00-04:30",
            "2026-01-31T12:00:00+00:00",
            "2026-01-31T12:00:00.000Z",
            "2026-01-31 12:00:00Z",
        ] {
            assert_eq!(parse(text), Some(NOON), "{text}");
        }
        assert_eq!(parse("2026-01-31T12:00:00.250+00:00"), Some(NOON + 250));
        assert_eq!(format(NOON), "2026-01-31T12:00:00.000Z");
        assert_eq!(parse(&format(NOON + 7)), Some(NOON + 7));
    }

    #[test]
    fn what_is_not_rfc_3339_is_refused() {
        for text in [
            "",
            "tomorrow",
            "2026-01-31",
            "2026-01-31T12:00:00",
            "2026-01-31T12:00:00+1:00",
            "2026-01-31T12:00:00+24:00",
            "2026-01-31T12:00:00+01:60",
            "2026-01-31T12:00:00Z+01:00",
            "2026-01-31T12:00:00+01:00Z",
            "2026-13-31T12:00:00Z",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:30:00+01:00",
            "2026-01-31T12:00:00é0:00",
        ] {
            assert_eq!(parse(text), None, "{text:?}");
        }
    }
}
