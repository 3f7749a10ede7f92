//! Time in clickagg: record times, ticks, windows and when a window becomes final.
//!
//! Two clocks meet here. *Record time* is assigned once at ingest and stored in the log;
//! rounded up to a tick it is the timely timestamp, so a replay of the log assigns every
//! record the same time. *Event time* is data: it decides the window a click counts in.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Milliseconds since the Unix epoch.
pub type Millis = u64;

/// The timely timestamp of every dataflow: record time in ms, a multiple of the tick.
pub type Time = u64;

/// The current wall-clock time in milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// The tick that record times are rounded up to before they become timely times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    ms: u64,
}

impl Tick {
    /// A tick of the given length; lengths are validated by the config to 1 ms or more.
    pub fn new(length: Duration) -> Self {
        Tick {
            ms: (length.as_millis() as u64).max(1),
        }
    }

    /// The tick length in milliseconds.
    pub fn ms(&self) -> u64 {
        self.ms
    }

    /// The timely time of a record: its record time rounded up to the next tick boundary.
    pub fn time_of(&self, record_ms: Millis) -> Time {
        record_ms.div_ceil(self.ms) * self.ms
    }

    /// A duration rounded up to a whole number of ticks, in ms.
    pub fn round_up(&self, d: Duration) -> u64 {
        self.time_of(d.as_millis() as u64)
    }
}

/// A window length the API and the rollups understand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Granularity {
    /// One minute.
    #[serde(rename = "1m")]
    Minute,
    /// Five minutes.
    #[serde(rename = "5m")]
    FiveMinutes,
    /// One hour.
    #[serde(rename = "1h")]
    Hour,
    /// One day (UTC).
    #[serde(rename = "1d")]
    Day,
}

impl Granularity {
    /// Every granularity, finest first.
    pub const ALL: [Granularity; 4] = [
        Granularity::Minute,
        Granularity::FiveMinutes,
        Granularity::Hour,
        Granularity::Day,
    ];

    /// The window length in milliseconds.
    pub const fn ms(self) -> u64 {
        match self {
            Granularity::Minute => 60_000,
            Granularity::FiveMinutes => 300_000,
            Granularity::Hour => 3_600_000,
            Granularity::Day => 86_400_000,
        }
    }

    /// The name used in URLs and tables: `1m`, `5m`, `1h`, `1d`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "1m",
            Granularity::FiveMinutes => "5m",
            Granularity::Hour => "1h",
            Granularity::Day => "1d",
        }
    }

    /// Parses `1m`, `5m`, `1h` or `1d`.
    pub fn parse(s: &str) -> Option<Granularity> {
        Granularity::ALL.into_iter().find(|g| g.as_str() == s)
    }

    /// The start of the window containing `t`.
    pub const fn align(self, t: Millis) -> Millis {
        t - t % self.ms()
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The start of the one-minute window containing `t`.
pub const fn minute_of(t: Millis) -> Millis {
    Granularity::Minute.align(t)
}

/// When windows stop changing, derived from the impression TTL and the correction window.
///
/// A click counts in the window of its event time, and event times are clamped into
/// `[record time - TTL, record time]`, so no click of a window arrives later than
/// `window end + TTL`. Fraud verdicts may still move clicks for `correction` after that.
/// From then on the window is final: the sink stores no further change to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Finality {
    /// The impression TTL in ms.
    pub ttl_ms: u64,
    /// The correction window in ms.
    pub correction_ms: u64,
}

impl Finality {
    /// The record time from which a window `[start, start + length)` is final.
    pub fn final_at(&self, window_start: Millis, window_ms: u64) -> Time {
        window_start
            .saturating_add(window_ms)
            .saturating_add(self.ttl_ms)
            .saturating_add(self.correction_ms)
    }

    /// Whether a window is final once the frontier has reached `frontier`.
    pub fn is_final(&self, window_start: Millis, window_ms: u64, frontier: Time) -> bool {
        self.final_at(window_start, window_ms) <= frontier
    }
}

/// Formats epoch milliseconds as an RFC 3339 UTC string with millisecond precision.
pub fn rfc3339(ms: Millis) -> String {
    let nanos = i128::from(ms) * 1_000_000;
    OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
            .ok()
        })
        .unwrap_or_else(|| ms.to_string())
}

/// Parses an RFC 3339 timestamp (any offset) into epoch milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    let ms = t.unix_timestamp_nanos() / 1_000_000;
    u64::try_from(ms).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_round_up_and_are_stable() {
        let tick = Tick::new(Duration::from_millis(200));
        assert_eq!(tick.time_of(0), 0);
        assert_eq!(tick.time_of(1), 200);
        assert_eq!(tick.time_of(200), 200);
        assert_eq!(tick.time_of(201), 400);
    }

    #[test]
    fn granularities_align_down() {
        assert_eq!(
            Granularity::FiveMinutes.align(1_700_000_123_456),
            1_700_000_100_000
        );
        assert_eq!(Granularity::Day.align(86_400_000 * 3 + 5), 86_400_000 * 3);
        assert_eq!(Granularity::parse("1h"), Some(Granularity::Hour));
        assert_eq!(Granularity::parse("2h"), None);
    }

    #[test]
    fn rfc3339_round_trips() {
        let ms = 1_764_000_000_123;
        let s = rfc3339(ms);
        assert_eq!(s, "2025-11-24T16:00:00.123Z");
        assert_eq!(parse_rfc3339(&s), Some(ms));
        assert_eq!(parse_rfc3339("2025-11-24T17:00:00.123+01:00"), Some(ms));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn windows_become_final_after_ttl_and_correction() {
        let f = Finality {
            ttl_ms: 600_000,
            correction_ms: 120_000,
        };
        let w = Granularity::Minute.align(1_700_000_040_000);
        assert_eq!(f.final_at(w, 60_000), w + 60_000 + 720_000);
        assert!(!f.is_final(w, 60_000, w + 779_999));
        assert!(f.is_final(w, 60_000, w + 780_000));
    }
}
