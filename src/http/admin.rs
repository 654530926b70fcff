//! `/admin`: operations behind the admin key. Besides the flush barrier and
//! the cleanup, an operator's view of sessions across tenants (API.md,
//! "Admin: sessions across tenants"): search with filters and keyset
//! pagination, inspect one, end one, or end every session of a user or an
//! edge-mcp. A termination here is audited with actor `admin` and reaches
//! the session's open WebSockets like a tenant's DELETE.

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse as _, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::Value;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::{IntoParams, ToSchema};
use uuid::Uuid;

use super::error::{invalid, ApiError};
use super::extract::{parse_limit, Admin, OptionalJsonBody};
use super::openapi::{BulkTerminated, Cleanup, ErrorResponse, Flush, SessionList};
use super::sessions::{filter, status_filters, DEFAULT_LIST_LIMIT};
use super::AppState;
use crate::engine::admission::{check_reason, check_text};
use crate::engine::{ListQuery, Selection};
use crate::model::ids::is_valid_session_id;
use crate::model::SessionView;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/sessions/cleanup", post(cleanup))
        .route("/admin/flush", post(flush))
        .route("/admin/sessions", get(list))
        .route("/admin/sessions/terminate", post(terminate_matching))
        .route("/admin/backup", get(backup))
        .route(
            "/admin/tenants/{tenant_id}/sessions/{session_id}",
            get(read).delete(terminate),
        )
}

/// Admin list parameters, all as text so errors name the parameter.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct AdminListParams {
    /// Only this tenant (every tenant when absent).
    #[param(value_type = Option<String>, format = "uuid")]
    tenant_id: Option<String>,
    /// Only this user.
    #[param(value_type = Option<String>, format = "uuid")]
    user_id: Option<String>,
    edge_mcp_id: Option<String>,
    #[param(pattern = "^(active|idle|expired|terminated|)$")]
    status: Option<String>,
    #[param(pattern = "^(claude-code|ide|agent|cli|)$")]
    client_type: Option<String>,
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    cursor: Option<String>,
}

/// An optional UUID parameter; empty counts as absent.
fn uuid_param(field: &str, raw: Option<&str>) -> Result<Option<Uuid>, ApiError> {
    filter(field, raw, |t| Uuid::parse_str(t).ok(), "a UUID")
}

#[utoipa::path(
    get,
    path = "/admin/sessions",
    tag = "admin",
    params(AdminListParams),
    responses(
        (status = 200, description = "Sessions of every tenant (or of tenant_id), newest first", body = SessionList),
        (status = 400, description = "validation_failed", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After)", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering or shutting down", body = ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    _: Admin,
    params: Result<Query<AdminListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SessionList>, ApiError> {
    let Query(params) = params.map_err(|_| invalid("query", "query string is not valid"))?;
    let (status, client_type) =
        status_filters(params.status.as_deref(), params.client_type.as_deref())?;
    let selection = Selection {
        tenant: uuid_param("tenant_id", params.tenant_id.as_deref())?,
        query: ListQuery {
            status,
            client_type,
            edge_mcp_id: params.edge_mcp_id.filter(|e| !e.is_empty()),
            user_id: uuid_param("user_id", params.user_id.as_deref())?,
            limit: parse_limit(params.limit.as_deref(), DEFAULT_LIST_LIMIT)?,
            cursor: params.cursor.filter(|c| !c.is_empty()),
            offset: 0,
        },
    };
    let page = state.engine.list_all(&selection).await?;
    Ok(Json(SessionList {
        count: page.sessions.len(),
        sessions: page.sessions,
        next_cursor: page.next_cursor,
    }))
}

/// The tenant and session of an admin path, checked.
fn session_path(
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(Uuid, String), ApiError> {
    let Path((tenant_id, session_id)) =
        path.map_err(|_| invalid("session_id", "the path is not valid UTF-8"))?;
    let (tenant_id, session_id) = (tenant_id.as_str(), session_id.as_str());
    let tenant =
        Uuid::parse_str(tenant_id).map_err(|_| invalid("tenant_id", "tenant_id must be a UUID"))?;
    if !is_valid_session_id(session_id) {
        return Err(invalid(
            "session_id",
            "session_id must be 1 to 255 characters from A-Z a-z 0-9 . _ : @ ~ -",
        ));
    }
    Ok((tenant, session_id.to_owned()))
}

#[utoipa::path(
    get,
    path = "/admin/tenants/{tenant_id}/sessions/{session_id}",
    tag = "admin",
    params(
        ("tenant_id" = String, Path, format = "uuid", description = "The session's tenant"),
        ("session_id" = String, Path, description = "The session id")
    ),
    responses(
        (status = 200, description = "The session resource", body = SessionView),
        (status = 400, description = "validation_failed", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 404, description = "session_not_found (or no such tenant)", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After)", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering or shutting down", body = ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn read(
    State(state): State<AppState>,
    _: Admin,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<SessionView>, ApiError> {
    let (tenant, id) = session_path(path)?;
    Ok(Json(state.engine.get(tenant, &id).await?))
}

/// An optional admin termination body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct AdminTerminateBody {
    /// Why; `admin_request` when absent.
    #[schema(min_length = 1, max_length = 255)]
    reason: Option<String>,
}

#[utoipa::path(
    delete,
    path = "/admin/tenants/{tenant_id}/sessions/{session_id}",
    tag = "admin",
    request_body = Option<AdminTerminateBody>,
    params(
        ("tenant_id" = String, Path, format = "uuid", description = "The session's tenant"),
        ("session_id" = String, Path, description = "The session id")
    ),
    responses(
        (status = 204, description = "Terminated (audited with actor admin), or already final (nothing changes)"),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 404, description = "session_not_found (or no such tenant)", body = ErrorResponse),
        (status = 413, description = "payload_too_large", body = ErrorResponse),
        (status = 415, description = "unsupported_media_type", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After)", body = ErrorResponse),
        (status = 503, description = "service_unavailable or storage_unavailable", body = ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn terminate(
    State(state): State<AppState>,
    _: Admin,
    path: Result<Path<(String, String)>, PathRejection>,
    OptionalJsonBody(body): OptionalJsonBody<AdminTerminateBody>,
) -> Result<StatusCode, ApiError> {
    let (tenant, id) = session_path(path)?;
    // The reason rule is the engine's, for every termination.
    let reason = body.and_then(|b| b.reason);
    state.engine.admin_terminate(tenant, &id, reason).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Which live sessions a bulk termination ends: every one matching all the
/// given fields; `user_id` or `edge_mcp_id` is required.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct BulkTerminateBody {
    /// Only this tenant's (every tenant's when absent).
    #[schema(value_type = Option<String>, format = "uuid")]
    tenant_id: Option<Value>,
    /// Every session of this user.
    #[schema(value_type = Option<String>, format = "uuid")]
    user_id: Option<Value>,
    /// Every session of this edge-mcp.
    edge_mcp_id: Option<String>,
    /// Why; `admin_request` when absent.
    #[schema(min_length = 1, max_length = 255)]
    reason: Option<String>,
}

/// A UUID field of a JSON body: a string holding a UUID, or absent/null.
fn uuid_field(field: &str, value: Option<&Value>) -> Result<Option<Uuid>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Uuid::parse_str(text)
            .map(Some)
            .map_err(|_| invalid(field, format!("{field} must be a UUID"))),
        Some(_) => Err(invalid(field, format!("{field} must be a UUID string"))),
    }
}

#[utoipa::path(
    post,
    path = "/admin/sessions/terminate",
    tag = "admin",
    request_body = BulkTerminateBody,
    responses(
        (status = 200, description = "Every matching live session ended (audited with actor admin)", body = BulkTerminated),
        (status = 400, description = "invalid_json, validation_failed (neither user_id nor edge_mcp_id) or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 413, description = "payload_too_large", body = ErrorResponse),
        (status = 415, description = "unsupported_media_type", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After)", body = ErrorResponse),
        (status = 503, description = "service_unavailable or storage_unavailable", body = ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn terminate_matching(
    State(state): State<AppState>,
    _: Admin,
    OptionalJsonBody(body): OptionalJsonBody<BulkTerminateBody>,
) -> Result<Json<BulkTerminated>, ApiError> {
    let Some(body) = body else {
        return Err(invalid("user_id", "user_id or edge_mcp_id is required"));
    };
    let tenant = uuid_field("tenant_id", body.tenant_id.as_ref())?;
    let user_id = uuid_field("user_id", body.user_id.as_ref())?;
    let edge_mcp_id = body.edge_mcp_id.filter(|e| !e.is_empty());
    if let Some(edge) = &edge_mcp_id {
        check_text("edge_mcp_id", edge, 1)?;
    }
    if user_id.is_none() && edge_mcp_id.is_none() {
        return Err(invalid("user_id", "user_id or edge_mcp_id is required"));
    }
    // Checked before anything ends, not per session.
    if let Some(reason) = &body.reason {
        check_reason(reason)?;
    }
    let selection = Selection {
        tenant,
        query: ListQuery {
            user_id,
            edge_mcp_id,
            ..ListQuery::default()
        },
    };
    let terminated = state
        .engine
        .admin_terminate_matching(&selection, body.reason)
        .await?;
    Ok(Json(BulkTerminated { terminated }))
}

/// Streams a backup of every session and its executions (credentials stay
/// sealed, tokens stay hashes), as of a flush barrier taken when the call
/// starts; the server keeps serving meanwhile. `edge-sessions restore FILE`
/// loads it into an empty data dir.
#[utoipa::path(
    get,
    path = "/admin/backup",
    tag = "admin",
    responses(
        (status = 200, description = "The backup, streamed (format: README, Backup and restore)", content_type = "application/octet-stream", body = Vec<u8>),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After)", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn backup(State(state): State<AppState>, _: Admin) -> Result<Response, ApiError> {
    let chunks = state.engine.backup().await?;
    let name = format!(
        "attachment; filename=\"edge-sessions-{}.esbk\"",
        chrono::Utc::now().format("%Y%m%dT%H%M%SZ")
    );
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_DISPOSITION, name),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
        Body::from_stream(ReceiverStream::new(chunks)),
    )
        .into_response())
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
    let outbox_depth = state.engine.outbox_stats().map(|s| s.depth());
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
