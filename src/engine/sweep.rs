//! Housekeeping: expiring overdue sessions (the periodic sweep and
//! `POST /admin/sessions/cleanup`) and purging final sessions past their
//! retention.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures::future::join_all;
use uuid::Uuid;

use super::handle::Engine;
use super::outcome::storage;
use super::session::{self, SessionActor};
use super::shared::FAN_OUT;
use super::tenant::Purge;
use crate::model::SessionError;

/// A difference between the wall clock and the monotonic clock since the
/// last check that counts as a jump (NTP slews far slower than this).
const CLOCK_JUMP: Duration = Duration::from_secs(1);

impl Engine {
    /// Every live actor's address.
    pub(super) fn all_actors(&self) -> Vec<Addr<SessionActor>> {
        self.shared
            .directories
            .values()
            .flat_map(|d| d.iter().map(|e| e.value().clone()).collect::<Vec<_>>())
            .collect()
    }

    /// Expires every overdue session now; answers how many expired.
    pub async fn cleanup(&self) -> Result<usize, SessionError> {
        self.ensure_ready()?;
        Ok(self.ask_every_actor(false).await)
    }

    /// Sends every live actor [`session::ExpireIfDue`]; answers how many
    /// expired.
    async fn ask_every_actor(&self, rearm: bool) -> usize {
        let mut expired = 0;
        for chunk in self.all_actors().chunks(FAN_OUT) {
            let answers =
                join_all(chunk.iter().map(|a| a.send(session::ExpireIfDue { rearm }))).await;
            expired += answers
                .into_iter()
                .filter(|a| matches!(a, Ok(true)))
                .count();
        }
        expired
    }

    /// Deletes final sessions older than the retention; answers how many.
    pub async fn purge(&self) -> Result<usize, SessionError> {
        let cutoff = self.shared.clock.now() - self.shared.retention_ms;
        let store = self.shared.store.clone();
        let due = tokio::task::spawn_blocking(move || store.finished_before(cutoff))
            .await
            .map_err(|e| SessionError::Storage(e.to_string()))?
            .map_err(storage)?;
        let mut by_tenant: HashMap<Uuid, Vec<String>> = HashMap::new();
        for (tenant, id) in due {
            by_tenant.entry(tenant).or_default().push(id);
        }
        // Each tenant's supervisor deletes its own: ordered with its
        // admissions, a purge can never remove a session re-created under
        // the same id.
        let mut purged = 0;
        for (tenant, session_ids) in by_tenant {
            if let Some(supervisor) = self.supervisor(tenant) {
                purged += supervisor
                    .send(Purge { session_ids })
                    .await
                    .map_err(|_| SessionError::Unavailable)?;
            }
        }
        if purged > 0 {
            self.flush().await?;
            tracing::info!(purged, "purged final sessions past retention");
        }
        Ok(purged)
    }

    /// Rebuilds the store's session filter once it has taken many keys
    /// since its last walk (purged sessions' keys stay in a Bloom filter:
    /// see `persist::session_filter`), on a blocking thread.
    async fn rebuild_session_filter_if_due(&self) {
        if !self.shared.store.session_filter_due() {
            return;
        }
        let store = self.shared.store.clone();
        let started = Instant::now();
        match tokio::task::spawn_blocking(move || store.rebuild_session_filter()).await {
            Ok(Ok(Some(keys))) => tracing::info!(
                keys,
                took_ms = started.elapsed().as_millis() as u64,
                "session filter rebuilt from the stored session keys"
            ),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "session filter rebuild failed; the old filter goes on")
            }
            Err(e) => tracing::warn!(error = %e, "session filter rebuild did not finish"),
        }
    }

    /// Runs the sweep forever: retention, and overdue sessions after a jump
    /// of the wall clock.
    ///
    /// Every actor has its own timer, so an overdue session needs no sweep
    /// while the clock runs evenly. Timers count monotonic time, though, and
    /// deadlines are wall-clock instants: after the wall clock jumps (an NTP
    /// step, a resumed VM) timers fire at the wrong time. The sweep notices
    /// the jump (the wall clock moved more or less than the monotonic one
    /// since the start or the last jump, by at least [`CLOCK_JUMP`]) and
    /// only then asks every actor to drop its timers, to expire or turn idle
    /// if due, and to arm them again. Asking every actor on every tick cost
    /// a million messages per tick with a million sessions, which put the
    /// p99 of creates at up to 167 ms in the rounds it fell in.
    pub async fn sweep_forever(self) {
        let mut ticker = tokio::time::interval(self.sweep_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let clock = self.shared.clock.clone();
        let mut since = (Instant::now(), clock.now());
        loop {
            ticker.tick().await;
            if !self.is_ready() {
                // Not reset: a jump during recovery moved the timers of the
                // sessions restored before it.
                continue;
            }
            let moved = clock.now() - since.1;
            let elapsed = since.0.elapsed().as_millis() as i64;
            let expired = if (moved - elapsed).abs() >= CLOCK_JUMP.as_millis() as i64 {
                tracing::info!(
                    jump_ms = moved - elapsed,
                    "the wall clock jumped: re-checking every session's deadlines"
                );
                since = (Instant::now(), clock.now());
                self.ask_every_actor(true).await
            } else {
                0
            };
            let purged = self.purge().await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "retention purge failed");
                0
            });
            self.rebuild_session_filter_if_due().await;
            tracing::debug!(expired, purged, "sweep done");
        }
    }
}
