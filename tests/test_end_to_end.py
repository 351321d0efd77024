"""
End to end: wingatemap as a process (twistd, the wingatemap command, the .tac and systemd
examples) with real clients (curl, redis-cli when present, raw sockets) and real servers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from .helpers import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "docs", "examples")
ENV = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
WINGATEMAP = [sys.executable, "-m", "wingate_map.cli"]


class Proc:
    """
    A child process whose merged output is read line by line, to wait on log lines.
    """

    def __init__(self, args: list[str], cwd: str | None = None, env: dict[str, str] | None = None) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env or ENV
        )
        self.lines: list[str] = []
        self._partial = ""

    def wait_line(self, pattern: str, timeout: float = 30.0) -> str:
        """
        The first output line matching regex C{pattern}, waiting up to C{timeout}s for it.
        """
        regex = re.compile(pattern)
        for line in self.lines:
            if regex.search(line):
                return line
        deadline = time.monotonic() + timeout
        stdout = self.popen.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while time.monotonic() < deadline:
            # Raw reads: a buffered readline() could hold lines select() cannot see.
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._partial += chunk.decode("utf-8", "replace")
            *complete, self._partial = self._partial.split("\n")
            start = len(self.lines)
            self.lines.extend(line + "\n" for line in complete)
            for line in self.lines[start:]:
                if regex.search(line):
                    return line
        raise AssertionError(f"no line matching {pattern!r} from {self.args}; output:\n{''.join(self.lines)}")

    def wait_count(self, pattern: str, count: int, timeout: float = 30.0) -> None:
        """
        Wait until C{count} output lines match C{pattern} (e.g. one from every process).
        """
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while sum(1 for line in self.lines if regex.search(line)) < count:
            seen = len(self.lines)
            try:
                self.wait_line(r"$^", timeout=min(0.2, max(0.01, deadline - time.monotonic())))
            except AssertionError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} lines matching {pattern!r}; output:\n{self.output()}")
            if len(self.lines) == seen and self.popen.poll() is not None:
                raise AssertionError(f"process ended; output:\n{self.output()}")

    def finish(self, timeout: float = 60.0) -> int:
        """
        Wait for the process to exit and collect the rest of its output.
        """
        out, _ = self.popen.communicate(timeout=timeout)
        rest = self._partial + out.decode("utf-8", "replace")
        self._partial = ""
        self.lines.extend(rest.splitlines(keepends=True))
        return self.popen.returncode

    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        try:
            return self.finish(60)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.finish(10)


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    """
    Wait until something accepts on host:port (a server started as a process).
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            # Polling a port is waiting on the port itself, not sleeping for a guess.
            select.select([], [], [], 0.02)


@pytest.fixture
def web_root(tmp_path):
    """
    A real HTTP server (python -m http.server) serving a 5 MB random file.
    """
    root = tmp_path / "www"
    root.mkdir()
    body = os.urandom(5 * 1024 * 1024)
    (root / "blob.bin").write_bytes(body)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port, hashlib.sha256(body).hexdigest()
    finally:
        server.terminate()
        server.wait(10)


def curl(url: str, out: str) -> subprocess.CompletedProcess:
    exe = shutil.which("curl")
    assert exe, "curl is needed for the end-to-end tests (.ci/run installs it)"
    return subprocess.run([exe, "-sS", "--fail", "--max-time", "60", "-o", out, url], capture_output=True, text=True)


def write_config(tmp_path, port: int, dest_port: int, extra_service: str = "") -> str:
    path = tmp_path / "wingatemap.toml"
    path.write_text(
        f'[service]\naudit_log = "events.jsonl"\n{extra_service}\n'
        f'[mappings.web]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {dest_port} }}\n'
    )
    return str(path)


def audit(tmp_path) -> list[dict]:
    path = tmp_path / "events.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_twistd_run_with_curl(tmp_path, web_root):
    """
    twistd -n wingatemap run --config relays a 5 MB download to curl intact, and the audit
    log has ClientConnect then ClientDisconnect with exact byte counts.
    """
    dest_port, digest = web_root
    port = free_port()
    config = write_config(tmp_path, port, dest_port)
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", config], cwd=str(tmp_path))
    try:
        proc.wait_line(rf"mapping web: listening on 127\.0\.0\.1:{port}")
        result = curl(f"http://127.0.0.1:{port}/blob.bin", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256((tmp_path / "out").read_bytes()).hexdigest() == digest
        proc.wait_line(r"ClientDisconnect .* reason=")
    finally:
        code = proc.stop()
    assert code in (0, -signal.SIGTERM), proc.output()
    connect, disconnect = audit(tmp_path)
    assert connect["event"] == "ClientConnect" and disconnect["event"] == "ClientDisconnect"
    assert connect["session"] == disconnect["session"] and connect["mapping"] == "web"
    assert disconnect["bytes_to_client"] > 5 * 1024 * 1024
    assert disconnect["destination"] == f"127.0.0.1:{dest_port}"


@pytest.mark.skipif(not shutil.which("redis-cli"), reason="redis-cli is not installed")
def test_redis_cli_through_map_option(tmp_path):
    """
    redis-cli talks RESP through a --map mapping to a tiny RESP server and gets its answer.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    dest_port = server.getsockname()[1]
    port = free_port()
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--map", f"127.0.0.1:{port}=127.0.0.1:{dest_port}"], cwd=str(tmp_path))
    try:
        proc.wait_line(rf"listening on 127\.0\.0\.1:{port}")
        cli = subprocess.Popen(["redis-cli", "-h", "127.0.0.1", "-p", str(port), "PING"], stdout=subprocess.PIPE, text=True)
        conn, _ = server.accept()
        conn.settimeout(30)
        request = b""
        while not request.endswith(b"PING\r\n"):
            chunk = conn.recv(1024)
            assert chunk, request
            request += chunk
        conn.sendall(b"+PONG\r\n")
        out, _ = cli.communicate(timeout=30)
        conn.close()
        assert out.strip() == "PONG"
    finally:
        proc.stop()
        server.close()


def test_bad_config_exits_nonzero_naming_the_key(tmp_path):
    """
    An invalid configuration starts nothing: exit status 2 and one line per problem, each
    starting with its key path.
    """
    path = tmp_path / "bad.toml"
    path.write_text('[mappings.rdp]\nport = 0\n[mappings.web]\nport = 80\nconect_timeout = 3\n')
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", str(path)], cwd=str(tmp_path))
    code = proc.finish()
    assert code == 2
    out = proc.output()
    assert "mappings.rdp.port: 0 is not a valid port; expected an integer 1-65535" in out
    assert 'mappings.web.conect_timeout: unknown key (did you mean "connect_timeout"?)' in out


def test_port_in_use_exits_nonzero(tmp_path):
    """
    A listener that cannot bind is fatal at start and names the mapping, address and port.
    """
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        config = write_config(tmp_path, port, 9)
        proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", config], cwd=str(tmp_path))
        code = proc.finish()
    finally:
        busy.close()
    assert code != 0
    assert f"mapping web: cannot listen on 127.0.0.1:{port}: Address already in use" in proc.output()


def test_sigterm_drains_then_closes(tmp_path):
    """
    SIGTERM stops accepting at once; a session that ends during the drain ends normally, one
    still open at drain_timeout is closed with reason shutdown; the process exits cleanly.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    port = free_port()
    config = write_config(tmp_path, port, server.getsockname()[1], extra_service="drain_timeout = 3")
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", config], cwd=str(tmp_path))
    try:
        proc.wait_line(r"listening on")
        leaving = socket.create_connection(("127.0.0.1", port))
        staying = socket.create_connection(("127.0.0.1", port))
        held = [server.accept()[0], server.accept()[0]]
        leaving.sendall(b"L")
        readable, _, _ = select.select(held, [], [], 30)
        [leaving_server] = readable
        assert leaving_server.recv(1) == b"L"
        proc.popen.send_signal(signal.SIGTERM)
        proc.wait_line(r"draining 2 live session")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5)
        leaving.close()
        leaving_server.close()
        proc.wait_line(r"ClientDisconnect .* reason=client-closed")
        proc.wait_line(r"drain timeout: closing 1 session", timeout=30)
        code = proc.finish()
        try:
            # Ended sessions are cut (RST): the client must not mistake them for complete.
            assert staying.recv(10) == b""
        except ConnectionResetError:
            pass
        staying.close()
        for conn in held:
            conn.close()
    finally:
        proc.stop()
        server.close()
    assert code in (0, -signal.SIGTERM), proc.output()
    reasons = [e["reason"] for e in audit(tmp_path) if e["event"] == "ClientDisconnect"]
    assert sorted(reasons) == ["client-closed", "shutdown"]


def test_tac_example(tmp_path, web_root):
    """
    docs/examples/wingatemap.tac runs under twistd -ny and relays traffic.
    """
    dest_port, digest = web_root
    port = free_port()
    config = write_config(tmp_path, port, dest_port)
    env = dict(ENV, WINGATEMAP_CONFIG=config)
    proc = Proc(TWISTD + ["-ny", os.path.join(EXAMPLES, "wingatemap.tac"), "--pidfile="], cwd=str(tmp_path), env=env)
    try:
        proc.wait_line(rf"listening on 127\.0\.0\.1:{port}")
        result = curl(f"http://127.0.0.1:{port}/blob.bin", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256((tmp_path / "out").read_bytes()).hexdigest() == digest
    finally:
        proc.stop()


def test_systemd_unit_example(tmp_path, web_root):
    """
    The ExecStartPre and ExecStart commands of docs/examples/wingatemap.service work as
    written (with this test's config file in place of /etc/wingatemap/wingatemap.toml).
    """
    dest_port, digest = web_root
    port = free_port()
    config = write_config(tmp_path, port, dest_port)
    unit = open(os.path.join(EXAMPLES, "wingatemap.service")).read()
    commands = dict(re.findall(r"^(ExecStartPre|ExecStart)=(.*)$", unit, re.M))
    pre = shlex.split(commands["ExecStartPre"].replace("/etc/wingatemap/wingatemap.toml", config))
    start = shlex.split(commands["ExecStart"].replace("/etc/wingatemap/wingatemap.toml", config))
    assert os.path.basename(pre[0]) == "wingatemap" and os.path.basename(start[0]) == "twistd"
    checked = subprocess.run(WINGATEMAP + pre[1:], capture_output=True, text=True, env=ENV)
    assert checked.returncode == 0, checked.stderr
    proc = Proc(TWISTD + start[1:], cwd=str(tmp_path))
    try:
        proc.wait_line(rf"listening on 127\.0\.0\.1:{port}")
        result = curl(f"http://127.0.0.1:{port}/blob.bin", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
    finally:
        assert proc.stop() in (0, -signal.SIGTERM)


def test_sample_config_is_valid():
    """
    docs/examples/wingatemap.toml passes wingatemap check, which lists its listeners.
    """
    result = subprocess.run(WINGATEMAP + ["check", "--config", os.path.join(EXAMPLES, "wingatemap.toml")], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1:8080 -> web" in result.stdout
    assert "127.0.0.1:15432 -> db" in result.stdout and "[::1]:15432 -> db" in result.stdout
    assert "rdp: disabled" in result.stdout


def test_check_reports_every_error(tmp_path):
    """
    wingatemap check exits 2 with one line per error, each naming its key path.
    """
    path = tmp_path / "bad.toml"
    path.write_text('[service]\ndrain_timeout = -1\n[mappings.a]\nport = 70000\n[mappings.b]\nport = 1\nbind = ""\n')
    result = subprocess.run(WINGATEMAP + ["check", "--config", str(path)], capture_output=True, text=True, env=ENV)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert [l.split(":")[0] for l in lines] == ["service.drain_timeout", "mappings.a.port", "mappings.b.bind"]


def test_wingatemap_run_command(tmp_path, web_root):
    """
    wingatemap run --map works like the twistd form.
    """
    dest_port, digest = web_root
    port = free_port()
    proc = Proc(WINGATEMAP + ["run", "--map", f"127.0.0.1:{port}=127.0.0.1:{dest_port}"], cwd=str(tmp_path))
    try:
        proc.wait_line(rf"listening on 127\.0\.0\.1:{port}")
        result = curl(f"http://127.0.0.1:{port}/blob.bin", str(tmp_path / "out"))
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256((tmp_path / "out").read_bytes()).hexdigest() == digest
    finally:
        assert proc.stop() in (0, -signal.SIGTERM)


def test_embedding_example_vetoes():
    """
    docs/examples/embed.py embeds the service; its sink sees both events and its veto blocks
    one client address while another gets through.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(5)
    port = free_port()
    proc = Proc([sys.executable, "-u", os.path.join(EXAMPLES, "embed.py"), str(port), str(server.getsockname()[1]), "127.0.0.66"])
    try:
        proc.wait_line(r"^ready")
        blocked = socket.socket()
        blocked.bind(("127.0.0.66", 0))
        blocked.connect(("127.0.0.1", port))
        assert blocked.recv(10) == b""
        blocked.close()
        line = proc.wait_line(r'"reason": "blocked"')
        assert json.loads(line)["client_ip"] == "127.0.0.66"
        allowed = socket.create_connection(("127.0.0.1", port))
        conn, _ = server.accept()
        allowed.sendall(b"hi")
        assert conn.recv(2) == b"hi"
        conn.close()
        allowed.close()
        line = proc.wait_line(r'"event": "ClientDisconnect".*"client_ip": "127.0.0.1"|"client_ip": "127.0.0.1".*"event": "ClientDisconnect"')
    finally:
        proc.stop()
        server.close()


def test_rules_example_check_and_explain():
    """
    docs/examples/rules.toml is valid, check lists its rules and users, and explain gives the
    destinations the rules cookbook shows.
    """
    path = os.path.join(EXAMPLES, "rules.toml")
    checked = subprocess.run(WINGATEMAP + ["check", "--config", path], capture_output=True, text=True, env=ENV)
    assert checked.returncode == 0, checked.stderr
    assert "rule 2: group = contractors reject" in checked.stdout
    assert "printer-room: mac:52:54:00:12:34:56" in checked.stdout
    expected = {
        "10.0.1.77": "destination: 10.0.0.20:3389 (rule 0)",
        "192.168.5.9": "destination: 10.0.0.30:3389 | 10.0.0.31:3389 (rule 1)",
        "192.168.5.1": "destination: 10.0.0.10:3389 (rule default)",
        "10.0.2.15": "destination: none; the client is rejected (rule 2, reason rejected)",
        "fd00::9": "destination: none; the client is rejected (rule 2, reason rejected)",
    }
    for client, last in expected.items():
        out = subprocess.run(WINGATEMAP + ["explain", "--config", path, "rdp", client], capture_output=True, text=True, env=ENV)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip().splitlines()[-1] == last, out.stdout
    bad = subprocess.run(WINGATEMAP + ["explain", "--config", path, "nosuch", "10.0.0.1"], capture_output=True, text=True, env=ENV)
    assert bad.returncode == 2 and "no mapping called 'nosuch' (mappings: rdp)" in bad.stderr


def test_systemd_unit_verifies(tmp_path):
    """
    systemd-analyze verify accepts docs/examples/wingatemap.service (its /opt/wingatemap/bin
    commands pointed at this environment's wingatemap and twistd), and the unit keeps the
    promises the deployment guide makes: notify, check-then-reload, the drain within
    TimeoutStopSec, the nftables clean-up, the state directory and the token credential.
    """
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze must be installed in CI")
        pytest.skip("systemd-analyze is not installed")
    # The interpreter's own bin directory first (a venv's, where the README installs), then
    # wherever twistd is on PATH (a pyenv shim directory may come before the venv there).
    bin_dir = os.path.dirname(sys.executable)
    if not os.path.exists(os.path.join(bin_dir, "twistd")):
        bin_dir = os.path.dirname(shutil.which("twistd") or sys.executable)
    if not os.path.exists(os.path.join(bin_dir, "wingatemap")):
        if os.environ.get("CI"):
            pytest.fail(f"CI installs wingatemap (README): no wingatemap command next to twistd in {bin_dir}")
        pytest.skip(f"no wingatemap command next to twistd in {bin_dir}")
    text = open(os.path.join(EXAMPLES, "wingatemap.service")).read()
    unit = tmp_path / "wingatemap.service"
    unit.write_text(text.replace("/opt/wingatemap/bin/", bin_dir + "/"))
    result = subprocess.run([analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "wingatemap.service" not in result.stderr, result.stderr
    settings = re.findall(r"^(\w+)=(.*)$", text, re.M)
    assert ("Type", "notify") in settings
    assert [v for k, v in settings if k == "ExecReload"] == [
        "/opt/wingatemap/bin/wingatemap check --config /etc/wingatemap/wingatemap.toml",
        "/bin/kill -HUP $MAINPID",
    ]
    assert ("ExecStopPost", "-+/usr/sbin/nft delete table inet wingatemap") in settings
    assert ("StateDirectory", "wingatemap") in settings
    assert ("LoadCredential", "admin-token:/etc/wingatemap/admin-token") in settings
    timeout = int(dict(settings)["TimeoutStopSec"])
    from wingate_map.config import ServiceSettings

    assert timeout > ServiceSettings().drain_timeout
