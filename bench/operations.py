#!/usr/bin/env python3
"""
New-connection rate with 1 and 2 worker processes, and with a ClientConnect `run` handler
versus none (issue: operations).

    python3 bench/operations.py [--quick] [--out docs/performance-operations.md]

Each case starts wingatemap under twistd from this checkout, relays to the echo backend of
bench/backend.py, and drives it with `loadgen.py connrate` (4 connections at a time, connect /
one byte / echo / close) for a fixed time, bounded in count.  All traffic stays on 127.0.0.1.

Pinning differs from bench/run.py on purpose: with 2 workers the proxy must be allowed both
cores, so here nothing is pinned and every case shares the machine with the load generator the
same way.  Compare the cases with each other, not with bench/run.py's figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proxy: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or proxy.poll() is not None:
                raise RuntimeError("wingatemap did not start")
            time.sleep(0.05)


def case(name: str, extra: str, dest: int, tmp: Path, duration: float, maxconn: int, wait_workers: int) -> dict:
    port = free_port()
    config = tmp / f"{name.replace(' ', '_')}.toml"
    config.write_text(f'{extra}\n[mappings.m]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {dest} }}\n')
    log = tmp / f"{name.replace(' ', '_')}.log"
    proxy = subprocess.Popen(
        [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", f"--logfile={log}", "wingatemap", "run", "--config", str(config)],
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        start_new_session=True,
    )
    try:
        wait_port(port, proxy)
        deadline = time.monotonic() + 60
        while wait_workers and log.read_text().count("Site starting on") < wait_workers + 1 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling a log file the proxy writes; bounded by the deadline
        subprocess.run([sys.executable, str(BENCH / "loadgen.py"), "connrate", str(port), "4", "1", "500"], capture_output=True, timeout=120)
        out = subprocess.run(
            [sys.executable, str(BENCH / "loadgen.py"), "connrate", str(port), "4", str(duration), str(maxconn)],
            capture_output=True,
            text=True,
            timeout=duration + 120,
        )
        result = json.loads(out.stdout.strip().splitlines()[-1])
        return {"rate": result["rate"], "errors": result["errors"]}
    finally:
        os.killpg(proxy.pid, 15)
        try:
            proxy.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proxy.pid, 9)
            proxy.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    duration = 2.0 if args.quick else 4.0
    rounds = 1 if args.quick else 3
    dest = free_port()
    backend = subprocess.Popen([sys.executable, str(BENCH / "backend.py"), "--max-seconds", "900", str(dest)], stdout=subprocess.PIPE)
    cases = [
        ("1 worker", "", 0),
        ("2 workers", "[service]\nworkers = 2\n", 1),
        ("1 worker + run handler", '[[events.ClientConnect]]\nrun = ["/bin/true"]\n', 0),
    ]
    results: dict[str, list[float]] = {name: [] for name, _, _ in cases}
    try:
        assert backend.stdout is not None and backend.stdout.readline().strip() == b"ready"
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(rounds):
                for name, extra, workers in cases:
                    r = case(name, extra, dest, Path(tmp), duration, 50_000, workers)
                    results[name].append(r["rate"])
                    print(f"{name}: {r['rate']:.0f} conn/s ({r['errors']} errors)", flush=True)
    finally:
        backend.terminate()
        backend.wait()
    medians = {name: statistics.median(v) for name, v in results.items()}
    base = medians["1 worker"]
    print(json.dumps(medians))
    if args.out:
        lines = [
            "# Operations performance: workers and event handlers",
            "",
            f"Measured {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC with `python3 bench/operations.py{' --quick' if args.quick else ''}` "
            f"on {os.cpu_count()} CPUs; median of {rounds} round(s) of {duration:g} s each. New connections per second "
            "(connect, one byte echoed, close; 4 at a time), nothing pinned (see the script's docstring).",
            "",
            "| case | conn/s | ratio to 1 worker |",
            "|---|---:|---:|",
        ]
        for name, _, _ in cases:
            lines.append(f"| {name} | {medians[name]:,.0f} | {medians[name] / base:.2f} |")
        lines += [
            "",
            "The second worker runs on the second core, which the load generator and the backend also use on this "
            "2-core machine, so the gain from workers here is a floor. A `run` handler forks and waits for a program "
            "for every connection before it is relayed: budget for that process start-up in the connection rate.",
            "",
        ]
        Path(args.out).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
