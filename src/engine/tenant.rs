//! The tenant supervisor: one actor per tenant that admits sessions against
//! `max_active_sessions`, spawns their actors on the shards, registers them
//! in the tenant's directory, and restarts one that died.
//!
//! Admission is serialised by the supervisor's mailbox, so concurrent
//! creates can never over-admit: the count and the check happen in one
//! handler, with no await in between.

use std::sync::Arc;

use actix::prelude::*;

use super::admission::TenantLimits;
use super::outcome::storage;
use super::session::{ActorStopped, Release, SessionActor, SupervisorLink};
use super::shared::Shared;
use crate::model::{Session, SessionError};
use crate::persist::write_behind::purge_ops;
use crate::persist::{Durable, WriteOp};
use crate::telemetry::metrics::TenantHandles;

/// The supervisor of one tenant's sessions.
pub struct TenantSupervisor {
    limits: TenantLimits,
    shared: Arc<Shared>,
    /// Live (non-final) sessions counted against the limit.
    live: usize,
    /// How its actors reach this supervisor, shared by all of them: an
    /// `Addr` or `Recipient` clone allocates, an `Arc` clone does not (a
    /// saving per live session).
    me: Option<Arc<SupervisorLink>>,
    /// The tenant's metric handles, which its sessions record to.
    metrics: TenantHandles,
}

impl TenantSupervisor {
    /// A supervisor for the tenant with `limits`.
    pub(crate) fn new(limits: TenantLimits, shared: Arc<Shared>, metrics: TenantHandles) -> Self {
        TenantSupervisor {
            limits,
            shared,
            live: 0,
            me: None,
            metrics,
        }
    }

    /// Starts an actor for `session` on its shard and registers it.
    fn spawn(&mut self, session: Session, ctx: &mut Context<Self>) -> Addr<SessionActor> {
        let me = self
            .me
            .get_or_insert_with(|| {
                let address = ctx.address();
                Arc::new(SupervisorLink {
                    released: address.clone().recipient(),
                    stopped: address.recipient(),
                    metrics: self.metrics.clone(),
                })
            })
            .clone();
        let shard = self.shared.shard_of(self.limits.id, &session.session_id);
        let id = session.session_id.clone();
        let shared = self.shared.clone();
        let addr = SessionActor::start_in_arbiter(self.shared.shards.arbiter(shard), move |_| {
            SessionActor::new(session, shared, me)
        });
        self.shared
            .directory(self.limits.id)
            .insert(id, addr.clone());
        addr
    }
}

impl Actor for TenantSupervisor {
    type Context = Context<Self>;
}

/// Admits a new session, or refuses it with 409 / 429.
#[derive(Message)]
#[rtype(result = "Result<Option<Durable>, SessionError>")]
pub struct Admit {
    /// The validated new session.
    pub session: Session,
    /// The id was chosen by the client (so it may collide with a stored one).
    pub client_chosen_id: bool,
}

impl Handler<Admit> for TenantSupervisor {
    type Result = Result<Option<Durable>, SessionError>;

    fn handle(&mut self, msg: Admit, ctx: &mut Context<Self>) -> Self::Result {
        let session = msg.session;
        let directory = self.shared.directory(self.limits.id);
        if directory.contains_key(&*session.session_id) {
            return Err(SessionError::AlreadyExists);
        }
        if self.live >= self.limits.max_active_sessions {
            return Err(SessionError::TenantLimit {
                limit: self.limits.max_active_sessions,
            });
        }
        let mut ops = Vec::new();
        if msg.client_chosen_id {
            if let Some(old) = self
                .shared
                .store
                .session(self.limits.id, &session.session_id)
                .map_err(storage)?
            {
                // A final session keeps its id for its retention; past it,
                // the old record goes (with its executions) in the same batch.
                if self.shared.retained(&old) {
                    return Err(SessionError::AlreadyExists);
                }
                ops = purge_ops(&self.shared.store, &old).map_err(storage)?;
            }
        }
        self.live += 1;
        ops.extend(WriteOp::new_session(&session));
        let durable = self.shared.write_behind.submit(ops, self.shared.sync_acks);
        self.spawn(session, ctx);
        Ok(durable)
    }
}

impl Handler<Release> for TenantSupervisor {
    type Result = ();

    fn handle(&mut self, _: Release, _: &mut Context<Self>) {
        self.live = self.live.saturating_sub(1);
    }
}

/// Brings back a live session read from disk (recovery). It counts against
/// the limit but is never refused: it was admitted before the restart.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Restore(pub Session);

impl Handler<Restore> for TenantSupervisor {
    type Result = ();

    fn handle(&mut self, Restore(session): Restore, ctx: &mut Context<Self>) {
        self.live += 1;
        self.spawn(session, ctx);
    }
}

impl Handler<ActorStopped> for TenantSupervisor {
    type Result = ();

    fn handle(&mut self, msg: ActorStopped, ctx: &mut Context<Self>) {
        // Changes the actor queued before it died may still be in the
        // write-behind queue: read the store only once they are on disk,
        // or the restarted actor would reuse an acknowledged execution's
        // number. Admissions wait meanwhile (a few milliseconds, rarely).
        // Local: under durability = "postgres" a PostgreSQL outage must not
        // hold every admission of the tenant for the commit timeout.
        let barrier = self.shared.write_behind.local_barrier();
        ctx.wait(barrier.into_actor(self).map(move |_, supervisor, ctx| {
            supervisor.restart(&msg.session_id, msg.rolled_back, ctx)
        }));
    }
}

impl TenantSupervisor {
    fn restart(&mut self, session_id: &Arc<str>, rolled_back: bool, ctx: &mut Context<Self>) {
        if self
            .shared
            .shutting_down
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        let directory = self.shared.directory(self.limits.id);
        // The dead actor's entry stays in the directory until now, so no
        // create could take the id meanwhile; a connected entry means the
        // session is already running again.
        if directory.get(&**session_id).is_some_and(|a| a.connected()) {
            return;
        }
        match self.shared.store.session(self.limits.id, session_id) {
            Ok(Some(session)) if !session.status.is_final() && rolled_back => {
                tracing::warn!(
                    %session_id,
                    tenant = %self.limits.id,
                    version = session.version,
                    "a change was not written; the session is back at its last durable state"
                );
                self.spawn(session, ctx);
            }
            Ok(None) if rolled_back => {
                tracing::warn!(%session_id, tenant = %self.limits.id, "a create was not written; the session does not exist");
                directory.remove_if(&**session_id, |_, addr| !addr.connected());
                self.live = self.live.saturating_sub(1);
            }
            Ok(Some(session)) if !session.status.is_final() => {
                tracing::error!(
                    %session_id,
                    tenant = %self.limits.id,
                    version = session.version,
                    "session actor stopped unexpectedly (panic); restarted from its last durable state"
                );
                self.shared
                    .restarts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.spawn(session, ctx);
            }
            other => {
                if let Err(e) = &other {
                    tracing::error!(%session_id, error = %e, "reading a stopped session's record failed");
                }
                tracing::error!(
                    %session_id,
                    tenant = %self.limits.id,
                    "session actor stopped unexpectedly before its first durable write; the session is lost"
                );
                directory.remove_if(&**session_id, |_, addr| !addr.connected());
                self.live = self.live.saturating_sub(1);
            }
        }
    }
}

/// Deletes final sessions past their retention, with their index entries
/// and executions. Runs in the supervisor so it is ordered with admissions:
/// an id re-created meanwhile is live and left alone.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct Purge {
    /// Candidates from the by-end-time index.
    pub session_ids: Vec<String>,
}

impl Handler<Purge> for TenantSupervisor {
    type Result = usize;

    fn handle(&mut self, msg: Purge, _: &mut Context<Self>) -> usize {
        let directory = self.shared.directory(self.limits.id);
        let mut purged = 0;
        for id in msg.session_ids {
            if directory.contains_key(id.as_str()) {
                continue;
            }
            let ops = match self.shared.store.session(self.limits.id, &id) {
                Ok(Some(old)) if old.status.is_final() && !self.shared.retained(&old) => {
                    purge_ops(&self.shared.store, &old)
                }
                Ok(_) => continue,
                Err(e) => Err(e),
            };
            match ops {
                Ok(ops) => {
                    self.shared.write_behind.submit(ops, false);
                    purged += 1;
                }
                Err(e) => {
                    tracing::error!(session_id = %id, error = %e, "purging a final session failed")
                }
            }
        }
        purged
    }
}

/// Answers once every message sent before it has been handled.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct LiveCount;

impl Handler<LiveCount> for TenantSupervisor {
    type Result = usize;

    fn handle(&mut self, _: LiveCount, _: &mut Context<Self>) -> usize {
        self.live
    }
}
