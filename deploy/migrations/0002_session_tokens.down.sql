ALTER TABLE mcp.edge_mcp_sessions
    DROP COLUMN IF EXISTS refresh_token_sha256,
    DROP COLUMN IF EXISTS session_token_sha256;
