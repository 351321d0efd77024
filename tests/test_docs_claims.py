"""
What the guides promise a newcomer, checked against the real program: quickstart's output for
an invalid file, the exit status after Ctrl-C, and a reload re-reading TLS files.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import time

import pytest_twisted

from wingate_map.testing import RecordingSink

from .helpers import Peer, free_port
from .pki import PKI
from .test_end_to_end import ENV, ROOT, TWISTD, WINGATEMAP, Proc
from .test_integration import connect
from .test_tls import tls_destination_config, tls_server


def _quickstart_invalid_example() -> tuple[str, str, str]:
    """
    From docs/quickstart.md: the invalid bad.toml, what check prints, what twistd prints.
    """
    with open(os.path.join(ROOT, "docs", "quickstart.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("For this `bad.toml`:", 1)[1]
    blocks = re.findall(r"```(?:toml)?\n(.*?)```", section, re.DOTALL)
    return blocks[0], blocks[1], blocks[2]


def test_quickstart_invalid_configuration_output(tmp_path):
    """
    For quickstart's bad.toml, wingatemap check, twistd and wingatemap run print exactly what
    the guide shows, on standard error, and exit with status 2.
    """
    bad, check_output, run_output = _quickstart_invalid_example()
    (tmp_path / "bad.toml").write_text(bad)
    commands = [
        (WINGATEMAP + ["check", "--config", "bad.toml"], check_output),
        (TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", "bad.toml"], run_output),
        (WINGATEMAP + ["run", "--config", "bad.toml"], run_output),
    ]
    for command, shown in commands:
        done = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", shown), command


def _wait_for_signal_handlers(pid: int, timeout: float = 30.0) -> None:
    """
    Wait until process C{pid} catches SIGTERM: the reactor has installed its signal handlers
    (Python itself catches SIGINT from the start, SIGTERM only once Twisted does).
    """
    bit = 1 << (signal.SIGTERM - 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
        if caught & bit:
            return
        select.select([], [], [], 0.02)  # polling the process's own state, not guessing a delay
    raise AssertionError("the reactor never installed its signal handlers")


def test_ctrl_c_exit_status(tmp_path):
    """
    Ctrl-C (SIGINT) stops wingatemap run cleanly, and the process then ends killed by SIGINT
    (status 130 in a shell), as deployment.md says: twistd re-raises the signal.
    """
    config = tmp_path / "wingatemap.toml"
    config.write_text(f'[mappings.web]\nport = {free_port()}\nbind = "127.0.0.1"\ndefault = "127.0.0.1:9"\n')
    proc = Proc(WINGATEMAP + ["run", "--config", str(config)])
    try:
        proc.wait_line(r"mapping web: listening on")
        _wait_for_signal_handlers(proc.popen.pid)
        proc.popen.send_signal(signal.SIGINT)
        code = proc.finish(60)
    finally:
        proc.stop()
    assert code == -signal.SIGINT, proc.output()
    assert "Received SIGINT, shutting down." in proc.output()
    assert "Traceback" not in proc.output()


@pytest_twisted.inlineCallbacks
def test_reload_rereads_destination_tls_files(tmp_path):
    """
    A reload re-reads a destination's TLS files (here its ca): after the CA file is fixed and
    the service reloaded, new sessions reach the destination; a CA file that is not valid
    refuses the reload, naming the key, and the running configuration stays.
    """
    from wingate_map import service_from_file

    (tmp_path / "good").mkdir()
    (tmp_path / "other").mkdir()
    pki, other = PKI(tmp_path / "good"), PKI(tmp_path / "other", name="another CA")
    cert, key = pki.server()
    server_port, servers = yield tls_server(cert, key, payload=b"hello", half_close=False)
    ca = tmp_path / "destination-ca.pem"
    ca.write_bytes(open(other.ca, "rb").read())  # the wrong CA first
    port = free_port()
    config = tmp_path / "wingatemap.toml"
    config.write_text("[service]\ndrain_timeout = 0\n" + tls_destination_config(port, server_port.getHost().port, ca=str(ca), server_name="localhost"))
    sink = RecordingSink()
    service = service_from_file(str(config), sinks=[sink])
    service.startService()
    try:
        client = Peer(payload=b"", half_close=False)
        yield connect(port, client)
        [first] = yield sink.disconnects(1)
        assert first["reason"] == "tls-failed"
        ca.write_bytes(open(pki.ca, "rb").read())
        assert service.reload() == []
        client = Peer(payload=b"", half_close=False, close_on_eof=False)
        yield connect(port, client)
        yield client.when_received(5)
        client.transport.loseConnection()
        yield sink.disconnects(2)
        ca.write_text("not a certificate\n")
        problems = service.reload()
        assert len(problems) == 1 and problems[0].startswith("mappings.m.default.ca: ")
        client = Peer(payload=b"", half_close=False, close_on_eof=False)
        yield connect(port, client)
        yield client.when_received(5)  # still the CA read at the last good reload
        client.transport.loseConnection()
        yield sink.disconnects(3)
    finally:
        yield service.stopService()
        yield server_port.stopListening()


def _admin_config(path, admin: str, mapping_port: int) -> None:
    path.write_text(f'{admin}\n[mappings.web]\nport = {mapping_port}\nbind = "127.0.0.1"\ndefault = "127.0.0.1:9"\n')


def test_reload_applies_admin_token_and_only_listen_waits(tmp_path):
    """
    A reload applies a new admin token at once (the old one is refused from then on); a new
    admin.listen is logged as waiting for the next restart while the API stays where it was;
    and a reload that would leave a listener on a non-loopback address without a token is
    refused, the token still required.
    """
    from .test_operations import api

    admin_port, other_port, mapping_port = free_port(), free_port(), free_port()
    config = tmp_path / "wingatemap.toml"
    listen = f"tcp:{admin_port}:interface=0.0.0.0"
    _admin_config(config, f'[admin]\nlisten = "{listen}"\ntoken = "first-token"', mapping_port)
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path))
    try:
        proc.wait_line(r"admin API listening on")
        _admin_config(config, f'[admin]\nlisten = "{listen}"\ntoken = "second-token"', mapping_port)
        assert api(admin_port, "POST", "/reload", token="first-token") == (200, {"reloaded": True})
        assert api(admin_port, "GET", "/sessions", token="second-token") == (200, [])
        assert api(admin_port, "GET", "/sessions", token="first-token")[0] == 401

        # A loopback listen without a token, or no [admin] at all, would be valid for a new
        # start, but the running listener on 0.0.0.0 would lose its token.
        for without_token in (f'[admin]\nlisten = "tcp:{other_port}:interface=127.0.0.1"', ""):
            _admin_config(config, without_token, mapping_port)
            status, body = api(admin_port, "POST", "/reload", token="second-token")
            assert status == 400 and body["errors"][0].startswith("admin.token: the admin API keeps listening on"), body
            assert api(admin_port, "GET", "/sessions", token=None)[0] == 401

        _admin_config(config, f'[admin]\nlisten = "tcp:{other_port}:interface=127.0.0.1"\ntoken = "second-token"', mapping_port)
        assert api(admin_port, "POST", "/reload", token="second-token") == (200, {"reloaded": True})
        proc.wait_line(rf"reload: admin\.listen takes effect at the next restart; the admin API keeps listening on {re.escape(listen)} until then")
        assert api(admin_port, "GET", "/sessions", token="second-token") == (200, [])
    finally:
        proc.stop()
    assert "[admin] changes take effect" not in proc.output()
