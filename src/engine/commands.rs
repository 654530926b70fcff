//! The calls that change a session: create, update, refresh, tool
//! executions, heartbeats, terminate, and WebSocket subscriptions.

use std::sync::atomic::Ordering;

use uuid::Uuid;

use super::admission::{self, NewSession};
use super::handle::Engine;
use super::outcome::settle;
use super::session::{self};
use super::tenant;
use crate::crypto::{Secret, SessionTokens, TokenHash};
use crate::model::session::SessionUpdate;
use crate::model::{Requester, SessionError, SessionView, ToolExecution};

impl Engine {
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
        // A cluster node admits only sessions of shards it serves (see
        // `tenant::admit`); one without an id gets an id of such a shard.
        if let (Some(ownership), None) = (&self.shared.ownership, &request.session_id) {
            request.session_id = Some(ownership.pick_session_id(tenant));
        }
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
        // On a cluster node the tenant's limit holds across the cluster.
        let taken = self
            .take_quota(tenant, handle.limits.max_active_sessions)
            .await?;
        let durable = match tenant::admit(
            &self.shared,
            &handle.limits,
            &handle.link,
            session,
            client_chosen_id,
        ) {
            Ok(durable) => durable,
            Err(e) => {
                if let (Some(quota), Some(taken)) = (&self.cluster_quota, taken) {
                    quota.settled(taken, false);
                }
                return Err(e);
            }
        };
        let settled = settle(durable).await;
        if let Some(taken) = taken {
            self.settle_quota(taken, &settled);
        }
        if let Err(e) = settled {
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

    /// Opens a push channel from a live session's actor (a WebSocket opened
    /// with session token `token`, or with an API key when none): answers
    /// the session, the subscription's id, and the receiver of pushes, of
    /// at most `capacity` pending (a subscriber that falls further behind is
    /// dropped, which closes its receiver). A session with `max` open
    /// channels already refuses another (`TooManyConnections`).
    pub async fn subscribe(
        &self,
        tenant: Uuid,
        session_id: &str,
        capacity: usize,
        token: Option<TokenHash>,
        max: usize,
    ) -> Result<(SessionView, u64, tokio::sync::mpsc::Receiver<session::Push>), SessionError> {
        let id = self.shared.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        let subscribe = session::Subscribe { id, tx, token, max };
        let view = self.ask_live(tenant, session_id, subscribe).await?;
        Ok((view, id, rx))
    }

    /// Closes a push channel.
    pub async fn unsubscribe(&self, tenant: Uuid, session_id: &str, id: u64) {
        let _ = self.ask(tenant, session_id, session::Unsubscribe(id)).await;
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
    /// for a token rotated away before, revokes the session. A rotation
    /// closes the WebSockets opened with the old session token, except
    /// subscription `by` (the socket that asks, if one does).
    pub async fn refresh(
        &self,
        tenant: Uuid,
        session_id: &str,
        refresh_token: Option<&Secret>,
        by: Option<u64>,
    ) -> Result<(SessionView, Option<SessionTokens>), SessionError> {
        self.ensure_writable()?;
        let fresh = refresh_token.map(|_| SessionTokens::generate(tenant));
        let rotate = refresh_token
            .zip(fresh.as_ref())
            .map(|(presented, fresh)| (TokenHash::of(presented.expose()), fresh.hashes()));
        let ack = self
            .ask(tenant, session_id, session::Refresh { rotate, by })
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

    /// A heartbeat.
    pub async fn touch(&self, tenant: Uuid, session_id: &str) -> Result<(), SessionError> {
        self.ensure_writable()?;
        self.ask_live(tenant, session_id, session::Touch).await
    }

    /// Ends a session at the request of `requester` (whose audit row it
    /// is); a final one is left as it is. A given `reason` must pass
    /// [`super::admission::check_reason`] (400 `validation_failed`).
    pub async fn terminate(
        &self,
        tenant: Uuid,
        session_id: &str,
        reason: Option<String>,
        requester: Requester,
    ) -> Result<(), SessionError> {
        // The one reason rule (length, no control or format characters,
        // not one of the engine's own reasons) for every caller: REST,
        // WebSocket and admin calls all end up here.
        if let Some(reason) = &reason {
            super::admission::check_reason(reason)?;
        }
        self.ensure_writable()?;
        match self
            .ask(tenant, session_id, session::Terminate { reason, requester })
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
}
