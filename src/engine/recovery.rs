//! Start-up recovery: every non-final session in sled gets its actor back
//! with its remaining time; sessions that became overdue while the process
//! was down come back `expired`, ended at the instant they were due.
//!
//! With the PostgreSQL tier on and no session in sled at all (a lost or new
//! data dir), the live sessions are first rebuilt from PostgreSQL, the
//! system of record. The engine stays not ready until PostgreSQL answers:
//! serving from an empty store would forget sessions clients still hold.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use std::time::Duration;

use uuid::Uuid;

use crate::model::{Millis, Session, SessionError, Status, Transition};
use crate::persist::postgres::Postgres;
use crate::persist::WriteOp;

use super::handle::Engine;
use super::outcome::storage;
use super::tenant::{self, LiveCount};

/// What recovery found.
#[derive(Debug, Default, Clone, Copy)]
pub struct RecoveryReport {
    /// Live sessions whose actors were restarted.
    pub restored: usize,
    /// Sessions that were overdue and are now expired.
    pub expired: usize,
    /// Final sessions left as they are.
    pub final_kept: usize,
    /// Records of tenants no longer configured (left untouched).
    pub orphaned: usize,
    /// Records that could not be read (logged, left untouched).
    pub unreadable: usize,
    /// Live sessions rebuilt from PostgreSQL into an empty store.
    pub rebuilt: usize,
}

pub(super) enum Found {
    /// A live session, and whether its record must be written again.
    Live(Session, bool),
    Expired(Session),
    Final,
    Orphan,
}

impl Engine {
    /// Loads every session from sled, restarts the live ones, expires the
    /// overdue ones, then purges what is past retention and marks the engine
    /// ready. Call once, right after [`Engine::start`].
    pub async fn recover(&self) -> Result<RecoveryReport, SessionError> {
        let started = std::time::Instant::now();
        let rebuilt = self.rebuild_if_pending().await?;
        let shared = self.shared.clone();
        let idle_after_ms = shared.idle_after_ms;
        let known: Arc<HashSet<Uuid>> = Arc::new(self.tenants.keys().copied().collect());
        let now = shared.clock.now();
        // Which sessions have executions, and up to which number: one read
        // of the execution keys, so that a record that is not behind (nearly
        // all) needs no look of its own.
        let last_executions = {
            let shared = shared.clone();
            Arc::new(
                tokio::task::spawn_blocking(move || shared.store.last_executions())
                    .await
                    .map_err(|e| SessionError::Storage(format!("reading executions: {e}")))?
                    .map_err(storage)?,
            )
        };
        // Three stages on their own threads, streaming, so a million records
        // are never all in memory at once: one walks the tree, DECODERS
        // decode the records (one that is behind also reads its executions
        // past it), and this task restores. On two cores the walk and the decoding on
        // one thread were the longest chain (4.7 of 6.5 s for 1M sessions).
        // Records travel in batches, so a thread wakes once per batch: one
        // wake-up per session was about 6 % of the samples.
        let (records_tx, records_rx) = std::sync::mpsc::sync_channel::<Vec<Record>>(2 * DECODERS);
        let walk = {
            let shared = shared.clone();
            tokio::task::spawn_blocking(move || {
                let mut batch = Vec::with_capacity(BATCH);
                for item in shared.store.session_records() {
                    batch.push(item.map_err(storage));
                    if batch.len() == BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                        if records_tx.send(full).is_err() {
                            return;
                        }
                    }
                }
                if !batch.is_empty() {
                    let _ = records_tx.send(batch);
                }
            })
        };
        let records_rx = Arc::new(Mutex::new(records_rx));
        let (tx, mut rx) =
            tokio::sync::mpsc::channel::<Vec<Result<Found, SessionError>>>(2 * DECODERS);
        let decoders: Vec<_> = (0..DECODERS)
            .map(|_| {
                let (shared, known, records_rx, tx, last_executions) = (
                    shared.clone(),
                    known.clone(),
                    records_rx.clone(),
                    tx.clone(),
                    last_executions.clone(),
                );
                tokio::task::spawn_blocking(move || loop {
                    let next = records_rx
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .recv();
                    let Ok(batch) = next else {
                        return;
                    };
                    let found = batch
                        .into_iter()
                        .map(|record| {
                            let (key, bytes) = record?;
                            let (session, replayed) = shared
                                .store
                                .decode_session_replayed(&key, &bytes, Some(&last_executions))
                                .map_err(storage)?;
                            Ok(classify(session, replayed, &known, now, idle_after_ms))
                        })
                        .collect();
                    if tx.blocking_send(found).is_err() {
                        return;
                    }
                })
            })
            .collect();
        // Only the decoders hold these: when they are gone (a panic), the
        // walk's next send fails and it ends, instead of waiting forever.
        drop(records_rx);
        drop(tx);
        let mut report = RecoveryReport {
            rebuilt,
            ..RecoveryReport::default()
        };
        // How far it is, every few seconds (a million sessions take a few).
        let mut logged = std::time::Instant::now();
        let mut read = 0u64;
        let mut restorer = tenant::Restorer::new(&self.shared);
        while let Some(batch) = rx.recv().await {
            for found in batch {
                read += 1;
                if read % 1024 == 0 && logged.elapsed() >= PROGRESS_EVERY {
                    logged = std::time::Instant::now();
                    let elapsed = started.elapsed().as_secs_f64();
                    tracing::info!(
                        sessions_read = read,
                        restored = report.restored,
                        expired = report.expired,
                        per_second = (read as f64 / elapsed.max(0.001)) as u64,
                        elapsed_ms = (elapsed * 1000.0) as u64,
                        "recovery: in progress"
                    );
                }
                self.take(found, &mut report, &mut restorer);
            }
        }
        restorer.finish();
        // A decoder that panicked fails recovery: its batch was not read.
        for stage in decoders.into_iter().chain(std::iter::once(walk)) {
            stage
                .await
                .map_err(|e| SessionError::Storage(e.to_string()))?;
        }
        // Each supervisor answers after handling everything sent to it
        // before (restarts of actors that died meanwhile).
        for tenant in self.tenants.values() {
            let _ = tenant.supervisor.send(LiveCount).await;
        }
        self.flush().await?;
        if report.orphaned > 0 {
            tracing::warn!(
                count = report.orphaned,
                "sessions of tenants that are no longer configured were left on disk"
            );
        }
        self.purge().await?;
        self.ready.store(true, Ordering::Release);
        tracing::info!(
            restored = report.restored,
            rebuilt_from_postgres = report.rebuilt,
            expired = report.expired,
            final_kept = report.final_kept,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "recovery finished"
        );
        Ok(report)
    }
}

impl Engine {
    /// Acts on one session found by recovery: restores it, writes it final,
    /// or counts it.
    fn take(
        &self,
        found: Result<Found, SessionError>,
        report: &mut RecoveryReport,
        restorer: &mut tenant::Restorer,
    ) {
        match found {
            // One bad record must not keep every other session down.
            Err(e) => {
                tracing::error!(error = %e, "a stored session could not be read; skipped");
                report.unreadable += 1;
            }
            Ok(Found::Live(session, rewrite)) => {
                report.restored += 1;
                if rewrite {
                    self.shared
                        .write_behind
                        .submit(vec![WriteOp::put_session(&session)], false);
                }
                if let Some(handle) = self.tenants.get(&session.tenant_id) {
                    restorer.restore(handle.limits.id, &handle.link, session);
                }
            }
            Ok(Found::Expired(session)) => {
                report.expired += 1;
                tracing::info!(session_id = %session.session_id, tenant = %session.tenant_id, "session expired while the process was down");
                self.shared
                    .write_behind
                    .submit(WriteOp::final_session(&session), false);
            }
            Ok(Found::Final) => report.final_kept += 1,
            Ok(Found::Orphan) => report.orphaned += 1,
        }
    }
}

/// Threads decoding stored records during recovery.
const DECODERS: usize = 2;
/// Records handed from one recovery stage to the next at a time.
const BATCH: usize = 256;

/// A stored session record, undecoded.
type Record = Result<(sled::IVec, sled::IVec), SessionError>;

/// What recovery does with a decoded session (`replayed`: executions past
/// its record, which is then behind).
pub(super) fn classify(
    mut session: Session,
    replayed: u64,
    known: &HashSet<Uuid>,
    now: Millis,
    idle_after_ms: Millis,
) -> Found {
    if !known.contains(&session.tenant_id) {
        Found::Orphan
    } else if session.status.is_final() {
        Found::Final
    } else {
        match session.due(now, idle_after_ms) {
            Transition::Expire(reason) => {
                let at = session.expires_at();
                session.finish(Status::Expired, reason, at);
                Found::Expired(session)
            }
            Transition::BecomeIdle => {
                session.become_idle();
                Found::Live(session, true)
            }
            // A record behind its executions (the process died before the
            // coalesced write) is written again, so every copy (PostgreSQL
            // included) catches up.
            Transition::None => Found::Live(session, replayed > 0),
        }
    }
}

/// How often recovery logs how far it is.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Meta key present while live sessions are still to be rebuilt from
/// PostgreSQL (set when the engine starts on a new or lost data dir).
pub const REBUILD_PENDING: &str = "pg-rebuild-pending";

impl Engine {
    /// Rebuilds the live sessions from PostgreSQL into the store if a
    /// rebuild is pending: waits at most `rebuild_wait` for PostgreSQL, then
    /// leaves the rebuild to a background task (serving from sled alone
    /// meanwhile). Answers how many sessions were written now.
    async fn rebuild_if_pending(&self) -> Result<usize, SessionError> {
        let Some(postgres) = self.postgres.clone() else {
            return Ok(0);
        };
        if self
            .shared
            .store
            .meta(REBUILD_PENDING)
            .map_err(storage)?
            .is_none()
        {
            return Ok(0);
        }
        let deadline = tokio::time::Instant::now() + self.rebuild_wait;
        match self
            .rebuild_from_postgres(&postgres, Some(deadline))
            .await?
        {
            Some(written) => Ok(written.len()),
            None => {
                tracing::error!(
                    waited_ms = self.rebuild_wait.as_millis() as u64,
                    "PostgreSQL did not answer: serving from sled alone; live sessions are rebuilt from PostgreSQL once it answers"
                );
                let engine = self.clone();
                tokio::spawn(async move {
                    match engine.rebuild_from_postgres(&postgres, None).await {
                        Ok(Some(written)) => engine.restore_rebuilt(written),
                        Ok(None) => {}
                        Err(e) => tracing::error!(error = %e, "rebuilding from PostgreSQL failed"),
                    }
                });
                Ok(0)
            }
        }
    }

    /// Writes PostgreSQL's live sessions of the configured tenants into the
    /// store (those not stored already), retrying until PostgreSQL answers
    /// or `deadline` passes (`None`). Clears the pending marker when done.
    /// With `migrate_on_start`, the migrations are applied first (the
    /// shipper applies them too, concurrently: sqlx's migration lock
    /// serialises the two, and the second finds nothing pending), so a first
    /// start on an empty database does not query tables that do not exist
    /// yet.
    async fn rebuild_from_postgres(
        &self,
        postgres: &Postgres,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Option<Vec<Session>>, SessionError> {
        let tenants: Vec<Uuid> = self.tenants.keys().copied().collect();
        let mut delay = Duration::from_millis(200);
        let mut written = Vec::new();
        let mut after = Uuid::nil();
        let mut migrated = !self.migrate_before_rebuild;
        loop {
            let ready = if migrated {
                Ok(())
            } else {
                postgres.migrate_up().await.map(|()| migrated = true)
            };
            let page = match ready {
                Ok(()) => postgres.live_sessions(&tenants, after, REBUILD_PAGE).await,
                Err(e) => Err(e),
            };
            match page {
                Ok(page) => {
                    let last = page.last().map(|(s, _)| s.id);
                    let store = self.shared.store.clone();
                    let mut page_written = tokio::task::spawn_blocking(move || {
                        let mut out = Vec::new();
                        for (session, executions) in page {
                            if store.put_rebuilt(&session, &executions)? {
                                out.push(session);
                            }
                        }
                        Ok::<_, crate::persist::StoreError>(out)
                    })
                    .await
                    .map_err(|e| SessionError::Storage(e.to_string()))?
                    .map_err(storage)?;
                    written.append(&mut page_written);
                    match last {
                        Some(id) => after = id,
                        None => break,
                    }
                }
                Err(e) => {
                    if deadline.is_some_and(|d| tokio::time::Instant::now() + delay > d) {
                        return Ok(None);
                    }
                    tracing::error!(
                        error = %e,
                        retry_in_ms = delay.as_millis() as u64,
                        "new or lost data dir: waiting for PostgreSQL to rebuild the live sessions"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        let store = self.shared.store.clone();
        tokio::task::spawn_blocking(move || {
            store.remove_meta(REBUILD_PENDING)?;
            store.sync()
        })
        .await
        .map_err(|e| SessionError::Storage(e.to_string()))?
        .map_err(storage)?;
        tracing::info!(
            count = written.len(),
            "live sessions rebuilt from PostgreSQL"
        );
        Ok(Some(written))
    }

    /// Gives sessions rebuilt after start-up their actors (or their final
    /// state, when they became overdue meanwhile).
    fn restore_rebuilt(&self, sessions: Vec<Session>) {
        let now = self.shared.clock.now();
        let known: HashSet<Uuid> = self.tenants.keys().copied().collect();
        let mut restorer = tenant::Restorer::new(&self.shared);
        for session in sessions {
            // Rebuilt sessions are live ones of configured tenants, just
            // written from PostgreSQL: one that turned idle is not written
            // again here.
            match classify(session, 0, &known, now, self.shared.idle_after_ms) {
                Found::Expired(session) => {
                    self.shared
                        .write_behind
                        .submit(WriteOp::final_session(&session), false);
                }
                Found::Live(session, _) => {
                    if let Some(handle) = self.tenants.get(&session.tenant_id) {
                        restorer.restore(handle.limits.id, &handle.link, session);
                    }
                }
                Found::Final | Found::Orphan => {}
            }
        }
        restorer.finish();
    }
}

/// Sessions read from PostgreSQL per query during a rebuild.
const REBUILD_PAGE: usize = 1000;
