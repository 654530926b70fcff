//! Wall-clock instants as Unix milliseconds, and their RFC 3339 form.
//!
//! Instants are wall-clock because they outlive the process: a session's
//! deadlines are persisted and recomputed after a restart.

use chrono::{DateTime, SecondsFormat, Utc};

/// Milliseconds since the Unix epoch, UTC.
pub type Millis = i64;

/// The current wall-clock time.
pub fn now_ms() -> Millis {
    Utc::now().timestamp_millis()
}

/// Formats an instant as RFC 3339 UTC with milliseconds (`2026-11-23T22:18:06.123Z`).
pub fn format_rfc3339(ms: Millis) -> String {
    match DateTime::<Utc>::from_timestamp_millis(ms) {
        Some(t) => t.to_rfc3339_opts(SecondsFormat::Millis, true),
        // Out of chrono's range (±262,000 years); every instant we store comes
        // from the clock or a validated input, so this is unreachable in practice.
        None => "1970-01-01T00:00:00.000Z".to_owned(),
    }
}

/// Parses an RFC 3339 timestamp into Unix milliseconds.
pub fn parse_rfc3339(text: &str) -> Option<Millis> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc).timestamp_millis())
}

/// Converts whole seconds to milliseconds.
pub fn secs(seconds: u32) -> Millis {
    i64::from(seconds) * 1000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_with_milliseconds() {
        let text = "2026-11-23T22:18:06.123Z";
        let ms = parse_rfc3339(text).unwrap();
        assert_eq!(format_rfc3339(ms), text);
    }

    #[test]
    fn offsets_are_normalised_to_utc() {
        let ms = parse_rfc3339("2026-11-23T23:18:06.123+01:00").unwrap();
        assert_eq!(format_rfc3339(ms), "2026-11-23T22:18:06.123Z");
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(parse_rfc3339("yesterday").is_none());
    }
}
