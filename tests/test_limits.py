"""
Connection limits and event handlers over real sockets: limits count connections still sending
a PROXY header or doing a TLS handshake, refused sessions start no handler, and at most
C{[events] max_running} handler programs run at once.
"""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, protocol

from wingate_map.relay import _protocol as relay

from .helpers import Peer, PeerFactory, free_port, mapping_config, start_service, wait_for
from .pki import PKI
from .test_integration import connect, listen

CALLS: list[dict] = []


def record(event):
    """
    A configured python handler (python = "tests.test_limits:record"): remembers each call.
    """
    CALLS.append(event)
    return True


def log_program(tmp_path, log, body=""):
    """
    A handler program that appends "start" to C{log}, runs C{body}, then appends "end".
    """
    tmp_path.mkdir(exist_ok=True)
    script = tmp_path / "handler.sh"
    script.write_text(f'#!/bin/sh\necho start >> "{log}"\n{body}\necho end >> "{log}"\n')
    script.chmod(0o755)
    return str(script)


def lines(path):
    """
    The words a handler program wrote to C{path}.
    """
    return path.read_text().split() if path.exists() else []


def metric(service, name, **labels):
    """
    The value of one sample in the service's /metrics text (0 if absent).
    """
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"
    for line in service.metrics.render().decode().splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


@pytest_twisted.inlineCallbacks
def test_connections_over_a_limit_start_no_handler(tmp_path, caplog_twisted):
    """
    With max_connections = 1 and one live session, 40 more connections are refused with
    reason limit: each still has its ClientConnect and ClientDisconnect in the log, the audit
    log, the metrics and an embedding sink, but no handler program starts for them and no
    python handler is called.
    """
    del CALLS[:]
    started = tmp_path / "started"
    audit = tmp_path / "audit.jsonl"
    servers = PeerFactory(payload=b"", half_close=False, close_on_eof=False)
    dest = yield listen(servers)
    port = free_port()
    text = mapping_config(port, [("127.0.0.1", dest.getHost().port)], extra="max_connections = 1", service=f'audit_log = "{audit}"\ndrain_timeout = 1')
    text += (
        f'[[events.ClientConnect]]\nrun = ["{log_program(tmp_path, started)}"]\ntimeout = 60\n'
        '[[events.ClientConnect]]\npython = "tests.test_limits:record"\n'
        f'[[events.ClientDisconnect]]\nrun = ["{log_program(tmp_path, started)}"]\ntimeout = 60\n'
    )
    service, sink = start_service(text)
    try:
        first = Peer(payload=b"", half_close=False, close_on_eof=False)
        yield connect(port, first)
        yield servers.next_peer(0)
        assert lines(started) == ["start", "end"] and len(CALLS) == 1
        clients = [Peer(payload=b"", half_close=False) for _ in range(40)]
        yield defer.gatherResults([connect(port, c) for c in clients])
        yield defer.gatherResults([c.lost for c in clients])
        yield wait_for(lambda: len(sink.of("ClientDisconnect")) == 40)
        assert {e["reason"] for e in sink.of("ClientDisconnect")} == {"limit"}
        assert len(sink.of("ClientConnect")) == 41
        # The audit lines of the last turns may wait for the next spaced write (events._batch).
        yield wait_for(lambda: audit.read_text().count("\n") >= 81)
        audited = [json.loads(line) for line in audit.read_text().splitlines()]
        assert [e["event"] for e in audited].count("ClientConnect") == 41
        assert [e.get("reason") for e in audited].count("limit") == 40
        assert sum("ClientDisconnect" in line and "reason=limit" in line for line in caplog_twisted) == 40
        assert metric(service, "wingatemap_connections_refused_total", mapping="m", reason="limit") == 40
        assert lines(started) == ["start", "end"] and len(CALLS) == 1
    finally:
        first.transport.loseConnection()
        yield service.stopService()
        yield dest.stopListening()


@pytest_twisted.inlineCallbacks
def test_at_most_max_running_handler_programs_run_at_once(tmp_path):
    """
    With [events] max_running = 2, 10 concurrent connections each run a ClientConnect
    program, never more than 2 at once; every session is still served.
    """
    log = tmp_path / "runs"
    servers = PeerFactory(payload=b"pong")
    dest = yield listen(servers)
    port = free_port()
    text = mapping_config(port, [("127.0.0.1", dest.getHost().port)])
    text += f'[events]\nmax_running = 2\n[[events.ClientConnect]]\nrun = ["{log_program(tmp_path, log, "sleep 0.3")}"]\ntimeout = 120\n'
    service, sink = start_service(text)
    try:
        clients = [Peer(payload=b"ping") for _ in range(10)]
        yield defer.gatherResults([connect(port, c) for c in clients])
        yield defer.gatherResults([c.lost for c in clients])
        yield wait_for(lambda: len(sink.of("ClientDisconnect")) == 10, timeout=120)
        assert all(c.first_bytes == b"pong" for c in clients)
        running, most = 0, 0
        for line in lines(log):
            running += 1 if line == "start" else -1
            most = max(most, running)
        assert len(lines(log)) == 20 and most == 2
    finally:
        yield service.stopService()
        yield dest.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_handler_that_cannot_start_in_time_is_a_timeout(tmp_path, caplog_twisted):
    """
    With max_running = 1 and a ClientDisconnect program holding the only slot, a new
    session whose ClientConnect program cannot start within its timeout is handled as a
    handler timeout: blocked (on_failure = block), logged as not started, and that program
    never runs.
    """
    release = tmp_path / "release"
    connects, disconnects = tmp_path / "connects", tmp_path / "disconnects"
    servers = PeerFactory(payload=b"")
    dest = yield listen(servers)
    port = free_port()
    hold = log_program(tmp_path / "d", disconnects, f'while [ ! -e "{release}" ]; do sleep 0.05; done')
    text = mapping_config(port, [("127.0.0.1", dest.getHost().port)])
    text += (
        f'[events]\nmax_running = 1\n[[events.ClientConnect]]\nrun = ["{log_program(tmp_path, connects)}"]\ntimeout = 1\n'
        f'[[events.ClientDisconnect]]\nrun = ["{hold}"]\ntimeout = 120\n'
    )
    service, sink = start_service(text)
    try:
        first = Peer(payload=b"")
        yield connect(port, first)
        yield first.lost
        yield wait_for(lambda: lines(disconnects) == ["start"])
        second = Peer(payload=b"", half_close=False)
        yield connect(port, second)
        yield second.lost
        yield wait_for(lambda: len(sink.of("ClientDisconnect")) == 2)
        assert sink.of("ClientDisconnect")[1]["reason"] == "blocked"
        assert any("not started: events.max_running = 1 programs were running" in line for line in caplog_twisted)
        release.write_text("")
        yield wait_for(lambda: lines(disconnects) == ["start", "end", "start", "end"], timeout=60)
        assert lines(connects) == ["start", "end"]
    finally:
        release.write_text("")
        yield service.stopService()
        yield dest.stopListening()


class Silent(protocol.Protocol):
    """
    A client that connects and sends nothing (no PROXY header, no TLS handshake).
    """

    def __init__(self) -> None:
        self.lost: defer.Deferred[None] = defer.Deferred()

    def connectionLost(self, reason=None) -> None:
        self.lost.callback(None)


def pending_config(kind, port, dest_port, tmp_path):
    """
    A mapping with a limit of 1 whose connections stay pending (a PROXY header or a TLS
    handshake to come), and the log text of a connection dropped over it.
    """
    if kind == "proxy":
        return mapping_config(port, [("127.0.0.1", dest_port)], extra="proxy_protocol = true\nmax_connections_per_client = 1"), "max_connections_per_client (1) reached for 127.0.0.1"
    cert, key = PKI(tmp_path).server()
    return mapping_config(port, [("127.0.0.1", dest_port)], extra=f'max_connections = 1\ntls = {{ cert = "{cert}", key = "{key}" }}'), "max_connections (1) reached"


@pytest.mark.parametrize("kind", ["proxy", "tls"])
@pytest_twisted.inlineCallbacks
def test_pending_connections_count_against_the_limits(kind, tmp_path, caplog_twisted, monkeypatch):
    """
    A client cannot hold 300 connections against a limit of 1 by never finishing its PROXY
    header (max_connections_per_client) or its TLS handshake (max_connections): the first
    counts, the other 299 are closed at once, each logged once and counted as dropped, and
    none is a session.
    """
    monkeypatch.setattr(relay, "HEADER_TIMEOUT", 300.0)  # only the limit may close them here
    servers = PeerFactory(payload=b"", half_close=False)
    dest = yield listen(servers)
    port = free_port()
    text, why = pending_config(kind, port, dest.getHost().port, tmp_path)
    service, sink = start_service(text)
    try:
        first = Silent()
        yield connect(port, first)
        yield wait_for(lambda: service.sessions.connections("m") == 1)
        others = [Silent() for _ in range(299)]
        yield defer.gatherResults([connect(port, c) for c in others])
        yield wait_for(lambda: all(c.lost.called for c in others), timeout=60)
        assert not first.lost.called
        assert sum(why in line for line in caplog_twisted) == 299
        assert metric(service, "wingatemap_connections_dropped_total", mapping="m", reason="limit") == 299
        assert sink.events == [] and service.sessions.connections("m") == 1
        if kind == "proxy":
            first.transport.write(b"PROXY TCP4 10.1.2.3 127.0.0.1 4000 80\r\n")
            server = yield servers.next_peer(0)
            assert sink.of("ClientConnect")[0]["client_ip"] == "10.1.2.3"
            server.transport.loseConnection()
        else:
            first.transport.loseConnection()
        yield first.lost
        yield wait_for(lambda: service.sessions.connections("m") == 0)
    finally:
        yield service.stopService()
        yield dest.stopListening()
