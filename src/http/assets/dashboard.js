"use strict";
// Self-contained: no CDN, no external code; works offline. The admin key
// typed into the form stays in this page's memory only: it buys a ticket
// for the stats socket and authenticates the session browser's calls.
const $ = (id) => document.getElementById(id);
const KEEP = 900; // samples: 15 minutes at one a second (the server keeps as many)
const COLORS = ["#2b6cb0", "#c05621", "#2f855a", "#c53030"];
let samples = [];
let socket = null;
let adminKey = null;

function cell(content) {
  const td = document.createElement("td");
  if (content instanceof Node) td.appendChild(content); else td.textContent = content;
  return td;
}
function row(cells) { const tr = document.createElement("tr"); cells.forEach((c) => tr.appendChild(cell(c))); return tr; }
function fixed(x) { return (Math.round(x * 100) / 100).toString(); }
function dash(x, format) { return x === null || x === undefined ? "—" : format(x); }
function ms(x) { return dash(x, (v) => fixed(v) + " ms"); }
function clock(at) { return new Date(at).toTimeString().slice(0, 8); }

function render(stats) {
  if (stats.history) samples = stats.history.slice(-KEEP);
  const now = stats.recent;
  if (now && (samples.length === 0 || samples[samples.length - 1].at_ms !== now.at_ms)) {
    samples.push(now);
    if (samples.length > KEEP) samples.shift();
  }
  $("live-sessions").textContent = stats.sessions.live;
  $("idle-sessions").textContent = stats.sessions.idle;
  $("ops").textContent = now ? Math.round(now.ops_per_second) : "—";
  $("p99").textContent = now ? ms(now.p99_ms) : "—";
  $("errors").textContent = now ? fixed(now.server_errors_per_second) : "—";
  $("websockets").textContent = now ? now.websockets_open : "—";
  $("tools-rate").textContent = now ? fixed(now.tool_executions_per_second) : "—";
  $("queue").textContent = stats.write_behind.queue_depth;
  $("lag").textContent = stats.write_behind.flush_lag_ms + " ms";
  $("rss").textContent = fixed(stats.process.rss_bytes / 1048576) + " MiB";
  $("uptime").textContent = stats.uptime_seconds + " s";
  const shards = $("shards"); shards.replaceChildren();
  stats.shards.forEach((s) => {
    const idle = s.ops_per_second === 0;
    const lat = (v) => (idle ? "—" : fixed(v));
    shards.appendChild(row([s.id, s.live_actors, s.mailbox_depth, Math.round(s.ops_per_second), lat(s.latency_ms.p50), lat(s.latency_ms.p99), lat(s.latency_ms.p999)]));
  });
  // A cluster node: the nodes and the shards each owns.
  $("cluster").hidden = !stats.cluster;
  if (stats.cluster) {
    const c = stats.cluster;
    $("cluster-here").textContent = "(this is " + c.node_id + ", serving " + c.shards.owned_here + " of " + c.shards.total + " shards)";
    const nodes = $("cluster-nodes"); nodes.replaceChildren();
    c.nodes.forEach((n) => nodes.appendChild(row([n.node_id, n.status, n.shards])));
  }
  const tenants = $("tenants"); tenants.replaceChildren();
  stats.tenants.slice(0, 10).forEach((t) => tenants.appendChild(row([t.tenant_id, t.name, t.live_sessions, t.idle_sessions])));
  const tools = $("top-tools"); tools.replaceChildren();
  stats.top_tools.forEach((t) => tools.appendChild(row([t.tool_name, t.executions])));
  drawAll();
}

function drawAll() {
  chart("chart-load", [
    { key: "ops_per_second", color: COLORS[0], axis: 0, unit: "/s" },
    { key: "p99_ms", color: COLORS[1], axis: 1, unit: " ms" },
  ]);
  chart("chart-answers", [
    { key: "ok_per_second", color: COLORS[2], axis: 0, unit: "/s" },
    { key: "client_errors_per_second", color: COLORS[1], axis: 0, unit: "/s" },
    { key: "server_errors_per_second", color: COLORS[3], axis: 0, unit: "/s" },
  ]);
  chart("chart-channels", [
    { key: "websockets_open", color: COLORS[0], axis: 0, unit: "" },
    { key: "tool_executions_per_second", color: COLORS[2], axis: 1, unit: "/s" },
  ]);
}

// A line chart of the kept samples over the last 15 minutes: a time axis
// with clock labels, a left and (when used) a right value axis with units.
function chart(id, series) {
  const canvas = $(id); const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  const left = 64, right = 64, top = 10, bottom = 24;
  const plotW = w - left - right, plotH = h - top - bottom;
  ctx.clearRect(0, 0, w, h);
  ctx.font = "12px system-ui, sans-serif";
  const end = samples.length ? samples[samples.length - 1].at_ms : Date.now();
  const start = end - KEEP * 1000;
  const x = (at) => left + ((at - start) / (end - start)) * plotW;
  const max = [0, 1].map((axis) => {
    const values = series.filter((s) => s.axis === axis)
      .flatMap((s) => samples.map((p) => p[s.key]).filter((v) => v !== null && v !== undefined));
    return values.length ? niceCeil(Math.max(...values)) : 1;
  });
  // Grid, value ticks and units.
  ctx.strokeStyle = "#e3e6ec"; ctx.fillStyle = "#6b7385"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = top + plotH - (i / 4) * plotH;
    ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(left + plotW, y + 0.5); ctx.stroke();
    [0, 1].forEach((axis) => {
      const s = series.find((t) => t.axis === axis);
      if (!s) return;
      const label = short((max[axis] * i) / 4) + s.unit;
      ctx.textAlign = axis === 0 ? "right" : "left";
      ctx.fillText(label, axis === 0 ? left - 6 : left + plotW + 6, y + 4);
    });
  }
  // Time labels every 3 minutes.
  ctx.textAlign = "center";
  const step = 180000;
  for (let t = Math.ceil(start / step) * step; t <= end; t += step) {
    const px = x(t);
    ctx.beginPath(); ctx.moveTo(px + 0.5, top); ctx.lineTo(px + 0.5, top + plotH); ctx.stroke();
    ctx.fillText(clock(t), px, h - 6);
  }
  // The lines; a null (no traffic) breaks the line.
  series.forEach((s) => {
    ctx.strokeStyle = s.color; ctx.lineWidth = 2; ctx.beginPath();
    let drawing = false;
    samples.forEach((p) => {
      const v = p[s.key];
      if (v === null || v === undefined) { drawing = false; return; }
      const px = x(p.at_ms), py = top + plotH - (v / max[s.axis]) * plotH;
      if (drawing) ctx.lineTo(px, py); else ctx.moveTo(px, py);
      drawing = true;
    });
    ctx.stroke();
  });
}

function niceCeil(v) {
  if (v <= 0) return 1;
  const magnitude = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * magnitude >= v) return m * magnitude;
  return 10 * magnitude;
}
function short(v) {
  if (v >= 1e6) return fixed(v / 1e6) + "M";
  if (v >= 1e3) return fixed(v / 1e3) + "k";
  return fixed(v);
}

async function connect(key) {
  $("status").textContent = "connecting…";
  const response = await fetch("/admin/tickets", { method: "POST", headers: { "X-Admin-Key": key } });
  if (!response.ok) { $("status").textContent = "refused (" + response.status + ")"; return; }
  adminKey = key;
  const { ticket } = await response.json();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  if (socket) socket.close();
  socket = new WebSocket(scheme + "//" + location.host + "/admin/stats/ws?ticket=" + encodeURIComponent(ticket));
  socket.onopen = () => { $("status").textContent = "live"; };
  socket.onmessage = (event) => render(JSON.parse(event.data));
  socket.onclose = () => { $("status").textContent = "disconnected"; };
}

// The session browser: the admin API with the key typed above.
async function admin(method, path, body) {
  const headers = { "X-Admin-Key": adminKey };
  if (body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, { method, headers, body: body ? JSON.stringify(body) : undefined });
  const text = await response.text();
  const json = text ? JSON.parse(text) : null;
  if (!response.ok) throw new Error((json && json.error) || response.status);
  return json;
}

async function search() {
  if (!adminKey) { $("search-status").textContent = "connect with the admin key first"; return; }
  const query = new URLSearchParams();
  const tenant = $("q-tenant").value.trim(), id = $("q-id").value.trim();
  if (tenant) query.set("tenant_id", tenant);
  if ($("q-user").value.trim()) query.set("user_id", $("q-user").value.trim());
  if ($("q-edge").value.trim()) query.set("edge_mcp_id", $("q-edge").value.trim());
  if ($("q-status").value) query.set("status", $("q-status").value);
  let sessions;
  if (id && tenant) {
    sessions = [await admin("GET", "/admin/tenants/" + encodeURIComponent(tenant) + "/sessions/" + encodeURIComponent(id))];
  } else {
    query.set("limit", id ? "1000" : "100");
    sessions = (await admin("GET", "/admin/sessions?" + query)).sessions;
    if (id) sessions = sessions.filter((s) => s.session_id.startsWith(id));
  }
  $("search-status").textContent = sessions.length + " session(s)";
  const body = $("sessions"); body.replaceChildren();
  sessions.forEach((s) => {
    const actions = document.createElement("span");
    const inspect = document.createElement("button");
    inspect.textContent = "inspect"; inspect.type = "button";
    inspect.onclick = () => { $("inspect").hidden = false; $("inspect").textContent = JSON.stringify(s, null, 2); };
    actions.appendChild(inspect);
    if (s.status === "active" || s.status === "idle") {
      const end = document.createElement("button");
      end.textContent = "terminate"; end.type = "button"; end.className = "danger";
      end.onclick = () => terminate(s);
      actions.appendChild(end);
    }
    body.appendChild(row([s.session_id, s.tenant_id, s.status, s.user_id || "—", s.edge_mcp_id, s.created_at, s.tool_execution_count, actions]));
  });
}

async function terminate(s) {
  if (!window.confirm("Terminate session " + s.session_id + " of tenant " + s.tenant_id + "? Its client is disconnected.")) return;
  await admin("DELETE", "/admin/tenants/" + encodeURIComponent(s.tenant_id) + "/sessions/" + encodeURIComponent(s.session_id));
  $("search-status").textContent = "terminated " + s.session_id;
  await search();
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  connect($("admin-key").value).catch((e) => { $("status").textContent = "error: " + e; });
});
$("search").addEventListener("submit", (event) => {
  event.preventDefault();
  search().catch((e) => { $("search-status").textContent = "error: " + e.message; });
});
