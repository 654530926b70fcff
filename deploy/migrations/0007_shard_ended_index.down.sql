DROP INDEX IF EXISTS mcp.edge_mcp_sessions_shard_ended_idx;
