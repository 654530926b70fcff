//! The calls that read a session: the view, token checks, passthrough
//! credentials, executions and metrics, validation.

use uuid::Uuid;

use super::handle::Engine;
use super::outcome::storage;
use super::session::{self};
use super::tenant::LiveCount;
use crate::crypto::{Secret, TokenHash};
use crate::model::session::SessionMetrics;
use crate::model::{Session, SessionError, SessionView, ToolExecution};

impl Engine {
    /// What the refresh token `token` is to live session `session_id`
    /// (current, rotated away, or not its), changing nothing.
    pub async fn check_refresh(
        &self,
        tenant: Uuid,
        session_id: &str,
        token: &TokenHash,
    ) -> Result<crate::model::session::RefreshCheck, SessionError> {
        self.ask(tenant, session_id, session::CheckRefresh(*token))
            .await?
            .ok_or(SessionError::NotFound)
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
    pub(super) async fn snapshot(
        &self,
        tenant: Uuid,
        session_id: &str,
    ) -> Result<Option<Session>, SessionError> {
        if let Some(session) = self.ask(tenant, session_id, session::Snapshot).await? {
            return Ok(Some(session));
        }
        self.stored(tenant, session_id)
    }

    /// Checks that a session is live.
    pub async fn validate(
        &self,
        tenant: Uuid,
        session_id: &str,
    ) -> Result<SessionView, SessionError> {
        self.ask_live(tenant, session_id, session::Validate).await
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
}
