"""
Event handlers on the real reactor: programs (exit status, environment, timeout, a program that
cannot start) and Python callables (values, Deferreds, exceptions, timeout), and what each
failure means under on_failure block / allow.
"""

from __future__ import annotations

import os
import signal

import pytest
import pytest_twisted
from twisted.internet import defer

from wingate_map.config import Handler
from wingate_map.events._handlers import ProgramHandler, PythonHandler, environment

EVENT = {
    "event": "ClientConnect", "time": "2026-11-26T10:00:00.000Z", "session": "ab-1", "mapping": "m",
    "client_ip": "127.0.0.5", "client_port": 4000, "user": "guest", "identity": "guest", "local_ip": "127.0.0.1",
    "local_port": 80, "original_dst": None, "destination": "10.0.0.1:80", "tls": False, "rule": "default",
}


def reactor():
    from twisted.internet import reactor as r

    return r


def test_environment():
    """
    Every field becomes WINGATEMAP_<FIELD>; null is empty, booleans are true/false.
    """
    env = environment(EVENT)
    assert env["WINGATEMAP_CLIENT_IP"] == "127.0.0.5" and env["WINGATEMAP_CLIENT_PORT"] == "4000"
    assert env["WINGATEMAP_ORIGINAL_DST"] == "" and env["WINGATEMAP_TLS"] == "false"
    assert "PATH" in env and "HOME" not in env


def program(tmp_path, body, **kwargs):
    script = tmp_path / "handler.sh"
    script.write_text("#!/bin/sh\n" + body + "\n")
    script.chmod(0o755)
    return ProgramHandler(Handler(event="ClientConnect", index=0, run=(str(script),), **kwargs), reactor())


@pytest.mark.parametrize(
    "body, allowed",
    [
        ("exit 0", True),
        ("exit 3", False),
        ('test "$WINGATEMAP_USER" = guest && test "$WINGATEMAP_MAPPING" = m', True),
        ('test "$WINGATEMAP_USER" = alice', False),
    ],
)
@pytest_twisted.inlineCallbacks
def test_program_exit_status(tmp_path, body, allowed):
    """
    A program allows with exit status 0 and blocks with anything else; it sees the fields.
    """
    result = yield program(tmp_path, body).client_connect(dict(EVENT))
    assert result is allowed


@pytest.mark.parametrize("on_failure, expected", [("block", False), ("allow", True)])
@pytest_twisted.inlineCallbacks
def test_program_timeout_is_killed(tmp_path, on_failure, expected, caplog_twisted):
    """
    A program that does not finish within timeout is killed; that is a failure.
    """
    # exec: the kill reaches the sleep itself (a shell's child would outlive it).
    handler = program(tmp_path, "exec sleep 30", timeout=0.3, on_failure=on_failure)
    result = yield handler.client_connect(dict(EVENT))
    assert result is expected
    assert any("no answer within 0.3s (killed)" in line for line in caplog_twisted)


@pytest_twisted.inlineCallbacks
def test_program_that_cannot_start(tmp_path, caplog_twisted):
    """
    A program that cannot be started is a failure: blocked by default.
    """
    handler = program(tmp_path, "exit 0")
    (tmp_path / "handler.sh").unlink()
    result = yield handler.client_connect(dict(EVENT))
    assert result is False
    assert any("failed for session ab-1" in line for line in caplog_twisted)


def python_handler(name, **kwargs):
    return PythonHandler(Handler(event="ClientConnect", index=0, python=f"tests.handler_module:{name}", **kwargs), reactor())


@pytest.mark.parametrize(
    "name, client_ip, expected",
    [("block_66", "127.0.0.66", False), ("block_66", "127.0.0.5", True), ("later_allow", "127.0.0.5", True), ("explode", "127.0.0.5", False)],
)
@pytest_twisted.inlineCallbacks
def test_python_callables(name, client_ip, expected):
    """
    A callable's False blocks, anything else allows, a Deferred is waited for, and an
    exception is a failure (blocked by default).
    """
    result = yield python_handler(name).client_connect(dict(EVENT, client_ip=client_ip))
    assert result is expected


@pytest_twisted.inlineCallbacks
def test_python_timeout_allow():
    """
    A callable that never answers times out; with on_failure = allow the session goes on.
    """
    result = yield python_handler("never", timeout=0.2, on_failure="allow").client_connect(dict(EVENT))
    assert result is True


@pytest_twisted.inlineCallbacks
def test_disconnect_handler_never_delays(tmp_path):
    """
    A ClientDisconnect program that is still running delays nothing: its session is already
    gone, and with max_connections = 1 the next connection is served (and ends) while the
    program is still waiting; the program finishes only when the test lets it.
    """
    from twisted.internet import protocol
    from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

    from .helpers import EchoProtocol, Peer, free_port, mapping_config, start_service, wait_for

    started, finished, release = tmp_path / "started", tmp_path / "finished", tmp_path / "release"
    script = tmp_path / "after.sh"
    # Waits (at most 60 s) until the test creates the release file; records its pid to be cleaned up.
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$$ $WINGATEMAP_SESSION" >> "{started}"\n'
        f'i=0; while [ ! -e "{release}" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n'
        f'echo "$WINGATEMAP_SESSION" >> "{finished}"\n'
    )
    script.chmod(0o755)

    def lines(path):
        return path.read_text().splitlines() if path.exists() else []

    echo = protocol.Factory.forProtocol(EchoProtocol)
    echo.noisy = False
    server_port = yield TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(echo)
    port = free_port()
    service, sink = start_service(
        mapping_config(
            port,
            [("127.0.0.1", server_port.getHost().port)],
            extra=f'max_connections = 1\n[[events.ClientDisconnect]]\nrun = ["{script}"]\ntimeout = 60\n',
        )
    )

    @defer.inlineCallbacks
    def session(payload):
        client = Peer(payload=payload)
        yield connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port), client)
        yield wait_for(lambda: client.lost.called, timeout=30)
        assert client.first_bytes == payload

    try:
        yield session(b"first")
        yield wait_for(lambda: len(lines(started)) == 1, timeout=30)
        [(pid, first_session)] = [line.split() for line in lines(started)]
        # The program for the first session is running, and that session is already gone.
        assert len(service.sessions) == 0
        yield session(b"second")  # allowed only because the first session no longer counts
        events = yield sink.disconnects(2)
        assert [e["reason"] for e in events] == ["client-closed", "client-closed"]
        assert events[0]["session"] == first_session
        os.kill(int(pid), 0)  # still running: nothing above waited for it
        assert lines(finished) == []
        release.touch()
        yield wait_for(lambda: len(lines(finished)) == 2, timeout=30)
    finally:
        release.touch()
        for pid, session_id in (line.split() for line in lines(started)):
            if session_id not in lines(finished) and script.name in _command_line(int(pid)):
                os.kill(int(pid), signal.SIGKILL)
        yield service.stopService()
        yield server_port.stopListening()


def _command_line(pid: int) -> str:
    """
    The command line of process C{pid} ("" once it is gone).
    """
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest_twisted.inlineCallbacks
def test_program_timeout_kills_what_it_started(tmp_path):
    """
    A handler that times out is killed with every process it started: a shell's background
    child does not outlive it.
    """
    import psutil

    from .helpers import wait_for

    pidfile = tmp_path / "child.pid"
    handler = program(tmp_path, f"sleep 30 & echo $! > {pidfile}; wait", timeout=0.5)
    result = yield handler.client_connect(dict(EVENT))
    assert result is False
    child = psutil.Process(int(pidfile.read_text()))

    def dead() -> bool:
        try:
            return child.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    try:
        yield wait_for(dead, timeout=10)
    finally:
        if not dead():
            child.kill()
