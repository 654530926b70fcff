DROP TABLE mcp.cluster_quota;
