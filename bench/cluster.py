#!/usr/bin/env python3
"""
What a cluster costs (issue 13): new connections per second through 1, 2 and 4 gateway
processes with `limits_scope = "cluster"` and an events stream, against the same gateways
without `[cluster]`, in one run; Redis operations per connection (INFO commandstats delta), and
the cluster's overhead in CPU microseconds per connection (gateways and Redis).

    python3 bench/cluster.py [--quick] [--duration S] [--max-connections N] [--json FILE]

Each case starts a fresh redis-server (no persistence, loopback), N gateways under twistd from
this checkout (one mapping each, relaying to bench/backend.py's connection-test mode), and one
`loadgen.py connrate` per gateway (4 connections at a time: connect, one byte, echo, close) for
a fixed time, bounded in count.  Every client is 127.0.0.1, so with `limits_scope = "cluster"`
every connection runs the limit script against one client's set (max_connections_per_client
is set high enough never to refuse).  CPU is read from /proc (utime + stime of each gateway;
Redis's own used_cpu_*), so the per-connection figures do not depend on how busy the machine
is; the rates do, so compare the cases of one run with each other.  Nothing is pinned: a
2-core machine runs N gateways, N load generators and Redis on the same two cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

from rules import free_port, wait_line  # noqa: E402  (bench scripts share helpers by path)

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
TICKS = os.sysconf("SC_CLK_TCK")
START_TIMEOUT = 120.0


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU seconds of process C{pid} so far.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def redis_info(port: int, section: str) -> dict[str, str]:
    """
    One INFO section of the bench's Redis as a dict.
    """
    out = subprocess.run(["redis-cli", "-p", str(port), "INFO", section], capture_output=True, text=True, timeout=30).stdout
    return dict(line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith("#"))


def redis_calls(port: int) -> dict[str, int]:
    """
    Calls per command so far (INFO commandstats).
    """
    calls = {}
    for key, value in redis_info(port, "commandstats").items():
        stats = dict(part.split("=", 1) for part in value.split(","))
        calls[key.removeprefix("cmdstat_")] = int(stats["calls"])
    return calls


def redis_cpu(port: int) -> float:
    """
    Redis's own CPU seconds so far.
    """
    info = redis_info(port, "cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def stream_length(port: int) -> int:
    """
    How many events the stream holds.
    """
    out = subprocess.run(["redis-cli", "-p", str(port), "XLEN", "wingatemap:events"], capture_output=True, text=True, timeout=30).stdout.strip()
    return int(out or 0)


def wait_file(path: Path, needles: list[str], proc: subprocess.Popen, timeout: float) -> None:
    """
    Wait until the log file C{path} holds every one of C{needles} (bounded; the gateway logs to
    a file, polled every 50 ms).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if all(n in text for n in needles):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"gateway did not start ({needles}): {(path.read_text() if path.exists() else '')[-2000:]}")


def gateway_config(port: int, dest: int, node: str, redis_port: int | None) -> str:
    """
    One gateway: a mapping to the backend; with C{redis_port}, a cluster node with a cluster-wide
    per-client limit and an events stream.
    """
    text = f'[mappings.bench]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {dest} }}\n'
    if redis_port is None:
        return text
    return (
        f'[cluster]\nredis = "redis://127.0.0.1:{redis_port}/0"\nnode = "{node}"\nevents_stream = "wingatemap:events"\n'
        f"events_maxlen = 100000\n" + text + 'max_connections_per_client = 1000000\nlimits_scope = "cluster"\n'
    )


def run_case(gateways: int, cluster: bool, duration: float, maxconn: int, tmp: Path) -> dict:
    """
    One case: N gateways, with or without the cluster; the summed rate and the costs.
    """
    processes: list[subprocess.Popen] = []
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp), "--logfile", ""],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    processes.append(redis)
    try:
        wait_line(redis, "Ready to accept connections", 30)
        dests = [free_port() for _ in range(gateways)]
        backend = subprocess.Popen([sys.executable, str(BENCH / "backend.py"), "--max-seconds", str(int(duration) + 300), *map(str, dests)], stdout=subprocess.PIPE)
        processes.append(backend)
        wait_line(backend, "ready", 30)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        gws = []
        for i in range(gateways):
            port, node = free_port(), f"gw-{i + 1}"
            config = tmp / f"{node}-{int(cluster)}.toml"
            config.write_text(gateway_config(port, dests[i], node, redis_port if cluster else None))
            log = tmp / f"{node}-{int(cluster)}.log"
            proc = subprocess.Popen(TWISTD + ["-n", "--pidfile=", f"--logfile={log}", "wingatemap", "run", "--config", str(config)], env=env)
            processes.append(proc)
            gws.append((proc, port, log, node))
        for proc, port, log, node in gws:
            needles = ["mapping bench: listening on"] + ([f"cluster node {node}: link to the shared store is up"] if cluster else [])
            wait_file(log, needles, proc, START_TIMEOUT)
        calls0, rcpu0 = redis_calls(redis_port), redis_cpu(redis_port)
        cpu0 = [cpu_seconds(p.pid) for p, *_ in gws]
        loads = [
            subprocess.Popen([sys.executable, str(BENCH / "loadgen.py"), "connrate", str(port), "4", str(duration), str(maxconn // gateways)], stdout=subprocess.PIPE, text=True)
            for _, port, _, _ in gws
        ]
        processes.extend(loads)
        results = [json.loads(load.communicate(timeout=duration + 120)[0].strip().splitlines()[-1]) for load in loads]
        if cluster:
            # Let the events of the last connections reach the stream before counting.
            deadline = time.monotonic() + 30
            done = sum(r["connections"] for r in results)
            while time.monotonic() < deadline and stream_length(redis_port) < 2 * done:
                time.sleep(0.05)
        cpu = sum(cpu_seconds(p.pid) - c for (p, *_), c in zip(gws, cpu0))
        calls1, rcpu = redis_calls(redis_port), redis_cpu(redis_port) - rcpu0
        connections = sum(r["connections"] for r in results)
        ops = {k: v - calls0.get(k, 0) for k, v in calls1.items() if v - calls0.get(k, 0) > 0}
        ops.pop("info", None)
        return {
            "gateways": gateways,
            "cluster": cluster,
            "connections": connections,
            "errors": sum(r["errors"] for r in results),
            "rate": round(sum(r["rate"] for r in results)),
            "p50_us": round(sum(r["p50_us"] for r in results) / len(results)),
            "gateway_cpu_us_per_conn": round(1e6 * cpu / max(1, connections), 1),
            "redis_cpu_us_per_conn": round(1e6 * rcpu / max(1, connections), 1),
            "redis_ops_per_conn": round(sum(ops.values()) / max(1, connections), 2),
            "redis_ops": ops,
        }
    finally:
        for p in reversed(processes):
            if p.poll() is None:
                p.terminate()
        for p in processes:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> int:
    """
    Run every case and print a table (and, with --json, the raw figures).
    """
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 s per case")
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--max-connections", type=int, default=200_000)
    parser.add_argument("--json")
    args = parser.parse_args()
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        print("redis-server and redis-cli are needed (Debian package redis-server)", file=sys.stderr)
        return 2
    duration = 2.0 if args.quick else args.duration
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for gateways in (1, 2, 4):
            for cluster in (False, True):
                row = run_case(gateways, cluster, duration, args.max_connections, Path(tmp))
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    print("| gateways | cluster | conn/s | p50 µs | errors | gateway CPU µs/conn | Redis CPU µs/conn | Redis ops/conn |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['gateways']} | {'yes' if row['cluster'] else 'no'} | {row['rate']} | {row['p50_us']} | {row['errors']} | {row['gateway_cpu_us_per_conn']} | {row['redis_cpu_us_per_conn']} | {row['redis_ops_per_conn']} |")
    print()
    for gateways in (1, 2, 4):
        plain, clustered = [r for r in rows if r["gateways"] == gateways]
        print(f"{gateways} gateway(s): cluster overhead {clustered['gateway_cpu_us_per_conn'] - plain['gateway_cpu_us_per_conn']:+.1f} µs CPU per connection in the gateways, "
              f"+{clustered['redis_cpu_us_per_conn']:.1f} µs in Redis; Redis commands per connection: {clustered['redis_ops']} / {clustered['connections']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
