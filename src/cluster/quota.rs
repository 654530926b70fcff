//! A tenant's `max_active_sessions` across the cluster, without a
//! PostgreSQL round trip per create.
//!
//! Each node reserves part of each tenant's quota in `mcp.cluster_quota`
//! and admits creates from its reservation in memory. Only when it has
//! none left does it ask PostgreSQL for more ([`Quota::reserve`]), which
//! grants at most what
//!
//! ```text
//! max_active_sessions - live sessions in PostgreSQL - every other live node's reservation
//! ```
//!
//! leaves, under a per-tenant advisory lock, so two nodes never grant from
//! the same room. A node's row counts its unused reservation and its
//! creates not yet committed (in flight): a create is in neither the
//! sessions table nor the row only once it is committed, and then it is
//! counted as live. So the cluster never admits more than the limit. A
//! session that ends frees its room once its end is committed.
//!
//! A node hands back what it did not use after a lease without a create
//! of that tenant ([`Quota::give_back_idle`]), and everything when it
//! leaves; a node that stopped heartbeating for two leases no longer
//! counts (its creates cannot commit any more: its leases ran out and its
//! writes are fenced). Reservations come in chunks of a quarter of the
//! tenant's limit divided among the live nodes (at least one), so a small
//! limit is not all held by one node while another has callers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use sqlx::PgPool;
use uuid::Uuid;

use super::registry::RegistryError;

/// One tenant's reservation on this node.
#[derive(Debug, Default)]
struct Slot {
    /// Creates this node may still admit without asking.
    unused: AtomicI64,
    /// Creates admitted and not yet committed (or failed).
    in_flight: AtomicI64,
    /// When the last create was admitted (ms since start), to give back
    /// what an idle node holds.
    last_used: AtomicU64,
}

/// This node's reservations (see the module docs).
#[derive(Debug)]
pub struct Quota {
    node_id: String,
    lease: Duration,
    slots: HashMap<Uuid, Slot>,
    /// One reservation round trip per tenant at a time on this node.
    asking: Mutex<HashMap<Uuid, std::sync::Arc<tokio::sync::Mutex<()>>>>,
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
            asking: Mutex::new(HashMap::new()),
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
            if self.reserve(pool, tenant, max).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// The lock that orders this node's row writes for `tenant`.
    fn turn(&self, tenant: Uuid) -> std::sync::Arc<tokio::sync::Mutex<()>> {
        let mut asking = self.asking.lock().unwrap_or_else(|e| e.into_inner());
        asking.entry(tenant).or_default().clone()
    }

    fn take_local(&self, slot: &Slot) -> bool {
        let taken = slot
            .unused
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n > 0).then_some(n - 1)
            })
            .is_ok();
        if taken {
            slot.in_flight.fetch_add(1, Ordering::AcqRel);
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
            slot.in_flight.fetch_sub(1, Ordering::AcqRel);
            if !committed {
                slot.unused.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    /// Asks PostgreSQL for more room for `tenant`; answers how much was
    /// granted (0: the cluster is at the limit).
    async fn reserve(&self, pool: &PgPool, tenant: Uuid, max: usize) -> Result<i64, RegistryError> {
        let Some(slot) = self.slots.get(&tenant) else {
            return Ok(0);
        };
        let stale = self.lease * 2;
        let mut tx = pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1::text, 12))")
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        let (live, others, nodes): (i64, i64, i64) = sqlx::query_as(
            "SELECT \
               (SELECT count(*) FROM mcp.edge_mcp_sessions WHERE tenant_id = $1 AND status IN ('active', 'idle')), \
               (SELECT coalesce(sum(q.reserved), 0)::int8 FROM mcp.cluster_quota q \
                  JOIN mcp.cluster_nodes n ON n.node_id = q.node_id \
                 WHERE q.tenant_id = $1 AND q.node_id <> $2 \
                   AND n.heartbeat_at > statement_timestamp() - $3 * interval '1 millisecond'), \
               (SELECT count(*) FROM mcp.cluster_nodes \
                 WHERE status = 'alive' AND heartbeat_at > statement_timestamp() - $3 * interval '1 millisecond')",
        )
        .bind(tenant)
        .bind(&self.node_id)
        .bind(stale.as_millis() as f64)
        .fetch_one(&mut *tx)
        .await?;
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        // This node's own creates in flight are not live yet either.
        let in_flight = slot.in_flight.load(Ordering::Acquire);
        let unused = slot.unused.load(Ordering::Acquire);
        let room = (max - live - others - in_flight - unused).max(0);
        let chunk = (max / (4 * nodes.max(1))).max(1);
        let granted = room.min(chunk);
        // Held from here on: the row says so before anyone else can ask.
        let unused = slot.unused.fetch_add(granted, Ordering::AcqRel) + granted;
        write_row(
            &mut *tx,
            tenant,
            &self.node_id,
            unused + slot.in_flight.load(Ordering::Acquire),
        )
        .await?;
        tx.commit().await?;
        Ok(granted)
    }

    /// Gives back the reservations not used for a lease (and writes every
    /// tenant's row again, so creates committed since count once).
    pub async fn give_back_idle(&self, pool: &PgPool) -> Result<(), RegistryError> {
        let now = self.started.elapsed().as_millis() as u64;
        let idle_for = self.lease.as_millis() as u64;
        for (tenant, slot) in &self.slots {
            // Not while this node reserves for the tenant: its row would
            // be written back older than the reservation.
            let turn = self.turn(*tenant);
            let _turn = turn.lock().await;
            let idle = now.saturating_sub(slot.last_used.load(Ordering::Relaxed)) >= idle_for;
            if idle {
                slot.unused.store(0, Ordering::Release);
            }
            let reserved =
                slot.unused.load(Ordering::Acquire) + slot.in_flight.load(Ordering::Acquire);
            write_row(pool, *tenant, &self.node_id, reserved).await?;
        }
        Ok(())
    }

    /// Gives back everything (leaving the cluster).
    pub async fn give_back_all(&self, pool: &PgPool) -> Result<(), RegistryError> {
        for slot in self.slots.values() {
            slot.unused.store(0, Ordering::Release);
        }
        sqlx::query("DELETE FROM mcp.cluster_quota WHERE node_id = $1")
            .bind(&self.node_id)
            .execute(pool)
            .await?;
        Ok(())
    }
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
