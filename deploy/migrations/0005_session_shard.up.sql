-- The cluster shard of each session (issue 12): written by the nodes of a
-- cluster, NULL on a single node. A nullable column without a default is
-- a change of the catalog only (no table rewrite).
ALTER TABLE mcp.edge_mcp_sessions ADD COLUMN shard integer;
-- A node that takes a shard over rebuilds the shard's live sessions
-- through this partial index, which rows without a shard never enter, so
-- a single node pays nothing for it. A session's shard never changes (the
-- shard count is fixed for the cluster's life), and the status in the
-- predicate is already in another index's, so a tool call's update stays
-- a HOT update.
--
-- Built inside the migration's transaction, so it holds the sessions'
-- writes while it scans the table (seconds for millions of rows), once.
-- Not CONCURRENTLY: that cannot run in a transaction, and next to another
-- node's (or this node's second) migrator waiting on the migration lock
-- it deadlocks and leaves an invalid index behind. An operator who cannot
-- hold writes that long creates it CONCURRENTLY by hand first, with this
-- same definition; IF NOT EXISTS then skips it here.
CREATE INDEX IF NOT EXISTS edge_mcp_sessions_shard_live_idx
    ON mcp.edge_mcp_sessions (shard, id)
    WHERE shard IS NOT NULL AND status IN ('active', 'idle');
