#!/usr/bin/env python3
"""
CPU per new connection in the gateway, and where it goes (issue 11 item 3).

    python3 bench/connprofile.py [--connections N] [--rounds R] [--no-haproxy] [--profile]

wingatemap runs under twistd (``wingatemap run --config``) with what a real deployment has on:
the ClientConnect / ClientDisconnect log lines at ``log_level = "info"`` (written to a file),
the audit log, the metrics, and a mapping with users and rules (the client matches the last
rule).  It is pinned to one CPU; the backend (bench/backend.py) and the load generator
(bench/loadgen.py ``connrate``: connect, one byte each way, the backend closes first) to the
other.  Each round opens and closes N connections through wingatemap and then through
haproxy (one thread, same backend); the figure is the gateway's CPU time over the round
(utime + stime from ``/proc/PID/stat``) divided by the connections done, in µs per connection,
and the median over rounds is reported with its ratio to haproxy's.

With ``--profile`` one more gateway runs under cProfile (twistd ``--profiler=cprofile``) for N
connections and the top entries by own time and by cumulative time are printed.  (cProfile
inflates every call; the µs figures come only from the unprofiled rounds.)

All traffic stays on 127.0.0.1; every loop is bounded in count and time; every child is
killed at the end, also on error.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pstats
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from run import BACKEND, HOST, _haproxy, _pin, _twistd, free_ports, run_load, snapshot_sources, spawn, start_proxy, stop, stop_all  # noqa: E402

CONCURRENCY = 4
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """
    The CPU time (user + system) process C{pid} has used so far, in seconds.
    """
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    fields = stat[stat.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def gateway_config(tmp: Path, port: int, dest: int, log_level: str = "info", audit: bool = True) -> Path:
    """
    A configuration with the log, the audit log and rules on: ten users, the client
    (127.0.0.1) the last of them, and a rule for it after nine that do not match.  (C{log_level}
    "warn" or C{audit} False turn the event lines off, to see what they cost.)
    """
    users = "".join(f'[users.u{i}]\nlocations = ["10.9.{i}.0/24"]\n' for i in range(9))
    users += '[users.bench]\nlocations = ["127.0.0.1"]\n'
    rules = "".join(f'[[mappings.bench.rules]]\nuser = "u{i}"\nto = {{ host = "10.9.{i}.1", port = 9 }}\n' for i in range(9))
    rules += f'[[mappings.bench.rules]]\nuser = "bench"\nto = {{ host = "{HOST}", port = {dest} }}\n'
    path = tmp / "gateway.toml"
    path.write_text(
        f"""[service]
{f'audit_log = "{tmp / "events.jsonl"}"' if audit else ""}
log_level = "{log_level}"

{users}
[mappings.bench]
port = {port}
bind = "{HOST}"
default = {{ host = "{HOST}", port = {dest} }}

{rules}"""
    )
    return path


def gateway_spec(config: Path, env: dict[str, str], extra: list[str] = (), ready: str | None = "listening on") -> dict:
    """
    How bench/run.py's start_proxy starts the gateway under twistd (C{ready}: its log line
    saying it listens, None when the log level hides it).
    """
    return {
        "name": "wingatemap",
        "argv": lambda port, dest: _twistd(list(extra) + ["wingatemap", "run", "--config", str(config)]),
        "env": env,
        "ready": ready,
        "cwd": str(config.parent),
    }


def one_round(proxy: subprocess.Popen, port: int, load_cpu: int | None, connections: int) -> dict:
    """
    N connections through C{proxy}; its CPU time per connection.
    """
    before = cpu_seconds(proxy.pid)
    result = run_load(load_cpu, ["connrate", port, CONCURRENCY, 600, connections], 660)
    used = cpu_seconds(proxy.pid) - before
    done = max(1, result["connections"])
    return {"connections": result["connections"], "errors": result["errors"], "cpu_s": used, "us_per_conn": used / done * 1e6, "rate": result["rate"]}


def top(stats_path: Path, key: str, count: int) -> str:
    """
    The top C{count} entries of a saved cProfile by C{key} ("tottime" or "cumulative").
    """
    out = io.StringIO()
    stats = pstats.Stats(str(stats_path), stream=out)
    stats.strip_dirs().sort_stats(key).print_stats(count)
    text = out.getvalue()
    return text[text.find("   ncalls") :] if "   ncalls" in text else text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=10_000, help="connections per round (default 10000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (default 5); the median is reported")
    parser.add_argument("--no-haproxy", action="store_true", help="measure wingatemap only")
    parser.add_argument("--profile", action="store_true", help="also run one gateway under cProfile and print its top entries")
    parser.add_argument("--top", type=int, default=25, help="profile entries to print (default 25)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warn", "error"), help="the gateway's log_level (default info: event lines written)")
    parser.add_argument("--no-audit", action="store_true", help="no audit log")
    parser.add_argument("--save-profile", help="keep the cProfile statistics here (for pstats)")
    parser.add_argument("--json", help="write the figures here as JSON")
    args = parser.parse_args()
    connections = max(100, min(args.connections, 200_000))
    rounds = max(1, min(args.rounds, 20))

    cpus = sorted(os.sched_getaffinity(0))
    pinned = len(cpus) >= 2 and shutil.which("taskset") is not None
    proxy_cpu, load_cpu = (cpus[0], cpus[1]) if pinned else (None, None)
    if pinned:
        os.sched_setaffinity(0, {load_cpu})
    report: dict[str, Any] = {"connections": connections, "concurrency": CONCURRENCY, "pinned": pinned, "load_start": os.getloadavg()[0], "rounds": []}
    try:
        with tempfile.TemporaryDirectory(prefix="wingatemap-connprofile-") as tmpname:
            tmp = Path(tmpname)
            src = tmp / "src"
            report["sources"] = snapshot_sources(src)
            env = dict(os.environ, PYTHONPATH=str(src) + os.pathsep + os.environ.get("PYTHONPATH", ""))
            gw_port, hp_port, gw_dest, hp_dest = free_ports(4)
            backend = spawn(_pin(load_cpu) + [sys.executable, str(BACKEND), "--max-seconds", "3600", str(gw_dest), str(hp_dest)], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
            ready, _, _ = select.select([backend.stdout], [], [], 15.0)
            if not ready or backend.stdout.readline().strip() != b"ready":
                raise RuntimeError("backend did not start")
            config = gateway_config(tmp, gw_port, gw_dest, args.log_level, not args.no_audit)
            ready = "listening on" if args.log_level in ("debug", "info") else None
            specs = [(gateway_spec(config, env, ready=ready), gw_port, gw_dest)]
            if not args.no_haproxy and shutil.which("haproxy"):
                specs.append(({"name": "haproxy", "argv": lambda port, dest: _haproxy(tmp, port, dest)}, hp_port, hp_dest))
            for rnd in range(1, rounds + 1):
                figures = {}
                for spec, port, dest in specs:
                    proxy = start_proxy(spec, proxy_cpu, port, dest, tmp)
                    try:
                        figures[spec["name"]] = one_round(proxy, port, load_cpu, connections)
                    finally:
                        stop(proxy)
                    time.sleep(0.5)
                report["rounds"].append(figures)
                print(f"round {rnd}: " + ", ".join(f"{name} {f['us_per_conn']:.0f} µs/conn ({f['connections']} conns, {f['errors']} errors, {f['rate']:.0f}/s)" for name, f in figures.items()), flush=True)
            if args.profile:
                stats_path = tmp / "gateway.prof"
                spec = gateway_spec(config, env, ["--profile", str(stats_path), "--profiler", "cprofile", "--savestats"], ready)
                proxy = start_proxy(spec, proxy_cpu, gw_port, gw_dest, tmp)
                try:
                    run_load(load_cpu, ["connrate", gw_port, CONCURRENCY, 600, connections], 660)
                finally:
                    stop(proxy, grace=30.0)
                if stats_path.exists() and args.save_profile:
                    shutil.copy(stats_path, args.save_profile)
                if stats_path.exists():
                    report["profile_tottime"] = top(stats_path, "tottime", args.top)
                    report["profile_cumulative"] = top(stats_path, "cumulative", args.top)
                else:
                    print("no profile was saved", flush=True)
    finally:
        stop_all()
    report["load_end"] = os.getloadavg()[0]
    summary = {}
    for name in report["rounds"][0] if report["rounds"] else ():
        summary[name] = statistics.median(r[name]["us_per_conn"] for r in report["rounds"])
    report["median_us_per_conn"] = summary
    print(f"median µs/conn over {rounds} rounds of {connections}: " + ", ".join(f"{n} {v:.1f}" for n, v in summary.items()))
    if "haproxy" in summary and "wingatemap" in summary:
        print(f"wingatemap / haproxy: {summary['wingatemap'] / summary['haproxy']:.2f}")
    for key in ("profile_tottime", "profile_cumulative"):
        if key in report:
            print(f"\n== top by {key.split('_')[1]}\n{report[key]}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
