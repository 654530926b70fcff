//! The running service: wires settings, keys, the engine and the HTTP
//! server together, and shuts them down in order.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::auth::bootstrap::{apply_dev_credentials, needs_dev_credentials};
use crate::auth::{master_key, Keyring};
use crate::cluster::{Member, MemberConfig, Ownership, Quota, RegistryError};
use crate::crypto::Vault;
use crate::engine::{Engine, EngineConfig, PostgresTier};
use crate::http::cluster::ClusterHttp;
use crate::http::limits::{forget_idle_forever, RateLimits};
use crate::http::serve::ConnectionTimeouts;
use crate::http::{self, AppState, Handles};
use crate::model::time::Clock;
use crate::persist::postgres::{Postgres, PostgresConfig};
use crate::persist::shipper::ShipperConfig;
use crate::settings::RateLimitSettings;
use crate::settings::Settings;

/// Runs the service on `listener` until `shutdown` resolves: recovery in
/// the background (`/readyz` answers 503 until it is done), the sweep, the
/// HTTP server; then drains requests, flushes every pending write and stops.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with_clock(settings, listener, shutdown, Clock::system()).await
}

/// [`run`] with a given clock (tests move it to jump past deadlines).
pub async fn run_with_clock(
    mut settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    clock: Clock,
) -> anyhow::Result<()> {
    let dev_mode = needs_dev_credentials(&settings);
    let keyring = master_key::load(&settings, dev_mode)?;
    tracing::info!(
        key_id = format!("{:08x}", keyring.current().id()),
        keys = keyring.len(),
        "master keyring loaded"
    );
    if dev_mode {
        let (credentials, path) = apply_dev_credentials(&mut settings)?;
        print_dev_banner(
            &credentials.api_key,
            &credentials.admin_key,
            &path,
            listener.local_addr()?,
        );
    }
    // What the listeners need is checked before the store is opened: a bad
    // certificate or a taken admin port stops the start with nothing done.
    let listeners =
        Listeners {
            public: listener,
            operator: match settings.server.admin_listen {
                Some(addr) => Some(TcpListener::bind(addr).await.map_err(|e| {
                    anyhow::anyhow!("server.admin_listen: cannot bind {addr}: {e}")
                })?),
                None => None,
            },
            tls: match (
                &settings.server.tls_cert_file,
                &settings.server.tls_key_file,
            ) {
                (Some(cert), Some(key)) => Some(http::tls::acceptor(cert, key)?),
                _ => None,
            },
            timeouts: ConnectionTimeouts {
                header_read: Duration::from_millis(settings.server.header_read_timeout_ms),
                body_read: Duration::from_millis(settings.server.body_read_timeout_ms),
                idle: Duration::from_millis(settings.server.idle_timeout_ms),
            },
        };
    let (keys, tenants) = Keyring::from_settings(&settings);
    let node = match settings.cluster.enabled {
        true => Some(ClusterNode::prepare(
            &mut settings,
            &listeners.public,
            tenants.iter().map(|t| t.id),
        )?),
        false => None,
    };
    let postgres = postgres_tier(&settings)?;
    let config = EngineConfig {
        clock,
        postgres: postgres.clone(),
        vault: Arc::new(Vault::new(keyring)),
        cluster: node.as_ref().map(|n| n.ownership.clone()),
        cluster_quota: node.as_ref().map(|n| n.quota.clone()),
        ..EngineConfig::from_settings(&settings, tenants)
    };
    let engine = Engine::start(config).with_context(|| {
        format!(
            "opening the store in {}",
            settings.storage.data_dir.display()
        )
    })?;
    // A cluster node joins in the background (PostgreSQL may not answer
    // yet; `/readyz` says 503 meanwhile) and, on SIGTERM, hands its shards
    // over before the HTTP server stops: calls keep being answered or
    // forwarded while the others take the shards.
    let refused = Arc::new(std::sync::Mutex::new(None::<String>));
    let refused_join = refused.clone();
    let (cluster_http, shutdown) = match (node, postgres) {
        (Some(node), Some(tier)) => {
            let http = Arc::new(ClusterHttp::new(
                node.ownership.clone(),
                node.secret.clone(),
                node.config.lease * 2,
                tier.commit_timeout,
            ));
            let linger = node.config.lease / 2;
            // The rounds have a pool of their own: taking a dead node's
            // shards over reads PostgreSQL hard, and must not delay a
            // renewal.
            let membership = Postgres::new(&PostgresConfig {
                max_connections: 2,
                ..postgres_config(&settings)
            })
            .context("postgres.url")?;
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let mut runner =
                tokio::spawn(node.run(engine.clone(), tier, membership, http.clone(), stopped));
            let shutdown: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> =
                Box::pin(async move {
                    tokio::pin!(shutdown);
                    // The runner ends before a stop only on a fatal refusal
                    // (another shard count), or having failed to start.
                    let ended = tokio::select! {
                        () = &mut shutdown => None,
                        ended = &mut runner => Some(ended),
                    };
                    match ended {
                        Some(Ok(Err(why))) => {
                            tracing::error!(error = %why, "cannot join the cluster; stopping");
                            *refused_join.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
                            return;
                        }
                        Some(_) => return shutdown.await,
                        None => {}
                    }
                    tracing::info!("leaving the cluster: handing the shards over");
                    let _ = stop.send(true);
                    let _ = runner.await;
                    // The other nodes still forward here until they read
                    // the owners again (every round, a quarter lease): the
                    // server stays up that long, answering 421 so they
                    // send on, and closes its connections only once none
                    // can carry a call (one closed under a call in flight
                    // could not be told from a node that died).
                    tokio::time::sleep(linger).await;
                });
            (Some(http), shutdown)
        }
        _ => (
            None,
            Box::pin(shutdown) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
        ),
    };
    let result = serve_engine(
        engine.clone(),
        keys,
        settings.rate_limits.clone(),
        settings.websocket.max_connections_per_session,
        listeners,
        cluster_http,
        shutdown,
    )
    .await;
    tracing::info!("shutting down: flushing pending writes");
    engine.shutdown().await;
    tracing::info!("stopped");
    if let Some(why) = refused.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(crate::settings::ConfigError::new(why).into());
    }
    result
}

/// Where and how HTTP is served.
struct Listeners {
    /// `server.listen`.
    public: TcpListener,
    /// `server.admin_listen`, when set.
    operator: Option<TcpListener>,
    /// TLS on both, when configured.
    tls: Option<tokio_rustls::TlsAcceptor>,
    timeouts: ConnectionTimeouts,
}

async fn serve_engine(
    engine: Engine,
    keys: Keyring,
    rate_limits: RateLimitSettings,
    max_sockets_per_session: usize,
    listeners: Listeners,
    cluster: Option<Arc<ClusterHttp>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let addr = listeners.public.local_addr()?;
    let admin_addr = match &listeners.operator {
        Some(operator) => Some(operator.local_addr()?),
        None => None,
    };
    // Installs the process-wide recorder before the first request.
    crate::telemetry::metrics::handle();
    let limits = Arc::new(RateLimits::new(&rate_limits));
    let state = AppState::new(Handles {
        engine: engine.clone(),
        keys: Arc::new(keys),
        limits: limits.clone(),
        tickets: Arc::default(),
        max_sockets_per_session,
        history: Arc::default(),
        cluster,
    });
    let sampler = tokio::spawn(http::history::sample_forever(state.clone()));
    let rotator = tokio::spawn(engine.clone().rotate_stats_forever());
    let upkeep = tokio::spawn(crate::telemetry::metrics::upkeep_forever());
    let forgetter = tokio::spawn(forget_idle_forever(limits));
    // A failed recovery stops the server: serving 503 forever would hide it.
    let (recovery_failed, failed) = tokio::sync::oneshot::channel::<()>();
    let recovery = {
        let engine = engine.clone();
        tokio::spawn(async move {
            let result = engine.recover().await;
            if result.is_err() {
                let _ = recovery_failed.send(());
            }
            result
        })
    };
    let sweeper = tokio::spawn(engine.clone().sweep_forever());
    tracing::info!(
        %addr,
        admin_addr = admin_addr.map(|a| a.to_string()),
        tls = listeners.tls.is_some(),
        "listening"
    );
    // One stop for both listeners.
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let on_signal = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown => {}
            Ok(()) = failed => {}
        }
        let _ = on_signal.send(true);
    });
    let stop_when = |mut stopping: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopping.wait_for(|stop| *stop).await;
    };
    let arbiters = engine.arbiters();
    let Listeners {
        public,
        operator,
        tls,
        timeouts,
    } = listeners;
    let served = match operator {
        None => {
            let app = http::app(state);
            http::serve(public, app, timeouts, tls, stop_when(stopping), &arbiters).await
        }
        Some(operator) => {
            let public_app = http::app_for(state.clone(), http::Surface::Public);
            let operator_app = http::app_for(state, http::Surface::Operator);
            // A listener that fails stops the other: the process never runs
            // on half of its surfaces.
            let stop_on_error = |served: std::io::Result<()>| {
                if served.is_err() {
                    let _ = stop.send(true);
                }
                served
            };
            let public = http::serve(
                public,
                public_app,
                timeouts,
                tls.clone(),
                stop_when(stopping.clone()),
                &arbiters,
            );
            let operator = http::serve(
                operator,
                operator_app,
                timeouts,
                tls,
                stop_when(stopping),
                &arbiters,
            );
            let (public, operator) = tokio::join!(async { stop_on_error(public.await) }, async {
                stop_on_error(operator.await)
            },);
            public.and(operator)
        }
    };
    sweeper.abort();
    let _ = sweeper.await;
    forgetter.abort();
    rotator.abort();
    upkeep.abort();
    sampler.abort();
    // Recovery may still wait for PostgreSQL (an empty data dir): a
    // shutdown does not wait for it.
    if !recovery.is_finished() {
        recovery.abort();
    }
    let recovered = match recovery.await {
        Err(e) if e.is_cancelled() => Ok(()),
        joined => joined.context("recovery task")?.map(drop),
    };
    served.context("serving HTTP")?;
    recovered.context("recovering sessions from the store")?;
    Ok(())
}

/// What a cluster node is started with (`[cluster] enabled = true`).
struct ClusterNode {
    config: MemberConfig,
    ownership: Arc<Ownership>,
    quota: Arc<Quota>,
    secret: String,
}

/// How a cluster node's store is kept: a cache under the data dir,
/// emptied at every start (PostgreSQL holds everything acknowledged).
const CLUSTER_CACHE_DIR: &str = "cluster-cache";

impl ClusterNode {
    /// Resolves the node's id, address and secret, and points the store at
    /// an emptied cache in the data dir.
    fn prepare(
        settings: &mut Settings,
        listener: &TcpListener,
        tenants: impl IntoIterator<Item = uuid::Uuid>,
    ) -> anyhow::Result<Self> {
        let c = &settings.cluster;
        let local = listener.local_addr()?;
        let secret = c.secret()?;
        let node_id = c.node_id_or(local.port());
        let advertise_url = match c.advertise_url.trim() {
            "" => format!("http://{local}"),
            url => url.trim_end_matches('/').to_owned(),
        };
        let cache = settings.storage.data_dir.join(CLUSTER_CACHE_DIR);
        // The cache is emptied only by the node that holds the data dir:
        // a second process on the same dir stops here, before it deletes
        // anything of the first's.
        lock_data_dir(&settings.storage.data_dir)?;
        if cache.exists() {
            std::fs::remove_dir_all(&cache)
                .with_context(|| format!("emptying the cluster cache {}", cache.display()))?;
        }
        settings.storage.data_dir = cache;
        tracing::info!(
            node_id,
            advertise_url,
            shards = c.shards,
            lease_seconds = c.lease_seconds,
            "cluster node"
        );
        let lease = Duration::from_secs(c.lease_seconds);
        Ok(ClusterNode {
            ownership: Arc::new(Ownership::new(node_id.clone(), c.shards)),
            quota: Arc::new(Quota::new(node_id.clone(), lease, tenants)),
            config: MemberConfig {
                node_id,
                advertise_url,
                shards: c.shards,
                lease,
            },
            secret,
        })
    }

    /// Joins (retrying until PostgreSQL answers), runs the first round,
    /// says the node joined, then runs rounds until `stop`, and leaves.
    /// Fails only when the cluster refuses this node (another shard
    /// count).
    async fn run(
        self,
        engine: Engine,
        tier: PostgresTier,
        membership: Postgres,
        http: Arc<ClusterHttp>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), String> {
        let owner = match crate::engine::EngineShards::new(
            engine,
            tier.postgres.clone(),
            self.config.lease,
        ) {
            Ok(owner) => Arc::new(owner),
            Err(e) => {
                tracing::error!(error = %e, "cluster: cannot run the engine's shards");
                return Ok(());
            }
        };
        let mut delay = Duration::from_millis(200);
        let member = loop {
            let joined = async {
                if tier.shipper.migrate_on_start {
                    tier.postgres
                        .migrate_up()
                        .await
                        .map_err(|e| Ok(e.to_string()))?;
                }
                let member = Member::join(
                    membership.pool().clone(),
                    self.config.clone(),
                    owner.clone(),
                )
                .await
                .map_err(|e| match e {
                    RegistryError::ShardCount { .. } => Err(format!("cluster.shards: {e}")),
                    e => Ok(e.to_string()),
                })?;
                member.round().await.map_err(|e| Ok(e.to_string()))?;
                Ok::<_, Result<String, String>>(member)
            };
            let attempt = tokio::select! {
                attempt = joined => attempt,
                _ = stop.wait_for(|stop| *stop) => return Ok(()),
            };
            match attempt {
                Ok(member) => break Arc::new(member),
                Err(Err(fatal)) => return Err(fatal),
                Err(Ok(e)) => {
                    tracing::error!(error = %e, retry_in_ms = delay.as_millis() as u64, "cluster: cannot join yet");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        _ = stop.wait_for(|stop| *stop) => return Ok(()),
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        tracing::info!(node_id = %self.config.node_id, "joined the cluster");
        http.mark_joined(member.clone());
        // Reservations a node does not use go back to the others.
        let giving_back = {
            let (quota, pool, every) = (
                self.quota.clone(),
                tier.postgres.pool().clone(),
                self.config.lease / 2,
            );
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = quota.give_back_idle(&pool).await {
                        tracing::debug!(error = %e, "cluster: giving back unused quota failed");
                    }
                }
            })
        };
        member.run(stop).await;
        giving_back.abort();
        if let Err(e) = self.quota.give_back_all(tier.postgres.pool()).await {
            tracing::warn!(error = %e, "cluster: giving back the quota reservations failed");
        }
        tracing::info!(node_id = %self.config.node_id, "left the cluster");
        Ok(())
    }
}

/// Takes `data_dir/cluster.lock` (an advisory `flock`) for the life of
/// the process; fails when another process holds it.
fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let path = data_dir.join("cluster.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "storage.data_dir: {} is in use by another edge-sessions process",
            data_dir.display()
        );
    }
    // Held until the process exits (the kernel drops the lock then).
    std::mem::forget(file);
    Ok(())
}

/// The PostgreSQL tier from `[postgres]`, when `url` is set.
pub fn postgres_tier(settings: &Settings) -> anyhow::Result<Option<PostgresTier>> {
    let p = &settings.postgres;
    if !p.enabled() {
        return Ok(None);
    }
    let postgres = Postgres::new(&postgres_config(settings)).context("postgres.url")?;
    tracing::info!(
        durability = ?settings.storage.durability,
        "PostgreSQL tier on: changes are shipped through the sled outbox"
    );
    Ok(Some(PostgresTier {
        postgres,
        shipper: ShipperConfig {
            batch_size: p.batch_size,
            lanes: p.ship_connections,
            migrate_on_start: p.migrate_on_start,
            drain_on_shutdown: Duration::from_millis(p.drain_on_shutdown_ms),
        },
        commit_timeout: Duration::from_millis(p.commit_timeout_ms),
        rebuild_wait: Duration::from_secs(p.rebuild_wait_seconds),
    }))
}

/// The connection settings of `[postgres]`.
pub fn postgres_config(settings: &Settings) -> PostgresConfig {
    let p = &settings.postgres;
    PostgresConfig {
        url: p.url.trim().to_owned(),
        max_connections: p.max_connections,
        statement_timeout: Duration::from_millis(p.statement_timeout_ms),
        connect_timeout: Duration::from_millis(p.connect_timeout_ms),
        cluster_shards: settings.cluster.enabled.then_some(settings.cluster.shards),
    }
}

fn print_dev_banner(api_key: &str, admin_key: &str, path: &std::path::Path, addr: SocketAddr) {
    use std::io::Write as _;
    // Written whole and best effort: a closed stdout must not stop the server.
    let banner = format!(
        "\nNo tenants configured: using the development tenant kept in {}\n  \
         tenant API key (X-API-Key):  {api_key}\n  \
         admin key     (X-Admin-Key): {admin_key}\n  \
         try: curl -s -X POST http://{addr}/api/v1/sessions -H 'X-API-Key: {api_key}' \
         -H 'Content-Type: application/json' -d '{{\"edge_mcp_id\":\"demo\"}}'\n",
        path.display()
    );
    let _ = std::io::stdout().lock().write_all(banner.as_bytes());
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("SIGINT received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}
