//! `/api/v1/sessions`: create, read, update, terminate, heartbeat, refresh,
//! validate, lists and tenant metrics.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{json, Value};
use uuid::Uuid;

use super::error::{invalid, ApiError};
use super::extract::{
    parse_limit, CredentialReader, JsonBody, OptionalJsonBody, SessionAccess, SessionId, Tenant,
};
use super::AppState;
use crate::crypto::{Secret, SessionTokens};
use crate::engine::admission::{check_metadata, check_text};
use crate::engine::{ListQuery, NewSession};
use crate::model::session::SessionUpdate;
use crate::model::time::parse_rfc3339;
use crate::model::{ClientType, SessionError, SessionView, Status};

/// Default page size of lists.
const DEFAULT_LIST_LIMIT: usize = 50;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/sessions", post(create).get(list))
        .route(
            "/api/v1/sessions/active",
            get(list_active).patch(reserved_id).delete(reserved_id),
        )
        .route(
            "/api/v1/sessions/metrics",
            get(tenant_metrics).patch(reserved_id).delete(reserved_id),
        )
        .route(
            "/api/v1/sessions/{session_id}",
            get(read).patch(update).delete(terminate),
        )
        .route("/api/v1/sessions/{session_id}/activity", post(activity))
        .route("/api/v1/sessions/{session_id}/refresh", post(refresh))
        .route("/api/v1/sessions/{session_id}/validate", post(validate))
        .route(
            "/api/v1/sessions/{session_id}/passthrough-auth",
            get(passthrough_auth),
        )
}

/// `CreateSessionRequest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBody {
    session_id: Option<String>,
    edge_mcp_id: String,
    client_name: Option<String>,
    client_type: Option<String>,
    client_version: Option<String>,
    user_id: Option<Uuid>,
    passthrough_auth: Option<PassthroughAuthBody>,
    metadata: Option<Value>,
    ttl: Option<u64>,
    idle_timeout: Option<u64>,
    /// Ignored: the key decides the tenant.
    #[serde(rename = "tenant_id")]
    _tenant_id: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PassthroughAuthBody {
    credentials: BTreeMap<String, Value>,
}

/// Compact JSON text of an object-valued field, or a 400 naming it.
fn object_json(field: &str, value: Value) -> Result<String, ApiError> {
    if !value.is_object() {
        return Err(invalid(field, format!("{field} must be a JSON object")));
    }
    let text = value.to_string();
    check_metadata(field, &text)?;
    Ok(text)
}

async fn create(
    State(state): State<AppState>,
    Tenant(key): Tenant,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    let metadata = match body.metadata {
        None | Some(Value::Null) => None,
        Some(value) => Some(object_json("metadata", value)?),
    };
    let request = NewSession {
        session_id: body.session_id,
        edge_mcp_id: body.edge_mcp_id,
        client_name: body.client_name,
        client_type: body.client_type,
        client_version: body.client_version,
        user_id: body.user_id,
        passthrough_providers: body
            .passthrough_auth
            .as_ref()
            .map(|p| p.credentials.keys().cloned().collect())
            .unwrap_or_default(),
        passthrough: body
            .passthrough_auth
            .map(|p| Secret::new(json!({ "credentials": p.credentials }).to_string())),
        metadata,
        ttl: body.ttl,
        idle_timeout: body.idle_timeout,
    };
    let (view, tokens) = state.engine.create(key.tenant_id, request).await?;
    tracing::debug!(session_id = %view.session_id, tenant = %key.tenant_id, client_type = view.client_type, "session created");
    let mut response =
        (StatusCode::CREATED, Json(with_tokens(&view, Some(&tokens)))).into_response();
    set_etag(&mut response, view.version);
    Ok(response)
}

/// `active` and `metrics` are routes, never session ids.
async fn reserved_id() -> ApiError {
    invalid(
        "session_id",
        "session_id must not be a reserved word (active, metrics)",
    )
}

fn set_etag(response: &mut Response, version: u64) {
    if let Ok(value) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, value);
    }
}

async fn read(State(state): State<AppState>, access: SessionAccess) -> Result<Response, ApiError> {
    let view = state.engine.get(access.tenant, &access.id).await?;
    let mut response = Json(&view).into_response();
    set_etag(&mut response, view.version);
    Ok(response)
}

/// A PATCH body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateBody {
    client_name: Option<String>,
    client_version: Option<String>,
    initialized: Option<bool>,
    connection_metadata: Option<Value>,
    user_id: Option<Uuid>,
    #[serde(rename = "tenant_id")]
    _tenant_id: Option<IgnoredAny>,
}

/// Parses `If-Match: "<version>"` (`*` or absent: unconditional).
fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let text = value.to_str().unwrap_or("").trim();
    if text == "*" {
        return Ok(None);
    }
    text.trim_start_matches("W/")
        .trim_matches('"')
        .parse::<u64>()
        .map(Some)
        .map_err(|_| {
            invalid(
                "If-Match",
                "If-Match must be a quoted version such as \"3\"",
            )
        })
}

async fn update(
    State(state): State<AppState>,
    access: SessionAccess,
    headers: HeaderMap,
    JsonBody(body): JsonBody<UpdateBody>,
) -> Result<Response, ApiError> {
    let expected = if_match(&headers)?;
    for (field, value) in [
        ("client_name", &body.client_name),
        ("client_version", &body.client_version),
    ] {
        if let Some(value) = value {
            check_text(field, value, 0)?;
        }
    }
    let connection_metadata = match body.connection_metadata {
        None | Some(Value::Null) => None,
        Some(value) => Some(object_json("connection_metadata", value)?),
    };
    let update = SessionUpdate {
        client_name: body.client_name,
        client_version: body.client_version,
        initialized: body.initialized,
        connection_metadata,
        user_id: body.user_id,
    };
    let view = state
        .engine
        .update(access.tenant, &access.id, update, expected)
        .await?;
    let mut response = Json(&view).into_response();
    set_etag(&mut response, view.version);
    Ok(response)
}

/// An optional DELETE body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TerminateBody {
    reason: Option<String>,
    #[serde(rename = "tenant_id")]
    _tenant_id: Option<IgnoredAny>,
}

async fn terminate(
    State(state): State<AppState>,
    access: SessionAccess,
    OptionalJsonBody(body): OptionalJsonBody<TerminateBody>,
) -> Result<StatusCode, ApiError> {
    let reason = body.and_then(|b| b.reason);
    if let Some(reason) = &reason {
        check_text("reason", reason, 1)?;
    }
    state
        .engine
        .terminate(access.tenant, &access.id, reason)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn activity(
    State(state): State<AppState>,
    access: SessionAccess,
) -> Result<StatusCode, ApiError> {
    state.engine.touch(access.tenant, &access.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An optional refresh body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    /// Token rotation needs session tokens, which this server does not
    /// issue yet: any refresh token presented is one it never issued.
    refresh_token: Option<String>,
    #[serde(rename = "tenant_id")]
    _tenant_id: Option<IgnoredAny>,
}

async fn refresh(
    State(state): State<AppState>,
    access: SessionAccess,
    OptionalJsonBody(body): OptionalJsonBody<RefreshBody>,
) -> Result<Response, ApiError> {
    let presented = body.and_then(|b| b.refresh_token).map(Secret::new);
    let result = state
        .engine
        .refresh(access.tenant, &access.id, presented.as_ref())
        .await;
    let (view, tokens) = match result {
        Ok(answer) => answer,
        Err(e) => {
            if matches!(
                e,
                SessionError::InvalidRefreshToken | SessionError::RefreshTokenReused
            ) {
                tracing::warn!(event = "auth_failure", reason = %e, session_id = %access.id, "refresh token refused");
            }
            return Err(e.into());
        }
    };
    let version = view.version;
    let mut response = Json(with_tokens(&view, tokens.as_ref())).into_response();
    set_etag(&mut response, version);
    Ok(response)
}

/// The session resource, with a new token pair when there is one (shown
/// this once).
fn with_tokens(view: &SessionView, tokens: Option<&SessionTokens>) -> Value {
    let mut body = json!(view);
    if let (Some(tokens), Some(map)) = (tokens, body.as_object_mut()) {
        map.insert("session_token".into(), tokens.session_token.expose().into());
        map.insert("refresh_token".into(), tokens.refresh_token.expose().into());
    }
    body
}

/// `GET …/passthrough-auth`: the decrypted bundle, for keys with
/// `passthrough:read` only.
async fn passthrough_auth(
    State(state): State<AppState>,
    CredentialReader(key): CredentialReader,
    SessionId(id): SessionId,
) -> Result<Response, ApiError> {
    let bundle = state.engine.passthrough(key.tenant_id, &id).await?;
    tracing::info!(event = "passthrough_read", session_id = %id, tenant = %key.tenant_id, "passthrough credentials read");
    let mut response = (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        bundle.expose().to_owned(),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

async fn validate(
    State(state): State<AppState>,
    access: SessionAccess,
) -> Result<Json<Value>, ApiError> {
    let view = state.engine.validate(access.tenant, &access.id).await?;
    Ok(Json(json!({ "valid": true, "session": view })))
}

/// List query parameters, all as text so errors name the parameter.
#[derive(Debug, Default, Deserialize)]
struct ListParams {
    status: Option<String>,
    client_type: Option<String>,
    edge_mcp_id: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    offset: Option<String>,
}

/// Parses an optional filter; empty counts as absent.
fn filter<T>(
    field: &str,
    raw: Option<&str>,
    parse: fn(&str) -> Option<T>,
    allowed: &str,
) -> Result<Option<T>, ApiError> {
    match raw {
        None | Some("") => Ok(None),
        Some(text) => parse(text)
            .map(Some)
            .ok_or_else(|| invalid(field, format!("{field} must be one of {allowed}"))),
    }
}

fn list_query(params: ListParams) -> Result<ListQuery, ApiError> {
    let status = filter(
        "status",
        params.status.as_deref(),
        Status::parse,
        "active, idle, expired, terminated",
    )?;
    let client_type = filter(
        "client_type",
        params.client_type.as_deref(),
        ClientType::parse,
        "claude-code, ide, agent, cli",
    )?;
    let offset = match params.offset.as_deref() {
        None => 0,
        Some(text) => text
            .parse::<usize>()
            .map_err(|_| invalid("offset", "offset must be a non-negative integer"))?,
    };
    Ok(ListQuery {
        status,
        client_type,
        edge_mcp_id: params.edge_mcp_id.filter(|e| !e.is_empty()),
        limit: parse_limit(params.limit.as_deref(), DEFAULT_LIST_LIMIT)?,
        cursor: params.cursor.filter(|c| !c.is_empty()),
        offset,
    })
}

async fn list_page(
    state: &AppState,
    tenant: Uuid,
    query: ListQuery,
) -> Result<Json<Value>, ApiError> {
    let page = state.engine.list(tenant, query).await?;
    Ok(Json(json!({
        "sessions": page.sessions,
        "count": page.sessions.len(),
        "next_cursor": page.next_cursor,
    })))
}

async fn list(
    State(state): State<AppState>,
    Tenant(key): Tenant,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) =
        params.map_err(|e| invalid("query", format!("query string is not valid: {e}")))?;
    list_page(&state, key.tenant_id, list_query(params)?).await
}

async fn list_active(
    State(state): State<AppState>,
    Tenant(key): Tenant,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) =
        params.map_err(|e| invalid("query", format!("query string is not valid: {e}")))?;
    let mut query = list_query(ListParams {
        status: None,
        ..params
    })?;
    query.status = Some(Status::Active);
    list_page(&state, key.tenant_id, query).await
}

#[derive(Debug, Default, Deserialize)]
struct MetricsParams {
    since: Option<String>,
}

async fn tenant_metrics(
    State(state): State<AppState>,
    Tenant(key): Tenant,
    params: Result<Query<MetricsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<crate::engine::TenantMetrics>, ApiError> {
    let Query(params) =
        params.map_err(|e| invalid("query", format!("query string is not valid: {e}")))?;
    let since = match params.since.as_deref() {
        None | Some("") => None,
        Some(text) => Some(
            parse_rfc3339(text)
                .ok_or_else(|| invalid("since", "since must be an RFC 3339 timestamp"))?,
        ),
    };
    Ok(Json(
        state.engine.tenant_metrics(key.tenant_id, since).await?,
    ))
}
