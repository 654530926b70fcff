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
    Router::new().route("/admin/sessions/cleanup", post(cleanup))
}

/// Expires every overdue session now.
async fn cleanup(State(state): State<AppState>, _: Admin) -> Result<Json<Value>, ApiError> {
    let expired = state.engine.cleanup().await?;
    tracing::info!(expired, "cleanup requested");
    Ok(Json(json!({ "expired": expired })))
}
