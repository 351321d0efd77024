#!/usr/bin/env python3
"""
Benchmark backend: one small epoll server (stdlib only) listening on 127.0.0.1 on every port
given on the command line.  What a connection gets depends on its first byte:

  b"D" + 8-byte big-endian N  discard: read and drop N bytes, then answer b"K" (one byte)
  b"S" + 8-byte big-endian N  source: send N bytes, then wait for the client to close
  b"C"                        connection test: answer b"C" and close at once (the server closes
                              first, as in HTTP/1.0, so TIME_WAIT stays on server-side ports)
  anything else               echo: every byte received (the first one included) is sent back

One port per proxy under test keeps the proxies' outgoing 4-tuples apart (no TIME_WAIT
collisions between runs).  Prints "ready" once listening.  Exits when killed, when its parent
dies, or after --max-seconds.

Usage: backend.py [--max-seconds S] PORT [PORT ...]
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import socket
import struct
import sys
import time

CHUNK = 1 << 20  # read/write buffer for the bulk modes
HEADER = struct.Struct("!BQ")
MAX_POLLS = 200_000_000  # the main loop is bounded in count as well as by --max-seconds

IN = select.EPOLLIN
OUT = select.EPOLLOUT
BAD = select.EPOLLERR | select.EPOLLHUP


class Conn:
    __slots__ = ("sock", "mode", "head", "left", "out")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.mode = ""  # "" (first bytes not seen yet), "D", "S", "E", "done"
        self.head = b""
        self.left = 0
        self.out = b""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--max-seconds", type=float, default=3600.0)
    parser.add_argument("ports", type=int, nargs="+")
    args = parser.parse_args()

    deadline = time.monotonic() + args.max_seconds
    parent = os.getppid()
    ep = select.epoll()
    listeners: dict[int, socket.socket] = {}
    for port in args.ports:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", port))
        ls.listen(4096)
        ls.setblocking(False)
        listeners[ls.fileno()] = ls
        ep.register(ls.fileno(), IN)
    conns: dict[int, Conn] = {}
    big = bytearray(CHUNK)
    big_view = memoryview(big)
    payload = memoryview(b"s" * CHUNK)
    print("ready", flush=True)

    def close(fd: int) -> None:
        c = conns.pop(fd, None)
        if c is not None:
            try:
                ep.unregister(fd)
            except OSError:
                pass
            c.sock.close()

    def echo(c: Conn, fd: int, data: bytes) -> None:
        if c.out:
            c.out += data
            return
        try:
            n = c.sock.send(data)
        except BlockingIOError:
            n = 0
        if n < len(data):
            # Back-pressure: stop reading until the echo is written.
            c.out = data[n:]
            ep.modify(fd, OUT)

    def source(c: Conn, fd: int) -> None:
        for _ in range(64):  # at most 64 MB per wake-up; epoll calls again while writable
            if c.left <= 0:
                break
            try:
                n = c.sock.send(payload[: min(c.left, CHUNK)])
            except BlockingIOError:
                return
            c.left -= n
        if c.left <= 0:
            c.mode = "done"
            ep.modify(fd, IN)

    ticks = 0
    while time.monotonic() < deadline and ticks < MAX_POLLS:
        ticks += 1
        if ticks % 64 == 0 and os.getppid() != parent:
            break
        for fd, ev in ep.poll(1.0):
            ls = listeners.get(fd)
            if ls is not None:
                for _ in range(256):  # bounded accept burst
                    try:
                        s, _addr = ls.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:
                        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ECONNABORTED):
                            break
                        raise
                    s.setblocking(False)
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conns[s.fileno()] = Conn(s)
                    ep.register(s.fileno(), IN)
                continue
            c = conns.get(fd)
            if c is None:
                continue
            try:
                if ev & OUT:
                    if c.mode == "S":
                        source(c, fd)
                    elif c.out:
                        n = c.sock.send(c.out)
                        c.out = c.out[n:]
                        if not c.out:
                            ep.modify(fd, IN)
                    continue
                if not ev & IN and ev & BAD:
                    close(fd)
                    continue
                mode = c.mode
                if mode == "D":
                    n = c.sock.recv_into(big_view)
                    if n == 0:
                        close(fd)
                        continue
                    c.left -= n
                    if c.left <= 0:
                        c.mode = "done"
                        c.sock.send(b"K")
                    continue
                data = c.sock.recv(65536)
                if not data:
                    close(fd)
                    continue
                if mode == "E":
                    echo(c, fd, data)
                elif mode == "done":
                    pass
                else:
                    head = c.head + data
                    if head == b"C":
                        c.sock.send(b"C")
                        close(fd)
                    elif head[:1] not in (b"D", b"S"):
                        c.mode = "E"
                        c.head = b""
                        echo(c, fd, head)
                    elif len(head) >= HEADER.size:
                        kind, count = HEADER.unpack_from(head)
                        c.head = b""
                        c.left = count
                        if kind == ord("D"):
                            c.mode = "D"
                            c.left -= len(head) - HEADER.size
                            if c.left <= 0:
                                c.mode = "done"
                                c.sock.send(b"K")
                        else:
                            c.mode = "S"
                            ep.modify(fd, OUT)
                    else:
                        c.head = head
            except (ConnectionError, OSError):
                close(fd)
    for fd in list(conns):
        close(fd)
    for ls in listeners.values():
        ls.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
