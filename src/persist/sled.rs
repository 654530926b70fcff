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
    /// PostgreSQL did not commit (durability = "postgres").
    #[error("postgres: {0}")]
    Postgres(String),
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
            Some(bytes) => self.decode_session(&key, &bytes).map(Some),
        }
    }

    /// Decodes a session record and brings a live one up to date.
    ///
    /// A live session's record is written coalesced, while each tool
    /// execution is written (and acknowledged) on its own; executions
    /// numbered past the record's count are replayed onto it here.
    fn decode_session(&self, key: &[u8], bytes: &[u8]) -> Result<Session, StoreError> {
        self.decode_session_replayed(key, bytes)
            .map(|(session, _)| session)
    }

    /// As [`Store::decode_session`], with the number of executions replayed.
    fn decode_session_replayed(
        &self,
        key: &[u8],
        bytes: &[u8],
    ) -> Result<(Session, u64), StoreError> {
        let mut session = record::decode_session(bytes).map_err(|e| corrupt(key, e))?;
        let recorded = session.tool_execution_count;
        if !session.status.is_final() {
            let prefix = keys::executions_prefix(session.id);
            let start = keys::execution(session.id, session.tool_execution_count + 1);
            for item in self.tree.range(start..) {
                let (key, bytes) = item?;
                if !key.starts_with(&prefix) {
                    break;
                }
                let execution: ToolExecution =
                    record::decode(&bytes).map_err(|e| corrupt(&key, e))?;
                session.record_execution(&execution, execution.recorded_at);
            }
        }
        let replayed = session.tool_execution_count - recorded;
        Ok((session, replayed))
    }

    /// Every stored session, for recovery and purging.
    pub fn all_sessions(&self) -> impl Iterator<Item = Result<Session, StoreError>> + '_ {
        self.all_sessions_replayed()
            .map(|item| item.map(|(session, _)| session))
    }

    /// Every stored session, with how many executions were replayed onto
    /// its record (non-zero: the record on disk is behind).
    pub fn all_sessions_replayed(
        &self,
    ) -> impl Iterator<Item = Result<(Session, u64), StoreError>> + '_ {
        self.tree.scan_prefix(keys::all_sessions()).map(|item| {
            let (key, bytes) = item?;
            self.decode_session_replayed(&key, &bytes)
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

    /// The executions of the session with row id `session_row`, newest
    /// first, at most `limit`.
    pub fn executions(
        &self,
        session_row: Uuid,
        limit: usize,
    ) -> Result<Vec<ToolExecution>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(128));
        for item in self
            .tree
            .scan_prefix(keys::executions_prefix(session_row))
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

    /// Whether nothing at all is stored (a new or lost data dir).
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty()
    }

    /// Removes an engine-wide value (made durable by the next sync).
    pub fn remove_meta(&self, name: &str) -> Result<(), StoreError> {
        self.tree.remove(keys::meta(name))?;
        Ok(())
    }

    /// An engine-wide value.
    pub fn meta(&self, name: &str) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.tree.get(keys::meta(name))?)
    }

    /// Sets an engine-wide value (made durable by the next sync).
    pub fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(keys::meta(name), value)?;
        Ok(())
    }

    /// The number of the last outbox entry.
    pub fn outbox_last(&self) -> Result<Option<u64>, StoreError> {
        Ok(
            match self
                .tree
                .scan_prefix(keys::outbox_prefix())
                .keys()
                .next_back()
            {
                None => None,
                Some(key) => keys::parse_outbox(&key?),
            },
        )
    }

    /// The first outbox entry's number and append time.
    pub fn outbox_first(&self) -> Result<Option<(u64, Millis)>, StoreError> {
        Ok(match self.tree.scan_prefix(keys::outbox_prefix()).next() {
            None => None,
            Some(item) => {
                let (key, value) = item?;
                let at = super::outbox::decode(&value).map_or(0, |(at, _)| at);
                keys::parse_outbox(&key).map(|seq| (seq, at))
            }
        })
    }

    /// How many entries the outbox holds (a scan: start-up only).
    pub fn outbox_len(&self) -> Result<usize, StoreError> {
        let mut count = 0;
        for key in self.tree.scan_prefix(keys::outbox_prefix()).keys() {
            key?;
            count += 1;
        }
        Ok(count)
    }

    /// The first `limit` outbox entries, oldest first.
    pub fn outbox_batch(&self, limit: usize) -> Result<Vec<(u64, sled::IVec)>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(4096));
        for item in self.tree.scan_prefix(keys::outbox_prefix()).take(limit) {
            let (key, value) = item?;
            if let Some(seq) = keys::parse_outbox(&key) {
                out.push((seq, value));
            }
        }
        Ok(out)
    }

    /// Keeps an outbox entry PostgreSQL refused (removed from the outbox
    /// with its batch).
    pub fn put_dead_letter(&self, at: Millis, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(keys::dead_letter(at, seq), value)?;
        Ok(())
    }

    /// Outbox entry number `seq`.
    pub fn outbox_entry(&self, seq: u64) -> Result<Option<sled::IVec>, StoreError> {
        Ok(self.tree.get(keys::outbox(seq))?)
    }

    /// Deletes shipped outbox entries (durable with the next sync; a replay
    /// after a crash is harmless).
    pub fn remove_outbox(&self, seqs: impl IntoIterator<Item = u64>) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for seq in seqs {
            batch.remove(&keys::outbox(seq));
        }
        self.apply(batch)
    }

    /// Appends every stored session and execution record to the outbox,
    /// numbered from `next`; returns the next free number.
    pub(crate) fn seed_outbox(&self, mut next: u64, now: Millis) -> Result<u64, StoreError> {
        let mut batch = sled::Batch::default();
        let mut pending = 0;
        for prefix in [
            keys::all_sessions(),
            [keys::executions_prefix(Uuid::nil())[0]],
        ] {
            for item in self.tree.scan_prefix(prefix) {
                let (key, value) = item?;
                if let Some(entry) = super::outbox::entry_for_record(&key, &value, now) {
                    batch.insert(&keys::outbox(next), entry);
                    next += 1;
                    pending += 1;
                }
                if pending == 1024 {
                    self.apply(std::mem::take(&mut batch))?;
                    pending = 0;
                }
            }
        }
        self.apply(batch)?;
        Ok(next)
    }

    /// Writes a session rebuilt from PostgreSQL, with its index entry and
    /// executions, straight to the store (not through the outbox: it came
    /// from PostgreSQL). A session already stored (an earlier, interrupted
    /// rebuild, or created here meanwhile) is left alone: answers whether
    /// it was written.
    pub fn put_rebuilt(
        &self,
        session: &Session,
        executions: &[(u64, ToolExecution)],
    ) -> Result<bool, StoreError> {
        if self
            .tree
            .contains_key(keys::session(session.tenant_id, &session.session_id))?
        {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        batch.insert(
            keys::session(session.tenant_id, &session.session_id),
            record::encode(session),
        );
        batch.insert(
            keys::created(session.tenant_id, session.created_at, &session.session_id),
            Vec::new(),
        );
        for (seq, execution) in executions {
            batch.insert(
                &keys::execution(session.id, *seq),
                record::encode(execution),
            );
        }
        self.apply(batch)?;
        Ok(true)
    }

    /// Applies one batch atomically (one tree, one `apply_batch`).
    pub(crate) fn apply(&self, batch: sled::Batch) -> Result<(), StoreError> {
        Ok(self.tree.apply_batch(batch)?)
    }

    /// Keys of a session's executions, for purging.
    pub(crate) fn execution_keys(&self, session_row: Uuid) -> Result<Vec<sled::IVec>, StoreError> {
        self.tree
            .scan_prefix(keys::executions_prefix(session_row))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::session::tests::session_at;
    use crate::persist::WriteOp;

    fn apply(store: &Store, ops: Vec<WriteOp>) {
        let mut batch = sled::Batch::default();
        for op in ops {
            match op {
                WriteOp::Put { key, value } => batch.insert(key, value),
                WriteOp::Remove { key } => batch.remove(key),
                WriteOp::Audit(_) => {}
            }
        }
        store.apply(batch).unwrap();
    }

    #[test]
    fn executions_past_the_record_are_replayed_onto_a_live_session() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20).unwrap();
        let session = session_at(1_000, 3600, 3600);
        apply(&store, vec![WriteOp::put_session(&session)]);
        let mut expected = session.clone();
        for seq in 1..=3u64 {
            let execution = ToolExecution {
                tool_name: "grep".into(),
                tool_id: None,
                arguments: "null".into(),
                result: "null".into(),
                error: (seq == 2).then(|| "boom".to_owned()),
                duration_ms: seq * 10,
                tokens_used: 5,
                executed_at: 2_000,
                recorded_at: 2_000 + seq as i64,
            };
            expected.record_execution(&execution, execution.recorded_at);
            apply(
                &store,
                vec![WriteOp::put_execution(session.id, seq, &execution)],
            );
        }
        let back = store
            .session(session.tenant_id, &session.session_id)
            .unwrap()
            .unwrap();
        assert_eq!(back, expected);
        assert_eq!(
            (
                back.tool_execution_count,
                back.tool_error_count,
                back.version
            ),
            (3, 1, 4)
        );
        assert_eq!(back.last_activity_at, 2_003);
        // A newer record already holding them is not replayed twice.
        apply(&store, vec![WriteOp::put_session(&expected)]);
        assert_eq!(
            store
                .session(session.tenant_id, &session.session_id)
                .unwrap()
                .unwrap(),
            expected
        );
        assert_eq!(store.all_sessions().next().unwrap().unwrap(), expected);
    }
}
