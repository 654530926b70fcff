//! `/admin`: operations behind the admin key.

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};

use super::error::ApiError;
use super::extract::Admin;
use super::openapi::{Cleanup, ErrorResponse, Flush};
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
#[utoipa::path(
    post,
    path = "/admin/flush",
    tag = "admin",
    responses(
        (status = 200, description = "Everything acknowledged before is durable (and in PostgreSQL when on)", body = Flush),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn flush(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<Flush>, ApiError> {
    state.engine.flush_to_postgres().await?;
    let outbox_depth = state
        .engine
        .outbox_stats()
        .map(|s| s.depth.load(std::sync::atomic::Ordering::Relaxed));
    Ok(Json(Flush {
        flushed: true,
        postgres: outbox_depth.is_some(),
        outbox_depth,
    }))
}

/// Expires every overdue session now.
#[utoipa::path(
    post,
    path = "/admin/sessions/cleanup",
    tag = "admin",
    responses(
        (status = 200, description = "Overdue sessions expired", body = Cleanup),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn cleanup(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<Cleanup>, ApiError> {
    let expired = state.engine.cleanup().await?;
    tracing::info!(expired, "cleanup requested");
    Ok(Json(Cleanup { expired }))
}
