#!/usr/bin/env python3
"""
Stress reproducer: does every destination reset reach the client as a reset?

Starts three kinds of process on 127.0.0.1:

  destinations  (--destinations processes, stdlib only) each connection first reads a 5-byte
                request from the client: a mode byte and a 4-byte big-endian size N.  Mode "R"
                sends N bytes and then resets (SO_LINGER {1, 0} and close); mode "U" reads N
                bytes of the client's upload and then resets; mode "F" sends N bytes and then
                closes cleanly (FIN); mode "E" echoes until the client closes.
  wingatemap    one relay under twistd (epoll reactor) mapping a port to the destinations.
  clients       this process: --concurrency connections at a time, --sessions in all, a mix of
                resets, clean closes and echoes, reading at different speeds (some at once,
                some after a pause, some slowly in small pieces with a small receive buffer).

For every "R" and "U" session the client must end with ECONNRESET (or EPIPE on a send); one that ends with a clean EOF saw a
truncated stream that looks complete.  Prints the counts, and exits 1 if any reset arrived as
a FIN.  Every child runs in its own process group and is killed at the end.

Usage: python3 bench/resets.py [--sessions 4000] [--concurrency 100] [--destinations 2]
       [--reset-share 0.4] [--upload-share 0.3]
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
REQUEST = struct.Struct("!cI")
LINGER_RESET = struct.pack("ii", 1, 0)
MAX_SECONDS = 600.0
UPLOAD_LIMIT = 16 << 20  # an uploading client stops sending after this much


def free_port() -> int:
    """
    A TCP port free on 127.0.0.1 right now.
    """
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def serve(listener: socket.socket, deadline: float) -> None:
    """
    The destination loop (one process): answer each connection as its request says.
    """
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    conns: dict[socket.socket, dict] = {}
    polls = 0
    while time.monotonic() < deadline and polls < 50_000_000:
        polls += 1
        for key, events in sel.select(timeout=1.0):
            if key.data is None:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                conn.setblocking(False)
                conns[conn] = {"head": b"", "mode": b"", "out": b"", "size": 0, "got": 0}
                sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            conn = key.fileobj
            state = conns[conn]
            if events & selectors.EVENT_READ:
                try:
                    data = conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()
                    del conns[conn]
                    continue
                if not state["mode"]:
                    state["head"] += data
                    if len(state["head"]) < REQUEST.size:
                        continue
                    mode, size = REQUEST.unpack(state["head"][: REQUEST.size])
                    state["mode"], state["size"] = mode, size
                    if mode == b"E":
                        state["out"] += state["head"][REQUEST.size :]
                    elif mode == b"U":
                        state["got"] = len(state["head"]) - REQUEST.size
                    else:
                        state["out"] = os.urandom(size)
                elif state["mode"] == b"E":
                    state["out"] += data
                elif state["mode"] == b"U":
                    state["got"] += len(data)
                else:
                    continue
            out = state["out"]
            if out:
                try:
                    sent = conn.send(out)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    sel.unregister(conn)
                    conn.close()
                    del conns[conn]
                    continue
                state["out"] = out = out[sent:]
            if (state["mode"] in (b"R", b"F") and not out) or (state["mode"] == b"U" and state["got"] >= state["size"]):
                sel.unregister(conn)
                if state["mode"] in (b"R", b"U"):
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                conn.close()
                del conns[conn]
                continue
            sel.modify(conn, selectors.EVENT_READ | (selectors.EVENT_WRITE if out else 0), "conn")


def destination_main(port: int, processes: int) -> None:
    """
    Listen on C{port} and fork C{processes} destination loops sharing the listener.
    """
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    listener.listen(1024)
    listener.setblocking(False)
    deadline = time.monotonic() + MAX_SECONDS
    children = []
    for _ in range(max(processes, 1) - 1):
        pid = os.fork()
        if pid == 0:
            serve(listener, deadline)
            os._exit(0)
        children.append(pid)
    print("ready", flush=True)
    try:
        serve(listener, deadline)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class Client:
    """
    One session seen from the client side.
    """

    def __init__(self, mode: bytes, size: int, style: str, started: float) -> None:
        self.mode = mode
        self.size = size
        self.style = style  # "fast", "pause" (reads nothing for a while), "slow" (small reads)
        self.resume_at = started + (random.uniform(0.05, 0.3) if style == "pause" else 0.0)
        self.received = 0
        self.uploaded = 0
        self.sent = b""
        self.outcome = ""


def run_clients(port: int, sessions: int, concurrency: int, reset_share: float, upload_share: float) -> dict[str, int]:
    """
    Run C{sessions} sessions through wingatemap on C{port}; count how each ended.
    """
    sel = selectors.DefaultSelector()
    counts = {name: 0 for name in ("reset->reset", "reset->FIN", "upload reset->reset", "upload reset->FIN", "fin->FIN", "fin->reset", "echo ok", "echo bad", "other")}
    started = 0
    live = 0
    deadline = time.monotonic() + MAX_SECONDS
    parked: list[tuple[socket.socket, Client]] = []
    chunk = os.urandom(65536)

    def finish(sock: socket.socket, client: Client, outcome: str) -> None:
        nonlocal live
        try:
            sel.unregister(sock)
        except (KeyError, ValueError):
            pass
        sock.close()
        live -= 1
        if client.mode in (b"R", b"U"):
            prefix = "upload " if client.mode == b"U" else ""
            counts[prefix + ("reset->reset" if outcome == "reset" else "reset->FIN" if outcome == "eof" else "other")] += 1
        elif client.mode == b"F":
            counts["fin->FIN" if outcome == "eof" and client.received == client.size else "fin->reset" if outcome == "reset" else "other"] += 1
        else:
            counts["echo ok" if outcome == "eof" and client.received == len(client.sent) else "echo bad"] += 1

    def watch(sock: socket.socket, client: Client) -> None:
        uploading = client.mode == b"U" and client.uploaded < UPLOAD_LIMIT
        sel.register(sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if uploading else 0), client)

    while (started < sessions or live) and time.monotonic() < deadline:
        while started < sessions and live < concurrency:
            roll = random.random()
            if roll < reset_share:
                mode = b"R"
            elif roll < reset_share + upload_share:
                mode = b"U"
            else:
                mode = random.choice((b"F", b"E"))
            size = random.choice((0, 1, 100, 4096, 65536, 300_000, 1_500_000))
            style = random.choice(("fast", "fast", "pause", "slow"))
            client = Client(mode, size, style, time.monotonic())
            sock = socket.socket()
            if style == "slow":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((HOST, port))
            sock.setblocking(False)
            payload = os.urandom(min(size, 16384)) if mode == b"E" else b""
            client.sent = payload
            sock.sendall(REQUEST.pack(mode, size) + payload)
            if mode == b"E":
                sock.shutdown(socket.SHUT_WR)
            started += 1
            live += 1
            if style == "pause":
                parked.append((sock, client))
            else:
                watch(sock, client)
        now = time.monotonic()
        for sock, client in list(parked):
            if now >= client.resume_at:
                parked.remove((sock, client))
                watch(sock, client)
        for key, events in sel.select(timeout=0.02):
            sock, client = key.fileobj, key.data
            if events & selectors.EVENT_WRITE:
                try:
                    client.uploaded += sock.send(chunk)
                except BlockingIOError:
                    pass
                except OSError as e:
                    finish(sock, client, "reset" if e.errno in (errno.ECONNRESET, errno.EPIPE) else "error")
                    continue
                if client.uploaded >= UPLOAD_LIMIT:
                    sel.modify(sock, selectors.EVENT_READ, client)
            if not events & selectors.EVENT_READ:
                continue
            try:
                data = sock.recv(1024 if client.style == "slow" else 262144)
            except BlockingIOError:
                continue
            except OSError as e:
                finish(sock, client, "reset" if e.errno == errno.ECONNRESET else "error")
                continue
            if not data:
                finish(sock, client, "eof")
            else:
                client.received += len(data)
    return counts


def main() -> int:
    """
    Start the destinations and wingatemap, run the clients, print the counts.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--destinations", type=int, default=2)
    parser.add_argument("--reset-share", type=float, default=0.4, help="share of sessions the destination resets after sending")
    parser.add_argument("--upload-share", type=float, default=0.3, help="share the destination resets while the client uploads")
    parser.add_argument("--destination", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.destination:
        destination_main(args.destination, args.destinations)
        return 0

    children: list[subprocess.Popen] = []
    try:
        dest_port, port = free_port(), free_port()
        dest = subprocess.Popen([sys.executable, __file__, "--destination", str(dest_port), "--destinations", str(args.destinations)], stdout=subprocess.PIPE, start_new_session=True)
        children.append(dest)
        assert dest.stdout is not None and dest.stdout.readline().strip() == b"ready"
        work = Path(tempfile.mkdtemp(prefix="wingatemap-resets-"))
        config = work / "wingatemap.toml"
        config.write_text(f'[mappings.r]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "{HOST}", port = {dest_port} }}\n')
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        relay = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile=", "--logfile=" + str(work / "log"), "wingatemap", "run", "--config", str(config)],
            cwd=str(ROOT), env=env, start_new_session=True,
        )
        children.append(relay)
        for _ in range(600):
            try:
                socket.create_connection((HOST, port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        began = time.monotonic()
        counts = run_clients(port, args.sessions, args.concurrency, args.reset_share, args.upload_share)
        elapsed = time.monotonic() - began
    finally:
        for child in children:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            child.wait()
    resets = sum(value for name, value in counts.items() if "reset->" in name and not name.startswith("fin"))
    print(f"{args.sessions} sessions in {elapsed:.1f}s; destination resets: {resets}")
    for name, value in counts.items():
        print(f"  {name:14} {value}")
    return 1 if counts["reset->FIN"] or counts["upload reset->FIN"] else 0


if __name__ == "__main__":
    sys.exit(main())
