ALTER TABLE mcp.edge_mcp_sessions DROP COLUMN shard;
