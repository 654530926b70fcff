//! The domain error: everything a session operation can answer besides success.

use thiserror::Error;

/// Why a session operation did not succeed.
///
/// The HTTP layer maps every variant to a status and a stable code in one
/// exhaustive `match`, so a new variant does not compile until it has one.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum SessionError {
    /// No session with this id in the caller's tenant (or it was purged).
    #[error("session not found")]
    NotFound,
    /// The client-chosen id is already used in the caller's tenant.
    #[error("session already exists")]
    AlreadyExists,
    /// The tenant has `max_active_sessions` live sessions already.
    #[error("tenant session limit reached")]
    TenantLimit {
        /// The tenant's `max_active_sessions`.
        limit: usize,
    },
    /// The session ended by expiry.
    #[error("session expired")]
    Expired,
    /// The session ended by termination or revocation.
    #[error("session terminated")]
    Terminated,
    /// `If-Match` named another version than the current one.
    #[error("version mismatch")]
    VersionMismatch {
        /// The session's current version.
        current: u64,
    },
    /// A well-formed request carried a value outside its allowed range.
    #[error("{message}")]
    Validation {
        /// The offending field.
        field: String,
        /// A lowercase sentence saying what is wrong.
        message: String,
    },
    /// A refresh token that was already rotated away: the session is revoked.
    #[error("refresh token was already used; the session is revoked")]
    RefreshTokenReused,
    /// A refresh token that is not this session's.
    #[error("invalid refresh token")]
    InvalidRefreshToken,
    /// The session token does not belong to this session (rotated away,
    /// made up, another session's): it authenticates nothing.
    #[error("missing or invalid credentials")]
    TokenMismatch,
    /// The session has as many open WebSockets as it may.
    #[error("the session has {limit} open websockets, the most it may have")]
    TooManyConnections {
        /// `websocket.max_connections_per_session`.
        limit: usize,
    },
    /// The live session has no passthrough credentials.
    #[error("the session has no passthrough credentials")]
    PassthroughNotFound,
    /// The engine is recovering or shutting down; retrying later will work.
    #[error("service unavailable, retry shortly")]
    Unavailable,
    /// The disk does not take writes (full or failing): nothing was changed;
    /// retrying once it does will work.
    #[error("storage unavailable, nothing was changed; retry shortly")]
    StorageUnavailable,
    /// The durable store failed; the cause is logged, never sent to clients.
    #[error("storage failure: {0}")]
    Storage(String),
}

impl From<super::client_text::TooLong> for SessionError {
    /// A text the session cannot keep is the field's validation error.
    fn from(e: super::client_text::TooLong) -> Self {
        SessionError::validation(e.0, e.to_string())
    }
}

impl SessionError {
    /// A validation error for `field`.
    pub fn validation(field: &str, message: impl Into<String>) -> Self {
        SessionError::Validation {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}
