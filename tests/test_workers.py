"""
Worker processes (C{[service] workers = N}): a dead worker's sessions end with reason C{lost}
and their clients see a reset; workers die with the primary; and it all works under twistd's
C{--uid} / C{--gid}.  In memory for the report protocol and the socket wrapper, as real twistd
processes for the rest.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import struct

import pytest
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from wingate_map.sessions import Session, SessionRegistry
from wingate_map.service._workers import ResetOnDeathFactory, WorkerLink, WorkerPool, _Child, _PrimaryWatch

from .helpers import free_port
from .test_operations import TOKEN, EchoServer, api, connect, start

# -- in memory -------------------------------------------------------------------------------


def _session(registry: SessionRegistry, port: int) -> Session:
    session = Session(id=registry.new_id(), mapping="m", client_ip="127.0.0.1", client_port=port, local_ip="127.0.0.1", local_port=80, started=100.0)
    registry.add(session)
    return session


def _link(report_fd: int, watch_fd: int, registry: SessionRegistry) -> WorkerLink:
    return WorkerLink(MemoryReactorClock(), 1, registry, primary_pid=os.getpid(), report_fd=report_fd, watch_fd=watch_fd)


def test_worker_reports_become_one_lost_disconnect_per_live_session():
    """
    What a worker reports (session starts with their ClientConnect fields, byte counts, ends)
    reaches the primary, whatever the chunking; when the worker dies, the primary ends exactly
    the sessions still live, each once, with reason lost, the worker's fields and the last byte
    counts it reported; an over-long report line is dropped without losing the next ones.
    """
    report_r, report_w = os.pipe()
    watch_r, watch_w = os.pipe()
    registry = SessionRegistry(prefix="abw1")
    link = _link(report_w, watch_r, registry)
    first, second, third = (_session(registry, port) for port in (1001, 1002, 1003))
    for session in (first, second, third):
        link.client_connect(session.connect_event(101.0))
    first.bytes_from_client, first.bytes_to_client = 10, 20
    link.report_bytes()
    link.report_bytes()  # nothing changed: nothing sent
    first.reason = "client-closed"
    link.client_disconnect(first.disconnect_event(102.0))
    registry.remove(first)
    second.bytes_from_client = 7
    link.report_bytes()
    data = os.read(report_r, 1 << 20)
    assert data.count(b"\nb ") == 2  # byte reports only when counts changed

    lost = []
    pool = WorkerPool(MemoryReactorClock(), 2, "/nonexistent", on_lost=lost.append)
    pool.stopping = True  # no restart in this test
    child = _Child(pool, 1)
    child.childDataReceived(3, b"c x 1.0 " + b"z" * 70000)  # over-long: dropped
    child.childDataReceived(3, b"zzz\n")
    for i in range(0, len(data), 7):  # arbitrary chunking
        child.childDataReceived(3, data[i : i + 7])
    assert sorted(child.live) == sorted([second.id, third.id])
    pool.reactor.advance(250.0)
    child.processEnded(Failure(Exception("killed")))
    assert child.ended.called
    assert sorted(e["session"] for e in lost) == sorted([second.id, third.id])
    by_id = {e["session"]: e for e in lost}
    assert by_id[second.id]["bytes_from_client"] == 7 and by_id[second.id]["bytes_to_client"] == 0
    for event in lost:
        assert event["event"] == "ClientDisconnect" and event["reason"] == "lost"
        assert event["mapping"] == "m" and event["client_ip"] == "127.0.0.1"
        assert event["duration"] == 150.0  # from the worker's start time to the primary's now
    assert list(lost[0])[-4:] == ["bytes_from_client", "bytes_to_client", "duration", "reason"]
    pool.ended(child, Failure(Exception("again")))  # nothing is ended twice
    assert len(lost) == 2
    for fd in (report_r, report_w, watch_r, watch_w):
        os.close(fd)


def test_worker_sees_the_primary_go_on_end_of_file():
    """
    A worker's standard input is a pipe only the primary holds: end of file means the primary
    is gone, and the worker is told once.
    """
    read, write = os.pipe()
    gone = []
    reactor = MemoryReactorClock()
    watch = _PrimaryWatch(reactor, read, gone.append)
    reactor.addReader(watch)
    watch.doRead()  # nothing yet: still there
    assert gone == []
    os.close(write)
    watch.doRead()
    assert len(gone) == 1 and "end of file" in gone[0]
    assert watch not in reactor.getReaders()
    os.close(read)


class _Handle:
    def __init__(self):
        self.linger = None

    def setsockopt(self, level, option, value):
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_LINGER)
        self.linger = struct.unpack("ii", value)


class _Transport(StringTransport):
    def __init__(self):
        super().__init__()
        self.handle = _Handle()
        self.stopped = False

    def getHandle(self):
        return self.handle

    def stopProducing(self):
        self.stopped = True


@implementer(IHalfCloseableProtocol)
class _HalfCloser(Protocol):
    def __init__(self):
        self.events = []

    def readConnectionLost(self):
        self.events.append("read")

    def writeConnectionLost(self):
        self.events.append("write")


def test_worker_sockets_reset_when_the_process_dies_but_close_cleanly():
    """
    In a worker, a connection's socket has SO_LINGER {1, 0} while it is open (the kernel resets
    it if the worker dies) and has it cleared before an orderly close or a stop from the other
    leg (so those still deliver every byte and a FIN); half-close passes through the wrapper.
    """
    factory = ResetOnDeathFactory(Factory.forProtocol(_HalfCloser))
    wrapper = factory.buildProtocol(None)
    transport = _Transport()
    wrapper.makeConnection(transport)
    inner = wrapper.wrappedProtocol
    assert transport.handle.linger == (1, 0)
    assert inner.transport is wrapper
    assert IHalfCloseableProtocol.providedBy(wrapper)
    wrapper.readConnectionLost()
    wrapper.writeConnectionLost()
    assert inner.events == ["read", "write"]
    inner.transport.loseConnection()
    assert transport.handle.linger == (0, 0) and transport.disconnecting

    other = factory.buildProtocol(None)
    other_transport = _Transport()
    other.makeConnection(other_transport)
    assert other_transport.handle.linger == (1, 0)
    other.stopProducing()
    assert other_transport.handle.linger == (0, 0) and other_transport.stopped
    refused = ResetOnDeathFactory(Factory.forProtocol(Protocol))
    refused.wrappedFactory.buildProtocol = lambda addr: None
    assert refused.buildProtocol(None) is None


# -- real processes ------------------------------------------------------------------------------


def _config(port, admin, echo, tmp_path, extra=""):
    return (
        f'[service]\nworkers = 2\ndrain_timeout = 1\naudit_log = "{tmp_path}/events.jsonl"\n{extra}'
        f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\ntoken = "{TOKEN}"\n'
        f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {echo.port} }}\n'
    )


def _worker_pid(proc) -> int:
    line = proc.wait_line(r"worker 1 started \(pid (\d+)\)")
    return int(line.rsplit("pid ", 1)[1].split(")")[0])


def _clients_on_both(port, admin):
    """
    Clients with a live session each, until both processes hold some (bounded): the clients,
    and which of them the worker holds (its session ids carry the prefix the primary gave it).
    """
    clients = []
    by_port = {}
    for _ in range(8):
        for _ in range(8):
            c = connect(port)
            assert c.recv(2) == b"hi"
            clients.append(c)
        status, sessions = api(admin, "GET", "/sessions")
        assert status == 200 and len(sessions) == len(clients)
        by_port = {s["client_port"]: s["session"] for s in sessions}
        if len({"w" in session.split("-")[0] for session in by_port.values()}) == 2:
            break
    on_worker = [c for c in clients if "w" in by_port[c.getsockname()[1]].split("-")[0]]
    assert on_worker and len(on_worker) < len(clients)
    return clients, on_worker, by_port


def _audit(tmp_path):
    path = tmp_path / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class _Gateway:
    """
    wingatemap with workers = 2 under twistd, both processes holding live sessions.
    """

    def __init__(self, tmp_path):
        self.echo = EchoServer(b"hi")
        self.port, self.admin = free_port(), free_port()
        self.proc, _ = start(tmp_path, _config(self.port, self.admin, self.echo, tmp_path))
        self.worker = _worker_pid(self.proc)
        self.proc.wait_line(r"Site starting on .*worker-1\.sock")
        self.clients, self.on_worker, self.by_port = _clients_on_both(self.port, self.admin)

    def close(self):
        """
        Stop it (once).
        """
        if self.echo is None:
            return
        for c in self.clients:
            c.close()
        self.proc.stop()
        self.echo.close()
        self.echo = None


@pytest.fixture
def gateway(tmp_path):
    """
    A L{_Gateway}, stopped after the test.
    """
    running = _Gateway(tmp_path)
    yield running
    running.close()


def test_killed_worker_sessions_end_once_as_lost_and_their_clients_see_a_reset(gateway, tmp_path):
    """
    With workers = 2, SIGKILL the worker: each of its live sessions gets exactly one
    ClientDisconnect with reason lost (in the audit log and the metrics, written by the
    primary), its clients see a connection reset rather than a clean end of stream, and the
    primary's own sessions carry on.
    """
    proc, on_worker, clients = gateway.proc, gateway.on_worker, gateway.clients
    worker_sessions = {gateway.by_port[c.getsockname()[1]] for c in on_worker}
    os.kill(gateway.worker, signal.SIGKILL)
    proc.wait_line(rf"worker 1 ended with {len(on_worker)} live session\(s\); ending them with reason lost")
    for c in on_worker:
        with pytest.raises(ConnectionResetError):
            c.sendall(b"x")
            assert c.recv(10) == b"never: a reset, not a clean end of stream"
    for c in clients:
        if c not in on_worker:
            c.sendall(b"ping")
            assert c.recv(4) == b"ping"
    metrics = api(gateway.admin, "GET", "/metrics")[1]
    assert f'wingatemap_sessions_ended_total{{mapping="m",reason="lost"}} {float(len(on_worker))}' in metrics
    live = len(clients) - len(on_worker)
    assert f'wingatemap_connections_active{{mapping="m"}} {float(live)}' in metrics
    proc.wait_count(r"Site starting on .*worker-1\.sock", 2)  # restarted
    echo_port = gateway.echo.port
    gateway.close()
    # Read after the stop: its shutdown writes every pending audit line (a busy moment's lines
    # otherwise wait for the next spaced write, wingate_map.events._batch).
    lost = [e for e in _audit(tmp_path) if e["event"] == "ClientDisconnect" and e["reason"] == "lost"]
    assert sorted(e["session"] for e in lost) == sorted(worker_sessions)
    assert all(e["mapping"] == "m" and e["destination"] == f"127.0.0.1:{echo_port}" for e in lost)
    ends = {}
    for event in _audit(tmp_path):
        if event["event"] == "ClientDisconnect":
            ends[event["session"]] = ends.get(event["session"], 0) + 1
    assert set(ends) == set(gateway.by_port.values()) and set(ends.values()) == {1}
    assert "Traceback" not in proc.output()


def test_workers_exit_when_the_primary_is_killed(gateway):
    """
    SIGKILL the primary: its worker does not serve alone; it closes its listeners, ends its
    sessions and exits within a bounded time, and the port then refuses connections.
    """
    import psutil

    worker = psutil.Process(gateway.worker)
    try:
        gateway.proc.popen.kill()
        gateway.proc.wait_line(r"worker 1: the primary process exited; a worker never serves alone")
        worker.wait(timeout=30)
    finally:
        if worker.is_running():
            worker.kill()  # the failure this tests: an orphan still serving
    with pytest.raises(ConnectionRefusedError):
        connect(gateway.port)
    for c in gateway.on_worker:
        with pytest.raises(ConnectionResetError):
            c.sendall(b"x")
            c.recv(10)
    gateway.close()
    lines = [line for line in gateway.proc.output().splitlines() if "ClientDisconnect" in line and "reason=shutdown" in line]
    assert len(lines) == len(gateway.on_worker)


def _can_run_as_nobody():
    try:
        pwd.getpwnam("nobody")
    except KeyError:
        return False
    return os.geteuid() == 0


@pytest.mark.skipif(not _can_run_as_nobody(), reason="needs root and a user nobody")
def test_workers_under_twistd_uid_and_gid(tmp_path):
    """
    workers = 2 under twistd --uid=nobody --gid=nogroup: both processes relay, /metrics and
    /sessions answer, /healthz says ok, and everything in the worker state directory and the
    audit log belong to nobody.  A worker that dies then cannot be restarted without root: /healthz says so.
    """
    nobody = pwd.getpwnam("nobody")
    echo = EchoServer(b"hi")
    port, admin = free_port(), free_port()
    config = tmp_path / "wingatemap.toml"
    config.write_text(_config(port, admin, echo, tmp_path))
    config.chmod(0o600)
    from .test_end_to_end import TWISTD, Proc

    proc = Proc(TWISTD + ["-n", "--pidfile=", "--uid=nobody", "--gid=nogroup", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path))
    try:
        pid = _worker_pid(proc)
        socket_line = proc.wait_line(r"Site starting on .*worker-1\.sock")
        proc.wait_count(r"set uid/gid 65534/65534", 2)
        directory = os.path.dirname(socket_line.split("'")[1])
        clients, on_worker, _ = _clients_on_both(port, admin)
        for c in clients:
            c.sendall(b"echo")
            assert c.recv(4) == b"echo"
        status, metrics = api(admin, "GET", "/metrics")
        assert status == 200 and f'wingatemap_connections_accepted_total{{mapping="m"}} {float(len(clients))}' in metrics
        assert api(admin, "GET", "/healthz")[0] == 200
        for root, dirs, files in os.walk(directory):
            for name in [root] + [os.path.join(root, f) for f in files if not f.endswith(".lock")]:
                assert os.stat(name).st_uid == nobody.pw_uid, name
        assert 'process_cpu_seconds_total{worker="1"}' in metrics  # the worker answered the primary's scrape
        audit = os.stat(tmp_path / "events.jsonl")  # opened as root before the drop, then given away
        assert (audit.st_uid, audit.st_mode & 0o777) == (nobody.pw_uid, 0o640)
        for c in clients:
            c.close()
        os.kill(pid, signal.SIGKILL)
        proc.wait_line(r"worker 1 exited unexpectedly .* cannot be restarted")
        status, body = api(admin, "GET", "/healthz")
        assert status == 503 and any("worker 1" in p and "cannot be restarted" in p for p in body["problems"]), body
    finally:
        proc.stop()
        echo.close()
    assert "Traceback" not in proc.output()
