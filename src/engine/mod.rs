//! The session engine: actors in memory, durable through write-behind.
//!
//! # Placement
//!
//! There is one actix arbiter per core ([`shards`]). Each tenant's
//! supervisor lives on the arbiter its tenant id hashes to; by default each
//! session's actor lives on the arbiter its *session id* hashes to
//! (`engine.placement = "session"`). Spreading sessions by id rather than
//! keeping them on their tenant's arbiter (`"tenant"`) lets one busy tenant
//! use every core (a single edge platform is often one big tenant), while the
//! supervisor is only on the path of creates and releases. The price is that
//! a create crosses threads twice (handler -> supervisor -> session arbiter)
//! where tenant placement crosses once; creates are rarer than the calls on a
//! session, which always take exactly one hop.
//!
//! Measured (`benches/engine.rs`, one tenant, 2 cores, 256 in flight):
//! `session` placement 126 k creates/s and 470 k gets/s, `tenant` placement
//! 142 k and 579 k. On two cores the tenant's own arbiter wins because the
//! callers occupy the other core anyway; the default stays `session` because
//! `tenant` caps a tenant at one core whatever the machine has (see
//! `docs/benchmarks.md`).
//!
//! # The hop
//!
//! An HTTP handler runs on the tokio runtime, looks the session up in its
//! tenant's `DashMap` directory (no lock held across the await) and sends one
//! actix message. An actix send to a sleeping thread costs ~20 µs of wake-up;
//! under load the arbiters are busy and messages queue without wake-ups, so
//! throughput comes from many requests in flight, not from a faster hop.
//! `benches/engine.rs` measures both (sequential and concurrent).

pub mod admission;
pub mod queries;
pub mod recovery;
pub mod session;
pub mod shards;
pub mod stats;
pub mod sweep;
pub mod tenant;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use dashmap::DashMap;
use futures::future::join_all;
use uuid::Uuid;

pub use admission::{NewSession, SessionDefaults, TenantLimits};
pub use queries::{ListQuery, Page, TenantMetrics};
use session::{Ack, SessionActor};
use shards::Shards;
use tenant::{Admit, LiveCount, TenantSupervisor};

use crate::crypto::{Secret, SessionTokens, TokenHash, Vault};
use crate::model::session::ClientType;
use crate::model::session::{SessionMetrics, SessionUpdate};
use crate::model::time::Clock;
use crate::model::{Millis, Session, SessionError, SessionView, ToolExecution};
use crate::persist::checkpoint::{CheckpointStats, Checkpointer};
use crate::persist::outbox::{Outbox, OutboxStats};
use crate::persist::postgres::Postgres;
use crate::persist::shipper::{self, ShipperConfig, ShipperHandle};
use crate::persist::sled::Opened;
use crate::persist::{
    Durable, Shipping, Store, StoreError, WriteBehind, WriteBehindStats, WriteOp,
};
use crate::settings::{Durability, Placement, Settings};
use crate::telemetry::metrics::TenantHandles;

/// A tenant's live sessions by id: one hop from a request to its actor.
pub type Directory = DashMap<Arc<str>, Addr<SessionActor>>;

/// How long a roll-back waits for the supervisor's restart, in 5 ms polls.
const ROLL_BACK_POLLS: usize = 400;

/// How many actors are asked at once by whole-engine operations (cleanup,
/// lists, shutdown), so a million sessions do not mean a million futures.
const FAN_OUT: usize = 1024;

/// Everything the engine needs to start.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where sled lives.
    pub data_dir: PathBuf,
    /// Acknowledgement mode.
    pub durability: Durability,
    /// Longest a change waits before its batch is written. Split in two:
    /// an actor coalesces its heartbeats for half of it, and the flusher
    /// gathers a batch nobody waits on for the other half.
    pub flush_interval: Duration,
    /// Most changes per batch.
    pub max_batch: usize,
    /// sled's page cache size.
    pub cache_capacity_bytes: u64,
    /// Longest time between two checkpoints of the log into sled.
    pub checkpoint_interval: Duration,
    /// `active -> idle` threshold.
    pub idle_after: Duration,
    /// Lead time of the WebSocket `session.expiring` notice.
    pub expiring_notice: Duration,
    /// How long final sessions stay readable.
    pub retention: Duration,
    /// Period of the overdue / purge / dead-actor sweep.
    pub sweep_interval: Duration,
    /// Defaults for creates.
    pub defaults: SessionDefaults,
    /// The tenants.
    pub tenants: Vec<TenantLimits>,
    /// Number of arbiters; the number of cores by default.
    pub shards: usize,
    /// Where session actors run.
    pub placement: Placement,
    /// Source of "now" for every deadline.
    pub clock: Clock,
    /// The PostgreSQL tier, when `[postgres] url` is set.
    pub postgres: Option<PostgresTier>,
    /// Seals and opens passthrough credentials.
    pub vault: Arc<Vault>,
    /// Start from what can be read when the store is damaged (`serve
    /// --salvage`), instead of refusing to start.
    pub salvage: bool,
}

/// The PostgreSQL tier's handle and settings.
#[derive(Clone)]
pub struct PostgresTier {
    /// The (lazily connecting) pool.
    pub postgres: Postgres,
    /// How the outbox is shipped.
    pub shipper: ShipperConfig,
    /// Under `durability = "postgres"`, longest an acknowledgement waits for
    /// the commit before the caller gets 503.
    pub commit_timeout: Duration,
    /// With a new or lost data dir, longest start-up waits for PostgreSQL to
    /// rebuild the live sessions before serving from sled alone (the
    /// rebuild then goes on in the background).
    pub rebuild_wait: Duration,
}

impl std::fmt::Debug for PostgresTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never printed.
        f.debug_struct("PostgresTier")
            .field("shipper", &self.shipper)
            .field("commit_timeout", &self.commit_timeout)
            .field("rebuild_wait", &self.rebuild_wait)
            .finish_non_exhaustive()
    }
}

impl EngineConfig {
    /// The engine part of the service's settings, for `tenants`.
    pub fn from_settings(settings: &Settings, tenants: Vec<TenantLimits>) -> Self {
        let s = &settings.sessions;
        EngineConfig {
            data_dir: settings.storage.data_dir.clone(),
            durability: settings.storage.durability,
            flush_interval: Duration::from_millis(settings.storage.flush_interval_ms),
            max_batch: settings.storage.max_batch,
            cache_capacity_bytes: settings.storage.cache_capacity_mb << 20,
            checkpoint_interval: Duration::from_millis(settings.storage.checkpoint_interval_ms),
            idle_after: Duration::from_secs(s.idle_after_seconds.into()),
            expiring_notice: Duration::from_secs(s.expiring_notice_seconds.into()),
            retention: Duration::from_secs(s.retention_seconds.into()),
            sweep_interval: Duration::from_secs(s.sweep_interval_seconds.into()),
            defaults: SessionDefaults {
                idle_timeout_seconds: s.default_idle_timeout_seconds,
                ttl_seconds: s.default_ttl_seconds,
            },
            tenants,
            shards: match settings.engine.shards {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            },
            placement: settings.engine.placement,
            clock: Clock::system(),
            postgres: None,
            vault: Arc::new(Vault::ephemeral()),
            salvage: settings.storage.salvage,
        }
    }
}

/// What actors share: the store, the queue, the shards and the directories.
pub(crate) struct Shared {
    pub(crate) store: Store,
    pub(crate) write_behind: WriteBehind,
    pub(crate) shards: Shards,
    pub(crate) placement: Placement,
    /// Changes are acknowledged only once durable (`durability = "sync"`).
    pub(crate) sync_acks: bool,
    pub(crate) idle_after_ms: Millis,
    /// Lead time of the `session.expiring` notice.
    pub(crate) expiring_notice_ms: Millis,
    /// Numbers WebSocket subscriptions.
    pub(crate) next_subscriber: AtomicU64,
    /// Live figures per shard.
    pub(crate) stats: stats::EngineStats,
    /// Idle sessions per tenant.
    pub(crate) idle: HashMap<Uuid, std::sync::atomic::AtomicI64>,
    /// How long final sessions stay readable.
    pub(crate) retention_ms: Millis,
    /// How long an actor coalesces heartbeat writes.
    pub(crate) flush_interval: Duration,
    pub(crate) clock: Clock,
    directories: HashMap<Uuid, Directory>,
    /// Session actors restarted after dying.
    pub(crate) restarts: AtomicU64,
    /// Set at shutdown: actors stopping now are not restarted.
    pub(crate) shutting_down: AtomicBool,
}

impl Shared {
    /// The directory of a configured tenant.
    pub(crate) fn directory(&self, tenant: Uuid) -> &Directory {
        // Actors and supervisors exist only for configured tenants, and the
        // map is built for all of them before any actor starts.
        self.directories
            .get(&tenant)
            .expect("sessions exist only for configured tenants")
    }

    /// The arbiter a session's actor runs on.
    pub(crate) fn shard_of(&self, tenant: Uuid, session_id: &str) -> usize {
        match self.placement {
            Placement::Session => self.shards.index_of(session_id.as_bytes()),
            Placement::Tenant => self.shards.index_of(tenant.as_bytes()),
        }
    }

    /// Whether a stored session is still readable: live, or final within
    /// its retention (the sweep deletes it some time after).
    pub(crate) fn retained(&self, session: &Session) -> bool {
        session
            .terminated_at
            .is_none_or(|at| at + self.retention_ms > self.clock.now())
    }

    /// The last durable state of a session; a final one past its retention
    /// is gone even before the sweep deletes it.
    pub(crate) fn stored(
        &self,
        tenant: Uuid,
        session_id: &str,
    ) -> Result<Option<Session>, StoreError> {
        Ok(self
            .store
            .session(tenant, session_id)?
            .filter(|s| self.retained(s)))
    }
}

struct TenantHandle {
    limits: TenantLimits,
    supervisor: Addr<TenantSupervisor>,
    metrics: TenantHandles,
}

/// Handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    shared: Arc<Shared>,
    tenants: Arc<HashMap<Uuid, TenantHandle>>,
    defaults: SessionDefaults,
    sweep_interval: Duration,
    ready: Arc<AtomicBool>,
    flusher: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// The PostgreSQL tier, when on.
    postgres: Option<Postgres>,
    /// See [`PostgresTier::rebuild_wait`].
    rebuild_wait: Duration,
    vault: Arc<Vault>,
    outbox: Option<Arc<Outbox>>,
    shipper: Arc<Mutex<Option<ShipperHandle>>>,
    checkpointer: Arc<Mutex<Option<Checkpointer>>>,
    checkpoints: Arc<CheckpointStats>,
}

impl Engine {
    /// Opens the store, starts the flusher, the shards and one supervisor per
    /// tenant. Call [`Engine::recover`] next; until it finishes the engine is
    /// not ready.
    pub fn start(config: EngineConfig) -> Result<Self, StoreError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            StoreError::Sled(format!("creating {}: {e}", config.data_dir.display()))
        })?;
        set_private(&config.data_dir);
        let Opened {
            store,
            mut log,
            salvaged,
        } = Store::open(
            &config.data_dir,
            config.cache_capacity_bytes,
            config.salvage,
        )?;
        if let Some(salvaged) = salvaged {
            tracing::error!(
                data_dir = %config.data_dir.display(),
                damage = salvaged.damage.join("; "),
                lost_changes = salvaged.lost_changes,
                "salvage: the store was damaged; started from what could be read"
            );
        }
        match &config.postgres {
            // A new or lost data dir: recovery rebuilds the live sessions
            // from PostgreSQL. The marker survives a crash mid-rebuild.
            Some(_) if store.is_empty() => {
                store.put_meta(recovery::REBUILD_PENDING, b"1")?;
                store.put_meta(crate::persist::outbox::SEEDED, b"1")?;
                store.sync()?;
            }
            // The tier was just switched on: what is stored already ships.
            Some(_) if store.meta(crate::persist::outbox::SEEDED)?.is_none() => {
                let seeded =
                    crate::persist::outbox::seed(&store, &mut log, crate::model::time::now_ms())?;
                store.put_meta(crate::persist::outbox::SEEDED, b"1")?;
                store.sync()?;
                tracing::info!(
                    records = seeded,
                    "postgres: every stored record queued for PostgreSQL"
                );
            }
            Some(_) => {}
            None => store.remove_meta(crate::persist::outbox::SEEDED)?,
        }
        let outbox = match &config.postgres {
            Some(_) => Some(Arc::new(Outbox::open(&store, log.shared())?)),
            None => None,
        };
        let shipping = outbox.as_ref().map(|outbox| Shipping {
            outbox: outbox.clone(),
            ack_after_commit: config.durability == Durability::Postgres,
            commit_timeout: config
                .postgres
                .as_ref()
                .map_or(Duration::ZERO, |tier| tier.commit_timeout),
        });
        let log_shared = log.shared().clone();
        let checkpointer = Checkpointer::start(
            store.clone(),
            log_shared.clone(),
            config.postgres.is_some(),
            config.checkpoint_interval,
        );
        let (write_behind, flusher) = WriteBehind::start(
            store.clone(),
            log,
            checkpointer.nudger(),
            half(config.flush_interval),
            config.max_batch,
            shipping,
        );
        let shipper = match (&config.postgres, &outbox) {
            (Some(tier), Some(outbox)) => Some(shipper::start(
                store.clone(),
                log_shared,
                outbox.clone(),
                tier.postgres.clone(),
                tier.shipper.clone(),
            )),
            _ => None,
        };
        let shards = Shards::start(config.shards);
        let shard_count = shards.len();
        let shared = Arc::new(Shared {
            store,
            write_behind,
            shards,
            placement: config.placement,
            sync_acks: config.durability != Durability::Async,
            idle_after_ms: config.idle_after.as_millis() as Millis,
            expiring_notice_ms: config.expiring_notice.as_millis() as Millis,
            next_subscriber: AtomicU64::new(1),
            stats: stats::EngineStats::new(shard_count),
            idle: config
                .tenants
                .iter()
                .map(|t| (t.id, std::sync::atomic::AtomicI64::new(0)))
                .collect(),
            retention_ms: config.retention.as_millis() as Millis,
            flush_interval: half(config.flush_interval),
            clock: config.clock.clone(),
            directories: config
                .tenants
                .iter()
                .map(|t| (t.id, Directory::default()))
                .collect(),
            restarts: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
        });
        let tenants = config
            .tenants
            .into_iter()
            .map(|limits| {
                let shard = shared.shards.index_of(limits.id.as_bytes());
                let supervisor_limits = limits.clone();
                let supervisor_shared = shared.clone();
                let client_types = ClientType::ALL.map(ClientType::as_str);
                let metrics = TenantHandles::new(limits.id.to_string(), &client_types);
                let supervisor_metrics = metrics.clone();
                let supervisor =
                    TenantSupervisor::start_in_arbiter(shared.shards.arbiter(shard), move |_| {
                        TenantSupervisor::new(
                            supervisor_limits,
                            supervisor_shared,
                            supervisor_metrics,
                        )
                    });
                (
                    limits.id,
                    TenantHandle {
                        limits,
                        supervisor,
                        metrics,
                    },
                )
            })
            .collect();
        Ok(Engine {
            shared,
            tenants: Arc::new(tenants),
            defaults: config.defaults,
            sweep_interval: config.sweep_interval,
            ready: Arc::new(AtomicBool::new(false)),
            flusher: Arc::new(Mutex::new(Some(flusher))),
            rebuild_wait: config
                .postgres
                .as_ref()
                .map_or(Duration::ZERO, |tier| tier.rebuild_wait),
            postgres: config.postgres.map(|tier| tier.postgres),
            vault: config.vault,
            outbox,
            shipper: Arc::new(Mutex::new(shipper)),
            checkpoints: checkpointer.stats(),
            checkpointer: Arc::new(Mutex::new(Some(checkpointer))),
        })
    }

    /// Whether recovery has finished.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn ensure_ready(&self) -> Result<(), SessionError> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(SessionError::Unavailable)
        }
    }

    /// Refuses a change at once while the disk refuses writes (the
    /// contract's "A full or failing disk"): nothing of it happens.
    fn ensure_writable(&self) -> Result<(), SessionError> {
        if self
            .shared
            .write_behind
            .stats()
            .failing
            .load(Ordering::Acquire)
        {
            Err(SessionError::StorageUnavailable)
        } else {
            Ok(())
        }
    }

    /// A change of a live session was not written: the session goes back
    /// to its durable state (a create that never reached the disk is gone)
    /// before the caller is answered, so nothing of the change is visible.
    async fn roll_back(&self, tenant: Uuid, session_id: &str) {
        let directory = self.shared.directory(tenant);
        let Some(addr) = directory.get(session_id).map(|a| a.clone()) else {
            return;
        };
        if !matches!(addr.send(session::RollBack).await, Ok(true)) {
            // Final already: its end is kept (and written again later).
            return;
        }
        // The supervisor restarts it from disk (or drops it) once it has
        // stopped: wait until the entry is another actor's or gone.
        for _ in 0..ROLL_BACK_POLLS {
            match directory.get(session_id).map(|a| a.clone()) {
                Some(current) if current == addr => {}
                _ => return,
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn tenant(&self, tenant: Uuid) -> Result<&TenantHandle, SessionError> {
        // Callers pass tenants resolved from configured keys; an unknown one
        // is treated like a session that does not exist.
        self.tenants.get(&tenant).ok_or(SessionError::NotFound)
    }

    /// The write-behind queue's live figures.
    pub fn write_behind_stats(&self) -> &WriteBehindStats {
        self.shared.write_behind.stats()
    }

    /// The checkpointer's live figures.
    pub fn checkpoint_stats(&self) -> &CheckpointStats {
        &self.checkpoints
    }

    /// The outbox's live figures, when the PostgreSQL tier is on.
    pub fn outbox_stats(&self) -> Option<&OutboxStats> {
        self.outbox.as_deref().map(Outbox::stats)
    }

    /// Live sessions across tenants (directory entries).
    pub fn live_sessions(&self) -> usize {
        self.shared.directories.values().map(DashMap::len).sum()
    }

    /// Session actors restarted after a panic.
    pub fn restarts(&self) -> u64 {
        self.shared.restarts.load(Ordering::Relaxed)
    }

    /// Writes and fsyncs a small probe record: proves the store accepts
    /// writes now (readiness), not only that nothing failed so far.
    pub async fn check_writable(&self) -> Result<(), SessionError> {
        // sled failing to take a checkpoint is not fixed by waiting: say so.
        if self.checkpoints.failing.load(Ordering::Relaxed) {
            return Err(SessionError::StorageUnavailable);
        }
        let probe = WriteOp::Put {
            key: crate::persist::keys::meta("readyz"),
            value: self.shared.clock.now().to_be_bytes().to_vec(),
        };
        durable_outcome(self.shared.write_behind.submit_local(vec![probe]).await)
    }

    /// Resolves when everything changed before this call is durable.
    pub async fn flush(&self) -> Result<(), SessionError> {
        durable_outcome(self.shared.write_behind.barrier().await)
    }

    /// Resolves when everything changed before this call is committed to
    /// PostgreSQL (durable in sled when the tier is off), or fails after
    /// the tier's commit timeout.
    pub async fn flush_to_postgres(&self) -> Result<(), SessionError> {
        // Coalesced state (a session's counters after its executions,
        // heartbeat times) is queued first, so the barrier covers it.
        for chunk in self.all_actors().chunks(FAN_OUT) {
            join_all(chunk.iter().map(|a| a.send(session::FlushActivity))).await;
        }
        durable_outcome(self.shared.write_behind.shipped_barrier().await)
    }

    /// The live actor of a session, if any.
    fn actor(
        &self,
        tenant: Uuid,
        session_id: &str,
    ) -> Result<Option<Addr<SessionActor>>, SessionError> {
        self.ensure_ready()?;
        self.tenant(tenant)?;
        // A disconnected entry belongs to an actor that is stopping: final
        // (its record is durable, readers fall back to it) or panicked (its
        // supervisor is restarting it; writers get a retryable 503).
        Ok(self
            .shared
            .directory(tenant)
            .get(session_id)
            .map(|entry| entry.clone())
            .filter(Addr::connected))
    }

    /// Sends `msg` to a live session; `None` when the session is not live.
    async fn ask<M>(
        &self,
        tenant: Uuid,
        session_id: &str,
        msg: M,
    ) -> Result<Option<M::Result>, SessionError>
    where
        M: Message + Send + 'static,
        M::Result: Send,
        SessionActor: Handler<M>,
    {
        let Some(addr) = self.actor(tenant, session_id)? else {
            return Ok(None);
        };
        let _call = self.shared.stats.call(
            self.shared.shard_of(tenant, session_id),
            std::any::type_name::<M>(),
        );
        match addr.send(msg).await {
            Ok(result) => Ok(Some(result)),
            // The actor stopped while the message waited: either it just
            // became final (its record is on disk, so the caller's fallback
            // reads it) or it panicked on this very message.
            Err(_) => match self.stored(tenant, session_id)? {
                Some(s) if !s.status.is_final() => Err(SessionError::Unavailable),
                _ => Ok(None),
            },
        }
    }

    /// The last durable state of a session, within its retention.
    fn stored(&self, tenant: Uuid, session_id: &str) -> Result<Option<Session>, SessionError> {
        self.shared.stored(tenant, session_id).map_err(storage)
    }

    /// The error for a call that needs a live session but found none.
    fn not_live(&self, tenant: Uuid, session_id: &str) -> SessionError {
        match self.stored(tenant, session_id) {
            Ok(Some(s)) => s.ensure_live().err().unwrap_or(SessionError::Unavailable),
            Ok(None) => SessionError::NotFound,
            Err(e) => e,
        }
    }

    /// Creates a session (201), or refuses it (400, 409, 429). Answers its
    /// view and its token pair (the only time the tokens are shown).
    pub async fn create(
        &self,
        tenant: Uuid,
        mut request: NewSession,
    ) -> Result<(SessionView, SessionTokens), SessionError> {
        self.ensure_ready()?;
        self.ensure_writable()?;
        let handle = self.tenant(tenant)?;
        let client_chosen_id = request.session_id.is_some();
        let now = self.shared.clock.now();
        let passthrough = request.passthrough.take();
        if let Some(bundle) = &passthrough {
            admission::check_metadata("passthrough_auth", bundle.expose())?;
        }
        let mut session = admission::build(request, &handle.limits, self.defaults, now)?;
        let tokens = SessionTokens::generate(tenant);
        let (session_token, refresh_token) = tokens.hashes();
        session.credentials.session_token = session_token;
        session.credentials.refresh_token = refresh_token;
        // Sealed with the row id the session has for life: the ciphertext
        // opens for this session of this tenant only.
        session.credentials.passthrough = passthrough.map(|plain| {
            self.vault
                .seal(tenant, session.id, &plain)
                .into_boxed_slice()
        });
        let view = session.view(now);
        let client_type = session.client_type.as_str();
        let durable = handle
            .supervisor
            .send(Admit {
                session,
                client_chosen_id,
            })
            .await
            .map_err(|_| SessionError::Unavailable)??;
        if let Err(e) = settle(durable).await {
            // Not written: the client is told the create failed, so the
            // session must not live on, nor leave a final record behind.
            // (A create that is in the log but waits for PostgreSQL stays:
            // it will be committed, and a retry answers 409.)
            if e == SessionError::StorageUnavailable {
                self.roll_back(tenant, &view.session_id).await;
            }
            return Err(e);
        }
        handle.metrics.created(client_type).increment(1);
        Ok((view, tokens))
    }

    /// Opens a push channel from a live session's actor (a WebSocket):
    /// answers the session, the subscription's id, and the receiver of
    /// pushes, of at most `capacity` pending (a subscriber that falls
    /// further behind is dropped, which closes its receiver).
    pub async fn subscribe(
        &self,
        tenant: Uuid,
        session_id: &str,
        capacity: usize,
    ) -> Result<(SessionView, u64, tokio::sync::mpsc::Receiver<session::Push>), SessionError> {
        let id = self.shared.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        let view = self
            .ask_live(tenant, session_id, session::Subscribe { id, tx })
            .await?;
        Ok((view, id, rx))
    }

    /// Closes a push channel.
    pub async fn unsubscribe(&self, tenant: Uuid, session_id: &str, id: u64) {
        let _ = self.ask(tenant, session_id, session::Unsubscribe(id)).await;
    }

    /// Live sessions per configured tenant.
    pub fn live_by_tenant(&self) -> Vec<(Uuid, usize)> {
        self.shared
            .directories
            .iter()
            .map(|(tenant, directory)| (*tenant, directory.len()))
            .collect()
    }

    /// Live session actors per shard.
    pub fn actors_per_shard(&self) -> Vec<i64> {
        self.shared.shards.actor_counts()
    }

    /// Per-shard figures: actors, calls in flight, calls per second, latency.
    pub fn shard_stats(&self) -> Vec<stats::ShardSnapshot> {
        self.shared.stats.shards(&self.actors_per_shard())
    }

    /// Idle sessions of `tenant`.
    pub fn idle_sessions(&self, tenant: Uuid) -> i64 {
        self.shared
            .idle
            .get(&tenant)
            .map_or(0, |n| n.load(Ordering::Relaxed).max(0))
    }

    /// Time since the engine started.
    pub fn uptime(&self) -> Duration {
        self.shared.stats.uptime()
    }

    /// The configured tenants: id and name.
    pub fn tenant_names(&self) -> Vec<(Uuid, String)> {
        self.tenants
            .values()
            .map(|t| (t.limits.id, t.limits.name.clone()))
            .collect()
    }

    /// Rotates the latency windows every [`stats::WINDOW`], forever.
    pub async fn rotate_stats_forever(self) {
        let mut ticker = tokio::time::interval(stats::WINDOW);
        loop {
            ticker.tick().await;
            self.shared.stats.rotate();
        }
    }

    /// Checks that `token` is the session token of this session (live or
    /// final within retention); another session's token is answered as an
    /// unknown session.
    pub async fn verify_token(
        &self,
        tenant: Uuid,
        session_id: &str,
        token: &TokenHash,
    ) -> Result<(), SessionError> {
        let matches = match self
            .ask(tenant, session_id, session::VerifyToken(*token))
            .await?
        {
            Some(matches) => matches,
            None => self
                .stored(tenant, session_id)?
                .is_some_and(|s| s.credentials.session_token.matches(token)),
        };
        if matches {
            Ok(())
        } else {
            Err(SessionError::TokenMismatch)
        }
    }

    /// The decrypted passthrough credentials of a live session.
    pub async fn passthrough(
        &self,
        tenant: Uuid,
        session_id: &str,
    ) -> Result<Secret, SessionError> {
        let (row, sealed) = self
            .ask_live(tenant, session_id, session::SealedPassthrough)
            .await?;
        let sealed = sealed.ok_or(SessionError::PassthroughNotFound)?;
        self.vault.open(tenant, row, &sealed).map_err(|e| {
            SessionError::Storage(format!("passthrough credentials of {session_id}: {e}"))
        })
    }

    /// Reads a session, live or final.
    pub async fn get(&self, tenant: Uuid, session_id: &str) -> Result<SessionView, SessionError> {
        if let Some(view) = self.ask(tenant, session_id, session::Get).await? {
            return Ok(view);
        }
        match self.stored(tenant, session_id)? {
            Some(session) => Ok(session.view(self.shared.clock.now())),
            None => Err(SessionError::NotFound),
        }
    }

    /// The whole state of a session, live or final.
    async fn snapshot(
        &self,
        tenant: Uuid,
        session_id: &str,
    ) -> Result<Option<Session>, SessionError> {
        if let Some(session) = self.ask(tenant, session_id, session::Snapshot).await? {
            return Ok(Some(session));
        }
        self.stored(tenant, session_id)
    }

    /// Applies a PATCH, optionally only at version `if_match`.
    pub async fn update(
        &self,
        tenant: Uuid,
        session_id: &str,
        update: SessionUpdate,
        if_match: Option<u64>,
    ) -> Result<SessionView, SessionError> {
        self.ensure_writable()?;
        let msg = session::Update { update, if_match };
        let ack = self.ask(tenant, session_id, msg).await?;
        self.settled(tenant, session_id, ack).await
    }

    /// Restarts a session's lifetime.
    /// With `refresh_token`, also rotates the token pair (answered once) or,
    /// for a token rotated away before, revokes the session.
    pub async fn refresh(
        &self,
        tenant: Uuid,
        session_id: &str,
        refresh_token: Option<&Secret>,
    ) -> Result<(SessionView, Option<SessionTokens>), SessionError> {
        self.ensure_writable()?;
        let fresh = refresh_token.map(|_| SessionTokens::generate(tenant));
        let rotate = refresh_token
            .zip(fresh.as_ref())
            .map(|(presented, fresh)| (TokenHash::of(presented.expose()), fresh.hashes()));
        let ack = self
            .ask(tenant, session_id, session::Refresh { rotate })
            .await?;
        let view = self.settled(tenant, session_id, ack).await?;
        Ok((view, fresh))
    }

    /// Records one tool execution; answers the session's execution count.
    pub async fn record_tool(
        &self,
        tenant: Uuid,
        session_id: &str,
        execution: ToolExecution,
    ) -> Result<u64, SessionError> {
        self.ensure_writable()?;
        let ack = self
            .ask(tenant, session_id, session::RecordTool(execution))
            .await?;
        self.settled(tenant, session_id, ack).await
    }

    async fn settled<T>(
        &self,
        tenant: Uuid,
        session_id: &str,
        ack: Option<Result<Ack<T>, SessionError>>,
    ) -> Result<T, SessionError> {
        match ack {
            None => Err(self.not_live(tenant, session_id)),
            Some(Err(e)) => Err(e),
            Some(Ok(ack)) => match settle(ack.durable).await {
                Ok(()) => Ok(ack.value),
                Err(SessionError::StorageUnavailable) => {
                    self.roll_back(tenant, session_id).await;
                    Err(SessionError::StorageUnavailable)
                }
                Err(e) => Err(e),
            },
        }
    }

    /// Sends `msg` to a session that must be live; answers its reply.
    async fn ask_live<M, T>(
        &self,
        tenant: Uuid,
        session_id: &str,
        msg: M,
    ) -> Result<T, SessionError>
    where
        M: Message<Result = Result<T, SessionError>> + Send + 'static,
        T: Send + 'static,
        SessionActor: Handler<M>,
    {
        match self.ask(tenant, session_id, msg).await? {
            Some(result) => result,
            None => Err(self.not_live(tenant, session_id)),
        }
    }

    /// A heartbeat.
    pub async fn touch(&self, tenant: Uuid, session_id: &str) -> Result<(), SessionError> {
        self.ensure_writable()?;
        self.ask_live(tenant, session_id, session::Touch).await
    }

    /// Checks that a session is live.
    pub async fn validate(
        &self,
        tenant: Uuid,
        session_id: &str,
    ) -> Result<SessionView, SessionError> {
        self.ask_live(tenant, session_id, session::Validate).await
    }

    /// Ends a session; a final one is left as it is.
    pub async fn terminate(
        &self,
        tenant: Uuid,
        session_id: &str,
        reason: Option<String>,
    ) -> Result<(), SessionError> {
        // The engine's own reasons are not a client's to give: they mean
        // something to audits and to the WebSocket's close codes.
        if reason.as_deref().is_some_and(|r| {
            [
                crate::model::session::REASON_REFRESH_TOKEN_REUSE,
                crate::model::session::REASON_IDLE_TIMEOUT,
                crate::model::session::REASON_TTL_EXPIRED,
            ]
            .contains(&r)
        }) {
            return Err(SessionError::validation(
                "reason",
                "reason must not be one the engine uses (refresh_token_reuse, idle_timeout, ttl_expired)",
            ));
        }
        self.ensure_writable()?;
        match self
            .ask(tenant, session_id, session::Terminate { reason })
            .await?
        {
            Some(result) => result,
            None => match self.stored(tenant, session_id)? {
                Some(s) if s.status.is_final() => Ok(()),
                // Live on disk but without an actor: it is being restarted.
                Some(_) => Err(SessionError::Unavailable),
                None => Err(SessionError::NotFound),
            },
        }
    }

    /// A session's executions, newest first.
    pub async fn executions(
        &self,
        tenant: Uuid,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<ToolExecution>, SessionError> {
        let Some(session) = self.snapshot(tenant, session_id).await? else {
            return Err(SessionError::NotFound);
        };
        if !self.shared.sync_acks {
            // Acknowledged-from-memory executions may still be queued.
            self.flush().await?;
        }
        self.shared
            .store
            .executions(session.id, limit)
            .map_err(storage)
    }

    /// Per-session metrics.
    pub async fn session_metrics(
        &self,
        tenant: Uuid,
        session_id: &str,
    ) -> Result<SessionMetrics, SessionError> {
        match self.snapshot(tenant, session_id).await? {
            Some(session) => Ok(session.metrics()),
            None => Err(SessionError::NotFound),
        }
    }

    /// Live sessions counted by a tenant's supervisor (tests and stats).
    pub async fn tenant_live_count(&self, tenant: Uuid) -> Result<usize, SessionError> {
        let handle = self.tenant(tenant)?;
        handle
            .supervisor
            .send(LiveCount)
            .await
            .map_err(|_| SessionError::Unavailable)
    }

    /// Writes pending activity, flushes the queue, stops the flusher and the
    /// shards. Call once, after the HTTP server has stopped.
    pub async fn shutdown(&self) {
        self.ready.store(false, Ordering::Release);
        self.shared.shutting_down.store(true, Ordering::Release);
        for chunk in self.all_actors().chunks(FAN_OUT) {
            join_all(chunk.iter().map(|a| a.send(session::FlushActivity))).await;
        }
        // Stop the actors first, so no timer writes after the last flush.
        let shared = self.shared.clone();
        // Joining threads blocks; keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || shared.shards.stop()).await;
        if let Err(e) = durable_outcome(self.shared.write_behind.shutdown().await) {
            tracing::error!(error = %e, "final flush failed");
        }
        let flusher = self
            .flusher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(flusher) = flusher {
            let _ = tokio::task::spawn_blocking(move || flusher.join()).await;
        }
        let shipper = self
            .shipper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(shipper) = shipper {
            let _ = tokio::task::spawn_blocking(move || shipper.stop()).await;
        }
        // Last: the final checkpoint holds the shipper's position too.
        let checkpointer = self
            .checkpointer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(mut checkpointer) = checkpointer {
            let _ = tokio::task::spawn_blocking(move || checkpointer.stop()).await;
        }
        if let Some(postgres) = &self.postgres {
            postgres.pool().close().await;
        }
    }

    fn supervisor(&self, tenant: Uuid) -> Option<&Addr<TenantSupervisor>> {
        self.tenants.get(&tenant).map(|t| &t.supervisor)
    }
}

/// Makes the data dir readable by its owner only (tool arguments and
/// results are in it). Best effort: a dir the process does not own keeps
/// its mode, with a warning.
fn set_private(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot make the data dir private (mode 0700)");
    }
}

/// Half of `d`, at least a millisecond.
fn half(d: Duration) -> Duration {
    (d / 2).max(Duration::from_millis(1))
}

fn storage(e: StoreError) -> SessionError {
    SessionError::Storage(e.to_string())
}

/// Waits for a change to be durable, when there is something to wait for.
async fn settle(durable: Option<Durable>) -> Result<(), SessionError> {
    match durable {
        None => Ok(()),
        Some(rx) => durable_outcome(rx.await),
    }
}

/// What a resolved [`Durable`] means for the caller: a store failure, or a
/// closed queue (shutting down), which is worth retrying.
fn durable_outcome(
    written: Result<Result<(), StoreError>, tokio::sync::oneshot::error::RecvError>,
) -> Result<(), SessionError> {
    match written {
        Ok(Ok(())) => Ok(()),
        // PostgreSQL did not commit in time (durability = "postgres"): the
        // change is safe in sled and will ship; the caller may retry.
        Ok(Err(StoreError::Postgres(e))) => {
            tracing::warn!(error = %e, "a change waits for PostgreSQL; answered 503");
            Err(SessionError::Unavailable)
        }
        Ok(Err(StoreError::Closed)) | Err(_) => Err(SessionError::Unavailable),
        Ok(Err(StoreError::Unwritable(_))) => Err(SessionError::StorageUnavailable),
        Ok(Err(e)) => Err(storage(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> EngineConfig {
        EngineConfig {
            data_dir: dir.to_owned(),
            durability: Durability::Sync,
            flush_interval: Duration::from_millis(5),
            max_batch: 1024,
            cache_capacity_bytes: 16 << 20,
            checkpoint_interval: Duration::from_secs(1),
            idle_after: Duration::from_secs(300),
            expiring_notice: Duration::from_secs(60),
            retention: Duration::from_secs(3600),
            sweep_interval: Duration::from_secs(3600),
            defaults: SessionDefaults {
                idle_timeout_seconds: 1800,
                ttl_seconds: 86_400,
            },
            tenants: vec![TenantLimits {
                id: Uuid::nil(),
                name: "t".into(),
                max_active_sessions: 10,
                max_ttl_seconds: 86_400,
                max_idle_timeout_seconds: 86_400,
            }],
            shards: 2,
            placement: Placement::Session,
            clock: Clock::system(),
            postgres: None,
            vault: Arc::new(Vault::ephemeral()),
            salvage: false,
        }
    }

    fn execution() -> ToolExecution {
        ToolExecution {
            tool_name: "t".into(),
            tool_id: None,
            arguments: "null".into(),
            result: "null".into(),
            error: None,
            duration_ms: 1,
            tokens_used: 1,
            executed_at: 0,
            recorded_at: 0,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_purge_never_removes_a_session_recreated_under_the_same_id() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::system();
        let engine = Engine::start(EngineConfig {
            clock: clock.clone(),
            ..config(dir.path())
        })
        .unwrap();
        engine.recover().await.unwrap();
        let tenant = Uuid::nil();
        let request = |id: &str| NewSession {
            session_id: Some(id.into()),
            edge_mcp_id: "e".into(),
            ..NewSession::default()
        };
        for round in 0..20 {
            let id = format!("reused-{round}");
            engine.create(tenant, request(&id)).await.unwrap();
            engine.record_tool(tenant, &id, execution()).await.unwrap();
            engine.terminate(tenant, &id, None).await.unwrap();
            clock.advance(Duration::from_secs(3601));
            assert_eq!(
                engine.get(tenant, &id).await.unwrap_err(),
                SessionError::NotFound,
                "past retention it is gone before the sweep runs"
            );
            // Race the retention purge against a create of the same id.
            let (purged, created) =
                tokio::join!(engine.purge(), engine.create(tenant, request(&id)));
            purged.unwrap();
            created.unwrap();
            engine.record_tool(tenant, &id, execution()).await.unwrap();
            engine.flush().await.unwrap();
            // The previous round's session may still be stopping (its actor
            // leaves the directory just after its final write), which makes
            // a purge skip it once; it goes on a later pass.
            let mut again = engine.purge().await.unwrap();
            for _ in 0..100 {
                if again == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                again = engine.purge().await.unwrap();
            }
            assert_eq!(again, 0, "nothing final is left to purge");
            let view = engine.get(tenant, &id).await.unwrap();
            assert_eq!((view.status, view.tool_execution_count), ("active", 1));
            let stored = engine.shared.store.session(tenant, &id).unwrap().unwrap();
            assert_eq!(
                stored.tool_execution_count, 1,
                "the new session's records survived"
            );
            assert_eq!(engine.executions(tenant, &id, 10).await.unwrap().len(), 1);
            // Free the slot for the next round (the test tenant allows 10).
            engine.terminate(tenant, &id, None).await.unwrap();
        }
        engine.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_is_served_before_recovery_finishes() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::start(config(dir.path())).unwrap();
        assert!(!engine.is_ready());
        let request = NewSession {
            edge_mcp_id: "e".into(),
            ..NewSession::default()
        };
        assert_eq!(
            engine
                .create(Uuid::nil(), request.clone())
                .await
                .unwrap_err(),
            SessionError::Unavailable
        );
        assert_eq!(
            engine.get(Uuid::nil(), "x").await.unwrap_err(),
            SessionError::Unavailable
        );
        engine.recover().await.unwrap();
        assert!(engine.is_ready());
        assert!(engine.create(Uuid::nil(), request).await.is_ok());
        engine.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_actor_is_restarted_from_its_last_durable_state() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::start(config(dir.path())).unwrap();
        engine.recover().await.unwrap();
        let tenant = Uuid::nil();
        for id in ["victim", "bystander"] {
            let request = NewSession {
                session_id: Some(id.into()),
                edge_mcp_id: "e".into(),
                ..NewSession::default()
            };
            engine.create(tenant, request).await.unwrap();
            engine.record_tool(tenant, id, execution()).await.unwrap();
        }
        let victim = engine
            .shared
            .directory(tenant)
            .get("victim")
            .unwrap()
            .clone();
        assert!(
            victim.send(session::Crash).await.is_err(),
            "the panic drops the reply"
        );
        // The supervisor restarts it asynchronously; wait for the new actor.
        for _ in 0..500 {
            let entry = engine
                .shared
                .directory(tenant)
                .get("victim")
                .map(|a| a.clone());
            if entry.is_some_and(|a| a.connected() && a != victim) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }

        // The other session on the same engine is untouched.
        assert_eq!(
            engine
                .record_tool(tenant, "bystander", execution())
                .await
                .unwrap(),
            2
        );
        // The victim comes back with its durable state and keeps working.
        let view = engine.get(tenant, "victim").await.unwrap();
        assert_eq!(view.tool_execution_count, 1);
        assert_eq!(view.status, "active");
        assert_eq!(engine.restarts(), 1);
        assert_eq!(
            engine
                .record_tool(tenant, "victim", execution())
                .await
                .unwrap(),
            2
        );
        assert_eq!(
            engine.tenant_live_count(tenant).await.unwrap(),
            2,
            "no slot leaked or double-counted"
        );
        engine.shutdown().await;
    }
}
