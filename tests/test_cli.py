"""
The wingatemap command against a running service: --version, sessions with --json and filters,
kill with several ids, reload (applied and refused).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess

from .helpers import free_port
from .test_end_to_end import ENV, WINGATEMAP
from .test_operations import TOKEN, EchoServer, api, connect, start

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(WINGATEMAP + list(args), capture_output=True, text=True, env=ENV, timeout=60)


def ended(client) -> bool:
    """
    Whether the relay ended this client's connection (a killed session is reset, or closed).
    """
    try:
        return client.recv(10) == b""
    except ConnectionResetError:
        return True


def test_version():
    """
    wingatemap --version prints the project's version.
    """
    with open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8") as f:
        version = next(line.split('"')[1] for line in f if line.startswith("version = "))
    done = cli("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"wingatemap {version}"


def test_sessions_filters_kill_and_reload(tmp_path):
    """
    sessions --json lists the API's objects; --client, --mapping and --user select; kill takes
    several ids and reports the one that does not exist; reload applies a valid file and shows
    why an invalid one was refused.
    """
    echo = EchoServer()
    port, admin = free_port(), free_port()
    base = (
        f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\ntoken = "{TOKEN}"\n'
        f'[users.alice]\nlocations = ["127.0.0.2"]\n'
        f'[mappings.web]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {echo.port} }}\n'
    )
    proc, config = start(tmp_path, base)
    config.chmod(0o600)
    clients = []
    try:
        proc.wait_line(r"admin API listening")
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.3"):
            client = connect(port, source)
            client.sendall(b"ping")
            assert client.recv(10) == b"ping"
            clients.append(client)
        listed = cli("sessions", "--config", str(config), "--json")
        assert listed.returncode == 0, listed.stderr
        everything = json.loads(listed.stdout)
        assert sorted(s["client_ip"] for s in everything) == ["127.0.0.2", "127.0.0.3", "127.0.0.3"]
        only = json.loads(cli("sessions", "--config", str(config), "--json", "--client", "127.0.0.3").stdout)
        assert [s["client_ip"] for s in only] == ["127.0.0.3", "127.0.0.3"]
        network = json.loads(cli("sessions", "--config", str(config), "--json", "--client", "127.0.0.2/32").stdout)
        assert [s["client_ip"] for s in network] == ["127.0.0.2"]
        alice = json.loads(cli("sessions", "--config", str(config), "--json", "--user", "alice").stdout)
        assert [s["user"] for s in alice] == ["alice"]
        assert json.loads(cli("sessions", "--config", str(config), "--json", "--mapping", "other").stdout) == []
        table = cli("sessions", "--config", str(config), "--user", "alice")
        assert table.returncode == 0 and "127.0.0.2" in table.stdout and "127.0.0.3" not in table.stdout
        bad = cli("sessions", "--config", str(config), "--client", "nowhere")
        assert bad.returncode == 2 and "--client 'nowhere' is not an IP address or network" in bad.stderr

        ids = [s["session"] for s in only]
        killed = cli("kill", "--config", str(config), ids[0], "no-such-session", ids[1])
        assert killed.returncode == 1
        assert killed.stdout.splitlines() == [f"killed {ids[0]}", f"killed {ids[1]}"]
        assert "no-such-session: no live session no-such-session" in killed.stderr
        for client in clients[1:]:
            assert ended(client)
        assert [s["client_ip"] for s in api(admin, "GET", "/sessions")[1]] == ["127.0.0.2"]

        config.write_text(base.replace("[users.alice]", "[users.bob]"))
        reloaded = cli("reload", "--config", str(config))
        assert (reloaded.returncode, reloaded.stdout.strip()) == (0, "reloaded")
        proc.wait_line(r"configuration reloaded")
        config.write_text(base + "[mappings.broken]\nport = 0\n")
        invalid = cli("reload", "--config", str(config))
        assert invalid.returncode == 2 and "mappings.broken.port" in invalid.stderr
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        try:
            config.write_text(base + f'[mappings.busy]\nport = {taken.getsockname()[1]}\nbind = "127.0.0.1"\n')
            refused = cli("reload", "--config", str(config))
        finally:
            taken.close()
        assert refused.returncode == 1
        assert "reload refused, the running configuration stays:" in refused.stderr
        assert "mapping busy: cannot listen on 127.0.0.1" in refused.stderr
    finally:
        for client in clients:
            client.close()
        proc.stop()
        echo.close()
