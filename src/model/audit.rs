//! Audit entries: who did what to a session, and why. They are shipped to
//! PostgreSQL (`mcp.session_audit_log`); the engine itself does not read them.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::session::{Session, Status, REASON_REFRESH_TOKEN_REUSE};
use super::time::Millis;

/// What happened to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuditAction {
    /// Admitted.
    Created,
    /// Ended by a client (DELETE, or the WebSocket's `session.terminate`).
    Terminated,
    /// Ended by its idle timeout or ttl.
    Expired,
    /// Ended by the engine because a rotated-away refresh token was presented.
    Revoked,
    /// Ended by an operator through the admin API.
    TerminatedByAdmin,
}

/// Who asked for a termination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Requester {
    /// The session's client: its tenant's key or its own token.
    #[default]
    Client,
    /// An operator, through the admin API.
    Admin,
}

impl AuditAction {
    /// The name stored in `mcp.session_audit_log.action`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Created => "created",
            AuditAction::Terminated | AuditAction::TerminatedByAdmin => "terminated",
            AuditAction::Expired => "expired",
            AuditAction::Revoked => "revoked",
        }
    }

    /// Who acts: clients create and terminate, operators terminate, the
    /// engine expires and revokes.
    pub fn actor(self) -> &'static str {
        match self {
            AuditAction::Created | AuditAction::Terminated => "client",
            AuditAction::TerminatedByAdmin => "admin",
            AuditAction::Expired | AuditAction::Revoked => "engine",
        }
    }
}

/// One audit row.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Derived from the session's row id and the action, so writing the same
    /// event twice (a retried final write, a replayed batch) yields one row.
    pub id: Uuid,
    /// The session's row id.
    pub session_row: Uuid,
    /// The session's tenant.
    pub tenant_id: Uuid,
    /// What happened.
    pub action: AuditAction,
    /// Why, when there is a reason (the termination reason).
    pub reason: Option<String>,
    /// When.
    pub at: Millis,
}

impl AuditEntry {
    fn new(session: &Session, action: AuditAction, reason: Option<String>, at: Millis) -> Self {
        let mut digest = Sha256::new();
        digest.update(session.id.as_bytes());
        digest.update(action.as_str().as_bytes());
        let hash = digest.finalize();
        // The session's creation time first (its row id is a UUIDv7, whose
        // first 48 bits are the time in ms), so audit rows are appended
        // near each other in the table's key index rather than all over
        // it; the rest from the hash, so the id stays deterministic (a
        // replayed entry is recognised).
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&session.id.as_bytes()[..6]);
        bytes[6..].copy_from_slice(&hash[..10]);
        AuditEntry {
            id: Uuid::new_v8(bytes),
            session_row: session.id,
            tenant_id: session.tenant_id,
            action,
            reason,
            at,
        }
    }

    /// The session was admitted.
    pub fn created(session: &Session) -> Self {
        Self::new(session, AuditAction::Created, None, session.created_at)
    }

    /// The session reached its final state (a termination asked for by
    /// `requester`); `None` while it is live.
    pub fn ended(session: &Session, requester: Requester) -> Option<Self> {
        let action = match session.status {
            Status::Active | Status::Idle => return None,
            Status::Expired => AuditAction::Expired,
            Status::Terminated
                if session.termination_reason() == Some(REASON_REFRESH_TOKEN_REUSE) =>
            {
                AuditAction::Revoked
            }
            Status::Terminated => match requester {
                Requester::Client => AuditAction::Terminated,
                Requester::Admin => AuditAction::TerminatedByAdmin,
            },
        };
        Some(Self::new(
            session,
            action,
            session.termination_reason().map(str::to_owned),
            session.terminated_at().unwrap_or(session.last_activity_at),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::session::tests::session_at;

    #[test]
    fn the_same_event_has_the_same_id_and_different_events_differ() {
        let mut session = session_at(1_000, 60, 60);
        let created = AuditEntry::created(&session);
        assert_eq!(created.id, AuditEntry::created(&session).id);
        assert!(AuditEntry::ended(&session, Requester::Client).is_none());
        session.finish(Status::Terminated, "client_request", 2_000);
        let ended = AuditEntry::ended(&session, Requester::Client).unwrap();
        assert_eq!(ended.action, AuditAction::Terminated);
        assert_eq!(ended.reason.as_deref(), Some("client_request"));
        assert_eq!(ended.at, 2_000);
        assert_ne!(ended.id, created.id);
    }

    #[test]
    fn refresh_token_reuse_is_a_revocation_by_the_engine() {
        let mut session = session_at(1_000, 60, 60);
        session.finish(Status::Terminated, REASON_REFRESH_TOKEN_REUSE, 2_000);
        let ended = AuditEntry::ended(&session, Requester::Client).unwrap();
        assert_eq!(ended.action, AuditAction::Revoked);
        assert_eq!(ended.action.actor(), "engine");
    }

    #[test]
    fn a_termination_by_an_operator_is_audited_as_the_admin_s() {
        let mut session = session_at(1_000, 60, 60);
        session.finish(Status::Terminated, "admin_request", 2_000);
        let by_admin = AuditEntry::ended(&session, Requester::Admin).unwrap();
        assert_eq!(
            (by_admin.action.as_str(), by_admin.action.actor()),
            ("terminated", "admin")
        );
        let by_client = AuditEntry::ended(&session, Requester::Client).unwrap();
        assert_eq!(by_client.action.actor(), "client");
        // Expiry and revocation stay the engine's whoever asked last.
        session.status = Status::Expired;
        let expired = AuditEntry::ended(&session, Requester::Admin).unwrap();
        assert_eq!(expired.action.actor(), "engine");
    }
}
