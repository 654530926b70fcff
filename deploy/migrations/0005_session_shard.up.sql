-- The cluster shard of each session (issue 12): written by the nodes of a
-- cluster, NULL on a single node. A nullable column without a default is
-- a change of the catalog only (no table rewrite). Its index comes in
-- 0006, built without blocking writes.
ALTER TABLE mcp.edge_mcp_sessions ADD COLUMN shard integer;
