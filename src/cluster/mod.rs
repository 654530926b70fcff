//! The cluster: several nodes on one PostgreSQL, which decides who owns
//! which sessions (issue 12, contract: "Cluster" in API.md).
//!
//! Here: membership and shard ownership ([`member`], [`registry`],
//! [`placement`]), what this node serves ([`ownership`], read by the
//! engine, the shipper and the HTTP router) and the tenants' quotas across
//! the cluster ([`quota`]). The engine's side of a shard (rebuilding its
//! sessions, handing them over) is `engine::cluster`; routing and
//! forwarding calls is `http::cluster`; `service` joins and leaves.
//!
//! # Design
//!
//! No consensus of our own: PostgreSQL, already the system of record, holds
//! a row per node (heartbeat) and a row per shard (owner, epoch, lease
//! expiry), as Orleans's SQL membership provider keeps a table of silos.
//! - **Shards.** A fixed number of virtual shards (`cluster.shards`,
//!   default 256); a session's shard is a stable hash of its tenant id and
//!   session id ([`placement::shard_of`]). 256 shards spread over three
//!   nodes within about a tenth of an even share (85 each, give or take 8),
//!   and keep the per-round work (one row each) small.
//! - **Who should own a shard** is rendezvous hashing over the live members
//!   ([`placement::desired_owner`]): every node computes the same answer
//!   from the member list alone, and a join or a leave moves only about
//!   1/N of the shards.
//! - **Who does own it** is PostgreSQL's shard row: a node takes a shard
//!   only when its lease is free or has run out, with a compare-and-set
//!   that bumps the shard's epoch ([`registry::acquire`]). Leases run on
//!   PostgreSQL's clock, so the nodes' clocks need not agree with it or
//!   with each other; the protocol assumes only that the clocks run at
//!   about the same rate and that the database's is not stepped while
//!   leases run (see [`member`]).
//! - **Fencing.** Every transaction that writes a shard's sessions checks,
//!   in the same transaction, that this node still holds the shard at its
//!   epoch with a running lease, and locks the row against a change of
//!   hands until it commits ([`registry::fence`]). A node that was frozen
//!   past its lease and wakes up finds the epoch moved on and writes
//!   nothing: Kleppmann's fencing tokens, with the epoch as the token.
//! - **Rounds.** Each node runs a round a quarter of a lease apart
//!   ([`member::Member::run`]): renew, take, hand over, then heartbeat.
//!   A shard counts as held for 0.9 of a lease after its renewal was sent,
//!   so two rounds in a row may fail without costing it; a third costs it.
//!
//! # Timing
//!
//! `cluster.lease_seconds` (default 5 s) is both the heartbeat's and the
//! lease's length. A node that stops answering (killed, frozen, cut off,
//! or reaching PostgreSQL but failing its rounds) loses its shards when
//! their leases run out, at most a lease after its last successful round,
//! and stops counting as a member then too (its heartbeat is the last step
//! of a successful round); the desired owners take them at their next
//! round. **Failure detection:** at most a lease plus a round (5 + 1.25 s
//! by default) from the last successful round of the lost node; a node
//! that leaves cleanly releases its shards at once, and they are taken
//! within a round.
//!
//! # Hand-over
//!
//! A shard whose desired owner is another live member is handed over in
//! two rounds: the first asks the [`member::ShardOwner`] (the engine) to
//! drain it (stop taking calls for it, let what it acknowledged be
//! committed) and keeps renewing the lease meanwhile; the first round after
//! the drain ends releases it, and the new owner takes it at its next
//! round. A clean stop drains every shard the same way (for at most two
//! leases), then releases them all in one transaction.
//!
//! # Serving
//!
//! - **Taking a shard over** ([`ShardOwner::adopt`]) reads its live
//!   sessions (and those ended within the retention) from PostgreSQL into
//!   the node's cache, then starts their actors. Nothing read back is
//!   written back, and changes logged before the tenure began never ship
//!   under it ([`ownership::Ownership::sort`]).
//! - **Handing one over** ([`ShardOwner::drain`]) waits for the calls let
//!   in, queues the sessions' coalesced writes, waits until everything
//!   queued is committed, then stops the actors: what a session
//!   acknowledged is in PostgreSQL before its next owner reads it. The
//!   wait is bounded by a lease.
//! - **A lost shard** (its lease ran out on this node's clock) stops its
//!   actors at once; whatever of it was not shipped is dropped, and the
//!   callers still waiting for it are told it failed.
//! - **Calls** for a shard held elsewhere are forwarded to the owner (see
//!   `http::cluster`, which also says how forwarding pools connections and
//!   how long a call waits during a hand-over: at most two leases).
//! - **Leaving** (SIGTERM) drains every shard, releases them all, then
//!   keeps answering for half a lease (421 to forwarded calls) before the
//!   HTTP server stops, so no node forwards onto a closed connection.

pub mod member;
pub mod ownership;
pub mod placement;
pub mod quota;
pub mod registry;

pub use member::{Member, MemberConfig, Round, ShardOwner, View};
pub use ownership::{Ownership, Stage, Tenure};
pub use quota::Quota;
pub use registry::RegistryError;
