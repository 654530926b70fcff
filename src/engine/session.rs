//! The session actor: one per live session, owning its whole state, its
//! expiry timer and its tool counters.
//!
//! Requests reach it straight from the tenant's directory (one hop). Every
//! change is handed to the write-behind queue; the reply carries a
//! [`Durable`] that the caller awaits under `durability = "sync"`, so the
//! actor never blocks on the disk and concurrent calls on one session share
//! a group commit.
//!
//! Expiry uses one deadline, on the arbiter's wheel (`super::deadlines`),
//! armed for the next deadline and re-armed lazily: activity only moves
//! deadlines later, so a heartbeat changes a timestamp and the deadline,
//! when it comes early, is re-armed for what is left. The only change that
//! moves a deadline earlier (`idle -> active`, which brings back the
//! idle-after deadline) re-arms at once.

use std::cell::RefCell;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix::WeakAddr;

use super::deadlines::{Tick, Wheel, TICK};
use super::outcome::durable_outcome;
use super::shared::{release_slot, Shared};
use crate::crypto::TokenHash;
use crate::model::session::{
    RefreshCheck, SessionUpdate, REASON_ADMIN_REQUEST, REASON_CLIENT_REQUEST, REASON_IDLE_TIMEOUT,
    REASON_REFRESH_TOKEN_REUSE,
};
use crate::model::{
    Millis, Requester, Session, SessionError, SessionView, Status, ToolExecution, Transition,
};
use crate::persist::{Durable, WriteOp};
use crate::telemetry::metrics::{self as telemetry, TenantHandles};

/// A reply together with the durability of the change it made.
#[derive(Debug)]
pub struct Ack<T> {
    /// The answer.
    pub value: T,
    /// Resolves when the change is on disk; `None` when nobody needs to wait.
    pub durable: Option<Durable>,
}

/// Timer slack: fire a hair after the deadline so `now >= deadline` holds.
const TIMER_SLACK: Duration = Duration::from_millis(1);
/// Wait before writing a final record again after the store failed.
const FINAL_WRITE_RETRY: Duration = Duration::from_secs(1);
/// How long the session record may lag its tool executions. Each execution
/// is written (and acknowledged) on its own, and reading a session replays
/// the executions past its record's count (counters, tool statistics, the
/// activity time and an idle session's return to active), so the record
/// only has to catch up eventually: writing it after every call would double
/// the write path's work for nothing a crash could lose.
const IMPLIED_STATE_DELAY: Duration = Duration::from_secs(1);

/// The actor owning one live session.
pub struct SessionActor {
    session: Session,
    /// The engine's and the tenant's parts this session uses.
    supervisor: Arc<SupervisorLink>,
    /// The wheel bucket that holds the deadline this session armed last
    /// (see `super::deadlines`).
    timer: Option<Tick>,
    /// When the scheduled coalesced write of the session record is due
    /// (`None`: none is scheduled).
    state_write_due: Option<Tick>,
    /// What only a session that opened a WebSocket needs, boxed: most
    /// sessions never do, and the 56 bytes it would take inline put the
    /// actor's task over a 128-byte step of its allocation (see
    /// [`Sockets`]).
    sockets: Option<Box<Sockets>>,
    /// Whether this session is counted in its tenant's idle sessions.
    counted_idle: bool,
    /// The session is being revoked (refresh-token reuse).
    revoking: bool,
    /// Stopping to be restarted from disk: a change of it was not written.
    rolling_back: bool,
    /// Who asked for its termination (whose audit row it is).
    requester: Requester,
}

/// What a session shares with its tenant: the live count it gives its slot
/// back to, the supervisor that restarts it, and the tenant's metric
/// handles; the session knows nothing else of them. It also carries the
/// engine's shared parts, so a session holds one pointer for both.
pub struct SupervisorLink {
    /// The engine's configuration, clock, store and directories.
    pub(crate) shared: Arc<Shared>,
    /// The tenant's live sessions counted against its limit; a session
    /// that becomes final gives its slot back here.
    pub live: Arc<std::sync::atomic::AtomicUsize>,
    /// Where [`ActorStopped`] goes.
    pub stopped: Recipient<ActorStopped>,
    /// The tenant's per-call metric handles.
    pub metrics: TenantHandles,
}

/// A session's actor stopped while its session was still live: it
/// panicked (actix stops an actor whose handler panicked), or the shards
/// are shutting down. Sent once, by the actor itself, from `stopped`.
/// The supervisor restarts it from its last durable state, so a panic costs
/// at most the changes that were not yet durable and never the session.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ActorStopped {
    /// The session's id.
    pub session_id: Arc<str>,
    /// It stopped on purpose, to be rolled back to its durable state.
    pub rolled_back: bool,
}

/// What a session pushes to its open WebSockets.
#[derive(Debug, Clone, PartialEq)]
pub enum Push {
    /// The session expires at `expires_at` unless there is activity.
    Expiring {
        /// When.
        expires_at: Millis,
        /// Seconds from now.
        seconds_left: u64,
    },
    /// The session became final.
    Ended {
        /// `expired` or `terminated`.
        status: Status,
        /// Its termination reason.
        reason: String,
        /// Ended by the engine for refresh-token reuse (not a client's
        /// choice of reason).
        revoked: bool,
    },
    /// The session token this socket was opened with was rotated away; the
    /// session stays live. The last push the socket gets.
    TokenRotated,
}

/// A session's WebSockets and its `session.expiring` notice.
///
/// Boxed apart from the actor. The actor is one tokio task whose cell tokio
/// aligns to 128 bytes, so its size counts in 128-byte steps: with these
/// fields inline the cell is 1,024 bytes, without them 896 (see
/// docs/benchmarks.md, "Issue 9, fifth step"). Created by the first
/// subscribe and kept: a client that reconnects finds its notice state.
#[derive(Default)]
struct Sockets {
    /// Open WebSockets of this session.
    subscribers: Vec<Subscriber>,
    /// The armed `session.expiring` timer and the expiry it is for.
    notice_timer: Option<(SpawnHandle, Millis)>,
    /// The expiry a `session.expiring` notice was already pushed for.
    noticed_for: Option<Millis>,
}

/// One open WebSocket: where its pushes go.
struct Subscriber {
    id: u64,
    tx: tokio::sync::mpsc::Sender<Push>,
    /// The session token it was opened with (none: an API key); a rotation
    /// away from it closes the socket.
    token: Option<TokenHash>,
}

impl SessionActor {
    /// A new actor for `session`.
    pub(crate) fn new(session: Session, supervisor: Arc<SupervisorLink>) -> Self {
        SessionActor {
            session,
            supervisor,
            timer: None,
            state_write_due: None,
            sockets: None,
            counted_idle: false,
            revoking: false,
            rolling_back: false,
            requester: Requester::Client,
        }
    }

    /// The engine's shared parts.
    fn shared(&self) -> &Arc<Shared> {
        &self.supervisor.shared
    }

    /// Keeps the tenant's idle count in step with this session's status.
    fn count_idle(&mut self) {
        let idle = self.session.status == Status::Idle;
        if idle != self.counted_idle {
            if let Some(count) = self.shared().idle.get(&self.session.tenant_id) {
                count.fetch_add(
                    if idle { 1 } else { -1 },
                    std::sync::atomic::Ordering::Relaxed,
                );
            }
            self.counted_idle = idle;
        }
    }

    /// Sends `push` to every subscriber. One whose queue is full is dropped
    /// (its receiver closes and its WebSocket is closed with a reason):
    /// a slow client never makes the actor buffer without limit.
    fn push(&mut self, push: &Push) {
        let Some(sockets) = self.sockets.as_mut() else {
            return;
        };
        sockets
            .subscribers
            .retain(|s| match s.tx.try_send(push.clone()) {
                Ok(()) => true,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    tracing::warn!(
                        subscriber = s.id,
                        "websocket send queue full: connection dropped"
                    );
                    false
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    /// After a rotation away from `old`: every socket opened with it hears
    /// [`Push::TokenRotated`] and is let go, except `kept` (the socket whose
    /// own `session.refresh` rotated: it proved the refresh token and holds
    /// the new pair), which is counted as opened with `new` from now on.
    fn close_rotated(&mut self, old: &TokenHash, new: TokenHash, kept: Option<u64>) {
        let Some(sockets) = self.sockets.as_mut() else {
            return;
        };
        sockets.subscribers.retain_mut(|s| {
            if !s.token.is_some_and(|t| t.matches(old)) {
                return true;
            }
            if Some(s.id) == kept {
                s.token = Some(new);
                return true;
            }
            let _ = s.tx.try_send(Push::TokenRotated);
            false
        });
    }

    /// Whether a WebSocket of this session is open (one whose connection
    /// ended is forgotten here).
    fn socket_open(&mut self) -> bool {
        let Some(sockets) = self.sockets.as_mut() else {
            return false;
        };
        sockets.subscribers.retain(|s| !s.tx.is_closed());
        !sockets.subscribers.is_empty()
    }

    /// Arms the `session.expiring` notice for the current expiry, when a
    /// WebSocket listens and none was pushed for it yet. With a socket open
    /// the session cannot idle out (see [`Self::on_deadline`]), so the
    /// expiry it is warned of is its absolute ttl.
    fn arm_notice(&mut self, ctx: &mut Context<Self>) {
        let Some(sockets) = self.sockets.as_mut() else {
            return;
        };
        if sockets.subscribers.is_empty() || self.session.status.is_final() {
            return;
        }
        let expires_at = self.session.ttl_deadline();
        if sockets.noticed_for == Some(expires_at) {
            return;
        }
        if let Some((handle, armed_for)) = sockets.notice_timer {
            if armed_for == expires_at {
                return;
            }
            ctx.cancel_future(handle);
            sockets.notice_timer = None;
        }
        // Not `self.shared()`: `sockets` borrows `self` mutably here.
        let now = self.supervisor.shared.clock.now();
        let notice_at = expires_at - self.supervisor.shared.expiring_notice_ms;
        if notice_at <= now {
            sockets.noticed_for = Some(expires_at);
            let seconds_left = ((expires_at - now).max(0) / 1000) as u64;
            self.push(&Push::Expiring {
                expires_at,
                seconds_left,
            });
            return;
        }
        let handle = ctx.run_later(
            Duration::from_millis((notice_at - now) as u64),
            |actor, ctx| {
                if let Some(sockets) = actor.sockets.as_mut() {
                    sockets.notice_timer = None;
                }
                actor.arm_notice(ctx);
            },
        );
        sockets.notice_timer = Some((handle, expires_at));
    }

    /// Arms the timer for the next deadline unless it is armed for an
    /// earlier one already.
    fn arm(&mut self, ctx: &mut Context<Self>) {
        self.count_idle();
        if self.session.status.is_final() {
            return;
        }
        let deadline = self.session.next_deadline(self.shared().idle_after_ms);
        let delay = Duration::from_millis((deadline - self.shared().clock.now()).max(0) as u64)
            + TIMER_SLACK;
        let due = Instant::now() + delay;
        let bucket = Tick::of(due);
        if self.timer.is_some_and(|armed| armed <= bucket) {
            return;
        }
        // A later entry already on the wheel stays there and is ignored
        // when it comes (see `Handler<Deadline>`).
        arm_deadline(ctx.address().downgrade(), due);
        self.timer = Some(bucket);
        self.arm_notice(ctx);
    }

    /// Applies whatever is due at `now`; returns whether the session expired.
    /// An open WebSocket is activity: while one is open the session neither
    /// becomes idle nor idles out, even when its client sends nothing (the
    /// absolute ttl still ends it).
    fn on_deadline(&mut self, now: Millis, ctx: &mut Context<Self>) -> bool {
        let due = self.session.due(now, self.shared().idle_after_ms);
        let idling = matches!(
            due,
            Transition::BecomeIdle | Transition::Expire(REASON_IDLE_TIMEOUT)
        );
        if idling && self.session.ttl_deadline() > now && self.socket_open() {
            self.note_activity(now, ctx);
            return false;
        }
        match due {
            Transition::Expire(reason) => {
                let at = self.session.expires_at();
                let durable = self.finish(Status::Expired, reason, at);
                tracing::info!(session_id = %self.session.session_id, tenant = %self.session.tenant_id, reason, "session expired");
                self.stop_when_durable(durable, ctx);
                true
            }
            Transition::BecomeIdle => {
                self.session.become_idle();
                self.persist(false);
                self.arm(ctx);
                false
            }
            Transition::None => {
                self.arm(ctx);
                false
            }
        }
    }

    /// Expires the session now if it is overdue and its timer has not fired
    /// yet (timer slack, a busy mailbox, a jump of the clock): no call may
    /// act on a session past its `expires_at`.
    fn expire_if_overdue(&mut self, now: Millis, ctx: &mut Context<Self>) {
        if matches!(
            self.session.due(now, self.shared().idle_after_ms),
            Transition::Expire(_)
        ) {
            self.on_deadline(now, ctx);
        }
    }

    /// The current time, or the 410 error when the session has ended.
    fn live(&mut self, ctx: &mut Context<Self>) -> Result<Millis, SessionError> {
        let now = self.shared().clock.now();
        self.expire_if_overdue(now, ctx);
        self.session.ensure_live()?;
        Ok(now)
    }

    /// Queues the full state; returns a [`Durable`] when `wait` is set.
    fn persist(&self, wait: bool) -> Option<Durable> {
        self.shared()
            .write_behind
            .submit(vec![WriteOp::put_session(&self.session)], wait)
    }

    /// Whether callers wait for disk under the configured durability.
    fn sync(&self) -> bool {
        self.shared().sync_acks
    }

    /// Records activity; the timestamp reaches disk coalesced, within one
    /// flush interval, without anyone waiting for it.
    fn note_activity(&mut self, now: Millis, ctx: &mut Context<Self>) {
        let version = self.session.version;
        self.session.touch(now);
        self.arm(ctx);
        if self.session.version != version {
            // idle -> active is a state change, not just a timestamp: it is
            // written now rather than coalesced.
            self.persist(false);
        } else {
            self.schedule_state_write(ctx, self.shared().flush_interval);
        }
    }

    /// Writes the session record, coalesced, within `delay`: an earlier
    /// scheduled write stands, a later one is brought forward.
    fn schedule_state_write(&mut self, ctx: &mut Context<Self>, delay: Duration) {
        let due = Tick::of(Instant::now() + delay);
        if self
            .state_write_due
            .is_some_and(|scheduled| scheduled <= due)
        {
            return;
        }
        self.state_write_due = Some(due);
        // A timer superseded by this one finds the write done (or a later
        // one scheduled, which it then writes early: harmless).
        ctx.run_later(delay, |actor, _| actor.write_state());
    }

    fn write_state(&mut self) {
        if self.state_write_due.take().is_some() && !self.session.status.is_final() {
            self.persist(false);
        }
    }

    /// Makes the session final, frees its tenant slot and queues the final
    /// record (always waited for: the actor leaves the directory only once
    /// its final state is readable from disk).
    fn finish(&mut self, status: Status, reason: &str, at: Millis) -> Durable {
        self.session.finish(status, reason, at);
        // Every open WebSocket hears it at once, then its channel closes.
        self.push(&Push::Ended {
            status,
            reason: reason.to_owned(),
            revoked: self.revoking,
        });
        if let Some(sockets) = self.sockets.as_mut() {
            sockets.subscribers.clear();
        }
        self.count_idle();
        let tenant = self.session.tenant_id.to_string();
        metrics::histogram!(
            telemetry::SESSION_DURATION,
            "tenant_id" => tenant.clone(),
            "client_type" => self.session.client_type.as_str()
        )
        .record((at - self.session.created_at).max(0) as f64 / 1000.0);
        metrics::counter!(
            telemetry::SESSIONS_ENDED,
            "tenant_id" => tenant,
            "status" => status.as_str()
        )
        .increment(1);
        release_slot(&self.supervisor.live);
        self.write_final()
    }

    fn write_final(&self) -> Durable {
        self.shared()
            .write_behind
            .submit_durable(WriteOp::final_session_by(&self.session, self.requester))
    }

    fn stop_when_durable(&mut self, durable: Durable, ctx: &mut Context<Self>) {
        self.timer = None;
        ctx.wait(durable.into_actor(self).map(|result, actor, ctx| {
            if matches!(result, Ok(Ok(()))) {
                ctx.stop();
            } else {
                actor.retry_final_write(ctx);
            }
        }));
    }

    /// The final record did not reach the disk: stay in the directory (the
    /// final state is served from memory) and write it again later; leaving
    /// now would make the stale live record on disk the truth.
    fn retry_final_write(&mut self, ctx: &mut Context<Self>) {
        tracing::error!(
            session_id = %self.session.session_id,
            retry_in_ms = FINAL_WRITE_RETRY.as_millis() as u64,
            "final session record was not written; retrying"
        );
        ctx.run_later(FINAL_WRITE_RETRY, |actor, ctx| {
            let durable = actor.write_final();
            actor.stop_when_durable(durable, ctx);
        });
    }
}

impl Actor for SessionActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        // Counted on the arbiter it runs on.
        let shard = self
            .shared()
            .shard_of(self.session.tenant_id, &self.session.session_id, true);
        self.shared().shards.count_actor(shard, 1);
        // Registration in the directory happens at admission, before the
        // create is answered, so a GET right after a 201 finds the session.
        self.arm(ctx);
    }

    fn stopped(&mut self, ctx: &mut Context<Self>) {
        // The engine is stopping (its shards stop every actor): a pending
        // coalesced record goes to the queue now, which the engine flushes
        // once every actor has stopped. One write per actor that has one,
        // instead of a message to every actor. Not for an actor stopped to
        // roll back: its state holds a change that was not written.
        if !self.rolling_back
            && self
                .shared()
                .shutting_down
                .load(std::sync::atomic::Ordering::Acquire)
        {
            self.write_state();
        }
        if self.counted_idle {
            if let Some(count) = self.shared().idle.get(&self.session.tenant_id) {
                count.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.counted_idle = false;
        }
        let shard = self
            .shared()
            .shard_of(self.session.tenant_id, &self.session.session_id, true);
        self.shared().shards.count_actor(shard, -1);
        let me = ctx.address();
        let directory = self.shared().directory(self.session.tenant_id);
        if self.session.status.is_final() {
            directory.remove_if(&*self.session.session_id, |_, addr| *addr == me);
        } else if directory
            .get(&*self.session.session_id)
            .is_none_or(|addr| *addr != me)
        {
            // Evicted (its cluster shard went to another node): its entry
            // was taken out first; it gives its slot back, and nobody
            // restarts it here.
            super::shared::release_slot(&self.supervisor.live);
        } else {
            // Not a normal end: a handler panicked (or the engine is
            // stopping, which the supervisor ignores). The entry stays, now
            // disconnected, so the id cannot be taken by a create until the
            // supervisor has restarted the session or given it up.
            self.supervisor.stopped.do_send(ActorStopped {
                session_id: self.session.session_id.clone(),
                rolled_back: self.rolling_back,
            });
        }
    }
}

/// Reads the session resource.
#[derive(Message)]
#[rtype(result = "SessionView")]
pub struct Get;

impl Handler<Get> for SessionActor {
    type Result = MessageResult<Get>;

    fn handle(&mut self, _: Get, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.shared().clock.now();
        self.expire_if_overdue(now, ctx);
        MessageResult(self.session.view(now))
    }
}

/// Copies the whole state (lists, tenant metrics, per-session metrics).
#[derive(Message)]
#[rtype(result = "Session")]
pub struct Snapshot;

impl Handler<Snapshot> for SessionActor {
    type Result = MessageResult<Snapshot>;

    fn handle(&mut self, _: Snapshot, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.shared().clock.now();
        self.expire_if_overdue(now, ctx);
        MessageResult(self.session.clone())
    }
}

/// A heartbeat: activity, acknowledged from memory.
#[derive(Message)]
#[rtype(result = "Result<(), SessionError>")]
pub struct Touch;

impl Handler<Touch> for SessionActor {
    type Result = Result<(), SessionError>;

    fn handle(&mut self, _: Touch, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.live(ctx)?;
        self.note_activity(now, ctx);
        Ok(())
    }
}

/// Writes a pending coalesced session record now (before a backup, or a
/// barrier that must cover it; at shutdown `stopped` does it instead).
#[derive(Message)]
#[rtype(result = "()")]
pub struct FlushActivity;

impl Handler<FlushActivity> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: FlushActivity, _: &mut Context<Self>) {
        self.write_state();
    }
}

/// A PATCH, optionally conditional on the current version.
#[derive(Message)]
#[rtype(result = "Result<Ack<SessionView>, SessionError>")]
pub struct Update {
    /// The fields to change.
    pub update: SessionUpdate,
    /// `If-Match` version, when given.
    pub if_match: Option<u64>,
}

impl Handler<Update> for SessionActor {
    type Result = Result<Ack<SessionView>, SessionError>;

    fn handle(&mut self, msg: Update, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.live(ctx)?;
        if let Some(expected) = msg.if_match {
            if expected != self.session.version {
                return Err(SessionError::VersionMismatch {
                    current: self.session.version,
                });
            }
        }
        self.session.apply_update(msg.update, now)?;
        self.arm(ctx);
        let durable = self.persist(self.sync());
        Ok(Ack {
            value: self.session.view(now),
            durable,
        })
    }
}

/// Restarts the session's lifetime; with a refresh token, also rotates the
/// token pair (or revokes the session when the token was rotated away).
#[derive(Message)]
#[rtype(result = "Result<Ack<SessionView>, SessionError>")]
pub struct Refresh {
    /// The presented refresh token's hash, and the new pair's hashes.
    pub rotate: Option<(TokenHash, (TokenHash, TokenHash))>,
    /// The WebSocket subscription that asks, if one does: it stays open
    /// through the rotation.
    pub by: Option<u64>,
}

impl Handler<Refresh> for SessionActor {
    type Result = Result<Ack<SessionView>, SessionError>;

    fn handle(&mut self, msg: Refresh, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.live(ctx)?;
        let rotating = msg.rotate.is_some();
        if let Some((presented, (session_token, refresh_token))) = msg.rotate {
            match self.session.credentials.check_refresh(&presented) {
                RefreshCheck::Current => {
                    let old = self.session.credentials.session_token;
                    self.session
                        .credentials
                        .rotate(session_token, refresh_token);
                    self.close_rotated(&old, session_token, msg.by);
                }
                RefreshCheck::Reused => {
                    // The pair leaked: whoever holds it loses the session.
                    self.revoking = true;
                    let durable = self.finish(Status::Terminated, REASON_REFRESH_TOKEN_REUSE, now);
                    tracing::warn!(session_id = %self.session.session_id, tenant = %self.session.tenant_id, "refresh token reuse: session revoked");
                    self.stop_when_durable(durable, ctx);
                    return Err(SessionError::RefreshTokenReused);
                }
                RefreshCheck::Unknown => return Err(SessionError::InvalidRefreshToken),
            }
        }
        self.session.refresh(now);
        self.arm(ctx);
        // New tokens are handed out only once they are on disk, whatever the
        // durability mode: after a crash the old pair must not be the valid one.
        let durable = self.persist(self.sync() || rotating);
        Ok(Ack {
            value: self.session.view(now),
            durable,
        })
    }
}

/// Opens a push channel (a WebSocket of this session).
#[derive(Message)]
#[rtype(result = "Result<SessionView, SessionError>")]
pub struct Subscribe {
    /// The subscription's id.
    pub id: u64,
    /// Where pushes go.
    pub tx: tokio::sync::mpsc::Sender<Push>,
    /// The session token the socket was opened with (none: an API key).
    pub token: Option<TokenHash>,
    /// Open sockets the session may have, this one included.
    pub max: usize,
}

impl Handler<Subscribe> for SessionActor {
    type Result = Result<SessionView, SessionError>;

    fn handle(&mut self, msg: Subscribe, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.live(ctx)?;
        // The token was checked before this message; a rotation may have
        // come in between, and a socket of a rotated-away token is not
        // opened (it would never hear the rotation).
        if msg
            .token
            .is_some_and(|t| !self.session.credentials.session_token.matches(&t))
        {
            return Err(SessionError::TokenMismatch);
        }
        self.socket_open();
        let sockets = self.sockets.get_or_insert_with(Box::default);
        if sockets.subscribers.len() >= msg.max {
            return Err(SessionError::TooManyConnections { limit: msg.max });
        }
        // A client connecting inside the notice window hears it at once
        // (its socket holds off idling: the ttl is what ends the session).
        let expires_at = self.session.ttl_deadline();
        // Not `self.shared()`: `sockets` borrows `self` mutably here.
        if expires_at - self.supervisor.shared.expiring_notice_ms <= now {
            let _ = msg.tx.try_send(Push::Expiring {
                expires_at,
                seconds_left: ((expires_at - now).max(0) / 1000) as u64,
            });
            if sockets.subscribers.is_empty() {
                sockets.noticed_for = Some(expires_at);
            }
        }
        sockets.subscribers.push(Subscriber {
            id: msg.id,
            tx: msg.tx,
            token: msg.token,
        });
        self.arm_notice(ctx);
        Ok(self.session.view(now))
    }
}

/// A deadline a session put on its arbiter's wheel came (see
/// `super::deadlines`).
///
/// It does not say which: an entry is only the session's weak address (8
/// bytes per session). The session acts when the deadline it is armed for
/// is due within a tick on the monotonic clock the wheel runs on; an entry
/// left behind by a re-arm for an earlier deadline finds a deadline further
/// off and is ignored, since that deadline has its own entry. Acting means
/// asking the wall clock what is due: a deadline that the wall clock does
/// not see due yet (it was stepped back, or drifted) is armed again for
/// what is left, so no step of the wall clock can lose a deadline.
#[derive(Message)]
#[rtype(result = "()")]
struct Deadline;

impl Handler<Deadline> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: Deadline, ctx: &mut Context<Self>) {
        if self
            .timer
            .is_none_or(|due| due > Tick::of(Instant::now() + TICK))
        {
            return;
        }
        self.timer = None;
        let now = self.shared().clock.now();
        self.on_deadline(now, ctx);
    }
}

/// An arbiter's session deadlines: each session's weak address.
type DeadlineWheel = RefCell<Wheel<WeakAddr<SessionActor>>>;

thread_local! {
    /// This arbiter's wheel of session deadlines, held by its ticker task
    /// (the wheel goes with the runtime that ran the task; the next
    /// deadline armed on the thread starts a new one).
    static DEADLINES: RefCell<Weak<DeadlineWheel>> =
        const { RefCell::new(Weak::new()) };
}

/// Puts a session's deadline on this arbiter's wheel, due at `at`.
fn arm_deadline(session: WeakAddr<SessionActor>, at: Instant) {
    DEADLINES.with(|current| {
        // Its own statement: the shared borrow ends before the one below.
        let running = current.borrow().upgrade();
        let wheel = running.unwrap_or_else(|| {
            let wheel = Rc::new(RefCell::new(Wheel::default()));
            *current.borrow_mut() = Rc::downgrade(&wheel);
            actix::spawn(tick_deadlines(Rc::clone(&wheel)));
            wheel
        });
        wheel.borrow_mut().insert_once(at, session);
    });
}

/// Every [`TICK`], tells the sessions whose deadlines are due.
async fn tick_deadlines(wheel: Rc<DeadlineWheel>) {
    let mut ticks = tokio::time::interval(TICK);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let due: Vec<_> = wheel.borrow_mut().take_due(Instant::now()).collect();
        for session in due {
            if let Some(session) = session.upgrade() {
                session.do_send(Deadline);
            }
        }
    }
}

/// Closes a push channel.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe(pub u64);

impl Handler<Unsubscribe> for SessionActor {
    type Result = ();

    fn handle(&mut self, Unsubscribe(id): Unsubscribe, _: &mut Context<Self>) {
        if let Some(sockets) = self.sockets.as_mut() {
            sockets.subscribers.retain(|s| s.id != id);
        }
    }
}

/// Whether a session token is this session's (final sessions included).
#[derive(Message)]
#[rtype(result = "bool")]
pub struct VerifyToken(pub TokenHash);

impl Handler<VerifyToken> for SessionActor {
    type Result = bool;

    fn handle(&mut self, VerifyToken(hash): VerifyToken, _: &mut Context<Self>) -> bool {
        self.session.credentials.session_token.matches(&hash)
    }
}

/// What a presented refresh token is to this session (nothing changes).
#[derive(Message)]
#[rtype(result = "RefreshCheck")]
pub struct CheckRefresh(pub TokenHash);

impl Handler<CheckRefresh> for SessionActor {
    type Result = MessageResult<CheckRefresh>;

    fn handle(&mut self, CheckRefresh(hash): CheckRefresh, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.session.credentials.check_refresh(&hash))
    }
}

/// The sealed passthrough credentials of a live session, with its row id
/// (part of what they are bound to).
#[derive(Message)]
#[rtype(result = "Result<(uuid::Uuid, Option<Box<[u8]>>), SessionError>")]
pub struct SealedPassthrough;

impl Handler<SealedPassthrough> for SessionActor {
    type Result = Result<(uuid::Uuid, Option<Box<[u8]>>), SessionError>;

    fn handle(&mut self, _: SealedPassthrough, ctx: &mut Context<Self>) -> Self::Result {
        self.live(ctx)?;
        Ok((
            self.session.id,
            self.session.credentials.passthrough.clone(),
        ))
    }
}

/// Checks that the session is live; not activity.
#[derive(Message)]
#[rtype(result = "Result<SessionView, SessionError>")]
pub struct Validate;

impl Handler<Validate> for SessionActor {
    type Result = Result<SessionView, SessionError>;

    fn handle(&mut self, _: Validate, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.live(ctx)?;
        Ok(self.session.view(now))
    }
}

/// Records one tool execution (also activity).
#[derive(Message)]
#[rtype(result = "Result<Ack<u64>, SessionError>")]
pub struct RecordTool(pub ToolExecution);

impl Handler<RecordTool> for SessionActor {
    type Result = Result<Ack<u64>, SessionError>;

    fn handle(
        &mut self,
        RecordTool(mut execution): RecordTool,
        ctx: &mut Context<Self>,
    ) -> Self::Result {
        let now = self.live(ctx)?;
        execution.recorded_at = now;
        if execution.error.is_some() {
            self.supervisor.metrics.tool_errors.increment(1);
        }
        self.supervisor.metrics.tool_executions.increment(1);
        crate::telemetry::live::tool_executed(&execution.tool_name);
        self.session.record_execution(&execution, now);
        self.arm(ctx);
        // Only the execution is written now (and waited for under sync); the
        // session record, whose counters it implies, is written coalesced.
        // Reading a session from disk replays executions past its record's
        // count, so an acknowledged execution is never lost from the counts.
        let seq = self.session.tool_execution_count;
        let op = WriteOp::put_execution(self.session.id, seq, &execution);
        let durable = self.shared().write_behind.submit(vec![op], self.sync());
        self.schedule_state_write(ctx, IMPLIED_STATE_DELAY);
        Ok(Ack {
            value: seq,
            durable,
        })
    }
}

/// Ends the session (DELETE, or an admin). Idempotent on a final session.
/// Answers once the final state is on disk.
#[derive(Message)]
#[rtype(result = "Result<(), SessionError>")]
pub struct Terminate {
    /// Why; `client_request` (`admin_request` for an operator) when `None`.
    pub reason: Option<String>,
    /// Who asks.
    pub requester: Requester,
}

impl Handler<Terminate> for SessionActor {
    type Result = ResponseActFuture<Self, Result<(), SessionError>>;

    fn handle(&mut self, msg: Terminate, ctx: &mut Context<Self>) -> Self::Result {
        let now = self.shared().clock.now();
        // An overdue session has already ended by expiry; DELETE on a final
        // session is a no-op.
        self.expire_if_overdue(now, ctx);
        if self.session.status.is_final() {
            return Box::pin(actix::fut::ready(Ok(())));
        }
        let reason = msg.reason.as_deref().unwrap_or(match msg.requester {
            Requester::Client => REASON_CLIENT_REQUEST,
            Requester::Admin => REASON_ADMIN_REQUEST,
        });
        self.requester = msg.requester;
        let durable = self.finish(Status::Terminated, reason, now);
        let by = match msg.requester {
            Requester::Client => "client",
            Requester::Admin => "admin",
        };
        tracing::info!(session_id = %self.session.session_id, tenant = %self.session.tenant_id, reason, by, "session terminated");
        self.timer = None;
        Box::pin(durable.into_actor(self).map(|written, actor, ctx| {
            let outcome = durable_outcome(written);
            if outcome.is_ok() {
                ctx.stop();
            } else {
                actor.retry_final_write(ctx);
            }
            outcome
        }))
    }
}

/// Expires the session if it is overdue (cleanup endpoint, and the sweep
/// after the wall clock jumped). Answers whether it expired now.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct ExpireIfDue {
    /// The wall clock jumped: timers armed before it fire at the wrong
    /// time, so a session that is not due yet arms its timers again.
    pub rearm: bool,
}

impl Handler<ExpireIfDue> for SessionActor {
    type Result = bool;

    fn handle(&mut self, msg: ExpireIfDue, ctx: &mut Context<Self>) -> bool {
        if msg.rearm {
            // Whatever is due now, the timers armed before the jump go: every
            // path below arms afresh (`arm` keeps an earlier timer).
            self.timer = None;
            if let Some((handle, _)) = self.sockets.as_mut().and_then(|s| s.notice_timer.take()) {
                ctx.cancel_future(handle);
            }
        }
        let now = self.shared().clock.now();
        match self.session.due(now, self.shared().idle_after_ms) {
            // Nothing due is the common case: the timer stays as it is,
            // unless the clock it was armed by moved.
            Transition::None => {
                if msg.rearm {
                    self.arm(ctx);
                }
                false
            }
            Transition::BecomeIdle | Transition::Expire(_) => self.on_deadline(now, ctx),
        }
    }
}

/// A change of this session could not be written (the disk refused it):
/// the actor stops, and its supervisor starts it again from what is on
/// disk, so nothing of the change stays visible. A session that never
/// reached the disk (a failed create) is gone with it.
/// Answers whether the actor is stopping for it.
#[derive(Message)]
#[rtype(result = "bool")]
pub struct RollBack;

impl Handler<RollBack> for SessionActor {
    type Result = bool;

    fn handle(&mut self, _: RollBack, ctx: &mut Context<Self>) -> bool {
        // A final session's end is kept and written again later (see
        // `retry_final_write`): only live state is rolled back.
        if self.session.status.is_final() {
            return false;
        }
        self.rolling_back = true;
        ctx.stop();
        true
    }
}

/// Stops the actor without a write: its session is served elsewhere now
/// (a cluster node handed its shard over or lost it). The caller takes
/// its directory entry out first, which tells `stopped` not to have it
/// restarted.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Evict;

impl Handler<Evict> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: Evict, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// Panics inside the actor (tests of supervision only).
#[cfg(test)]
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;

#[cfg(test)]
impl Handler<Crash> for SessionActor {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Context<Self>) {
        panic!("injected panic for a supervision test");
    }
}

/// A session's actor runs as one tokio task. Its cell (tokio 1.x,
/// `runtime/task/core.rs`) is the header (32 bytes), the scheduler and the
/// task id (16), the future inside a `#[repr(C)]` enum whose tag takes 8
/// more, and the trailer (48), aligned to 128 bytes. With the actor's
/// future at 664 bytes or less the cell takes 768 bytes; one byte more
/// makes it 896, 128 bytes more for every live session (see
/// `docs/benchmarks.md`, issue 9's sixth step).
#[cfg(test)]
#[test]
fn a_session_actor_task_fits_a_768_byte_cell() {
    type Task = actix::dev::ContextFut<SessionActor, Context<SessionActor>>;
    let future = std::mem::size_of::<Task>();
    let cell = (32 + 16 + 8 + future + 48).next_multiple_of(128);
    assert!(
        cell <= 768,
        "the session actor's future is {future} bytes, so its task cell is {cell}"
    );
}
