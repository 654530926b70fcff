//! `/admin`: operations behind the admin key.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::ApiError;
use super::extract::Admin;
use super::AppState;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/sessions/cleanup", post(cleanup))
        .route("/admin/flush", post(flush))
}

/// Waits until every change acknowledged before the call is durable: in
/// sled, and committed to PostgreSQL when the tier is on (503 when
/// PostgreSQL does not take it within `postgres.commit_timeout_ms`). A
/// barrier for backups, hand-overs and tests.
async fn flush(State(state): State<AppState>, _: Admin) -> Result<Json<Value>, ApiError> {
    state.engine.flush_to_postgres().await?;
    let outbox_depth = state
        .engine
        .outbox_stats()
        .map(|s| s.depth.load(std::sync::atomic::Ordering::Relaxed));
    Ok(Json(json!({
        "flushed": true,
        "postgres": outbox_depth.is_some(),
        "outbox_depth": outbox_depth,
    })))
}

/// Expires every overdue session now.
async fn cleanup(State(state): State<AppState>, _: Admin) -> Result<Json<Value>, ApiError> {
    let expired = state.engine.cleanup().await?;
    tracing::info!(expired, "cleanup requested");
    Ok(Json(json!({ "expired": expired })))
}
