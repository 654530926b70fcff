//! The PostgreSQL tier: connection pool, migrations, batched shipping of
//! outbox entries, and reading live sessions back for a rebuild.
//!
//! Every statement binds arrays (`UNNEST`), one statement per table per
//! batch; no value is ever spliced into a statement's text. Times travel
//! as Unix milliseconds and are converted by PostgreSQL (`to_timestamp`).

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::time::{Duration, Instant};

use sqlx::migrate::{Migrate, Migrator};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection as _, Row};
use uuid::Uuid;

use super::outbox::Entry;
use crate::cluster::placement::shard_of;
use crate::cluster::registry::{self, RegistryError};
use crate::crypto::TokenHash;
use crate::model::session::{Ending, SessionCredentials};
use crate::model::{AuditEntry, ClientText, ClientType, Millis, Session, Status, ToolExecution};

/// The schema's migrations (`deploy/migrations`), embedded in the binary.
pub static MIGRATOR: Migrator = sqlx::migrate!("deploy/migrations");

/// Connection settings of the tier.
#[derive(Clone)]
pub struct PostgresConfig {
    /// The connection URL (`postgres://user:password@host:port/db`).
    pub url: String,
    /// Most pooled connections.
    pub max_connections: u32,
    /// Server-side limit per statement.
    pub statement_timeout: Duration,
    /// Longest wait for a connection (connecting included).
    pub connect_timeout: Duration,
    /// The cluster's shard count when this node is in a cluster: session
    /// rows are then written with their shard (see
    /// [`crate::cluster::placement::shard_of`]).
    pub cluster_shards: Option<u32>,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password.
        f.debug_struct("PostgresConfig")
            .field("url", &"[redacted]")
            .field("max_connections", &self.max_connections)
            .field("statement_timeout", &self.statement_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("cluster_shards", &self.cluster_shards)
            .finish()
    }
}

/// A PostgreSQL failure, with the server's message.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct PgError {
    message: String,
    /// The server refused the data itself (SQLSTATE class 22 or 23):
    /// retrying the same rows can never succeed.
    data: bool,
    /// A fenced batch's shards this node no longer holds at the epoch it
    /// wrote them under (nothing of the batch was written).
    fenced: Vec<u32>,
}

impl PgError {
    fn other(message: String) -> Self {
        PgError {
            message,
            data: false,
            fenced: Vec::new(),
        }
    }

    /// Whether the rows themselves were refused (not the connection).
    pub fn is_data(&self) -> bool {
        self.data
    }

    /// The shards a fenced batch was refused for: this node lost them, so
    /// the batch must never be shipped again (empty for other failures).
    pub fn fenced(&self) -> &[u32] {
        &self.fenced
    }
}

impl From<sqlx::Error> for PgError {
    fn from(e: sqlx::Error) -> Self {
        let data = match &e {
            sqlx::Error::Database(db) => db
                .code()
                .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
            _ => false,
        };
        PgError {
            message: e.to_string(),
            data,
            fenced: Vec::new(),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for PgError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        PgError::other(e.to_string())
    }
}

/// Handle to the pool; cheap to clone. Connections are made lazily, so a
/// server that is down delays shipping but never start-up.
#[derive(Clone)]
pub struct Postgres {
    pool: PgPool,
    /// For the shipping lanes' own connections.
    options: PgConnectOptions,
    connect_timeout: Duration,
    statement_timeout: Duration,
    cluster_shards: Option<u32>,
}

/// A shipping lane's own connection, kept from batch to batch.
///
/// A pooled connection costs two round trips per batch besides the
/// batch's own: sqlx pings it when it is taken and again when it is given
/// back. A lane has at most one batch in flight, so it needs no pool: it
/// opens its connection at its first batch and keeps it. A failure that
/// may have broken it (anything but rows PostgreSQL refused) drops it, and
/// the next batch opens a new one. These connections are not counted in
/// `postgres.max_connections`, which bounds the pool (recovery, rebuilds,
/// tools).
///
/// What the pool's checks did, a lane does where it matters: a connection
/// idle for [`IDLE_CHECK`] or longer is pinged before its batch (one the
/// server closed meanwhile, e.g. at a restart, is replaced without failing
/// the batch), and a batch has a deadline of its own, three statement
/// timeouts (the server's `statement_timeout` cannot end a batch whose
/// connection died half-open; the kernel would wait many minutes). A batch
/// past its deadline fails and its connection is dropped; batches are
/// idempotent, so it is shipped again.
pub struct LaneConnection {
    options: PgConnectOptions,
    connect_timeout: Duration,
    batch_timeout: Duration,
    cluster_shards: Option<u32>,
    /// The connection and when it last answered.
    conn: Option<(PgConnection, Instant)>,
}

/// A lane's connection idle this long is pinged before its next batch.
pub const IDLE_CHECK: Duration = Duration::from_secs(1);

impl LaneConnection {
    /// Closes the connection, telling the server (at shutdown).
    pub async fn close(self) {
        if let Some((conn, _)) = self.conn {
            let _ = conn.close().await;
        }
    }

    /// Commits `entries` as one batch (how: see `ship_on`).
    pub async fn ship(&mut self, entries: &[Entry]) -> Result<(), PgError> {
        self.commit(entries, None).await
    }

    /// Commits `entries` as one batch only if, in the same transaction,
    /// `fence.node_id` still holds every shard of `fence.held` at its
    /// epoch with a running lease (see [`crate::cluster::registry::fence`]);
    /// otherwise writes nothing and fails with [`PgError::fenced`] naming
    /// the shards lost.
    pub async fn ship_fenced(&mut self, entries: &[Entry], fence: &Fence) -> Result<(), PgError> {
        self.commit(entries, Some(fence)).await
    }

    async fn commit(&mut self, entries: &[Entry], fence: Option<&Fence>) -> Result<(), PgError> {
        let mut conn = match self.conn.take() {
            Some((mut conn, used)) if used.elapsed() >= IDLE_CHECK => {
                let ping = tokio::time::timeout(self.connect_timeout, conn.ping()).await;
                if matches!(ping, Ok(Ok(()))) {
                    conn
                } else {
                    self.connect().await?
                }
            }
            Some((conn, _)) => conn,
            None => self.connect().await?,
        };
        let result = match tokio::time::timeout(self.batch_timeout, async {
            match fence {
                None => ship_on(&mut conn, entries, self.cluster_shards).await,
                Some(fence) => ship_fenced_on(&mut conn, entries, self.cluster_shards, fence).await,
            }
        })
        .await
        {
            Ok(result) => result,
            Err(_) => Err(PgError::other(format!(
                "PostgreSQL did not commit a batch within {} ms",
                self.batch_timeout.as_millis()
            ))),
        };
        // Rows the server refused, or a fence that failed, leave the
        // connection usable; anything else may have broken it.
        if result
            .as_ref()
            .map_or_else(|e| e.is_data() || !e.fenced().is_empty(), |()| true)
        {
            self.conn = Some((conn, Instant::now()));
        }
        result
    }

    async fn connect(&self) -> Result<PgConnection, PgError> {
        let connect = PgConnection::connect_with(&self.options);
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(conn)) => Ok(conn),
            // Never taken for refused rows, whatever its SQLSTATE.
            Ok(Err(e)) => Err(PgError::other(e.to_string())),
            Err(_) => Err(PgError::other(format!(
                "connecting to PostgreSQL took more than {} ms",
                self.connect_timeout.as_millis()
            ))),
        }
    }
}

/// Checks a URL without connecting (config validation).
pub fn check_url(url: &str) -> Result<(), String> {
    PgConnectOptions::from_str(url)
        .map(drop)
        .map_err(|e| e.to_string())
}

impl Postgres {
    /// A lazily connecting pool.
    pub fn new(config: &PostgresConfig) -> Result<Self, PgError> {
        let options = PgConnectOptions::from_str(&config.url)?
            .application_name("edge-sessions")
            .options([(
                "statement_timeout",
                config.statement_timeout.as_millis().to_string(),
            )]);
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections.max(1))
            .acquire_timeout(config.connect_timeout)
            .connect_lazy_with(options.clone());
        Ok(Postgres {
            pool,
            options,
            connect_timeout: config.connect_timeout,
            statement_timeout: config.statement_timeout,
            cluster_shards: config.cluster_shards,
        })
    }

    /// A connection for one shipping lane, opened by its first batch.
    pub fn lane(&self) -> LaneConnection {
        LaneConnection {
            options: self.options.clone(),
            connect_timeout: self.connect_timeout,
            batch_timeout: self.statement_timeout.saturating_mul(3),
            cluster_shards: self.cluster_shards,
            conn: None,
        }
    }

    /// The pool, for tests and tools.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies every pending migration.
    pub async fn migrate_up(&self) -> Result<(), PgError> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// Reverts the last `steps` applied migrations.
    pub async fn migrate_down(&self, steps: usize) -> Result<(), PgError> {
        let mut applied = self.applied_versions().await?;
        applied.sort_unstable();
        let target = if steps >= applied.len() {
            0
        } else {
            applied[applied.len() - steps - 1]
        };
        MIGRATOR.undo(&self.pool, target).await?;
        Ok(())
    }

    /// Every embedded migration with whether it is applied:
    /// `(version, description, applied)`.
    pub async fn migrate_status(&self) -> Result<Vec<(i64, String, bool)>, PgError> {
        let applied = self.applied_versions().await?;
        Ok(MIGRATOR
            .iter()
            .filter(|m| m.migration_type.is_up_migration())
            .map(|m| {
                (
                    m.version,
                    m.description.to_string(),
                    applied.contains(&m.version),
                )
            })
            .collect())
    }

    async fn applied_versions(&self) -> Result<Vec<i64>, PgError> {
        let mut conn = self.pool.acquire().await?;
        conn.ensure_migrations_table().await?;
        Ok(conn
            .list_applied_migrations()
            .await?
            .into_iter()
            .map(|m| m.version)
            .collect())
    }

    /// Live sessions of `tenants` with their executions (oldest first), for
    /// rebuilding a lost data dir. Per-tool statistics are recomputed from
    /// the executions. One page: the first `limit` by row id after `after`
    /// (keyset).
    pub async fn live_sessions(
        &self,
        tenants: &[Uuid],
        after: Uuid,
        limit: usize,
    ) -> Result<Vec<(Session, Vec<(u64, ToolExecution)>)>, PgError> {
        self.live_sessions_where(Live::Tenants(tenants), after, limit)
            .await
    }

    /// As [`Postgres::live_sessions`], for the live sessions of cluster
    /// shard `shard` (rows written by cluster nodes), which a node that
    /// takes the shard over rebuilds.
    pub async fn live_sessions_of_shard(
        &self,
        shard: u32,
        after: Uuid,
        limit: usize,
    ) -> Result<Vec<(Session, Vec<(u64, ToolExecution)>)>, PgError> {
        self.live_sessions_where(Live::Shard(shard), after, limit)
            .await
    }

    /// As [`Postgres::live_sessions_of_shard`], for the sessions of the
    /// shard that ended after `ended_since` (Unix ms): those still
    /// readable.
    pub async fn ended_sessions_of_shard(
        &self,
        shard: u32,
        ended_since: Millis,
        after: Uuid,
        limit: usize,
    ) -> Result<Vec<(Session, Vec<(u64, ToolExecution)>)>, PgError> {
        self.live_sessions_where(Live::ShardEnded(shard, ended_since), after, limit)
            .await
    }

    async fn live_sessions_where(
        &self,
        which: Live<'_>,
        after: Uuid,
        limit: usize,
    ) -> Result<Vec<(Session, Vec<(u64, ToolExecution)>)>, PgError> {
        let filter = match which {
            Live::Tenants(_) => "status IN ('active', 'idle') AND tenant_id = ANY($1)",
            Live::Shard(..) => "shard = $1 AND status IN ('active', 'idle')",
            Live::ShardEnded(..) => {
                "shard = $1 AND status IN ('expired', 'terminated') \
                 AND terminated_at > to_timestamp($4::float8 / 1000)"
            }
        };
        let query = format!(
            "SELECT id, session_id, tenant_id, user_id, edge_mcp_id, client_name, client_type,
                    client_version, status, initialized, connection_metadata::text AS connection_metadata,
                    passthrough_providers, tool_execution_count, tool_error_count, total_tokens_used,
                    (extract(epoch FROM created_at) * 1000)::int8 AS created_ms,
                    (extract(epoch FROM lifetime_started_at) * 1000)::int8 AS lifetime_ms,
                    (extract(epoch FROM last_activity_at) * 1000)::int8 AS activity_ms,
                    idle_timeout_seconds, ttl_seconds, version, passthrough_auth_encrypted,
                    session_token_sha256, refresh_token_sha256,
                    (extract(epoch FROM terminated_at) * 1000)::int8 AS ended_ms, termination_reason
             FROM mcp.edge_mcp_sessions
             WHERE {filter} AND id > $2
             ORDER BY id
             LIMIT $3"
        );
        let query = sqlx::query(&query);
        let query = match which {
            Live::Tenants(tenants) => query.bind(tenants),
            Live::Shard(shard) | Live::ShardEnded(shard, _) => {
                query.bind(i32::try_from(shard).unwrap_or(i32::MAX))
            }
        };
        let query = query
            .bind(after)
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        let query = match which {
            Live::Tenants(_) | Live::Shard(_) => query,
            Live::ShardEnded(_, since) => query.bind(since as f64),
        };
        let rows = query.fetch_all(&self.pool).await?;
        let mut sessions = Vec::with_capacity(rows.len());
        let mut index = HashMap::with_capacity(rows.len());
        for row in rows {
            let session = session_from_row(&row)?;
            index.insert(session.id, sessions.len());
            sessions.push((session, Vec::new()));
        }
        let ids: Vec<Uuid> = index.keys().copied().collect();
        let rows = sqlx::query(
            "SELECT session_id, seq, tool_name, tool_id, arguments::text AS arguments,
                    result::text AS result, error, duration_ms, tokens_used,
                    (extract(epoch FROM executed_at) * 1000)::int8 AS executed_ms,
                    (extract(epoch FROM recorded_at) * 1000)::int8 AS recorded_ms
             FROM mcp.session_tool_executions
             WHERE session_id = ANY($1)
             ORDER BY session_id, seq",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let session_row: Uuid = row.try_get("session_id")?;
            let seq: i64 = row.try_get("seq")?;
            let execution = ToolExecution {
                tool_name: row.try_get("tool_name")?,
                tool_id: row.try_get("tool_id")?,
                arguments: row.try_get("arguments")?,
                result: row.try_get("result")?,
                error: row.try_get("error")?,
                duration_ms: row.try_get::<i64, _>("duration_ms")?.max(0) as u64,
                tokens_used: row.try_get::<i64, _>("tokens_used")?.max(0) as u64,
                executed_at: row.try_get("executed_ms")?,
                recorded_at: row.try_get("recorded_ms")?,
            };
            if let Some(&i) = index.get(&session_row) {
                sessions[i].1.push((seq.max(0) as u64, execution));
            }
        }
        for (session, executions) in &mut sessions {
            rebuild_counters(session, executions);
        }
        Ok(sessions)
    }
}

/// Which live sessions to read back.
#[derive(Clone, Copy)]
enum Live<'a> {
    /// Those of these tenants.
    Tenants(&'a [Uuid]),
    /// Those of this cluster shard.
    Shard(u32),
    /// The sessions of this cluster shard that ended after this (Unix ms).
    ShardEnded(u32, Millis),
}

/// Recomputes a rebuilt session's counters and per-tool statistics from its
/// executions, keeping its status, activity time and version (an idle row
/// behind its executions turns active, as the first of them made it).
fn rebuild_counters(session: &mut Session, executions: &[(u64, ToolExecution)]) {
    let (status, last_activity, version, recorded) = (
        session.status,
        session.last_activity_at,
        session.version,
        session.tool_execution_count,
    );
    session.tool_execution_count = 0;
    session.tool_error_count = 0;
    session.total_tokens_used = 0;
    session.tools = Box::default();
    for (_, execution) in executions {
        session.record_execution(execution, execution.recorded_at);
    }
    let behind = session.tool_execution_count.saturating_sub(recorded);
    session.status = status;
    session.last_activity_at = last_activity.max(session.last_activity_at);
    // The row may lag its executions (it is written coalesced): each
    // execution past the row's count is one more version, and the first
    // of them brought an idle session back to active (one more).
    session.version = version + behind;
    if behind > 0 {
        session.touch(session.last_activity_at);
    }
}

/// A stored token digest; a missing or malformed one matches no token.
fn token_hash(bytes: Option<Vec<u8>>) -> TokenHash {
    TokenHash(
        bytes
            .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
            .unwrap_or_default(),
    )
}

fn session_from_row(row: &sqlx::postgres::PgRow) -> Result<Session, PgError> {
    let text = |name: &str| -> Result<String, PgError> { Ok(row.try_get::<String, _>(name)?) };
    let optional = |name: &str| -> Result<Option<Box<str>>, PgError> {
        Ok(row.try_get::<Option<String>, _>(name)?.map(Into::into))
    };
    let count =
        |name: &str| -> Result<u64, PgError> { Ok(row.try_get::<i64, _>(name)?.max(0) as u64) };
    let client_type = text("client_type")?;
    let status = text("status")?;
    let providers: Vec<String> = row.try_get("passthrough_providers")?;
    Ok(Session {
        id: row.try_get("id")?,
        session_id: text("session_id")?.into(),
        tenant_id: row.try_get("tenant_id")?,
        user_id: row.try_get("user_id")?,
        client: ClientText::new(
            &text("edge_mcp_id")?,
            optional("client_name")?.as_deref(),
            optional("client_version")?.as_deref(),
            &text("connection_metadata")?,
        )
        .map_err(|e| PgError::other(e.to_string()))?,
        client_type: ClientType::parse(&client_type)
            .ok_or_else(|| PgError::other(format!("unknown client_type {client_type:?}")))?,
        status: Status::parse(&status)
            .ok_or_else(|| PgError::other(format!("unknown status {status:?}")))?,
        initialized: row.try_get("initialized")?,
        passthrough_providers: providers.into_iter().map(Into::into).collect(),
        tool_execution_count: count("tool_execution_count")?,
        tool_error_count: count("tool_error_count")?,
        total_tokens_used: count("total_tokens_used")?,
        created_at: row.try_get::<i64, _>("created_ms")?,
        lifetime_start: row.try_get::<i64, _>("lifetime_ms")?,
        last_activity_at: row.try_get::<i64, _>("activity_ms")?,
        idle_timeout_seconds: row.try_get::<i32, _>("idle_timeout_seconds")?.max(1) as u32,
        ttl_seconds: row.try_get::<i32, _>("ttl_seconds")?.max(1) as u32,
        ending: match (
            row.try_get::<Option<i64>, _>("ended_ms")?,
            row.try_get::<Option<String>, _>("termination_reason")?,
        ) {
            (Some(at), reason) if Status::parse(&status).is_some_and(|s| s.is_final()) => {
                Some(Box::new(Ending {
                    at,
                    reason: reason.unwrap_or_default().into(),
                }))
            }
            _ => None,
        },
        version: count("version")?,
        tools: Box::default(),
        credentials: SessionCredentials {
            passthrough: row
                .try_get::<Option<Vec<u8>>, _>("passthrough_auth_encrypted")?
                .map(Vec::into_boxed_slice),
            session_token: token_hash(row.try_get("session_token_sha256")?),
            refresh_token: token_hash(row.try_get("refresh_token_sha256")?),
            retired_refresh: Box::default(),
        },
    })
}

/// Commits a batch of entries: session rows upserted (a row only moves
/// forward in `version`, and only the session that owns it writes it),
/// executions and audit rows appended (a replayed one is skipped by its
/// key). Every part is idempotent, so a batch that failed half-way is
/// simply shipped again.
///
/// The common batch is one statement in its own transaction
/// ([`SHIP_BATCH`]): one round trip to the server instead of four
/// (`BEGIN`, sessions, audit rows, `COMMIT`), which on two shared cores
/// is most of a batch's time outside the statements themselves.
///
/// A new session whose row was not written had its (tenant, session
/// id) row held by an older session with a client-chosen id re-used
/// after the old one's retention: the new session takes the row over
/// (a replayed create lands here too, and changes nothing). Then its
/// executions can only be inserted after that, since their foreign key
/// needs its row; so a batch holding executions of a session it
/// creates is shipped in a transaction: the rows first, taken over
/// where needed, then the batch statement with the rest.
async fn ship_on(
    conn: &mut PgConnection,
    entries: &[Entry],
    cluster_shards: Option<u32>,
) -> Result<(), PgError> {
    let batch = Batch::gather(entries, cluster_shards);
    if batch.executes_a_created_session() {
        let mut tx = conn.begin().await?;
        let written = upsert_sessions(&mut tx, &batch.sessions, batch.cluster_shards).await?;
        take_over(&mut tx, &batch, &batch.taken(&written)).await?;
        ship_batch(&mut *tx, &batch.without_sessions()).await?;
        tx.commit().await?;
        return Ok(());
    }
    let written = ship_batch(&mut *conn, &batch).await?;
    let taken = batch.taken(&written);
    if !taken.is_empty() {
        let mut tx = conn.begin().await?;
        take_over(&mut tx, &batch, &taken).await?;
        tx.commit().await?;
    }
    Ok(())
}

/// The shards a cluster node writes a batch for, each at the epoch it
/// holds it under.
#[derive(Debug, Clone)]
pub struct Fence {
    /// The writing node.
    pub node_id: String,
    /// (shard, epoch) of every shard the batch writes for.
    pub held: Vec<(u32, u64)>,
}

/// As [`ship_on`], behind the fence check, which also keeps the shards'
/// rows from changing hands until the commit: a cluster node's batch. The
/// common batch stays one statement ([`FENCED_SHIP_BATCH`]); one that
/// must take rows over runs in a transaction that begins with the check
/// ([`registry::fence`]). A failed check writes nothing and answers the
/// shards lost. The fence must name the shard of every session row in the
/// batch (checked here) and of every execution and audit row (which carry
/// only a session's row id: the caller's part).
async fn ship_fenced_on(
    conn: &mut PgConnection,
    entries: &[Entry],
    cluster_shards: Option<u32>,
    fence: &Fence,
) -> Result<(), PgError> {
    let Some(shards) = cluster_shards else {
        return Err(PgError::other(
            "a fenced batch from a node that is not in a cluster".into(),
        ));
    };
    let batch = Batch::gather(entries, cluster_shards);
    if let Some(stray) = batch.sessions.iter().find(|s| {
        let shard = shard_of(s.tenant_id, &s.session_id, shards);
        !fence.held.iter().any(|(held, _)| *held == shard)
    }) {
        return Err(PgError::other(format!(
            "a fenced batch writes session {} of a shard its fence does not name",
            stray.session_id
        )));
    }
    // Each shard once (the statement counts the rows it locks).
    let mut held = fence.held.clone();
    held.sort_unstable();
    held.dedup();
    let fence = &Fence {
        node_id: fence.node_id.clone(),
        held,
    };
    if !batch.executes_a_created_session() {
        let Some(written) = ship_batch_fenced(&mut *conn, &batch, fence).await? else {
            // Which shards were lost, for the caller (nothing was written).
            let stale = fence_check(&mut *conn, fence).await?;
            return Err(fenced(fence, stale));
        };
        let taken = batch.taken(&written);
        if taken.is_empty() {
            return Ok(());
        }
        let mut tx = begin_fenced(conn, fence).await?;
        take_over(&mut tx, &batch, &taken).await?;
        tx.commit().await?;
        return Ok(());
    }
    let mut tx = begin_fenced(conn, fence).await?;
    let written = upsert_sessions(&mut tx, &batch.sessions, batch.cluster_shards).await?;
    take_over(&mut tx, &batch, &batch.taken(&written)).await?;
    ship_batch(&mut *tx, &batch.without_sessions()).await?;
    tx.commit().await?;
    Ok(())
}

/// A transaction on `conn` that has passed `fence` (and holds its lock on
/// the shard rows until it ends); the fenced failure, rolled back, if the
/// node no longer holds them.
async fn begin_fenced<'c>(
    conn: &'c mut PgConnection,
    fence: &Fence,
) -> Result<sqlx::Transaction<'c, sqlx::Postgres>, PgError> {
    let mut tx = conn.begin().await?;
    let stale = fence_check(&mut *tx, fence).await?;
    if !stale.is_empty() {
        tx.rollback().await?;
        return Err(fenced(fence, stale));
    }
    Ok(tx)
}

/// [`registry::fence`] for `fence`: the shards of it no longer held.
async fn fence_check(conn: impl sqlx::PgExecutor<'_>, fence: &Fence) -> Result<Vec<u32>, PgError> {
    registry::fence(conn, &fence.node_id, &fence.held)
        .await
        .map_err(|e| match e {
            RegistryError::Postgres(e) => PgError::from(e),
            other => PgError::other(other.to_string()),
        })
}

/// The failure of a batch behind `fence`, which no longer holds `stale`.
fn fenced(fence: &Fence, stale: Vec<u32>) -> PgError {
    PgError {
        message: format!(
            "node {} no longer holds shards {stale:?}: the batch was not written",
            fence.node_id
        ),
        data: false,
        fenced: stale,
    }
}

/// Upserts session rows (a row only moves forward in `version`, and only
/// the session that owns it writes it); answers the row ids written.
async fn upsert_sessions(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    sessions: &Vec<&Session>,
    cluster_shards: Option<u32>,
) -> Result<HashSet<Uuid>, PgError> {
    let s = SessionColumns::new(sessions, cluster_shards);
    let written: Vec<Uuid> = bind_sessions(sqlx::query_scalar(UPSERT_SESSIONS), s)
        .fetch_all(&mut **tx)
        .await?;
    Ok(written.into_iter().collect())
}

/// The whole batch in one statement ([`SHIP_BATCH`]); answers the session
/// row ids written.
async fn ship_batch<'c, E>(executor: E, batch: &Batch<'_>) -> Result<HashSet<Uuid>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    let written: Vec<Uuid> = batch_statement(&SHIP_BATCH, batch, None)
        .fetch_all(executor)
        .await?;
    Ok(written.into_iter().collect())
}

/// As [`ship_batch`] behind `fence`, still one statement
/// ([`FENCED_SHIP_BATCH`]); answers `None`, having written nothing, when
/// the node no longer holds every shard of the fence at its epoch.
async fn ship_batch_fenced<'c, E>(
    executor: E,
    batch: &Batch<'_>,
    fence: &Fence,
) -> Result<Option<HashSet<Uuid>>, sqlx::Error>
where
    E: sqlx::Executor<'c, Database = sqlx::Postgres>,
{
    let written: Vec<Uuid> = batch_statement(&FENCED_SHIP_BATCH, batch, Some(fence))
        .fetch_all(executor)
        .await?;
    Ok((!written.contains(&Uuid::nil())).then(|| written.into_iter().collect()))
}

/// `statement` (a form of [`SHIP_BATCH`]) with `batch` bound as `$1`–`$46`,
/// and `fence` as `$47`–`$49` when given.
fn batch_statement<'q>(
    statement: &'q str,
    batch: &Batch<'_>,
    fence: Option<&Fence>,
) -> sqlx::query::QueryScalar<'q, sqlx::Postgres, Uuid, sqlx::postgres::PgArguments> {
    let s = SessionColumns::new(&batch.sessions, batch.cluster_shards);
    let e = ExecutionColumns::from(&batch.executions);
    let a = &batch.audits;
    let query = bind_sessions(sqlx::query_scalar(statement), s)
        .bind(e.session_id)
        .bind(e.seq)
        .bind(e.tool_name)
        .bind(e.tool_id)
        .bind(e.arguments)
        .bind(e.result)
        .bind(e.error)
        .bind(e.duration_ms)
        .bind(e.tokens_used)
        .bind(e.executed_at)
        .bind(e.recorded_at)
        .bind(a.iter().map(|a| a.id).collect::<Vec<_>>())
        .bind(a.iter().map(|a| a.session_row).collect::<Vec<_>>())
        .bind(a.iter().map(|a| a.tenant_id).collect::<Vec<_>>())
        .bind(a.iter().map(|a| a.action.as_str()).collect::<Vec<_>>())
        .bind(a.iter().map(|a| a.action.actor()).collect::<Vec<_>>())
        .bind(
            a.iter()
                .map(|a| a.reason.as_deref().map(pg_text))
                .collect::<Vec<_>>(),
        )
        .bind(a.iter().map(|a| a.at).collect::<Vec<_>>());
    match fence {
        None => query,
        Some(fence) => {
            let (shards, epochs): (Vec<i32>, Vec<i64>) = fence
                .held
                .iter()
                .map(|(s, e)| (*s as i32, *e as i64))
                .unzip();
            query.bind(shards).bind(epochs).bind(fence.node_id.clone())
        }
    }
}

/// The new sessions in `taken` take their (tenant, session id) rows over
/// from the older sessions that hold them, inside `tx`: the old rows go,
/// the new ones are written. The rows are looked up by (tenant, session
/// id), planned for the arrays at hand (a generic plan made while the table
/// was small was a sequential scan).
async fn take_over(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    batch: &Batch<'_>,
    taken: &[&Session],
) -> Result<(), PgError> {
    if taken.is_empty() {
        return Ok(());
    }
    sqlx::query("SET LOCAL plan_cache_mode = force_custom_plan")
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "DELETE FROM mcp.edge_mcp_sessions s
         USING UNNEST($1::uuid[], $2::uuid[], $3::text[]) AS i(id, tenant_id, session_id)
         WHERE s.tenant_id = i.tenant_id AND s.session_id = i.session_id AND s.id <> i.id",
    )
    .bind(taken.iter().map(|s| s.id).collect::<Vec<_>>())
    .bind(taken.iter().map(|s| s.tenant_id).collect::<Vec<_>>())
    .bind(taken.iter().map(|s| &*s.session_id).collect::<Vec<_>>())
    .execute(&mut **tx)
    .await?;
    let newest: Vec<&Session> = batch
        .sessions
        .iter()
        .filter(|s| taken.iter().any(|t| t.id == s.id))
        .copied()
        .collect();
    upsert_sessions(tx, &newest, batch.cluster_shards).await?;
    Ok(())
}

/// Binds the session columns as `$1` to `$28` of [`UPSERT_SESSIONS`].
fn bind_sessions<'q, O>(
    query: sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    s: SessionColumns,
) -> sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    query
        .bind(s.id)
        .bind(s.session_id)
        .bind(s.tenant_id)
        .bind(s.user_id)
        .bind(s.edge_mcp_id)
        .bind(s.client_name)
        .bind(s.client_type)
        .bind(s.client_version)
        .bind(s.status)
        .bind(s.initialized)
        .bind(s.connection_metadata)
        .bind(s.providers)
        .bind(s.tool_execution_count)
        .bind(s.tool_error_count)
        .bind(s.total_tokens_used)
        .bind(s.created_at)
        .bind(s.lifetime_start)
        .bind(s.last_activity_at)
        .bind(s.expires_at)
        .bind(s.idle_timeout_seconds)
        .bind(s.ttl_seconds)
        .bind(s.terminated_at)
        .bind(s.termination_reason)
        .bind(s.version)
        .bind(s.passthrough)
        .bind(s.session_token)
        .bind(s.refresh_token)
        .bind(s.shard)
}

/// A batch's entries sorted by table, sessions reduced to their newest state.
struct Batch<'a> {
    sessions: Vec<&'a Session>,
    /// Sessions of the batch seen at their first version (new rows, unless
    /// replayed).
    created: Vec<&'a Session>,
    executions: Vec<(Uuid, u64, &'a ToolExecution)>,
    audits: Vec<&'a AuditEntry>,
    /// The cluster's shard count, when the node is in one (the session
    /// rows carry their shard).
    cluster_shards: Option<u32>,
}

impl<'a> Batch<'a> {
    fn gather(entries: &'a [Entry], cluster_shards: Option<u32>) -> Self {
        // One row per (tenant, session id): a statement may not touch a row
        // twice, and only the newest state matters. The later entry wins
        // (entries are in append order).
        let mut newest: HashMap<(Uuid, &str), usize> = HashMap::new();
        let mut sessions: Vec<&Session> = Vec::new();
        let mut created: Vec<&Session> = Vec::new();
        let mut executions = Vec::new();
        let mut audits = Vec::new();
        for entry in entries {
            match entry {
                Entry::Session(session) => {
                    if session.version == 1 && created.last().is_none_or(|c| c.id != session.id) {
                        created.push(session);
                    }
                    match newest.get(&(session.tenant_id, &*session.session_id)) {
                        Some(&i) => sessions[i] = session,
                        None => {
                            newest
                                .insert((session.tenant_id, &*session.session_id), sessions.len());
                            sessions.push(session);
                        }
                    }
                }
                Entry::Execution {
                    session_row,
                    seq,
                    execution,
                } => executions.push((*session_row, *seq, execution)),
                Entry::Audit(audit) => audits.push(audit),
            }
        }
        Batch {
            sessions,
            created,
            executions,
            audits,
            cluster_shards,
        }
    }

    /// The batch's executions and audit rows alone (its rows are written).
    fn without_sessions(&self) -> Batch<'a> {
        Batch {
            sessions: Vec::new(),
            created: Vec::new(),
            executions: self.executions.clone(),
            audits: self.audits.clone(),
            cluster_shards: self.cluster_shards,
        }
    }

    /// Whether the batch holds executions of a session it creates.
    fn executes_a_created_session(&self) -> bool {
        if self.created.is_empty() || self.executions.is_empty() {
            return false;
        }
        let created: HashSet<Uuid> = self.created.iter().map(|s| s.id).collect();
        self.executions
            .iter()
            .any(|(row, _, _)| created.contains(row))
    }

    /// New sessions of the batch whose rows were not `written`.
    fn taken(&self, written: &HashSet<Uuid>) -> Vec<&'a Session> {
        self.created
            .iter()
            .filter(|s| !written.contains(&s.id))
            .copied()
            .collect()
    }
}

const UPSERT_SESSIONS: &str = "
INSERT INTO mcp.edge_mcp_sessions (
    id, session_id, tenant_id, user_id, edge_mcp_id, client_name, client_type, client_version,
    status, initialized, connection_metadata, has_passthrough_auth, passthrough_providers,
    tool_execution_count, tool_error_count, total_tokens_used, created_at, lifetime_started_at,
    last_activity_at, expires_at, idle_timeout_seconds, ttl_seconds, terminated_at,
    termination_reason, version, passthrough_auth_encrypted, session_token_sha256,
    refresh_token_sha256, shard, updated_at)
SELECT id, session_id, tenant_id, user_id, edge_mcp_id, client_name, client_type, client_version,
       status, initialized, connection_metadata::jsonb,
       cardinality(providers::text[]) > 0, providers::text[],
       tool_execution_count, tool_error_count, total_tokens_used,
       to_timestamp(created_ms::float8 / 1000), to_timestamp(lifetime_ms::float8 / 1000),
       to_timestamp(activity_ms::float8 / 1000), to_timestamp(expires_ms::float8 / 1000),
       idle_timeout_seconds, ttl_seconds, to_timestamp(terminated_ms::float8 / 1000),
       termination_reason, version, passthrough, session_token, refresh_token, shard, now()
FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::text[], $10::bool[], $11::text[], $12::text[], $13::int8[], $14::int8[],
            $15::int8[], $16::int8[], $17::int8[], $18::int8[], $19::int8[], $20::int4[],
            $21::int4[], $22::int8[], $23::text[], $24::int8[], $25::bytea[], $26::bytea[],
            $27::bytea[], $28::int4[])
     AS u(id, session_id, tenant_id, user_id, edge_mcp_id, client_name, client_type,
          client_version, status, initialized, connection_metadata, providers,
          tool_execution_count, tool_error_count, total_tokens_used, created_ms, lifetime_ms,
          activity_ms, expires_ms, idle_timeout_seconds, ttl_seconds, terminated_ms,
          termination_reason, version, passthrough, session_token, refresh_token, shard)
ON CONFLICT (tenant_id, session_id) DO UPDATE SET
    user_id = EXCLUDED.user_id,
    client_name = EXCLUDED.client_name,
    client_version = EXCLUDED.client_version,
    status = EXCLUDED.status,
    initialized = EXCLUDED.initialized,
    connection_metadata = EXCLUDED.connection_metadata,
    has_passthrough_auth = EXCLUDED.has_passthrough_auth,
    passthrough_providers = EXCLUDED.passthrough_providers,
    tool_execution_count = EXCLUDED.tool_execution_count,
    tool_error_count = EXCLUDED.tool_error_count,
    total_tokens_used = EXCLUDED.total_tokens_used,
    lifetime_started_at = EXCLUDED.lifetime_started_at,
    last_activity_at = EXCLUDED.last_activity_at,
    expires_at = EXCLUDED.expires_at,
    idle_timeout_seconds = EXCLUDED.idle_timeout_seconds,
    ttl_seconds = EXCLUDED.ttl_seconds,
    terminated_at = EXCLUDED.terminated_at,
    termination_reason = EXCLUDED.termination_reason,
    version = EXCLUDED.version,
    passthrough_auth_encrypted = EXCLUDED.passthrough_auth_encrypted,
    session_token_sha256 = EXCLUDED.session_token_sha256,
    refresh_token_sha256 = EXCLUDED.refresh_token_sha256,
    shard = coalesce(EXCLUDED.shard, mcp.edge_mcp_sessions.shard),
    updated_at = now()
WHERE mcp.edge_mcp_sessions.id = EXCLUDED.id
  AND (mcp.edge_mcp_sessions.version < EXCLUDED.version
       OR (mcp.edge_mcp_sessions.version = EXCLUDED.version
           AND mcp.edge_mcp_sessions.last_activity_at < EXCLUDED.last_activity_at))
RETURNING id";

/// The audit rows' part of [`SHIP_BATCH`]: parameters `$40`–`$46`.
const BATCH_AUDITS: &str = "
INSERT INTO mcp.session_audit_log (id, session_id, tenant_id, action, actor, reason, at)
SELECT id, session_id, tenant_id, action, actor, reason, to_timestamp(at_ms::float8 / 1000)
FROM UNNEST($40::uuid[], $41::uuid[], $42::uuid[], $43::text[], $44::text[], $45::text[], $46::int8[])
     AS u(id, session_id, tenant_id, action, actor, reason, at_ms)
ON CONFLICT (id) DO NOTHING";

/// A whole batch as one statement: the session upsert, the executions and
/// the audit rows as data-modifying `WITH` parts, answering the session
/// rows written. One statement is one transaction, and foreign keys are
/// checked at its end, so an execution of a session created in the same
/// batch finds its row. Parameters: the upsert's `$1`–`$28`, the
/// executions' `$29`–`$39`, the audit rows' `$40`–`$46`; an empty array
/// writes nothing of its part.
static SHIP_BATCH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "WITH s AS ({UPSERT_SESSIONS}), e AS ({BATCH_EXECUTIONS}), a AS ({BATCH_AUDITS}) SELECT id FROM s"
    )
});

/// [`SHIP_BATCH`] behind a fence, still one statement: its first part
/// takes the fence's lock on the shard rows (`$47` shards, `$48` the
/// epochs held, `$49` the node; see [`registry::fence`]), and each write
/// happens only if the node holds every one of them. When it does not,
/// nothing is written and the answer holds the nil UUID.
static FENCED_SHIP_BATCH: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let fenced = |statement: &str| {
        statement.replacen(
            "ON CONFLICT",
            "WHERE (SELECT ok FROM fence_ok)\nON CONFLICT",
            1,
        )
    };
    format!(
        "WITH fence AS (
            SELECT f.shard FROM mcp.cluster_shards AS f
            JOIN UNNEST($47::int4[], $48::int8[]) AS h(shard, epoch) ON f.shard = h.shard
            WHERE f.owner = $49 AND f.epoch = h.epoch
              AND f.lease_expires_at > statement_timestamp()
            FOR SHARE OF f),
         fence_ok AS (SELECT count(*) = cardinality($47::int4[]) AS ok FROM fence),
         s AS ({}), e AS ({}), a AS ({})
         SELECT id FROM s
         UNION ALL SELECT '00000000-0000-0000-0000-000000000000'::uuid FROM fence_ok WHERE NOT ok",
        fenced(UPSERT_SESSIONS),
        fenced(BATCH_EXECUTIONS),
        fenced(BATCH_AUDITS)
    )
});

/// The executions' part of [`SHIP_BATCH`]: parameters `$29`–`$39`.
const BATCH_EXECUTIONS: &str = "
INSERT INTO mcp.session_tool_executions (
    session_id, seq, tool_name, tool_id, arguments, result, error, duration_ms, tokens_used,
    executed_at, recorded_at)
SELECT session_id, seq, tool_name, tool_id, arguments::jsonb, result::jsonb, error, duration_ms,
       tokens_used, to_timestamp(executed_ms::float8 / 1000), to_timestamp(recorded_ms::float8 / 1000)
FROM UNNEST($29::uuid[], $30::int8[], $31::text[], $32::text[], $33::text[], $34::text[], $35::text[],
            $36::int8[], $37::int8[], $38::int8[], $39::int8[])
     AS u(session_id, seq, tool_name, tool_id, arguments, result, error, duration_ms,
          tokens_used, executed_ms, recorded_ms)
ON CONFLICT (session_id, seq) DO NOTHING";

/// `items` as a PostgreSQL `text[]` literal (`{"a","b \"c\""}`), every
/// element quoted and escaped, so any name round-trips; the column is
/// filled with a cheap per-row cast rather than a subquery.
fn text_array_literal(items: &[Box<str>]) -> String {
    let mut out = String::from("{");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        for c in item.chars() {
            if c == '"' || c == '\\' {
                out.push('\\');
            }
            out.push(if c == '\0' { '\u{fffd}' } else { c });
        }
        out.push('"');
    }
    out.push('}');
    out
}

/// PostgreSQL text cannot hold NUL: it becomes U+FFFD (which JSON and the
/// engine accept) rather than failing the whole batch.
fn pg_text(text: &str) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{fffd}")
    } else {
        text.to_owned()
    }
}

/// As [`pg_text`] for JSON text, where NUL appears escaped (`\u0000`),
/// which `jsonb` rejects: such a document is rewritten with U+FFFD.
fn pg_json(text: &str) -> String {
    if !text.contains("\\u0000") {
        return pg_text(text);
    }
    fn clean(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::String(s) => *s = pg_text(s),
            serde_json::Value::Array(items) => items.iter_mut().for_each(clean),
            serde_json::Value::Object(map) => {
                let entries = std::mem::take(map);
                for (key, mut item) in entries {
                    clean(&mut item);
                    map.insert(pg_text(&key), item);
                }
            }
            _ => {}
        }
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(mut value) => {
            clean(&mut value);
            value.to_string()
        }
        // Not JSON after all: kept as a JSON string.
        Err(_) => serde_json::Value::String(pg_text(text)).to_string(),
    }
}

fn int(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Session fields as column arrays, for `UNNEST`.
#[derive(Default)]
struct SessionColumns {
    id: Vec<Uuid>,
    session_id: Vec<String>,
    tenant_id: Vec<Uuid>,
    user_id: Vec<Option<Uuid>>,
    edge_mcp_id: Vec<String>,
    client_name: Vec<Option<String>>,
    client_type: Vec<&'static str>,
    client_version: Vec<Option<String>>,
    status: Vec<&'static str>,
    initialized: Vec<bool>,
    connection_metadata: Vec<String>,
    providers: Vec<String>,
    tool_execution_count: Vec<i64>,
    tool_error_count: Vec<i64>,
    total_tokens_used: Vec<i64>,
    created_at: Vec<Millis>,
    lifetime_start: Vec<Millis>,
    last_activity_at: Vec<Millis>,
    expires_at: Vec<Millis>,
    idle_timeout_seconds: Vec<i32>,
    ttl_seconds: Vec<i32>,
    terminated_at: Vec<Option<Millis>>,
    termination_reason: Vec<Option<String>>,
    version: Vec<i64>,
    passthrough: Vec<Option<Vec<u8>>>,
    session_token: Vec<Vec<u8>>,
    refresh_token: Vec<Vec<u8>>,
    /// The cluster shard, when the node is in a cluster.
    shard: Vec<Option<i32>>,
}

impl SessionColumns {
    /// `sessions` as columns; with their shards out of `cluster_shards`
    /// when the node is in a cluster.
    fn new(sessions: &Vec<&Session>, cluster_shards: Option<u32>) -> Self {
        let mut c = SessionColumns::default();
        for s in sessions {
            c.shard
                .push(cluster_shards.map(|n| shard_of(s.tenant_id, &s.session_id, n) as i32));
            c.id.push(s.id);
            c.session_id.push(pg_text(&s.session_id));
            c.tenant_id.push(s.tenant_id);
            c.user_id.push(s.user_id);
            c.edge_mcp_id.push(pg_text(s.client.edge_mcp_id()));
            c.client_name.push(s.client.client_name().map(pg_text));
            c.client_type.push(s.client_type.as_str());
            c.client_version
                .push(s.client.client_version().map(pg_text));
            c.status.push(s.status.as_str());
            c.initialized.push(s.initialized);
            c.connection_metadata.push(pg_json(s.client.metadata()));
            c.providers
                .push(text_array_literal(&s.passthrough_providers));
            c.tool_execution_count.push(int(s.tool_execution_count));
            c.tool_error_count.push(int(s.tool_error_count));
            c.total_tokens_used.push(int(s.total_tokens_used));
            c.created_at.push(s.created_at);
            c.lifetime_start.push(s.lifetime_start);
            c.last_activity_at.push(s.last_activity_at);
            c.expires_at.push(s.expires_at());
            c.idle_timeout_seconds
                .push(i32::try_from(s.idle_timeout_seconds).unwrap_or(i32::MAX));
            c.ttl_seconds
                .push(i32::try_from(s.ttl_seconds).unwrap_or(i32::MAX));
            c.terminated_at.push(s.terminated_at());
            c.termination_reason
                .push(s.termination_reason().map(pg_text));
            c.version.push(int(s.version));
            c.passthrough
                .push(s.credentials.passthrough.as_deref().map(<[u8]>::to_vec));
            c.session_token.push(s.credentials.session_token.0.to_vec());
            c.refresh_token.push(s.credentials.refresh_token.0.to_vec());
        }
        c
    }
}

/// Execution fields as column arrays, for `UNNEST`.
#[derive(Default)]
struct ExecutionColumns {
    session_id: Vec<Uuid>,
    seq: Vec<i64>,
    tool_name: Vec<String>,
    tool_id: Vec<Option<String>>,
    arguments: Vec<String>,
    result: Vec<String>,
    error: Vec<Option<String>>,
    duration_ms: Vec<i64>,
    tokens_used: Vec<i64>,
    executed_at: Vec<Millis>,
    recorded_at: Vec<Millis>,
}

impl From<&Vec<(Uuid, u64, &ToolExecution)>> for ExecutionColumns {
    fn from(executions: &Vec<(Uuid, u64, &ToolExecution)>) -> Self {
        let mut c = ExecutionColumns::default();
        for (row, seq, e) in executions {
            c.session_id.push(*row);
            c.seq.push(int(*seq));
            c.tool_name.push(pg_text(&e.tool_name));
            c.tool_id.push(e.tool_id.as_deref().map(pg_text));
            c.arguments.push(pg_json(&e.arguments));
            c.result.push(pg_json(&e.result));
            c.error.push(e.error.as_deref().map(pg_text));
            c.duration_ms.push(int(e.duration_ms));
            c.tokens_used.push(int(e.tokens_used));
            c.executed_at.push(e.executed_at);
            c.recorded_at.push(e.recorded_at);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_arrays_quote_and_escape_every_element() {
        let items: Vec<Box<str>> = vec!["github".into(), "a \"b\" \\ c".into(), "".into()];
        assert_eq!(
            text_array_literal(&items),
            r#"{"github","a \"b\" \\ c",""}"#
        );
        assert_eq!(text_array_literal(&[]), "{}");
    }

    #[test]
    fn a_row_behind_its_executions_catches_up_and_an_idle_one_turns_active() {
        use crate::model::session::tests::{execution_at, session_at};
        let mut session = session_at(1_000, 600, 3600);
        let call = |at| (0, execution_at(at));
        // The row counted one execution, then went idle (written at once);
        // two more came after it (the row not yet rewritten).
        session.record_execution(&call(2_000).1, 2_000);
        session.become_idle();
        let version = session.version;
        let executions = [call(2_000), call(9_000), call(9_500)];
        rebuild_counters(&mut session, &executions);
        assert_eq!(session.tool_execution_count, 3);
        assert_eq!(session.status, crate::model::Status::Active);
        assert_eq!(session.version, version + 2 + 1);
        assert_eq!(session.last_activity_at, 9_500);

        // A row that holds every execution keeps its status and version.
        let mut idle = session_at(1_000, 600, 3600);
        idle.record_execution(&call(2_000).1, 2_000);
        idle.become_idle();
        let version = idle.version;
        rebuild_counters(&mut idle, &[call(2_000)]);
        assert_eq!(
            (idle.status, idle.version),
            (crate::model::Status::Idle, version)
        );
    }

    #[test]
    fn nul_never_reaches_postgres() {
        assert_eq!(pg_text("a\0b"), "a\u{fffd}b");
        assert_eq!(
            pg_json(r#"{"k\u0000":"v\u0000","n":[1,"\u0000"]}"#),
            "{\"k\u{fffd}\":\"v\u{fffd}\",\"n\":[1,\"\u{fffd}\"]}"
        );
        assert_eq!(pg_json(r#"{"k":"plain"}"#), r#"{"k":"plain"}"#);
    }
}
