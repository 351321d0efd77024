"""
The service's lifecycle as an operator sees it: the adapter watcher surviving errors, /healthz
telling the truth, the drain that can be watched and cut short, SIGHUP in every deployment form,
systemd notification, and the nftables table after a crash.
"""

from __future__ import annotations

import errno
import http.client
import json
import os
import re
import secrets
import shlex
import subprocess
import signal
import socket
import sys

import pytest
from twisted.internet.error import CannotListenError
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent

from wingate_map.network import Adapter
from wingate_map.config import parse_config
from wingate_map.service import WingateMapService

from .helpers import free_port
from .netns import lab  # noqa: F401 (fixture)
from .test_end_to_end import ENV, EXAMPLES, TWISTD, Proc, audit, write_config


class RefusingReactor(MemoryReactorClock):
    """
    An in-memory reactor on which listening on an address in C{busy} fails (port in use).
    """

    def __init__(self) -> None:
        super().__init__()
        self.busy: set[str] = set()

    def listenTCP(self, port, factory, backlog=50, interface=""):
        if interface in self.busy:
            raise CannotListenError(interface, port, OSError(errno.EADDRINUSE, "Address already in use"))
        return super().listenTCP(port, factory, backlog, interface)


class FlakyAdapters:
    """
    The machine's adapters as the watcher polls them; C{error} set makes the poll raise it.
    """

    def __init__(self, *addresses: str) -> None:
        self.addresses = list(addresses)
        self.error: BaseException | None = None
        self.polls = 0

    def __call__(self) -> tuple[Adapter, ...]:
        self.polls += 1
        if self.error is not None:
            raise self.error
        return (Adapter(name="eth9", addresses=tuple(self.addresses)),)


def watched_service(adapters: FlakyAdapters, reactor: MemoryReactorClock) -> WingateMapService:
    """
    A started service with one mapping bound to adapter eth9, polled every 5 s.
    """
    config = parse_config(
        '[service]\nadapter_poll_interval = 5\n[mappings.m]\nport = 7000\nbind = "eth9"\n'
        'default = { host = "127.0.0.1", port = 9 }\n'
    )
    service = WingateMapService(config, reactor=reactor, adapters=adapters)
    service.startService()
    return service


def listening(reactor: MemoryReactorClock) -> list[str]:
    """
    The addresses the service listens on in C{reactor}.
    """
    return sorted(interface for _, _, _, interface in reactor.tcpServers)


def messages(events: list[dict]) -> list[str]:
    """
    Captured log events as the text they log.
    """
    return [formatEvent(e) for e in events]


def test_adapter_watcher_survives_running_out_of_file_descriptors():
    """
    When listing the adapters fails (EMFILE: out of file descriptors), the watcher logs it once,
    /healthz answers 503 naming the watcher, and it tries again at every poll; once listing
    works again it follows the adapters (a new address gets its listener) and /healthz is ok.
    """
    reactor = MemoryReactorClock()
    adapters = FlakyAdapters("10.9.0.1")
    service = watched_service(adapters, reactor)
    assert listening(reactor) == ["10.9.0.1"]
    assert service.health() == (200, {"status": "ok", "sessions": 0, "listeners": 1, "workers": 1})
    adapters.error = OSError(errno.EMFILE, "Too many open files")
    adapters.addresses.append("10.9.0.2")
    with capturedLogs() as events:
        for _ in range(3):
            reactor.advance(5)
    failures = [m for m in messages(events) if "Too many open files" in m]
    assert len(failures) == 1, messages(events)
    code, body = service.health()
    assert code == 503 and body["status"] == "failing"
    assert body["problems"] == ["adapter watcher: cannot follow adapter changes: Too many open files (errno 24)"]
    polls = adapters.polls
    adapters.error = None
    with capturedLogs() as events:
        reactor.advance(5)
    assert adapters.polls == polls + 1
    assert listening(reactor) == ["10.9.0.1", "10.9.0.2"]
    assert any("adapter watcher recovered" in m for m in messages(events))
    assert service.health()[0] == 200
    service.stopService()


def test_adapter_watcher_survives_unexpected_errors():
    """
    Any error in a poll (not only the ones the adapter listing announces) is logged once per
    distinct message and retried at the next poll; a different error is logged again.
    """
    reactor = MemoryReactorClock()
    adapters = FlakyAdapters("10.9.0.1")
    service = watched_service(adapters, reactor)
    with capturedLogs() as events:
        adapters.error = RuntimeError("psutil broke")
        reactor.advance(5)
        reactor.advance(5)
        adapters.error = OSError(errno.ENFILE, "Too many open files in system")
        reactor.advance(5)
    logged = [m for m in messages(events) if "psutil broke" in m or "open files in system" in m]
    assert len(logged) == 2, messages(events)
    assert service.health()[1]["problems"] == ["adapter watcher: cannot follow adapter changes: Too many open files in system (errno 23)"]
    adapters.error = None
    reactor.advance(5)
    assert service.health()[0] == 200
    service.stopService()


def test_healthz_names_a_listener_that_cannot_open():
    """
    A new address whose port is taken makes /healthz answer 503 naming the mapping, address
    and port (logged once, retried every poll); when the port frees, the listener opens and
    /healthz is ok again.
    """
    reactor = RefusingReactor()
    adapters = FlakyAdapters("10.9.0.1")
    service = watched_service(adapters, reactor)
    reactor.busy.add("10.9.0.2")
    adapters.addresses.append("10.9.0.2")
    with capturedLogs() as events:
        reactor.advance(5)
        reactor.advance(5)
    assert len([m for m in messages(events) if "10.9.0.2:7000" in m]) == 1, messages(events)
    code, body = service.health()
    assert code == 503
    assert body["problems"] == ["listener: mapping m: cannot listen on 10.9.0.2:7000: Address already in use"]
    reactor.busy.clear()
    reactor.advance(5)
    assert listening(reactor) == ["10.9.0.1", "10.9.0.2"]
    assert service.health()[0] == 200
    service.stopService()


def test_healthz_reports_failing_workers():
    """
    Problems the worker pool reports (a worker that keeps dying, say) make /healthz 503.
    """
    reactor = MemoryReactorClock()
    service = watched_service(FlakyAdapters("10.9.0.1"), reactor)

    class Pool:
        """
        A worker pool with one failing worker.
        """

        def problems(self):
            return ["worker 1 exited (status 1) and is restarting"]

        def signal(self, name):
            pass

    service._pool = Pool()
    assert service.health() == (503, {"status": "failing", "problems": ["worker: worker 1 exited (status 1) and is restarting"], "sessions": 0, "listeners": 1, "workers": 1})
    service._pool = None
    service.stopService()


def http_get(port: int, path: str) -> tuple[int, object]:
    """
    GET http://127.0.0.1:PORT/PATH: the status and the JSON body.
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def listening_server() -> socket.socket:
    """
    A destination on a free loopback port (accept() gives up after 30 s).
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    server.settimeout(30)
    return server


def test_drain_is_watchable_and_a_second_sigterm_ends_it(tmp_path):
    """
    During a drain the admin API stays up: /healthz answers 503 draining and /sessions still
    lists the live session.  A second SIGTERM ends the drain at once (drain_timeout is 600 s):
    the session ends with reason shutdown and the process exits as after a drain.
    """
    server = listening_server()
    port, admin = free_port(), free_port()
    config = write_config(tmp_path, port, server.getsockname()[1], extra_service="drain_timeout = 600")
    with open(config, "a") as f:
        f.write(f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n')
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", config], cwd=str(tmp_path))
    client = held = None
    try:
        proc.wait_line(r"admin API listening")
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        held, _ = server.accept()
        client.sendall(b"x")
        assert held.recv(1) == b"x"
        assert http_get(admin, "/healthz")[0] == 200
        proc.popen.send_signal(signal.SIGTERM)
        proc.wait_line(r"draining 1 live session\(s\) for up to 600s")
        code, body = http_get(admin, "/healthz")
        assert (code, body["status"]) == (503, "draining")
        code, sessions = http_get(admin, "/sessions")
        assert code == 200 and [s["client_ip"] for s in sessions] == ["127.0.0.1"]
        proc.popen.send_signal(signal.SIGTERM)
        status = proc.finish(timeout=60)
    finally:
        proc.stop()
        for s in (client, held, server):
            if s is not None:
                s.close()
    assert status in (0, -signal.SIGTERM), proc.output()
    assert "drain timeout" not in proc.output()
    reasons = [e["reason"] for e in audit(tmp_path) if e["event"] == "ClientDisconnect"]
    assert reasons == ["shutdown"]


def test_tac_example_reloads_on_sighup(tmp_path):
    """
    The shipped .tac (built with service_from_file) reloads on SIGHUP: after the file is edited
    to send the mapping elsewhere and SIGHUP is sent, the reload is logged and new connections
    reach the new destination.
    """
    first, second = listening_server(), listening_server()
    port = free_port()
    config = write_config(tmp_path, port, first.getsockname()[1])
    env = dict(ENV, WINGATEMAP_CONFIG=config)
    proc = Proc(TWISTD + ["-ny", os.path.join(EXAMPLES, "wingatemap.tac"), "--pidfile="], cwd=str(tmp_path), env=env)
    try:
        proc.wait_line(rf"listening on 127\.0\.0\.1:{port}")
        with socket.create_connection(("127.0.0.1", port), timeout=30):
            first.accept()[0].close()
        write_config(tmp_path, port, second.getsockname()[1])
        proc.popen.send_signal(signal.SIGHUP)
        proc.wait_line(r"configuration reloaded from")
        with socket.create_connection(("127.0.0.1", port), timeout=30):
            second.accept()[0].close()
        assert proc.popen.poll() is None
    finally:
        code = proc.stop()
        first.close()
        second.close()
    assert code in (0, -signal.SIGTERM), proc.output()


def test_tac_bind_failure_is_one_line(tmp_path):
    """
    Under the shipped .tac, a port that is taken ends the start with the one-line error naming
    the mapping, address and port, and a non-zero exit status; no traceback.
    """
    busy = listening_server()
    port = busy.getsockname()[1]
    config = write_config(tmp_path, port, 9)
    env = dict(ENV, WINGATEMAP_CONFIG=config)
    proc = Proc(TWISTD + ["-ny", os.path.join(EXAMPLES, "wingatemap.tac"), "--pidfile="], cwd=str(tmp_path), env=env)
    try:
        code = proc.finish()
    finally:
        busy.close()
    assert code != 0
    assert f"wingatemap: error: mapping web: cannot listen on 127.0.0.1:{port}: Address already in use" in proc.output()
    assert "Traceback" not in proc.output()


def unit_lines(key: str) -> list[str]:
    """
    The values of C{key}= in docs/examples/wingatemap.service, in order.
    """
    with open(os.path.join(EXAMPLES, "wingatemap.service")) as f:
        return [line.split("=", 1)[1].strip() for line in f if line.startswith(key + "=")]


def unit_command(line: str, config: str) -> list[str]:
    """
    A unit's command line as argv: without systemd's "-"/"+" prefixes, with C{config} for the
    /etc path.
    """
    return shlex.split(line.lstrip("-+@!:").replace("/etc/wingatemap/wingatemap.toml", config))


def notifications(sock: socket.socket, wanted: str) -> list[str]:
    """
    Read notification datagrams until one assigns C{wanted} (e.g. "READY=1"); return its lines.
    """
    for _ in range(100):
        lines = sock.recv(4096).decode().split("\n")
        if wanted in lines:
            return lines
    raise AssertionError(f"no {wanted} notification")


def test_systemd_notify_ready_reload_stopping(tmp_path):
    """
    Run as the unit runs it (Type=notify, NOTIFY_SOCKET in the abstract namespace), wingatemap
    sends READY=1 with a STATUS= line once its listener accepts; the unit's ExecReload lines
    (check, then kill -HUP $MAINPID) produce RELOADING=1 with MONOTONIC_USEC= then READY=1;
    SIGTERM produces STOPPING=1.
    """
    assert unit_lines("Type") == ["notify"]
    assert float(unit_lines("TimeoutStopSec")[0]) > 30  # the default drain_timeout
    name = f"wingatemap-test-{secrets.token_hex(6)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(60)
    port = free_port()
    server = listening_server()
    config = write_config(tmp_path, port, server.getsockname()[1])
    start = unit_command(unit_lines("ExecStart")[0], config)
    proc = Proc(TWISTD + start[1:], cwd=str(tmp_path), env=dict(ENV, NOTIFY_SOCKET="@" + name))
    try:
        ready = notifications(sock, "READY=1")
        assert "STATUS=0 live session(s), 1 listener(s)" in ready
        with socket.create_connection(("127.0.0.1", port), timeout=30):
            server.accept()[0].close()
        check, hup = (unit_command(line, config) for line in unit_lines("ExecReload"))
        assert os.path.basename(check[0]) == "wingatemap"
        checked = subprocess.run([sys.executable, "-m", "wingate_map.cli"] + check[1:], capture_output=True, text=True, env=ENV)
        assert checked.returncode == 0, checked.stderr
        assert hup[-1] == "$MAINPID"
        subprocess.run(hup[:-1] + [str(proc.popen.pid)], check=True)
        reloading = notifications(sock, "RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") and line[len("MONOTONIC_USEC="):].isdigit() for line in reloading)
        notifications(sock, "READY=1")
        proc.wait_line(r"configuration reloaded from")
        proc.popen.send_signal(signal.SIGTERM)
        notifications(sock, "STOPPING=1")
        code = proc.finish()
    finally:
        proc.stop()
        sock.close()
        server.close()
    assert code in (0, -signal.SIGTERM), proc.output()


def test_unit_removes_the_interception_table_after_kill_9(lab, tmp_path):
    """
    wingatemap killed with SIGKILL cannot remove its nftables table, which would keep
    redirecting clients to a dead port; the systemd unit's ExecStopPost command (as written)
    removes it, and does no harm when there is no table.
    """
    gw, other = lab.namespace("gw"), lab.namespace("peer")
    gw_if, _ = lab.link(gw, "10.78.1.1/24", other, "10.78.1.2/24")
    config = tmp_path / "wingatemap.toml"
    config.write_text(
        f'[mappings.catch]\nport = 7000\nbind = "{gw_if}"\nintercept = [3390]\nintercept_transparent = true\n'
        f'default = {{ host = "127.0.0.1", port = 7001 }}\n'
    )
    proc = Proc(lab.prefix(gw) + TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path), env=ENV)
    try:
        proc.wait_line(r"nftables table inet wingatemap installed")
        # The twistd process is the child of "ip netns exec", which execs it: same pid.
        os.kill(proc.popen.pid, signal.SIGKILL)
        assert proc.finish() == -signal.SIGKILL
    finally:
        proc.stop()
    assert "wingatemap" in lab.run(gw, "nft", "list", "tables").stdout
    [stop_post] = unit_lines("ExecStopPost")
    assert stop_post.startswith("-")  # a missing table is not a failed stop
    argv = unit_command(stop_post, str(config))
    lab.run(gw, *argv)
    assert "wingatemap" not in lab.run(gw, "nft", "list", "tables").stdout
    again = subprocess.run(lab.prefix(gw) + argv, capture_output=True, text=True)
    assert again.returncode != 0  # and the unit's "-" prefix makes that harmless


def test_second_sigterm_with_workers(tmp_path):
    """
    With worker processes, a SIGTERM to every process of the service (as systemd sends it; the
    primary also signals its workers) starts one drain in each and ends no session; a second
    SIGTERM to the main process ends every drain at once, workers' sessions included, all with
    reason shutdown.
    """
    server = listening_server()
    port = free_port()
    config = write_config(tmp_path, port, server.getsockname()[1], extra_service="drain_timeout = 600\nworkers = 2")
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", config], cwd=str(tmp_path))
    clients, held = [], []
    try:
        worker = int(re.search(r"worker 1 started \(pid (\d+)\)", proc.wait_line(r"worker 1 started")).group(1))
        proc.wait_count(r"mapping web: listening on", 2)
        for _ in range(8):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=30))
            held.append(server.accept()[0])
        for client in clients:
            client.sendall(b"1")
        assert [conn.recv(1) for conn in held] == [b"1"] * 8
        for pid in (proc.popen.pid, worker):  # what systemd does: every process of the unit
            os.kill(pid, signal.SIGTERM)
        proc.wait_count(r"listeners closed; draining", 2)
        for client in clients:
            client.sendall(b"2")
        assert [conn.recv(1) for conn in held] == [b"2"] * 8  # every session still relays
        assert "second stop signal" not in proc.output()
        proc.popen.send_signal(signal.SIGTERM)
        status = proc.finish(timeout=60)
    finally:
        proc.stop()
        for s in clients + held + [server]:
            s.close()
    assert status in (0, -signal.SIGTERM), proc.output()
    reasons = [e["reason"] for e in audit(tmp_path) if e["event"] == "ClientDisconnect"]
    assert reasons == ["shutdown"] * 8, proc.output()
