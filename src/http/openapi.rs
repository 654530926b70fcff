//! The OpenAPI 3.1 document, generated from the handlers' annotations and
//! the types they exchange (utoipa), served at `GET /api/v1/openapi.json`.
//!
//! Request bodies and most answers are the very types the handlers decode
//! and encode; the few answers built as JSON in place have their shape here
//! ([`SessionList`], [`Validation`], …) next to the test that keeps them
//! honest (`tests/openapi.rs` checks real answers against the document).

use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use super::AppState;

pub use super::error::ErrorResponse;

/// A created session: the resource and its tokens, shown this once.
#[derive(Serialize, ToSchema)]
pub struct CreatedSession {
    /// The session resource's fields.
    #[serde(flatten)]
    pub session: crate::model::SessionView,
    /// `est_…`: authenticates the (T) calls and the WebSocket of this session.
    pub session_token: String,
    /// `ert_…`: rotates both tokens at `POST …/refresh`.
    pub refresh_token: String,
}

/// A refreshed session; the tokens only when a refresh token was given.
#[derive(Serialize, ToSchema)]
pub struct RefreshedSession {
    /// The session resource's fields.
    #[serde(flatten)]
    pub session: crate::model::SessionView,
    /// The new session token (only with a refresh token).
    pub session_token: Option<String>,
    /// The new refresh token (only with a refresh token).
    pub refresh_token: Option<String>,
}

/// A page of sessions, newest first.
#[derive(Serialize, ToSchema)]
pub struct SessionList {
    /// The sessions.
    pub sessions: Vec<crate::model::SessionView>,
    /// Items in this page.
    pub count: usize,
    /// Cursor of the next page, or null on the last.
    pub next_cursor: Option<String>,
}

/// `POST …/validate`.
#[derive(Serialize, ToSchema)]
pub struct Validation {
    /// Always true (a final session answers 410).
    pub valid: bool,
    /// The session.
    pub session: crate::model::SessionView,
}

/// `POST /admin/sessions/terminate`.
#[derive(Serialize, ToSchema)]
pub struct BulkTerminated {
    /// Live sessions this call ended.
    pub terminated: usize,
}

/// `POST /admin/sessions/cleanup`.
#[derive(Serialize, ToSchema)]
pub struct Cleanup {
    /// Sessions expired by this call.
    pub expired: usize,
}

/// `POST /admin/flush`.
#[derive(Serialize, ToSchema)]
pub struct Flush {
    /// Always true (a failure answers 503).
    pub flushed: bool,
    /// Whether the PostgreSQL tier is on.
    pub postgres: bool,
    /// Entries still in the outbox (null without the tier).
    pub outbox_depth: Option<u64>,
}

/// `GET /healthz`, `GET /readyz`.
#[derive(Serialize, ToSchema)]
pub struct Health {
    /// `ok`, `ready`, `recovering` or `store not writable`.
    pub status: String,
    /// The PostgreSQL backlog (readyz, with the tier on).
    #[schema(value_type = Option<Object>)]
    pub postgres: Option<serde_json::Value>,
}

/// The decrypted passthrough bundle, as given at creation.
#[derive(Serialize, ToSchema)]
pub struct PassthroughBundle {
    /// Per provider name, its credentials (any JSON).
    #[schema(value_type = Object)]
    pub credentials: serde_json::Value,
}

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "A tenant API key (also accepted as Authorization: Bearer <key>)",
            ))),
        );
        components.add_security_scheme(
            "session_token",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "The session's own token, est_…, on the calls of that session",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "admin_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Admin-Key"))),
        );
    }
}

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "edge-sessions",
        description = "Session engine for MCP edge clients. Errors always use the ErrorResponse body; every response carries X-Request-Id; limited calls carry RateLimit-Limit, RateLimit-Remaining and RateLimit-Reset.",
        version = "1"
    ),
    paths(
        super::sessions::create,
        super::sessions::list,
        super::sessions::list_active,
        super::sessions::tenant_metrics,
        super::sessions::read,
        super::sessions::update,
        super::sessions::terminate,
        super::sessions::activity,
        super::sessions::refresh,
        super::sessions::validate,
        super::sessions::passthrough_auth,
        super::tools::execute,
        super::tools::executions,
        super::tools::metrics,
        super::tools::record,
        super::ws::upgrade,
        super::admin::cleanup,
        super::admin::flush,
        super::admin::list,
        super::admin::read,
        super::admin::terminate,
        super::admin::terminate_matching,
        super::admin::backup,
        super::cluster::cluster_view,
        super::export::export,
        super::stats::stats,
        super::stats::ticket,
        super::stats::stats_ws,
        super::stats::dashboard,
        super::health::healthz,
        super::health::readyz,
        document,
    ),
    components(schemas(ErrorResponse)),
    modifiers(&Security),
    tags(
        (name = "sessions", description = "Session lifecycle"),
        (name = "tools", description = "Tool executions and per-session metrics"),
        (name = "admin", description = "Operations (X-Admin-Key)"),
        (name = "health", description = "Liveness and readiness"),
    )
)]
pub struct ApiDoc;

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new().route("/api/v1/openapi.json", get(document))
}

/// This document (no key needed).
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json", body = Object))
)]
pub(crate) async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
