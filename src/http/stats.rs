//! Live engine stats for SREs: `GET /admin/stats` (JSON), the same pushed
//! once a second over `GET /admin/stats/ws`, and `POST /admin/tickets`,
//! which trades the admin key for a single-use 60 s ticket so the dashboard
//! page can open that WebSocket (browsers cannot set headers on one).
//!
//! Browser hardening: the dashboard page, its script and its style are
//! separate same-origin files, so the page's `Content-Security-Policy`
//! allows nothing inline and no other origin ([`DASHBOARD_CSP`]), and no
//! page may frame it (`X-Frame-Options: DENY`). A ticket is answered with
//! `Cache-Control: no-store`. The stats WebSocket refuses an upgrade whose
//! `Origin` is not the request's own `Host` (403 `forbidden`), so another
//! site's page cannot open it with a ticket it got hold of.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use axum::extract::ws::{Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use dashmap::DashMap;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::error::ApiError;
use super::extract::Admin;
use super::history::Sample;
use super::openapi::ErrorResponse;
use super::AppState;
use crate::engine::stats::ShardSnapshot;
use crate::model::time::{format_rfc3339, now_ms};

/// How long a ticket is valid.
const TICKET_TTL: Duration = Duration::from_secs(60);
/// Stats push period on the WebSocket.
const PUSH_EVERY: Duration = Duration::from_secs(1);

/// The routes of this module.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/admin/stats", get(stats))
        .route("/admin/stats/ws", get(stats_ws))
        .route("/admin/tickets", post(ticket))
        .route("/admin/dashboard", get(dashboard))
        .route("/admin/dashboard.js", get(dashboard_script))
        .route("/admin/dashboard.css", get(dashboard_style))
}

/// The dashboard page: static, self-contained (no CDN), holding no data and
/// no key; it asks for the admin key, trades it for a ticket and shows the
/// stats WebSocket live.
const DASHBOARD: &str = include_str!("assets/dashboard.html");
/// The dashboard's script (a file, not inline: see [`DASHBOARD_CSP`]).
const DASHBOARD_JS: &str = include_str!("assets/dashboard.js");
/// The dashboard's style.
const DASHBOARD_CSS: &str = include_str!("assets/dashboard.css");

/// The dashboard's policy: its own script, style and WebSocket, nothing
/// inline, no other origin, no framing, no form posting anywhere.
pub const DASHBOARD_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// Headers of the dashboard's files: its policy, no framing, no sniffing.
fn dashboard_headers(content_type: &'static str) -> [(HeaderName, HeaderValue); 4] {
    [
        (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(DASHBOARD_CSP),
        ),
        (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
    ]
}

/// The live dashboard page (no key: it holds no data).
#[utoipa::path(
    get,
    path = "/admin/dashboard",
    tag = "admin",
    responses((status = 200, description = "An HTML page", content_type = "text/html", body = String))
)]
pub(crate) async fn dashboard() -> impl IntoResponse {
    (dashboard_headers("text/html; charset=utf-8"), DASHBOARD)
}

/// The dashboard's script.
async fn dashboard_script() -> impl IntoResponse {
    (
        dashboard_headers("text/javascript; charset=utf-8"),
        DASHBOARD_JS,
    )
}

/// The dashboard's style.
async fn dashboard_style() -> impl IntoResponse {
    (dashboard_headers("text/css; charset=utf-8"), DASHBOARD_CSS)
}

/// Single-use tickets, kept as hashes until redeemed or expired.
#[derive(Default)]
pub struct Tickets(DashMap<[u8; 32], Instant>);

impl Tickets {
    /// A new ticket, valid for [`TICKET_TTL`].
    pub fn issue(&self) -> String {
        let now = Instant::now();
        self.0.retain(|_, expires| *expires > now);
        let mut bytes = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        let ticket = format!(
            "etk_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        self.0
            .insert(Sha256::digest(ticket.as_bytes()).into(), now + TICKET_TTL);
        ticket
    }

    /// Whether `ticket` is valid; it is used up either way.
    pub fn redeem(&self, ticket: &str) -> bool {
        let key: [u8; 32] = Sha256::digest(ticket.as_bytes()).into();
        self.0
            .remove(&key)
            .is_some_and(|(_, expires)| expires > Instant::now())
    }
}

/// The stats answer (the contract's fields, and a little more).
#[derive(Serialize, utoipa::ToSchema)]
pub struct Stats {
    /// Seconds since the engine started.
    pub uptime_seconds: u64,
    /// Sessions across tenants.
    #[schema(value_type = Object)]
    pub sessions: serde_json::Value,
    /// Per shard (arbiter).
    #[schema(value_type = Vec<Object>)]
    pub shards: Vec<ShardSnapshot>,
    /// Per tenant, most live sessions first.
    #[schema(value_type = Vec<Object>)]
    pub tenants: Vec<serde_json::Value>,
    /// The write-behind queue.
    #[schema(value_type = Object)]
    pub write_behind: serde_json::Value,
    /// The PostgreSQL outbox (null without the tier).
    #[schema(value_type = Option<Object>)]
    pub outbox: Option<serde_json::Value>,
    /// The process.
    #[schema(value_type = Object)]
    pub process: serde_json::Value,
    /// The newest one-second sample (null before the first).
    pub recent: Option<Sample>,
    /// The tools with the most executions since the start, most first.
    #[schema(value_type = Vec<Object>)]
    pub top_tools: Vec<serde_json::Value>,
    /// On a cluster node: this node, the nodes (as last read, a quarter
    /// lease old at most) and the shards each owns; null elsewhere.
    #[schema(value_type = Option<Object>)]
    pub cluster: Option<serde_json::Value>,
    /// The last 15 minutes, one sample a second, oldest first: in the
    /// stats WebSocket's first message only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<Sample>>,
}

/// Tools listed in `top_tools`.
const TOP_TOOLS: usize = 10;

/// The stats right now.
pub fn collect(state: &AppState) -> Stats {
    let engine = &state.engine;
    let names: std::collections::HashMap<_, _> = engine.tenant_names().into_iter().collect();
    let mut tenants: Vec<(uuid::Uuid, usize, i64)> = engine
        .live_by_tenant()
        .into_iter()
        .map(|(tenant, live)| (tenant, live, engine.idle_sessions(tenant)))
        .collect();
    tenants.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let live: usize = tenants.iter().map(|t| t.1).sum();
    let idle: i64 = tenants.iter().map(|t| t.2).sum();
    let wb = engine.write_behind_stats();
    let last_flush = wb.last_flush_at_ms.load(Ordering::Relaxed);
    Stats {
        uptime_seconds: engine.uptime().as_secs(),
        sessions: serde_json::json!({ "live": live, "idle": idle, "active": live as i64 - idle }),
        shards: engine.shard_stats(),
        tenants: tenants
            .into_iter()
            .map(|(tenant, live, idle)| {
                serde_json::json!({
                    "tenant_id": tenant,
                    "name": names.get(&tenant).cloned().unwrap_or_default(),
                    "live_sessions": live,
                    "idle_sessions": idle,
                })
            })
            .collect(),
        write_behind: serde_json::json!({
            "queue_depth": wb.queue_depth.load(Ordering::Relaxed),
            "flush_lag_ms": wb.flush_lag_ms(),
            "last_flush_at": (last_flush > 0).then(|| format_rfc3339(last_flush)),
            "last_flush_micros": wb.last_flush_micros.load(Ordering::Relaxed),
            "batches": wb.batches.load(Ordering::Relaxed),
            "writes": wb.writes.load(Ordering::Relaxed),
        }),
        cluster: state.cluster.as_ref().map(|cluster| {
            let view = cluster.member().map(|m| m.view()).unwrap_or_default();
            serde_json::json!({
                "node_id": cluster.ownership.node_id(),
                "shards": { "total": cluster.ownership.shards(), "owned_here": cluster.ownership.serving() },
                "nodes": view.nodes.iter().map(|n| serde_json::json!({
                    "node_id": n.node_id,
                    "status": if n.alive { "alive" } else { "gone" },
                    "shards": view.shards_of(&n.node_id),
                })).collect::<Vec<_>>(),
            })
        }),
        outbox: engine.outbox_stats().map(|o| {
            serde_json::json!({
                "depth": o.depth(),
                "oldest_entry_age_ms": o.oldest_age_ms(),
                "shipped": o.shipped.load(Ordering::Relaxed),
                "failures": o.failures.load(Ordering::Relaxed),
                "dead_letters": o.dead_letters.load(Ordering::Relaxed),
            })
        }),
        process: serde_json::json!({ "rss_bytes": rss_bytes() }),
        recent: state.history.latest(),
        top_tools: crate::telemetry::live::top_tools(TOP_TOOLS)
            .into_iter()
            .map(|(name, executions)| serde_json::json!({ "tool_name": name, "executions": executions }))
            .collect(),
        history: None,
    }
}

/// Resident set size, from `/proc/self/status` (0 where there is none).
fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Live engine stats (admin key).
#[utoipa::path(
    get,
    path = "/admin/stats",
    tag = "admin",
    responses(
        (status = 200, description = "Per shard and per tenant: live actors, mailbox depth, operations per second, latency p50/p99/p999; write-behind, outbox, RSS", body = Stats),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 429, description = "rate_limited", body = ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn stats(State(state): State<AppState>, _: Admin) -> Json<Stats> {
    Json(collect(&state))
}

/// `{"ticket", "expires_at"}`.
#[derive(Serialize, utoipa::ToSchema)]
pub struct Ticket {
    /// Single use, for `GET /admin/stats/ws?ticket=…`.
    pub ticket: String,
    /// When it stops working (60 s).
    pub expires_at: String,
}

/// A single-use 60 s ticket for the stats WebSocket (admin key).
#[utoipa::path(
    post,
    path = "/admin/tickets",
    tag = "admin",
    responses(
        (status = 200, description = "A ticket", body = Ticket),
        (status = 401, description = "unauthorized", body = ErrorResponse),
        (status = 429, description = "rate_limited", body = ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn ticket(State(state): State<AppState>, _: Admin) -> impl IntoResponse {
    (
        // A ticket is a credential for a minute: no cache keeps it.
        [(header::CACHE_CONTROL, HeaderValue::from_static("no-store"))],
        Json(Ticket {
            ticket: state.tickets.issue(),
            expires_at: format_rfc3339(now_ms() + TICKET_TTL.as_millis() as i64),
        }),
    )
}

/// Whether a request's `Origin` (when a browser sent one) is the server
/// the request was sent to: scheme-less `host[:port]` equal to `Host`.
/// Without `Origin` (a non-browser client) there is nothing to check.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return true;
    };
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest.trim_end_matches('/'));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

#[derive(Debug, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct StatsWsParams {
    /// A ticket from `POST /admin/tickets` (or send `X-Admin-Key`).
    ticket: Option<String>,
}

/// The stats, pushed once a second over a WebSocket.
#[utoipa::path(
    get,
    path = "/admin/stats/ws",
    tag = "admin",
    params(StatsWsParams),
    responses(
        (status = 101, description = "Switching to the WebSocket protocol; a Stats JSON text frame every second"),
        (status = 400, description = "not a WebSocket upgrade", body = ErrorResponse),
        (status = 401, description = "no valid ticket or admin key", body = ErrorResponse),
        (status = 403, description = "forbidden: the Origin is another site's", body = ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn stats_ws(
    State(state): State<AppState>,
    headers: HeaderMap,
    params: Result<Query<StatsWsParams>, axum::extract::rejection::QueryRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    // Before the ticket is redeemed: a foreign page does not use it up.
    if !same_origin(&headers) {
        tracing::warn!(
            event = "auth_failure",
            reason = "stats websocket from a foreign origin",
            origin = ?headers.get(header::ORIGIN),
            "authentication failed"
        );
        return Err(ApiError::ForeignOrigin);
    }
    let by_key = headers
        .get("x-admin-key")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|k| state.keys.is_admin(k));
    let by_ticket = params
        .ok()
        .and_then(|Query(p)| p.ticket)
        .is_some_and(|t| state.tickets.redeem(&t));
    if !by_key && !by_ticket {
        tracing::warn!(
            event = "auth_failure",
            reason = "stats websocket without a valid ticket or admin key",
            "authentication failed"
        );
        return Err(ApiError::Unauthorized);
    }
    let ws = ws.map_err(|_| {
        super::error::invalid("upgrade", "this endpoint needs a WebSocket upgrade request")
    })?;
    Ok(ws.on_upgrade(move |socket| push_stats(socket, state)))
}

async fn push_stats(mut socket: WebSocket, state: AppState) {
    let mut ticker = tokio::time::interval(PUSH_EVERY);
    // The first message carries the history, so a (re)loaded page draws
    // the last 15 minutes at once.
    let mut history = Some(state.history.all());
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let stats = Stats { history: history.take(), ..collect(&state) };
                let text = serde_json::to_string(&stats).unwrap_or_default();
                let send = socket.send(Message::Text(Utf8Bytes::from(text)));
                match tokio::time::timeout(Duration::from_secs(5), send).await {
                    Ok(Ok(())) => {}
                    // Slow or gone: stop, nothing is queued.
                    _ => return,
                }
            }
            frame = socket.recv() => match frame {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_are_single_use() {
        let tickets = Tickets::default();
        let t = tickets.issue();
        assert!(t.starts_with("etk_"));
        assert!(tickets.redeem(&t));
        assert!(!tickets.redeem(&t), "used up");
        assert!(!tickets.redeem("etk_made_up"));
    }

    #[test]
    fn only_the_own_origin_passes() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut map = HeaderMap::new();
            for (k, v) in pairs {
                map.insert(*k, HeaderValue::from_static(v));
            }
            map
        };
        assert!(same_origin(&headers(&[("host", "127.0.0.1:8081")])));
        assert!(same_origin(&headers(&[
            ("host", "127.0.0.1:8081"),
            ("origin", "http://127.0.0.1:8081")
        ])));
        assert!(same_origin(&headers(&[
            ("host", "Sessions.example:443"),
            ("origin", "https://sessions.example:443")
        ])));
        for origin in ["http://evil.example", "http://127.0.0.1:8082", "null", ""] {
            assert!(
                !same_origin(&headers(&[("host", "127.0.0.1:8081"), ("origin", origin)])),
                "{origin}"
            );
        }
    }
}
