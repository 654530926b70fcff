-- Token hashes, so a data dir rebuilt from PostgreSQL keeps the clients'
-- session and refresh tokens working. SHA-256 digests only: the tokens
-- themselves are never stored.
ALTER TABLE mcp.edge_mcp_sessions
    ADD COLUMN session_token_sha256 bytea CHECK (octet_length(session_token_sha256) = 32),
    ADD COLUMN refresh_token_sha256 bytea CHECK (octet_length(refresh_token_sha256) = 32);
