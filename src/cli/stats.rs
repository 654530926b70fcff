//! `edge-sessions stats`: the engine's live figures in the terminal,
//! refreshed every second (`GET /admin/stats`): live and idle sessions,
//! operations per second, p99 latency, the write-behind queue and flush
//! lag, the outbox, and the tenants with the most live sessions.

use std::io::IsTerminal as _;
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::output::{self, cell};
use super::remote::{CliError, Client, Remote};

/// How many tenants the view lists.
const TOP_TENANTS: usize = 5;

/// `edge-sessions stats`
#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    /// Print one reading and exit, instead of refreshing every second.
    #[arg(long)]
    once: bool,
    #[command(flatten)]
    remote: Remote,
}

impl StatsArgs {
    /// Runs the command (until interrupted, unless `--once`).
    pub async fn run(self) -> Result<(), CliError> {
        let client = Client::new(&self.remote)?;
        let terminal = std::io::stdout().is_terminal();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let stats = client.json(Method::GET, "/admin/stats", None).await?;
            let summary = Summary::of(&stats);
            if self.remote.json {
                // One JSON document per reading (NDJSON when refreshing).
                println!("{stats}");
            } else if terminal && !self.once {
                // Clear the screen and draw from the top.
                print!("\x1b[2J\x1b[H");
                summary.draw(&self.remote.url);
            } else if self.once {
                summary.draw(&self.remote.url);
            } else {
                println!("{}", summary.line());
            }
            if self.once {
                return Ok(());
            }
        }
    }
}

/// What the view shows of one reading.
struct Summary {
    uptime_seconds: u64,
    live: u64,
    idle: u64,
    ops_per_second: f64,
    p99_ms: Option<f64>,
    queue: u64,
    flush_lag_ms: u64,
    outbox: Option<(u64, u64)>,
    rss_bytes: u64,
    tenants: Vec<Value>,
}

impl Summary {
    fn of(stats: &Value) -> Self {
        let shards = stats["shards"].as_array().cloned().unwrap_or_default();
        let ops_per_second = shards
            .iter()
            .filter_map(|s| s["ops_per_second"].as_f64())
            .sum();
        // The slowest shard's p99; none without traffic (not a stale one).
        let p99_ms = shards
            .iter()
            .filter(|s| s["ops_per_second"].as_f64().unwrap_or(0.0) > 0.0)
            .filter_map(|s| s["latency_ms"]["p99"].as_f64())
            .reduce(f64::max);
        let number = |v: &Value| v.as_u64().unwrap_or(0);
        Summary {
            uptime_seconds: number(&stats["uptime_seconds"]),
            live: number(&stats["sessions"]["live"]),
            idle: number(&stats["sessions"]["idle"]),
            ops_per_second,
            p99_ms,
            queue: number(&stats["write_behind"]["queue_depth"]),
            flush_lag_ms: number(&stats["write_behind"]["flush_lag_ms"]),
            outbox: stats["outbox"].is_object().then(|| {
                (
                    number(&stats["outbox"]["depth"]),
                    number(&stats["outbox"]["oldest_entry_age_ms"]),
                )
            }),
            rss_bytes: number(&stats["process"]["rss_bytes"]),
            tenants: stats["tenants"]
                .as_array()
                .map(|t| t.iter().take(TOP_TENANTS).cloned().collect())
                .unwrap_or_default(),
        }
    }

    fn p99(&self) -> String {
        self.p99_ms
            .map_or_else(|| "—".to_owned(), |p| format!("{p:.2} ms"))
    }

    fn outbox(&self) -> String {
        self.outbox.map_or_else(
            || "off".to_owned(),
            |(depth, age)| format!("{depth} entries, oldest {age} ms"),
        )
    }

    /// One line, for a log or a pipe.
    fn line(&self) -> String {
        format!(
            "live={} idle={} ops/s={:.0} p99={} queue={} flush_lag_ms={} outbox={}",
            self.live,
            self.idle,
            self.ops_per_second,
            self.p99(),
            self.queue,
            self.flush_lag_ms,
            self.outbox()
        )
    }

    /// The full view.
    fn draw(&self, url: &str) {
        println!("edge-sessions at {url}, up {} s", self.uptime_seconds);
        output::table(
            &[
                "live",
                "idle",
                "ops/s",
                "p99",
                "queue",
                "flush lag",
                "outbox",
                "rss",
            ],
            [vec![
                self.live.to_string(),
                self.idle.to_string(),
                format!("{:.0}", self.ops_per_second),
                self.p99(),
                self.queue.to_string(),
                format!("{} ms", self.flush_lag_ms),
                self.outbox(),
                format!("{} MiB", self.rss_bytes >> 20),
            ]],
        );
        output::table(
            &["top tenants", "id", "live", "idle"],
            self.tenants.iter().map(|t| {
                vec![
                    cell(&t["name"]),
                    cell(&t["tenant_id"]),
                    cell(&t["live_sessions"]),
                    cell(&t["idle_sessions"]),
                ]
            }),
        );
    }
}
