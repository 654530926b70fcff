//! `GET /admin/sessions/export?since=&tenant_id=&format=csv|ndjson`: every
//! session of every tenant (or one), streamed as CSV with a header row or as
//! NDJSON. Memory stays flat however many sessions there are: sessions are
//! read from the store one at a time and written as they come, with a
//! bounded channel between the two. Credentials and tokens are never part
//! of a session's resource, so they cannot be exported.
//!
//! A CSV cell that a spreadsheet would read as a formula (it starts with
//! `=`, `+`, `-`, `@`, a tab or a carriage return) is written with a
//! leading `'` ([`defuse_formula`]): client-chosen fields such as
//! `edge_mcp_id` end up in the files operators open. NDJSON is unchanged.

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::StreamExt as _;
use serde::Deserialize;
use tokio_stream::wrappers::ReceiverStream;
use uuid::Uuid;

use super::error::{invalid, ApiError};
use super::extract::Admin;
use super::openapi::ErrorResponse;
use super::AppState;
use crate::model::time::parse_rfc3339;
use crate::model::SessionView;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/admin/sessions/export", get(export))
}

/// The CSV columns, in order; the contract fixes the first six.
pub const CSV_COLUMNS: [&str; 19] = [
    "session_id",
    "tenant_id",
    "edge_mcp_id",
    "client_type",
    "status",
    "created_at",
    "last_activity_at",
    "expires_at",
    "terminated_at",
    "termination_reason",
    "tool_execution_count",
    "tool_error_count",
    "total_tokens_used",
    "client_name",
    "client_version",
    "user_id",
    "initialized",
    "version",
    "id",
];

/// Export query parameters.
#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct ExportParams {
    /// Only sessions created at or after this instant (RFC 3339).
    #[param(format = DateTime)]
    since: Option<String>,
    /// Only this tenant's sessions.
    tenant_id: Option<String>,
    /// `csv` (the default) or `ndjson`.
    #[param(pattern = "^(csv|ndjson)$")]
    format: Option<String>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Csv,
    Ndjson,
}

/// Streams sessions as CSV or NDJSON (admin key).
#[utoipa::path(
    get,
    path = "/admin/sessions/export",
    tag = "admin",
    params(ExportParams),
    responses(
        (status = 200, description = "CSV with a header row, or one session resource per line", content(
            (String = "text/csv"),
            (String = "application/x-ndjson")
        )),
        (status = 400, description = "validation_failed", body = ErrorResponse),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 429, description = "rate_limited", body = ErrorResponse),
        (status = 503, description = "service_unavailable", body = ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn export(
    State(state): State<AppState>,
    _: Admin,
    params: Result<Query<ExportParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(params) =
        params.map_err(|e| invalid("query", format!("query string is not valid: {e}")))?;
    let since = match params.since.as_deref() {
        None | Some("") => None,
        Some(text) => Some(
            parse_rfc3339(text)
                .ok_or_else(|| invalid("since", "since must be an RFC 3339 timestamp"))?,
        ),
    };
    let tenant = match params.tenant_id.as_deref() {
        None | Some("") => None,
        Some(text) => Some(
            Uuid::parse_str(text).map_err(|_| invalid("tenant_id", "tenant_id must be a uuid"))?,
        ),
    };
    let format = match params.format.as_deref() {
        None | Some("") | Some("csv") => Format::Csv,
        Some("ndjson") => Format::Ndjson,
        Some(_) => return Err(invalid("format", "format must be csv or ndjson")),
    };
    let sessions = state.engine.export(since, tenant)?;
    tracing::info!(?since, ?tenant, "export started");
    let header_row = (format == Format::Csv).then(|| csv_row(&CSV_COLUMNS));
    let rows = ReceiverStream::new(sessions).map(move |view| {
        Ok::<_, std::convert::Infallible>(Bytes::from(match format {
            Format::Csv => csv_session(&view),
            Format::Ndjson => {
                let mut line = serde_json::to_vec(&view).unwrap_or_default();
                line.push(b'\n');
                line
            }
        }))
    });
    let body = match header_row {
        Some(head) => Body::from_stream(
            futures::stream::once(async move { Ok(Bytes::from(head)) }).chain(rows),
        ),
        None => Body::from_stream(rows),
    };
    let content_type = match format {
        Format::Csv => "text/csv; charset=utf-8",
        Format::Ndjson => "application/x-ndjson",
    };
    let mut response = body.into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}

/// One CSV record (RFC 4180 quoting).
fn csv_row<S: AsRef<[u8]>>(fields: &[S]) -> Vec<u8> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    // Writing to a Vec cannot fail.
    let _ = writer.write_record(fields);
    writer.into_inner().unwrap_or_default()
}

/// The characters that make a spreadsheet read a cell as a formula (OWASP
/// "CSV injection").
const FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// `cell` with a leading `'` when it starts like a formula, else as it is.
fn defuse_formula(cell: String) -> String {
    if cell.starts_with(FORMULA_STARTS) {
        format!("'{cell}")
    } else {
        cell
    }
}

fn csv_session(v: &SessionView) -> Vec<u8> {
    let opt = |s: &Option<String>| s.clone().unwrap_or_default();
    // Every cell, not only the client's text: a number never starts like a
    // formula, and a rule per column would miss the next text column.
    let cells = [
        v.session_id.clone(),
        v.tenant_id.to_string(),
        v.edge_mcp_id.clone(),
        v.client_type.to_owned(),
        v.status.to_owned(),
        v.created_at.clone(),
        v.last_activity_at.clone(),
        v.expires_at.clone(),
        opt(&v.terminated_at),
        opt(&v.termination_reason),
        v.tool_execution_count.to_string(),
        v.tool_error_count.to_string(),
        v.total_tokens_used.to_string(),
        opt(&v.client_name),
        opt(&v.client_version),
        v.user_id.map(|u| u.to_string()).unwrap_or_default(),
        v.initialized.to_string(),
        v.version.to_string(),
        v.id.to_string(),
    ];
    csv_row(&cells.map(defuse_formula))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_cells_get_a_leading_quote() {
        for cell in ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"] {
            assert_eq!(defuse_formula(cell.to_owned()), format!("'{cell}"));
        }
        for cell in ["", "laptop-1", "1", "'=x", " =x"] {
            assert_eq!(defuse_formula(cell.to_owned()), cell);
        }
    }
}
