-- Cheaper writes (issue 9): every index is one more insert per created row,
-- and an update that changes no indexed column can stay on its heap page
-- (a HOT update, no index touched at all). A tool call changes
-- last_activity_at and expires_at, so neither stays indexed:
-- - nothing reads sessions by last activity;
-- - recovery reads live sessions by tenant, in row-id order, which the
--   partial index below serves without naming a changing column.
DROP INDEX mcp.edge_mcp_sessions_last_activity_idx;
DROP INDEX mcp.edge_mcp_sessions_live_expiry_idx;
CREATE INDEX edge_mcp_sessions_live_idx
    ON mcp.edge_mcp_sessions (tenant_id, id)
    WHERE status IN ('active', 'idle');
-- Room on each page for the next versions of its rows (HOT updates).
ALTER TABLE mcp.edge_mcp_sessions SET (fillfactor = 80);
