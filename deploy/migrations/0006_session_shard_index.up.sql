-- no-transaction
-- A node that takes a shard over rebuilds the shard's live sessions
-- through this partial index, which rows without a shard never enter, so
-- a single node pays nothing for it. A session's shard never changes (the
-- shard count is fixed for the cluster's life), and the status in the
-- predicate is already in another index's, so a tool call's update stays
-- a HOT update. Built CONCURRENTLY (outside a transaction, hence the
-- first line): a rolling deploy that migrates at start does not hold up
-- the sessions' writes while the table is scanned.
CREATE INDEX CONCURRENTLY IF NOT EXISTS edge_mcp_sessions_shard_live_idx
    ON mcp.edge_mcp_sessions (shard, id)
    WHERE shard IS NOT NULL AND status IN ('active', 'idle');
