#!/usr/bin/env python3
"""
Benchmark load generators (stdlib only; plain sockets and epoll).  Each prints one JSON object
on stdout.  Every loop is bounded both in count and in time.

  loadgen.py bulk up|down PORT NBYTES
      one connection; "up" sends NBYTES to the backend's discard mode and waits for its
      one-byte acknowledgement (so every byte went through the proxy); "down" asks the
      backend's source mode for NBYTES and reads them all.
  loadgen.py pingpong PORT CONNS SIZE WARMUP DURATION MAXREQ
      CONNS connections, each with one SIZE-byte message in flight to the echo backend;
      a request is done when its SIZE bytes are back.  Latency of every request after WARMUP.
  loadgen.py connrate PORT CONCURRENCY DURATION MAXCONN
      CONCURRENCY concurrent slots, each in a loop: connect, send 1 byte (b"C"), read the
      echo, then the end of stream (the backend closes first), close.  Closing after the
      server keeps TIME_WAIT off the client's ephemeral ports: tens of thousands of them
      would make the kernel's port search, not the proxy, the bottleneck.
  loadgen.py slowread PORT N HOLD
      open N connections that each ask the backend's source mode for more than they will
      ever read, and read nothing: slow readers, each with a fast sender behind the proxy.
      Print a "READY" JSON line, wait for a line on stdin (at most HOLD seconds), close them.
  loadgen.py idle PORT N BATCH HOLD
      open N connections (BATCH at a time, each checked with a one-byte echo so both legs
      of the proxy are established), print a "READY" JSON line, wait for a line on stdin
      (at most HOLD seconds), close them all.
"""

from __future__ import annotations

import errno
import json
import select
import socket
import struct
import sys
import time

HOST = "127.0.0.1"
HEADER = struct.Struct("!BQ")
CHUNK = 256 * 1024
IO_TIMEOUT = 60.0


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _percentile(sorted_values: list[int], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return float(sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))])


def bulk(direction: str, port: int, nbytes: int) -> dict:
    s = _connect(port)
    s.settimeout(IO_TIMEOUT)
    deadline = time.monotonic() + 300.0
    start = time.perf_counter()
    if direction == "up":
        s.sendall(HEADER.pack(ord("D"), nbytes))
        block = memoryview(b"u" * CHUNK)
        left = nbytes
        while left > 0 and time.monotonic() < deadline:
            n = min(left, CHUNK)
            s.sendall(block[:n])
            left -= n
        ack = s.recv(1)
        if ack != b"K":
            raise RuntimeError(f"no acknowledgement from the discard backend (got {ack!r})")
        done = nbytes - left
    else:
        s.sendall(HEADER.pack(ord("S"), nbytes))
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        done = 0
        while done < nbytes and time.monotonic() < deadline:
            n = s.recv_into(view)
            if n == 0:
                break
            done += n
        if done < nbytes:
            raise RuntimeError(f"source stream ended after {done} of {nbytes} bytes")
    seconds = time.perf_counter() - start
    s.close()
    return {"bytes": done, "seconds": seconds, "mb_per_s": done / seconds / 1e6}


def pingpong(port: int, nconns: int, size: int, warmup: float, duration: float, maxreq: int) -> dict:
    msg = b"p" * size
    socks: dict[int, socket.socket] = {}
    # Establish one by one (each checked with one round trip): a burst of connects would
    # overflow a small listen backlog (socat's is 5) and add 1 s SYN retransmits.
    for _ in range(nconns):
        s = _connect(port)
        s.sendall(msg)
        got = 0
        while got < size:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed during setup")
            got += len(chunk)
        s.setblocking(False)
        socks[s.fileno()] = s
    ep = select.epoll()
    got = {fd: 0 for fd in socks}
    sent_at = {}
    now = time.perf_counter_ns
    for fd, s in socks.items():
        ep.register(fd, select.EPOLLIN)
        sent_at[fd] = now()
        s.send(msg)
    t0 = time.perf_counter()
    measure_from = t0 + warmup
    end = measure_from + duration
    measuring = False
    lat: list[int] = []
    count = 0
    total = 0  # also during the warm-up: what the proxy's CPU time over the whole run served
    errors = 0
    m_start = 0.0
    while count < maxreq:
        t = time.perf_counter()
        if t >= end:
            break
        if not measuring and t >= measure_from:
            measuring = True
            m_start = t
            lat.clear()
            count = 0
        for fd, ev in ep.poll(0.5):
            s = socks[fd]
            try:
                data = s.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                errors += 1
                ep.unregister(fd)
                continue
            g = got[fd] + len(data)
            if g >= size:
                t_ns = now()
                lat.append(t_ns - sent_at[fd])
                count += 1
                total += 1
                got[fd] = g - size
                sent_at[fd] = t_ns
                s.send(msg)
            else:
                got[fd] = g
        if not socks or errors >= len(socks):
            break
    m_end = time.perf_counter()
    for s in socks.values():
        s.close()
    if not measuring:
        raise RuntimeError("ping-pong never reached its measuring phase")
    seconds = m_end - m_start
    lat.sort()
    return {
        "requests": count,
        "requests_total": total,
        "seconds": seconds,
        "rps": count / seconds if seconds > 0 else 0.0,
        "p50_us": _percentile(lat, 0.50) / 1000.0,
        "p99_us": _percentile(lat, 0.99) / 1000.0,
        "errors": errors,
    }


def connrate(port: int, concurrency: int, duration: float, maxconn: int) -> dict:
    ep = select.epoll()
    state: dict[int, tuple[socket.socket, str, int]] = {}
    addr = (HOST, port)
    done = 0
    errors = 0
    started = 0
    lat: list[int] = []
    now = time.perf_counter_ns

    def start_one() -> None:
        nonlocal started, errors
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = now()
        rc = s.connect_ex(addr)
        if rc not in (0, errno.EINPROGRESS):
            errors += 1
            s.close()
            return
        started += 1
        state[s.fileno()] = (s, "connecting", t)
        ep.register(s.fileno(), select.EPOLLOUT)

    def finish(fd: int, ok: bool) -> None:
        nonlocal done, errors
        s, _, t = state.pop(fd)
        ep.unregister(fd)
        s.close()
        if ok:
            done += 1
            lat.append(now() - t)
        else:
            errors += 1

    t0 = time.perf_counter()
    end = t0 + duration
    stop_starting = False
    for _ in range(concurrency):
        start_one()
    polls = 0
    while state and time.perf_counter() < end + 10.0 and polls < 100 * maxconn + 1000:
        polls += 1
        if not stop_starting and (time.perf_counter() >= end or started >= maxconn or errors > 1000):
            stop_starting = True
            t_stop = time.perf_counter()
        for fd, ev in ep.poll(0.5):
            if fd not in state:
                continue
            s, phase, t = state[fd]
            if phase == "connecting":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    finish(fd, False)
                else:
                    try:
                        s.send(b"C")
                    except OSError:
                        finish(fd, False)
                    else:
                        state[fd] = (s, "waiting", t)
                        ep.modify(fd, select.EPOLLIN)
                        continue
            else:
                try:
                    data = s.recv(16)
                except BlockingIOError:
                    continue
                except OSError:
                    finish(fd, False)
                else:
                    if data == b"C":
                        state[fd] = (s, "echoed", t)
                        continue  # now wait for the end of stream
                    finish(fd, phase == "echoed" and data == b"")
            if not stop_starting:
                start_one()
    if not stop_starting:
        t_stop = time.perf_counter()
    seconds = time.perf_counter() - t0
    for s, _, _ in state.values():
        s.close()
    lat.sort()
    return {
        "connections": done,
        "seconds": seconds,
        "rate": done / seconds if seconds > 0 else 0.0,
        "p50_us": _percentile(lat, 0.50) / 1000.0,
        "errors": errors,
        "stopped_after": t_stop - t0,
    }


def slowread(port: int, n: int, hold: float) -> None:
    socks = []
    for _ in range(n):
        s = _connect(port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(HEADER.pack(ord("S"), 1 << 40))
        socks.append(s)
    print(json.dumps({"ready": len(socks)}), flush=True)
    select.select([sys.stdin], [], [], hold)
    for s in socks:
        s.close()


def idle(port: int, n: int, batch: int, hold: float) -> None:
    socks: list[socket.socket] = []
    deadline = time.monotonic() + 120.0
    t0 = time.perf_counter()
    while len(socks) < n and time.monotonic() < deadline:
        group = [_connect(port) for _ in range(min(batch, n - len(socks)))]
        for s in group:
            s.sendall(b"i")
        for s in group:
            if s.recv(1) != b"i":
                raise RuntimeError("idle connection not echoed")
        socks.extend(group)
    print(json.dumps({"ready": len(socks), "seconds": time.perf_counter() - t0}), flush=True)
    select.select([sys.stdin], [], [], hold)
    for s in socks:
        s.close()


def main(argv: list[str]) -> int:
    kind = argv[0]
    if kind == "bulk":
        result = bulk(argv[1], int(argv[2]), int(argv[3]))
    elif kind == "pingpong":
        result = pingpong(int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4]), float(argv[5]), int(argv[6]))
    elif kind == "connrate":
        result = connrate(int(argv[1]), int(argv[2]), float(argv[3]), int(argv[4]))
    elif kind == "slowread":
        slowread(int(argv[1]), int(argv[2]), float(argv[3]))
        return 0
    elif kind == "idle":
        idle(int(argv[1]), int(argv[2]), int(argv[3]), float(argv[4]))
        return 0
    else:
        raise SystemExit(f"unknown load: {kind}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
