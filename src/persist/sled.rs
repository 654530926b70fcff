//! The embedded sled store: the materialised state the log is folded into,
//! read through the overlay of changes not folded yet. See [`super::keys`]
//! for the layout and [`super::log`] for the log.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use sled::IVec;
use uuid::Uuid;

use super::executions::{self, Chunk, Unique};
use super::keys;
use super::log::{self, LogOp, LogWriter, RecordBuilder};
use super::overlay::{Lookup, Merge, Overlay};
use super::record::{self, RecordError};
use super::session_filter::SessionFilter;
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
    /// The log does not take writes (a full or failing disk); nothing of
    /// the change was kept.
    #[error("log: {0}")]
    Unwritable(String),
    /// The write-behind queue is closed (shutting down).
    #[error("write-behind queue closed")]
    Closed,
    /// PostgreSQL did not commit (durability = "postgres").
    #[error("postgres: {0}")]
    Postgres(String),
    /// What is on disk fails its checks: acknowledged changes cannot all be
    /// read back.
    #[error("{0}")]
    Damaged(String),
    /// Another process has the data dir open (its lock file is held).
    #[error("another process holds the data dir {0} (another edge-sessions serve?); stop it or give this one another storage.data_dir")]
    InUse(String),
}

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError::Sled(e.to_string())
    }
}

pub(crate) fn corrupt(key: &[u8], e: RecordError) -> StoreError {
    StoreError::Record {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    }
}

/// Meta key: the last log record whose changes sled holds.
pub const WAL_THROUGH: &str = "wal-through";
/// Meta key: the last log record whose outbox entries PostgreSQL committed.
pub const SHIPPED_THROUGH: &str = "shipped-through";

/// Handle to the store: sled plus the [overlay](super::overlay) of changes
/// that are in the log and not yet checkpointed. Every read sees both.
/// Cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    overlay: Arc<Overlay>,
    /// Which session keys may be stored (see [`SessionFilter`]).
    sessions: Arc<SessionFilter>,
    /// The data dir (where the checkpoint mark lives).
    dir: std::path::PathBuf,
    /// The data dir's lock, held while any handle lives (see [`lock_data_dir`]).
    _lock: Arc<std::fs::File>,
}

/// A store just opened, with its log.
pub struct Opened {
    /// The store, the log's unfinished changes already in its overlay.
    pub store: Store,
    /// The log, positioned after its last record (for the flusher).
    pub log: LogWriter,
    /// Damage found and passed over (`salvage` only).
    pub salvaged: Option<Salvaged>,
}

/// What `serve --salvage` passed over.
#[derive(Debug, Clone)]
pub struct Salvaged {
    /// What was wrong, one line each.
    pub damage: Vec<String>,
    /// Changes (puts, removals, audit rows) in log records that could not
    /// be read.
    pub lost_changes: usize,
}

/// The smallest key greater than every key starting with `prefix` (`None`
/// when there is none: the prefix is all `0xff`).
fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The lock file in the data dir: one process at a time.
pub const LOCK_FILE: &str = "lock";

/// Takes the data dir's lock (an exclusive `flock` on [`LOCK_FILE`]), before
/// anything in it is read or written: a second process must not touch the
/// log the first one appends to (opening it cuts a torn last record, which
/// may be the first process's write in progress). The lock goes with the
/// file handle, also when the process dies.
fn lock_data_dir(dir: &Path) -> Result<std::fs::File, StoreError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|e| StoreError::Sled(format!("opening {}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor this function owns; no memory involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(if e.kind() == std::io::ErrorKind::WouldBlock {
            StoreError::InUse(dir.display().to_string())
        } else {
            StoreError::Sled(format!("locking {}: {e}", path.display()))
        });
    }
    Ok(file)
}

impl Store {
    /// Opens (or creates) the store in `dir`, with at most about
    /// `cache_bytes` of sled's page cache in memory, and replays the log
    /// records sled does not hold yet. Damage (see [`super::log`]) is an
    /// error unless `salvage`.
    pub fn open(dir: &Path, cache_bytes: u64, salvage: bool) -> Result<Opened, StoreError> {
        let lock = Arc::new(lock_data_dir(dir)?);
        let damaged = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                StoreError::Damaged(e.to_string())
            } else {
                StoreError::Sled(format!("log: {e}"))
            }
        };
        // The log is checked before sled is opened (sled's own recovery may
        // rewrite its files): damage found there leaves every file as it was.
        let marked = read_checkpoint_mark(dir)?;
        let (mut log, mut replay) =
            log::open(&dir.join("wal"), marked, salvage).map_err(damaged)?;
        let db = sled::Config::new()
            .path(dir.join("sled"))
            .cache_capacity(cache_bytes)
            // Durability comes from the log; sled is written by the
            // checkpointer, which flushes once per checkpoint.
            .flush_every_ms(None)
            .open()?;
        let tree = db.open_tree(TREE)?;
        let store = Store {
            db,
            tree,
            overlay: Arc::new(Overlay::default()),
            sessions: Arc::new(SessionFilter::default()),
            dir: dir.to_owned(),
            _lock: lock,
        };
        // sled drops everything after the first record of its own log that
        // fails its checksum; the mark outside it tells.
        let through = store.meta_u64(WAL_THROUGH)?;
        let mut sled_damage = None;
        if marked.is_some_and(|marked| through < marked) {
            sled_damage = Some(format!(
                "sled holds changes through log record {through} but was checkpointed through {}",
                marked.unwrap_or(0)
            ));
        } else if replay.first_seq.is_some_and(|first| first > through + 1) {
            sled_damage = Some(format!(
                "log records {} to {} are missing between sled and the log",
                through + 1,
                replay.first_seq.unwrap_or(0) - 1
            ));
        }
        if let Some(damage) = sled_damage {
            if !salvage {
                return Err(StoreError::Damaged(damage));
            }
            replay.damage.push(log::LogDamage::Sled(damage));
        }
        let mut salvaged = None;
        for record in replay.records.iter().filter(|r| r.seq > through) {
            let changes = || {
                record.ops().filter_map(|op| match op {
                    LogOp::Put(key, value) => Some((key, Some(value))),
                    LogOp::Remove(key) => Some((key, None)),
                    LogOp::Entry(_) => None,
                })
            };
            // Keys first, as in `apply_logged` (no rebuild can run yet: the
            // store is not handed out).
            store.add_session_keys(changes());
            store.overlay.apply(record.seq, changes());
        }
        if !replay.damage.is_empty() {
            // What was read goes into sled now and the damaged log goes, so
            // the next start finds a consistent store.
            store.checkpoint(replay.next_seq - 1)?;
            log.shared()
                .delete_through(replay.next_seq - 1)
                .map_err(|e| StoreError::Sled(format!("log: {e}")))?;
            salvaged = Some(Salvaged {
                damage: replay.damage.iter().map(ToString::to_string).collect(),
                lost_changes: replay.lost_ops,
            });
        }
        store.migrate_outbox(&mut log)?;
        Ok(Opened {
            store,
            log,
            salvaged,
        })
    }

    /// A data dir written before the log existed may hold an outbox of
    /// entries under `O` keys that PostgreSQL has not committed: they move
    /// into the log (which is the outbox now), then leave sled.
    fn migrate_outbox(&self, log: &mut LogWriter) -> Result<(), StoreError> {
        let prefix = keys::outbox_prefix();
        if self.tree.scan_prefix(prefix).next().is_none() {
            return Ok(());
        }
        let mut moved = 0;
        let mut keys_moved = Vec::new();
        let mut record = RecordBuilder::default();
        for item in self.tree.scan_prefix(prefix) {
            let (key, value) = item?;
            record.entry(&value);
            keys_moved.push(key);
            moved += 1;
            if moved % 1024 == 0 {
                self.append(log, &mut record)?;
            }
        }
        self.append(log, &mut record)?;
        let mut batch = sled::Batch::default();
        for key in keys_moved {
            batch.remove(key);
        }
        self.apply(batch)?;
        self.sync()?;
        tracing::info!(
            entries = moved,
            "outbox entries of the previous format moved into the log"
        );
        Ok(())
    }

    /// Appends `record` to the log directly (start-up only, before the
    /// flusher owns the log) and starts a fresh one.
    pub(crate) fn append(
        &self,
        log: &mut LogWriter,
        record: &mut RecordBuilder,
    ) -> Result<(), StoreError> {
        if !record.is_empty() {
            log.append(record, crate::model::time::now_ms())
                .map_err(|e| StoreError::Sled(format!("log: {e}")))?;
        }
        *record = RecordBuilder::default();
        Ok(())
    }

    /// The overlay of changes not yet in sled.
    pub(crate) fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    /// Makes the changes of log record `seq` visible to reads (they are on
    /// disk): the overlay takes them, and the filter their session keys
    /// first, so it never answers "absent" for a key a read could find.
    pub(crate) fn apply_logged<'a>(
        &self,
        seq: u64,
        changes: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)> + Clone,
    ) {
        self.add_session_keys(changes.clone());
        self.overlay.apply(seq, changes.clone());
        // Once more after: a filter rebuild that began in between, whose
        // walk did not see these changes, must take them too.
        self.add_session_keys(changes);
    }

    /// Adds the session keys `changes` write to the session filter.
    fn add_session_keys<'a>(
        &self,
        changes: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) {
        for (key, value) in changes {
            if value.is_some() && keys::is_session(key) {
                self.sessions.insert(key);
            }
        }
    }

    /// Whether a session `session_id` of `tenant` may be stored (live or
    /// final): `false` only when it certainly is not, so a create of a new
    /// client-chosen id need not read the store.
    pub fn may_hold_session(&self, tenant: Uuid, session_id: &str) -> bool {
        self.sessions
            .may_contain(&keys::session(tenant, session_id))
    }

    /// Whether the session filter has taken enough new keys since its last
    /// walk to be rebuilt (see [`SessionFilter`]).
    pub fn session_filter_due(&self) -> bool {
        self.sessions.rebuild_due()
    }

    /// Rebuilds the session filter from a walk of the session keys, so the
    /// keys of purged sessions leave it; answers the keys found, or `None`
    /// when another rebuild is running. Changes made meanwhile go into the
    /// new filter too. A walk that fails (or panics) leaves the old filter.
    pub fn rebuild_session_filter(&self) -> Result<Option<u64>, StoreError> {
        /// Aborts the rebuild unless it was finished.
        struct Rebuild<'a>(&'a SessionFilter, bool);
        impl Drop for Rebuild<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.abort_rebuild();
                }
            }
        }
        if !self.sessions.begin_rebuild() {
            return Ok(None);
        }
        let mut rebuild = Rebuild(&self.sessions, false);
        let mut walked = 0;
        for item in self.scan_prefix(&keys::all_sessions(), false) {
            let (key, _) = item?;
            self.sessions.insert_walked(&key);
            walked += 1;
        }
        self.sessions.finish_rebuild();
        rebuild.1 = true;
        Ok(Some(walked))
    }

    /// The newest value of `key`.
    fn get(&self, key: &[u8]) -> Result<Option<IVec>, StoreError> {
        match self.overlay.get(key) {
            Lookup::Changed(change) => Ok(change),
            Lookup::Unknown => Ok(self.tree.get(key)?),
        }
    }

    /// Every key in `[start, end)`, overlay included, in key order (or
    /// reversed).
    fn range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        reverse: bool,
    ) -> impl Iterator<Item = Result<(IVec, IVec), StoreError>> + '_ {
        let overlay = self.overlay.range(start, end);
        let sled: Box<dyn Iterator<Item = sled::Result<(IVec, IVec)>>> = match (end, reverse) {
            (Some(end), false) => Box::new(self.tree.range(start..end)),
            (Some(end), true) => Box::new(self.tree.range(start..end).rev()),
            (None, false) => Box::new(self.tree.range(start..)),
            (None, true) => Box::new(self.tree.range(start..).rev()),
        };
        Merge::new(overlay, sled, reverse).map(|item| item.map_err(StoreError::from))
    }

    /// Every key starting with `prefix`, overlay included.
    pub(crate) fn scan_prefix(
        &self,
        prefix: &[u8],
        reverse: bool,
    ) -> impl Iterator<Item = Result<(IVec, IVec), StoreError>> + '_ {
        let end = prefix_end(prefix);
        self.range(prefix, end.as_deref(), reverse)
    }

    /// Reads one session's last durable state.
    pub fn session(&self, tenant: Uuid, session_id: &str) -> Result<Option<Session>, StoreError> {
        let key = keys::session(tenant, session_id);
        match self.get(&key)? {
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
        self.decode_session_replayed(key, bytes, None)
            .map(|(session, _)| session)
    }

    /// As [`Store::decode_session`], with the number of executions replayed
    /// (non-zero: the record on disk is behind); `key` and `bytes` are one
    /// item of [`Store::session_records`].
    ///
    /// Given what [`Store::last_executions`] found (recovery), executions
    /// are read only for a record that is behind, instead of looking at the
    /// session's last key: for a million sessions, one scan of the
    /// executions instead of a million looks, which cost a second.
    pub fn decode_session_replayed(
        &self,
        key: &[u8],
        bytes: &[u8],
        last_executions: Option<&HashMap<Uuid, u64>>,
    ) -> Result<(Session, u64), StoreError> {
        let mut session = record::decode_session(bytes).map_err(|e| corrupt(key, e))?;
        let recorded = session.tool_execution_count;
        let may_be_behind =
            last_executions.is_none_or(|last| last.get(&session.id).is_some_and(|n| *n > recorded));
        // Executions are numbered without gaps: those past the count are
        // read newest first, down to it. Nearly always there are none, and
        // this is one look at the session's last key.
        if !session.status.is_final() && may_be_behind {
            let newer = Unique::new(
                self.scan_prefix(&keys::executions_prefix(session.id), true),
                true,
            )
            .take_while(|item| item.as_ref().map_or(true, |(_, seq, _)| *seq > recorded))
            .collect::<Result<Vec<_>, _>>()?;
            for (_, seq, bytes) in newer.into_iter().rev() {
                let execution: ToolExecution = record::decode(&bytes)
                    .map_err(|e| corrupt(&keys::execution(session.id, seq), e))?;
                session.record_execution(&execution, execution.recorded_at);
            }
        }
        let replayed = session.tool_execution_count - recorded;
        Ok((session, replayed))
    }

    /// The number of the last stored execution of every session that has
    /// one (chunks make these few values to read); `u64::MAX` for a session
    /// with a value that does not read.
    pub fn last_executions(&self) -> Result<HashMap<Uuid, u64>, StoreError> {
        let mut last = HashMap::new();
        for item in self.scan_prefix(&keys::all_executions(), false) {
            let (key, value) = item?;
            let Some((row, first)) = keys::parse_execution(&key) else {
                continue;
            };
            // A damaged value marks its session as behind: decoding that
            // session then reads its executions and fails for it alone.
            let n = executions::count(&value).map_or(u64::MAX, |held| first + held as u64 - 1);
            last.entry(row)
                .and_modify(|seen: &mut u64| *seen = (*seen).max(n))
                .or_insert(n);
        }
        Ok(last)
    }

    /// Every stored session, for recovery and purging.
    pub fn all_sessions(&self) -> impl Iterator<Item = Result<Session, StoreError>> + '_ {
        self.session_records().map(|item| {
            let (key, bytes) = item?;
            self.decode_session(&key, &bytes)
        })
    }

    /// Every stored session record, undecoded (recovery decodes them on
    /// other threads than the one that walks the tree).
    ///
    /// A walk that reaches the end without an error has seen every stored
    /// session key: it completes the [`SessionFilter`].
    pub fn session_records(&self) -> impl Iterator<Item = Result<(IVec, IVec), StoreError>> + '_ {
        let mut clean = true;
        let mut records = self.scan_prefix(&keys::all_sessions(), false);
        std::iter::from_fn(move || match records.next() {
            Some(Ok((key, value))) => {
                self.sessions.insert(&key);
                Some(Ok((key, value)))
            }
            Some(Err(e)) => {
                clean = false;
                Some(Err(e))
            }
            None => {
                if clean {
                    self.sessions.mark_complete();
                }
                None
            }
        })
    }

    /// A tenant's session ids, newest first, strictly before `before` when given.
    pub fn tenant_ids_newest_first(
        &self,
        tenant: Uuid,
        before: Option<(Millis, &str)>,
    ) -> impl Iterator<Item = Result<(Millis, String), StoreError>> + '_ {
        let prefix = keys::created_prefix(tenant);
        let end = match before {
            Some((at, id)) => Some(keys::created(tenant, at, id)),
            None => prefix_end(&prefix),
        };
        self.range(&prefix, end.as_deref(), true)
            .filter_map(|item| match item {
                Err(e) => Some(Err(e)),
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
        let stored = Unique::new(
            self.scan_prefix(&keys::executions_prefix(session_row), true),
            true,
        );
        for item in stored.take(limit) {
            let (_, seq, bytes) = item?;
            out.push(
                record::decode(&bytes)
                    .map_err(|e| corrupt(&keys::execution(session_row, seq), e))?,
            );
        }
        Ok(out)
    }

    /// Final sessions that ended before `cutoff`: `(tenant, session_id)`.
    pub fn finished_before(&self, cutoff: Millis) -> Result<Vec<(Uuid, String)>, StoreError> {
        let end = keys::finished(cutoff, Uuid::nil(), "");
        let mut out = Vec::new();
        for item in self.range(&keys::finished_start(), Some(&end), false) {
            let (key, _) = item?;
            if let Some((_, tenant, id)) = keys::parse_finished(&key) {
                out.push((tenant, id.to_owned()));
            }
        }
        Ok(out)
    }

    /// Whether nothing at all is stored (a new or lost data dir).
    pub fn is_empty(&self) -> bool {
        self.tree.is_empty() && self.overlay.is_empty()
    }

    /// Removes an engine-wide value (made durable by the next sync).
    pub fn remove_meta(&self, name: &str) -> Result<(), StoreError> {
        self.tree.remove(keys::meta(name))?;
        Ok(())
    }

    /// An engine-wide value.
    pub fn meta(&self, name: &str) -> Result<Option<IVec>, StoreError> {
        self.get(&keys::meta(name))
    }

    /// An engine-wide number (0 when unset).
    pub fn meta_u64(&self, name: &str) -> Result<u64, StoreError> {
        Ok(self
            .meta(name)?
            .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes))
            .unwrap_or(0))
    }

    /// Sets an engine-wide value (made durable by the next sync).
    pub fn put_meta(&self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(keys::meta(name), value)?;
        Ok(())
    }

    /// Keeps an outbox entry PostgreSQL refused.
    pub fn put_dead_letter(&self, at: Millis, seq: u64, value: &[u8]) -> Result<(), StoreError> {
        self.tree.insert(keys::dead_letter(at, seq), value)?;
        Ok(())
    }

    /// Writes a session rebuilt from PostgreSQL, with its index entry and
    /// executions, straight to sled (not through the log: it came from
    /// PostgreSQL, which keeps it). A session already stored (an earlier,
    /// interrupted rebuild, or created here meanwhile) is left alone:
    /// answers whether it was written.
    pub fn put_rebuilt(
        &self,
        session: &Session,
        executions: &[(u64, ToolExecution)],
    ) -> Result<bool, StoreError> {
        let key = keys::session(session.tenant_id, &session.session_id);
        if self.get(&key)?.is_some() {
            return Ok(false);
        }
        self.put_direct(&key, session, executions)?;
        Ok(true)
    }

    /// Writes a session loaded from a backup, with its index entries and
    /// executions, straight to sled (the data dir was empty; the caller
    /// syncs once at the end).
    pub fn put_restored(
        &self,
        session: &Session,
        executions: &[(u64, ToolExecution)],
    ) -> Result<(), StoreError> {
        let key = keys::session(session.tenant_id, &session.session_id);
        self.put_direct(&key, session, executions)
    }

    /// Writes `session` (under `key`), its index entries and its
    /// executions straight to sled, in one batch; the session filter takes
    /// the key before and after, as in [`Store::apply_logged`].
    fn put_direct(
        &self,
        key: &[u8],
        session: &Session,
        executions: &[(u64, ToolExecution)],
    ) -> Result<(), StoreError> {
        self.sessions.insert(key);
        let mut batch = sled::Batch::default();
        batch.insert(key, record::encode(session));
        batch.insert(
            keys::created(session.tenant_id, session.created_at, &session.session_id),
            Vec::new(),
        );
        if session.status.is_final() {
            batch.insert(
                keys::finished(
                    session.terminated_at().unwrap_or_default(),
                    session.tenant_id,
                    &session.session_id,
                ),
                Vec::new(),
            );
        }
        for (seq, execution) in executions {
            batch.insert(
                &keys::execution(session.id, *seq),
                record::encode(execution),
            );
        }
        self.apply(batch)?;
        self.sessions.insert(key);
        Ok(())
    }

    /// Writes the overlay's frozen layer (freezing the active one first
    /// when none is frozen) into sled with `wal_through`, fsyncs, and lets
    /// readers go to sled for it. Answers the last log record sled now
    /// holds, or `None` when there was nothing to write.
    pub(crate) fn checkpoint(&self, at_least: u64) -> Result<Option<u64>, StoreError> {
        self.checkpoint_with(at_least, || {})
    }

    /// [`Store::checkpoint`], calling `before_each` before it writes each
    /// change (or each run of a session's executions) into sled: the
    /// checkpointer paces itself there.
    pub(crate) fn checkpoint_with(
        &self,
        at_least: u64,
        mut before_each: impl FnMut(),
    ) -> Result<Option<u64>, StoreError> {
        let Some((layer, through)) = self.overlay.freeze() else {
            if at_least > self.meta_u64(WAL_THROUGH)? {
                self.put_meta(WAL_THROUGH, &at_least.to_be_bytes())?;
                self.sync()?;
                write_checkpoint_mark(&self.dir, at_least)?;
                return Ok(Some(at_least));
            }
            return Ok(None);
        };
        let through = through.max(at_least);
        // One insert at a time, not `apply_batch`: a batch holds sled's
        // global write lock, which stalls every read of sled meanwhile (a
        // create reads it to check its id), and nothing here needs batch
        // atomicity: until the mark below is on disk, recovery replays the
        // log over whatever part of this checkpoint sled kept.
        let mut changes = layer.iter().peekable();
        while let Some((key, change)) = changes.next() {
            before_each();
            match change {
                Some(value) if keys::is_execution(key) => {
                    self.fold_executions(key, value, &mut changes)?
                }
                Some(value) => {
                    self.tree.insert(key.clone(), value.clone())?;
                }
                None => {
                    self.tree.remove(key)?;
                }
            }
        }
        // The mark goes last: sled holds it only if it holds everything
        // before it (its log is replayed in order up to the first damage).
        self.tree
            .insert(keys::meta(WAL_THROUGH), &through.to_be_bytes())?;
        self.sync()?;
        write_checkpoint_mark(&self.dir, through)?;
        self.overlay.release_frozen();
        Ok(Some(through))
    }

    /// Writes a session's run of consecutive executions, starting with
    /// `key` and going on through `rest` while the numbers follow, as
    /// chunks (see [`super::executions`]): the session's last chunk in sled
    /// is extended while it has room.
    fn fold_executions<'a>(
        &self,
        key: &IVec,
        value: &IVec,
        rest: &mut std::iter::Peekable<impl Iterator<Item = (&'a IVec, &'a Option<IVec>)>>,
    ) -> Result<(), StoreError> {
        let Some((row, first)) = keys::parse_execution(key) else {
            self.tree.insert(key.clone(), value.clone())?;
            return Ok(());
        };
        // This execution and those that follow it: same session, the next
        // numbers.
        let mut group: Vec<&[u8]> = vec![value];
        while let Some(&(next_key, Some(next_value))) = rest.peek() {
            if keys::parse_execution(next_key) != Some((row, first + group.len() as u64)) {
                break;
            }
            group.push(next_value);
            rest.next();
        }
        let last = first + group.len() as u64 - 1;
        // The session's last value in sled up to the run's end: nearly
        // always a chunk (or a single) before the run. One inside it, after
        // its first number, can only be a single that a release before
        // chunks stored when a crash cut its checkpoint short (the log
        // replays all of those numbers): such values go, or readers would
        // take one for the start of a later chunk.
        let mut before = self.last_execution_up_to(row, last)?;
        if before
            .as_ref()
            .and_then(|(at, _)| keys::parse_execution(at))
            .is_some_and(|(_, at_seq)| at_seq > first)
        {
            let inside = keys::execution(row, first + 1)..=keys::execution(row, last);
            let strays: Vec<IVec> = self.tree.range(inside).keys().collect::<Result<_, _>>()?;
            for stray in strays {
                self.tree.remove(stray)?;
            }
            before = self.last_execution_up_to(row, first)?;
        }
        let (mut chunk, mut next) = (Chunk::new(first), first);
        if let Some((at, stored)) = before {
            // A damaged value is left to its readers (they report it); the
            // run then starts a chunk of its own.
            if let (Some((_, at_seq)), Ok(held)) =
                (keys::parse_execution(&at), executions::count(&stored))
            {
                // A checkpoint cut short by a crash may have stored some of
                // these in that chunk already: they are not stored twice.
                next = (at_seq + held as u64).clamp(first, last + 1);
                chunk = Chunk::extending(at_seq, &stored, next)
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| Chunk::new(next));
            }
        }
        let fresh = &group[(next - first) as usize..];
        if fresh.is_empty() {
            return Ok(());
        }
        for record in fresh {
            if chunk.is_full() {
                let (key, bytes) = std::mem::replace(&mut chunk, Chunk::new(next)).finish(row);
                self.tree.insert(key, bytes)?;
            }
            chunk.push(record);
            next += 1;
        }
        let (key, bytes) = chunk.finish(row);
        self.tree.insert(key, bytes)?;
        Ok(())
    }

    /// The session's execution value in sled with the greatest key at or
    /// before number `seq`.
    fn last_execution_up_to(
        &self,
        row: Uuid,
        seq: u64,
    ) -> Result<Option<(IVec, IVec)>, StoreError> {
        Ok(self
            .tree
            .range(keys::execution(row, 0)..=keys::execution(row, seq))
            .next_back()
            .transpose()?)
    }

    /// Bytes free for this process on the data dir's file system.
    pub(crate) fn free_bytes(&self) -> std::io::Result<u64> {
        use std::os::unix::ffi::OsStrExt as _;
        let path = std::ffi::CString::new(self.dir.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let mut stats = std::mem::MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: `path` is a valid C string and `stats` is written by
        // statvfs before it is read, only on success.
        let stats = unsafe {
            if libc::statvfs(path.as_ptr(), stats.as_mut_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            stats.assume_init()
        };
        Ok(stats.f_bavail as u64 * stats.f_frsize as u64)
    }

    /// Applies one batch atomically (one tree, one `apply_batch`).
    pub(crate) fn apply(&self, batch: sled::Batch) -> Result<(), StoreError> {
        Ok(self.tree.apply_batch(batch)?)
    }

    /// Keys of a session's executions, for purging.
    pub(crate) fn execution_keys(&self, session_row: Uuid) -> Result<Vec<IVec>, StoreError> {
        self.scan_prefix(&keys::executions_prefix(session_row), false)
            .map(|item| item.map(|(key, _)| key))
            .collect()
    }

    /// Makes everything applied to sled so far durable (one fsync).
    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
impl Store {
    /// Applies `ops` to the overlay as log record `seq` would.
    pub(crate) fn apply_through_overlay(&self, seq: u64, ops: &[super::WriteOp]) {
        use super::WriteOp;
        self.apply_logged(
            seq,
            ops.iter().filter_map(|op| match op {
                WriteOp::Put { key, value } => Some((&key[..], Some(&value[..]))),
                WriteOp::Remove { key } => Some((&key[..], None)),
                WriteOp::Audit(_) => None,
            }),
        );
    }

    /// The `duration_ms` of a session's stored executions, newest first
    /// (tests number executions by it).
    pub(crate) fn execution_durations(&self, session_row: Uuid) -> Vec<u64> {
        self.executions(session_row, usize::MAX)
            .unwrap()
            .iter()
            .map(|e| e.duration_ms)
            .collect()
    }
}

/// Name of the checkpoint mark: the last log record sled holds, kept
/// outside sled (8 bytes BE, crc32 of them LE), written after sled's fsync.
/// Sled loses its newest writes silently when its files are damaged; this
/// is how recovery knows.
const CHECKPOINT_MARK: &str = "checkpoint";

/// The checkpoint mark, if the store has one (a store of the previous
/// format, or one that never checkpointed, has none).
fn read_checkpoint_mark(dir: &Path) -> Result<Option<u64>, StoreError> {
    let bytes = match std::fs::read(dir.join(CHECKPOINT_MARK)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StoreError::Sled(format!(
                "reading the checkpoint mark: {e}"
            )))
        }
    };
    if bytes.len() != 12 || crc32fast::hash(&bytes[..8]).to_le_bytes() != bytes[8..] {
        return Err(StoreError::Damaged(format!(
            "the checkpoint mark {} fails its checksum",
            dir.join(CHECKPOINT_MARK).display()
        )));
    }
    Ok(Some(u64::from_be_bytes(
        bytes[..8].try_into().expect("8 bytes"),
    )))
}

/// Replaces the checkpoint mark atomically (write, fsync, rename, fsync
/// the dir), with mode 0600.
fn write_checkpoint_mark(dir: &Path, through: u64) -> Result<(), StoreError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let fail = |e: std::io::Error| StoreError::Sled(format!("writing the checkpoint mark: {e}"));
    let mut bytes = through.to_be_bytes().to_vec();
    bytes.extend_from_slice(&crc32fast::hash(&bytes).to_le_bytes());
    let temporary = dir.join(format!("{CHECKPOINT_MARK}.tmp"));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temporary)
        .map_err(fail)?;
    file.write_all(&bytes).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&temporary, dir.join(CHECKPOINT_MARK)).map_err(fail)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(fail)
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

    fn numbered(seq: u64) -> ToolExecution {
        ToolExecution {
            tool_name: "grep".into(),
            tool_id: None,
            arguments: "null".into(),
            result: "null".into(),
            error: None,
            duration_ms: seq,
            tokens_used: 1,
            executed_at: 2_000,
            recorded_at: 2_000 + seq as i64,
        }
    }

    /// Opens the store in `dir` again after the previous one in this
    /// process was dropped: sled releases its file lock from a background
    /// thread, a moment after the drop, so the first attempts may find it
    /// still held.
    fn open_again(dir: &Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir, 1 << 20, false) {
                Ok(opened) => return opened.store,
                Err(StoreError::Sled(message))
                    if message.contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("reopening {}: {e}", dir.display()),
            }
        }
    }

    #[test]
    fn the_session_filter_answers_absent_only_after_a_full_walk_and_never_for_a_stored_key() {
        let dir = tempfile::tempdir().unwrap();
        let tenant = Uuid::from_u128(0x7);
        let named = |id: &str| {
            let mut session = session_at(1_700_000_000_000, 60, 3600);
            session.tenant_id = tenant;
            session.session_id = id.into();
            session
        };
        let (in_sled, in_overlay, rebuilt) =
            (named("in-sled"), named("in-overlay"), named("rebuilt"));
        {
            let store = Store::open(dir.path(), 1 << 20, false).unwrap().store;
            store.apply_through_overlay(1, &WriteOp::new_session(&in_sled));
            store.checkpoint(1).unwrap();
        }
        let store = open_again(dir.path());
        store.apply_through_overlay(2, &WriteOp::new_session(&in_overlay));
        // Nothing walked yet: every id may be there.
        assert!(store.may_hold_session(tenant, "new"));
        assert_eq!(store.session_records().count(), 2);
        assert!(!store.may_hold_session(tenant, "new"));
        assert!(!store.may_hold_session(Uuid::from_u128(0x8), "in-sled"));
        assert!(store.may_hold_session(tenant, "in-sled"));
        assert!(store.may_hold_session(tenant, "in-overlay"));
        assert!(!store.may_hold_session(tenant, "rebuilt"));
        assert!(store.put_rebuilt(&rebuilt, &[]).unwrap());
        assert!(store.may_hold_session(tenant, "rebuilt"));
        // A purged key leaves with the next rebuild; the others stay.
        let gone = keys::session(tenant, "in-overlay");
        store.apply_through_overlay(3, &[WriteOp::Remove { key: gone }]);
        assert!(store.may_hold_session(tenant, "in-overlay"));
        assert_eq!(store.rebuild_session_filter().unwrap(), Some(2));
        assert!(!store.may_hold_session(tenant, "in-overlay"));
        assert!(store.may_hold_session(tenant, "in-sled"));
        assert!(store.may_hold_session(tenant, "rebuilt"));
        store.apply_through_overlay(4, &WriteOp::new_session(&named("later")));
        assert!(store.may_hold_session(tenant, "later"));
        // A walk cut short completes nothing.
        let fresh = Store::open(tempfile::tempdir().unwrap().path(), 1 << 20, false)
            .unwrap()
            .store;
        fresh.apply_through_overlay(1, &WriteOp::new_session(&in_sled));
        fresh.apply_through_overlay(2, &WriteOp::new_session(&in_overlay));
        assert_eq!(fresh.session_records().take(1).count(), 1);
        assert!(fresh.may_hold_session(tenant, "new"));
    }

    #[test]
    fn executions_a_cut_short_checkpoint_stored_are_not_stored_twice() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, false).unwrap().store;
        let row = Uuid::from_u128(0xc);
        let put = |seqs: std::ops::RangeInclusive<u64>| -> Vec<WriteOp> {
            seqs.map(|n| WriteOp::put_execution(row, n, &numbered(n)))
                .collect()
        };
        store.apply_through_overlay(1, &put(1..=5));
        store.checkpoint(1).unwrap();
        // The log replays 3 to 7 after a crash: 3 to 5 are in the chunk.
        store.apply_through_overlay(2, &put(3..=7));
        assert_eq!(store.execution_durations(row), [7, 6, 5, 4, 3, 2, 1]);
        store.checkpoint(2).unwrap();
        assert_eq!(store.execution_durations(row), [7, 6, 5, 4, 3, 2, 1]);
        let stored: Vec<(IVec, IVec)> = store
            .tree
            .scan_prefix(keys::executions_prefix(row))
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(stored.len(), 1, "one chunk");
        assert_eq!(super::super::executions::count(&stored[0].1).unwrap(), 7);
        // All of them already there, from the chunk's own first: nothing
        // is written, and the chunk is not replaced by a shorter one.
        store.apply_through_overlay(3, &put(2..=4));
        store.checkpoint(3).unwrap();
        store.apply_through_overlay(4, &put(1..=3));
        store.checkpoint(4).unwrap();
        assert_eq!(store.execution_durations(row), [7, 6, 5, 4, 3, 2, 1]);
    }

    #[test]
    fn singles_of_an_older_release_inside_a_new_chunk_go() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, false).unwrap().store;
        let row = Uuid::from_u128(0xd);
        // A release before chunks stored 3 to 5 alone, and crashed before
        // its checkpoint mark: the log replays 3 to 7.
        for n in 3..=5u64 {
            store
                .tree
                .insert(keys::execution(row, n), record::encode(&numbered(n)))
                .unwrap();
        }
        let replayed: Vec<WriteOp> = (3..=7u64)
            .map(|n| WriteOp::put_execution(row, n, &numbered(n)))
            .collect();
        store.apply_through_overlay(1, &replayed);
        store.checkpoint(1).unwrap();
        assert_eq!(store.execution_durations(row), [7, 6, 5, 4, 3]);
        assert_eq!(
            store.tree.scan_prefix(keys::executions_prefix(row)).count(),
            1
        );
    }

    #[test]
    fn a_damaged_execution_value_stops_neither_recovery_nor_checkpoints() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, false).unwrap().store;
        let row = Uuid::from_u128(0xe);
        store
            .tree
            .insert(
                keys::execution(row, 1),
                &[super::super::executions::CHUNK, 9, 0][..],
            )
            .unwrap();
        assert_eq!(store.last_executions().unwrap()[&row], u64::MAX);
        store.apply_through_overlay(1, &[WriteOp::put_execution(row, 2, &numbered(2))]);
        store.checkpoint(1).unwrap();
        // Its reader still reports the damage.
        assert!(store.executions(row, 10).is_err());
    }

    #[test]
    fn checkpoints_fold_executions_into_chunks_that_read_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open(dir.path(), 1 << 20, false).unwrap().store;
        let a = session_at(1_000, 3600, 3600);
        let b_row = Uuid::from_u128(0xb);
        let mut log_seq = 0;
        store.apply_through_overlay(1, &[WriteOp::put_session(&a)]);
        let mut next = 1u64;
        // Rounds of different sizes, a checkpoint after each: chunks are
        // started, extended, and split at CHUNK_MAX.
        for round in [1u64, 2, 70, 5, 72] {
            for _ in 0..round {
                log_seq += 1;
                store.apply_through_overlay(
                    log_seq,
                    &[
                        WriteOp::put_execution(a.id, next, &numbered(next)),
                        WriteOp::put_execution(b_row, next, &numbered(next)),
                    ],
                );
                next += 1;
            }
            store.checkpoint(log_seq).unwrap();
        }
        // A last one still in the overlay.
        store.apply_through_overlay(
            log_seq + 1,
            &[WriteOp::put_execution(a.id, next, &numbered(next))],
        );
        for reopen in [false, true] {
            if reopen {
                store.checkpoint(log_seq + 1).unwrap();
                drop(store);
                store = open_again(dir.path());
            }
            assert_eq!(
                store.execution_durations(a.id),
                (1..=next).rev().collect::<Vec<_>>(),
                "reopened: {reopen}"
            );
            assert_eq!(store.executions(b_row, 1_000).unwrap().len(), 150);
            assert_eq!(store.executions(a.id, 3).unwrap().len(), 3);
            // The record counts none: every execution is replayed onto it,
            // whether found by looking (a read) or from the one scan of the
            // executions (recovery).
            let back = store.session(a.tenant_id, &a.session_id).unwrap().unwrap();
            assert_eq!(back.tool_execution_count, next);
            let last = store.last_executions().unwrap();
            assert_eq!((last[&a.id], last[&b_row]), (next, 150));
            let key = keys::session(a.tenant_id, &a.session_id);
            let bytes = store.get(&key).unwrap().unwrap();
            let (known, replayed) = store
                .decode_session_replayed(&key, &bytes, Some(&last))
                .unwrap();
            assert_eq!((known.tool_execution_count, replayed), (next, next));
            // A record that is not behind is not read against executions.
            let mut current = a.clone();
            current.tool_execution_count = next;
            let bytes = record::encode(&current);
            let (_, replayed) = store
                .decode_session_replayed(&key, &bytes, Some(&last))
                .unwrap();
            assert_eq!(replayed, 0);
        }
        // Few values in sled, none over the limit.
        let stored: Vec<(IVec, IVec)> = store
            .tree
            .scan_prefix(keys::executions_prefix(a.id))
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            stored.len() <= 6,
            "{} values for {next} executions",
            stored.len()
        );
        for (key, value) in &stored {
            let (_, first) = keys::parse_execution(key).unwrap();
            let held = super::super::executions::records(first, value)
                .unwrap()
                .len();
            assert!(held <= super::super::executions::CHUNK_MAX);
        }
    }

    #[test]
    fn reads_see_the_overlay_over_sled_until_a_checkpoint_folds_it_in() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, false).unwrap().store;
        let old = session_at(1_000, 3600, 3600);
        apply(
            &store,
            vec![WriteOp::put_session(&old), WriteOp::index_session(&old)],
        );
        let mut newer = old.clone();
        newer.version += 1;
        let key = keys::session(newer.tenant_id, &newer.session_id);
        let value = record::encode(&newer);
        let gone = keys::created(old.tenant_id, old.created_at, &old.session_id);
        store
            .overlay()
            .apply(1, [(&key[..], Some(&value[..])), (&gone[..], None)]);
        let read = |store: &Store| {
            store
                .session(old.tenant_id, &old.session_id)
                .unwrap()
                .unwrap()
        };
        assert_eq!(read(&store).version, newer.version);
        assert_eq!(
            store.tenant_ids_newest_first(old.tenant_id, None).count(),
            0
        );
        // The pacing hook runs once before each change written.
        let mut hooked = 0;
        assert_eq!(store.checkpoint_with(0, || hooked += 1).unwrap(), Some(1));
        assert_eq!(hooked, 2);
        assert!(store.overlay().is_empty());
        assert_eq!(read(&store).version, newer.version);
        assert_eq!(
            store.tenant_ids_newest_first(old.tenant_id, None).count(),
            0
        );
        assert_eq!(store.meta_u64(WAL_THROUGH).unwrap(), 1);
    }

    #[test]
    fn executions_past_the_record_are_replayed_onto_a_live_session() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 20, false).unwrap().store;
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
