ALTER TABLE mcp.edge_mcp_sessions RESET (fillfactor);
DROP INDEX mcp.edge_mcp_sessions_live_idx;
CREATE INDEX edge_mcp_sessions_live_expiry_idx
    ON mcp.edge_mcp_sessions (expires_at)
    WHERE status IN ('active', 'idle');
CREATE INDEX edge_mcp_sessions_last_activity_idx
    ON mcp.edge_mcp_sessions (last_activity_at);
