//! What operators do across tenants, through the admin API: list every
//! tenant's sessions (filters, keyset pagination newest first), and end
//! sessions one at a time or in bulk by user or by edge-mcp. A termination
//! here is the admin's in the audit log (actor `admin`) and otherwise ends a
//! session exactly as a tenant's DELETE does: its sockets hear it, metrics
//! count it.

use std::cmp::Ordering;
use std::io;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures::future::join_all;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::handle::Engine;
use super::queries::{self, ListQuery, Page};
use super::session;
use super::shared::FAN_OUT;
use crate::model::{Millis, Requester, Session, SessionError};
use crate::persist::backup;

/// Which sessions an operator means: `tenant` (every tenant when `None`)
/// and the filters of `query` (its `offset` is not used).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Only this tenant.
    pub tenant: Option<Uuid>,
    /// The other filters, and paging.
    pub query: ListQuery,
}

impl Engine {
    /// A page of every tenant's sessions, newest first: by creation time,
    /// then tenant id, then session id, all descending, so the order (and
    /// the cursor, which names the last session of a page) is total.
    ///
    /// Each tenant is walked through its creation-order index from where
    /// the cursor leaves it, for at most one page and one more; the pages
    /// are merged. An admin page costs at most `tenants × (limit + 1)`
    /// reads, whatever the number of sessions.
    pub async fn list_all(&self, selection: &Selection) -> Result<Page, SessionError> {
        let query = &selection.query;
        let after = match &query.cursor {
            None => None,
            Some(cursor) => Some(decode_cursor(cursor).ok_or_else(|| {
                SessionError::validation("cursor", "cursor is not one this server handed out")
            })?),
        };
        let mut tenants: Vec<Uuid> = self
            .tenant_ids()
            .filter(|t| selection.tenant.is_none_or(|only| only == *t))
            .collect();
        tenants.sort_unstable();
        let wanted = query.limit.saturating_add(1);
        let chunk = FAN_OUT.min(wanted).max(64);
        let mut found: Vec<Session> = Vec::new();
        for tenant in tenants {
            let before = after
                .as_ref()
                .map(|(at, last_tenant, id)| resume_point(tenant, *at, *last_tenant, id));
            let mut taken = 0;
            self.walk_newest_first(tenant, before, chunk, |session| {
                if !queries::matches(&session, query) {
                    return ControlFlow::Continue(());
                }
                found.push(session);
                taken += 1;
                if taken == wanted {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            })
            .await?;
        }
        found.sort_unstable_by(|a, b| order_key(b).cmp(&order_key(a)));
        let more = found.len() > query.limit;
        found.truncate(query.limit);
        let next_cursor = match (more, found.last()) {
            (true, Some(last)) => Some(encode_cursor_of(last)),
            _ => None,
        };
        let now = self.shared.clock.now();
        Ok(Page {
            sessions: found.iter().map(|s| s.view(now)).collect(),
            next_cursor,
        })
    }

    /// Ends a session at an operator's request (`admin_request` when no
    /// reason is given); a final one is left as it is.
    pub async fn admin_terminate(
        &self,
        tenant: Uuid,
        session_id: &str,
        reason: Option<String>,
    ) -> Result<(), SessionError> {
        self.tenant(tenant)?;
        self.terminate(tenant, session_id, reason, Requester::Admin)
            .await
    }

    /// Ends every live session that `selection` matches (its paging is not
    /// used); answers how many this call ended. Walks the live sessions of
    /// each tenant (the actors in its directory), not the store: final
    /// sessions have nothing to end.
    pub async fn admin_terminate_matching(
        &self,
        selection: &Selection,
        reason: Option<String>,
    ) -> Result<usize, SessionError> {
        self.ensure_writable()?;
        let mut ended = 0;
        let tenants: Vec<Uuid> = self
            .tenant_ids()
            .filter(|t| selection.tenant.is_none_or(|only| only == *t))
            .collect();
        for tenant in tenants {
            let ids: Vec<String> = self
                .shared
                .directory(tenant)
                .iter()
                .map(|entry| entry.key().to_string())
                .collect();
            for ids in ids.chunks(FAN_OUT) {
                let now = self.shared.clock.now();
                let snapshots =
                    join_all(ids.iter().map(|id| self.ask(tenant, id, session::Snapshot))).await;
                let live: Vec<&String> = ids
                    .iter()
                    .zip(snapshots)
                    .filter_map(|(id, snapshot)| match snapshot {
                        // An overdue session ends by expiry on its next
                        // call, not by this termination: not counted.
                        Ok(Some(s))
                            if !s.status.is_final()
                                && s.expires_at() > now
                                && queries::matches(&s, &selection.query) =>
                        {
                            Some(id)
                        }
                        _ => None,
                    })
                    .collect();
                let results = join_all(
                    live.iter()
                        .map(|id| self.admin_terminate(tenant, id, reason.clone())),
                )
                .await;
                for result in results {
                    match result {
                        Ok(()) => ended += 1,
                        // Ended or purged meanwhile: nothing left to end.
                        Err(SessionError::NotFound) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        tracing::info!(
            ended,
            tenant = ?selection.tenant,
            user_id = ?selection.query.user_id,
            edge_mcp_id = ?selection.query.edge_mcp_id,
            "sessions terminated in bulk by an operator"
        );
        Ok(ended)
    }
}

impl Engine {
    /// A backup ([`backup`] format) of every stored session and its
    /// executions, as a stream of chunks. Everything acknowledged before
    /// the call is in it: each live session's coalesced state is queued
    /// and a flush barrier taken first; then a blocking thread reads the
    /// store while the server keeps serving, logging its progress every
    /// few seconds. A read error ends the stream with an error (the
    /// backup lacks its trailer, so a restore refuses it); a client that
    /// goes away stops the thread.
    pub async fn backup(&self) -> Result<mpsc::Receiver<io::Result<Bytes>>, SessionError> {
        self.ensure_ready()?;
        for chunk in self.all_actors().chunks(FAN_OUT) {
            join_all(chunk.iter().map(|a| a.send(session::FlushActivity))).await;
        }
        self.flush().await?;
        let (tx, rx) = mpsc::channel(8);
        let store = self.shared.store.clone();
        let taken_at = self.shared.clock.now();
        tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut logged = Instant::now();
            let mut out = ChunkWriter::new(tx.clone());
            let result = backup::snapshot(&store, &mut out, taken_at, |counts| {
                if logged.elapsed() >= PROGRESS_EVERY {
                    logged = Instant::now();
                    tracing::info!(
                        sessions = counts.sessions,
                        executions = counts.executions,
                        "backup: in progress"
                    );
                }
            });
            match result {
                Ok(counts) => tracing::info!(
                    sessions = counts.sessions,
                    executions = counts.executions,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "backup: taken"
                ),
                Err(e) => {
                    tracing::error!(error = %e, "backup: stopped; the stream ends without its trailer");
                    let _ = tx.blocking_send(Err(io::Error::other(e.to_string())));
                }
            }
        });
        Ok(rx)
    }
}

/// How often a running backup logs how far it is.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Buffers a blocking writer's bytes into chunks for an async receiver; a
/// receiver that went away fails the next write.
struct ChunkWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChunkWriter {
    const CHUNK: usize = 64 * 1024;

    fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> Self {
        ChunkWriter {
            tx,
            buf: Vec::with_capacity(Self::CHUNK),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(Self::CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl io::Write for ChunkWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= Self::CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// The order of the admin list (compared descending).
fn order_key(session: &Session) -> (Millis, Uuid, &str) {
    (session.created_at, session.tenant_id, &session.session_id)
}

/// Where `tenant`'s walk resumes after the session `(at, last_tenant, id)`
/// (exclusive, in its creation-order index): a tenant ordered before the
/// cursor's still has its sessions created at `at`; one ordered after has
/// shown them.
fn resume_point(tenant: Uuid, at: Millis, last_tenant: Uuid, id: &str) -> (Millis, String) {
    match tenant.cmp(&last_tenant) {
        Ordering::Equal => (at, id.to_owned()),
        Ordering::Less => (at.saturating_add(1), String::new()),
        Ordering::Greater => (at, String::new()),
    }
}

fn encode_cursor_of(last: &Session) -> String {
    encode_cursor(
        last.created_at,
        &last.tenant_id.to_string(),
        &last.session_id,
    )
}

/// The cursor that continues an operator's list after the session of
/// `tenant` created at `created_at` with id `session_id`.
pub fn encode_cursor(created_at: Millis, tenant: &str, session_id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(format!("{created_at}:{tenant}:{session_id}"))
}

fn decode_cursor(cursor: &str) -> Option<(Millis, Uuid, String)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (at, rest) = text.split_once(':')?;
    let (tenant, id) = rest.split_once(':')?;
    Some((at.parse().ok()?, tenant.parse().ok()?, id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_resume_each_tenant_where_the_order_left_it() {
        let tenant = Uuid::from_u128(5);
        let cursor =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("1700:{tenant}:ses:1"));
        assert_eq!(
            decode_cursor(&cursor),
            Some((1700, tenant, "ses:1".to_owned()))
        );
        assert_eq!(decode_cursor("bm90IGEgY3Vyc29y"), None);
        // Descending (created, tenant, id): after (1700, t5, "b"), tenant 5
        // goes on below "b" at 1700; tenant 4 (after it) still shows all of
        // 1700; tenant 6 (before it) showed 1700 already.
        assert_eq!(resume_point(tenant, 1700, tenant, "b"), (1700, "b".into()));
        assert_eq!(
            resume_point(Uuid::from_u128(4), 1700, tenant, "b"),
            (1701, String::new())
        );
        assert_eq!(
            resume_point(Uuid::from_u128(6), 1700, tenant, "b"),
            (1700, String::new())
        );
    }
}
