-- The cluster shard of each session (issue 12): written by the nodes of a
-- cluster, NULL on a single node. A node that takes a shard over rebuilds
-- the shard's live sessions through the partial index below, which rows
-- without a shard never enter, so a single node pays nothing for it. A
-- session's shard never changes (the shard count is fixed for the
-- cluster's life), and the status in the predicate is already in another
-- index's, so a tool call's update stays a HOT update.
ALTER TABLE mcp.edge_mcp_sessions ADD COLUMN shard integer;
CREATE INDEX edge_mcp_sessions_shard_live_idx
    ON mcp.edge_mcp_sessions (shard, id)
    WHERE shard IS NOT NULL AND status IN ('active', 'idle');
