//! Starting the engine (store, log, flusher, checkpointer, shipper,
//! shards, supervisors) and shutting it down in order; the barriers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures::future::join_all;

use super::config::EngineConfig;
use super::handle::{Engine, TenantHandle};
use super::outcome::durable_outcome;
use super::recovery;
use super::session::{self, SupervisorLink};
use super::shards::Shards;
use super::shared::{new_directory, Shared, FAN_OUT};
use super::stats;
use super::tenant::TenantSupervisor;
use crate::model::session::ClientType;
use crate::model::{Millis, SessionError};
use crate::persist::checkpoint::Checkpointer;
use crate::persist::outbox::Outbox;
use crate::persist::shipper::{self};
use crate::persist::sled::Opened;
use crate::persist::{Shipping, Store, StoreError, WriteBehind, WriteOp};
use crate::settings::Durability;
use crate::telemetry::metrics::TenantHandles;

impl Engine {
    /// Opens the store, starts the flusher, the shards and one supervisor per
    /// tenant. Call [`Engine::recover`] next; until it finishes the engine is
    /// not ready.
    pub fn start(config: EngineConfig) -> Result<Self, StoreError> {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&config.data_dir)
            .map_err(|e| {
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
            // A cluster node's store is a cache: a shard's sessions are
            // rebuilt when the node takes it, and nothing stored ships.
            Some(_) if config.cluster.is_some() => {
                store.put_meta(crate::persist::outbox::SEEDED, b"1")?;
            }
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
            ownership: config.cluster.clone(),
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
                config.cluster.clone(),
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
                .map(|t| (t.id, new_directory()))
                .collect(),
            restarts: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            ownership: config.cluster.clone(),
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
                let live = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let (supervisor_metrics, supervisor_live) = (metrics.clone(), live.clone());
                let supervisor =
                    TenantSupervisor::start_in_arbiter(shared.shards.arbiter(shard), move |_| {
                        TenantSupervisor::new(
                            supervisor_limits,
                            supervisor_shared,
                            supervisor_live,
                            supervisor_metrics,
                        )
                    });
                // How sessions admitted by the front door reach their
                // supervisor (which builds its own for the ones it starts).
                let link = Arc::new(SupervisorLink {
                    shared: shared.clone(),
                    live,
                    stopped: supervisor.clone().recipient(),
                    metrics: metrics.clone(),
                });
                (
                    limits.id,
                    TenantHandle {
                        limits,
                        supervisor,
                        metrics,
                        link,
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
            migrate_before_rebuild: config
                .postgres
                .as_ref()
                .is_some_and(|tier| tier.shipper.migrate_on_start),
            postgres: config.postgres.map(|tier| tier.postgres),
            vault: config.vault,
            outbox,
            shipper: Arc::new(Mutex::new(shipper)),
            checkpoints: checkpointer.stats(),
            checkpointer: Arc::new(Mutex::new(Some(checkpointer))),
            cluster_quota: config.cluster_quota,
        })
    }

    /// Stops the shards (each actor queues its pending activity as it
    /// stops), flushes the queue, stops the flusher. Call once, after the
    /// HTTP server has stopped.
    pub async fn shutdown(&self) {
        self.ready.store(false, Ordering::Release);
        self.shared.shutting_down.store(true, Ordering::Release);
        // Stop the actors first, so no timer writes after the last flush;
        // each queues its pending record as it stops (`SessionActor::stopped`).
        let shared = self.shared.clone();
        // Joining threads blocks; keep it off the async workers.
        let _ = tokio::task::spawn_blocking(move || shared.shards.stop()).await;
        if let Err(e) = durable_outcome(self.shared.write_behind.shutdown().await) {
            tracing::error!(error = %e, "final flush failed");
        }
        let flusher = take(&self.flusher);
        if let Some(flusher) = flusher {
            let _ = tokio::task::spawn_blocking(move || flusher.join()).await;
        }
        let shipper = take(&self.shipper);
        if let Some(shipper) = shipper {
            let _ = tokio::task::spawn_blocking(move || shipper.stop()).await;
        }
        // Last: the final checkpoint holds the shipper's position too.
        let checkpointer = take(&self.checkpointer);
        if let Some(mut checkpointer) = checkpointer {
            let _ = tokio::task::spawn_blocking(move || checkpointer.stop()).await;
        }
        if let Some(postgres) = &self.postgres {
            postgres.pool().close().await;
        }
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
}

/// Makes the data dir and everything already in it its owner's only
/// (0700 dirs, 0600 files): tool arguments and results are in it. Files
/// created later are private through the process umask (`main`). A data
/// dir of an older version, written with the default umask, is fixed here.
/// Best effort: what the process does not own keeps its mode, with a
/// warning.
fn set_private(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let mode = |path: &std::path::Path, mode: u32| {
        if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)) {
            tracing::warn!(path = %path.display(), error = %e, mode = format!("{mode:o}"), "cannot make a data dir entry private");
        }
    };
    mode(dir, 0o700);
    let mut dirs = vec![dir.to_owned()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            // Not following symbolic links: only what lives in the data dir.
            match entry.file_type() {
                Ok(t) if t.is_dir() => {
                    mode(&entry.path(), 0o700);
                    dirs.push(entry.path());
                }
                Ok(t) if t.is_file() => mode(&entry.path(), 0o600),
                _ => {}
            }
        }
    }
}

/// The handle in `slot`, once (a poisoned lock still holds a valid one).
fn take<T>(slot: &Mutex<Option<T>>) -> Option<T> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// Half of `d`, at least a millisecond.
fn half(d: Duration) -> Duration {
    (d / 2).max(Duration::from_millis(1))
}
