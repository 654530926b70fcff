//! What a change's durability outcome means for the caller.

use crate::model::SessionError;
use crate::persist::{Durable, StoreError};

pub(crate) fn storage(e: StoreError) -> SessionError {
    SessionError::Storage(e.to_string())
}

/// Waits for a change to be durable, when there is something to wait for.
pub(crate) async fn settle(durable: Option<Durable>) -> Result<(), SessionError> {
    match durable {
        None => Ok(()),
        Some(rx) => durable_outcome(rx.await),
    }
}

/// What a resolved [`Durable`] means for the caller: a store failure, or a
/// closed queue (shutting down), which is worth retrying.
pub(crate) fn durable_outcome(
    written: Result<Result<(), StoreError>, tokio::sync::oneshot::error::RecvError>,
) -> Result<(), SessionError> {
    match written {
        Ok(Ok(())) => Ok(()),
        // PostgreSQL did not commit in time (durability = "postgres"): the
        // change is safe in sled and will ship; the caller may retry.
        Ok(Err(StoreError::Postgres(e))) => {
            tracing::warn!(error = %e, "a change waits for PostgreSQL; answered 503");
            Err(SessionError::Unavailable)
        }
        Ok(Err(StoreError::Closed)) | Err(_) => Err(SessionError::Unavailable),
        Ok(Err(StoreError::Unwritable(_))) => Err(SessionError::StorageUnavailable),
        Ok(Err(e)) => Err(storage(e)),
    }
}
