//! Live engine figures for SREs: per shard, calls in flight (the actors'
//! mailbox depth), calls per second and call latency by operation
//! (HdrHistogram); per tenant, live and idle sessions.
//!
//! Recording is cheap on the hot path: an atomic add, and one uncontended
//! lock per (shard, operation) histogram, never a global lock. Latency
//! covers a call from the engine handle to the actor's reply (queueing on
//! the arbiter included). Histograms rotate every [`WINDOW`], and reads
//! merge the current and the previous window, so figures describe the last
//! 10–20 seconds rather than all time.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Rotation period of the latency histograms.
pub const WINDOW: Duration = Duration::from_secs(10);

/// The operations measured (message types of the session actor).
pub const OPERATIONS: [&str; 8] = [
    "get",
    "touch",
    "update",
    "refresh",
    "validate",
    "tool",
    "terminate",
    "other",
];

/// The operation name of a message type.
pub fn operation_of(type_name: &str) -> usize {
    let short = type_name.rsplit("::").next().unwrap_or(type_name);
    match short {
        "Get" | "Snapshot" | "VerifyToken" | "SealedPassthrough" => 0,
        "Touch" => 1,
        "Update" => 2,
        "Refresh" => 3,
        "Validate" => 4,
        "RecordTool" => 5,
        "Terminate" => 6,
        _ => 7,
    }
}

struct Window {
    current: Histogram<u64>,
    previous: Histogram<u64>,
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 60 s at 2 significant digits (1 % resolution, a few KiB per
    // histogram, so reads clone and merge them cheaply); constant bounds.
    Histogram::new_with_bounds(1, 60_000_000, 2).expect("valid histogram bounds")
}

/// One shard's figures.
pub struct ShardStats {
    in_flight: AtomicI64,
    calls: AtomicU64,
    latency: Vec<Mutex<Window>>,
    rate: Mutex<(Instant, u64, f64)>,
}

impl ShardStats {
    fn new() -> Self {
        ShardStats {
            in_flight: AtomicI64::new(0),
            calls: AtomicU64::new(0),
            latency: OPERATIONS
                .iter()
                .map(|_| {
                    Mutex::new(Window {
                        current: histogram(),
                        previous: histogram(),
                    })
                })
                .collect(),
            rate: Mutex::new((Instant::now(), 0, 0.0)),
        }
    }
}

/// Every shard's figures, plus per-tenant idle counts.
pub struct EngineStats {
    shards: Vec<ShardStats>,
    started: Instant,
}

/// One call being measured; records when dropped.
pub struct Call<'a> {
    shard: &'a ShardStats,
    operation: usize,
    started: Instant,
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.shard.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.shard.calls.fetch_add(1, Ordering::Relaxed);
        let micros = self.started.elapsed().as_micros().clamp(1, 60_000_000) as u64;
        if let Ok(mut window) = self.shard.latency[self.operation].lock() {
            let _ = window.current.record(micros);
        }
    }
}

/// What the stats page shows for one shard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShardSnapshot {
    /// The shard's number.
    pub id: usize,
    /// Live session actors on it.
    pub live_actors: i64,
    /// Calls sent to its actors and not yet answered.
    pub mailbox_depth: i64,
    /// Calls answered per second since the previous reading.
    pub ops_per_second: f64,
    /// Latency over all operations, in ms.
    pub latency_ms: Percentiles,
    /// Latency per operation, in ms (operations with calls only).
    pub operations: Vec<OperationSnapshot>,
}

/// One operation's latency on one shard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OperationSnapshot {
    /// `get`, `touch`, `tool`, …
    pub operation: &'static str,
    /// Calls in the window.
    pub count: u64,
    /// Latency, in ms.
    pub latency_ms: Percentiles,
}

/// p50, p99, p999 in milliseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    if h.is_empty() {
        return Percentiles::default();
    }
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Percentiles {
        p50: ms(0.50),
        p99: ms(0.99),
        p999: ms(0.999),
    }
}

impl EngineStats {
    /// Figures for `shards` shards.
    pub fn new(shards: usize) -> Self {
        EngineStats {
            shards: (0..shards.max(1)).map(|_| ShardStats::new()).collect(),
            started: Instant::now(),
        }
    }

    /// Starts measuring a call of message type `type_name` to `shard`.
    pub fn call(&self, shard: usize, type_name: &str) -> Call<'_> {
        let shard = &self.shards[shard.min(self.shards.len() - 1)];
        shard.in_flight.fetch_add(1, Ordering::Relaxed);
        Call {
            shard,
            operation: operation_of(type_name),
            started: Instant::now(),
        }
    }

    /// Seconds since the engine started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// Starts a new histogram window (every [`WINDOW`]).
    pub fn rotate(&self) {
        for shard in &self.shards {
            for window in &shard.latency {
                if let Ok(mut window) = window.lock() {
                    let current = std::mem::replace(&mut window.current, histogram());
                    window.previous = current;
                }
            }
        }
    }

    /// The shards' figures; `actors` are the live actors per shard.
    pub fn shards(&self, actors: &[i64]) -> Vec<ShardSnapshot> {
        self.shards
            .iter()
            .enumerate()
            .map(|(id, shard)| {
                let mut all = histogram();
                let mut operations = Vec::new();
                for (i, window) in shard.latency.iter().enumerate() {
                    let Ok(window) = window.lock() else { continue };
                    let mut merged = window.previous.clone();
                    let _ = merged.add(&window.current);
                    if !merged.is_empty() {
                        let _ = all.add(&merged);
                        operations.push(OperationSnapshot {
                            operation: OPERATIONS[i],
                            count: merged.len(),
                            latency_ms: percentiles(&merged),
                        });
                    }
                }
                let calls = shard.calls.load(Ordering::Relaxed);
                let ops_per_second = match shard.rate.lock() {
                    Ok(mut rate) => {
                        let elapsed = rate.0.elapsed().as_secs_f64();
                        // Readings closer than half a second reuse the last
                        // rate (several viewers polling at once).
                        if elapsed >= 0.5 {
                            rate.2 = (calls - rate.1) as f64 / elapsed;
                            *rate = (Instant::now(), calls, rate.2);
                        }
                        rate.2
                    }
                    Err(_) => 0.0,
                };
                ShardSnapshot {
                    id,
                    live_actors: actors.get(id).copied().unwrap_or(0),
                    mailbox_depth: shard.in_flight.load(Ordering::Relaxed).max(0),
                    ops_per_second,
                    latency_ms: percentiles(&all),
                    operations,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_counted_and_timed_per_shard_and_operation() {
        let stats = EngineStats::new(2);
        {
            let _a = stats.call(1, "edge_sessions::engine::session::Get");
            let _b = stats.call(1, "edge_sessions::engine::session::RecordTool");
            assert_eq!(stats.shards(&[0, 0])[1].mailbox_depth, 2);
        }
        let shards = stats.shards(&[3, 4]);
        assert_eq!(shards[1].mailbox_depth, 0);
        assert_eq!(shards[1].live_actors, 4);
        let ops: Vec<_> = shards[1].operations.iter().map(|o| o.operation).collect();
        assert_eq!(ops, ["get", "tool"]);
        assert!(shards[0].operations.is_empty());
        stats.rotate();
        stats.rotate();
        assert!(
            stats.shards(&[0, 0])[1].operations.is_empty(),
            "two windows later it is gone"
        );
    }
}
