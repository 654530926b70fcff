//! Liveness and readiness.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use std::sync::atomic::Ordering;

use super::openapi::Health;
use super::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses(
        (status = 200, description = "The process runs", body = Health)
    )
)]
pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 once recovery has finished and the store accepts writes, else 503;
/// with the PostgreSQL tier on, the body also shows the outbox backlog.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Recovering or the store is not writable", body = Health)
    )
)]
pub(crate) async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    if !state.engine.is_ready() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "recovering" })),
        );
    }
    if state.cluster.as_ref().is_some_and(|c| !c.joined()) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "joining the cluster" })),
        );
    }
    let (status, mut body) = match state.engine.check_writable().await {
        Ok(()) => (StatusCode::OK, json!({ "status": "ready" })),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "store not writable" }),
        ),
    };
    let checkpoints = state.engine.checkpoint_stats();
    body["checkpoint"] = json!({
        "through_record": checkpoints.through.load(Ordering::Relaxed),
        "failing": checkpoints.failing.load(Ordering::Relaxed),
        "deferred_for_space": checkpoints.deferred.load(Ordering::Relaxed),
    });
    // The PostgreSQL backlog: readiness does not depend on it (sled holds
    // every change), but this is where an operator looks first.
    if let Some(outbox) = state.engine.outbox_stats() {
        body["postgres"] = json!({
            "outbox_depth": outbox.depth(),
            "oldest_entry_age_ms": outbox.oldest_age_ms(),
            "shipped": outbox.shipped.load(Ordering::Relaxed),
            "failures": outbox.failures.load(Ordering::Relaxed),
            "dead_letters": outbox.dead_letters.load(Ordering::Relaxed),
        });
    }
    (status, Json(body))
}
