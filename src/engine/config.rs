//! What the engine is started with: [`EngineConfig`], built from the
//! settings, and the PostgreSQL tier's handle.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::admission::{SessionDefaults, TenantLimits};
use crate::crypto::Vault;
use crate::model::time::Clock;
use crate::persist::postgres::Postgres;
use crate::persist::shipper::ShipperConfig;
use crate::settings::{Durability, Placement, Settings};

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
    /// Period of the purge sweep and of its wall-clock jump check.
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
    /// On a cluster node: the shards it serves. The store is then a cache
    /// (nothing is rebuilt from PostgreSQL at start; a shard's sessions
    /// are, when the node takes it) and every batch shipped is fenced.
    pub cluster: Option<Arc<crate::cluster::Ownership>>,
    /// On a cluster node: its reservations of the tenants' quotas (every
    /// create takes room from them).
    pub cluster_quota: Option<Arc<crate::cluster::Quota>>,
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
            cluster: None,
            cluster_quota: None,
        }
    }
}
