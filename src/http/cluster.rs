//! A cluster node's HTTP side: every call on one session goes to the node
//! that owns the session's shard. This node serves it when it owns the
//! shard; otherwise it forwards the call to the owner and relays the
//! answer. Either way the answer names the owner in
//! `X-Edge-Sessions-Node`.
//!
//! **Forwarding.** One pooled HTTP/1.1 keep-alive client (hyper) per node
//! reaches the others at their `advertise_url`s: after the first call to a
//! node, a forwarded call costs a request on an open connection, not a
//! TCP handshake. The forwarded request keeps the caller's method, path,
//! query, headers (credentials and `X-Request-Id` included) and body; it
//! adds the cluster secret (`X-Edge-Sessions-Forwarded`), which the owner
//! checks before it trusts the caller's address in `X-Edge-Sessions-Peer`
//! (rate limits of failed authentications count the caller, not the
//! forwarding node). Authentication, validation and rate limits run on the
//! owner, once.
//!
//! **Waiting.** While a shard is being taken over (its sessions rebuilt),
//! handed over, or has no owner (its last owner died, its lease has not run
//! out), a call waits, re-reading the owners at most every
//! [`VIEW_REFRESH`], for at most `hand_over_wait`; then it gets 503.
//! A forward that cannot connect (the owner just died) waits the same way;
//! one that reached the owner is never sent twice (a tool execution must
//! not count twice).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use subtle::ConstantTimeEq as _;
use uuid::Uuid;

use super::access::{presented_api_key, session_token};
use super::error::ApiError;
use super::AppState;
use crate::cluster::{Member, Ownership, Stage};
use crate::crypto::tokens;
use crate::model::SessionError;

/// The owner of the session a call is about.
pub const NODE_HEADER: HeaderName = HeaderName::from_static("x-edge-sessions-node");
/// Set by a node forwarding a call: the cluster secret.
pub const FORWARDED_HEADER: HeaderName = HeaderName::from_static("x-edge-sessions-forwarded");
/// Set by a node forwarding a call: the caller's address.
pub const PEER_HEADER: HeaderName = HeaderName::from_static("x-edge-sessions-peer");

/// Least time between two reads of the owners by waiting calls.
const VIEW_REFRESH: Duration = Duration::from_millis(100);
/// How often a waiting call looks again.
const WAIT_STEP: Duration = Duration::from_millis(20);

/// A cluster node's handles for its HTTP side.
pub struct ClusterHttp {
    /// This node's membership (and the owners as last read), once joined.
    member: std::sync::OnceLock<Arc<Member>>,
    /// The shards this node serves.
    pub ownership: Arc<Ownership>,
    /// The shared secret between nodes.
    secret: String,
    /// The pooled client to the other nodes.
    client: Client<HttpConnector, Body>,
    /// Longest a call waits for its shard's owner.
    hand_over_wait: Duration,
    /// Longest a forwarded call waits for its answer: longer than the
    /// owner can take (its own wait for the shard, then the commit), so a
    /// call given up here is not carried out there; a frozen owner costs
    /// its callers this long, then 503 (once it wakes, it no longer holds
    /// the shard and refuses the call).
    forward_limit: Duration,
}

impl ClusterHttp {
    /// The HTTP side of a cluster node: calls wait at most
    /// `hand_over_wait` for their shard's owner, and an owner commits
    /// within `commit_timeout`.
    pub fn new(
        ownership: Arc<Ownership>,
        secret: String,
        hand_over_wait: Duration,
        commit_timeout: Duration,
    ) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .build(connector);
        ClusterHttp {
            member: std::sync::OnceLock::new(),
            ownership,
            secret,
            client,
            hand_over_wait,
            forward_limit: hand_over_wait
                + crate::cluster::quota::RESERVE_LIMIT
                + commit_timeout
                + Duration::from_secs(2),
        }
    }

    /// This node joined as `member`, and its first round went through.
    pub fn mark_joined(&self, member: Arc<Member>) {
        let _ = self.member.set(member);
    }

    /// Whether this node's lease of `shard` runs (see [`Member::holds`]).
    fn holds(&self, shard: u32) -> bool {
        self.member().is_some_and(|m| m.holds(shard).is_some())
    }

    /// Whether this node serves `shard` now: its tenure here is serving
    /// and its lease runs on this node's clock.
    fn serving(&self, shard: u32) -> bool {
        self.ownership.stage(shard) == Some(Stage::Serving) && self.holds(shard)
    }

    /// Whether this node serves the session `id` of `tenant` now.
    pub fn serves(&self, tenant: Uuid, id: &str) -> bool {
        self.serving(self.ownership.shard_of(tenant, id))
    }

    /// This node's membership, once joined.
    pub fn member(&self) -> Option<&Arc<Member>> {
        self.member.get()
    }

    /// Whether this node has joined (its first round went through).
    pub fn joined(&self) -> bool {
        self.member.get().is_some()
    }

    /// The addresses of the other live nodes, as last read.
    fn other_nodes(&self, member: &Member) -> Vec<String> {
        let me = self.ownership.node_id();
        member
            .view()
            .nodes
            .iter()
            .filter(|n| n.alive && n.node_id != me)
            .map(|n| n.advertise_url.clone())
            .collect()
    }

    /// Whether `headers` carry this cluster's secret (a forwarded call).
    fn forwarded(&self, headers: &axum::http::HeaderMap) -> bool {
        headers
            .get(&FORWARDED_HEADER)
            .is_some_and(|v| bool::from(v.as_bytes().ct_eq(self.secret.as_bytes())))
    }
}

/// Which session a call is about, for routing.
enum Target {
    /// Not about one session: served here.
    None,
    /// This session (from the path).
    Path(String),
    /// Named in the body (a create, `POST /api/v1/executions`).
    Body,
    /// The tenant's sessions on every node: gathered.
    Gather(Gathered),
    /// A session's WebSocket: opened at the owner, through this node.
    Socket(String),
    /// An operator's call on one session of a tenant.
    Admin(Uuid, String),
    /// An operator's call every node carries out on its own sessions; the
    /// answers' counts are summed.
    Broadcast(Summed),
}

/// What a broadcast call answers, summed over the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Summed {
    /// `{"terminated": n}`.
    Terminated,
    /// `{"expired": n}`.
    Expired,
    /// `{"flushed": true, "postgres": true, "outbox_depth": n}`.
    Flushed,
}

/// What a gathered read is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gathered {
    /// A page of a tenant's sessions, newest first.
    List,
    /// The tenant's figures.
    Metrics,
    /// A page of every tenant's sessions (`/admin/sessions`).
    AdminList,
}

fn target_of(method: &Method, uri: &Uri) -> Target {
    let path = uri.path();
    if let Some(rest) = path.strip_prefix("/admin/") {
        return admin_target_of(method, rest);
    }
    if *method == Method::POST && (path == "/api/v1/sessions" || path == "/api/v1/executions") {
        return Target::Body;
    }
    if *method == Method::GET {
        match path {
            "/api/v1/sessions" | "/api/v1/sessions/active" => {
                return Target::Gather(Gathered::List)
            }
            "/api/v1/sessions/metrics" => return Target::Gather(Gathered::Metrics),
            _ => {}
        }
    }
    let Some(rest) = path.strip_prefix("/api/v1/sessions/") else {
        return Target::None;
    };
    let id = rest.split('/').next().unwrap_or_default();
    // Tenant-wide reads, not sessions (the ids are reserved words).
    if id.is_empty() || id == "active" || id == "metrics" {
        return Target::None;
    }
    if rest.ends_with("/ws") {
        return Target::Socket(id.to_owned());
    }
    Target::Path(id.to_owned())
}

/// The routing of an operator's call (`/admin/` + `rest`).
fn admin_target_of(method: &Method, rest: &str) -> Target {
    match (method, rest) {
        (&Method::GET, "sessions") => Target::Gather(Gathered::AdminList),
        (&Method::POST, "sessions/terminate") => Target::Broadcast(Summed::Terminated),
        (&Method::POST, "sessions/cleanup") => Target::Broadcast(Summed::Expired),
        (&Method::POST, "flush") => Target::Broadcast(Summed::Flushed),
        _ => {
            // tenants/{tenant}/sessions/{id}
            let parts: Vec<&str> = rest.split('/').collect();
            match parts.as_slice() {
                ["tenants", tenant, "sessions", id] if !id.is_empty() => {
                    match Uuid::parse_str(tenant) {
                        Ok(tenant) => Target::Admin(tenant, (*id).to_owned()),
                        Err(_) => Target::None,
                    }
                }
                _ => Target::None,
            }
        }
    }
}

/// The tenant a call names by its credential, unchecked (the owner checks
/// it): an API key's tenant, else the one a session token names.
fn tenant_of(state: &AppState, headers: &axum::http::HeaderMap) -> Option<Uuid> {
    if let Some(key) = presented_api_key(headers) {
        return state.keys.tenant_key(key).map(|k| k.tenant_id);
    }
    tokens::tenant_of(session_token(headers)?, tokens::SESSION_PREFIX)
}

/// The middleware: serves a call here, or forwards it to its owner.
pub async fn route(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(cluster) = state.cluster.clone() else {
        return next.run(request).await;
    };
    let mut request = request;
    let forwarded = cluster.forwarded(request.headers());
    if forwarded {
        // The caller's address, as the forwarding node saw it.
        if let Some(peer) = request
            .headers()
            .get(&PEER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<SocketAddr>().ok())
        {
            request.extensions_mut().insert(ConnectInfo(peer));
        }
    } else {
        // Only a node may name itself as forwarding.
        request.headers_mut().remove(&FORWARDED_HEADER);
        request.headers_mut().remove(&PEER_HEADER);
    }
    let target = target_of(request.method(), request.uri());
    // Operators' calls name their tenant in the path, or none.
    match target {
        Target::Admin(tenant, id) => {
            let shard = cluster.ownership.shard_of(tenant, &id);
            return serve_or_forward(&cluster, shard, forwarded, request, next).await;
        }
        Target::Gather(Gathered::AdminList) if !forwarded => {
            return gather(&cluster, Gathered::AdminList, request, next).await
        }
        Target::Broadcast(summed) if !forwarded => {
            return broadcast(&cluster, summed, request, next).await
        }
        Target::Broadcast(_) | Target::Gather(Gathered::AdminList) => {
            return next.run(request).await
        }
        _ => {}
    }
    let Some(tenant) = tenant_of(&state, request.headers()) else {
        // No credential naming a tenant: answered here (401).
        return next.run(request).await;
    };
    let (session_id, request) = match target {
        Target::None | Target::Admin(..) | Target::Broadcast(_) => return next.run(request).await,
        Target::Gather(kind) if !forwarded => return gather(&cluster, kind, request, next).await,
        Target::Gather(_) => return next.run(request).await,
        Target::Socket(id) if !forwarded => {
            let shard = cluster.ownership.shard_of(tenant, &id);
            return socket(&cluster, shard, request, next).await;
        }
        // Forwarded here: served only while this node holds the shard;
        // else 421, and the forwarding node asks the new owner.
        Target::Socket(id) if cluster.serves(tenant, &id) => return next.run(request).await,
        Target::Socket(_) => return misdirected(),
        Target::Path(id) => (id, request),
        Target::Body => match body_session_id(request).await {
            Ok((Named::Valid(id), request)) => (id, request),
            // A create without an id gets one here: of a shard this node
            // serves when it serves any (no forward), else any; then it
            // goes as a create of that id.
            Ok((Named::Absent(Some(fields)), request))
                if request.uri().path() == "/api/v1/sessions" =>
            {
                let id = cluster.ownership.pick_session_id(tenant);
                let request = with_session_id(request, fields, &id);
                (id, request)
            }
            // An execution that names no valid session, a body that is not
            // a JSON object, an invalid id: refused here (400), as a single
            // node refuses them.
            Ok((_, request)) => return next.run(request).await,
            Err(e) => return e.into_response(),
        },
    };
    let shard = cluster.ownership.shard_of(tenant, &session_id);
    serve_or_forward(&cluster, shard, forwarded, request, next).await
}

/// Lets through only calls another node forwarded (the operators' routes
/// on the public listener of a node with its own admin listener).
pub async fn forwarded_only(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    match &state.cluster {
        Some(cluster) if cluster.forwarded(request.headers()) => next.run(request).await,
        _ => ApiError::RouteNotFound.into_response(),
    }
}

/// A create's request with its JSON body `fields` and `session_id` set.
fn with_session_id(request: Request, mut fields: JsonObject, id: &str) -> Request {
    let (mut parts, _) = request.into_parts();
    fields.insert("session_id".into(), id.into());
    let body = serde_json::to_vec(&fields).unwrap_or_default();
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    Request::from_parts(parts, Body::from(body))
}

/// Serves the call here once this node serves `shard`, or forwards it to
/// the owner; waits while the shard has none (see the module docs).
async fn serve_or_forward(
    cluster: &Arc<ClusterHttp>,
    shard: u32,
    forwarded: bool,
    request: Request,
    next: Next,
) -> Response {
    let deadline = tokio::time::Instant::now() + cluster.hand_over_wait;
    let me = cluster.ownership.node_id().to_owned();
    let mut request = Some(request);
    loop {
        match cluster.ownership.stage(shard) {
            // Served only while the lease is sure to run on this node's
            // clock too: a node cut off from PostgreSQL stops answering
            // for its shards before another can have taken them.
            Some(Stage::Serving) if cluster.holds(shard) => {
                let _call = cluster.ownership.call(shard);
                // Still serving once counted: a drain that began meanwhile
                // waits for this call.
                if cluster.ownership.stage(shard) == Some(Stage::Serving) {
                    let request = request.take().expect("taken only to be answered");
                    return with_node(next.run(request).await, &me);
                }
            }
            // Taken over or handed over here: wait. (A tenure whose lease
            // ran out on this node's clock is as good as gone: below.)
            Some(_) if cluster.holds(shard) => {}
            // Forwarded here on a view that is out of date: the forwarding
            // node reads the owners again and sends it on.
            _ if forwarded => return misdirected(),
            _ if cluster.member().is_some() => {
                let view = cluster.member().map(|m| m.view()).unwrap_or_default();
                if let Some((node, url)) = view.owner_of(shard).filter(|(node, _)| *node != me) {
                    let (node, url) = (node.to_owned(), url.to_owned());
                    let pending = request.take().expect("taken only to be answered");
                    match forward(cluster, &url, pending).await {
                        Forwarded::Answer(response) => {
                            crate::telemetry::metrics::cluster_forwarded(true);
                            return response;
                        }
                        // Never sent: try again (the owner may have moved).
                        Forwarded::NotSent(back, error) => {
                            crate::telemetry::metrics::cluster_forwarded(false);
                            tracing::debug!(%node, %error, "cluster: forwarding failed; waiting for the shard's owner");
                            request = Some(back);
                        }
                    }
                }
            }
            _ => {}
        }
        if tokio::time::Instant::now() + WAIT_STEP > deadline {
            return ApiError::Session(SessionError::Unavailable).into_response();
        }
        tokio::time::sleep(WAIT_STEP).await;
        if let Some(member) = cluster.member() {
            if let Err(e) = member.refresh_view(VIEW_REFRESH).await {
                tracing::debug!(error = %e, "cluster: reading the shard owners failed");
            }
        }
    }
}

/// The answer to a forwarded call for a shard this node does not hold:
/// 421, which only nodes see (they forward the call on).
fn misdirected() -> Response {
    let mut response = StatusCode::MISDIRECTED_REQUEST.into_response();
    response.extensions_mut().insert(super::request_id::Relayed);
    response
}

/// A tenant's list or figures: this node's part (from the local handler)
/// and every other live node's (asked as forwarded calls, which answer
/// from their own sessions), merged. A list asks each node for the first
/// `offset + limit` sessions after the cursor and keeps the page of the
/// merge, whose cursor is the last session's (the cursor names a session's
/// creation time and id, so every node continues from the same place). A
/// node that does not answer fails the read (503): an incomplete list is
/// never passed off as complete.
async fn gather(cluster: &ClusterHttp, kind: Gathered, request: Request, next: Next) -> Response {
    let Some(member) = cluster.member() else {
        return ApiError::Session(SessionError::Unavailable).into_response();
    };
    let (mut parts, body) = request.into_parts();
    let (offset, limit) = match kind {
        Gathered::Metrics => (0, 0),
        Gathered::List | Gathered::AdminList => match page_of(&parts.uri) {
            Some(page) => page,
            // Bad paging: the handler answers it (400).
            None => return next.run(Request::from_parts(parts, body)).await,
        },
    };
    let want = offset.saturating_add(limit);
    if kind != Gathered::Metrics && want > MAX_GATHERED {
        return super::error::invalid(
            "offset",
            format!(
                "offset + limit must be at most {MAX_GATHERED} in a cluster: page with the cursor"
            ),
        )
        .into_response();
    }
    if kind != Gathered::Metrics && want > MAX_PAGE {
        // More than one page of each node: every node (this one too, as
        // a forwarded call) is read page by page.
        return gather_deep(cluster, member, kind, parts, offset, limit).await;
    }
    if kind != Gathered::Metrics {
        // Each node's part: the first offset + limit, without the offset.
        parts.uri = with_page(&parts.uri, want, None);
    }
    let others = cluster.other_nodes(member);
    let remote = futures::future::join_all(others.iter().map(|base| {
        let request = Request::from_parts(parts.clone(), Body::empty());
        async move { (base, forward(cluster, base, request).await) }
    }));
    let local = next.run(Request::from_parts(parts.clone(), body));
    let (local, remote) = tokio::join!(local, remote);
    let answers = match answers_of(local, remote, "its part of a list").await {
        Ok(answers) => answers,
        Err(response) => return response,
    };
    let merged = match kind {
        Gathered::List => merge_lists(answers, offset, limit, false),
        Gathered::AdminList => merge_lists(answers, offset, limit, true),
        Gathered::Metrics => merge_metrics(&answers),
    };
    axum::Json(merged).into_response()
}

/// The largest page a node answers.
const MAX_PAGE: usize = 1000;
/// The most sessions a list in a cluster gathers from each node (its
/// `offset + limit`).
const MAX_GATHERED: usize = 100_000;

/// A list whose `offset + limit` is more than one page: each node's first
/// `offset + limit` sessions, read page by page from every node, merged.
async fn gather_deep(
    cluster: &ClusterHttp,
    member: &Member,
    kind: Gathered,
    parts: axum::http::request::Parts,
    offset: usize,
    limit: usize,
) -> Response {
    let want = offset + limit;
    let bases: Vec<String> = member
        .view()
        .nodes
        .iter()
        .filter(|n| n.alive)
        .map(|n| n.advertise_url.clone())
        .collect();
    let first_cursor = form_urlencoded(parts.uri.query().unwrap_or_default())
        .into_iter()
        .find(|(k, _)| k == "cursor")
        .map(|(_, v)| v);
    let reads = bases.iter().map(|base| {
        let (parts, first_cursor) = (parts.clone(), first_cursor.clone());
        async move {
            let mut sessions = Vec::new();
            let mut cursor = first_cursor;
            loop {
                let mut page_parts = parts.clone();
                let size = (want - sessions.len()).min(MAX_PAGE);
                page_parts.uri = with_page(&parts.uri, size, cursor.as_deref());
                let answer = forward(
                    cluster,
                    base,
                    Request::from_parts(page_parts, Body::empty()),
                )
                .await;
                let Forwarded::Answer(response) = answer else {
                    return Err(ApiError::Session(SessionError::Unavailable).into_response());
                };
                if !response.status().is_success() {
                    return Err(response);
                }
                let Some(mut page) = json_of(response).await else {
                    return Err(ApiError::Session(SessionError::Unavailable).into_response());
                };
                if let serde_json::Value::Array(items) = page["sessions"].take() {
                    sessions.extend(items);
                }
                cursor = page["next_cursor"].as_str().map(str::to_owned);
                if cursor.is_none() || sessions.len() >= want {
                    return Ok(serde_json::json!({ "sessions": sessions, "next_cursor": cursor }));
                }
            }
        }
    });
    let mut answers = Vec::new();
    for answer in futures::future::join_all(reads).await {
        match answer {
            Ok(value) => answers.push(value),
            Err(response) => return response,
        }
    }
    axum::Json(merge_lists(
        answers,
        offset,
        limit,
        kind == Gathered::AdminList,
    ))
    .into_response()
}

/// The `offset` and `limit` of a list's query (defaults 0 and 50), or
/// `None` when either is not valid (the handler then answers 400).
fn page_of(uri: &Uri) -> Option<(usize, usize)> {
    let mut offset = 0;
    let mut limit = super::sessions::DEFAULT_LIST_LIMIT;
    for (key, value) in form_urlencoded(uri.query().unwrap_or_default()) {
        match key.as_str() {
            "offset" if !value.is_empty() => offset = value.parse().ok()?,
            "limit" if !value.is_empty() => {
                limit = value.parse().ok().filter(|l| (1..=1000).contains(l))?
            }
            _ => {}
        }
    }
    Some((offset, limit))
}

/// `uri` with `limit` set, `offset` dropped, and the cursor replaced when
/// `cursor` is given.
fn with_page(uri: &Uri, limit: usize, cursor: Option<&str>) -> Uri {
    let mut query: Vec<String> = form_urlencoded(uri.query().unwrap_or_default())
        .into_iter()
        .filter(|(k, _)| k != "offset" && k != "limit" && (cursor.is_none() || k != "cursor"))
        .map(|(k, v)| format!("{}={}", encode_component(&k), encode_component(&v)))
        .collect();
    query.push(format!("limit={limit}"));
    if let Some(cursor) = cursor {
        query.push(format!("cursor={}", encode_component(cursor)));
    }
    format!("{}?{}", uri.path(), query.join("&"))
        .parse()
        .unwrap_or_else(|_| uri.clone())
}

/// The pairs of a query string, decoded.
fn form_urlencoded(query: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default()
}

fn encode_component(text: &str) -> String {
    serde_urlencoded::to_string([("", text)])
        .map(|s| s.trim_start_matches('=').to_owned())
        .unwrap_or_default()
}

async fn json_of(response: Response) -> Option<serde_json::Value> {
    let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
        .await
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Merges the nodes' pages into one: newest first (by creation time, then
/// id, as each node orders them), one copy of a session that two nodes
/// listed during a hand-over (the higher version), `offset` skipped,
/// `limit` kept.
fn merge_lists(
    answers: Vec<serde_json::Value>,
    offset: usize,
    limit: usize,
    every_tenant: bool,
) -> serde_json::Value {
    let mut more = false;
    let mut all: Vec<serde_json::Value> = Vec::new();
    for mut answer in answers {
        more |= !answer["next_cursor"].is_null();
        if let serde_json::Value::Array(sessions) = answer["sessions"].take() {
            all.extend(sessions);
        }
    }
    // The order each node lists in: creation time, then (across tenants)
    // tenant id, then session id.
    let key = |s: &serde_json::Value| {
        (
            s["created_at"]
                .as_str()
                .and_then(crate::model::time::parse_rfc3339)
                .unwrap_or_default(),
            if every_tenant {
                s["tenant_id"].as_str().unwrap_or_default().to_owned()
            } else {
                String::new()
            },
            s["session_id"].as_str().unwrap_or_default().to_owned(),
        )
    };
    all.sort_by(|a, b| {
        key(b)
            .cmp(&key(a))
            .then_with(|| b["version"].as_u64().cmp(&a["version"].as_u64()))
    });
    all.dedup_by(|later, earlier| key(later) == key(earlier));
    let total = all.len();
    let page: Vec<serde_json::Value> = all.into_iter().skip(offset).take(limit).collect();
    let more = more || total > offset + limit;
    let next_cursor = match (more, page.last()) {
        (true, Some(last)) => {
            let (at, tenant, id) = key(last);
            Some(if every_tenant {
                crate::engine::operator::encode_cursor(at, &tenant, &id)
            } else {
                crate::engine::queries::encode_cursor(at, &id)
            })
        }
        _ => None,
    };
    serde_json::json!({ "sessions": page, "count": page.len(), "next_cursor": next_cursor })
}

/// An operator's call every node carries out on its own sessions: here,
/// and at every other live node (as forwarded calls, body and all); the
/// answer sums their counts. A node that does not answer fails the call
/// (503): what it holds was not done.
async fn broadcast(
    cluster: &ClusterHttp,
    summed: Summed,
    request: Request,
    next: Next,
) -> Response {
    let Some(member) = cluster.member() else {
        return ApiError::Session(SessionError::Unavailable).into_response();
    };
    let (parts, body) = request.into_parts();
    let bytes = match super::extract::read_body(Request::from_parts(parts.clone(), body)).await {
        Ok(bytes) => bytes,
        Err(e) => return e.into_response(),
    };
    let others = cluster.other_nodes(member);
    // Here first: a call this node refuses (401, 400) goes nowhere else.
    let local = next
        .run(Request::from_parts(
            parts.clone(),
            Body::from(bytes.clone()),
        ))
        .await;
    if !local.status().is_success() {
        return local;
    }
    let remote = futures::future::join_all(others.iter().map(|base| {
        let request = Request::from_parts(parts.clone(), Body::from(bytes.clone()));
        async move { (base, forward(cluster, base, request).await) }
    }))
    .await;
    let answers = match answers_of(local, remote, "its part of an operator's call").await {
        Ok(answers) => answers,
        Err(response) => return response,
    };
    let sum = |field: &str| sum_of(&answers, field);
    let merged = match summed {
        Summed::Terminated => serde_json::json!({ "terminated": sum("terminated") }),
        Summed::Expired => serde_json::json!({ "expired": sum("expired") }),
        Summed::Flushed => serde_json::json!({
            "flushed": true,
            "postgres": true,
            "outbox_depth": sum("outbox_depth"),
        }),
    };
    axum::Json(merged).into_response()
}

/// The JSON answers of this node (`local`, answered first) and of the
/// others (`remote`); a node that did not answer `what` with success fails
/// the whole (503), except this node's refusal, which is the answer.
async fn answers_of(
    local: Response,
    remote: Vec<(&String, Forwarded)>,
    what: &str,
) -> Result<Vec<serde_json::Value>, Response> {
    let unavailable = || ApiError::Session(SessionError::Unavailable).into_response();
    if !local.status().is_success() {
        return Err(local);
    }
    let mut answers = vec![json_of(local).await.ok_or_else(unavailable)?];
    for (base, answer) in remote {
        let response = match answer {
            Forwarded::Answer(response) if response.status().is_success() => response,
            Forwarded::Answer(response) => {
                tracing::warn!(node = %base, status = %response.status(), "cluster: a node did not answer {what}");
                return Err(unavailable());
            }
            Forwarded::NotSent(_, error) => {
                tracing::warn!(node = %base, %error, "cluster: a node did not answer {what}");
                return Err(unavailable());
            }
        };
        answers.push(json_of(response).await.ok_or_else(unavailable)?);
    }
    Ok(answers)
}

/// A count summed over the nodes' answers.
fn sum_of(answers: &[serde_json::Value], field: &str) -> u64 {
    answers.iter().map(|a| a[field].as_u64().unwrap_or(0)).sum()
}

/// Sums the nodes' figures (the mean duration weighted by sessions).
fn merge_metrics(answers: &[serde_json::Value]) -> serde_json::Value {
    let sum = |field: &str| sum_of(answers, field);
    let total = sum("total_sessions");
    let weighted: f64 = answers
        .iter()
        .map(|a| {
            a["avg_session_duration_minutes"].as_f64().unwrap_or(0.0)
                * a["total_sessions"].as_u64().unwrap_or(0) as f64
        })
        .sum();
    serde_json::json!({
        "active_sessions": sum("active_sessions"),
        "idle_sessions": sum("idle_sessions"),
        "total_sessions": total,
        "total_tool_executions": sum("total_tool_executions"),
        "total_tokens_used": sum("total_tokens_used"),
        "avg_session_duration_minutes": if total == 0 { 0.0 } else { weighted / total as f64 },
    })
}

/// A session's WebSocket: served here while this node serves its shard;
/// else opened at the owner and relayed frame by frame (the owner checks
/// the credentials and answers a refusal, which goes back as it is). When
/// the owner's socket ends, the client's ends with the same close; when the
/// owner goes away without one (it died), with 1012 (service restart): the
/// client reconnects, here or anywhere, and reaches the shard's new owner.
async fn socket(cluster: &Arc<ClusterHttp>, shard: u32, request: Request, next: Next) -> Response {
    let deadline = tokio::time::Instant::now() + cluster.hand_over_wait;
    let me = cluster.ownership.node_id().to_owned();
    loop {
        match cluster.ownership.stage(shard) {
            Some(Stage::Serving) if cluster.holds(shard) => {
                return with_node(next.run(request).await, &me);
            }
            // Taken over or handed over here: wait; a tenure whose lease
            // ran out on this node's clock is as good as gone.
            Some(_) if cluster.holds(shard) => {}
            _ => {
                let owner = cluster
                    .member()
                    .and_then(|m| {
                        m.view()
                            .owner_of(shard)
                            .map(|(node, url)| (node.to_owned(), url.to_owned()))
                    })
                    .filter(|(node, _)| *node != me);
                if let Some((node, url)) = owner {
                    // Built before the await: a request's body is not `Sync`.
                    let upstream = upstream_request(cluster, &url, &request);
                    match open_upstream(upstream).await {
                        Ok(Upstream::Open(upstream)) => {
                            return relay(cluster.clone(), shard, request, upstream, &node).await;
                        }
                        Ok(Upstream::Refused(response)) => return response,
                        Err(error) => {
                            tracing::debug!(%node, %error, "cluster: opening a WebSocket at the owner failed; waiting");
                        }
                    }
                }
            }
        }
        if tokio::time::Instant::now() + WAIT_STEP > deadline {
            return ApiError::Session(SessionError::Unavailable).into_response();
        }
        tokio::time::sleep(WAIT_STEP).await;
        if let Some(member) = cluster.member() {
            let _ = member.refresh_view(VIEW_REFRESH).await;
        }
    }
}

type UpstreamSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

enum Upstream {
    Open(UpstreamSocket),
    /// The owner answered the upgrade with this (401, 404, 429 …).
    Refused(Response),
}

/// Opens the session's WebSocket at the owner.
async fn open_upstream(
    upstream: Result<tokio_tungstenite::tungstenite::handshake::client::Request, String>,
) -> Result<Upstream, String> {
    let connect = tokio_tungstenite::connect_async(upstream?);
    match tokio::time::timeout(Duration::from_secs(10), connect).await {
        Ok(Ok((socket, _))) => Ok(Upstream::Open(socket)),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(response))) => {
            // 421: the view was out of date; anything else is the answer.
            if response.status() == StatusCode::MISDIRECTED_REQUEST {
                return Err("not the owner".into());
            }
            let (mut head, body) = response.into_parts();
            head.extensions.insert(super::request_id::Relayed);
            Ok(Upstream::Refused(Response::from_parts(
                head,
                Body::from(body.unwrap_or_default()),
            )))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("the owner did not answer the upgrade in time".into()),
    }
}

/// The upgrade request to the owner `base`, with the caller's headers
/// (credentials, request id) and the cluster secret.
fn upstream_request(
    cluster: &ClusterHttp,
    base: &str,
    request: &Request,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request, String> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
    let path = request.uri().path_and_query().map_or("/", |p| p.as_str());
    let url = format!(
        "{}{path}",
        base.trim_end_matches('/').replacen("http://", "ws://", 1)
    );
    let mut upstream = url.into_client_request().map_err(|e| e.to_string())?;
    for (name, value) in request.headers() {
        let websocket_own = name.as_str().starts_with("sec-websocket-");
        if !is_hop_by_hop(name) && !websocket_own && name != super::request_id::X_REQUEST_ID {
            upstream.headers_mut().insert(name.clone(), value.clone());
        }
    }
    if let Ok(secret) = HeaderValue::from_str(&cluster.secret) {
        upstream.headers_mut().insert(FORWARDED_HEADER, secret);
    }
    if let Some(id) = request.extensions().get::<super::request_id::RequestId>() {
        if let Ok(id) = HeaderValue::from_str(&id.0) {
            upstream
                .headers_mut()
                .insert(super::request_id::X_REQUEST_ID.clone(), id);
        }
    }
    if let Some(ConnectInfo(peer)) = request.extensions().get::<ConnectInfo<SocketAddr>>() {
        if let Ok(peer) = HeaderValue::from_str(&peer.to_string()) {
            upstream.headers_mut().insert(PEER_HEADER, peer);
        }
    }
    Ok(upstream)
}

/// Accepts the client's upgrade and relays frames both ways until either
/// side ends.
async fn relay(
    cluster: Arc<ClusterHttp>,
    shard: u32,
    request: Request,
    upstream: UpstreamSocket,
    owner: &str,
) -> Response {
    use axum::extract::FromRequestParts as _;
    let (mut parts, _) = request.into_parts();
    let upgrade =
        match axum::extract::ws::WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
            Ok(upgrade) => upgrade,
            Err(rejection) => return rejection.into_response(),
        };
    let response_of_upgrade = upgrade.max_message_size(super::extract::MAX_BODY_BYTES);
    let node = owner.to_owned();
    let response =
        response_of_upgrade.on_upgrade(move |client| pump(client, upstream, cluster, shard, node));
    with_node(response, owner)
}

/// How often a relay checks that its session's shard is still the
/// owner's it opened the socket at.
const RELAY_CHECK: Duration = Duration::from_secs(1);
/// Longest a frame waits to be taken by the owner.
const RELAY_SEND: Duration = Duration::from_secs(5);

async fn pump(
    client: axum::extract::ws::WebSocket,
    upstream: UpstreamSocket,
    cluster: Arc<ClusterHttp>,
    shard: u32,
    owner: String,
) {
    use axum::extract::ws::{CloseFrame, Message};
    use futures::{SinkExt as _, StreamExt as _};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame as UpCloseFrame;
    use tokio_tungstenite::tungstenite::Message as Up;
    let (mut to_client, mut from_client) = client.split();
    let (mut to_owner, mut from_owner) = upstream.split();
    let mut check = tokio::time::interval(RELAY_CHECK);
    loop {
        tokio::select! {
            // The shard moved (its owner handed it over, died, or froze
            // past its lease): the client reconnects to the new owner.
            _ = check.tick() => {
                let view = cluster.member().map(|m| m.view()).unwrap_or_default();
                if view.owner_of(shard).map(|(node, _)| node) != Some(owner.as_str()) {
                    break;
                }
            }
            frame = from_client.next() => {
                let frame = match frame {
                    Some(Ok(Message::Text(t))) => Up::Text(t.as_str().into()),
                    Some(Ok(Message::Binary(b))) => Up::Binary(b),
                    Some(Ok(Message::Ping(p))) => Up::Ping(p),
                    Some(Ok(Message::Pong(p))) => Up::Pong(p),
                    Some(Ok(Message::Close(close))) => {
                        let close = close.map(|c| UpCloseFrame {
                            code: CloseCode::from(c.code),
                            reason: c.reason.as_str().into(),
                        });
                        let _ = to_owner.send(Up::Close(close)).await;
                        let _ = to_owner.close().await;
                        return;
                    }
                    None | Some(Err(_)) => {
                        let _ = to_owner.close().await;
                        return;
                    }
                };
                if !matches!(tokio::time::timeout(RELAY_SEND, to_owner.send(frame)).await, Ok(Ok(()))) {
                    break;
                }
            }
            frame = from_owner.next() => {
                let frame = match frame {
                    Some(Ok(Up::Text(t))) => Message::Text(t.as_str().into()),
                    Some(Ok(Up::Binary(b))) => Message::Binary(b),
                    Some(Ok(Up::Ping(p))) => Message::Ping(p),
                    Some(Ok(Up::Pong(p))) => Message::Pong(p),
                    Some(Ok(Up::Close(close))) => {
                        let close = close.map(|c| CloseFrame {
                            code: u16::from(c.code),
                            reason: c.reason.as_str().into(),
                        });
                        let _ = to_client.send(Message::Close(close)).await;
                        let _ = to_client.close().await;
                        return;
                    }
                    Some(Ok(Up::Frame(_))) => continue,
                    None | Some(Err(_)) => break,
                };
                if to_client.send(frame).await.is_err() {
                    let _ = to_owner.close().await;
                    return;
                }
            }
        }
    }
    // The owner went away without a close, or the shard moved: the
    // client reconnects.
    let _ = to_client
        .send(Message::Close(Some(CloseFrame {
            code: 1012,
            reason: "the session's node went away, reconnect".into(),
        })))
        .await;
    let _ = to_client.close().await;
}

/// What a forward came back with.
enum Forwarded {
    /// The owner's answer (or an error answer once the call was sent).
    Answer(Response),
    /// The call never left: the request back, and why.
    NotSent(Request, String),
}

async fn forward(cluster: &ClusterHttp, base: &str, request: Request) -> Forwarded {
    let (parts, body) = request.into_parts();
    // The body is read first, so a call that cannot be sent can be tried
    // again, elsewhere (bodies are small: see `MAX_BODY_BYTES`).
    let bytes = match super::extract::read_body(Request::from_parts(parts.clone(), body)).await {
        Ok(bytes) => bytes,
        Err(e) => return Forwarded::Answer(e.into_response()),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let uri: Uri = match format!("{}{path}", base.trim_end_matches('/')).parse() {
        Ok(uri) => uri,
        Err(e) => {
            return Forwarded::NotSent(
                Request::from_parts(parts, Body::from(bytes)),
                format!("advertise_url {base}: {e}"),
            )
        }
    };
    let mut outgoing = axum::http::Request::builder()
        .method(parts.method.clone())
        .uri(uri);
    for (name, value) in &parts.headers {
        if !is_hop_by_hop(name)
            && name != super::request_id::X_REQUEST_ID
            && name != super::request_id::X_TRACE_ID
        {
            outgoing = outgoing.header(name, value);
        }
    }
    if let Ok(secret) = HeaderValue::from_str(&cluster.secret) {
        outgoing = outgoing.header(&FORWARDED_HEADER, secret);
    }
    if let Some(ConnectInfo(peer)) = parts.extensions.get::<ConnectInfo<SocketAddr>>() {
        if let Ok(peer) = HeaderValue::from_str(&peer.to_string()) {
            outgoing = outgoing.header(&PEER_HEADER, peer);
        }
    }
    // The id this call is logged under here (the caller's, when it was a
    // valid one), so both nodes log and answer one id.
    if let Some(id) = parts.extensions.get::<super::request_id::RequestId>() {
        if let Ok(id) = HeaderValue::from_str(&id.0) {
            outgoing = outgoing.header(&super::request_id::X_REQUEST_ID, id);
        }
    }
    let outgoing = match outgoing.body(Body::from(bytes.clone())) {
        Ok(outgoing) => outgoing,
        Err(e) => {
            return Forwarded::Answer(
                ApiError::Session(SessionError::Storage(e.to_string())).into_response(),
            )
        }
    };
    match tokio::time::timeout(cluster.forward_limit, cluster.client.request(outgoing)).await {
        // The node was not the owner (any more): it did nothing; ask again.
        Ok(Ok(response)) if response.status() == StatusCode::MISDIRECTED_REQUEST => {
            Forwarded::NotSent(
                Request::from_parts(parts, Body::from(bytes)),
                format!("{base} does not own the shard"),
            )
        }
        Ok(Ok(response)) => {
            let (mut head, body) = response.into_parts();
            for name in HOP_BY_HOP {
                head.headers.remove(*name);
            }
            head.extensions.insert(super::request_id::Relayed);
            Forwarded::Answer(Response::from_parts(head, Body::new(body)))
        }
        Ok(Err(e)) if e.is_connect() => {
            Forwarded::NotSent(Request::from_parts(parts, Body::from(bytes)), e.to_string())
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cluster: a forwarded call failed after it was sent");
            Forwarded::Answer(ApiError::Session(SessionError::Unavailable).into_response())
        }
        Err(_) => {
            tracing::warn!("cluster: a forwarded call took too long");
            Forwarded::Answer(ApiError::Session(SessionError::Unavailable).into_response())
        }
    }
}

/// Headers of one connection, never passed on.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "host",
    "content-length",
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(&name.as_str())
}

/// A JSON body's fields.
type JsonObject = serde_json::Map<String, serde_json::Value>;

/// What a create's or an execution's body names as its session.
enum Named {
    /// A valid session id.
    Valid(String),
    /// No `session_id`: the body's fields, or `None` when it is not a
    /// JSON object (the handler answers that).
    Absent(Option<JsonObject>),
    /// A `session_id` that is not a valid id.
    Invalid,
}

/// Reads a create's or an execution's body for its `session_id`; gives
/// back the request with its body.
async fn body_session_id(request: Request) -> Result<(Named, Request), ApiError> {
    let (parts, body) = request.into_parts();
    let bytes = super::extract::read_body(Request::from_parts(parts.clone(), body)).await?;
    let named = match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Object(fields)) => match fields.get("session_id") {
            None | Some(serde_json::Value::Null) => Named::Absent(Some(fields)),
            Some(serde_json::Value::String(id)) if crate::model::ids::is_valid_session_id(id) => {
                Named::Valid(id.clone())
            }
            Some(_) => Named::Invalid,
        },
        _ => Named::Absent(None),
    };
    Ok((named, Request::from_parts(parts, Body::from(bytes))))
}

/// Adds `X-Edge-Sessions-Node` to an answer served here.
fn with_node(mut response: Response, node: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(node) {
        response.headers_mut().insert(NODE_HEADER, value);
    }
    response
}

/// `GET /admin/cluster`.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ClusterView {
    /// The node answering.
    pub node_id: String,
    /// Every node that joined (a node that left or died stays listed as
    /// `gone`).
    pub nodes: Vec<ClusterNode>,
    /// Shard counts.
    pub shards: ClusterShards,
}

/// A node of [`ClusterView`].
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ClusterNode {
    /// Its `cluster.node_id`.
    pub node_id: String,
    /// How the nodes reach it.
    pub advertise_url: String,
    /// `alive` (a heartbeat within a lease) or `gone`.
    pub status: &'static str,
    /// Shards it owns now.
    pub shards: usize,
    /// Its last heartbeat, RFC 3339.
    pub last_heartbeat_at: String,
}

/// Shard counts of [`ClusterView`].
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ClusterShards {
    /// The cluster's shard count.
    pub total: u32,
    /// Shards this node serves.
    pub owned_here: usize,
}

/// The routes of this module: only a cluster node has them.
pub fn router() -> axum::Router<AppState> {
    axum::Router::new().route("/admin/cluster", axum::routing::get(cluster_view))
}

/// The nodes of the cluster and the shards each owns, as PostgreSQL says
/// now.
#[utoipa::path(
    get,
    path = "/admin/cluster",
    tag = "admin",
    responses(
        (status = 200, description = "The cluster's nodes and shards (cluster nodes only; 404 elsewhere)", body = ClusterView),
        (status = 401, description = "unauthorized", body = super::openapi::ErrorResponse),
        (status = 503, description = "service_unavailable: PostgreSQL did not answer", body = super::openapi::ErrorResponse)
    ),
    security(("admin_key" = []))
)]
pub(crate) async fn cluster_view(
    _: super::extract::Admin,
    State(state): State<AppState>,
) -> Result<axum::Json<ClusterView>, ApiError> {
    let cluster = state.cluster.as_ref().ok_or(ApiError::RouteNotFound)?;
    let member = cluster
        .member()
        .ok_or(ApiError::Session(SessionError::Unavailable))?;
    member.refresh_view(Duration::ZERO).await.map_err(|e| {
        tracing::warn!(error = %e, "cluster: reading the nodes failed");
        ApiError::Session(SessionError::Unavailable)
    })?;
    let view = member.view();
    Ok(axum::Json(ClusterView {
        node_id: cluster.ownership.node_id().to_owned(),
        nodes: view
            .nodes
            .iter()
            .map(|n| ClusterNode {
                node_id: n.node_id.clone(),
                advertise_url: n.advertise_url.clone(),
                status: if n.alive { "alive" } else { "gone" },
                shards: view.shards_of(&n.node_id),
                last_heartbeat_at: crate::model::time::format_rfc3339(n.heartbeat_at_ms),
            })
            .collect(),
        shards: ClusterShards {
            total: cluster.ownership.shards(),
            owned_here: cluster.ownership.serving(),
        },
    }))
}
