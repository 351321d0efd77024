"""
The audit log file: created 0640 whatever the umask, never opened through a symbolic link (a
start error, or a refused reload), appended with O_APPEND, and reopened by a reload so that
logrotate's move-then-reload (SIGHUP or POST /reload) starts a new file at the same path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat

import pytest
import pytest_twisted

from wingate_map.errors import WingateMapError
from wingate_map.events import AuditLogSink

from .helpers import free_port, mapping_config, start_service, wait_for
from .test_end_to_end import TWISTD, Proc


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in open(path, encoding="utf-8").read().splitlines()] if os.path.exists(path) else []


def _event(n: int) -> dict:
    return {"event": "ClientConnect", "session": f"s-{n}"}


@pytest.mark.parametrize("umask", [0o000, 0o022, 0o077])
def test_created_0640_whatever_the_umask(tmp_path, umask):
    """
    A new audit log is readable by its owner and group only (0640), whatever the umask.
    """
    path = tmp_path / "events.jsonl"
    previous = os.umask(umask)
    try:
        sink = AuditLogSink(str(path))
    finally:
        os.umask(previous)
    sink.client_connect(_event(1))
    sink.close()
    assert _mode(path) == 0o640
    assert _lines(path) == [_event(1)]


def test_existing_file_is_appended_and_its_mode_kept(tmp_path):
    """
    An existing audit log is appended to, and the mode the operator (or logrotate's
    C{create}) gave it is left alone.
    """
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(_event(0)) + "\n")
    os.chmod(path, 0o600)
    sink = AuditLogSink(str(path))
    sink.client_disconnect(_event(1))
    sink.close()
    sink.close()  # closing twice is harmless
    assert _lines(path) == [_event(0), _event(1)] and _mode(path) == 0o600


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_is_never_opened(tmp_path, dangling):
    """
    A symbolic link at the audit log's path is refused with a message saying so; the file it
    points to is neither written nor created.
    """
    target = tmp_path / "elsewhere"
    if not dangling:
        target.write_text("precious\n")
    link = tmp_path / "events.jsonl"
    link.symlink_to(target)
    with pytest.raises(OSError) as info:
        AuditLogSink(str(link))
    assert info.value.strerror == "it is a symbolic link, and the audit log is never opened through one"
    assert (target.read_text() == "precious\n") if not dangling else not target.exists()


def test_two_writers_append_whole_lines(tmp_path):
    """
    Two processes' sinks (workers) on one file never overwrite each other's lines.
    """
    path = tmp_path / "events.jsonl"
    first, second = AuditLogSink(str(path)), AuditLogSink(str(path))
    for n in range(4):
        (first if n % 2 else second).client_connect(_event(n))
    first.close()
    second.close()
    assert _lines(path) == [_event(n) for n in range(4)]


def test_reopen_follows_a_rotation(tmp_path):
    """
    After the file is moved away, reopen starts a new file (0640) at the same path; what was
    written before stays in the moved file.
    """
    path = tmp_path / "events.jsonl"
    sink = AuditLogSink(str(path))
    sink.client_connect(_event(1))
    os.rename(path, tmp_path / "events.jsonl.1")
    sink.client_connect(_event(2))  # before the reopen: still the moved file
    sink.reopen()
    sink.client_connect(_event(3))
    sink.close()
    assert _lines(tmp_path / "events.jsonl.1") == [_event(1), _event(2)]
    assert _lines(path) == [_event(3)] and _mode(path) == 0o640


def test_reopen_refuses_a_symlink_and_keeps_writing(tmp_path):
    """
    If a symbolic link has taken the path's place, reopen fails and events keep going to the
    file already open.
    """
    path = tmp_path / "events.jsonl"
    sink = AuditLogSink(str(path))
    os.rename(path, tmp_path / "events.jsonl.1")
    path.symlink_to(tmp_path / "target")
    with pytest.raises(OSError):
        sink.reopen()
    sink.client_connect(_event(1))
    sink.close()
    assert _lines(tmp_path / "events.jsonl.1") == [_event(1)] and not (tmp_path / "target").exists()


def test_symlink_audit_log_is_a_start_error(tmp_path):
    """
    A symbolic link at the audit log's path stops start-up with an error naming
    service.audit_log, and no listener is opened.
    """
    link = tmp_path / "events.jsonl"
    link.symlink_to(tmp_path / "target")
    port = free_port()
    with pytest.raises(WingateMapError) as info:
        start_service(mapping_config(port, [("127.0.0.1", 9)], service=f'audit_log = "{link}"'))
    assert str(info.value) == f"service.audit_log: cannot open {link}: it is a symbolic link, and the audit log is never opened through one"
    assert not (tmp_path / "target").exists()


def _session(port: int) -> None:
    """
    One connection to the mapping; its destination refuses, so the session ends at once.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30):
        pass


@pytest_twisted.inlineCallbacks
def test_reload_reopens_the_audit_log(tmp_path):
    """
    Move the audit log away and reload: new events go to a new file at the same path, the old
    ones stay in the moved file.  A reload that finds a symbolic link at the path is refused
    (naming service.audit_log), and events keep going to the file already open.
    """
    from twisted.internet import reactor

    from wingate_map import service_from_file

    path = tmp_path / "events.jsonl"
    port = free_port()
    config = tmp_path / "wingatemap.toml"
    config.write_text(mapping_config(port, [("127.0.0.1", free_port())], service=f'drain_timeout = 0.5\naudit_log = "{path}"'))
    service = service_from_file(str(config), reactor=reactor)
    service.startService()
    try:
        _session(port)
        yield wait_for(lambda: len(_lines(path)) == 2)
        os.rename(path, tmp_path / "events.jsonl.1")
        assert service.reload() == []
        _session(port)
        yield wait_for(lambda: len(_lines(path)) == 2)
        assert [e["event"] for e in _lines(path)] == ["ClientConnect", "ClientDisconnect"]
        assert len(_lines(tmp_path / "events.jsonl.1")) == 2 and _mode(path) == 0o640
        os.rename(path, tmp_path / "events.jsonl.2")
        path.symlink_to(tmp_path / "target")
        problems = service.reload()
        assert problems == [f"service.audit_log: cannot open {path}: it is a symbolic link, and the audit log is never opened through one"]
        _session(port)
        yield wait_for(lambda: len(_lines(tmp_path / "events.jsonl.2")) == 4)
        assert not (tmp_path / "target").exists()
    finally:
        yield service.stopService()


def test_sighup_after_a_move_starts_a_new_file(tmp_path):
    """
    Under twistd, logrotate's way (move the file, then SIGHUP) leaves the old events in the
    moved file and writes new ones to a new file at the configured path.
    """
    port = free_port()
    config = tmp_path / "wingatemap.toml"
    config.write_text(mapping_config(port, [("127.0.0.1", free_port())], service='drain_timeout = 0.5\naudit_log = "events.jsonl"'))
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path))
    path, moved = tmp_path / "events.jsonl", tmp_path / "events.jsonl.1"
    try:
        proc.wait_line(r"mapping m: listening")
        _session(port)
        proc.wait_line(r"ClientDisconnect")
        os.rename(path, moved)
        proc.popen.send_signal(signal.SIGHUP)
        proc.wait_line(r"configuration reloaded")
        _session(port)
        proc.wait_count(r"ClientDisconnect", 2)
    finally:
        proc.stop()
    assert [e["event"] for e in _lines(moved)] == ["ClientConnect", "ClientDisconnect"]
    assert [e["event"] for e in _lines(path)] == ["ClientConnect", "ClientDisconnect"]
    assert _lines(path)[0]["session"] != _lines(moved)[0]["session"]
