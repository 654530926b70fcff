//! The embedded sled store: reads for the engine, batched writes for the
//! flusher. See [`super::keys`] for the layout.

use std::path::Path;

use uuid::Uuid;

use super::keys;
use super::record::{self, RecordError};
use crate::model::{Millis, Session, ToolExecution};

/// Name of the one tree holding every record.
const TREE: &str = "edge-sessions";

/// A storage failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// sled failed (I/O, corruption).
    #[error("sled: {0}")]
    Sled(String),
    /// A record did not decode.
    #[error("record {key}: {reason}")]
    Record {
        /// The record's key, printable.
        key: String,
        /// Why it did not decode.
        reason: String,
    },
    /// The write-behind queue is closed (shutting down).
    #[error("write-behind queue closed")]
    Closed,
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Sled(e.to_string())
    }
}

fn corrupt(key: &[u8], e: RecordError) -> StoreError {
    StoreError::Record {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    }
}

/// Handle to the sled database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
}

impl Store {
    /// Opens (or creates) the store in `dir`, with at most about
    /// `cache_bytes` of sled's page cache in memory.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(cache_bytes)
            // Durability comes from our own fsync per batch (group commit);
            // sled's background flusher would only add fsyncs.
            .flush_every_ms(None)
            .open()?;
        let tree = db.open_tree(TREE)?;
        Ok(Store { db, tree })
    }

    /// Reads one session's last durable state.
    pub fn session(&self, tenant: Uuid, session_id: &str) -> Result<Option<Session>, StoreError> {
        let key = keys::session(tenant, session_id);
        match self.tree.get(&key)? {
            None => Ok(None),
            Some(bytes) => record::decode(&bytes)
                .map(Some)
                .map_err(|e| corrupt(&key, e)),
        }
    }

    /// Whether a session record exists.
    pub fn contains_session(&self, tenant: Uuid, session_id: &str) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(keys::session(tenant, session_id))?)
    }

    /// Every stored session, for recovery and purging.
    pub fn all_sessions(&self) -> impl Iterator<Item = Result<Session, StoreError>> + '_ {
        self.tree.scan_prefix(keys::all_sessions()).map(|item| {
            let (key, bytes) = item?;
            record::decode(&bytes).map_err(|e| corrupt(&key, e))
        })
    }

    /// A tenant's session ids, newest first, strictly before `before` when given.
    pub fn tenant_ids_newest_first(
        &self,
        tenant: Uuid,
        before: Option<(Millis, &str)>,
    ) -> impl Iterator<Item = Result<(Millis, String), StoreError>> + '_ {
        let prefix = keys::created_prefix(tenant);
        let range = match before {
            Some((at, id)) => self
                .tree
                .range(prefix.clone()..keys::created(tenant, at, id)),
            None => self.tree.scan_prefix(prefix),
        };
        range.rev().filter_map(|item| match item {
            Err(e) => Some(Err(e.into())),
            Ok((key, _)) => keys::parse_created(&key).map(|(at, id)| Ok((at, id.to_owned()))),
        })
    }

    /// A session's executions, newest first, at most `limit`.
    pub fn executions(
        &self,
        tenant: Uuid,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<ToolExecution>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(128));
        for item in self
            .tree
            .scan_prefix(keys::executions_prefix(tenant, session_id))
            .rev()
            .take(limit)
        {
            let (key, bytes) = item?;
            out.push(record::decode(&bytes).map_err(|e| corrupt(&key, e))?);
        }
        Ok(out)
    }

    /// Final sessions that ended before `cutoff`: `(tenant, session_id)`.
    pub fn finished_before(&self, cutoff: Millis) -> Result<Vec<(Uuid, String)>, StoreError> {
        let end = keys::finished(cutoff, Uuid::nil(), "");
        let mut out = Vec::new();
        for key in self.tree.range(keys::finished_start().to_vec()..end).keys() {
            let key = key?;
            if let Some((_, tenant, id)) = keys::parse_finished(&key) {
                out.push((tenant, id.to_owned()));
            }
        }
        Ok(out)
    }

    /// Applies one batch atomically (one tree, one `apply_batch`).
    pub(crate) fn apply(&self, batch: sled::Batch) -> Result<(), StoreError> {
        Ok(self.tree.apply_batch(batch)?)
    }

    /// Keys of a session's executions, for purging.
    pub(crate) fn execution_keys(
        &self,
        tenant: Uuid,
        session_id: &str,
    ) -> Result<Vec<sled::IVec>, StoreError> {
        self.tree
            .scan_prefix(keys::executions_prefix(tenant, session_id))
            .keys()
            .map(|k| k.map_err(StoreError::from))
            .collect()
    }

    /// Makes everything applied so far durable (one fsync).
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}
