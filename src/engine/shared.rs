//! What the actors, supervisors and the front door share: the store, the
//! write-behind queue, the shards and each tenant's directory of live
//! sessions.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use dashmap::DashMap;
use uuid::Uuid;

use super::session::SessionActor;
use super::shards::Shards;
use super::stats;
use crate::model::time::Clock;
use crate::model::{Millis, Session};
use crate::persist::{Store, StoreError, WriteBehind};
use crate::settings::Placement;

/// A tenant's live sessions by id: one hop from a request to its actor.
pub type Directory = DashMap<Arc<str>, Addr<SessionActor>>;

/// Lock shards of a directory. A shard grows by doubling its table while
/// its write lock is held, which blocks every arbiter that needs that shard:
/// with dashmap's default (8 shards on two cores) a million sessions meant
/// eight rehashes of ~115,000 entries each at about 900,000 sessions, and
/// the creates of that round had a p99 of 44-67 ms against about 20 ms in
/// the others. With 64 shards each pause is an eighth as long. A shard is
/// padded to 128 bytes: 8 KiB per tenant.
const DIRECTORY_SHARDS: usize = 64;

/// An empty directory.
pub(crate) fn new_directory() -> Directory {
    DashMap::with_shard_amount(DIRECTORY_SHARDS)
}

/// How many actors are asked at once by whole-engine operations (cleanup,
/// lists, shutdown), so a million sessions do not mean a million futures.
pub(crate) const FAN_OUT: usize = 1024;

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
    pub(crate) directories: HashMap<Uuid, Directory>,
    /// Session actors restarted after dying.
    pub(crate) restarts: AtomicU64,
    /// Set at shutdown: actors stopping now are not restarted.
    pub(crate) shutting_down: AtomicBool,
    /// On a cluster node: the shards it serves and their sessions.
    pub(crate) ownership: Option<Arc<crate::cluster::Ownership>>,
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

    /// The arbiter a session's actor runs on. `here`: the session is
    /// created by a request served on an arbiter, which is then its home
    /// under `session` placement (its client's next calls on the same
    /// connection reach it without crossing threads).
    pub(crate) fn shard_of(&self, tenant: Uuid, session_id: &str, here: bool) -> usize {
        match self.placement {
            Placement::Session => here
                .then(super::shards::current)
                .flatten()
                .unwrap_or_else(|| self.shards.index_of(session_id.as_bytes())),
            Placement::Tenant => self.shards.index_of(tenant.as_bytes()),
        }
    }

    /// Whether a stored session is still readable: live, or final within
    /// its retention (the sweep deletes it some time after).
    pub(crate) fn retained(&self, session: &Session) -> bool {
        session
            .terminated_at()
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

/// Gives a session's slot in its tenant's live count back (saturating:
/// never below zero).
pub(crate) fn release_slot(live: &std::sync::atomic::AtomicUsize) {
    let _ = live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        Some(n.saturating_sub(1))
    });
}
