//! The cluster's tables in PostgreSQL (`mcp.cluster`, `mcp.cluster_nodes`,
//! `mcp.cluster_shards`, migration 0004) and every statement on them.
//!
//! Each statement is one round trip and decides on PostgreSQL's clock, at
//! the statement's own start (`statement_timestamp()`, not `now()`, which
//! inside a transaction is its start): a lease is valid while
//! `lease_expires_at` is later there. So the nodes' clocks never have to
//! agree with each other or with the database's; what the protocol
//! assumes is that they run at about the same rate (see
//! [`super::member`]) and that the database's clock is not stepped while
//! leases run. Taking a shard is a compare-and-set that only succeeds on a
//! free or expired lease (or one the taker itself holds without knowing
//! it, e.g. after a restart) and bumps the shard's epoch; renewing and
//! releasing name the epoch they hold, so a node that lost a shard, even
//! for an instant, can neither extend nor release the new owner's lease.
//!
//! Taking and renewing skip a shard row that a writing transaction holds
//! with the fence's lock (`SKIP LOCKED`): one long write never stalls a
//! node's whole round. A row skipped is taken or renewed at a later round;
//! the write holding it was fenced when it began, so the shard cannot
//! change hands under it.

use std::time::Duration;

use sqlx::{PgExecutor, Row as _};

/// Why a statement failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// PostgreSQL could not be reached or refused the statement.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// A round (longer than a lease) or a quota reservation took too long.
    #[error("PostgreSQL took too long to answer a cluster statement")]
    Timeout,
    /// The cluster was created with another shard count.
    #[error("cluster.shards is {configured}, but the cluster in PostgreSQL has {existing} shards (fixed for the cluster's life)")]
    ShardCount {
        /// This node's `cluster.shards`.
        configured: u32,
        /// The count the cluster was created with.
        existing: u32,
    },
}

/// A node as the registry lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRow {
    /// Its `cluster.node_id`.
    pub node_id: String,
    /// How other nodes reach it.
    pub advertise_url: String,
    /// Whether it counts as a member: status `alive` and a heartbeat
    /// younger than a lease.
    pub alive: bool,
    /// Its last heartbeat, Unix milliseconds.
    pub heartbeat_at_ms: i64,
}

/// A shard as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardRow {
    /// The shard number.
    pub shard: u32,
    /// Its holder while the lease runs, `None` once released.
    pub owner: Option<String>,
    /// How many times it changed hands.
    pub epoch: u64,
    /// Whether its lease is still running (on PostgreSQL's clock).
    pub leased: bool,
    /// How long ago its lease ran out (zero while it runs).
    pub expired_for: Duration,
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Creates the cluster row (`shards` shards) and the shard rows if this is
/// the first node ever, else checks the shard count; then marks `node_id`
/// alive at `advertise_url` with a fresh heartbeat.
pub async fn join(
    pool: &sqlx::PgPool,
    node_id: &str,
    advertise_url: &str,
    shards: u32,
) -> Result<(), RegistryError> {
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO mcp.cluster (shards) VALUES ($1) ON CONFLICT (id) DO NOTHING")
        .bind(shards as i32)
        .execute(&mut *tx)
        .await?;
    let existing: i32 = sqlx::query_scalar("SELECT shards FROM mcp.cluster")
        .fetch_one(&mut *tx)
        .await?;
    if existing as u32 != shards {
        return Err(RegistryError::ShardCount {
            configured: shards,
            existing: existing as u32,
        });
    }
    sqlx::query(
        "INSERT INTO mcp.cluster_shards (shard) SELECT generate_series(0, $1 - 1) \
         ON CONFLICT (shard) DO NOTHING",
    )
    .bind(shards as i32)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO mcp.cluster_nodes (node_id, advertise_url, status) VALUES ($1, $2, 'alive') \
         ON CONFLICT (node_id) DO UPDATE SET advertise_url = EXCLUDED.advertise_url, \
         status = 'alive', joined_at = statement_timestamp(), heartbeat_at = statement_timestamp(), left_at = NULL",
    )
    .bind(node_id)
    .bind(advertise_url)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Renews `node_id`'s heartbeat (and its status, should another node have
/// written it off meanwhile).
pub async fn heartbeat(pool: impl PgExecutor<'_>, node_id: &str) -> Result<(), RegistryError> {
    sqlx::query(
        "UPDATE mcp.cluster_nodes SET heartbeat_at = statement_timestamp(), status = 'alive', left_at = NULL \
         WHERE node_id = $1",
    )
    .bind(node_id)
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks `node_id` gone (a clean stop) and releases `held` (shard,
/// epoch), in one transaction.
pub async fn leave(
    pool: &sqlx::PgPool,
    node_id: &str,
    held: &[(u32, u64)],
) -> Result<(), RegistryError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE mcp.cluster_nodes SET status = 'gone', left_at = statement_timestamp() \
         WHERE node_id = $1",
    )
    .bind(node_id)
    .execute(&mut *tx)
    .await?;
    release(&mut *tx, node_id, held).await?;
    tx.commit().await?;
    Ok(())
}

/// Every node, by node id; `lease` decides which count as alive.
pub async fn nodes(
    pool: impl PgExecutor<'_>,
    lease: Duration,
) -> Result<Vec<NodeRow>, RegistryError> {
    let rows = sqlx::query(
        "SELECT node_id, advertise_url, \
         status = 'alive' AND heartbeat_at > statement_timestamp() - $1 * interval '1 millisecond' AS alive, \
         (extract(epoch FROM heartbeat_at) * 1000)::bigint AS heartbeat_ms \
         FROM mcp.cluster_nodes ORDER BY node_id",
    )
    .bind(millis(lease) as f64)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| NodeRow {
            node_id: row.get("node_id"),
            advertise_url: row.get("advertise_url"),
            alive: row.get("alive"),
            heartbeat_at_ms: row.get("heartbeat_ms"),
        })
        .collect())
}

/// Every shard, by number.
pub async fn shards(pool: impl PgExecutor<'_>) -> Result<Vec<ShardRow>, RegistryError> {
    let rows = sqlx::query(
        "SELECT shard, owner, epoch, lease_expires_at > statement_timestamp() AS leased, \
         CASE WHEN lease_expires_at = '-infinity' THEN 1e15::float8 \
         ELSE greatest(0, extract(epoch FROM statement_timestamp() - lease_expires_at) * 1000)::float8 END AS expired_ms \
         FROM mcp.cluster_shards ORDER BY shard",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .iter()
        .map(|row| ShardRow {
            shard: row.get::<i32, _>("shard") as u32,
            owner: row.get("owner"),
            epoch: row.get::<i64, _>("epoch") as u64,
            leased: row.get("leased"),
            expired_for: Duration::from_secs_f64(row.get::<f64, _>("expired_ms") / 1000.0),
        })
        .collect())
}

/// Takes every shard of `wanted` whose lease is free, has run out, or is
/// already `node_id`'s (a lease it holds without knowing it: a reply lost,
/// a restart), for `lease`, bumping its epoch; answers the shards taken
/// with their new epochs. A shard someone else holds (or took first), or
/// whose row a write holds locked, is left out.
pub async fn acquire(
    pool: impl PgExecutor<'_>,
    node_id: &str,
    wanted: &[u32],
    lease: Duration,
) -> Result<Vec<(u32, u64)>, RegistryError> {
    let wanted: Vec<i32> = wanted.iter().map(|s| *s as i32).collect();
    let rows = sqlx::query(
        "UPDATE mcp.cluster_shards SET owner = $1, epoch = epoch + 1, \
         lease_expires_at = statement_timestamp() + $3 * interval '1 millisecond' \
         WHERE shard IN (SELECT shard FROM mcp.cluster_shards WHERE shard = ANY($2) \
           AND (owner IS NULL OR owner = $1 OR lease_expires_at <= statement_timestamp()) \
           FOR NO KEY UPDATE SKIP LOCKED) \
         RETURNING shard, epoch",
    )
    .bind(node_id)
    .bind(&wanted)
    .bind(millis(lease) as f64)
    .fetch_all(pool)
    .await?;
    Ok(taken(&rows))
}

/// Extends the leases `node_id` still holds among `held` (shard, epoch)
/// for `lease` from now; answers the shards renewed. One that ran out, or
/// changed hands, is not renewed (the node lost it).
///
/// A write for a shard holds its row `FOR SHARE` (the fence) until it
/// commits, and under a steady load some write nearly always does: a
/// renewal that skipped locked rows could miss a busy shard round after
/// round until its lease ran out. So the renewal waits for those writes
/// (they are short), for at most an eighth of the lease; only past that
/// does it skip the rows still locked, which the next round renews.
pub async fn renew(
    pool: &sqlx::PgPool,
    node_id: &str,
    held: &[(u32, u64)],
    lease: Duration,
) -> Result<Vec<u32>, RegistryError> {
    let wait = (lease / 8).max(Duration::from_millis(10));
    let mut tx = pool.begin().await?;
    // lock_timeout bounds each row's wait, statement_timeout the sum.
    sqlx::query(
        "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $1, true)",
    )
    .bind(millis(wait).to_string())
    .execute(&mut *tx)
    .await?;
    match renew_rows(&mut *tx, node_id, held, lease, "").await {
        Ok(renewed) => {
            tx.commit().await?;
            Ok(renewed)
        }
        // lock_not_available, query_canceled (the statement's timeout).
        Err(RegistryError::Postgres(sqlx::Error::Database(e)))
            if matches!(e.code().as_deref(), Some("55P03" | "57014")) =>
        {
            tx.rollback().await?;
            renew_rows(pool, node_id, held, lease, "SKIP LOCKED").await
        }
        Err(e) => Err(e),
    }
}

/// The renewal's statement; `skip`: `SKIP LOCKED` or nothing.
async fn renew_rows(
    conn: impl PgExecutor<'_>,
    node_id: &str,
    held: &[(u32, u64)],
    lease: Duration,
    skip: &str,
) -> Result<Vec<u32>, RegistryError> {
    let (shards, epochs) = split(held);
    let rows = sqlx::query(&format!(
        "UPDATE mcp.cluster_shards SET lease_expires_at = statement_timestamp() + $4 * interval '1 millisecond' \
         WHERE shard IN (SELECT s.shard FROM mcp.cluster_shards AS s \
           JOIN UNNEST($2::int4[], $3::int8[]) AS h(shard, epoch) ON s.shard = h.shard \
           WHERE s.epoch = h.epoch AND s.owner = $1 AND s.lease_expires_at > statement_timestamp() \
           FOR NO KEY UPDATE OF s {skip}) \
         RETURNING shard"
    ))
    .bind(node_id)
    .bind(&shards)
    .bind(&epochs)
    .bind(millis(lease) as f64)
    .fetch_all(conn)
    .await?;
    Ok(rows.iter().map(|r| r.get::<i32, _>(0) as u32).collect())
}

/// Gives up `held` (shard, epoch) at once, so the next owner need not wait
/// for the lease to run out; answers the shards released.
pub async fn release(
    pool: impl PgExecutor<'_>,
    node_id: &str,
    held: &[(u32, u64)],
) -> Result<Vec<u32>, RegistryError> {
    let (shards, epochs) = split(held);
    let rows = sqlx::query(
        "UPDATE mcp.cluster_shards AS s SET owner = NULL, lease_expires_at = statement_timestamp() \
         FROM UNNEST($2::int4[], $3::int8[]) AS h(shard, epoch) \
         WHERE s.shard = h.shard AND s.epoch = h.epoch AND s.owner = $1 \
         RETURNING s.shard",
    )
    .bind(node_id)
    .bind(&shards)
    .bind(&epochs)
    .fetch_all(pool)
    .await?;
    Ok(rows.iter().map(|r| r.get::<i32, _>(0) as u32).collect())
}

/// The fencing check, run inside the transaction that writes for `held`
/// (shard, epoch): locks those shard rows against a change of hands until
/// the transaction ends (`FOR SHARE`, so writers of other shards and of
/// the same shard do not wait on each other) and answers the shards of
/// `held` that `node_id` no longer holds at that epoch with a running
/// lease. The caller writes only when the answer is empty.
pub async fn fence(
    conn: impl PgExecutor<'_>,
    node_id: &str,
    held: &[(u32, u64)],
) -> Result<Vec<u32>, RegistryError> {
    let (shards, epochs) = split(held);
    let rows = sqlx::query(
        "SELECT s.shard FROM mcp.cluster_shards AS s \
         JOIN UNNEST($2::int4[], $3::int8[]) AS h(shard, epoch) ON s.shard = h.shard \
         WHERE s.owner = $1 AND s.epoch = h.epoch AND s.lease_expires_at > statement_timestamp() \
         FOR SHARE OF s",
    )
    .bind(node_id)
    .bind(&shards)
    .bind(&epochs)
    .fetch_all(conn)
    .await?;
    let valid: std::collections::HashSet<u32> =
        rows.iter().map(|r| r.get::<i32, _>(0) as u32).collect();
    Ok(held
        .iter()
        .map(|(shard, _)| *shard)
        .filter(|shard| !valid.contains(shard))
        .collect())
}

fn taken(rows: &[sqlx::postgres::PgRow]) -> Vec<(u32, u64)> {
    rows.iter()
        .map(|r| (r.get::<i32, _>(0) as u32, r.get::<i64, _>(1) as u64))
        .collect()
}

fn split(held: &[(u32, u64)]) -> (Vec<i32>, Vec<i64>) {
    held.iter().map(|(s, e)| (*s as i32, *e as i64)).unzip()
}
