#!/usr/bin/env bash
# Runs schemathesis (from PyPI) against a real server with the OpenAPI
# document the server itself serves: every operation, generated and mutated
# inputs, and the checks below. Passes when no response is a 5xx and every
# response conforms to the document (status code, content type, headers,
# body schema).
#
#   tests/schemathesis.sh            # builds the binary, runs, prints a summary
#   MAX_EXAMPLES=200 tests/schemathesis.sh
#
# Needs python3 (with venv) and network access to PyPI the first time; the
# tool is installed into target/schemathesis-venv. Traffic goes to 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."

MAX_EXAMPLES="${MAX_EXAMPLES:-60}"
VENV=target/schemathesis-venv
if [ ! -x "$VENV/bin/schemathesis" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet 'schemathesis>=4,<5'
fi

cargo build --quiet
WORK="$(mktemp -d)"
SERVER_PID=""
cleanup() {
  if [ -n "$SERVER_PID" ]; then kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

API_KEY="schemathesis-tenant-key"
ADMIN_KEY="schemathesis-admin-key"
BIN=target/debug/edge-sessions
head -c 32 /dev/urandom | base64 > "$WORK/master.key"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cat > "$WORK/config.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
[storage]
data_dir = "$WORK/data"
[security]
master_key_file = "$WORK/master.key"
[admin]
key_sha256 = ["$($BIN hash-key "$ADMIN_KEY")"]
[rate_limits]
create_per_second = 0
read_per_second = 0
write_per_second = 0
admin_per_second = 0
[[tenants]]
id = "6f1c0d3e-8a4b-4c6e-9f10-2b3c4d5e6f70"
name = "schemathesis"
max_active_sessions = 100000
  [[tenants.api_keys]]
  sha256 = "$($BIN hash-key "$API_KEY")"
  scopes = ["sessions", "passthrough:read"]
TOML
"$BIN" serve --config "$WORK/config.toml" > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 100); do
  curl -fsS "http://127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
  sleep 0.1
done
# A few real sessions, so generated ids sometimes hit.
for id in st-1 st-2 st-3; do
  curl -fsS -X POST "http://127.0.0.1:$PORT/api/v1/sessions" -H "X-API-Key: $API_KEY" \
    -H 'Content-Type: application/json' -d "{\"session_id\":\"$id\",\"edge_mcp_id\":\"e\"}" >/dev/null
done

set +e
"$VENV/bin/schemathesis" run "http://127.0.0.1:$PORT/api/v1/openapi.json" \
  --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
  --header "X-API-Key: $API_KEY" \
  --header "X-Admin-Key: $ADMIN_KEY" \
  --max-examples "$MAX_EXAMPLES" \
  --workers 1 \
  --report-dir "$WORK/report" \
  --seed 42 \
  --suppress-health-check all
status=$?
set -e
# A 5xx would show as a failed check above; an error the server only
# logged (a failed write, a panic caught by the middleware) fails the run too.
if grep -q 'ERROR' "$WORK/server.log"; then
  echo "the server logged errors:"; grep 'ERROR' "$WORK/server.log" | head -20
  status=1
fi
exit $status
