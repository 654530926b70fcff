//! A tenant's admission and its supervisor.
//!
//! A create is admitted on the caller's thread, not through an actor: the
//! tenant's live count is an atomic, reserved with a compare-and-swap
//! before anything is spawned and given back if the create goes no
//! further, so concurrent creates never over-admit and no create waits
//! for another thread. Two creates of one id are ordered by the tenant's
//! directory entry, held from the check to the registration.
//!
//! Sessions read from disk at start-up are restored the same way, from the
//! recovery loop ([`Restorer`], in batches). The supervisor (one actor per
//! tenant) restarts a session whose actor died and purges final ones past their
//! retention; a purge takes the same directory entry as a create, so an id
//! re-created meanwhile is left alone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use dashmap::mapref::entry::Entry;

use super::admission::TenantLimits;
use super::outcome::storage;
use super::session::{ActorStopped, SessionActor, SupervisorLink};
use super::shared::{release_slot, Shared};
use crate::model::{Session, SessionError};
use crate::persist::write_behind::purge_ops;
use crate::persist::{Durable, WriteOp};
use crate::telemetry::metrics::TenantHandles;

/// Admits a new session of the tenant of `limits`, or refuses it with 409
/// / 429; answers the durability of its first write. `client_chosen_id`:
/// the id may collide with a stored session (generated ids cannot).
pub(crate) fn admit(
    shared: &Arc<Shared>,
    limits: &TenantLimits,
    link: &Arc<SupervisorLink>,
    session: Session,
    client_chosen_id: bool,
) -> Result<Option<Durable>, SessionError> {
    // The id first, then the slot: a create of an id that is live answers
    // 409 even when the tenant is at its limit, and concurrent creates of
    // one id wait on the entry's lock for the first to be registered.
    let directory = shared.directory(limits.id);
    let Entry::Vacant(slot) = directory.entry(session.session_id.clone()) else {
        return Err(SessionError::AlreadyExists);
    };
    let max = limits.max_active_sessions;
    if link
        .live
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_err()
    {
        return Err(SessionError::TenantLimit { limit: max });
    }
    let shard = shared
        .ownership
        .as_ref()
        .map(|o| o.shard_of(limits.id, &session.session_id));
    let admit = || {
        let mut ops = Vec::new();
        // An id the store cannot hold (nearly every new one) is not read.
        if client_chosen_id
            && shared
                .store
                .may_hold_session(limits.id, &session.session_id)
        {
            if let Some(old) = shared
                .store
                .session(limits.id, &session.session_id)
                .map_err(storage)?
            {
                // A final session keeps its id for its retention; past it,
                // the old record goes (with its executions) in the same batch.
                if shared.retained(&old) {
                    return Err(SessionError::AlreadyExists);
                }
                ops = purge_ops(&shared.store, &old).map_err(storage)?;
            }
        }
        ops.extend(WriteOp::new_session(&session));
        // Before the write: the shipper fences the session's rows by it.
        if let (Some(ownership), Some(shard)) = (&shared.ownership, shard) {
            ownership.register(session.id, limits.id, session.session_id.clone(), shard);
        }
        let durable = shared.write_behind.submit(ops, shared.sync_acks);
        slot.insert(start(shared, limits.id, link, session, true));
        Ok(durable)
    };
    let admitted = match &shared.ownership {
        // A cluster node admits only while it holds the session's shard,
        // and the shard's tenure cannot end meanwhile (its end then stops
        // this session's actor too).
        Some(ownership) => {
            let shard = shard.unwrap_or_default();
            ownership
                .while_held(shard, None, true, admit)
                .unwrap_or(Err(SessionError::Unavailable))
        }
        None => admit(),
    };
    if admitted.is_err() {
        release_slot(&link.live);
    }
    admitted
}

/// Mailbox capacity of a restored actor: actix's default, as for every
/// other actor.
const MAILBOX: usize = 16;
/// Restored actors started by one task on their arbiter.
const RESTORE_BATCH: usize = 512;

/// Brings back live sessions read from disk (recovery): counted against the
/// limit but never refused (they were admitted before the restart), and
/// started on the arbiter their ids hash to. Called from the recovery loop
/// directly, so a million restores are not queued behind one supervisor.
///
/// Each session's address is made here and registered at once; the actors
/// themselves are started in batches, one task per [`RESTORE_BATCH`] on each
/// arbiter: starting each on its own woke the arbiter once per session (a
/// `write` to its eventfd), which was about a quarter of the recovery
/// loop's time.
/// A call that reaches an actor before its batch ran waits in its mailbox.
pub(crate) struct Restorer {
    shared: Arc<Shared>,
    /// Sessions waiting to be started, by shard.
    batches: Vec<Vec<Restored>>,
}

struct Restored {
    rx: actix::dev::channel::AddressReceiver<SessionActor>,
    session: Session,
    link: Arc<SupervisorLink>,
}

impl Restorer {
    pub(crate) fn new(shared: &Arc<Shared>) -> Self {
        Restorer {
            shared: shared.clone(),
            batches: (0..shared.shards.len()).map(|_| Vec::new()).collect(),
        }
    }

    /// Registers `session` of `tenant` and queues its actor's start.
    pub(crate) fn restore(
        &mut self,
        tenant: uuid::Uuid,
        link: &Arc<SupervisorLink>,
        session: Session,
    ) {
        link.live.fetch_add(1, Ordering::AcqRel);
        let shard = self.shared.shard_of(tenant, &session.session_id, false);
        let (tx, rx) = actix::dev::channel::channel(MAILBOX);
        self.shared
            .directory(tenant)
            .insert(session.session_id.clone(), Addr::new(tx));
        self.batches[shard].push(Restored {
            rx,
            session,
            link: link.clone(),
        });
        if self.batches[shard].len() >= RESTORE_BATCH {
            self.start(shard);
        }
    }

    fn start(&mut self, shard: usize) {
        let batch = std::mem::take(&mut self.batches[shard]);
        if batch.is_empty() {
            return;
        }
        self.shared.shards.arbiter(shard).spawn_fn(move || {
            for Restored { rx, session, link } in batch {
                let context = Context::with_receiver(rx);
                let actor = SessionActor::new(session, link);
                actix::spawn(context.into_future(actor));
            }
        });
    }

    /// Starts every actor still queued.
    pub(crate) fn finish(self) {
        drop(self);
    }
}

impl Drop for Restorer {
    /// Every registered address gets its actor, also when recovery stops
    /// midway (a shutdown aborts it): no directory entry is left without
    /// one, and the live count matches the entries.
    fn drop(&mut self) {
        for shard in 0..self.batches.len() {
            self.start(shard);
        }
    }
}

/// Starts an actor for `session` on its shard (the caller registers it);
/// `here`: on this thread's arbiter, if it is one (see [`Shared::shard_of`]).
fn start(
    shared: &Arc<Shared>,
    tenant: uuid::Uuid,
    link: &Arc<SupervisorLink>,
    session: Session,
    here: bool,
) -> Addr<SessionActor> {
    let arbiter = shared
        .shards
        .arbiter(shared.shard_of(tenant, &session.session_id, here));
    let link = link.clone();
    SessionActor::start_in_arbiter(arbiter, move |_| SessionActor::new(session, link))
}

/// The supervisor of one tenant's sessions.
pub struct TenantSupervisor {
    limits: TenantLimits,
    shared: Arc<Shared>,
    /// Live (non-final) sessions counted against the limit, shared with
    /// admission and the sessions.
    live: Arc<AtomicUsize>,
    /// How its actors reach this supervisor, shared by all of them: an
    /// `Addr` or `Recipient` clone allocates, an `Arc` clone does not (a
    /// saving per live session).
    me: Option<Arc<SupervisorLink>>,
    /// The tenant's metric handles, which its sessions record to.
    metrics: TenantHandles,
}

impl TenantSupervisor {
    /// A supervisor for the tenant with `limits`, counting its live
    /// sessions in `live`.
    pub(crate) fn new(
        limits: TenantLimits,
        shared: Arc<Shared>,
        live: Arc<AtomicUsize>,
        metrics: TenantHandles,
    ) -> Self {
        TenantSupervisor {
            limits,
            shared,
            live,
            me: None,
            metrics,
        }
    }

    /// Starts an actor for `session` on its shard and registers it.
    fn spawn(&mut self, session: Session, ctx: &mut Context<Self>) -> Addr<SessionActor> {
        let me = self
            .me
            .get_or_insert_with(|| {
                Arc::new(SupervisorLink {
                    shared: self.shared.clone(),
                    live: self.live.clone(),
                    stopped: ctx.address().recipient(),
                    metrics: self.metrics.clone(),
                })
            })
            .clone();
        let id = session.session_id.clone();
        // Restarts spread by id: this is the supervisor's
        // thread, not where the session's client is.
        let addr = start(&self.shared, self.limits.id, &me, session, false);
        self.shared
            .directory(self.limits.id)
            .insert(id, addr.clone());
        addr
    }
}

impl Actor for TenantSupervisor {
    type Context = Context<Self>;
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
                release_slot(&self.live);
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
                release_slot(&self.live);
            }
        }
    }
}

/// Deletes final sessions past their retention, with their index entries
/// and executions. Each id's directory entry is held from the check to the
/// queued purge, as a create holds it: an id re-created meanwhile is live
/// and left alone.
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
            // Held until the purge is queued: a create of the same id waits
            // for it (and then purges nothing the purge left), or went first
            // and is live here.
            let Entry::Vacant(_slot) = directory.entry(Arc::from(id.as_str())) else {
                continue;
            };
            let (row, ops) = match self.shared.store.session(self.limits.id, &id) {
                Ok(Some(old)) if old.status.is_final() && !self.shared.retained(&old) => {
                    (Some(old.id), purge_ops(&self.shared.store, &old))
                }
                Ok(_) => continue,
                Err(e) => (None, Err(e)),
            };
            match ops {
                Ok(ops) => {
                    self.shared.write_behind.submit(ops, false);
                    // A cluster node forgets its shard too: its changes
                    // shipped long ago (it ended a retention before).
                    if let (Some(ownership), Some(row)) = (&self.shared.ownership, row) {
                        ownership.forget(row);
                    }
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
        self.live.load(Ordering::Acquire)
    }
}
