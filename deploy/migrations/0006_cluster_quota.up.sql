-- A tenant's max_active_sessions across a cluster (issue 12). Each node
-- reserves part of each tenant's quota here and admits creates from its
-- reservation without asking PostgreSQL; it asks again only when the
-- reservation runs out. A reservation is granted only while
--   live sessions in mcp.edge_mcp_sessions
--   + every live node's reservation
--   <= max_active_sessions,
-- under a per-tenant advisory lock, so the cluster never admits more than
-- the limit. reserved counts the node's unused reservation plus its
-- creates not yet committed; a node that stops heartbeating for two leases
-- no longer counts (its creates can no longer commit: they are fenced).
CREATE TABLE mcp.cluster_quota (
    tenant_id uuid NOT NULL,
    node_id text NOT NULL,
    reserved integer NOT NULL CHECK (reserved >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, node_id)
);
