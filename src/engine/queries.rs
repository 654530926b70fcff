//! Reads across many sessions: a tenant's session list (filters, keyset
//! pagination newest first, `offset`) and its aggregate metrics. Live
//! sessions answer from their actors, final ones from sled.

use std::ops::ControlFlow;

use base64::Engine as _;
use futures::future::join_all;
use serde::Serialize;
use uuid::Uuid;

use super::handle::Engine;
use super::outcome::storage;
use super::session;
use super::shared::FAN_OUT;
use crate::model::{ClientType, Millis, Session, SessionError, SessionView, Status};
use crate::persist::StoreError;

/// A page of a session list.
#[derive(Debug, Clone)]
pub struct Page {
    /// The sessions, newest first.
    pub sessions: Vec<SessionView>,
    /// Cursor for the next page, when there is one.
    pub next_cursor: Option<String>,
}

/// Filters and paging of a session list.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Only this status.
    pub status: Option<Status>,
    /// Only this client type.
    pub client_type: Option<ClientType>,
    /// Only this edge-mcp id.
    pub edge_mcp_id: Option<String>,
    /// Only this user.
    pub user_id: Option<Uuid>,
    /// Page size (1–1000, checked by the caller).
    pub limit: usize,
    /// Continue after this cursor.
    pub cursor: Option<String>,
    /// Skip this many matches (after the cursor).
    pub offset: usize,
}

/// A tenant's aggregate figures.
#[derive(Debug, Clone, Default, Serialize, utoipa::ToSchema)]
pub struct TenantMetrics {
    /// Sessions now active.
    pub active_sessions: u64,
    /// Sessions now idle.
    pub idle_sessions: u64,
    /// Sessions (any status) still known, created since `since`.
    pub total_sessions: u64,
    /// Tool executions over those sessions.
    pub total_tool_executions: u64,
    /// Tokens over those sessions.
    pub total_tokens_used: u64,
    /// Mean age (live) or lifetime (final) in minutes.
    pub avg_session_duration_minutes: f64,
}

impl Engine {
    /// Live or stored state of many sessions at once, in order; `None` for
    /// ids purged in between.
    async fn snapshots(
        &self,
        tenant: Uuid,
        ids: &[String],
    ) -> Result<Vec<Option<Session>>, SessionError> {
        let live = join_all(ids.iter().map(|id| self.ask(tenant, id, session::Snapshot))).await;
        let mut out = Vec::with_capacity(ids.len());
        let mut missing = Vec::new();
        for (i, answer) in live.into_iter().enumerate() {
            let answer = answer?;
            if answer.is_none() {
                missing.push((i, ids[i].clone()));
            }
            out.push(answer);
        }
        if missing.is_empty() {
            return Ok(out);
        }
        // Final sessions come from sled: read them off the async workers.
        let shared = self.shared.clone();
        let found = tokio::task::spawn_blocking(move || {
            missing
                .into_iter()
                .map(|(i, id)| Ok((i, shared.stored(tenant, &id)?)))
                .collect::<Result<Vec<_>, StoreError>>()
        })
        .await
        .map_err(|e| SessionError::Storage(e.to_string()))?
        .map_err(storage)?;
        for (i, session) in found {
            out[i] = session;
        }
        Ok(out)
    }

    /// A page of a tenant's sessions, newest first.
    pub async fn list(&self, tenant: Uuid, query: ListQuery) -> Result<Page, SessionError> {
        let before = match &query.cursor {
            None => None,
            Some(cursor) => Some(decode_cursor(cursor).ok_or_else(|| {
                SessionError::validation("cursor", "cursor is not one this server handed out")
            })?),
        };
        let mut skip = query.offset;
        let mut page: Vec<Session> = Vec::with_capacity(query.limit.min(FAN_OUT));
        let mut more = false;
        // One more than the page (plus what is skipped) tells whether a next page exists.
        let chunk = FAN_OUT
            .min(query.limit.saturating_add(skip).saturating_add(1))
            .max(64);
        self.walk_newest_first(tenant, before, chunk, |session| {
            if !matches(&session, &query) {
                return ControlFlow::Continue(());
            }
            if skip > 0 {
                skip -= 1;
                return ControlFlow::Continue(());
            }
            if page.len() == query.limit {
                more = true;
                return ControlFlow::Break(());
            }
            page.push(session);
            ControlFlow::Continue(())
        })
        .await?;
        let next_cursor = match (more, page.last()) {
            (true, Some(last)) => Some(encode_cursor(last.created_at, &last.session_id)),
            _ => None,
        };
        let now = self.shared.clock.now();
        Ok(Page {
            sessions: page.iter().map(|s| s.view(now)).collect(),
            next_cursor,
        })
    }

    /// A tenant's aggregate figures over sessions created since `since`.
    pub async fn tenant_metrics(
        &self,
        tenant: Uuid,
        since: Option<Millis>,
    ) -> Result<TenantMetrics, SessionError> {
        let since = since.unwrap_or(Millis::MIN);
        let now = self.shared.clock.now();
        let mut metrics = TenantMetrics::default();
        let mut duration_ms_sum: i64 = 0;
        self.walk_newest_first(tenant, None, FAN_OUT, |session| {
            if session.created_at < since {
                return ControlFlow::Break(());
            }
            metrics.total_sessions += 1;
            metrics.total_tool_executions = metrics
                .total_tool_executions
                .saturating_add(session.tool_execution_count);
            metrics.total_tokens_used = metrics
                .total_tokens_used
                .saturating_add(session.total_tokens_used);
            match session.status {
                Status::Active => metrics.active_sessions += 1,
                Status::Idle => metrics.idle_sessions += 1,
                Status::Expired | Status::Terminated => {}
            }
            duration_ms_sum = duration_ms_sum
                .saturating_add(session.terminated_at().unwrap_or(now) - session.created_at);
            ControlFlow::Continue(())
        })
        .await?;
        if metrics.total_sessions > 0 {
            metrics.avg_session_duration_minutes =
                duration_ms_sum as f64 / metrics.total_sessions as f64 / 60_000.0;
        }
        Ok(metrics)
    }

    /// Hands a tenant's sessions (live state from actors, final ones from
    /// sled) to `visit`, newest first and after `before` when given, reading
    /// `chunk` ids at a time, until `visit` breaks or they run out.
    pub(super) async fn walk_newest_first(
        &self,
        tenant: Uuid,
        mut before: Option<(Millis, String)>,
        chunk: usize,
        mut visit: impl FnMut(Session) -> ControlFlow<()>,
    ) -> Result<(), SessionError> {
        self.ensure_ready()?;
        self.tenant(tenant)?;
        if !self.shared.sync_acks {
            // Creates acknowledged from memory may still be queued.
            self.flush().await?;
        }
        loop {
            let ids: Vec<(Millis, String)> = self
                .shared
                .store
                .tenant_ids_newest_first(tenant, before.as_ref().map(|(at, id)| (*at, id.as_str())))
                .take(chunk)
                .collect::<Result<_, _>>()
                .map_err(storage)?;
            let Some(last) = ids.last().cloned() else {
                return Ok(());
            };
            let ids: Vec<String> = ids.into_iter().map(|(_, id)| id).collect();
            for session in self.snapshots(tenant, &ids).await?.into_iter().flatten() {
                if visit(session).is_break() {
                    return Ok(());
                }
            }
            before = Some(last);
        }
    }
}

/// Whether `session` passes the filters of `query`.
pub(super) fn matches(session: &Session, query: &ListQuery) -> bool {
    query.status.is_none_or(|s| s == session.status)
        && query.user_id.is_none_or(|u| Some(u) == session.user_id)
        && query.client_type.is_none_or(|c| c == session.client_type)
        && query
            .edge_mcp_id
            .as_deref()
            .is_none_or(|e| e == session.client.edge_mcp_id())
}

/// The cursor that continues a list after the session created at
/// `created_at` with id `session_id`.
pub fn encode_cursor(created_at: Millis, session_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_at}:{session_id}"))
}

fn decode_cursor(cursor: &str) -> Option<(Millis, String)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (at, id) = text.split_once(':')?;
    Some((at.parse().ok()?, id.to_owned()))
}
impl Engine {
    /// Every stored session (of `tenant`, or of every configured tenant),
    /// created at or after `since`, as resources, one at a time through a
    /// bounded channel: the caller streams them out while the store is read,
    /// so memory stays flat. Live sessions are as last written (at most a
    /// flush interval behind for activity times).
    pub fn export(
        &self,
        since: Option<Millis>,
        tenant: Option<Uuid>,
    ) -> Result<tokio::sync::mpsc::Receiver<SessionView>, SessionError> {
        self.ensure_ready()?;
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let shared = self.shared.clone();
        let runtime = tokio::runtime::Handle::current();
        let known: std::collections::HashSet<Uuid> = self.tenants.keys().copied().collect();
        tokio::task::spawn_blocking(move || {
            let now = shared.clock.now();
            for item in shared.store.all_sessions() {
                let session = match item {
                    Ok(session) => session,
                    Err(e) => {
                        tracing::error!(error = %e, "export: a stored session could not be read; skipped");
                        continue;
                    }
                };
                let wanted = known.contains(&session.tenant_id)
                    && tenant.is_none_or(|t| t == session.tenant_id)
                    && since.is_none_or(|s| session.created_at >= s)
                    && shared.retained(&session);
                // A closed channel (the client went away) or a client that
                // reads nothing for a minute ends the scan and frees the thread.
                if wanted {
                    let sent = runtime.block_on(tokio::time::timeout(
                        std::time::Duration::from_secs(60),
                        tx.send(session.view(now)),
                    ));
                    if !matches!(sent, Ok(Ok(()))) {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let c = encode_cursor(1_700_000_000_000, "ses_abc:def");
        assert_eq!(
            decode_cursor(&c),
            Some((1_700_000_000_000, "ses_abc:def".to_owned()))
        );
        assert_eq!(decode_cursor("not a cursor!"), None);
    }
}
