//! The dashboard's last 15 minutes, kept on the server: one [`Sample`] a
//! second in a ring of [`KEEP`], so a reloaded page (or a second operator)
//! sees the history at once instead of an empty chart. A task takes the
//! samples ([`sample_forever`]); the stats WebSocket sends the whole ring
//! as its first message, then one reading a second.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::AppState;
use crate::engine::Engine;
use crate::model::time::now_ms;
use crate::telemetry::live::{self, Counters};

/// Samples kept: 15 minutes at one a second.
pub const KEEP: usize = 900;
/// How often a sample is taken.
pub const EVERY: Duration = Duration::from_secs(1);

/// The engine over one second.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Sample {
    /// When (ms since the Unix epoch).
    pub at_ms: i64,
    /// Live sessions.
    pub live_sessions: u64,
    /// Calls the session actors answered per second.
    pub ops_per_second: f64,
    /// The slowest shard's p99 latency in ms; null when nothing was called
    /// in the second (a p99 of no traffic would be a stale one).
    pub p99_ms: Option<f64>,
    /// HTTP answers per second with a 2xx status.
    pub ok_per_second: f64,
    /// … with a 4xx status.
    pub client_errors_per_second: f64,
    /// … with a 5xx status.
    pub server_errors_per_second: f64,
    /// Open session WebSockets.
    pub websockets_open: i64,
    /// Tool executions recorded per second.
    pub tool_executions_per_second: f64,
}

/// The ring of samples.
#[derive(Default)]
pub struct History {
    ring: Mutex<VecDeque<Sample>>,
    /// The counters at the previous sample, and when.
    previous: Mutex<Option<(Instant, Counters)>>,
}

impl History {
    /// Takes a sample now from `engine` and the process counters.
    pub fn record(&self, engine: &Engine) -> Sample {
        let now = live::counters();
        let at = Instant::now();
        let (elapsed, before) = {
            let mut previous = self.previous.lock().unwrap_or_else(|e| e.into_inner());
            let before = previous.replace((at, now));
            match before {
                Some((then, counters)) => (at.duration_since(then).as_secs_f64(), counters),
                None => (0.0, now),
            }
        };
        let rate = |now: u64, before: u64| {
            if elapsed > 0.0 {
                now.saturating_sub(before) as f64 / elapsed
            } else {
                0.0
            }
        };
        let shards = engine.shard_stats();
        let ops_per_second: f64 = shards.iter().map(|s| s.ops_per_second).sum();
        let p99_ms = shards
            .iter()
            .filter(|s| s.ops_per_second > 0.0)
            .map(|s| s.latency_ms.p99)
            .reduce(f64::max);
        let sample = Sample {
            at_ms: now_ms(),
            live_sessions: engine.live_by_tenant().iter().map(|t| t.1 as u64).sum(),
            ops_per_second,
            p99_ms,
            ok_per_second: rate(now.answers[1], before.answers[1]),
            client_errors_per_second: rate(now.answers[3], before.answers[3]),
            server_errors_per_second: rate(now.answers[4], before.answers[4]),
            websockets_open: now.websockets_open,
            tool_executions_per_second: rate(now.tool_executions, before.tool_executions),
        };
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == KEEP {
            ring.pop_front();
        }
        ring.push_back(sample.clone());
        sample
    }

    /// Every sample kept, oldest first.
    pub fn all(&self) -> Vec<Sample> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().cloned().collect()
    }

    /// The newest sample.
    pub fn latest(&self) -> Option<Sample> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.back().cloned()
    }
}

/// Takes a sample every second, for as long as it runs.
pub async fn sample_forever(state: AppState) {
    let mut ticker = tokio::time::interval(EVERY);
    loop {
        ticker.tick().await;
        state.history.record(&state.engine);
    }
}
