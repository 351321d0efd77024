#!/usr/bin/env python3
"""
Memory per idle plain-TCP session, measured inside the process that relays them.

    python3 bench/idlemem.py [-n 2000] [--top 15]

A wingatemap service (one plain mapping on 127.0.0.1, socket pump on, no log, events to a sink
that keeps nothing) runs in this process; a helper child process (this file with C{--peer}) is
both the destination server and the clients, so none of their objects count here.  After a
warm-up (100 sessions opened and closed), N sessions are opened and held idle until every one
is wired (its pump started); then:

  - tracemalloc: the difference between a snapshot before and after, per session, and the
    biggest differences by traceback (run with tracing on);
  - RSS and USS (C{/proc/self/status} VmRSS, C{smaps_rollup} Private_*) before and after, per
    session (a separate run without tracing, whose own bookkeeping would count);
  - what one relay, its pump and its session reach that nothing else does (gc.get_referents,
    with sys.getsizeof of each object).

Run without C{--mode} it runs itself twice (C{--mode trace}, C{--mode rss}) and prints both.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import subprocess
import sys
import threading
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 100


def _peer() -> None:
    """
    The helper: a destination server that accepts and keeps its sockets, and clients opened on
    command (C{open PORT N}: answers C{opened} once the destination has N more connections;
    C{close}: closes everything, answers C{closed}).
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4096)
    accepted: list[socket.socket] = []
    clients: list[socket.socket] = []
    cond = threading.Condition()

    def accept() -> None:
        while True:
            s, _ = server.accept()
            with cond:
                accepted.append(s)
                cond.notify_all()

    threading.Thread(target=accept, daemon=True).start()
    print(server.getsockname()[1], flush=True)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "open":
            port, n = int(words[1]), int(words[2])
            with cond:
                target = len(accepted) + n
            for _ in range(n):
                c = socket.create_connection(("127.0.0.1", port))
                clients.append(c)
            with cond:
                ok = cond.wait_for(lambda: len(accepted) >= target, timeout=120)
            print("opened" if ok else "timeout", flush=True)
        elif words[0] == "close":
            with cond:
                for s in clients + accepted:
                    s.close()
                clients.clear()
                accepted.clear()
            print("closed", flush=True)


def _memory_kb() -> tuple[int, int]:
    """
    (RSS, USS) of this process in KB.
    """
    rss = uss = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith(("Private_Clean:", "Private_Dirty:")):
                uss += int(line.split()[1])
    return rss, uss


def _null_sink() -> Any:
    """
    An event sink that allows every session and keeps nothing.
    """
    from zope.interface import implementer

    from wingate_map.interfaces import IEventSink

    @implementer(IEventSink)
    class NullSink:
        """
        Allows every session, keeps nothing.
        """

        def client_connect(self, event: dict[str, Any]) -> bool:
            """
            Allow.
            """
            return True

        def client_disconnect(self, event: dict[str, Any]) -> None:
            """
            Forget.
            """

    return NullSink()



def _own_size(obj: Any, shared: set[int]) -> tuple[int, list[tuple[str, int]]]:
    """
    The bytes C{obj} and what it alone reaches (depth-first through gc.get_referents, not into
    objects in C{shared}: modules, classes, functions, the runtime...), with a line per object.
    """
    seen: set[int] = set()
    lines: list[tuple[str, int]] = []
    stack = [obj]
    while stack:
        o = stack.pop()
        if id(o) in seen or id(o) in shared or isinstance(o, (type, type(sys), type(_peer))):
            continue
        seen.add(id(o))
        size = sys.getsizeof(o)
        lines.append((type(o).__module__ + "." + type(o).__qualname__, size))
        stack.extend(gc.get_referents(o))
    return sum(s for _, s in lines), lines


def _measure(n: int, trace: bool, top: int) -> None:
    sys.path.insert(0, str(ROOT))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * n + 1000)), hard))
    from twisted.internet import reactor, task
    from twisted.logger import globalLogBeginner

    # As under twistd: logging has begun (else twisted.logger keeps every event in memory
    # until it does); the observer drops them.
    globalLogBeginner.beginLoggingTo([lambda event: None], redirectStandardIO=False)

    from wingate_map.config import parse_config
    from wingate_map.service import WingateMapService

    peer = subprocess.Popen([sys.executable, __file__, "--peer"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    dest = int(peer.stdout.readline())  # type: ignore[union-attr]
    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))
    port = listen.getsockname()[1]
    listen.close()
    text = f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\ndefault = [{{ host = "127.0.0.1", port = {dest} }}]\n'
    service = WingateMapService(parse_config(text), reactor=reactor, sinks=[_null_sink()])
    service.startService()
    result: dict[str, Any] = {}

    def command(line: str, answer: str) -> None:
        peer.stdin.write(line + "\n")  # type: ignore[union-attr]
        peer.stdin.flush()  # type: ignore[union-attr]
        got = peer.stdout.readline().strip()  # type: ignore[union-attr]
        if got != answer:
            raise RuntimeError(f"helper answered {got!r} to {line!r}")

    def wired(count: int) -> bool:
        live = service.sessions.live()
        return len(live) == count and all(s.terminate is not None and s.terminate.__self__._pump is not None for s in live)

    async def until(condition: Any) -> None:
        for _ in range(6000):
            if condition():
                return
            await task.deferLater(reactor, 0.02, lambda: None)
        raise RuntimeError("timed out")

    from twisted.internet.threads import deferToThread

    async def run() -> None:
        await deferToThread(command, f"open {port} {WARMUP}", "opened")
        await until(lambda: wired(WARMUP))
        await deferToThread(command, "close", "closed")
        await until(lambda: len(service.sessions.live()) == 0)
        gc.collect()
        if trace:
            tracemalloc.start(12)
            before_snap = tracemalloc.take_snapshot()
        before = _memory_kb()
        await deferToThread(command, f"open {port} {n}", "opened")
        await until(lambda: wired(n))
        gc.collect()
        after = _memory_kb()
        result["rss"] = (after[0] - before[0]) / n
        result["uss"] = (after[1] - before[1]) / n
        if trace:
            snap = tracemalloc.take_snapshot()
            tracemalloc.stop()
            snap = snap.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            before_f = before_snap.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            stats = snap.compare_to(before_f, "traceback")
            total = sum(s.size_diff for s in stats)
            result["traced"] = total / n / 1024
            print(f"\nbiggest differences per session (traceback), {n} sessions:")
            for s in stats[:top]:
                if s.size_diff <= 0:
                    continue
                frames = [f for f in s.traceback if "site-packages" not in f.filename or "twisted" in f.filename][-3:]
                where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in reversed(frames))
                print(f"  {s.size_diff / n:7.0f} B  {s.count_diff / n:5.2f} blocks  {where}")
            session = service.sessions.live()[0]
            relay = session.terminate.__self__
            shared = {id(o) for o in (relay.runtime, relay.factory, reactor, service, service.sessions)}
            shared |= {id(o) for o in gc.get_referents(relay.runtime)}
            size, lines = _own_size(relay, shared)
            print(f"\none relay reaches {size} B of its own (sys.getsizeof) in {len(lines)} objects:")
            by: dict[str, list[int]] = {}
            for name, b in lines:
                by.setdefault(name, []).append(b)
            for name, sizes in sorted(by.items(), key=lambda kv: -sum(kv[1]))[:top]:
                print(f"  {sum(sizes):6d} B  {len(sizes):3d} x {name}")
        await deferToThread(command, "close", "closed")

    def done(_: Any) -> None:
        reactor.stop()

    def failed(f: Any) -> None:
        f.printTraceback()
        result["error"] = True
        reactor.stop()

    from twisted.internet.defer import Deferred

    reactor.callWhenRunning(lambda: Deferred.fromCoroutine(run()).addCallbacks(done, failed))
    reactor.run()
    peer.stdin.close()  # type: ignore[union-attr]
    peer.wait(30)
    if result.get("error"):
        sys.exit(1)
    line = f"RESULT rss_kb={result['rss']:.2f} uss_kb={result['uss']:.2f}"
    if trace:
        line += f" traced_kb={result['traced']:.2f}"
    print(line, flush=True)


def main() -> None:
    """
    Parse the options; measure (both modes, each in its own process, unless C{--mode} is given).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("-n", type=int, default=2000, help="idle sessions to open (default 2000)")
    parser.add_argument("--top", type=int, default=15, help="lines of the breakdowns")
    parser.add_argument("--mode", choices=("trace", "rss"))
    parser.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        _peer()
    elif args.mode:
        _measure(args.n, args.mode == "trace", args.top)
    else:
        results = {}
        for mode in ("trace", "rss"):
            out = subprocess.run([sys.executable, __file__, "-n", str(args.n), "--top", str(args.top), "--mode", mode], capture_output=True, text=True, check=True).stdout
            if mode == "trace":
                print(out.rsplit("RESULT", 1)[0])
            results[mode] = dict(kv.split("=") for kv in out.rsplit("RESULT", 1)[1].split())
        t, r = results["trace"], results["rss"]
        print(f"per idle session ({args.n}): tracemalloc {float(t['traced_kb']):.2f} KB; RSS {float(r['rss_kb']):.2f} KB, USS {float(r['uss_kb']):.2f} KB (untraced run)")


if __name__ == "__main__":
    main()
