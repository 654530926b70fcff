//! Prometheus metrics through the `metrics` facade and
//! `metrics-exporter-prometheus`, rendered at `GET /metrics`.
//!
//! Counters and histograms are recorded where things happen (cheap: an
//! atomic add per event); gauges that mirror engine state (live sessions,
//! queue depths, actors per shard) are set when the page is scraped. Labels
//! stay low-cardinality: tenant ids, client types, routes, statuses and
//! shard numbers, never session ids.

use std::sync::OnceLock;

use metrics::{Counter, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// `sessions_created_total{tenant_id,client_type}`: sessions admitted.
pub const SESSIONS_CREATED: &str = "sessions_created_total";
/// `sessions_active{tenant_id}`: live sessions (active or idle).
pub const SESSIONS_ACTIVE: &str = "sessions_active";
/// `session_duration_seconds{tenant_id,client_type}`: lifetime of ended sessions.
pub const SESSION_DURATION: &str = "session_duration_seconds";
/// `sessions_ended_total{tenant_id,status}`: sessions that became final.
pub const SESSIONS_ENDED: &str = "sessions_ended_total";
/// `http_requests_total{method,route,status}`.
pub const HTTP_REQUESTS: &str = "http_requests_total";
/// `http_request_duration_seconds{method,route}`.
pub const HTTP_DURATION: &str = "http_request_duration_seconds";
/// `tool_executions_total{tenant_id}`.
pub const TOOL_EXECUTIONS: &str = "tool_executions_total";
/// `tool_execution_errors_total{tenant_id}`.
pub const TOOL_ERRORS: &str = "tool_execution_errors_total";
/// `write_behind_queue_depth`: commands waiting for the flusher.
pub const WRITE_BEHIND_DEPTH: &str = "write_behind_queue_depth";
/// `write_behind_batch_size`: changes per group commit.
pub const WRITE_BEHIND_BATCH: &str = "write_behind_batch_size";
/// `write_behind_flush_seconds`: apply + fsync time per group commit.
pub const WRITE_BEHIND_FLUSH: &str = "write_behind_flush_seconds";
/// `write_behind_flush_lag_seconds`: with changes queued, time since the
/// last group commit (0 when nothing waits).
pub const WRITE_BEHIND_LAG: &str = "write_behind_flush_lag_seconds";
/// `outbox_depth`: entries waiting for PostgreSQL (tier on only).
pub const OUTBOX_DEPTH: &str = "outbox_depth";
/// `outbox_oldest_entry_age_seconds` (tier on only).
pub const OUTBOX_AGE: &str = "outbox_oldest_entry_age_seconds";
/// `outbox_shipped_total` (tier on only).
pub const OUTBOX_SHIPPED: &str = "outbox_shipped_total";
/// `session_actors{shard}`: live session actors per arbiter.
pub const SESSION_ACTORS: &str = "session_actors";
/// `websocket_connections_open`: open session WebSockets.
pub const WS_OPEN: &str = "websocket_connections_open";
/// `session_actor_restarts_total`: actors restarted after a panic.
pub const ACTOR_RESTARTS: &str = "session_actor_restarts_total";
/// 1 while `/readyz` would answer 200, else 0.
pub const READY: &str = "ready";
/// A tenant's `max_active_sessions`, for alerts on `sessions_active`.
pub const TENANT_LIMIT: &str = "tenant_max_active_sessions";
/// `cluster_shards_owned`: shards this node serves (cluster only).
pub const CLUSTER_SHARDS_OWNED: &str = "cluster_shards_owned";
/// `cluster_nodes{status}`: nodes alive and gone (cluster only).
pub const CLUSTER_NODES: &str = "cluster_nodes";
/// `cluster_forwarded_calls_total{outcome}`: calls forwarded to another
/// node (`sent`), or not sent there (`unreachable`, waited and retried).
pub const CLUSTER_FORWARDED: &str = "cluster_forwarded_calls_total";
/// `cluster_handover_seconds{kind}`: taking a shard over (`adopt`: its
/// sessions rebuilt) and handing one over (`drain`).
pub const CLUSTER_HANDOVER: &str = "cluster_handover_seconds";

/// Counts a forwarded call.
pub fn cluster_forwarded(sent: bool) {
    let outcome = if sent { "sent" } else { "unreachable" };
    metrics::counter!(CLUSTER_FORWARDED, "outcome" => outcome).increment(1);
}

/// Records how long a shard's hand-over step took (`adopt` or `drain`).
pub fn cluster_handover(kind: &'static str, took: std::time::Duration) {
    metrics::histogram!(CLUSTER_HANDOVER, "kind" => kind).record(took.as_secs_f64());
}

/// Always 1, labelled with the running version.
pub const BUILD_INFO: &str = "build_info";

/// `session_duration_seconds` buckets: 60·2^k s, k = 0..9 (the contract).
pub const DURATION_BUCKETS: [f64; 10] = [
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3840.0, 7680.0, 15360.0, 30720.0,
];
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
const BATCH_BUCKETS: [f64; 10] = [
    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
];

/// A tenant's per-call metric handles, resolved once per tenant: a
/// recording through a label lookup builds and hashes the key and searches
/// the registry, a handle is one atomic add.
#[derive(Clone)]
pub struct TenantHandles {
    /// `tool_executions_total{tenant_id}`.
    pub tool_executions: Counter,
    /// `tool_execution_errors_total{tenant_id}`.
    pub tool_errors: Counter,
    tenant: String,
    /// `sessions_created_total{tenant_id,client_type}` by client type.
    created: Vec<(&'static str, Counter)>,
}

impl TenantHandles {
    /// Resolves the handles of `tenant` for the given client types.
    pub fn new(tenant: String, client_types: &[&'static str]) -> Self {
        // A handle resolved before the recorder is installed records
        // nowhere, for good.
        handle();
        TenantHandles {
            tool_executions: metrics::counter!(TOOL_EXECUTIONS, "tenant_id" => tenant.clone()),
            tool_errors: metrics::counter!(TOOL_ERRORS, "tenant_id" => tenant.clone()),
            created: client_types
                .iter()
                .map(|&client_type| {
                    let counter = metrics::counter!(
                        SESSIONS_CREATED,
                        "tenant_id" => tenant.clone(),
                        "client_type" => client_type
                    );
                    (client_type, counter)
                })
                .collect(),
            tenant,
        }
    }

    /// `sessions_created_total` for `client_type`.
    pub fn created(&self, client_type: &'static str) -> Counter {
        match self.created.iter().find(|(c, _)| *c == client_type) {
            Some((_, counter)) => counter.clone(),
            None => metrics::counter!(
                SESSIONS_CREATED,
                "tenant_id" => self.tenant.clone(),
                "client_type" => client_type
            ),
        }
    }
}

/// The handles of `http_requests_total` and `http_request_duration_seconds`
/// for one method and route, with a counter per status seen.
pub struct RouteHandles {
    method: &'static str,
    route: String,
    /// `http_request_duration_seconds{method,route}`.
    pub duration: Histogram,
    statuses: Vec<(u16, Counter)>,
}

impl RouteHandles {
    /// Resolves the handles of `method` on `route`.
    pub fn new(method: &'static str, route: &str) -> Self {
        handle();
        RouteHandles {
            method,
            route: route.to_owned(),
            duration: metrics::histogram!(
                HTTP_DURATION,
                "method" => method,
                "route" => route.to_owned()
            ),
            statuses: Vec::new(),
        }
    }

    /// `http_requests_total{method,route,status}`, resolved at its first use.
    pub fn requests(&mut self, status: u16) -> &Counter {
        let at = match self.statuses.iter().position(|(s, _)| *s == status) {
            Some(at) => at,
            None => {
                let counter = metrics::counter!(
                    HTTP_REQUESTS,
                    "method" => self.method,
                    "route" => self.route.clone(),
                    "status" => status.to_string()
                );
                self.statuses.push((status, counter));
                self.statuses.len() - 1
            }
        };
        &self.statuses[at].1
    }
}

/// The process-wide recorder (installed once; later calls share it, so
/// several servers in one test process all render the same registry).
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(SESSION_DURATION.into()), &DURATION_BUCKETS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(HTTP_DURATION.into()), &LATENCY_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(WRITE_BEHIND_FLUSH.into()), &LATENCY_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(WRITE_BEHIND_BATCH.into()), &BATCH_BUCKETS)
            })
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full(CLUSTER_HANDOVER.into()), &LATENCY_BUCKETS)
            })
            // The bucket lists are constants and non-empty.
            .expect("valid histogram buckets");
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows this one's");
        }
        describe();
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        process_collector().describe();
        handle
    })
}

/// The collector of the standard `process_*` metrics, read at each scrape.
pub fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Drains the histograms' sample buffers into their buckets every few
/// seconds, for as long as the server runs. Without it, samples recorded
/// between two scrapes would pile up in memory (or forever, with nobody
/// scraping).
pub async fn upkeep_forever() {
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(5));
    loop {
        ticker.tick().await;
        handle().run_upkeep();
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(SESSIONS_CREATED, "Sessions admitted");
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which release runs"
    );
    describe_gauge!(
        READY,
        "1 while /readyz answers 200 (recovered, the store takes writes), else 0"
    );
    describe_gauge!(TENANT_LIMIT, "The tenant's max_active_sessions");
    describe_gauge!(SESSIONS_ACTIVE, "Live sessions (active or idle)");
    describe_histogram!(
        SESSION_DURATION,
        Unit::Seconds,
        "Lifetime of sessions that ended"
    );
    describe_counter!(
        SESSIONS_ENDED,
        "Sessions that became final, by final status"
    );
    describe_counter!(HTTP_REQUESTS, "HTTP requests answered");
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "HTTP request latency");
    describe_counter!(TOOL_EXECUTIONS, "Tool executions recorded");
    describe_counter!(TOOL_ERRORS, "Tool executions recorded with an error");
    describe_gauge!(
        WRITE_BEHIND_DEPTH,
        "Commands waiting for the write-behind flusher"
    );
    describe_histogram!(WRITE_BEHIND_BATCH, "Changes per group commit");
    describe_histogram!(
        WRITE_BEHIND_FLUSH,
        Unit::Seconds,
        "Apply and fsync time per group commit"
    );
    describe_gauge!(
        WRITE_BEHIND_LAG,
        Unit::Seconds,
        "Time since the last group commit"
    );
    describe_gauge!(OUTBOX_DEPTH, "Outbox entries waiting for PostgreSQL");
    describe_gauge!(OUTBOX_AGE, Unit::Seconds, "Age of the oldest outbox entry");
    describe_counter!(OUTBOX_SHIPPED, "Outbox entries committed to PostgreSQL");
    describe_gauge!(SESSION_ACTORS, "Live session actors per shard (arbiter)");
    describe_counter!(ACTOR_RESTARTS, "Session actors restarted after a panic");
    describe_gauge!(WS_OPEN, "Open session WebSockets");
    describe_gauge!(CLUSTER_SHARDS_OWNED, "Cluster shards this node serves");
    describe_gauge!(CLUSTER_NODES, "Cluster nodes by status (alive, gone)");
    describe_counter!(
        CLUSTER_FORWARDED,
        "Calls forwarded to the owner of their shard"
    );
    describe_histogram!(
        CLUSTER_HANDOVER,
        Unit::Seconds,
        "Taking a shard over (adopt) and handing one over (drain)"
    );
}
