//! `GET /metrics`: the Prometheus text format (no key; scrape it from the
//! operators' network). Gauges mirroring engine state are set here, at
//! scrape time; counters and histograms are recorded where things happen.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::AppState;
use crate::telemetry::metrics as names;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/metrics", get(render))
}

/// Sets the state gauges from the engine, then renders every metric.
async fn render(State(state): State<AppState>) -> Response {
    let engine = &state.engine;
    for (tenant, live) in engine.live_by_tenant() {
        metrics::gauge!(names::SESSIONS_ACTIVE, "tenant_id" => tenant.to_string()).set(live as f64);
    }
    for (shard, actors) in engine.actors_per_shard().into_iter().enumerate() {
        metrics::gauge!(names::SESSION_ACTORS, "shard" => shard.to_string()).set(actors as f64);
    }
    for (tenant, limit) in engine.tenant_limits() {
        metrics::gauge!(names::TENANT_LIMIT, "tenant_id" => tenant.to_string()).set(limit as f64);
    }
    let ready = engine.is_ready() && engine.check_writable().await.is_ok();
    metrics::gauge!(names::READY).set(if ready { 1.0 } else { 0.0 });
    metrics::counter!(names::ACTOR_RESTARTS).absolute(engine.restarts());
    let wb = engine.write_behind_stats();
    metrics::gauge!(names::WRITE_BEHIND_DEPTH).set(wb.queue_depth.load(Ordering::Relaxed) as f64);
    metrics::gauge!(names::WRITE_BEHIND_LAG).set(wb.flush_lag_ms() as f64 / 1000.0);
    if let Some(outbox) = engine.outbox_stats() {
        metrics::gauge!(names::OUTBOX_DEPTH).set(outbox.depth() as f64);
        metrics::gauge!(names::OUTBOX_AGE).set(outbox.oldest_age_ms() as f64 / 1000.0);
        metrics::counter!(names::OUTBOX_SHIPPED).absolute(outbox.shipped.load(Ordering::Relaxed));
    }
    if let Some(cluster) = &state.cluster {
        metrics::gauge!(names::CLUSTER_SHARDS_OWNED).set(cluster.ownership.serving() as f64);
        let view = cluster.member().map(|m| m.view()).unwrap_or_default();
        let alive = view.nodes.iter().filter(|n| n.alive).count();
        metrics::gauge!(names::CLUSTER_NODES, "status" => "alive").set(alive as f64);
        metrics::gauge!(names::CLUSTER_NODES, "status" => "gone")
            .set((view.nodes.len() - alive) as f64);
    }
    names::process_collector().collect();
    let mut response = names::handle().render().into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}
