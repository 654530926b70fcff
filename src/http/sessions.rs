//! `/api/v1/sessions`: create, read, update, terminate, heartbeat, refresh,
//! validate, lists and tenant metrics.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::error::{invalid, ApiError};
use super::extract::{
    parse_limit, CredentialReader, JsonBody, OptionalJsonBody, RefreshAccess, SessionAccess,
    SessionId, Tenant,
};
use super::openapi::{
    CreatedSession, ErrorResponse, PassthroughBundle, RefreshedSession, SessionList, Validation,
};
use super::AppState;
use crate::crypto::{Secret, SessionTokens};
use crate::engine::admission::{check_metadata, check_text};
use crate::engine::TenantMetrics;
use crate::engine::{ListQuery, NewSession};
use crate::model::session::SessionUpdate;
use crate::model::time::parse_rfc3339;
#[allow(unused_imports)]
use crate::model::SessionView as Session;
use crate::model::{ClientType, Requester, SessionError, SessionView, Status};
use utoipa::{IntoParams, ToSchema};

/// Default page size of lists.
pub(super) const DEFAULT_LIST_LIMIT: usize = 50;

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
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBody {
    #[schema(pattern = r"^[A-Za-z0-9._:@~-]{1,255}$")]
    session_id: Option<String>,
    #[schema(min_length = 1, max_length = 255)]
    edge_mcp_id: String,
    #[schema(max_length = 255)]
    client_name: Option<String>,
    #[schema(pattern = "^(claude-code|ide|agent|cli|cursor|vscode|editor|)$")]
    client_type: Option<String>,
    #[schema(max_length = 255)]
    client_version: Option<String>,
    user_id: Option<Uuid>,
    passthrough_auth: Option<PassthroughAuthBody>,
    metadata: Option<Value>,
    #[schema(minimum = 1, maximum = 2147483647)]
    ttl: Option<u64>,
    #[schema(minimum = 1, maximum = 2147483647)]
    idle_timeout: Option<u64>,
    /// Ignored: the key decides the tenant.
    #[serde(rename = "tenant_id")]
    #[schema(value_type = Option<Value>)]
    _tenant_id: Option<IgnoredAny>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PassthroughAuthBody {
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

#[utoipa::path(
    post,
    path = "/api/v1/sessions",
    tag = "sessions",
    request_body = CreateBody,
    responses(
        (status = 201, description = "Created; the tokens are shown this once", body = CreatedSession),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 409, description = "session_exists", body = ErrorResponse),
        (status = 413, description = "payload_too_large", body = ErrorResponse),
        (status = 415, description = "unsupported_media_type", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    Tenant(key): Tenant,
    JsonBody(body): JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    let request = new_session(body)?;
    let (view, tokens) = state.engine.create(key.tenant_id, request).await?;
    tracing::debug!(session_id = %view.session_id, tenant = %key.tenant_id, client_type = view.client_type, "session created");
    let mut response =
        (StatusCode::CREATED, Json(with_tokens(&view, Some(&tokens)))).into_response();
    set_etag(&mut response, view.version);
    no_store(&mut response);
    Ok(response)
}

/// Decodes and checks a create body as the create handler does, without
/// creating anything (the fuzz target's way in).
pub fn check_create_body(bytes: &[u8]) -> Result<NewSession, ApiError> {
    new_session(super::extract::decode(bytes)?)
}

/// The engine's request for a create body.
fn new_session(body: CreateBody) -> Result<NewSession, ApiError> {
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
        // An empty bundle is no bundle (has_passthrough_auth is false, and
        // reading it answers 404).
        passthrough: body
            .passthrough_auth
            .filter(|p| !p.credentials.is_empty())
            .map(|p| Secret::new(json!({ "credentials": p.credentials }).to_string())),
        metadata,
        ttl: body.ttl,
        idle_timeout: body.idle_timeout,
    };
    Ok(request)
}

/// `active` and `metrics` are routes, never session ids.
async fn reserved_id() -> ApiError {
    invalid(
        "session_id",
        "session_id must not be a reserved word (active, metrics)",
    )
}

/// Answers carrying tokens or credentials are never cached (RFC 6749 §5.1).
fn no_store(response: &mut Response) {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn set_etag(response: &mut Response, version: u64) {
    if let Ok(value) = HeaderValue::from_str(&format!("\"{version}\"")) {
        response.headers_mut().insert(header::ETAG, value);
    }
}

#[utoipa::path(
    get,
    path = "/api/v1/sessions/{session_id}",
    tag = "sessions",
    params(("session_id" = String, Path, description = "The session id (1-255 of A-Z a-z 0-9 . _ : @ ~ -)")),
    responses(
        (status = 200, description = "The session, live or final (within retention)", body = Session, headers(("ETag" = String, description = "\"<version>\""))),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 404, description = "session_not_found", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []), ("session_token" = []))
)]
pub(crate) async fn read(
    State(state): State<AppState>,
    access: SessionAccess,
) -> Result<Response, ApiError> {
    let view = state.engine.get(access.tenant, &access.id).await?;
    let mut response = Json(&view).into_response();
    set_etag(&mut response, view.version);
    Ok(response)
}

/// A PATCH body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct UpdateBody {
    #[schema(max_length = 255)]
    client_name: Option<String>,
    #[schema(max_length = 255)]
    client_version: Option<String>,
    initialized: Option<bool>,
    connection_metadata: Option<Value>,
    user_id: Option<Uuid>,
    /// Ignored: the key decides the tenant.
    #[serde(rename = "tenant_id")]
    #[schema(value_type = Option<Value>)]
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

#[utoipa::path(
    patch,
    path = "/api/v1/sessions/{session_id}",
    tag = "sessions",
    request_body = UpdateBody,
    params(("session_id" = String, Path, description = "The session id (1-255 of A-Z a-z 0-9 . _ : @ ~ -)"), ("If-Match" = Option<String>, Header, description = "\"<version>\": update only at this version")),
    responses(
        (status = 200, description = "Updated", body = Session, headers(("ETag" = String, description = "\"<version>\""))),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 404, description = "session_not_found", body = ErrorResponse),
        (status = 410, description = "session_expired or session_terminated", body = ErrorResponse),
        (status = 412, description = "version_mismatch", body = ErrorResponse),
        (status = 413, description = "payload_too_large", body = ErrorResponse),
        (status = 415, description = "unsupported_media_type", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []), ("session_token" = []))
)]
pub(crate) async fn update(
    State(state): State<AppState>,
    access: SessionAccess,
    headers: HeaderMap,
    JsonBody(body): JsonBody<UpdateBody>,
) -> Result<Response, ApiError> {
    let expected = if_match(&headers)?;
    let update = session_update(body)?;
    let view = state
        .engine
        .update(access.tenant, &access.id, update, expected)
        .await?;
    let mut response = Json(&view).into_response();
    set_etag(&mut response, view.version);
    Ok(response)
}

/// The engine's update for a PATCH body (or a WebSocket `session.update`).
pub(crate) fn session_update(body: UpdateBody) -> Result<SessionUpdate, ApiError> {
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
    Ok(SessionUpdate {
        client_name: body.client_name,
        client_version: body.client_version,
        initialized: body.initialized,
        connection_metadata,
        user_id: body.user_id,
    })
}

/// An optional DELETE body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct TerminateBody {
    #[schema(min_length = 1, max_length = 255)]
    pub(crate) reason: Option<String>,
    /// Ignored: the key decides the tenant.
    #[serde(rename = "tenant_id")]
    #[schema(value_type = Option<Value>)]
    _tenant_id: Option<IgnoredAny>,
}

#[utoipa::path(
    delete,
    path = "/api/v1/sessions/{session_id}",
    tag = "sessions",
    request_body = Option<TerminateBody>,
    params(("session_id" = String, Path, description = "The session id (1-255 of A-Z a-z 0-9 . _ : @ ~ -)")),
    responses(
        (status = 204, description = "Terminated (or already final)"),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 404, description = "session_not_found", body = ErrorResponse),
        (status = 413, description = "payload_too_large", body = ErrorResponse),
        (status = 415, description = "unsupported_media_type", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []), ("session_token" = []))
)]
pub(crate) async fn terminate(
    State(state): State<AppState>,
    access: SessionAccess,
    OptionalJsonBody(body): OptionalJsonBody<TerminateBody>,
) -> Result<StatusCode, ApiError> {
    // The reason rule is the engine's, for every termination.
    let reason = body.and_then(|b| b.reason);
    state
        .engine
        .terminate(access.tenant, &access.id, reason, Requester::Client)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    post,
    path = "/api/v1/sessions/{session_id}/activity",
    tag = "sessions",
    params(("session_id" = String, Path, description = "The session id (1-255 of A-Z a-z 0-9 . _ : @ ~ -)")),
    responses(
        (status = 204, description = "Heartbeat recorded"),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 404, description = "session_not_found", body = ErrorResponse),
        (status = 410, description = "session_expired or session_terminated", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []), ("session_token" = []))
)]
pub(crate) async fn activity(
    State(state): State<AppState>,
    access: SessionAccess,
) -> Result<StatusCode, ApiError> {
    state.engine.touch(access.tenant, &access.id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An optional refresh body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefreshBody {
    /// The session's current `ert_…` token: rotates both tokens. A token
    /// rotated away before revokes the session (401 refresh_token_reused).
    pub(crate) refresh_token: Option<String>,
    /// Ignored: the key decides the tenant.
    #[serde(rename = "tenant_id")]
    #[schema(value_type = Option<Value>)]
    _tenant_id: Option<IgnoredAny>,
}

#[utoipa::path(
    post,
    path = "/api/v1/sessions/{session_id}/refresh",
    tag = "sessions",
    request_body = Option<RefreshBody>,
    params(("session_id" = String, Path, description = "The session id (1-255 of A-Z a-z 0-9 . _ : @ ~ -)")),
    responses(
        (status = 200, description = "Lifetime restarted; with a refresh token, a new token pair", body = RefreshedSession),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 404, description = "session_not_found", body = ErrorResponse),
        (status = 410, description = "session_expired or session_terminated", body = ErrorResponse),
        (status = 413, description = "payload_too_large", body = ErrorResponse),
        (status = 415, description = "unsupported_media_type", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []), ("session_token" = []))
)]
pub(crate) async fn refresh(
    State(state): State<AppState>,
    RefreshAccess(access): RefreshAccess,
    OptionalJsonBody(body): OptionalJsonBody<RefreshBody>,
) -> Result<Response, ApiError> {
    let presented = body.and_then(|b| b.refresh_token).map(Secret::new);
    if access.stale_token && presented.is_none() {
        // A session token that does not authenticate, and no refresh token
        // to prove the caller.
        tracing::warn!(event = "auth_failure", reason = "session token not valid for this session", session_id = %access.id, "refresh refused");
        return Err(ApiError::Unauthorized);
    }
    if let (true, Some(refresh_token)) = (access.stale_token, &presented) {
        // Only the refresh token speaks for this caller: when it is the
        // session's current one, the call is charged to the session's
        // write bucket like any other of its calls (a rotation is a durable
        // write); anything else is decided below, uncharged.
        let hash = crate::crypto::TokenHash::of(refresh_token.expose());
        let check = state
            .engine
            .check_refresh(access.tenant, &access.id, &hash)
            .await;
        if matches!(check, Ok(crate::model::session::RefreshCheck::Current)) {
            let bucket = super::limits::session_key(access.tenant, &access.id);
            super::extract::charge(&state, super::limits::Class::Write, &bucket, None)?;
        }
    }
    let result = state
        .engine
        .refresh(access.tenant, &access.id, presented.as_ref(), None)
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
            // With a stale session token only the refresh token speaks for
            // the caller: unless it was this session's (current: rotated;
            // rotated away: revoked), the answer says nothing of the
            // session, whether it exists or how it stands.
            let says_nothing = matches!(
                e,
                SessionError::RefreshTokenReused
                    | SessionError::Unavailable
                    | SessionError::StorageUnavailable
            );
            if access.stale_token && !says_nothing {
                return Err(ApiError::Unauthorized);
            }
            return Err(e.into());
        }
    };
    let version = view.version;
    let mut response = Json(with_tokens(&view, tokens.as_ref())).into_response();
    set_etag(&mut response, version);
    no_store(&mut response);
    Ok(response)
}

/// The session resource, with a new token pair when there is one (shown
/// this once); serialised in one pass.
#[derive(Serialize)]
pub(crate) struct WithTokens<'a> {
    #[serde(flatten)]
    view: &'a SessionView,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refresh_token: Option<&'a str>,
}

pub(crate) fn with_tokens<'a>(
    view: &'a SessionView,
    tokens: Option<&'a SessionTokens>,
) -> WithTokens<'a> {
    WithTokens {
        view,
        session_token: tokens.map(|t| t.session_token.expose()),
        refresh_token: tokens.map(|t| t.refresh_token.expose()),
    }
}

/// `GET …/passthrough-auth`: the decrypted bundle, for keys with
/// `passthrough:read` only.
#[utoipa::path(
    get,
    path = "/api/v1/sessions/{session_id}/passthrough-auth",
    tag = "sessions",
    description = "Needs an API key with scope passthrough:read; 404 passthrough_auth_not_found when the session has none",
    params(("session_id" = String, Path, description = "The session id (1-255 of A-Z a-z 0-9 . _ : @ ~ -)")),
    responses(
        (status = 200, description = "The decrypted bundle", body = PassthroughBundle),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 404, description = "session_not_found", body = ErrorResponse),
        (status = 410, description = "session_expired or session_terminated", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []))
)]
pub(crate) async fn passthrough_auth(
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

#[utoipa::path(
    post,
    path = "/api/v1/sessions/{session_id}/validate",
    tag = "sessions",
    params(("session_id" = String, Path, description = "The session id (1-255 of A-Z a-z 0-9 . _ : @ ~ -)")),
    responses(
        (status = 200, description = "The session is live", body = Validation),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 404, description = "session_not_found", body = ErrorResponse),
        (status = 410, description = "session_expired or session_terminated", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []), ("session_token" = []))
)]
pub(crate) async fn validate(
    State(state): State<AppState>,
    access: SessionAccess,
) -> Result<Json<Validation>, ApiError> {
    let view = state.engine.validate(access.tenant, &access.id).await?;
    Ok(Json(Validation {
        valid: true,
        session: view,
    }))
}

/// List query parameters, all as text so errors name the parameter.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListParams {
    #[param(pattern = "^(active|idle|expired|terminated|)$")]
    status: Option<String>,
    #[param(pattern = "^(claude-code|ide|agent|cli|)$")]
    client_type: Option<String>,
    edge_mcp_id: Option<String>,
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    cursor: Option<String>,
    #[param(value_type = Option<u32>, minimum = 0)]
    offset: Option<String>,
}

/// Parses an optional filter; empty counts as absent.
pub(super) fn filter<T>(
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

/// The `status` and `client_type` filters of a list (the tenant's and the
/// admin's), checked.
pub(super) fn status_filters(
    status: Option<&str>,
    client_type: Option<&str>,
) -> Result<(Option<Status>, Option<ClientType>), ApiError> {
    Ok((
        filter(
            "status",
            status,
            Status::parse,
            "active, idle, expired, terminated",
        )?,
        filter(
            "client_type",
            client_type,
            ClientType::parse,
            "claude-code, ide, agent, cli",
        )?,
    ))
}

fn list_query(params: ListParams) -> Result<ListQuery, ApiError> {
    let (status, client_type) =
        status_filters(params.status.as_deref(), params.client_type.as_deref())?;
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
        user_id: None,
        limit: parse_limit(params.limit.as_deref(), DEFAULT_LIST_LIMIT)?,
        cursor: params.cursor.filter(|c| !c.is_empty()),
        offset,
    })
}

async fn list_page(
    state: &AppState,
    tenant: Uuid,
    query: ListQuery,
) -> Result<Json<SessionList>, ApiError> {
    let page = state.engine.list(tenant, query).await?;
    Ok(Json(SessionList {
        count: page.sessions.len(),
        sessions: page.sessions,
        next_cursor: page.next_cursor,
    }))
}

#[utoipa::path(
    get,
    path = "/api/v1/sessions",
    tag = "sessions",
    params(ListParams),
    responses(
        (status = 200, description = "A page, newest first", body = SessionList),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    Tenant(key): Tenant,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SessionList>, ApiError> {
    let Query(params) =
        params.map_err(|e| invalid("query", format!("query string is not valid: {e}")))?;
    list_page(&state, key.tenant_id, list_query(params)?).await
}

#[utoipa::path(
    get,
    path = "/api/v1/sessions/active",
    tag = "sessions",
    params(ListParams),
    responses(
        (status = 200, description = "Active sessions, newest first", body = SessionList),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []))
)]
pub(crate) async fn list_active(
    State(state): State<AppState>,
    Tenant(key): Tenant,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SessionList>, ApiError> {
    let Query(params) =
        params.map_err(|e| invalid("query", format!("query string is not valid: {e}")))?;
    let mut query = list_query(ListParams {
        status: None,
        ..params
    })?;
    query.status = Some(Status::Active);
    list_page(&state, key.tenant_id, query).await
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct MetricsParams {
    #[param(format = DateTime)]
    since: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/sessions/metrics",
    tag = "sessions",
    params(MetricsParams),
    responses(
        (status = 200, description = "The tenant's figures", body = TenantMetrics),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []))
)]
pub(crate) async fn tenant_metrics(
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
