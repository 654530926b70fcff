//! Tool executions: recording them (per session and edge-mcp's own
//! `/executions` call), listing them, and per-session metrics.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{json, Value};

use super::error::{invalid, ApiError};
use super::extract::{parse_limit, JsonBody, SessionAccess, Tenant};
use super::AppState;
use crate::engine::admission::check_text;
use crate::model::ids::is_valid_session_id;
use crate::model::session::SessionMetrics;
use crate::model::time::{format_rfc3339, now_ms, parse_rfc3339, Millis};
use crate::model::ToolExecution;

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
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExecuteBody {
    tool_name: String,
    tool_id: Option<String>,
    arguments: Option<Value>,
    result: Option<Value>,
    error: Option<Value>,
    duration_ms: Option<f64>,
    tokens_used: Option<u64>,
    executed_at: Option<String>,
    #[serde(rename = "tenant_id")]
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

fn duration(value: Option<f64>) -> Result<u64, ApiError> {
    match value {
        None => Ok(0),
        Some(ms) if ms.is_finite() && ms >= 0.0 => Ok(ms.round() as u64),
        Some(_) => Err(invalid(
            "duration_ms",
            "duration_ms must be a non-negative number",
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

async fn execute(
    State(state): State<AppState>,
    access: SessionAccess,
    JsonBody(body): JsonBody<ExecuteBody>,
) -> Result<StatusCode, ApiError> {
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
    state
        .engine
        .record_tool(access.tenant, &access.id, execution)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// edge-mcp's own recording call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordBody {
    session_id: String,
    tool_name: String,
    tool_id: Option<String>,
    arguments: Option<Value>,
    result: Option<Value>,
    error: Option<Value>,
    duration_ms: Option<f64>,
    tokens_used: Option<u64>,
    /// RFC 3339 text or Unix seconds.
    timestamp: Option<Value>,
    #[serde(rename = "tenant_id")]
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

async fn record(
    State(state): State<AppState>,
    Tenant(key): Tenant,
    JsonBody(body): JsonBody<RecordBody>,
) -> Result<StatusCode, ApiError> {
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
    state
        .engine
        .record_tool(key.tenant_id, &body.session_id, execution)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One execution as listed.
#[derive(Serialize)]
struct ExecutionView {
    tool_name: String,
    tool_id: Option<String>,
    arguments: Box<RawValue>,
    result: Box<RawValue>,
    error: Option<String>,
    duration_ms: u64,
    tokens_used: u64,
    executed_at: String,
}

fn raw(text: String) -> Box<RawValue> {
    RawValue::from_string(text).unwrap_or_else(|_| {
        // Stored text was produced by serde_json, so this only guards
        // against a corrupted record.
        RawValue::from_string("null".to_owned()).expect("null is valid JSON")
    })
}

#[derive(Debug, Default, Deserialize)]
struct ExecutionsParams {
    limit: Option<String>,
}

async fn executions(
    State(state): State<AppState>,
    access: SessionAccess,
    params: Result<Query<ExecutionsParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
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
    Ok(Json(json!({ "count": views.len(), "executions": views })))
}

async fn metrics(
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
