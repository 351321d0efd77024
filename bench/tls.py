#!/usr/bin/env python3
"""
TLS benchmark: wingatemap's TLS legs against stunnel and haproxy, with a plain wingatemap relay
and a direct connection as references, all measured in one run on 127.0.0.1.

    python3 bench/tls.py [--quick] [--out docs/performance-tls.md]

The load generator (bench/loadgen.py) and the backend (bench/backend.py) speak plain TCP, so each
TLS case is a pair of relays, one of them the proxy under test and the other a fixed haproxy:

  TLS destination   client -> PROXY (plain in, TLS out) -> haproxy terminator (TLS in, plain out) -> backend
  TLS listener      client -> haproxy originator (plain in, TLS out) -> PROXY (TLS in, plain out) -> backend
  mTLS listener     the same, with the originator presenting a client certificate the proxy requires

Measured for each: bulk throughput (one connection, up and down) and new connections per second
(a full TLS handshake per connection: the fixed haproxy never resumes a session), with the CPU
time each process and each core used.  The proxy under test is pinned to CPU 0; the fixed
haproxy, the backend, the load generator and this script to CPU 1.  Certificates (a private CA, an
ECDSA P-256 server certificate for localhost / 127.0.0.1 and a client certificate) are made at
run time in a temporary directory with tests/pki.py.  A tool that is not installed (stunnel,
haproxy) is skipped, saying so; without haproxy only the references run.

Raw results are saved as JSON under bench/results/ (ignored by git); --report-from rebuilds the
report from one of them.  Every child runs in its own process group and is killed at the end,
even on error or SIGTERM.  Helpers come from bench/run.py (process handling, ports, load runs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(ROOT))

import run as base  # noqa: E402  bench/run.py: spawn/stop/stop_all, run_load, free_ports, echo_probe, ...

HOST = base.HOST

FULL = {
    # Cases are measured round-robin this many times; each figure is the median over rounds.
    "rounds": 3,
    # 300 MB would cross the plain relay in about 0.15 s, too short for stable figures and for
    # CPU accounting in 10 ms ticks: 1 GB (1.5-2 s over a TLS pair).
    "bulk_bytes": 1000 * 10**6,
    "bulk_reps": 1,  # per direction and round
    "cr_concurrency": 4,
    "cr_duration": 3.0,
    "cr_maxconn": 25_000,
}
QUICK = dict(FULL, rounds=1, bulk_bytes=300 * 10**6, cr_duration=2.0, cr_maxconn=8_000)

# haproxy's log sampling: the helper logs the first connection (the readiness probe) and the
# 200th (inside the connection-rate test) with the TLS version, cipher and whether the session
# was resumed, so the report shows what was negotiated and that handshakes were full ones.
SAMPLE = "1,200:1000000"

PROXIES = ("wingatemap", "stunnel", "haproxy")
GROUPS = [
    ("destination", "TLS destination", "plain in, TLS out: the client side of TLS"),
    ("listener", "TLS listener", "TLS in, plain out: the server side of TLS"),
    ("mtls", "mTLS listener", "TLS in with a required client certificate, plain out"),
]


# -- processes and CPU accounting --------------------------------------------------------------


CLK_TCK = os.sysconf("SC_CLK_TCK")
# Before each measurement, wait (at most QUIET_MAX_WAIT s) until neither core is busier than
# QUIET_LIMIT; a measurement during which other work took more than OTHERS_LIMIT of a core is
# made again (ATTEMPTS in all), keeping the least disturbed one.
QUIET_LIMIT = 0.10
QUIET_MAX_WAIT = 30.0
OTHERS_LIMIT = 0.10
ATTEMPTS = 3
BACKEND_PID: list[int] = []  # the backend's pid, once started


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU seconds of C{pid}'s process tree (threads included; reaped children not).
    """
    total = 0
    for p in base.process_tree(pid):
        try:
            with open(f"/proc/{p}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def core_times() -> dict[int, tuple[float, float]]:
    """
    Per CPU: (busy seconds, total seconds) from /proc/stat.
    """
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            m = re.match(r"cpu(\d+)\s+(.*)", line)
            if not m:
                continue
            v = [int(x) for x in m.group(2).split()]
            # user nice system idle iowait irq softirq steal (guest time is inside user).  Steal
            # (the hypervisor running something else) is neither busy nor idle for this machine.
            busy = v[0] + v[1] + v[2] + v[5] + v[6]
            total = busy + v[3] + v[4]
            out[int(m.group(1))] = (busy / CLK_TCK, total / CLK_TCK)
    return out


def wait_quiet(cpus: tuple[int | None, ...], limit: float = QUIET_LIMIT, window: float = 0.3, max_wait: float = QUIET_MAX_WAIT) -> tuple[float, float]:
    """
    Wait (at most C{max_wait} seconds) until no core of C{cpus} is busier than C{limit} over a
    C{window}: nothing of this benchmark is working between two measurements, so anything busy
    is other work on the machine.  Returns (seconds waited, busiest core's fraction at the end).
    """
    cores = [c for c in cpus if c is not None]
    if not cores:
        return 0.0, 0.0
    t0 = time.monotonic()
    busiest = 0.0
    for _ in range(int(max_wait / window) + 2):
        a = core_times()
        time.sleep(window)
        b = core_times()
        busiest = max((b[c][0] - a[c][0]) / max(b[c][1] - a[c][1], 1e-9) for c in cores)
        if busiest <= limit or time.monotonic() - t0 >= max_wait:
            break
    return time.monotonic() - t0 - window, busiest


def listening(port: int) -> bool:
    """
    Whether something listens on 127.0.0.1:C{port} (read from /proc/net/tcp: no connection is
    made, so a TLS listener logs no aborted handshake).
    """
    want_local = f"0100007F:{port:04X}"
    want_any = f"00000000:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and parts[1] in (want_local, want_any):
                    return True
    except OSError:
        pass
    return False


def wait_listening(port: int, procs: list[tuple[str, subprocess.Popen, Path]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in range(int(timeout / 0.05) + 1):
        for name, p, log in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{_tail(log)}")
        if listening(port):
            return
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port} after {timeout:g}s:\n" + "\n".join(f"--- {n}\n{_tail(log)}" for n, _, log in procs))


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def start(name: str, argv: list[str], cpu: int | None, log: Path, **kwargs: Any) -> subprocess.Popen:
    with open(log, "wb") as f:
        return base.spawn(base._pin(cpu) + argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs)


# -- configurations -----------------------------------------------------------------------------


def haproxy_cfg(frontend: str, backend: str, sample_format: str | None = None) -> str:
    log = ""
    if sample_format:
        log = f"    log stdout format raw sample {SAMPLE} local0\n    log-format \"{sample_format}\"\n"
    return f"""global
    nbthread 1
    maxconn 5000
    # No session cache: every handshake with this haproxy is a full one.
    tune.ssl.cachesize 0

defaults
    mode tcp
    timeout connect 5s
    timeout client 10m
    timeout server 10m

frontend bench_in
    {frontend}
{log}    default_backend bench_out

backend bench_out
    {backend}
"""


def terminator_cfg(pki: dict, listen: int, dest: int) -> str:
    """
    The fixed TLS terminator of the destination cases: TLS in (no session cache, no tickets:
    no resumption), plain out.
    """
    return haproxy_cfg(
        f"bind {HOST}:{listen} ssl crt {pki['combined']} no-tls-tickets",
        f"server backend1 {HOST}:{dest}",
        "helper-tls %[ssl_fc_protocol] %[ssl_fc_cipher] resumed=%[ssl_fc_is_resumed] sni=%[ssl_fc_sni]",
    )


def originator_cfg(pki: dict, listen: int, dest: int, client_cert: bool) -> str:
    """
    The fixed TLS originator of the listener cases: plain in, TLS out without verification
    (its cost is not the proxy's) and without session reuse; with C{client_cert}, presenting
    the client certificate.
    """
    crt = f" crt {pki['client_combined']}" if client_cert else ""
    return haproxy_cfg(
        f"bind {HOST}:{listen}",
        f"server tls1 {HOST}:{dest} ssl verify none no-ssl-reuse sni str(localhost){crt}",
        "helper-tls %[ssl_bc_protocol] %[ssl_bc_cipher] resumed=%[ssl_bc_is_resumed]",
    )


def haproxy_under_test_cfg(pki: dict, group: str, listen: int, dest: int) -> str:
    if group == "plain":
        return haproxy_cfg(f"bind {HOST}:{listen}", f"server backend1 {HOST}:{dest}")
    if group == "destination":
        return haproxy_cfg(
            f"bind {HOST}:{listen}",
            f"server tls1 {HOST}:{dest} ssl verify required ca-file {pki['ca']} sni str(localhost) verifyhost localhost",
        )
    extra = f" ca-file {pki['ca']} verify required" if group == "mtls" else ""
    return haproxy_cfg(f"bind {HOST}:{listen} ssl crt {pki['combined']}{extra}", f"server backend1 {HOST}:{dest}")


def stunnel_cfg(pki: dict, group: str, listen: int, dest: int) -> str:
    head = "foreground = yes\npid =\n\n[bench]\n" + f"accept = {HOST}:{listen}\nconnect = {HOST}:{dest}\n"
    if group == "destination":
        return head + f"client = yes\nverifyChain = yes\nCAfile = {pki['ca']}\ncheckHost = localhost\nsni = localhost\n"
    body = f"cert = {pki['cert']}\nkey = {pki['key']}\n"
    if group == "mtls":
        body += f"verifyChain = yes\nCAfile = {pki['ca']}\n"
    return head + body


def wingatemap_cfg(pki: dict, group: str, listen: int, dest: int) -> str:
    text = f'[mappings.bench]\nport = {listen}\nbind = "{HOST}"\n'
    if group == "plain":
        return text + f'default = {{ host = "{HOST}", port = {dest} }}\n'
    if group == "destination":
        return text + f'default = {{ host = "{HOST}", port = {dest}, tls = true, ca = "{pki["ca"]}", server_name = "localhost" }}\n'
    client_ca = f', client_ca = "{pki["ca"]}"' if group == "mtls" else ""
    return text + f'tls = {{ cert = "{pki["cert"]}", key = "{pki["key"]}"{client_ca} }}\n' + f'default = {{ host = "{HOST}", port = {dest} }}\n'


# -- cases --------------------------------------------------------------------------------------


def cases(have: dict[str, bool]) -> list[dict]:
    """
    Every case: name, group, proxy under test, and whether bulk throughput is measured (the
    mTLS cases differ from the TLS listener only in the handshake, so only conn/s).
    """
    out = [
        {"name": "direct", "group": "reference", "proxy": None, "bulk": True},
        {"name": "wingatemap plain", "group": "plain", "proxy": "wingatemap", "bulk": True},
    ]
    if not have["haproxy"]:
        return out  # every TLS case needs haproxy as the fixed other half of the pair
    for group, label, _ in GROUPS:
        for proxy in PROXIES:
            if have[proxy]:
                out.append({"name": f"{label}: {proxy}", "group": group, "proxy": proxy, "bulk": group != "mtls"})
    return out


def proxy_argv(case: dict, pki: dict, tmp: Path, tag: str, listen: int, dest: int) -> list[str]:
    proxy, group = case["proxy"], case["group"]
    if proxy == "wingatemap":
        cfg = tmp / f"{tag}.toml"
        cfg.write_text(wingatemap_cfg(pki, group, listen, dest))
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", f"--logfile={tmp / (tag + '.wingatemap.log')}", "wingatemap", "run", "--config", str(cfg)]
    if proxy == "stunnel":
        cfg = tmp / f"{tag}.stunnel.conf"
        cfg.write_text(stunnel_cfg(pki, group, listen, dest))
        return [shutil.which("stunnel") or "stunnel", str(cfg)]
    cfg = tmp / f"{tag}.haproxy.cfg"
    cfg.write_text(haproxy_under_test_cfg(pki, group, listen, dest))
    return ["haproxy", "-db", "-f", str(cfg)]


def start_case(started: dict, case: dict, pki: dict, tmp: Path, env_wg: dict, tag: str, ports: tuple[int, int, int], proxy_cpu: int | None, load_cpu: int | None) -> dict:
    """
    Start the processes of one case, recording in C{started} (also when this fails) the port
    the client connects to, the processes by role and their logs.  Downstream processes start
    first, so the readiness probe is the first connection each of them sees.
    """
    front, mid, backend = ports
    group = case["group"]
    started.update({"front": backend, "proxy": None, "helper": None, "logs": {}})
    if case["proxy"] is None:
        return started

    def run_proxy(listen: int, dest: int) -> None:
        log = tmp / f"{tag}.proxy.out"
        started["logs"]["proxy"] = log
        kwargs = {"env": env_wg, "cwd": str(tmp)} if case["proxy"] == "wingatemap" else {"cwd": str(tmp)}
        started["proxy"] = start(case["proxy"], proxy_argv(case, pki, tmp, tag, listen, dest), proxy_cpu, log, **kwargs)
        if case["proxy"] == "wingatemap":
            started["logs"]["wingatemap"] = tmp / f"{tag}.wingatemap.log"

    def run_helper(text: str) -> None:
        cfg = tmp / f"{tag}.helper.cfg"
        cfg.write_text(text)
        log = tmp / f"{tag}.helper.out"
        started["logs"]["helper"] = log
        started["helper"] = start("haproxy helper", ["haproxy", "-db", "-f", str(cfg)], load_cpu, log)

    def procs() -> list[tuple[str, subprocess.Popen, Path]]:
        return [(role, started[role], started["logs"][role]) for role in ("proxy", "helper") if started[role] is not None]

    if group == "plain":
        run_proxy(front, backend)
        wait_listening(front, procs())
    elif group == "destination":
        run_helper(terminator_cfg(pki, mid, backend))
        wait_listening(mid, procs())
        run_proxy(front, mid)
        wait_listening(front, procs())
    else:
        run_proxy(mid, backend)
        wait_listening(mid, procs())
        run_helper(originator_cfg(pki, front, mid, client_cert=group == "mtls"))
        wait_listening(front, procs())
    started["front"] = front
    # End-to-end check: one byte echoed through the whole chain (TLS handshake included).
    deadline = time.monotonic() + 20.0
    for _ in range(100):
        if base.echo_probe(front, timeout=5.0):
            return started
        for role, p, log in procs():
            if p.poll() is not None:
                raise RuntimeError(f"{role} exited with {p.returncode}:\n{_tail(log)}")
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    raise RuntimeError("no echo through the chain within 20s:\n" + "\n".join(f"--- {role}\n{_tail(log)}" for role, _, log in procs()))


def stop_case(started: dict) -> None:
    for role in ("proxy", "helper"):
        if started.get(role) is not None:
            base.stop(started[role])


# -- measurements -------------------------------------------------------------------------------


def one_load(started: dict, load_cpu: int | None, args: list, timeout: float, cpus: tuple[int | None, int | None]) -> dict:
    """
    One load run, with the CPU time used during it by the proxy, the helper, the load generator,
    the backend and this script, and by each core as a whole.  Fractions are of the load
    generator's own measured time; "others_cpuN" is the core's busy time not accounted for by
    this benchmark's processes on it: other work on the machine (or kernel work charged to no
    process; it stays within a few % on a quiet machine).
    """

    def snap() -> dict:
        s: dict[str, Any] = {"cores": core_times(), "children": resource.getrusage(resource.RUSAGE_CHILDREN), "self": resource.getrusage(resource.RUSAGE_SELF)}
        for role in ("proxy", "helper"):
            if started.get(role) is not None:
                s[role] = cpu_seconds(started[role].pid)
        s["backend"] = cpu_seconds(BACKEND_PID[0]) if BACKEND_PID else 0.0
        return s

    before = snap()
    result = base.run_load(load_cpu, args, timeout)
    after = snap()
    seconds = result["seconds"]
    usage: dict[str, float] = {}
    for role in ("proxy", "helper"):
        if role in before:
            usage[f"{role}_cpu_s"] = after[role] - before[role]
            usage[role] = usage[f"{role}_cpu_s"] / seconds
    loadgen = (after["children"].ru_utime + after["children"].ru_stime) - (before["children"].ru_utime + before["children"].ru_stime)
    me = (after["self"].ru_utime + after["self"].ru_stime) - (before["self"].ru_utime + before["self"].ru_stime)
    usage["loadgen"] = loadgen / seconds
    usage["backend"] = (after["backend"] - before["backend"]) / seconds
    ours = {0: usage.get("proxy_cpu_s", 0.0), 1: usage.get("helper_cpu_s", 0.0) + loadgen + (after["backend"] - before["backend"]) + me}
    for index, (label, cpu) in enumerate(zip(("cpu0", "cpu1"), cpus)):
        if cpu is not None and cpu in before["cores"] and cpu in after["cores"]:
            busy = after["cores"][cpu][0] - before["cores"][cpu][0]
            total = after["cores"][cpu][1] - before["cores"][cpu][1]
            usage[label] = busy / total if total > 0 else 0.0
            usage[f"others_{label}"] = max(0.0, busy - ours[index]) / seconds
    result["usage"] = usage
    return result


def measured_load(started: dict, load_cpu: int | None, args: list, timeout: float, cpus: tuple[int | None, int | None]) -> dict:
    """
    L{one_load} once the machine is quiet; again (up to ATTEMPTS in all) if other work took
    more than OTHERS_LIMIT of a core meanwhile, keeping the least disturbed run.
    """
    best: dict | None = None
    waited_total = 0.0
    for attempt in range(1, ATTEMPTS + 1):
        waited, busiest = wait_quiet(cpus)
        waited_total += waited
        if waited > 1.0:
            print(f"  (waited {waited:.0f} s for the machine to be quiet; busiest core {busiest:.0%})", flush=True)
        result = one_load(started, load_cpu, args, timeout, cpus)
        u = result["usage"]
        result["disturbed"] = max(u.get("others_cpu0", 0.0), u.get("others_cpu1", 0.0))
        result["attempt"] = attempt
        if best is None or result["disturbed"] < best["disturbed"]:
            best = result
        if result["disturbed"] <= OTHERS_LIMIT:
            break
        if attempt < ATTEMPTS:
            print(f"  (other work took {result['disturbed']:.0%} of a core during this {args[0]} run: measuring it again)", flush=True)
    assert best is not None
    best["attempts"] = attempt
    best["waited_s"] = waited_total
    return best


def measure(case: dict, started: dict, cfg: dict, load_cpu: int | None, cpus: tuple[int | None, int | None]) -> dict:
    r: dict[str, Any] = {"name": case["name"]}
    port = started["front"]
    if case["bulk"]:
        for direction in ("up", "down"):
            runs = [measured_load(started, load_cpu, ["bulk", direction, port, cfg["bulk_bytes"]], 300, cpus) for _ in range(cfg["bulk_reps"])]
            r[f"bulk_{direction}"] = runs
            mbs = statistics.median(x["mb_per_s"] for x in runs)
            print(f"  bulk {direction}: {mbs:.0f} MB/s{_usage_text(runs[-1])}", flush=True)
    cr = measured_load(started, load_cpu, ["connrate", port, cfg["cr_concurrency"], cfg["cr_duration"], cfg["cr_maxconn"]], cfg["cr_duration"] + 90, cpus)
    r["connrate"] = cr
    print(f"  new connections: {cr['rate']:.0f} conn/s ({cr['connections']} done, {cr['errors']} errors){_usage_text(cr)}", flush=True)
    return r


def _usage_text(result: dict) -> str:
    u = result.get("usage", {})
    parts = [f"{k} {u[k] * 100:.0f}%" for k in ("proxy", "helper", "cpu0", "cpu1", "others_cpu0", "others_cpu1") if k in u]
    return f"  [{', '.join(parts)}]" if parts else ""


def scan_logs(started: dict) -> dict:
    """
    From the logs of one case: the helper's sampled TLS lines, and the lines of the proxy's
    logs (twistd's rotated files included) that report a failure or an error, with the
    exceptions of the tracebacks counted by their last line.
    """
    out: dict[str, Any] = {"helper_tls": [], "problems": []}
    helper = started["logs"].get("helper")
    if helper is not None:
        out["helper_tls"] = [line.strip() for line in _tail(helper, 100_000).splitlines() if line.startswith("helper-tls")]
    bad = re.compile(r"Traceback|Unhandled|\bfailed\b|\berror\b|LOG[0-3]\[", re.IGNORECASE)
    own_frame = re.compile(r'File ".*/(wingate_map/[\w/]+\.py)", line (\d+), in (\w+)')
    exception = re.compile(r"^\s*(builtins\.)?[A-Za-z_][\w.]*(Error|Exception|Failure)\b.*")
    for role in ("proxy", "wingatemap"):
        log = started["logs"].get(role)
        if log is None:
            continue
        lines: list[str] = []
        for path in sorted(log.parent.glob(log.name + "*")):  # twistd rotates its log at 1 MB
            try:
                lines += path.read_text(errors="replace").splitlines()
            except OSError:
                pass
        hits = [line for line in lines if bad.search(line) and not any(b in line for b in BENIGN)]
        if not hits:
            continue
        exceptions: dict[str, int] = {}
        frame = ""
        for i, line in enumerate(lines):
            if "Traceback (most recent call last)" in line:
                frame = ""
            m = own_frame.search(line)
            if m:
                frame = f" (last wingate_map frame: {m.group(1)}:{m.group(2)} in {m.group(3)})"
            if exception.match(line) and i > 0 and lines[i - 1].startswith("\t  "):
                key = line.strip() + frame
                exceptions[key] = exceptions.get(key, 0) + 1
        out["problems"].append(
            {
                "log": role,
                "count": len(hits),
                "unhandled": sum("Unhandled Error" in line for line in lines),
                "exceptions": exceptions,
                "first": hits[:5],
            }
        )
    fds = started.get("fds")
    if fds and fds[1] - fds[0] > 20:
        out["problems"].append({"log": "fd count", "count": fds[1] - fds[0], "unhandled": 0, "exceptions": {}, "first": [f"the proxy held {fds[0]} open files when ready and {fds[1]} after the measurements (1 s after the last connection)"]})
    return out


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


# Error-like log lines that are not errors of the relay: stunnel in server mode without a CAfile
# says at start that it has no CA to verify clients with (it does not ask for client certificates).
BENIGN = ("No trusted certificates found",)


# -- figures and report ------------------------------------------------------------------------


def _med(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def figures(c: dict) -> dict:
    """
    One case's figures: medians over its rounds (bulk: over every run).
    """
    rounds = c["rounds"]
    f: dict[str, float | None] = {}
    for d in ("up", "down"):
        runs = [x for r in rounds for x in r.get(f"bulk_{d}", [])]
        f[d] = _med([x["mb_per_s"] for x in runs])
        f[f"{d}_proxy"] = _med([x["usage"].get("proxy") for x in runs])
        f[f"{d}_helper"] = _med([x["usage"].get("helper") for x in runs])
        f[f"{d}_cpu0"] = _med([x["usage"].get("cpu0") for x in runs])
        f[f"{d}_cpu1"] = _med([x["usage"].get("cpu1") for x in runs])
        f[f"{d}_others"] = _med([x.get("disturbed") for x in runs])
        # MB per CPU-second of the proxy under test: its efficiency, whoever the bottleneck is.
        f[f"{d}_eff"] = _med([x["bytes"] / 1e6 / x["usage"]["proxy_cpu_s"] for x in runs if x["usage"].get("proxy_cpu_s")])
    crs = [r["connrate"] for r in rounds]
    f["cps"] = _med([x["rate"] for x in crs])
    f["cps_proxy"] = _med([x["usage"].get("proxy") for x in crs])
    f["cps_helper"] = _med([x["usage"].get("helper") for x in crs])
    f["cps_cpu0"] = _med([x["usage"].get("cpu0") for x in crs])
    f["cps_cpu1"] = _med([x["usage"].get("cpu1") for x in crs])
    f["cps_others"] = _med([x.get("disturbed") for x in crs])
    f["cps_eff"] = _med([x["connections"] / x["usage"]["proxy_cpu_s"] for x in crs if x["usage"].get("proxy_cpu_s")])
    f["cr_errors"] = sum(x["errors"] for x in crs)
    return f


def spread(c: dict, key: str) -> str:
    if key in ("up", "down"):
        values = [x["mb_per_s"] for r in c["rounds"] for x in r.get(f"bulk_{key}", [])]
    else:
        values = [r["connrate"]["rate"] for r in c["rounds"]]
    if len(values) < 2:
        return ""
    return f" ({min(values):.0f}–{max(values):.0f})"


def _n(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f}%"


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def absolute_table(results: list[dict]) -> list[str]:
    lines = ["| case | bulk up MB/s | bulk down MB/s | conn/s |", "| --- | ---: | ---: | ---: |"]
    for c in results:
        f = figures(c)
        lines.append(f"| {c['name']} | {_n(f['up'])}{spread(c, 'up')} | {_n(f['down'])}{spread(c, 'down')} | {_n(f['cps'])}{spread(c, 'cps')} |")
    return lines


def ratio_table(results: list[dict]) -> list[str]:
    d = figures(results[0])
    byname = {c["name"]: figures(c) for c in results}
    plain = byname.get("wingatemap plain")
    lines = [
        "| case | bulk up ×direct | bulk down ×direct | conn/s ×direct | bulk up ×plain wingatemap | bulk down ×plain wingatemap | conn/s ×plain wingatemap |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in results:
        f = byname[c["name"]]
        cells = [_ratio(f[k], d[k]) for k in ("up", "down", "cps")]
        cells += [_ratio(f[k], plain[k]) if plain else "-" for k in ("up", "down", "cps")]
        lines.append(f"| {c['name']} | " + " | ".join(cells) + " |")
    return lines


def versus_rows(results: list[dict]) -> list[tuple[str, str, dict]]:
    """
    For each TLS group and figure: wingatemap, stunnel and haproxy side by side.
    """
    byname = {c["name"]: figures(c) for c in results}
    rows = []
    for group, label, _ in GROUPS:
        fs = {p: byname.get(f"{label}: {p}") for p in PROXIES}
        if fs["wingatemap"] is None:
            continue
        for key, heading in (("up", "bulk up MB/s"), ("down", "bulk down MB/s"), ("cps", "conn/s"), ("up_eff", "bulk up MB per proxy CPU-s"), ("down_eff", "bulk down MB per proxy CPU-s"), ("cps_eff", "conn per proxy CPU-s")):
            if fs["wingatemap"].get(key) is None:
                continue
            rows.append((label, heading, {p: (f[key] if f else None) for p, f in fs.items()}))
    return rows


def versus_table(results: list[dict]) -> list[str]:
    lines = ["| case | figure | wingatemap | stunnel | haproxy | wingatemap / stunnel | wingatemap / haproxy |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for label, heading, v in versus_rows(results):
        w = v["wingatemap"]
        lines.append(f"| {label} | {heading} | {_n(w)} | {_n(v['stunnel'])} | {_n(v['haproxy'])} | {_ratio(w, v['stunnel'])} | {_ratio(w, v['haproxy'])} |")
    return lines


def limited_by(f: dict, p: str) -> str:
    """
    What limited one measurement: the proxy under test (its core busy), the harness (CPU1:
    helper, load generator and backend), or neither (the 4 connection loops wait on round trips).
    """
    proxy, cpu1 = f.get(f"{p}_proxy"), f.get(f"{p}_cpu1")
    if proxy is None or cpu1 is None:
        return "harness" if cpu1 is not None and cpu1 >= 0.9 else "-"
    if proxy >= 0.9:
        return "proxy"
    if cpu1 >= 0.9:
        return "harness"
    return "neither"


def cpu_table(results: list[dict]) -> list[str]:
    lines = [
        "| case | bulk up: proxy / helper / CPU0 / CPU1 / other | bulk down: proxy / helper / CPU0 / CPU1 / other | conn/s: proxy / helper / CPU0 / CPU1 / other |",
        "| --- | --- | --- | --- |",
    ]
    for c in results:
        f = figures(c)
        cells = []
        for p in ("up", "down", "cps"):
            if f[p] is None:
                cells.append("-")
                continue
            cells.append(" / ".join(_pct(f[f"{p}_{k}"]) for k in ("proxy", "helper", "cpu0", "cpu1", "others")) + f" → {limited_by(f, p)}")
        lines.append(f"| {c['name']} | " + " | ".join(cells) + " |")
    return lines


def tls_lines(results: list[dict]) -> list[str]:
    out = []
    for c in results:
        seen = sorted({re.sub(r"^helper-tls ", "", line) for r in c["rounds"] for line in r.get("logs", {}).get("helper_tls", [])})
        if seen:
            out.append(f"- {c['name']}: " + "; ".join(f"`{s}`" for s in seen))
    return out


def problem_lines(results: list[dict]) -> list[str]:
    out = []
    for c in results:
        f = figures(c)
        if f["cr_errors"]:
            out.append(f"- {c['name']}: the connection-rate load generator counted {f['cr_errors']} failed connection(s) over all rounds.")
        for rnd, r in enumerate(c["rounds"], 1):
            for p in r.get("logs", {}).get("problems", []):
                if p["log"] == "fd count":
                    out.append(f"- {c['name']}, round {rnd}: possible descriptor leak: {p['first'][0]}.")
                    continue
                sessions = r.get("connrate", {}).get("connections", 0) + 2 * bool(r.get("bulk_up")) + 1
                what = f"{p['count']} line(s) in the {p['log']} log look like errors ({p['unhandled']} `Unhandled Error` tracebacks; the case made about {sessions} connections)"
                if p["exceptions"]:
                    what += ", exceptions: " + "; ".join(f"{n} × `{text[:200]}`" for text, n in p["exceptions"].items())
                else:
                    what += ", first: " + "; ".join(f"`{line[:200]}`" for line in p["first"][:3])
                out.append(f"- {c['name']}, round {rnd}: {what}")
    return out


def interpretation(results: list[dict]) -> list[str]:
    byname = {c["name"]: figures(c) for c in results}
    d = byname["direct"]
    plain = byname.get("wingatemap plain")
    out: list[str] = []
    for group, label, desc in GROUPS:
        w = byname.get(f"{label}: wingatemap")
        if w is None:
            continue
        parts = []
        if w["up"] is not None:
            parts.append(f"{w['up']:.0f} / {w['down']:.0f} MB/s up / down ({w['up'] / d['up']:.2f}× / {w['down'] / d['down']:.2f}× direct" + (f", {w['up'] / plain['up']:.2f}× / {w['down'] / plain['down']:.2f}× plain wingatemap)" if plain else ")"))
        parts.append(f"{w['cps']:.0f} conn/s ({w['cps'] / d['cps']:.3f}× direct" + (f", {w['cps'] / plain['cps']:.2f}× plain wingatemap)" if plain else ")"))
        for other in ("stunnel", "haproxy"):
            o = byname.get(f"{label}: {other}")
            if o is None:
                continue
            bits = []
            if w["up"] is not None and o["up"]:
                bits.append(f"{w['up'] / o['up']:.2f}× / {w['down'] / o['down']:.2f}× its bulk throughput")
            bits.append(f"{w['cps'] / o['cps']:.2f}× its connection rate")
            if w["cps_eff"] and o["cps_eff"]:
                bits.append(f"{w['cps_eff'] / o['cps_eff']:.2f}× its connections per CPU-second")
            parts.append(f"against {other}: " + ", ".join(bits))
        out.append(f"- **{label}** ({desc}), wingatemap: " + "; ".join(parts) + ".")
    costs = []
    for c in results:
        f = byname[c["name"]]
        if c["proxy"] is None or not f["cps_eff"]:
            continue
        per_gb = [1000.0 / f[k] for k in ("up_eff", "down_eff") if f.get(k)]
        costs.append(f"{c['name']} {1e6 / f['cps_eff']:.0f} µs" + (f" / {statistics.mean(per_gb):.2f} s" if per_gb else ""))
    if costs:
        out.append("- **CPU time of the proxy under test** per new connection / per GB relayed (mean of up and down): " + "; ".join(costs) + ".")
    extra = []
    for group, label, _ in GROUPS:
        w, h = byname.get(f"{label}: wingatemap"), byname.get(f"{label}: haproxy")
        if w and h and w["cps_eff"] and h["cps_eff"]:
            extra.append(f"{label} {1e6 / w['cps_eff'] - 1e6 / h['cps_eff']:+.0f} µs")
    if extra and plain and plain["cps_eff"]:
        out.append(
            "- **wingatemap's CPU per TLS connection minus haproxy's**: " + "; ".join(extra)
            + f". For comparison, plain wingatemap's whole CPU per connection is {1e6 / plain['cps_eff']:.0f} µs."
        )
    bounds: dict[str, list[str]] = {}
    for c in results:
        if c["proxy"] is None:
            continue
        f = byname[c["name"]]
        for p, label in (("up", "bulk up"), ("down", "bulk down"), ("cps", "conn/s")):
            if f[p] is not None:
                bounds.setdefault(limited_by(f, p), []).append(f"{c['name']} {label}")
    if bounds.get("harness"):
        out.append(
            "- **Limited by the harness, not by the proxy** (proxy below 90% of its core, CPU1 at 90% or more): "
            + "; ".join(bounds["harness"])
            + ". These figures are lower bounds for the proxy under test; compare those cases on the per-CPU-second rows."
        )
    for c in results:
        if c["proxy"] != "wingatemap":
            continue
        unhandled = sum(p["unhandled"] for r in c["rounds"] for p in r.get("logs", {}).get("problems", []))
        conns = sum(r["connrate"]["connections"] for r in c["rounds"])
        if unhandled:
            kinds = sorted({k for r in c["rounds"] for p in r.get("logs", {}).get("problems", []) for k in p["exceptions"]})
            out.append(
                f"- **{c['name']}**: wingatemap logged **{unhandled} `Unhandled Error` tracebacks** over the rounds (its connection-rate tests made {conns} connections): "
                + "; ".join(f"`{k}`" for k in kinds)
                + ". Sessions still completed (see *Errors seen*), but the figures include formatting and writing a multi-line traceback for each, and this is a bug to fix, not a cost of TLS."
            )
    return out


def markdown(raw: dict) -> str:
    results, info, cfg = raw["results"], raw["versions"], raw["config"]
    quick = raw["quick"]
    rounds = cfg["rounds"]
    mb = cfg["bulk_bytes"] // 10**6
    lines = [
        "# Performance: TLS",
        "",
        "Generated by `python3 bench/tls.py" + (" --quick" if quick else "") + " --out docs/performance-tls.md`"
        f" on {raw['date']}; the whole run took {raw['elapsed_s'] / 60:.1f} minutes."
        " Regenerate it the same way. Absolute numbers depend on the machine; quote the ratios. The plain-TCP comparison (wingatemap, twistd portforward, haproxy, socat) is [performance.md](performance.md).",
        "",
        "## Machine and versions",
        "",
        f"- CPUs: {info['nproc']} × {info['cpu']}; kernel {info['kernel']}",
        f"- Python {info['python']}, Twisted {info['twisted']}, pyOpenSSL {info['pyopenssl']} with {info['pyopenssl_openssl']} (the OpenSSL inside the `cryptography` {info['cryptography']} wheel), wingatemap {info['wingatemap']}",
        f"- system OpenSSL: {info['openssl']}",
        f"- haproxy: {info['haproxy']} ({info['haproxy_openssl']})",
        f"- stunnel: {info['stunnel']}",
        f"- load average (1 min) at start / end of the run: {info['load_start']:.2f} / {info['load_end']:.2f}"
        " (the benchmark itself adds about 1; more means other work shared the machine and the figures are noisier; the CPU0 / CPU1 columns below show it per measurement)",
    ]
    direct = next((c for c in results if c["name"] == "direct"), None)
    if direct is not None and raw["pinned"]:
        f = figures(direct)
        lines.append(
            f"- CPU0 busy while direct was measured (nothing of this benchmark runs on CPU0 then, so this is other work on the machine): bulk up {_pct(f['up_cpu0'])}, bulk down {_pct(f['down_cpu0'])}, conn/s {_pct(f['cps_cpu0'])} (medians over rounds)"
        )
    runs = [x for c in results for r in c["rounds"] for x in [*r.get("bulk_up", []), *r.get("bulk_down", []), r["connrate"]]]
    if runs and "disturbed" in runs[0]:
        repeated = sum(x.get("attempts", 1) > 1 for x in runs)
        waited = sum(x.get("waited_s", 0.0) for x in runs)
        kept = sorted(x["disturbed"] for x in runs)
        lines.append(
            f"- other work on the machine: before each of the {len(runs)} measurements the run waited for both cores to be quiet (at most {QUIET_LIMIT:.0%} busy; {waited:.0f} s of waiting in all), and {repeated} measurement(s) were made again (up to {ATTEMPTS} times, keeping the least disturbed) because other work took more than {OTHERS_LIMIT:.0%} of a core meanwhile; "
            f"in the measurements kept, other work took a median {statistics.median(kept):.0%} and at most {kept[-1]:.0%} of a core"
        )
    if raw.get("skipped"):
        lines.append(f"- skipped: {'; '.join(raw['skipped'])}")
    if raw.get("failed"):
        lines.append(f"- FAILED during this run: {'; '.join(raw['failed'])}")
    lines += [
        "",
        "## Results: ratios",
        "",
        f"Median of {rounds} round{'s' if rounds > 1 else ''} per case (bulk: of every run). ×direct: the case's figure / direct's; ×plain wingatemap: / the plain-TCP wingatemap relay's, measured in the same run. Higher is better everywhere.",
        "",
    ]
    lines += ratio_table(results)
    lines += [
        "",
        "## wingatemap against stunnel and haproxy",
        "",
        "Same pair of relays, same fixed haproxy on the other side; only the proxy under test changes. "
        "The *per proxy CPU-second* rows divide the work done by the CPU time the proxy under test used for it: they compare efficiency even where the proxy's core was not the bottleneck (see the CPU table).",
        "",
    ]
    vt = versus_table(results)
    lines += vt if len(vt) > 2 else ["Not measured in this run (see *skipped* / *FAILED* above)."]
    lines += ["", "## Interpretation", ""]
    lines += interpretation(results)
    measured = {c["name"] for c in results}
    if all(f"{label}: {proxy}" in measured for _, label, _ in GROUPS for proxy in PROXIES):
        lines += [""] + INTERPRETATION_TEXT
    else:
        lines += ["", "(The explanations written for the full comparison are left out: not every case of every proxy was measured in this run.)"]
    lines += ["", "## Results: absolute figures", "", "Medians, with the range over rounds in brackets; MB = 10^6 bytes.", ""]
    lines += absolute_table(results)
    lines += [
        "",
        "## CPU use during each measurement",
        "",
        "Medians over rounds of the CPU time used during the load run, as a fraction of its duration: the proxy under test (its process, all threads), the fixed haproxy helper, and each core as a whole (`/proc/stat`, which includes the backend, the load generator and anything else running). "
        "*other*: the larger, over the two cores, of the busy time that no process of this benchmark accounts for (other work on the machine; a few % on a quiet one). "
        "→ what limited the figure: *proxy* when the proxy under test used 90% of its core or more; *harness* when it did not but CPU1 (helper, load generator, backend) was 90% busy or more: then the figure is the harness's ceiling, not the proxy's, and only the per-CPU-second figures compare the proxies; *neither* when both had room (the 4 connection loops of the rate test then wait on round trips).",
        "",
    ]
    lines += cpu_table(results)
    tl = tls_lines(results)
    if tl:
        lines += [
            "",
            "## What was negotiated",
            "",
            "Logged by the fixed haproxy for the first connection (the readiness probe) and the 200th (inside the connection-rate test) of each case and round: protocol, cipher, whether the session was resumed (0: a full handshake); for the terminator also the SNI it received.",
            "",
        ]
        lines += tl
    pl = problem_lines(results)
    lines += ["", "## Errors seen", ""]
    lines += pl if pl else ["None: no failed connection in the load generators, and no error, failure or traceback line in the logs of the proxies under test."]
    lines += [
        "",
        "## Method",
        "",
        "All traffic is TCP over 127.0.0.1. "
        + (
            "The proxy under test runs pinned to CPU 0 (`taskset -c 0`); the fixed haproxy helper, the backend, the load generators and the orchestrating script run pinned to CPU 1 (`taskset -c 1`). "
            "So the proxy under test has a core to itself, and the helper's TLS work competes with the client and the backend on the other core: in a case where CPU1 is saturated, the pair's figure says little about the proxy under test (see the CPU table and the per-CPU-second rows)."
            if raw["pinned"]
            else "CPU pinning was NOT available on this run (fewer than 2 CPUs or no taskset), so every process shared the CPUs."
        )
        + f" The cases are measured one after the other, round-robin, {rounds} time{'s' if rounds > 1 else ''}, in the same run; every process of a case is started fresh for each round, checked with a one-byte echo through the whole chain, measured, and stopped. Each case has its own ports and its own backend port.",
        "",
        "Because the load generator and the backend speak plain TCP, each TLS case is a pair of relays: the proxy under test and a fixed haproxy 'helper' that does the other end of TLS.",
        "",
        "- **direct**: the client connects straight to the backend.",
        "- **wingatemap plain**: wingatemap relaying plain TCP (`default = { host = \"127.0.0.1\", port = B }`), the reference for what TLS costs wingatemap.",
        "- **TLS destination**: client → proxy under test (plain in, TLS out, verifying the server's chain against the private CA and the name `localhost`, SNI `localhost`) → helper haproxy terminator (`bind ... ssl crt combined.pem no-tls-tickets`, `tune.ssl.cachesize 0`: no session cache, no tickets, so every handshake is a full one whatever the client offers) → backend.",
        "  - wingatemap: `default = { host = \"127.0.0.1\", port = T, tls = true, ca = \"ca.pem\", server_name = \"localhost\" }`",
        "  - stunnel: `client = yes`, `verifyChain = yes`, `CAfile = ca.pem`, `checkHost = localhost`, `sni = localhost`",
        "  - haproxy: `server s 127.0.0.1:T ssl verify required ca-file ca.pem sni str(localhost) verifyhost localhost`",
        "- **TLS listener**: client → helper haproxy originator (plain in; `server ... ssl verify none no-ssl-reuse sni str(localhost)`: TLS out without verifying, since that cost is not the proxy's, and never offering a session to resume) → proxy under test (TLS in with the server certificate, plain out) → backend.",
        "  - wingatemap: `tls = { cert = \"server.pem\", key = \"server.key\" }` on the mapping",
        "  - stunnel: server mode, `cert`, `key`",
        "  - haproxy: `bind 127.0.0.1:L ssl crt combined.pem`",
        "- **mTLS listener**: as the TLS listener, but the originator presents a client certificate (`crt client.pem` on its server line) and the proxy requires and verifies it: wingatemap `client_ca = \"ca.pem\"`, stunnel `verifyChain = yes` + `CAfile`, haproxy `ca-file ca.pem verify required`. Only the connection rate is measured (bulk transfer is the same as the TLS listener's once the handshake is done).",
        "",
        "Every proxy runs with its defaults otherwise: wingatemap writes a ClientConnect and a ClientDisconnect line per connection to its log file (as in performance.md) and runs from a copy of this checkout's `wingate_map/` taken when the run starts (its hash is above); stunnel logs at its default level (`debug = notice`: a few lines per connection) to a file; haproxy logs nothing (`nbthread 1`, `maxconn 5000`). All of them negotiate TLS 1.3 with the helper (see *What was negotiated*). Session resumption is off in every case because of the helper, so the connection rate is the full-handshake rate: an ECDHE key exchange on both ends, an ECDSA P-256 signature on the server end, and a chain and name check on the verifying end.",
        "",
        "Certificates are made at run time in a temporary directory with `tests/pki.py`: a private CA, a server certificate for `localhost` and `127.0.0.1`, and a client certificate, all ECDSA P-256; haproxy gets each certificate and its key in one PEM file.",
        "",
        f"- **bulk up / down** (MB/s): one connection carries {mb} MB client→backend (the backend answers one byte once it has received them all; the clock stops at that byte) or backend→client (the clock stops at the last byte); `bench/loadgen.py bulk`. {cfg['bulk_reps']} run{'s' if cfg['bulk_reps'] > 1 else ''} per direction and round; connection setup (and the handshake) is inside the time.",
        f"- **conn/s**: `bench/loadgen.py connrate`: {cfg['cr_concurrency']} concurrent loops of connect, send 1 byte, read the echoed byte, read the end of stream (the backend closes first), close; for {cfg['cr_duration']:g} s (at most {cfg['cr_maxconn']} connections). A connection counts once its end of stream is back, so both handshakes-and-connects of the pair and the closes are inside the time.",
        "- **CPU**: utime + stime from `/proc/PID/stat` of the proxy (all its threads), the helper and the backend, the load generator's from `getrusage(RUSAGE_CHILDREN)`, and busy time per core from `/proc/stat` (user + nice + system + irq + softirq; steal excluded), read just before and just after each load run and divided by the load generator's own measured time (its interpreter start-up is outside that time, so the fractions can be a few % high). The kernel samples them at the scheduler tick (250 Hz here), so they are approximate.",
        f"- **Other work on the machine**: this machine is shared, so before each measurement the script waits (at most {QUIET_MAX_WAIT:g} s) until neither core is more than {QUIET_LIMIT:.0%} busy (nothing of the benchmark works between measurements), and after it compares each core's busy time with what the benchmark's own processes used there. When something else took more than {OTHERS_LIMIT:.0%} of a core, the measurement is made again, up to {ATTEMPTS} times in all, and the least disturbed one is kept (how often, and how much disturbance remained, is under *Machine and versions*).",
        "- **Profile** (not repeated by this script): the explanations under *Interpretation* that name functions come from running the wingatemap of a TLS destination case under `twistd --profile --profiler=cprofile` for 1 GB down and for 3 s of new connections, on 2026-11-26, at a commit between c4b2178 and c34385b (`wingate_map/tls.py` is the same in both).",
        "",
        "## Reproduce",
        "",
        "```sh",
        "apt-get install -y haproxy stunnel4   # each is skipped when absent (every TLS case needs haproxy)",
        "python3 bench/tls.py --out docs/performance-tls.md   # full run, writes this file",
        "python3 bench/tls.py --quick                         # one short round, prints only",
        "```",
        "",
        "Raw results of every run are saved as JSON under `bench/results/` (ignored by git); `python3 bench/tls.py --report-from bench/results/tls-....json --out FILE` rebuilds this report from one.",
        "",
    ]
    return "\n".join(lines)


# Written after reading the results of the runs this script was developed with (git c4b2178,
# 2026-11-26) and a profile of wingatemap; it explains mechanisms, while the figures above it
# are computed from the run.  Check that it still matches when the code or the machine changes.
INTERPRETATION_TEXT: list[str] = [
    "Why:",
    "",
    "- **Reading the ratios.** Every TLS figure is that of a *pair* of relays with a TLS leg between them, while `direct` and `wingatemap plain` do no TLS at all; the ×direct connection-rate ratios (a few hundredths) mostly measure two full TLS handshakes per connection, which any TLS proxy pays. The fair comparisons are between the three proxies within one case (same helper, same harness), on the per-CPU-second rows wherever the proxy under test was not the limit (the CPU table says which).",
    "- **Bulk: Python per TLS record.** The cipher is the same C code for all three (AES-256-GCM in OpenSSL). What differs is the path around it. Twisted runs TLS over memory BIOs through pyOpenSSL, so for every TLS record (at most 16 KiB of data) wingatemap makes one `SSL_read` or `SSL_write` call from Python (pyOpenSSL's wrapper, its error check, a new buffer), copies the result into a Python `bytes` object, and hands it to the other leg's `transport.write` with Twisted's producer bookkeeping. In a profile of a 1 GB download through the TLS destination case, `SSL_read` ran 76,000 times (once per record) and its C code, decryption included, took 0.33 s of the 4.2 s the proxy was busy (the profiler slows the Python part, not the C part, so the real share of C is somewhat larger, but still small): the rest is Python and system calls per record. stunnel and haproxy do the same per-record work in C. A plain relay has no per-record step (Twisted reads up to 64 KiB per call), which is why the TLS cases keep only a fraction of plain wingatemap's throughput. TLS caps records at 16 KiB and OpenSSL returns one record per `SSL_read`, so this cost is built into driving OpenSSL from Python through pyOpenSSL. Only kernel TLS would remove it, and pyOpenSSL does not offer that.",
    "- **Connections: Python adds to an expensive handshake.** A full TLS 1.3 handshake with ECDSA P-256 is expensive for every program here: haproxy's CPU per TLS connection above is almost all OpenSSL, since its plain-TCP relaying costs about 0.1 ms per connection (performance.md). wingatemap's Python work *adds* to that cost instead of multiplying it. Its plain relaying (the `wingatemap plain` figure) is part of that work; the Python side of TLS is the rest: a TLS wrapper protocol per TLS leg, Twisted's handshake callbacks, service_identity's name check on the destination side (it parses the server certificate in Python: about 0.1–0.2 ms per connection in the profile, where `SSL_do_handshake` itself, C, took about 0.9 ms), and, on the listener side, the traceback of the bug reported above. As a result wingatemap keeps a much larger share of haproxy's connection rate with TLS (the ratios above) than without it (performance.md: about a sixth of haproxy's plain-TCP conn/s).",
    "- **stunnel** had the lowest connection rate of the three in every case, and used about as much CPU per connection as wingatemap or more. It starts a thread for every connection and, at its default log level, writes five log lines per connection (that cause was not profiled here). Its bulk efficiency per CPU-second is close to haproxy's.",
    "- **Different OpenSSL builds.** wingatemap's pyOpenSSL uses the OpenSSL 4.0 in the `cryptography` wheel; haproxy and stunnel use Debian's OpenSSL 3.0. Handshake cost varies between OpenSSL versions (3.x handshakes are slower than 1.1.1's: openssl/openssl#17627; since 3.5 a client also offers a hybrid X25519MLKEM768 key share by default, which a 3.0 server ignores: openssl/openssl#23388), so part of any handshake difference belongs to the library, not to the relay. All cases negotiated TLS 1.3 with TLS_AES_256_GCM_SHA384 (below).",
    "- **In practice.** On one core of this machine wingatemap relays a few hundred MB/s through a TLS leg in each direction and sets up a few hundred full TLS handshakes per second (figures above). For the long-lived sessions a TCP mapping usually carries (remote desktops, databases, site-to-site tunnels) that is rarely the limit. For thousands of new TLS connections per second, or several Gbit/s of TLS per instance, haproxy is the stronger tool on the same hardware.",
]


# -- versions -----------------------------------------------------------------------------------


def versions() -> dict:
    info = base.versions()
    info.pop("socat", None)

    def out(argv: list[str]) -> str:
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return p.stdout + p.stderr

    import cryptography
    import OpenSSL
    from OpenSSL import SSL

    info["pyopenssl"] = OpenSSL.__version__
    info["cryptography"] = cryptography.__version__
    info["pyopenssl_openssl"] = SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()
    info["openssl"] = out(["openssl", "version"]).strip() or "not installed"
    hv = out(["haproxy", "-vv"]) if shutil.which("haproxy") else ""
    m = re.search(r"Running on OpenSSL version : (.*)", hv)
    info["haproxy_openssl"] = f"running on {m.group(1).strip()}" if m else "OpenSSL unknown"
    if shutil.which("stunnel"):
        sv = out(["stunnel", "-version"])
        first = next((line.strip() for line in sv.splitlines() if line.startswith("stunnel ")), "unknown")
        running = next((line.strip() for line in sv.splitlines() if line.startswith("Running")), "")
        info["stunnel"] = f"{first}" + (f" ({running.lower()})" if running else "")
    else:
        info["stunnel"] = "not installed"
    return info


# -- main ---------------------------------------------------------------------------------------


def make_pki(tmp: Path) -> dict:
    from tests.pki import PKI

    pki_dir = tmp / "pki"
    pki_dir.mkdir()
    pki = PKI(pki_dir, name="wingatemap bench CA")
    cert, key = pki.server()
    client_cert, client_key = pki.client("bench-client")
    combined = pki_dir / "server-combined.pem"
    combined.write_bytes(Path(cert).read_bytes() + Path(key).read_bytes())
    client_combined = pki_dir / "client-combined.pem"
    client_combined.write_bytes(Path(client_cert).read_bytes() + Path(client_key).read_bytes())
    return {"ca": pki.ca, "cert": cert, "key": key, "combined": str(combined), "client_cert": client_cert, "client_key": client_key, "client_combined": str(client_combined)}


def print_summary(raw: dict) -> None:
    results = raw["results"]
    print("\nAbsolute figures:")
    for line in absolute_table(results):
        print(line)
    print("\nRatios:")
    for line in ratio_table(results):
        print(line)
    print("\nwingatemap against stunnel and haproxy:")
    for line in versus_table(results):
        print(line)
    print("\nCPU:")
    for line in cpu_table(results):
        print(line)
    for line in tls_lines(results) + problem_lines(results):
        print(line)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one round, 300 MB bulk, 2 s connection rate")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (configurations, certificates, every log) and print its path")
    parser.add_argument("--out", help="write the Markdown report here (e.g. docs/performance-tls.md)")
    parser.add_argument("--only", action="append", help="measure only the cases whose name contains this (repeatable; direct is always measured)")
    parser.add_argument("--report-from", metavar="JSON", help="measure nothing: rebuild the report from a saved bench/results/tls-*.json")
    args = parser.parse_args()
    if args.report_from:
        raw = json.loads(Path(args.report_from).read_text())
        print_summary(raw)
        if args.out:
            Path(args.out).write_text(markdown(raw))
            print(f"wrote {args.out}")
        return 0

    cfg = QUICK if args.quick else FULL
    t_start = time.monotonic()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) >= 2 and shutil.which("taskset") is not None
    if pinned:
        proxy_cpu, load_cpu = cpus[0], cpus[1]
        os.sched_setaffinity(0, {load_cpu})
    else:
        proxy_cpu = load_cpu = None
        print("warning: fewer than 2 CPUs or no taskset: running unpinned", flush=True)

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)

    have = {"wingatemap": True, "stunnel": shutil.which("stunnel") is not None, "haproxy": shutil.which("haproxy") is not None}
    skipped = []
    if not have["haproxy"]:
        skipped.append("haproxy not installed: every TLS case needs it as the fixed other half of the pair, so only direct and plain wingatemap are measured")
    if not have["stunnel"]:
        skipped.append("stunnel not installed (apt-get install stunnel4): its cases are skipped")
    for s in skipped:
        print(f"skipping: {s}", flush=True)

    info = versions()
    info["load_start"] = os.getloadavg()[0]
    all_cases = cases(have)
    if args.only:
        all_cases = [c for c in all_cases if c["proxy"] is None or any(o in c["name"] for o in args.only)]
    results: list[dict] = []
    failed: list[str] = []
    try:
        tmp = Path(tempfile.mkdtemp(prefix="wingatemap-bench-tls-"))
        try:
            src = tmp / "src"
            info["wingatemap"] = info["wingatemap"][:-1] + f", sources sha256 {base.snapshot_sources(src)})"
            env_wg = dict(os.environ, PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            pki = make_pki(tmp)
            ports = base.free_ports(3 * len(all_cases))
            case_ports = [tuple(ports[3 * i : 3 * i + 3]) for i in range(len(all_cases))]
            backend = base.spawn(
                base._pin(load_cpu) + [sys.executable, str(base.BACKEND), "--max-seconds", "1800"] + [str(p[2]) for p in case_ports],
                stdout=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
            )
            BACKEND_PID.append(backend.pid)
            ready, _, _ = select.select([backend.stdout], [], [], 15.0)
            if not ready or backend.stdout.readline().strip() != b"ready":
                raise RuntimeError("backend did not start")
            combined = {c["name"]: {"name": c["name"], "group": c["group"], "proxy": c["proxy"], "rounds": []} for c in all_cases}
            broken: set[str] = set()
            for rnd in range(1, cfg["rounds"] + 1):
                for case, cports in zip(all_cases, case_ports):
                    if case["name"] in broken:
                        continue
                    print(f"== {case['name']} (round {rnd} of {cfg['rounds']})", flush=True)
                    tag = f"r{rnd}-" + re.sub(r"[^a-z0-9]+", "-", case["name"].lower()).strip("-")
                    started: dict = {}
                    try:
                        start_case(started, case, pki, tmp, env_wg, tag, cports, proxy_cpu, load_cpu)
                        fds_ready = open_fds(started["proxy"].pid) if started["proxy"] is not None else -1
                        r = measure(case, started, cfg, load_cpu, (proxy_cpu, load_cpu))
                        if started["proxy"] is not None:
                            time.sleep(1.0)
                            started["fds"] = (fds_ready, open_fds(started["proxy"].pid))
                        stop_case(started)
                        r["logs"] = scan_logs(started)
                        for p in r["logs"]["problems"]:
                            print(f"  {p['count']} error-like line(s) in the {p['log']} log ({p['unhandled']} Unhandled Error), first: {p['first'][0][:300]}", flush=True)
                            for text, n in p["exceptions"].items():
                                print(f"    {n} x {text[:300]}", flush=True)
                        combined[case["name"]]["rounds"].append(r)
                    except Exception as e:
                        if case["proxy"] is None:
                            raise
                        detail = ""
                        for role, log in started.get("logs", {}).items():
                            detail += f"\n--- {role} log tail:\n{_tail(Path(log), 1500)}"
                        print(f"FAILED {case['name']}: {e}{detail}", flush=True)
                        failed.append(f"{case['name']} in round {rnd} ({str(e).splitlines()[0]})")
                        broken.add(case["name"])
                    finally:
                        if started:
                            stop_case(started)
                    time.sleep(0.5)
            results = [c for c in combined.values() if c["rounds"]]
        finally:
            base.stop_all()
            if args.keep:
                print(f"kept {tmp}", flush=True)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        base.stop_all()
    elapsed = time.monotonic() - t_start
    info["load_end"] = os.getloadavg()[0]
    raw = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "config": cfg,
        "quick": args.quick,
        "versions": info,
        "elapsed_s": elapsed,
        "skipped": skipped,
        "pinned": pinned,
        "failed": failed,
        "results": results,
    }
    print_summary(raw)
    for name in failed:
        print(f"FAILED: {name}")
    print(f"\nwhole run: {elapsed:.0f} s")
    results_dir = BENCH / "results"
    results_dir.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (results_dir / f"tls-{stamp}.json").write_text(json.dumps(raw, indent=2))
    if args.out:
        Path(args.out).write_text(markdown(raw))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        print(f"interrupted ({e or 'Ctrl-C'}); every process this run started has been stopped", file=sys.stderr)
        sys.exit(130)
