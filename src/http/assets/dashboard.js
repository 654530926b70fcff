"use strict";
// Self-contained: no CDN, no external code; works offline.
const $ = (id) => document.getElementById(id);
const history = []; // {ops, p99} per second, last 10 minutes
const MAX_POINTS = 600;
let socket = null;

function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }
function row(cells) { const tr = document.createElement("tr"); cells.forEach((c) => tr.appendChild(cell(c))); return tr; }
function fixed(x) { return (Math.round(x * 100) / 100).toString(); }

function render(stats) {
  $("live-sessions").textContent = stats.sessions.live;
  $("idle-sessions").textContent = stats.sessions.idle;
  const ops = stats.shards.reduce((sum, s) => sum + s.ops_per_second, 0);
  const p99 = stats.shards.reduce((m, s) => Math.max(m, s.latency_ms.p99), 0);
  $("ops").textContent = Math.round(ops);
  $("p99").textContent = fixed(p99);
  $("queue").textContent = stats.write_behind.queue_depth;
  $("lag").textContent = stats.write_behind.flush_lag_ms;
  $("rss").textContent = fixed(stats.process.rss_bytes / 1048576);
  $("uptime").textContent = stats.uptime_seconds + " s";
  const shards = $("shards"); shards.replaceChildren();
  stats.shards.forEach((s) => shards.appendChild(row([s.id, s.live_actors, s.mailbox_depth, Math.round(s.ops_per_second), fixed(s.latency_ms.p50), fixed(s.latency_ms.p99), fixed(s.latency_ms.p999)])));
  const tenants = $("tenants"); tenants.replaceChildren();
  stats.tenants.slice(0, 10).forEach((t) => tenants.appendChild(row([t.tenant_id, t.name, t.live_sessions, t.idle_sessions])));
  history.push({ ops, p99 });
  if (history.length > MAX_POINTS) history.shift();
  draw();
}

function draw() {
  const canvas = $("chart"); const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  ctx.strokeStyle = "#e3e6ec"; ctx.beginPath(); ctx.moveTo(0, h - 0.5); ctx.lineTo(w, h - 0.5); ctx.stroke();
  const line = (key, color) => {
    const max = Math.max(1, ...history.map((p) => p[key]));
    ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
    history.forEach((p, i) => {
      const x = w - (history.length - 1 - i) * (w / MAX_POINTS);
      const y = h - 4 - (p[key] / max) * (h - 12);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  };
  line("ops", "#2b6cb0");
  line("p99", "#c05621");
}

async function connect(key) {
  $("status").textContent = "connecting…";
  const response = await fetch("/admin/tickets", { method: "POST", headers: { "X-Admin-Key": key } });
  if (!response.ok) { $("status").textContent = "refused (" + response.status + ")"; return; }
  const { ticket } = await response.json();
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  if (socket) socket.close();
  socket = new WebSocket(scheme + "//" + location.host + "/admin/stats/ws?ticket=" + encodeURIComponent(ticket));
  socket.onopen = () => { $("status").textContent = "live"; };
  socket.onmessage = (event) => render(JSON.parse(event.data));
  socket.onclose = () => { $("status").textContent = "disconnected"; };
}

$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  connect($("admin-key").value).catch((e) => { $("status").textContent = "error: " + e; });
});
