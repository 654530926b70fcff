//! The HTTP surface (axum): REST API, admin and health routes.
//!
//! Each module exports `router()`; [`app`] merges them and adds the
//! per-request middleware, so tests serve exactly what the binary serves.

pub mod access;
pub mod admin;
pub mod cluster;
pub mod error;
pub mod export;
pub mod extract;
pub mod health;
pub mod history;
pub mod limits;
pub mod metrics;
pub mod openapi;
pub mod request_id;
pub mod serve;
pub mod sessions;
pub mod stats;
pub mod tls;
pub mod tools;
pub mod ws;

use std::sync::Arc;

use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;

use crate::auth::Keyring;
use crate::engine::Engine;

/// What every handler can reach, behind one `Arc`: extractors and
/// middleware clone the state per request, and one reference count is
/// cheaper than one per handle.
#[derive(Clone)]
pub struct AppState(Arc<Handles>);

/// The handles inside [`AppState`].
pub struct Handles {
    /// The session engine.
    pub engine: Engine,
    /// Configured keys.
    pub keys: Arc<Keyring>,
    /// Token buckets per key and endpoint class.
    pub limits: Arc<limits::RateLimits>,
    /// Single-use tickets for the stats WebSocket.
    pub tickets: Arc<stats::Tickets>,
    /// Open WebSockets one session may have.
    pub max_sockets_per_session: usize,
    /// The dashboard's last 15 minutes.
    pub history: Arc<history::History>,
    /// On a cluster node: routing to shard owners, the cluster's view.
    pub cluster: Option<Arc<cluster::ClusterHttp>>,
}

impl AppState {
    /// Wraps the handles.
    pub fn new(handles: Handles) -> Self {
        AppState(Arc::new(handles))
    }
}

impl std::ops::Deref for AppState {
    type Target = Handles;

    fn deref(&self) -> &Handles {
        &self.0
    }
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Surface {
    /// Everything (one listener).
    All,
    /// The tenants' API, the WebSocket and the OpenAPI document: with
    /// `server.admin_listen` set, `/admin/…` and `/metrics` answer 404 here.
    Public,
    /// `/admin/…` and `/metrics`, on `server.admin_listen`.
    Operator,
}

/// The whole application.
pub fn app(state: AppState) -> Router {
    app_for(state, Surface::All)
}

/// The routes of `surface` (the health probes are on every surface, for
/// load balancers and orchestrators alike), with the middleware every
/// surface shares.
pub fn app_for(state: AppState, surface: Surface) -> Router {
    let mut router = Router::new().merge(health::router());
    if surface != Surface::Operator {
        router = router
            .merge(sessions::router())
            .merge(tools::router())
            .merge(ws::router())
            .merge(openapi::router());
    }
    if surface == Surface::Public && state.cluster.is_some() {
        // The other nodes reach this one at its advertised (public)
        // address: operators' calls they forward are served here too, and
        // only those.
        let forwarded_only =
            axum::middleware::from_fn_with_state(state.clone(), cluster::forwarded_only);
        router = router
            .merge(admin::router().route_layer(forwarded_only.clone()))
            .merge(cluster::router().route_layer(forwarded_only));
    }
    if surface != Surface::Public {
        router = router
            .merge(admin::router())
            .merge(export::router())
            .merge(stats::router())
            .merge(metrics::router());
        if state.cluster.is_some() {
            router = router.merge(cluster::router());
        }
    }
    router
        .fallback(|| async { error::ApiError::RouteNotFound })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            limits::limit_rate,
        ))
        // Outside the rate limits: a call forwarded to its owner is
        // charged there, once.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cluster::route,
        ))
        // Outermost last: `track` wraps the panic catcher, so a panic still
        // gets the request id, the error body and an access log line.
        .layer(CatchPanicLayer::custom(request_id::panic_response))
        .layer(axum::middleware::from_fn(request_id::track))
        .with_state(state)
}

pub use serve::serve;
