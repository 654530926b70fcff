DROP INDEX mcp.edge_mcp_sessions_shard_live_idx;
ALTER TABLE mcp.edge_mcp_sessions DROP COLUMN shard;
