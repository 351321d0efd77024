"""
The service tree: child services that each open and close what they hold, and no
process-global state, so that two services run side by side in one process on one reactor.
"""

from __future__ import annotations

import json
import os
import signal

import pytest_twisted
from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionRefusedError

from wingate_map import service_from_file
from wingate_map.service._workers import RUNTIME_ENV, runtime_dir

from .helpers import free_port, wait_for

SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR2)


def reactor():
    from twisted.internet import reactor as r

    return r


class Greeter(protocol.Protocol):
    """
    A destination that says its name when a client connects, then echoes.
    """

    def connectionMade(self) -> None:
        self.transport.write(self.factory.greeting)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class Client(protocol.Protocol):
    """
    Collects what it receives; L{expect} fires once C{count} bytes in all have arrived.
    """

    def __init__(self) -> None:
        self.received = b""
        self._waiting: list[tuple[int, defer.Deferred[bytes]]] = []
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for entry in [e for e in self._waiting if len(self.received) >= e[0]]:
            self._waiting.remove(entry)
            entry[1].callback(self.received)

    def expect(self, count: int) -> defer.Deferred[bytes]:
        """
        Fires with everything received once it is at least C{count} bytes.
        """
        d: defer.Deferred[bytes] = defer.Deferred()
        self._waiting.append((count, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason: object) -> None:
        self.lost.callback(None)


def greeter(greeting: bytes) -> defer.Deferred:
    """
    Listen on 127.0.0.1 with a L{Greeter} saying C{greeting}.
    """
    factory = protocol.Factory.forProtocol(Greeter)
    factory.greeting = greeting
    return TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(factory)


@defer.inlineCallbacks
def greeted(port: int, greeting: bytes):
    """
    Connect to 127.0.0.1:C{port} and check the first bytes are C{greeting}: the connected client.
    """
    client = Client()
    yield connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port, timeout=30), client)
    received = yield client.expect(len(greeting))
    assert received == greeting
    return client


@defer.inlineCallbacks
def echoes(client: Client, data: bytes):
    """
    A live session still relays: C{data} comes back.
    """
    before = len(client.received)
    client.transport.write(data)
    received = yield client.expect(before + len(data))
    assert received[before:] == data


def write_config(path, name: str, port: int, destination: int, audit: str) -> None:
    """
    A configuration with one mapping C{name} on 127.0.0.1:C{port} and an audit log.
    """
    path.write_text(
        f'[service]\ndrain_timeout = 5\naudit_log = "{audit}"\n'
        f'[mappings.{name}]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {destination} }}\n'
    )


def mappings_in(audit: str) -> set[str]:
    """
    The mappings named by the events of an audit log.
    """
    with open(audit, encoding="utf-8") as f:
        return {json.loads(line)["mapping"] for line in f if line.strip()}


@pytest_twisted.inlineCallbacks
def test_two_services_in_one_process(tmp_path):
    """
    Two services built from different files run in one process on one reactor: each relays
    its own mapping and writes its own audit log; reloading one changes its destinations and
    leaves the other's listener and live session alone; stopping one leaves the other serving.
    Neither changes the process's environment or signal handlers.
    """
    servers = []
    for greeting in (b"alpha:", b"beta:", b"beta2:"):
        servers.append((yield greeter(greeting)))
    alpha_dest, beta_dest, beta2_dest = (s.getHost().port for s in servers)
    environment = dict(os.environ)
    handlers = {signum: signal.getsignal(signum) for signum in SIGNALS}
    pa, pb = free_port(), free_port()
    audit_a, audit_b = str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")
    config_a, config_b = tmp_path / "a.toml", tmp_path / "b.toml"
    write_config(config_a, "alpha", pa, alpha_dest, audit_a)
    write_config(config_b, "beta", pb, beta_dest, audit_b)
    a = service_from_file(str(config_a), reactor=reactor())
    b = service_from_file(str(config_b), reactor=reactor())
    a.startService()
    started = [a]
    try:
        b.startService()
        started.append(b)
        live_a = yield greeted(pa, b"alpha:")
        live_b = yield greeted(pb, b"beta:")
        yield echoes(live_a, b"ping a")
        yield echoes(live_b, b"ping b")
        ports_a = dict(a.listeners)

        write_config(config_b, "beta", pb, beta2_dest, audit_b)
        assert b.reload() == []
        assert dict(a.listeners) == ports_a  # the other service's listener never closed
        fresh_b = yield greeted(pb, b"beta2:")
        fresh_a = yield greeted(pa, b"alpha:")
        yield echoes(live_a, b"still a")
        yield echoes(live_b, b"still b")

        for client in (live_b, fresh_b):
            client.transport.loseConnection()
            yield client.lost
        yield b.stopService()
        started.remove(b)
        try:
            yield greeted(pb, b"")
        except ConnectionRefusedError:
            pass
        else:
            raise AssertionError("the stopped service still accepts")
        assert a.health()[0] == 200 and b.health()[0] == 503
        yield echoes(live_a, b"a after b stopped")
        other = yield greeted(pa, b"alpha:")
        for client in (live_a, fresh_a, other):
            client.transport.loseConnection()
            yield client.lost
        yield wait_for(lambda: len(a.sessions) == 0)
        assert mappings_in(audit_a) == {"alpha"} and mappings_in(audit_b) == {"beta"}
        assert dict(os.environ) == environment
        assert {signum: signal.getsignal(signum) for signum in SIGNALS} == handlers
    finally:
        for service in started:
            yield service.stopService()
        for server in servers:
            yield server.stopListening()


def test_worker_directory_stays_out_of_the_environment():
    """
    The primary's private worker directory is handed to its workers, never written into the
    process's environment, where another service in the process would take it for its own.
    """
    before = os.environ.get(RUNTIME_ENV)
    path = runtime_dir()
    try:
        assert os.path.isdir(path)
        assert os.environ.get(RUNTIME_ENV) == before
        assert runtime_dir() != path  # a second primary gets its own
    finally:
        os.rmdir(path)


def test_children_are_named_services():
    """
    What a started service runs is visible as named child services, each started, and each
    stopped once the service has stopped.
    """
    from twisted.internet.testing import MemoryReactorClock

    from wingate_map.config import parse_config
    from wingate_map.service import WingateMapService

    clock = MemoryReactorClock()
    config = parse_config(
        '[admin]\nlisten = "tcp:8081:interface=127.0.0.1"\ntoken = "a-long-enough-admin-token-0123456789"\n'
        '[mappings.m]\nport = 7000\nbind = "127.0.0.1"\ndefault = { host = "127.0.0.1", port = 9 }\n'
    )
    service = WingateMapService(config, reactor=clock)
    service.startService()
    names = [child.name for child in service]
    assert names[:4] == ["audit-log", "listeners", "interception", "admin"]
    assert "adapter-watcher" in names
    assert all(child.running for child in service)
    service.stopService()
    assert not any(child.running for child in service)


def can_bind(port: int) -> bool:
    """
    Whether 127.0.0.1:C{port} is free to listen on.
    """
    import socket

    probe = socket.socket()
    try:
        probe.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        probe.close()
    return True


@pytest_twisted.inlineCallbacks
def test_start_is_all_or_nothing_across_children(tmp_path):
    """
    When a child that starts after the listeners cannot open (the admin address is taken),
    start-up fails naming admin.listen, and what opened before it is closed again: the
    mapping's port can be bound by someone else, the audit log is closed.
    """
    import socket

    import pytest

    from wingate_map.config import parse_config
    from wingate_map.errors import WingateMapError
    from wingate_map.service import WingateMapService

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = free_port()
    try:
        config = parse_config(
            f'[service]\naudit_log = "{tmp_path / "audit.jsonl"}"\n'
            f'[admin]\nlisten = "tcp:{taken.getsockname()[1]}:interface=127.0.0.1"\n'
            f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = 9 }}\n'
        )
        service = WingateMapService(config, reactor=reactor())
        with pytest.raises(WingateMapError, match="admin.listen"):
            service.startService()
        assert not service.getServiceNamed("audit-log").opened
        assert service.listeners == []
        yield wait_for(lambda: can_bind(port))  # the listener was closed (a reactor turn later)
    finally:
        taken.close()
