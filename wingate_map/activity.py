"""
The live activity page served at the admin API's C{/}: sessions grouped by client, then by user,
with mapping, destination, duration and bytes updating every second, and a kill button.

The page never handles the token: the browser logs in with HTTP Basic (the token as the
password) and sends those credentials itself on the page's same-origin API calls.
"""

ACTIVITY_PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>wingatemap activity</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #f7f8fa; }
  h1 { font-size: 20px; margin: 0 0 .2em; }
  #status { color: #5b6475; margin-bottom: 1em; }
  .client { background: #fff; border: 1px solid #d9dde5; border-radius: 6px; margin: 0 0 1em; padding: .6em .9em; }
  .client h2 { font-size: 15px; margin: .2em 0 .4em; }
  .user h3 { font-size: 13px; margin: .5em 0 .2em; color: #3b4a66; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .25em .6em; border-bottom: 1px solid #eef0f4; font-variant-numeric: tabular-nums; }
  th { font-weight: 600; color: #5b6475; font-size: 12px; }
  td.num { text-align: right; }
  button.kill { background: #c62828; color: #fff; border: 0; border-radius: 4px; padding: .2em .7em; cursor: pointer; }
  .empty { color: #5b6475; font-style: italic; }
  .error { color: #c62828; }
</style>
</head>
<body>
<h1>wingatemap &mdash; live activity</h1>
<div id="status">loading&hellip;</div>
<div id="sessions"></div>
<script>
"use strict";
function bytes(n) {
  if (n < 1024) return n + " B";
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let i = -1;
  do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
  return n.toFixed(1) + " " + units[i];
}

function duration(s) {
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + r + "s";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

async function kill(id) {
  const r = await fetch("sessions/" + encodeURIComponent(id), { method: "DELETE", credentials: "same-origin" });
  if (!r.ok) document.getElementById("status").textContent = "kill failed: " + r.status;
  refresh();
}

function render(sessions) {
  const byClient = new Map();
  for (const s of sessions) {
    if (!byClient.has(s.client_ip)) byClient.set(s.client_ip, new Map());
    const byUser = byClient.get(s.client_ip);
    const user = s.user + " (" + s.identity + ")";
    if (!byUser.has(user)) byUser.set(user, []);
    byUser.get(user).push(s);
  }
  const root = document.getElementById("sessions");
  const fresh = document.createDocumentFragment();
  if (!sessions.length) fresh.append(el("p", { class: "empty" }, "No live sessions."));
  for (const [client, byUser] of [...byClient].sort()) {
    const box = el("section", { class: "client", "data-client": client }, el("h2", {}, "Client " + client));
    for (const [user, list] of [...byUser].sort()) {
      const rows = list.map(s => el("tr", { "data-session": s.session },
        el("td", {}, s.session), el("td", {}, s.mapping), el("td", {}, s.destination || "(none)"),
        el("td", { class: "num duration" }, duration(s.duration)),
        el("td", { class: "num in" }, bytes(s.bytes_from_client)),
        el("td", { class: "num out" }, bytes(s.bytes_to_client)),
        el("td", {}, (() => { const b = el("button", { class: "kill", title: "end this session" }, "Kill"); b.onclick = () => kill(s.session); return b; })())));
      const table = el("table", {}, el("tr", {}, ...["session", "mapping", "destination", "duration", "from client", "to client", ""].map(h => el("th", {}, h))), ...rows);
      box.append(el("div", { class: "user" }, el("h3", {}, "User " + user), table));
    }
    fresh.append(box);
  }
  root.replaceChildren(fresh);
  document.getElementById("status").textContent = sessions.length + " live session(s), updated " + new Date().toLocaleTimeString();
}

async function refresh() {
  try {
    const r = await fetch("sessions", { credentials: "same-origin", cache: "no-store" });
    if (!r.ok) throw new Error("HTTP " + r.status + (r.status === 401 ? ": reload the page and log in (any user name, the admin token as the password)" : ""));
    render(await r.json());
  } catch (e) {
    const status = document.getElementById("status");
    status.textContent = "cannot load sessions: " + e.message;
    status.className = "error";
  }
}
refresh();
setInterval(refresh, 1000);
</script>
</body>
</html>
"""
