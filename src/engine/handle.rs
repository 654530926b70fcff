//! The engine's handle ([`Engine`]) and the plumbing every call goes
//! through: readiness and writability checks, finding a session's actor,
//! asking it, settling its durability, rolling back a change that was not
//! written.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use actix::prelude::*;
use uuid::Uuid;

use super::admission::{SessionDefaults, TenantLimits};
use super::outcome::{settle, storage};
use super::session::{self, Ack, SessionActor, SupervisorLink};
use super::shared::Shared;
use super::tenant::TenantSupervisor;
use crate::crypto::Vault;
use crate::model::{Session, SessionError};
use crate::persist::checkpoint::{CheckpointStats, Checkpointer};
use crate::persist::outbox::Outbox;
use crate::persist::postgres::Postgres;
use crate::persist::shipper::ShipperHandle;
use crate::telemetry::metrics::TenantHandles;

/// How long a roll-back waits for the supervisor's restart, in 5 ms polls.
const ROLL_BACK_POLLS: usize = 400;

pub(super) struct TenantHandle {
    pub(super) limits: TenantLimits,
    pub(super) supervisor: Addr<TenantSupervisor>,
    pub(super) metrics: TenantHandles,
    /// What the sessions this front door admits share with their tenant.
    pub(super) link: Arc<SupervisorLink>,
}

/// Handle to the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(super) shared: Arc<Shared>,
    pub(super) tenants: Arc<HashMap<Uuid, TenantHandle>>,
    pub(super) defaults: SessionDefaults,
    pub(super) sweep_interval: Duration,
    pub(super) ready: Arc<AtomicBool>,
    pub(super) flusher: Arc<Mutex<Option<JoinHandle<()>>>>,
    /// The PostgreSQL tier, when on.
    pub(super) postgres: Option<Postgres>,
    /// See [`PostgresTier::rebuild_wait`].
    pub(super) rebuild_wait: Duration,
    /// Apply the migrations before a rebuild reads PostgreSQL
    /// (`postgres.migrate_on_start`).
    pub(super) migrate_before_rebuild: bool,
    pub(super) vault: Arc<Vault>,
    pub(super) outbox: Option<Arc<Outbox>>,
    pub(super) shipper: Arc<Mutex<Option<ShipperHandle>>>,
    pub(super) checkpointer: Arc<Mutex<Option<Checkpointer>>>,
    pub(super) checkpoints: Arc<CheckpointStats>,
    /// On a cluster node: the tenants' quotas across the cluster.
    pub(super) cluster_quota: Option<Arc<crate::cluster::Quota>>,
}

impl Engine {
    /// The arbiters, for serving HTTP on them.
    pub fn arbiters(&self) -> Vec<actix_rt::ArbiterHandle> {
        self.shared.shards.arbiters().to_vec()
    }

    /// Whether recovery has finished.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(super) fn ensure_ready(&self) -> Result<(), SessionError> {
        if self.is_ready() {
            Ok(())
        } else {
            Err(SessionError::Unavailable)
        }
    }

    /// Refuses a change at once while the disk refuses writes (the
    /// contract's "A full or failing disk"): nothing of it happens.
    pub(super) fn ensure_writable(&self) -> Result<(), SessionError> {
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

    /// The configured tenants' ids.
    pub(super) fn tenant_ids(&self) -> impl Iterator<Item = Uuid> + '_ {
        self.tenants.keys().copied()
    }

    pub(super) fn tenant(&self, tenant: Uuid) -> Result<&TenantHandle, SessionError> {
        // Callers pass tenants resolved from configured keys; an unknown one
        // is treated like a session that does not exist.
        self.tenants.get(&tenant).ok_or(SessionError::NotFound)
    }

    pub(super) fn supervisor(&self, tenant: Uuid) -> Option<&Addr<TenantSupervisor>> {
        self.tenants.get(&tenant).map(|t| &t.supervisor)
    }

    /// The live actor of a session, if any.
    pub(super) fn actor(
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
    pub(super) async fn ask<M>(
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
        // Counted for the arbiter serving the call (where its time goes).
        let _call = self.shared.stats.call(
            self.shared.shard_of(tenant, session_id, true),
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

    pub(super) async fn settled<T>(
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
    pub(super) async fn ask_live<M, T>(
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

    /// A change of a live session was not written: the session goes back
    /// to its durable state (a create that never reached the disk is gone)
    /// before the caller is answered, so nothing of the change is visible.
    pub(super) async fn roll_back(&self, tenant: Uuid, session_id: &str) {
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

    /// The last durable state of a session, within its retention.
    pub(super) fn stored(
        &self,
        tenant: Uuid,
        session_id: &str,
    ) -> Result<Option<Session>, SessionError> {
        self.shared.stored(tenant, session_id).map_err(storage)
    }

    /// The error for a call that needs a live session but found none.
    pub(super) fn not_live(&self, tenant: Uuid, session_id: &str) -> SessionError {
        match self.stored(tenant, session_id) {
            Ok(Some(s)) => s.ensure_live().err().unwrap_or(SessionError::Unavailable),
            Ok(None) => SessionError::NotFound,
            Err(e) => e,
        }
    }
}
