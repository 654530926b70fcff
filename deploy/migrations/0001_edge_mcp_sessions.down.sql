-- Reverses 0001_edge_mcp_sessions.up.sql completely.
DROP VIEW IF EXISTS mcp.session_metrics;
DROP TABLE IF EXISTS mcp.session_audit_log;
DROP TABLE IF EXISTS mcp.session_tool_executions;
DROP TABLE IF EXISTS mcp.edge_mcp_sessions;
DROP SCHEMA IF EXISTS mcp;
