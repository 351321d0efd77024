"""
Event handlers on the real reactor: programs (exit status, environment, timeout, a program that
cannot start) and Python callables (values, Deferreds, exceptions, timeout), and what each
failure means under on_failure block / allow.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import defer

from wingate_map.config import Handler
from wingate_map.handlers import ProgramHandler, PythonHandler, environment

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
    handler = program(tmp_path, "sleep 30", timeout=0.3, on_failure=on_failure)
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
    A ClientDisconnect program runs after the fact: the call returns at once.
    """
    script = tmp_path / "after.sh"
    marker = tmp_path / "ran"
    script.write_text(f"#!/bin/sh\ntouch {marker}\nsleep 30\n")
    script.chmod(0o755)
    handler = ProgramHandler(Handler(event="ClientDisconnect", index=0, run=(str(script),), timeout=0.5), reactor())
    assert handler.client_disconnect(dict(EVENT, event="ClientDisconnect")) is None
    assert handler.client_connect(dict(EVENT)) is None  # not a ClientConnect handler
    from .helpers import wait_for

    yield wait_for(marker.exists)
    yield defer.succeed(None)
