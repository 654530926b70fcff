-- edge-sessions: the PostgreSQL system of record.
--
-- Written behind by the engine's outbox shipper (never on the request path
-- except under durability = "postgres"). Names are part of the operator
-- contract (CONFIG.md): tools, exports and BI read them.

CREATE SCHEMA IF NOT EXISTS mcp;

-- One row per session, columns named as the session resource's fields.
CREATE TABLE mcp.edge_mcp_sessions (
    id                         uuid        PRIMARY KEY,
    session_id                 text        NOT NULL CHECK (length(session_id) BETWEEN 1 AND 255),
    tenant_id                  uuid        NOT NULL,
    user_id                    uuid,
    edge_mcp_id                text        NOT NULL,
    client_name                text,
    client_type                text        NOT NULL
        CHECK (client_type IN ('claude-code', 'ide', 'agent', 'cli')),
    client_version             text,
    status                     text        NOT NULL
        CHECK (status IN ('active', 'idle', 'expired', 'terminated')),
    initialized                boolean     NOT NULL DEFAULT false,
    connection_metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    has_passthrough_auth       boolean     NOT NULL DEFAULT false,
    passthrough_providers      text[]      NOT NULL DEFAULT '{}',
    -- AES-256-GCM ciphertext (key id header, nonce, tag); never plaintext.
    passthrough_auth_encrypted bytea,
    tool_execution_count       bigint      NOT NULL DEFAULT 0 CHECK (tool_execution_count >= 0),
    tool_error_count           bigint      NOT NULL DEFAULT 0 CHECK (tool_error_count >= 0),
    total_tokens_used          bigint      NOT NULL DEFAULT 0 CHECK (total_tokens_used >= 0),
    created_at                 timestamptz NOT NULL,
    -- Start of the current lifetime (created_at, or the last refresh).
    lifetime_started_at        timestamptz NOT NULL,
    last_activity_at           timestamptz NOT NULL,
    expires_at                 timestamptz NOT NULL,
    idle_timeout_seconds       integer     NOT NULL CHECK (idle_timeout_seconds > 0),
    ttl_seconds                integer     NOT NULL CHECK (ttl_seconds > 0),
    terminated_at              timestamptz,
    termination_reason         text,
    version                    bigint      NOT NULL CHECK (version >= 1),
    updated_at                 timestamptz NOT NULL DEFAULT now(),
    -- Client-chosen ids are scoped per tenant.
    CONSTRAINT edge_mcp_sessions_tenant_session_key UNIQUE (tenant_id, session_id)
);

-- Lists and counts per tenant and status, newest first.
CREATE INDEX edge_mcp_sessions_tenant_status_idx
    ON mcp.edge_mcp_sessions (tenant_id, status, created_at DESC);
-- Live sessions by expiry: recovery and cleanup read only these.
CREATE INDEX edge_mcp_sessions_live_expiry_idx
    ON mcp.edge_mcp_sessions (expires_at)
    WHERE status IN ('active', 'idle');
CREATE INDEX edge_mcp_sessions_last_activity_idx
    ON mcp.edge_mcp_sessions (last_activity_at);

-- One row per tool execution; (session_id, seq) makes a replayed batch
-- harmless (ON CONFLICT DO NOTHING).
CREATE TABLE mcp.session_tool_executions (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    session_id   uuid        NOT NULL REFERENCES mcp.edge_mcp_sessions (id) ON DELETE CASCADE,
    seq          bigint      NOT NULL CHECK (seq >= 1),
    tool_name    text        NOT NULL,
    tool_id      text,
    arguments    jsonb       NOT NULL DEFAULT '{}'::jsonb,
    result       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    error        text,
    duration_ms  bigint      NOT NULL DEFAULT 0 CHECK (duration_ms >= 0),
    tokens_used  bigint      NOT NULL DEFAULT 0 CHECK (tokens_used >= 0),
    executed_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL,
    CONSTRAINT session_tool_executions_session_seq_key UNIQUE (session_id, seq)
);

CREATE INDEX session_tool_executions_executed_at_idx
    ON mcp.session_tool_executions (executed_at);
CREATE INDEX session_tool_executions_tool_name_idx
    ON mcp.session_tool_executions (tool_name, executed_at);

-- Who did what to a session, and why.
CREATE TABLE mcp.session_audit_log (
    id          uuid        PRIMARY KEY,
    -- No foreign key: the log outlives the sessions it tells about, and
    -- a per-row key check would slow down shipping every create.
    session_id  uuid        NOT NULL,
    tenant_id   uuid        NOT NULL,
    action      text        NOT NULL
        CHECK (action IN ('created', 'terminated', 'expired', 'revoked')),
    actor       text        NOT NULL,
    reason      text,
    at          timestamptz NOT NULL
);

CREATE INDEX session_audit_log_session_idx ON mcp.session_audit_log (session_id, at);
CREATE INDEX session_audit_log_tenant_at_idx ON mcp.session_audit_log (tenant_id, at);

-- Per-tenant figures, as GET /api/v1/sessions/metrics reports them.
CREATE VIEW mcp.session_metrics AS
SELECT
    tenant_id,
    count(*) FILTER (WHERE status = 'active')              AS active_sessions,
    count(*) FILTER (WHERE status = 'idle')                AS idle_sessions,
    count(*)                                               AS total_sessions,
    coalesce(sum(tool_execution_count), 0)::bigint         AS total_tool_executions,
    coalesce(sum(total_tokens_used), 0)::bigint            AS total_tokens_used,
    coalesce(avg(extract(epoch FROM (coalesce(terminated_at, now()) - created_at)) / 60.0), 0)::double precision
                                                           AS avg_session_duration_minutes
FROM mcp.edge_mcp_sessions
GROUP BY tenant_id;
