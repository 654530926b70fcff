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

/// The engine's source of "now": the wall clock plus an offset that only
/// tests move, so expiry is tested by jumping time instead of sleeping.
#[derive(Debug, Clone, Default)]
pub struct Clock {
    offset_ms: std::sync::Arc<std::sync::atomic::AtomicI64>,
}

impl Clock {
    /// The wall clock.
    pub fn system() -> Self {
        Clock::default()
    }

    /// The current time on this clock.
    pub fn now(&self) -> Millis {
        now_ms() + self.offset_ms.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Moves this clock (and every copy of it) forward by `by`.
    pub fn advance(&self, by: std::time::Duration) {
        self.offset_ms.fetch_add(
            by.as_millis() as Millis,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
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
    fn a_clock_moves_with_all_its_copies() {
        let clock = Clock::system();
        let copy = clock.clone();
        let before = copy.now();
        clock.advance(std::time::Duration::from_secs(3600));
        assert!(copy.now() - before >= 3_600_000);
    }

    #[test]
    fn garbage_is_rejected() {
        assert!(parse_rfc3339("yesterday").is_none());
    }
}
