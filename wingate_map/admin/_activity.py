"""
The live activity page served at the admin API's C{/}, and the summary it polls
(C{GET /activity.json}): per-mapping totals (live sessions, accepted, refused by reason, bytes
each way) and one page of the live sessions, sorted, filtered and paged on the server, so that
10,000 sessions never make a multi-megabyte answer per poll.

The page groups the sessions of its page by client, then by user, computes throughput from the
byte counts of successive polls, and asks before it kills a session.  It never handles the
token: the browser logs in with HTTP Basic (the token as the password) and sends those
credentials itself on the page's same-origin API calls.  Everything a client can influence is
put into the page as text (C{textContent}, text nodes), never as HTML.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Iterable, Mapping, Sequence
from urllib.parse import urlencode

from attrs import evolve, frozen

from ..sessions import Session, utc_iso

SORTS = ("duration", "bytes", "client", "user", "mapping")
"""What the sessions of C{GET /activity.json} can be sorted by."""

DEFAULT_LIMIT = 50
"""Sessions per page when the request names no C{limit}."""

MAX_LIMIT = 1000
"""The largest C{limit} a request may ask for (C{GET /sessions} lists them all)."""

PARAMETERS = ("sort", "order", "mapping", "client", "user", "limit", "offset")
"""The query parameters C{GET /activity.json} accepts."""


def session_json(session: Session, now: float) -> dict[str, Any]:
    """
    One live session as the admin API shows it: its ClientConnect fields (without C{event}),
    the live byte counts and its duration so far.
    """
    fields = session.fields("ClientConnect", session.started)
    del fields["event"]
    fields["bytes_from_client"] = session.bytes_from_client
    fields["bytes_to_client"] = session.bytes_to_client
    fields["duration"] = round(max(0.0, now - session.started), 3)
    return fields


def _ip_key(text: str) -> tuple[int, bytes]:
    """
    A sort key putting addresses in numeric order: IPv4 before IPv6, anything else last.
    """
    for rank, family in enumerate((socket.AF_INET, socket.AF_INET6)):
        try:
            return rank, socket.inet_pton(family, text)
        except OSError:
            pass
    return 2, text.encode("utf-8", "replace")


def _user_key(user: str | None) -> str:
    """
    A sort key for a user name: any case, no user first.
    """
    return "" if user is None else user.casefold()


# For each sort: a key on a Session (with the time now) and the same key on its JSON form (a
# worker's answer), so that the pages of several processes merge in one order.
_SESSION_KEYS: dict[str, Callable[[Session, float], Any]] = {
    "duration": lambda s, now: now - s.started,
    "bytes": lambda s, now: s.bytes_from_client + s.bytes_to_client,
    "client": lambda s, now: (_ip_key(s.client_ip), s.client_port),
    "user": lambda s, now: (_user_key(s.user), _ip_key(s.client_ip), s.client_port),
    "mapping": lambda s, now: (s.mapping, _ip_key(s.client_ip), s.client_port),
}
_JSON_KEYS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "duration": lambda d: d["duration"],
    "bytes": lambda d: d["bytes_from_client"] + d["bytes_to_client"],
    "client": lambda d: (_ip_key(d["client_ip"]), d["client_port"]),
    "user": lambda d: (_user_key(d["user"]), _ip_key(d["client_ip"]), d["client_port"]),
    "mapping": lambda d: (d["mapping"], _ip_key(d["client_ip"]), d["client_port"]),
}


def _one(args: Mapping[bytes, Sequence[bytes]], name: str) -> str | None:
    values = args.get(name.encode(), [])
    if len(values) > 1:
        raise ValueError(f"{name}: give it once, not {len(values)} times")
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: not valid UTF-8") from None


def _whole(name: str, text: str | None, default: int, low: int, high: int | None) -> int:
    if text is None or text == "":
        return default
    bounds = f"from {low} to {high}" if high is not None else f"of at least {low}"
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise ValueError(f"{name}: must be a whole number {bounds}, not {text!r}")
    value = int(text)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}: must be a whole number {bounds}, not {value}")
    return value


@frozen
class ActivityQuery:
    """
    What one C{GET /activity.json} asks for: the sort, the filters and the page.

    @ivar sort: one of L{SORTS}.
    @ivar descending: largest first (the default for C{duration} and C{bytes}).
    @ivar mapping: only this mapping's sessions (exact name), or all.
    @ivar client: only sessions whose client address contains this text (a prefix such as
        C{10.0.1.} works), or all.
    @ivar user: only sessions whose user name contains this text (any case), or all.
    @ivar limit: sessions per page.
    @ivar offset: sessions skipped before the page.
    """

    sort: str = "duration"
    descending: bool = True
    mapping: str | None = None
    client: str | None = None
    user: str | None = None
    limit: int = DEFAULT_LIMIT
    offset: int = 0

    @classmethod
    def from_args(cls, args: Mapping[bytes, Sequence[bytes]], max_limit: int | None = MAX_LIMIT) -> "ActivityQuery":
        """
        The query a request's arguments (twisted.web's C{request.args}) ask for.

        @param max_limit: the largest C{limit} accepted (None: no bound, for the primary's
            requests to its workers).
        @raise ValueError: an unknown parameter or a bad value; the message names the parameter.
        """
        unknown = sorted(name.decode("utf-8", "replace") for name in args if name.decode("utf-8", "replace") not in PARAMETERS)
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown parameter (known: {', '.join(PARAMETERS)})")
        sort = _one(args, "sort") or "duration"
        if sort not in SORTS:
            raise ValueError(f"sort: must be one of {', '.join(SORTS)}, not {sort!r}")
        order = _one(args, "order")
        if order not in (None, "", "asc", "desc"):
            raise ValueError(f"order: must be asc or desc, not {order!r}")
        descending = sort in ("duration", "bytes") if not order else order == "desc"
        return cls(
            sort=sort,
            descending=descending,
            mapping=_one(args, "mapping") or None,
            client=(_one(args, "client") or "").strip().lower() or None,
            user=(_one(args, "user") or "").strip().casefold() or None,
            limit=_whole("limit", _one(args, "limit"), DEFAULT_LIMIT, 1, max_limit),
            offset=_whole("offset", _one(args, "offset"), 0, 0, None),
        )

    def window(self) -> "ActivityQuery":
        """
        The same query from the first session to the end of this page: what each process
        answers when the pages of several are merged.
        """
        return evolve(self, offset=0, limit=self.offset + self.limit)

    def query_string(self) -> bytes:
        """
        This query as URL arguments (for asking a worker).
        """
        args = {"sort": self.sort, "order": "desc" if self.descending else "asc", "limit": self.limit, "offset": self.offset}
        for name in ("mapping", "client", "user"):
            if getattr(self, name) is not None:
                args[name] = getattr(self, name)
        return urlencode(args).encode()

    def as_json(self) -> dict[str, Any]:
        """
        The query as the answer repeats it.
        """
        return {
            "sort": self.sort,
            "order": "desc" if self.descending else "asc",
            "mapping": self.mapping,
            "client": self.client,
            "user": self.user,
            "limit": self.limit,
            "offset": self.offset,
        }

    def predicate(self) -> Callable[[Session], bool] | None:
        """
        Whether a session passes the filters; None when there are none.
        """
        mapping, client, user = self.mapping, self.client, self.user
        if mapping is None and client is None and user is None:
            return None

        def matches(s: Session) -> bool:
            return (
                (mapping is None or s.mapping == mapping)
                and (client is None or client in s.client_ip.lower())
                and (user is None or (s.user is not None and user in s.user.casefold()))
            )

        return matches


def counter_totals(metrics: Any) -> dict[str, dict[str, Any]]:
    """
    Per mapping, what this process's metrics have counted since it started: sessions accepted,
    sessions refused by reason, connections dropped before they became sessions by reason, and
    bytes of ended sessions each way (reasons counted 0 are left out).
    """
    totals: dict[str, dict[str, Any]] = {}

    def entry(mapping: str) -> dict[str, Any]:
        found = totals.get(mapping)
        if found is None:
            found = totals[mapping] = {"accepted": 0, "refused": {}, "dropped": {}, "bytes_from_client": 0, "bytes_to_client": 0}
        return found

    for counter, role in ((metrics.accepted, "accepted"), (metrics.refused, "refused"), (metrics.dropped, "dropped"), (metrics.bytes, "bytes")):
        for family in counter.collect():
            for sample in family.samples:
                if not sample.name.endswith("_total") or not sample.value:
                    continue
                counts = entry(sample.labels["mapping"])
                if role == "accepted":
                    counts["accepted"] += int(sample.value)
                elif role == "bytes":
                    counts["bytes_" + sample.labels["direction"]] += int(sample.value)
                else:
                    counts[role][sample.labels["reason"]] = int(sample.value)
    return totals


def _totals_entry(name: str) -> dict[str, Any]:
    return {
        "mapping": name,
        "live": 0,
        "accepted": 0,
        "refused": {},
        "dropped": {},
        "bytes_from_client": 0,
        "bytes_to_client": 0,
        "live_bytes_from_client": 0,
        "live_bytes_to_client": 0,
    }


def _add(into: dict[str, Any], entry: Mapping[str, Any]) -> None:
    for key, value in entry.items():
        if isinstance(value, int):
            into[key] += value
        elif isinstance(value, dict):
            for reason, count in value.items():
                into[key][reason] = into[key].get(reason, 0) + count


def _sorted_totals(totals: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    entries = [totals[name] for name in sorted(totals)]
    for entry in entries:
        entry["refused"] = dict(sorted(entry["refused"].items()))
        entry["dropped"] = dict(sorted(entry["dropped"].items()))
    return entries


def summarise(sessions: Iterable[Session], query: ActivityQuery, now: float, metrics: Any = None, mappings: Iterable[str] = ()) -> dict[str, Any]:
    """
    What one process answers to C{GET /activity.json}: per mapping (every one of C{mappings},
    of the counters, or with live sessions) its totals, and the page of the live sessions that
    pass the filters, sorted, with how many pass (C{total}).  Only the page is turned into JSON.

    A mapping's totals: C{live} sessions, C{accepted} and C{refused} (by reason) sessions,
    connections C{dropped} before they became sessions (by reason), C{bytes_from_client} /
    C{bytes_to_client} since the start (ended sessions and live ones), and the live sessions'
    share of those (C{live_bytes_*}).  The totals count every session, whatever the filters.

    @param metrics: this process's L{wingatemap.metrics.Metrics} (None: live counts only).
    """
    totals = {name: _totals_entry(name) for name in mappings}
    if metrics is not None:
        for name, counts in counter_totals(metrics).items():
            _add(totals.setdefault(name, _totals_entry(name)), counts)
    live: dict[str, list[int]] = {}
    matching: list[Session] = []
    matches = query.predicate()
    count = 0
    for s in sessions:
        count += 1
        sums = live.get(s.mapping)
        if sums is None:
            sums = live[s.mapping] = [0, 0, 0]
        sums[0] += 1
        sums[1] += s.bytes_from_client
        sums[2] += s.bytes_to_client
        if matches is None or matches(s):
            matching.append(s)
    for name, (n, up, down) in live.items():
        _add(
            totals.setdefault(name, _totals_entry(name)),
            {"live": n, "bytes_from_client": up, "bytes_to_client": down, "live_bytes_from_client": up, "live_bytes_to_client": down},
        )
    key = _SESSION_KEYS[query.sort]
    matching.sort(key=lambda s: key(s, now), reverse=query.descending)
    page = matching[query.offset : query.offset + query.limit]
    return {
        "now": round(now, 3),
        "time": utc_iso(now),
        "live": count,
        "mappings": _sorted_totals(totals),
        "query": query.as_json(),
        "total": len(matching),
        "sessions": [session_json(s, now) for s in page],
    }


def merge(parts: Sequence[Mapping[str, Any]], query: ActivityQuery) -> dict[str, Any]:
    """
    One answer from the answers of several processes, each for L{ActivityQuery.window}: the
    totals added up per mapping, the sessions merged in the query's order and cut to its page.
    The first part is this process's own (its time is the answer's).
    """
    totals: dict[str, dict[str, Any]] = {}
    sessions: list[Mapping[str, Any]] = []
    for part in parts:
        for entry in part["mappings"]:
            _add(totals.setdefault(entry["mapping"], _totals_entry(entry["mapping"])), {k: v for k, v in entry.items() if k != "mapping"})
        sessions.extend(part["sessions"])
    sessions.sort(key=_JSON_KEYS[query.sort], reverse=query.descending)
    first = parts[0]
    return {
        "now": first["now"],
        "time": first["time"],
        "live": sum(part["live"] for part in parts),
        "mappings": _sorted_totals(totals),
        "query": query.as_json(),
        "total": sum(part["total"] for part in parts),
        "sessions": sessions[query.offset : query.offset + query.limit],
    }


ACTIVITY_PAGE = b"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>wingatemap activity</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #f7f8fa; }
  h1 { font-size: 20px; margin: 0 0 .2em; }
  h2.part { font-size: 15px; margin: 1em 0 .4em; }
  #status { color: #5b6475; margin-bottom: .6em; }
  #notice { min-height: 1.4em; color: #2e7d32; }
  .box, .client { background: #fff; border: 1px solid #d9dde5; border-radius: 6px; margin: 0 0 1em; padding: .6em .9em; }
  .client h2 { font-size: 15px; margin: .2em 0 .4em; }
  .user h3 { font-size: 13px; margin: .5em 0 .2em; color: #3b4a66; }
  table { border-collapse: collapse; width: 100%; }
  th, td { text-align: left; padding: .25em .6em; border-bottom: 1px solid #eef0f4; font-variant-numeric: tabular-nums; }
  th { font-weight: 600; color: #5b6475; font-size: 12px; }
  td.num, th.num { text-align: right; }
  td.some { color: #8a5a00; }
  #controls { display: flex; flex-wrap: wrap; gap: .4em 1.2em; align-items: center; margin: 0 0 .6em; }
  #controls label { color: #5b6475; font-size: 12px; }
  #controls input, #controls select { font: inherit; padding: .15em .3em; }
  #controls input[type=number] { width: 5em; }
  #pager { margin: 0 0 .8em; color: #5b6475; }
  #pager button { font: inherit; }
  button.kill { background: #c62828; color: #fff; border: 0; border-radius: 4px; padding: .2em .7em; cursor: pointer; }
  .up { color: #2e7d32; font-weight: 600; }
  .down { color: #c62828; font-weight: 600; }
  .empty { color: #5b6475; font-style: italic; }
  .error { color: #c62828; }
</style>
</head>
<body>
<h1>wingatemap &mdash; live activity</h1>
<div id="status">loading&hellip;</div>
<h2 class="part">Mappings</h2>
<div class="box"><table id="totals">
  <thead><tr><th>mapping</th><th class="num">live</th><th class="num">accepted</th><th title="sessions refused before relaying">refused</th><th title="connections that never became sessions (PROXY header, TLS handshake, limit)">dropped</th>
  <th class="num">from client</th><th class="num">to client</th><th class="num">from client/s</th><th class="num">to client/s</th></tr></thead>
  <tbody></tbody>
</table></div>
<section id="destinations-part" hidden>
  <h2 class="part">Destinations</h2>
  <div class="box"><table id="destinations">
    <thead><tr><th>mapping</th><th>rule</th><th>destination</th><th>state</th><th>since</th>
    <th class="num">live</th><th class="num">total</th><th>last error</th></tr></thead>
    <tbody></tbody>
  </table></div>
</section>
<h2 class="part">Sessions</h2>
<form id="controls" autocomplete="off">
  <label>mapping <select id="f-mapping"><option value="">all</option></select></label>
  <label>client <input id="f-client" type="search" placeholder="address or prefix" size="16"></label>
  <label>user <input id="f-user" type="search" placeholder="name" size="12"></label>
  <label>sort by <select id="sort">
    <option value="duration">duration</option><option value="bytes">bytes</option>
    <option value="client">client</option><option value="user">user</option><option value="mapping">mapping</option>
  </select></label>
  <label>order <select id="order"><option value="desc">descending</option><option value="asc">ascending</option></select></label>
  <label>per page <input id="limit" type="number" min="1" max="1000" value="50"></label>
</form>
<div id="pager"><button id="prev" type="button">&lsaquo; previous</button> <span id="range"></span> <button id="next" type="button">next &rsaquo;</button></div>
<div id="notice"></div>
<div id="sessions"></div>
<script>
"use strict";
// Everything from the server is put into the page as text (text nodes, textContent), never as HTML.
const NATURAL_ORDER = { duration: "desc", bytes: "desc", client: "asc", user: "asc", mapping: "asc" };
const state = { sort: "duration", order: "desc", mapping: "", client: "", user: "", limit: 50, offset: 0 };
let previous = null;  // the last answer's time and byte counts, for throughput
let timer = null, busy = false, again = false, generation = 0;
let destinations = { available: null, checked: 0 };

function $(id) { return document.getElementById(id); }

function bytes(n) {
  if (n < 1024) return Math.round(n) + " B";
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let i = -1;
  do { n /= 1024; i++; } while (n >= 1024 && i < units.length - 1);
  return n.toFixed(1) + " " + units[i];
}

function rate(n) { return n === null ? "\\u2013" : bytes(n) + "/s"; }

function duration(s) {
  s = Math.floor(s);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + r + "s";
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c);  // strings become text nodes
  return node;
}

function perSecond(now, before, after) {
  if (!previous || before === undefined || now <= previous.now) return null;
  return Math.max(0, after - before) / (now - previous.now);
}

function readHash() {
  const p = new URLSearchParams(location.hash.slice(1));
  for (const k of ["sort", "order", "mapping", "client", "user"]) if (p.has(k)) state[k] = p.get(k);
  for (const k of ["limit", "offset"]) if (p.has(k) && /^[0-9]+$/.test(p.get(k))) state[k] = Number(p.get(k));
  if (!(state.sort in NATURAL_ORDER)) state.sort = "duration";
  if (state.order !== "asc" && state.order !== "desc") state.order = NATURAL_ORDER[state.sort];
  state.limit = Math.min(1000, Math.max(1, state.limit));
  $("f-client").value = state.client; $("f-user").value = state.user;
  $("sort").value = state.sort; $("order").value = state.order; $("limit").value = state.limit;
}

function query() {
  const p = new URLSearchParams();
  for (const k of ["sort", "order", "mapping", "client", "user", "limit", "offset"]) if (state[k] !== "") p.set(k, state[k]);
  return p;
}

function changed(resetOffset) {
  if (resetOffset) state.offset = 0;
  generation++;
  history.replaceState(null, "", "#" + query().toString());  // a bookmarkable view; never sent to the server
  refresh();
}

async function kill(s) {
  const who = (s.user === null ? "no user" : s.user) + " from " + s.client_ip;
  if (!confirm("Kill session " + s.session + " (" + who + ", mapping " + s.mapping + ")? Its connections are closed at once.")) return;
  const r = await fetch("sessions/" + encodeURIComponent(s.session), { method: "DELETE", credentials: "same-origin" });
  const notice = $("notice");
  notice.className = r.ok ? "" : "error";
  notice.textContent = r.ok ? "session " + s.session + " killed" : "kill failed: HTTP " + r.status;
  refresh();
}

function byReason(counts) {
  const entries = Object.entries(counts);
  const total = entries.reduce((sum, [, n]) => sum + n, 0);
  return total ? total + " (" + entries.map(([reason, n]) => reason + " " + n).join(", ") + ")" : "0";
}

function renderTotals(data) {
  const rows = data.mappings.map(m => {
    const before = previous && previous.mappings[m.mapping];
    return el("tr", { "data-mapping": m.mapping },
      el("td", {}, m.mapping),
      el("td", { class: "num live" }, String(m.live)),
      el("td", { class: "num accepted" }, String(m.accepted)),
      el("td", { class: Object.keys(m.refused).length ? "refused some" : "refused" }, byReason(m.refused)),
      el("td", { class: Object.keys(m.dropped).length ? "dropped some" : "dropped" }, byReason(m.dropped)),
      el("td", { class: "num in" }, bytes(m.bytes_from_client)),
      el("td", { class: "num out" }, bytes(m.bytes_to_client)),
      el("td", { class: "num rate-in" }, rate(perSecond(data.now, before && before[0], m.bytes_from_client))),
      el("td", { class: "num rate-out" }, rate(perSecond(data.now, before && before[1], m.bytes_to_client))));
  });
  $("totals").tBodies[0].replaceChildren(...rows);
  const select = $("f-mapping");
  const names = data.mappings.map(m => m.mapping);
  if (state.mapping && !names.includes(state.mapping)) names.push(state.mapping);
  const have = [...select.options].slice(1).map(o => o.value);
  if (have.join("\\n") !== names.join("\\n")) {
    select.replaceChildren(el("option", { value: "" }, "all"), ...names.map(n => el("option", { value: n }, n)));
  }
  select.value = state.mapping;
}

function renderSessions(data) {
  const total = data.total, shown = data.sessions.length;
  $("range").textContent = total ? "sessions " + (state.offset + 1) + "\\u2013" + (state.offset + shown) + " of " + total : "no session matches";
  $("prev").disabled = state.offset === 0;
  $("next").disabled = state.offset + state.limit >= total;
  // Group this page by client, then user, in the order of the sort.
  const byClient = new Map();
  for (const s of data.sessions) {
    if (!byClient.has(s.client_ip)) byClient.set(s.client_ip, new Map());
    const byUser = byClient.get(s.client_ip);
    const user = s.user === null ? "no user" : s.user + " (" + s.identity + ")";
    if (!byUser.has(user)) byUser.set(user, []);
    byUser.get(user).push(s);
  }
  const fresh = document.createDocumentFragment();
  if (!shown) fresh.append(el("p", { class: "empty" }, data.live ? "No live session matches." : "No live sessions."));
  for (const [client, byUser] of byClient) {
    const box = el("section", { class: "client", "data-client": client }, el("h2", {}, "Client " + client));
    for (const [user, list] of byUser) {
      const rows = list.map(s => {
        const before = previous && previous.sessions[s.session];
        const b = el("button", { class: "kill", type: "button", title: "end this session" }, "Kill");
        b.onclick = () => kill(s);
        const up = perSecond(data.now, before && before[0], s.bytes_from_client);
        const down = perSecond(data.now, before && before[1], s.bytes_to_client);
        return el("tr", { "data-session": s.session },
          el("td", {}, s.session), el("td", {}, s.mapping), el("td", {}, s.destination || "(none)"),
          el("td", { class: "num duration" }, duration(s.duration)),
          el("td", { class: "num in" }, bytes(s.bytes_from_client)),
          el("td", { class: "num out" }, bytes(s.bytes_to_client)),
          el("td", { class: "num rate" }, up === null ? rate(null) : rate(up + down)),
          el("td", {}, b));
      });
      const head = el("tr", {}, ...["session", "mapping", "destination"].map(h => el("th", {}, h)),
        ...["duration", "from client", "to client", "throughput"].map(h => el("th", { class: "num" }, h)), el("th", {}));
      box.append(el("div", { class: "user" }, el("h3", {}, "User " + user), el("table", {}, head, ...rows)));
    }
    fresh.append(box);
  }
  $("sessions").replaceChildren(fresh);
}

function render(data) {
  renderTotals(data);
  renderSessions(data);
  const status = $("status");
  status.className = "";
  status.textContent = data.live + " live session(s), updated " + new Date(data.now * 1000).toLocaleTimeString() +
    (data.workers && data.workers.answered < data.workers.asked ? "; " + (data.workers.asked - data.workers.answered) + " worker(s) did not answer" : "");
  const sessions = {};
  for (const s of data.sessions) sessions[s.session] = [s.bytes_from_client, s.bytes_to_client];
  const mappings = {};
  for (const m of data.mappings) mappings[m.mapping] = [m.bytes_from_client, m.bytes_to_client];
  previous = { now: data.now, sessions, mappings };
}

function renderDestinations(list) {
  $("destinations").tBodies[0].replaceChildren(...list.map(d => el("tr", { "data-destination": d.mapping + " " + d.destination },
    el("td", {}, d.mapping), el("td", {}, String(d.rule)), el("td", {}, d.destination),
    el("td", { class: d.state === "up" ? "up" : "down" }, d.state), el("td", {}, d.since || ""),
    el("td", { class: "num" }, String(d.live)), el("td", { class: "num" }, String(d.total)), el("td", {}, d.last_error || ""))));
}

// Destination health comes from GET /destinations; until the service offers it (404), the part
// stays hidden and is looked for again every 30 s.
async function refreshDestinations() {
  if (destinations.available === false && Date.now() - destinations.checked < 30000) return;
  destinations.checked = Date.now();
  try {
    const r = await fetch("destinations", { credentials: "same-origin", cache: "no-store" });
    destinations.available = r.ok;
    if (r.ok) renderDestinations((await r.json()).destinations || []);
  } catch (e) {
    destinations.available = false;
  }
  $("destinations-part").hidden = !destinations.available;
}

async function refresh() {
  clearTimeout(timer);
  if (busy) { again = true; return; }
  busy = true;
  const asked = generation;
  try {
    const [r] = await Promise.all([fetch("activity.json?" + query().toString(), { credentials: "same-origin", cache: "no-store" }), refreshDestinations()]);
    if (!r.ok) {
      let why = "";
      try { why = ": " + (await r.json()).error; } catch (e) {}
      throw new Error("HTTP " + r.status + (r.status === 401 ? ": reload the page and log in (any user name, the admin token as the password)" : why));
    }
    const data = await r.json();
    if (asked === generation) {
      if (state.offset && state.offset >= data.total) {
        state.offset = Math.max(0, Math.floor((data.total - 1) / state.limit) * state.limit);  // the page emptied
        again = true;
      } else {
        render(data);
      }
    }
  } catch (e) {
    const status = $("status");
    status.textContent = "cannot load the activity: " + e.message;
    status.className = "error";
  } finally {
    busy = false;
    if (again) { again = false; refresh(); }
    else if (!document.hidden) timer = setTimeout(refresh, 1000);  // one poll at a time, none while hidden
  }
}

let typing = null;
for (const [id, key] of [["f-client", "client"], ["f-user", "user"]]) {
  $(id).addEventListener("input", e => { clearTimeout(typing); typing = setTimeout(() => { state[key] = e.target.value.trim(); changed(true); }, 250); });
}
$("f-mapping").addEventListener("change", e => { state.mapping = e.target.value; changed(true); });
$("sort").addEventListener("change", e => { state.sort = e.target.value; state.order = NATURAL_ORDER[state.sort]; $("order").value = state.order; changed(true); });
$("order").addEventListener("change", e => { state.order = e.target.value; changed(true); });
$("limit").addEventListener("change", e => { const n = Number(e.target.value); if (n >= 1 && n <= 1000) { state.limit = Math.floor(n); changed(true); } });
$("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.limit); changed(false); });
$("next").addEventListener("click", () => { state.offset += state.limit; changed(false); });
$("controls").addEventListener("submit", e => e.preventDefault());
document.addEventListener("visibilitychange", () => { if (!document.hidden) refresh(); });
readHash();
refresh();
</script>
</body>
</html>
"""
