#!/usr/bin/env python3
"""
Rule lookup cost with many users and rules (issue: specific mappings).

    python3 bench/rules.py [--quick] [--out docs/performance-rules.md]

1. In process: decisions per second of a mapping with 10,000 users (single addresses, CIDR
   blocks, ranges and wildcards) and 1,000 rules (200 of them location rules every client must
   be checked against), compared with a rule-less mapping, for clients that match an early
   user, a late user, and nobody.
2. Over loopback: new connections per second through wingatemap with that 1,000-rule mapping
   versus a rule-less one (same load generator and backend as bench/run.py; the proxy pinned to
   CPU 0, the load to CPU 1).

All traffic stays on 127.0.0.1; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import datetime
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
sys.path.insert(0, str(ROOT))

from wingate_map.config import parse_config  # noqa: E402
from wingate_map.policy import AssumedIdentitySource, IdentityResolver  # noqa: E402
from wingate_map.values import ClientInfo  # noqa: E402
from wingate_map.policy import MappingRuleService  # noqa: E402

USERS = 10_000
RULES = 1_000
LOCATION_RULES = 200


def user_location(i: int) -> str:
    a, b = divmod(i, 250)
    kind = i % 4
    if kind == 0:
        return f"10.{a}.{b}.1"
    if kind == 1:
        return f"10.{a}.{b}.16/28"
    if kind == 2:
        return f"10.{a}.{b}.100-10.{a}.{b}.120"
    return f"10.{a}.{b}.*"


def big_config(port: int, dest: int, bind: str = "127.0.0.1") -> str:
    """
    10,000 users and 1,000 rules; user u9999 (the last) is 127.0.0.1, and the rule sending it
    to the backend is the last rule.
    """
    lines = []
    for i in range(USERS):
        location = "127.0.0.1" if i == USERS - 1 else user_location(i)
        lines.append(f'[users.u{i}]\nlocations = ["{location}"]\ngroups = ["g{i % 100}"]')
    lines.append(f'[mappings.big]\nport = {port}\nbind = "{bind}"\ndefault = {{ host = "127.0.0.1", port = 9 }}')
    for j in range(RULES - 1):
        if j < LOCATION_RULES:
            rule = f'from = ["172.{16 + j // 250}.{j % 250}.0/24"]'
        elif j % 2:
            rule = f'user = "u{j * 7 % (USERS - 1)}"'
        else:
            rule = f'group = "g{j % 100}"\nfrom = ["10.{j % 40}.0.0/16"]'
        lines.append(f"[[mappings.big.rules]]\n{rule}\nto = {{ host = \"127.0.0.1\", port = 9 }}")
    lines.append(f'[[mappings.big.rules]]\nuser = "u{USERS - 1}"\nto = {{ host = "127.0.0.1", port = {dest} }}')
    return "\n".join(lines) + "\n"


def small_config(port: int, dest: int, bind: str = "127.0.0.1") -> str:
    return f'[mappings.small]\nport = {port}\nbind = "{bind}"\ndefault = {{ host = "127.0.0.1", port = {dest} }}\n'


def lookups(text: str, name: str, ips: list[str], seconds: float, max_calls: int) -> dict:
    t0 = time.perf_counter()
    config = parse_config(text)
    parsed = time.perf_counter() - t0
    t0 = time.perf_counter()
    service = MappingRuleService(config.mapping(name), IdentityResolver.of([AssumedIdentitySource(config.users)]))
    built = time.perf_counter() - t0
    out = {"parse_s": round(parsed, 3), "build_s": round(built, 3)}
    for label, ip in ips:
        client = ClientInfo(name, ip, 1, "127.0.0.1", 1)
        service.decide(client)  # the first call fills the per-identity cache
        calls = 0
        deadline = time.perf_counter() + seconds
        start = time.perf_counter()
        while calls < max_calls and time.perf_counter() < deadline:
            for _ in range(100):
                service.decide(client)
            calls += 100
        out[label] = round(calls / (time.perf_counter() - start))
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) >= 2 else []


def wait_line(proc: subprocess.Popen, needle: str, timeout: float) -> None:
    import select

    deadline = time.monotonic() + timeout
    buffer = b""
    fd = proc.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buffer += chunk
        if needle.encode() in buffer:
            return
    raise RuntimeError(f"no {needle!r} from {proc.args}: {buffer[-2000:]!r}")


def connection_rate(config_text: str, duration: float, maxconn: int, tmp: Path) -> dict:
    dest = free_port()
    backend = subprocess.Popen(pin(1) + [sys.executable, str(BENCH / "backend.py"), "--max-seconds", "600", str(dest)], stdout=subprocess.PIPE)
    port = free_port()
    path = tmp / f"rules-{port}.toml"
    path.write_text(config_text(port, dest))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proxy = subprocess.Popen(
        pin(0) + [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "--logfile=/dev/null", "wingatemap", "run", "--config", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        wait_line(backend, "ready", 30)
        # Logging goes to /dev/null, so wait for the port itself.
        import socket

        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proxy.poll() is not None:
                    raise RuntimeError(f"wingatemap did not start: {proxy.stdout.read()[-2000:]!r}")
                time.sleep(0.05)
        out = subprocess.run(
            pin(1) + [sys.executable, str(BENCH / "loadgen.py"), "connrate", str(port), "4", str(duration), str(maxconn)],
            capture_output=True,
            text=True,
            timeout=duration + 120,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        for p in (proxy, backend):
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else 2.0
    duration = 2.0 if args.quick else 5.0
    ips = [("early_user", "10.0.0.1"), ("late_user", "127.0.0.1"), ("nobody", "192.0.2.77")]
    big = lookups(big_config(1, 2), "big", ips, seconds, 2_000_000)
    small = lookups(small_config(1, 2), "small", ips, seconds, 2_000_000)
    print("decisions/s, 10,000 users + 1,000 rules:", big)
    print("decisions/s, rule-less:", small)
    with tempfile.TemporaryDirectory() as tmp:
        rate_big = connection_rate(big_config, duration, 25_000, Path(tmp))
        rate_small = connection_rate(small_config, duration, 25_000, Path(tmp))
    print("conn/s 1,000 rules:", rate_big)
    print("conn/s rule-less:", rate_small)
    if args.out:
        key = next(k for k in ("conn_per_s", "rate", "connections_per_s") if k in rate_big)
        ratio = rate_big[key] / rate_small[key]
        lines = [
            "# Rule lookup performance",
            "",
            f"Measured {datetime.date.today().isoformat()} with `python3 bench/rules.py{' --quick' if args.quick else ''}` on this machine ({os.cpu_count()} CPUs).",
            "",
            f"A mapping with {USERS:,} users (one location each: single addresses, /28 blocks, ranges and wildcards) and {RULES:,} rules ({LOCATION_RULES} `from` rules every client is checked against, the rest `user` or `group`+`from` rules), against a rule-less mapping.",
            "",
            "## Decisions per second (in process, one core)",
            "",
            "| client | 1,000 rules | rule-less | ratio |",
            "|---|---|---|---|",
        ]
        for label, _ in ips:
            lines.append(f"| {label.replace('_', ' ')} | {big[label]:,} | {small[label]:,} | {big[label] / small[label]:.2f} |")
        lines += [
            "",
            f"Loading the 1,000-rule file takes {big['parse_s']} s and building its indexes {big['build_s']} s, once at start.",
            "",
            "## New connections per second through wingatemap",
            "",
            "| mapping | conn/s | ratio to rule-less |",
            "|---|---|---|",
            f"| 1,000 rules, 10,000 users (client is the last user, matched by the last rule) | {rate_big[key]:,.0f} | {ratio:.2f} |",
            f"| rule-less | {rate_small[key]:,.0f} | 1.00 |",
            "",
        ]
        Path(args.out).write_text("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
