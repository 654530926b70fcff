-- Cluster membership and shard ownership (issue 12). PostgreSQL decides
-- who owns which shard; every time in these tables is PostgreSQL's own
-- clock (now()), so the nodes' clocks never have to agree.

-- One row: the cluster's fixed shard count. A node configured with
-- another count refuses to join.
CREATE TABLE mcp.cluster (
    id boolean PRIMARY KEY DEFAULT true CHECK (id),
    shards integer NOT NULL CHECK (shards > 0),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- A row per node that ever joined. A node is alive while its status is
-- 'alive' and its heartbeat is younger than a lease.
CREATE TABLE mcp.cluster_nodes (
    node_id text PRIMARY KEY,
    advertise_url text NOT NULL,
    status text NOT NULL CHECK (status IN ('alive', 'gone')),
    joined_at timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    left_at timestamptz
);

-- A row per shard. owner holds the shard until lease_expires_at; epoch
-- goes up by one every time the shard changes hands, and every write for
-- the shard's sessions checks (owner, epoch) in its own transaction
-- (fencing). A released shard has no owner.
CREATE TABLE mcp.cluster_shards (
    shard integer PRIMARY KEY CHECK (shard >= 0),
    owner text,
    epoch bigint NOT NULL DEFAULT 0,
    lease_expires_at timestamptz NOT NULL DEFAULT '-infinity'
);
