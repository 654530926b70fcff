DROP TABLE mcp.cluster_shards;
DROP TABLE mcp.cluster_nodes;
DROP TABLE mcp.cluster;
