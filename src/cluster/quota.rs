//! A tenant's `max_active_sessions` across the cluster, without a
//! PostgreSQL round trip per create.
//!
//! Each node reserves part of each tenant's quota in `mcp.cluster_quota`
//! and admits creates from its reservation in memory. Only when it has
//! none left does it ask PostgreSQL for more ([`Quota::take`]), which
//! grants at most what
//!
//! ```text
//! max_active_sessions - live sessions in PostgreSQL - every other node's reservation
//! ```
//!
//! leaves, under a per-tenant advisory lock, so two nodes never grant from
//! the same room. A node's row counts its unused room and its creates not
//! yet committed: a create is counted in the row until it is committed,
//! and from then on as live. So the cluster never admits more than the
//! limit. A session that ends frees its room once its end is committed.
//!
//! A node hands back what it did not use after a lease without a create
//! of that tenant ([`Quota::give_back_idle`], which also writes its rows
//! again every half lease), and everything when it leaves. A row not
//! written for two leases no longer counts (its node is frozen, cut off or
//! dead), and a node admits from its reservation only within a lease and a
//! half (on `CLOCK_BOOTTIME`, which counts a suspended machine's time too)
//! of its rows' last write: before the others can stop counting them, it
//! stops using them. Its creates not yet committed when it went away
//! cannot commit later: its leases ran out and its writes are fenced.
//! Reservations come in chunks of a quarter of the tenant's limit divided
//! among the live nodes (at least one), so a small limit is not all held
//! by one node while another has callers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use super::registry::RegistryError;

/// Longest a create waits for a reservation (then 503): a node that
/// forwarded the create waits longer than this, its commit and the wait
/// for the shard together (see `http::cluster`).
pub const RESERVE_LIMIT: Duration = Duration::from_secs(5);

/// One tenant's reservation on this node.
#[derive(Debug, Default)]
struct Slot {
    /// Creates this node may still admit without asking.
    unused: AtomicI64,
    /// What this node's row counts: `unused` plus its creates not yet
    /// committed. One counter, so the row is never written from two reads
    /// a create in between made disagree: a create taken moves one from
    /// `unused` into the creates in flight (this stays), a commit takes
    /// one off, a create that failed goes back to `unused` (this stays).
    reserved: AtomicI64,
    /// When the last create was admitted (ms since start), to give back
    /// what an idle node holds.
    last_used: AtomicU64,
    /// Until when (`CLOCK_BOOTTIME`, ns) `unused` may be admitted from: a
    /// lease and a half after this node's row was last written (the others
    /// count a row for two leases after it was written).
    valid_until: AtomicU64,
}

impl Slot {
    /// This tenant's row was written by a statement sent at `sent`.
    fn confirmed(&self, sent: u64, lease: Duration) {
        let until = sent + (lease.as_nanos() as u64) * 3 / 2;
        self.valid_until.fetch_max(until, Ordering::AcqRel);
    }
}

/// This node's reservations (see the module docs).
#[derive(Debug)]
pub struct Quota {
    node_id: String,
    lease: Duration,
    slots: HashMap<Uuid, Slot>,
    /// One reservation or row write per tenant at a time on this node.
    turns: Mutex<HashMap<Uuid, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    started: std::time::Instant,
}

/// A create admitted from a reservation; tell [`Quota::settled`] how it
/// ended.
#[derive(Debug)]
#[must_use = "a taken slot must be settled"]
pub struct Taken {
    tenant: Uuid,
}

impl Quota {
    /// No reservation yet for `tenants`.
    pub fn new(node_id: String, lease: Duration, tenants: impl IntoIterator<Item = Uuid>) -> Self {
        Quota {
            node_id,
            lease,
            slots: tenants.into_iter().map(|t| (t, Slot::default())).collect(),
            turns: Mutex::new(HashMap::new()),
            started: std::time::Instant::now(),
        }
    }

    /// Takes room for one create of `tenant` (limit `max`): from this
    /// node's reservation, else reserving more in PostgreSQL. `None` when
    /// the cluster is at the limit.
    pub async fn take(
        &self,
        pool: &PgPool,
        tenant: Uuid,
        max: usize,
    ) -> Result<Option<Taken>, RegistryError> {
        let Some(slot) = self.slots.get(&tenant) else {
            return Ok(None);
        };
        loop {
            if self.take_local(slot) {
                return Ok(Some(Taken { tenant }));
            }
            let turn = self.turn(tenant);
            let _turn = turn.lock().await;
            // Another call may have reserved meanwhile.
            if self.take_local(slot) {
                return Ok(Some(Taken { tenant }));
            }
            if self.reserve(pool, tenant, slot, max).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// The lock that orders this node's row writes for `tenant`.
    fn turn(&self, tenant: Uuid) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut turns = self.turns.lock().unwrap_or_else(|e| e.into_inner());
        turns.entry(tenant).or_default().clone()
    }

    fn take_local(&self, slot: &Slot) -> bool {
        if boot_clock_ns() >= slot.valid_until.load(Ordering::Acquire) {
            return false;
        }
        let taken = slot
            .unused
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 0).then_some(n - 1)
            })
            .is_ok();
        if taken {
            slot.last_used
                .store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        }
        taken
    }

    /// A create taken with [`Quota::take`] was committed (it now counts as
    /// live in PostgreSQL) or was not admitted after all (its room comes
    /// back to this node).
    pub fn settled(&self, taken: Taken, committed: bool) {
        if let Some(slot) = self.slots.get(&taken.tenant) {
            if committed {
                slot.reserved.fetch_sub(1, Ordering::AcqRel);
            } else {
                slot.unused.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Asks PostgreSQL for more room for `tenant`; answers how much was
    /// granted (0: the cluster is at the limit). The caller holds the
    /// tenant's turn.
    async fn reserve(
        &self,
        pool: &PgPool,
        tenant: Uuid,
        slot: &Slot,
        max: usize,
    ) -> Result<i64, RegistryError> {
        let stale = self.lease * 2;
        let sent = boot_clock_ns();
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 12))")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        // A row not written for two leases is a node gone: not counted.
        let (live, others, nodes): (i64, i64, i64) = sqlx::query_as(
            "SELECT \
               (SELECT count(*) FROM mcp.edge_mcp_sessions WHERE tenant_id = $1 AND status IN ('active', 'idle')), \
               (SELECT coalesce(sum(reserved), 0)::int8 FROM mcp.cluster_quota \
                 WHERE tenant_id = $1 AND node_id <> $2 \
                   AND updated_at > statement_timestamp() - $3 * interval '1 millisecond'), \
               (SELECT count(*) FROM mcp.cluster_nodes \
                 WHERE status = 'alive' AND heartbeat_at > statement_timestamp() - $3 * interval '1 millisecond')",
        )
        .bind(tenant)
        .bind(&self.node_id)
        .bind(stale.as_millis() as f64)
        .fetch_one(&mut *tx)
        .await?;
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        // This node's own room and creates in flight (not live yet).
        let mine = slot.reserved.load(Ordering::Acquire);
        let room = (max - live - others - mine).max(0);
        let chunk = (max / (4 * nodes.max(1))).max(1);
        let granted = room.min(chunk);
        // Nothing local changes until the row is committed: a call given
        // up meanwhile (its future dropped) leaves no room counted here
        // that PostgreSQL does not hold. A row committed but not counted
        // here (dropped after the commit) only holds back room until the
        // next rewrite of the rows.
        write_row(&mut *tx, tenant, &self.node_id, mine + granted).await?;
        tx.commit().await?;
        slot.reserved.fetch_add(granted, Ordering::AcqRel);
        slot.unused.fetch_add(granted, Ordering::AcqRel);
        slot.confirmed(sent, self.lease);
        Ok(granted)
    }

    /// Gives back the reservations not used for a lease, and writes every
    /// tenant's row again (so creates committed since count once, and the
    /// others keep counting the rest). Call every half lease: the rows
    /// written keep this node's room usable.
    pub async fn give_back_idle(&self, pool: &PgPool) -> Result<(), RegistryError> {
        let now = self.started.elapsed().as_millis() as u64;
        let idle_for = self.lease.as_millis() as u64;
        let sent = boot_clock_ns();
        let mut failed = None;
        for (tenant, slot) in &self.slots {
            // Not while this node reserves for the tenant: its row would
            // be written back older than the reservation.
            let turn = self.turn(*tenant);
            let _turn = turn.lock().await;
            if now.saturating_sub(slot.last_used.load(Ordering::Relaxed)) >= idle_for {
                let unused = slot.unused.swap(0, Ordering::AcqRel);
                slot.reserved.fetch_sub(unused, Ordering::AcqRel);
            }
            let reserved = slot.reserved.load(Ordering::Acquire);
            match write_row(pool, *tenant, &self.node_id, reserved).await {
                Ok(()) => slot.confirmed(sent, self.lease),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Gives back everything (leaving the cluster).
    pub async fn give_back_all(&self, pool: &PgPool) -> Result<(), RegistryError> {
        for slot in self.slots.values() {
            slot.valid_until.store(0, Ordering::Release);
            let unused = slot.unused.swap(0, Ordering::AcqRel);
            slot.reserved.fetch_sub(unused, Ordering::AcqRel);
        }
        sqlx::query("DELETE FROM mcp.cluster_quota WHERE node_id = $1")
            .bind(&self.node_id)
            .execute(pool)
            .await?;
        Ok(())
    }
}

/// [`super::member::boot_clock`] in ns.
fn boot_clock_ns() -> u64 {
    super::member::boot_clock().as_nanos() as u64
}

/// Sets this node's row for `tenant` to `reserved`.
async fn write_row(
    conn: impl sqlx::PgExecutor<'_>,
    tenant: Uuid,
    node_id: &str,
    reserved: i64,
) -> Result<(), RegistryError> {
    sqlx::query(
        "INSERT INTO mcp.cluster_quota (tenant_id, node_id, reserved, updated_at) \
         VALUES ($1, $2, $3, statement_timestamp()) \
         ON CONFLICT (tenant_id, node_id) DO UPDATE SET reserved = EXCLUDED.reserved, updated_at = EXCLUDED.updated_at",
    )
    .bind(tenant)
    .bind(node_id)
    .bind(i32::try_from(reserved.max(0)).unwrap_or(i32::MAX))
    .execute(conn)
    .await?;
    Ok(())
}
