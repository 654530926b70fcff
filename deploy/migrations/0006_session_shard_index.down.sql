-- no-transaction
DROP INDEX CONCURRENTLY IF EXISTS mcp.edge_mcp_sessions_shard_live_idx;
