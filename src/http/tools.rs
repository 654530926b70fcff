//! Tool executions: recording them (per session and edge-mcp's own
//! `/executions` call), listing them, and per-session metrics.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use super::error::{invalid, ApiError};
use super::extract::{parse_limit, JsonBody, SessionAccess, Tenant};
use super::openapi::ErrorResponse;
use super::AppState;
use crate::engine::admission::check_text;
use crate::model::ids::is_valid_session_id;
use crate::model::session::SessionMetrics;
use crate::model::time::{format_rfc3339, now_ms, parse_rfc3339, Millis};
use crate::model::tool::MAX_DURATION_MS;
use crate::model::ToolExecution;
use utoipa::{IntoParams, ToSchema};

/// Default page size of the executions list.
const DEFAULT_EXECUTIONS_LIMIT: usize = 100;
/// Largest `arguments` / `result` / `error`, as compact JSON.
const MAX_PAYLOAD_JSON: usize = 32 * 1024;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/sessions/{session_id}/tools/execute", post(execute))
        .route(
            "/api/v1/sessions/{session_id}/tools/executions",
            get(executions),
        )
        .route("/api/v1/sessions/{session_id}/metrics", get(metrics))
        .route("/api/v1/executions", post(record))
}

/// The tool execution body.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExecuteBody {
    #[schema(min_length = 1, max_length = 255)]
    tool_name: String,
    #[schema(max_length = 255)]
    tool_id: Option<String>,
    arguments: Option<Value>,
    result: Option<Value>,
    error: Option<Value>,
    #[schema(minimum = 0, maximum = 86400000)]
    duration_ms: Option<f64>,
    #[schema(maximum = 9223372036854775807_u64)]
    tokens_used: Option<u64>,
    #[schema(format = DateTime)]
    executed_at: Option<String>,
    /// Ignored: the key decides the tenant.
    #[serde(rename = "tenant_id")]
    #[schema(value_type = Option<Value>)]
    _tenant_id: Option<IgnoredAny>,
}

fn payload(field: &str, value: Option<Value>) -> Result<String, ApiError> {
    let text = value.unwrap_or(Value::Null).to_string();
    if text.len() > MAX_PAYLOAD_JSON {
        return Err(invalid(
            field,
            format!("{field} must be at most {MAX_PAYLOAD_JSON} bytes of JSON"),
        ));
    }
    Ok(text)
}

fn error_text(value: Option<Value>) -> Result<Option<String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => {
            if s.len() > MAX_PAYLOAD_JSON {
                return Err(invalid("error", "error is too long"));
            }
            Ok(Some(s))
        }
        Some(other) => payload("error", Some(other)).map(Some),
    }
}

/// `duration_ms`: a non-negative number of milliseconds (rounded), at most
/// [`MAX_DURATION_MS`] (24 h); REST, the batch endpoint and the WebSocket
/// all come through here.
fn duration(value: Option<f64>) -> Result<u64, ApiError> {
    match value {
        None => Ok(0),
        Some(ms) if ms.is_finite() && ms >= 0.0 && ms.round() <= MAX_DURATION_MS as f64 => {
            Ok(ms.round() as u64)
        }
        Some(_) => Err(invalid(
            "duration_ms",
            format!("duration_ms must be a number from 0 to {MAX_DURATION_MS} (24 hours)"),
        )),
    }
}

/// Tokens fit a signed 64-bit column (the PostgreSQL tier's BIGINT).
fn tokens(value: Option<u64>) -> Result<u64, ApiError> {
    match value {
        None => Ok(0),
        Some(n) if n <= i64::MAX as u64 => Ok(n),
        Some(_) => Err(invalid(
            "tokens_used",
            "tokens_used must be at most 9223372036854775807",
        )),
    }
}

struct ExecutionFields {
    tool_name: String,
    tool_id: Option<String>,
    arguments: Option<Value>,
    result: Option<Value>,
    error: Option<Value>,
    duration_ms: Option<f64>,
    tokens_used: Option<u64>,
    executed_at: Option<Millis>,
}

fn build(fields: ExecutionFields) -> Result<ToolExecution, ApiError> {
    check_text("tool_name", &fields.tool_name, 1)?;
    if let Some(id) = &fields.tool_id {
        check_text("tool_id", id, 0)?;
    }
    Ok(ToolExecution {
        tool_name: fields.tool_name,
        tool_id: fields.tool_id,
        arguments: payload("arguments", fields.arguments)?,
        result: payload("result", fields.result)?,
        error: error_text(fields.error)?,
        duration_ms: duration(fields.duration_ms)?,
        tokens_used: tokens(fields.tokens_used)?,
        executed_at: fields.executed_at.unwrap_or_else(now_ms),
        // Set by the session actor from the engine's clock.
        recorded_at: 0,
    })
}

#[utoipa::path(
    post,
    path = "/api/v1/sessions/{session_id}/tools/execute",
    tag = "tools",
    request_body = ExecuteBody,
    params(("session_id" = String, Path, description = "The session id (1-255 of A-Z a-z 0-9 . _ : @ ~ -)")),
    responses(
        (status = 204, description = "Recorded"),
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
pub(crate) async fn execute(
    State(state): State<AppState>,
    access: SessionAccess,
    JsonBody(body): JsonBody<ExecuteBody>,
) -> Result<StatusCode, ApiError> {
    let execution = from_execute_body(body)?;
    state
        .engine
        .record_tool(access.tenant, &access.id, execution)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Decodes and checks a tools/execute body, then a `POST /executions` body,
/// as the handlers do (the fuzz target's way in).
pub fn check_execution_bodies(bytes: &[u8]) -> [Result<ToolExecution, ApiError>; 2] {
    [
        super::extract::decode(bytes).and_then(from_execute_body),
        super::extract::decode(bytes)
            .and_then(from_record_body)
            .map(|(_, execution)| execution),
    ]
}

pub(crate) fn from_execute_body(body: ExecuteBody) -> Result<ToolExecution, ApiError> {
    let executed_at =
        match body.executed_at.as_deref() {
            None => None,
            Some(text) => Some(parse_rfc3339(text).ok_or_else(|| {
                invalid("executed_at", "executed_at must be an RFC 3339 timestamp")
            })?),
        };
    let execution = build(ExecutionFields {
        tool_name: body.tool_name,
        tool_id: body.tool_id,
        arguments: body.arguments,
        result: body.result,
        error: body.error,
        duration_ms: body.duration_ms,
        tokens_used: body.tokens_used,
        executed_at,
    })?;
    Ok(execution)
}

/// edge-mcp's own recording call.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecordBody {
    #[schema(pattern = r"^[A-Za-z0-9._:@~-]{1,255}$")]
    session_id: String,
    #[schema(min_length = 1, max_length = 255)]
    tool_name: String,
    #[schema(max_length = 255)]
    tool_id: Option<String>,
    arguments: Option<Value>,
    result: Option<Value>,
    error: Option<Value>,
    #[schema(minimum = 0, maximum = 86400000)]
    duration_ms: Option<f64>,
    #[schema(maximum = 9223372036854775807_u64)]
    tokens_used: Option<u64>,
    /// RFC 3339 text or Unix seconds.
    timestamp: Option<Value>,
    /// Ignored: the key decides the tenant.
    #[serde(rename = "tenant_id")]
    #[schema(value_type = Option<Value>)]
    _tenant_id: Option<IgnoredAny>,
}

fn timestamp(value: Option<Value>) -> Result<Option<Millis>, ApiError> {
    let bad = || {
        invalid(
            "timestamp",
            "timestamp must be an RFC 3339 string or Unix seconds",
        )
    };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => parse_rfc3339(&text).map(Some).ok_or_else(bad),
        Some(Value::Number(n)) => match n.as_f64() {
            Some(s) if (0.0..1e11).contains(&s) => Ok(Some((s * 1000.0).round() as Millis)),
            _ => Err(bad()),
        },
        Some(_) => Err(bad()),
    }
}

#[utoipa::path(
    post,
    path = "/api/v1/executions",
    tag = "tools",
    description = "edge-mcp's own recording call",
    request_body = RecordBody,
    responses(
        (status = 204, description = "Recorded"),
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
    security(("api_key" = []))
)]
pub(crate) async fn record(
    State(state): State<AppState>,
    Tenant(key): Tenant,
    JsonBody(body): JsonBody<RecordBody>,
) -> Result<StatusCode, ApiError> {
    let (session_id, execution) = from_record_body(body)?;
    state
        .engine
        .record_tool(key.tenant_id, &session_id, execution)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

fn from_record_body(body: RecordBody) -> Result<(String, ToolExecution), ApiError> {
    if !is_valid_session_id(&body.session_id) {
        return Err(invalid(
            "session_id",
            "session_id must be 1 to 255 characters from A-Z a-z 0-9 . _ : @ ~ -",
        ));
    }
    let execution = build(ExecutionFields {
        tool_name: body.tool_name,
        tool_id: body.tool_id,
        arguments: body.arguments,
        result: body.result,
        error: body.error,
        duration_ms: body.duration_ms,
        tokens_used: body.tokens_used,
        executed_at: timestamp(body.timestamp)?,
    })?;
    Ok((body.session_id, execution))
}

/// `GET …/tools/executions`.
#[derive(Serialize, ToSchema)]
pub(crate) struct ExecutionList {
    /// Items in this answer.
    count: usize,
    /// Newest first.
    executions: Vec<ExecutionView>,
}

/// One execution as listed.
#[derive(Serialize, ToSchema)]
pub(crate) struct ExecutionView {
    tool_name: String,
    tool_id: Option<String>,
    #[schema(value_type = Value)]
    arguments: Box<RawValue>,
    #[schema(value_type = Value)]
    result: Box<RawValue>,
    error: Option<String>,
    duration_ms: u64,
    tokens_used: u64,
    #[schema(format = DateTime)]
    executed_at: String,
}

fn raw(text: String) -> Box<RawValue> {
    RawValue::from_string(text).unwrap_or_else(|_| {
        // Stored text was produced by serde_json, so this only guards
        // against a corrupted record.
        RawValue::from_string("null".to_owned()).expect("null is valid JSON")
    })
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ExecutionsParams {
    #[param(value_type = Option<u32>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
}

#[utoipa::path(
    get,
    path = "/api/v1/sessions/{session_id}/tools/executions",
    tag = "tools",
    params(("session_id" = String, Path, description = "The session id (1-255 of A-Z a-z 0-9 . _ : @ ~ -)"), ExecutionsParams),
    responses(
        (status = 200, description = "Newest first", body = ExecutionList),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 404, description = "session_not_found", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []), ("session_token" = []))
)]
pub(crate) async fn executions(
    State(state): State<AppState>,
    access: SessionAccess,
    params: Result<Query<ExecutionsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ExecutionList>, ApiError> {
    let Query(params) =
        params.map_err(|e| invalid("query", format!("query string is not valid: {e}")))?;
    let limit = parse_limit(params.limit.as_deref(), DEFAULT_EXECUTIONS_LIMIT)?;
    let list = state
        .engine
        .executions(access.tenant, &access.id, limit)
        .await?;
    let views: Vec<ExecutionView> = list
        .into_iter()
        .map(|e| ExecutionView {
            tool_name: e.tool_name,
            tool_id: e.tool_id,
            arguments: raw(e.arguments),
            result: raw(e.result),
            error: e.error,
            duration_ms: e.duration_ms,
            tokens_used: e.tokens_used,
            executed_at: format_rfc3339(e.executed_at),
        })
        .collect();
    Ok(Json(ExecutionList {
        count: views.len(),
        executions: views,
    }))
}

#[utoipa::path(
    get,
    path = "/api/v1/sessions/{session_id}/metrics",
    tag = "tools",
    params(("session_id" = String, Path, description = "The session id (1-255 of A-Z a-z 0-9 . _ : @ ~ -)")),
    responses(
        (status = 200, description = "Per-session metrics", body = SessionMetrics),
        (status = 400, description = "invalid_json, validation_failed or unknown_field", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 403, description = "forbidden: the key lacks the scope", body = ErrorResponse),
        (status = 404, description = "session_not_found", body = ErrorResponse),
        (status = 429, description = "rate_limited (with Retry-After) or tenant_session_limit", body = ErrorResponse),
        (status = 503, description = "service_unavailable: recovering, shutting down, or the store did not commit", body = ErrorResponse)
    ),
    security(("api_key" = []), ("session_token" = []))
)]
pub(crate) async fn metrics(
    State(state): State<AppState>,
    access: SessionAccess,
) -> Result<Json<SessionMetrics>, ApiError> {
    Ok(Json(
        state
            .engine
            .session_metrics(access.tenant, &access.id)
            .await?,
    ))
}
