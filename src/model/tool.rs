//! Tool executions and the compact per-tool statistics a session keeps.

use serde::{Deserialize, Serialize};

use super::time::Millis;

/// Longest `duration_ms` a tool execution may report: 24 hours. A longer
/// one is a client bug (or an attempt to skew the averages), refused with
/// 400 `validation_failed`.
pub const MAX_DURATION_MS: u64 = 24 * 60 * 60 * 1000;

/// One recorded tool call, as stored and as listed by `tools/executions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolExecution {
    /// The tool's name, 1–255 characters.
    pub tool_name: String,
    /// The caller's id for this call, if any.
    pub tool_id: Option<String>,
    /// The call's arguments as JSON text.
    pub arguments: String,
    /// The call's result as JSON text.
    pub result: String,
    /// The error, when the call failed.
    pub error: Option<String>,
    /// How long the call took, at most [`MAX_DURATION_MS`].
    pub duration_ms: u64,
    /// Tokens the call used.
    pub tokens_used: u64,
    /// When the call happened (the caller's timestamp, or arrival).
    pub executed_at: Millis,
    /// When the engine recorded it (server clock); replayed as the
    /// activity time when a session is rebuilt from its executions.
    pub recorded_at: Millis,
}

/// Counters for one tool within one session.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ToolStats {
    /// The tool's name.
    pub name: Box<str>,
    /// Executions, failed ones included.
    pub count: u64,
    /// Executions with a non-null error.
    pub errors: u64,
    /// Tokens used over all executions.
    pub tokens: u64,
    /// Duration distribution.
    pub durations: DurationStats,
}

/// Durations below this many milliseconds get a bucket each (exact).
const EXACT_BELOW: u64 = 16;
/// Sub-buckets per power of two above [`EXACT_BELOW`]: 8 gives at most
/// 6.25 % error on a quantile's representative value.
const SUB_BUCKET_BITS: u32 = 3;

/// A sparse log-linear histogram of durations in milliseconds.
///
/// A full HdrHistogram costs kilobytes; a session usually sees a handful of
/// distinct durations per tool, so this keeps only non-empty buckets
/// (`(bucket, count)` pairs sorted by bucket), plus the exact sum and max.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DurationStats {
    sum_ms: u64,
    max_ms: u64,
    buckets: Vec<(u16, u32)>,
}

impl DurationStats {
    /// Records one duration.
    pub fn record(&mut self, ms: u64) {
        self.sum_ms = self.sum_ms.saturating_add(ms);
        self.max_ms = self.max_ms.max(ms);
        let bucket = bucket_of(ms);
        match self.buckets.binary_search_by_key(&bucket, |&(b, _)| b) {
            Ok(i) => self.buckets[i].1 = self.buckets[i].1.saturating_add(1),
            Err(i) => self.buckets.insert(i, (bucket, 1)),
        }
    }

    /// Number of recorded durations.
    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|&(_, c)| u64::from(c)).sum()
    }

    /// The mean duration, 0 when empty.
    pub fn mean(&self) -> f64 {
        match self.count() {
            0 => 0.0,
            n => self.sum_ms as f64 / n as f64,
        }
    }

    /// The largest duration, exact.
    pub fn max(&self) -> u64 {
        self.max_ms
    }

    /// The `q`-quantile (0 < q <= 1): the representative value of the bucket
    /// holding it, or the exact maximum when that is the highest bucket.
    pub fn quantile(&self, q: f64) -> u64 {
        let total = self.count();
        if total == 0 {
            return 0;
        }
        let rank = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut seen = 0u64;
        let last = self.buckets.len() - 1;
        for (i, &(bucket, count)) in self.buckets.iter().enumerate() {
            seen += u64::from(count);
            if seen >= rank {
                // The maximum lies in the highest bucket: use it, exact.
                return if i == last {
                    self.max_ms
                } else {
                    representative(bucket)
                };
            }
        }
        self.max_ms
    }
}

fn bucket_of(ms: u64) -> u16 {
    if ms < EXACT_BELOW {
        return ms as u16;
    }
    let exponent = 63 - ms.leading_zeros(); // >= 4
    let sub = (ms >> (exponent - SUB_BUCKET_BITS)) & ((1 << SUB_BUCKET_BITS) - 1);
    (EXACT_BELOW + u64::from(exponent - 4) * (1 << SUB_BUCKET_BITS) + sub) as u16
}

fn bounds_of(bucket: u16) -> (u64, u64) {
    let b = u64::from(bucket);
    if b < EXACT_BELOW {
        return (b, b);
    }
    let step = b - EXACT_BELOW;
    let exponent = 4 + (step >> SUB_BUCKET_BITS) as u32;
    let sub = step & ((1 << SUB_BUCKET_BITS) - 1);
    let width = 1u64 << (exponent - SUB_BUCKET_BITS);
    let low = (1u64 << exponent) + sub * width;
    (low, low + (width - 1))
}

fn representative(bucket: u16) -> u64 {
    let (low, high) = bounds_of(bucket);
    low + (high - low) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_durations_are_exact() {
        let mut stats = DurationStats::default();
        for ms in [1, 2, 3, 4, 5] {
            stats.record(ms);
        }
        assert_eq!(stats.count(), 5);
        assert_eq!(stats.mean(), 3.0);
        assert_eq!(stats.quantile(0.5), 3);
        assert_eq!(stats.quantile(0.99), 5);
        assert_eq!(stats.max(), 5);
    }

    #[test]
    fn every_value_falls_inside_its_bucket() {
        for ms in (0..5000).chain([u64::MAX / 3, u64::MAX]) {
            let (low, high) = bounds_of(bucket_of(ms));
            assert!(low <= ms && ms <= high, "{ms} not in [{low}, {high}]");
        }
    }

    #[test]
    fn quantiles_stay_within_a_sixteenth() {
        let mut stats = DurationStats::default();
        for ms in 1..=1000 {
            stats.record(ms);
        }
        let p50 = stats.quantile(0.5) as f64;
        let p99 = stats.quantile(0.99) as f64;
        assert!((p50 - 500.0).abs() / 500.0 <= 0.0625, "p50 {p50}");
        assert!((p99 - 990.0).abs() / 990.0 <= 0.0625, "p99 {p99}");
        assert_eq!(stats.max(), 1000);
        assert_eq!(stats.mean(), 500.5);
    }

    #[test]
    fn a_single_sample_is_exact() {
        let mut stats = DurationStats::default();
        stats.record(800);
        assert_eq!(
            (stats.quantile(0.5), stats.quantile(0.99), stats.max()),
            (800, 800, 800)
        );
    }

    #[test]
    fn stays_small_for_repeated_values() {
        let mut stats = DurationStats::default();
        for _ in 0..10_000 {
            stats.record(42);
        }
        assert_eq!(stats.buckets.len(), 1);
        assert_eq!(stats.quantile(0.5), 42, "one bucket: the exact maximum");
    }
}
