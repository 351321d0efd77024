#!/usr/bin/env python3
"""
Routing benchmark: new connections per second through wingatemap with C{peek_sni} and with
C{balance = "least-connections"}, against the plain mapping, in one run on 127.0.0.1.

    python3 bench/routing.py [--quick]

Three mappings of one gateway process (pinned to CPU 0), each to bench/backend.py echo ports
(CPU 1):

  plain              default = one destination (today's relay; the reference)
  peek_sni           peek_sni = true, a rule sni = ["bench.example"] to the same destination: the
                     relay reads the ClientHello, matches the rule and relays the hello untouched
  least-connections  balance = "least-connections" over three destinations

Every connection of the load generator (this script in its C{_load} mode, CPU 1) sends one real
TLS ClientHello (Python's ssl, server name bench.example, about 500 bytes), reads its echo back,
and closes: so each connection is peeked, decided, connected, relayed both ways and ended.
The cases are measured in turn for several rounds; each figure is the median over the rounds,
and the ratios to the plain mapping are what docs/routing.md quotes.  Results are printed and
saved as JSON under bench/results/.  Every child is stopped at the end (bench/run.py's helpers).
"""

from __future__ import annotations

import argparse
import datetime
import errno
import json
import os
import select
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))

import run as base  # noqa: E402  bench/run.py: spawn, stop_all, free_ports, _pin

HOST = base.HOST
CASES = ("plain", "peek_sni", "least-connections")
NAME = "bench.example"


def client_hello(server_name: str) -> bytes:
    """
    The first bytes Python's ssl module sends as a client asking for C{server_name}.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        client.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def load(port: int, payload: bytes, concurrency: int, duration: float, maxconn: int) -> dict:
    """
    CONCURRENCY slots, each in a loop: connect, send C{payload}, read it back, close.  Bounded
    in count (C{maxconn}) and time.
    """
    ep = select.epoll()
    state: dict[int, list] = {}  # fd -> [socket, phase, bytes still to read]
    done = errors = started = 0
    t0 = time.perf_counter()
    end = t0 + duration

    def start_one() -> None:
        nonlocal started, errors
        s = socket.socket()
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if s.connect_ex((HOST, port)) not in (0, errno.EINPROGRESS):
            errors += 1
            s.close()
            return
        started += 1
        state[s.fileno()] = [s, "connecting", len(payload)]
        ep.register(s.fileno(), select.EPOLLOUT)

    def finish(fd: int, ok: bool) -> None:
        nonlocal done, errors
        s = state.pop(fd)[0]
        ep.unregister(fd)
        s.close()
        if ok:
            done += 1
        else:
            errors += 1
        if time.perf_counter() < end and started < maxconn and errors < 1000:
            start_one()

    for _ in range(concurrency):
        start_one()
    polls = 0
    while state and time.perf_counter() < end + 10 and polls < 100 * maxconn + 1000:
        polls += 1
        for fd, _ in ep.poll(0.5):
            if fd not in state:
                continue
            entry = state[fd]
            s = entry[0]
            if entry[1] == "connecting":
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                    finish(fd, False)
                    continue
                try:
                    s.send(payload)
                except OSError:
                    finish(fd, False)
                    continue
                entry[1] = "reading"
                ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                finish(fd, False)
                continue
            if not data:
                finish(fd, False)
                continue
            entry[2] -= len(data)
            if entry[2] <= 0:
                finish(fd, True)
    elapsed = time.perf_counter() - t0
    return {"connections": done, "errors": errors, "seconds": elapsed, "rate": done / elapsed if elapsed else 0.0}


def gateway_config(ports: dict[str, int], backends: list[int]) -> str:
    """
    The gateway's three mappings.
    """
    first = f'"{HOST}:{backends[0]}"'
    listed = ", ".join(f'"{HOST}:{p}"' for p in backends)
    return (
        '[service]\nlog_level = "warn"\n'
        f'[mappings.plain]\nport = {ports["plain"]}\nbind = "{HOST}"\ndefault = {first}\n'
        f'[mappings.peek]\nport = {ports["peek_sni"]}\nbind = "{HOST}"\npeek_sni = true\n'
        f'[[mappings.peek.rules]]\nsni = ["{NAME}"]\nto = {first}\n'
        f'[mappings.lc]\nport = {ports["least-connections"]}\nbind = "{HOST}"\nbalance = "least-connections"\ndefault = [{listed}]\n'
    )


def wait_listening(port: int, timeout: float = 30.0) -> None:
    """
    Wait until something accepts on C{port}.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            select.select([], [], [], 0.05)


def run_load(port: int, cfg: dict) -> dict:
    """
    One measurement, in a load-generator process pinned to CPU 1.
    """
    argv = base._pin(1) + [sys.executable, __file__, "_load", str(port), str(cfg["concurrency"]), str(cfg["duration"]), str(cfg["maxconn"])]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=cfg["duration"] + 60, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test of the script, not figures to quote)")
    args = parser.parse_args()
    cfg = {"rounds": 2, "duration": 2.0, "concurrency": 16, "maxconn": 200_000} if args.quick else {"rounds": 5, "duration": 8.0, "concurrency": 32, "maxconn": 2_000_000}
    tmp = Path(tempfile.mkdtemp(prefix="wingatemap-bench-routing-"))
    results: dict[str, list[dict]] = {case: [] for case in CASES}
    try:
        backends = base.free_ports(3)
        backend = base.spawn(base._pin(1) + [sys.executable, str(base.BACKEND)] + [str(p) for p in backends], stdout=subprocess.PIPE)
        for p in backends:
            wait_listening(p)
        ports = dict(zip(CASES, base.free_ports(3, set(backends))))
        config = tmp / "wingatemap.toml"
        config.write_text(gateway_config(ports, backends))
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        log = open(tmp / "gateway.log", "wb")
        base.spawn(base._pin(0) + [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "wingatemap", "run", "--config", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
        for p in ports.values():
            wait_listening(p)
        for _ in range(cfg["rounds"]):
            for case in CASES:
                result = run_load(ports[case], cfg)
                results[case].append(result)
                print(f"{case:18} {result['rate']:9.0f} connections/s ({result['connections']} in {result['seconds']:.1f}s, {result['errors']} errors)", flush=True)
    finally:
        base.stop_all()
    medians = {case: statistics.median(r["rate"] for r in results[case]) for case in CASES}
    print("\nmedian new connections per second, and the ratio to the plain mapping:")
    for case in CASES:
        print(f"  {case:18} {medians[case]:9.0f}   {medians[case] / medians['plain']:.2f}")
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"routing-{stamp}.json").write_text(json.dumps({"config": cfg, "results": results, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_load":
        port, concurrency, duration, maxconn = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(load(port, client_hello(NAME), concurrency, duration, maxconn)))
        sys.exit(0)
    sys.exit(main())
