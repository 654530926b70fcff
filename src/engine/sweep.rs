//! Housekeeping: expiring overdue sessions (the periodic sweep and
//! `POST /admin/sessions/cleanup`) and purging final sessions past their
//! retention.

use std::collections::HashMap;

use actix::prelude::*;
use futures::future::join_all;
use uuid::Uuid;

use super::handle::Engine;
use super::outcome::storage;
use super::session::{self, SessionActor};
use super::shared::FAN_OUT;
use super::tenant::Purge;
use crate::model::SessionError;

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
        let mut expired = 0;
        for chunk in self.all_actors().chunks(FAN_OUT) {
            let answers = join_all(chunk.iter().map(|a| a.send(session::ExpireIfDue))).await;
            expired += answers
                .into_iter()
                .filter(|a| matches!(a, Ok(true)))
                .count();
        }
        Ok(expired)
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

    /// Runs the sweep forever: overdue sessions and retention.
    pub async fn sweep_forever(self) {
        let mut ticker = tokio::time::interval(self.sweep_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if !self.is_ready() {
                continue;
            }
            let expired = self.cleanup().await.unwrap_or(0);
            let purged = self.purge().await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "retention purge failed");
                0
            });
            tracing::debug!(expired, purged, "sweep done");
        }
    }
}
