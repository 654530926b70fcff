-- A node taking a cluster shard over also reads the shard's sessions that
-- ended within the retention (they stay readable): by shard, for ended
-- rows only. A row enters it once, when it ends (a status change is never
-- a HOT update anyway: the live index's predicate names the status).
CREATE INDEX IF NOT EXISTS edge_mcp_sessions_shard_ended_idx
    ON mcp.edge_mcp_sessions (shard, id)
    WHERE shard IS NOT NULL AND status IN ('expired', 'terminated');
