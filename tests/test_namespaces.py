"""
Across real network namespaces: things only a real network shows (MAC addresses from the
neighbour table).
"""

from __future__ import annotations

import json
import subprocess
import sys

from .netns import lab  # noqa: F401  (fixture)
from .test_end_to_end import ENV, TWISTD, Proc

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(16)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.sendall(sys.argv[2].encode()); c.close()
"""

CLIENT = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
data = b""
while chunk := s.recv(100):
    data += chunk
print(data.decode())
"""


def test_mac_location_recognises_client_across_a_link(lab, tmp_path):
    """
    A user whose location is the client's MAC address is recognised through the gateway's
    neighbour table, and its rule sends it to its own destination; the events say so.
    """
    gw = lab.namespace("gw")
    client = lab.namespace("cl")
    gw_if, client_if = lab.link(gw, "10.231.7.1/24", client, "10.231.7.2/24")
    mac = lab.run(client, "cat", f"/sys/class/net/{client_if}/address").stdout.strip()
    servers = []
    for port, tag in ((7001, "mac-user"), (7002, "everyone-else")):
        server = subprocess.Popen(lab.prefix(gw) + [sys.executable, "-c", SERVER, str(port), tag], stdout=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        servers.append(server)
    config = tmp_path / "wingatemap.toml"
    config.write_text(
        f"""
[service]
audit_log = "events.jsonl"
[users.device]
locations = ["mac:{mac}"]
[mappings.m]
port = 7000
bind = "10.231.7.1"
default = {{ host = "127.0.0.1", port = 7002 }}
[[mappings.m.rules]]
user = "device"
to = {{ host = "127.0.0.1", port = 7001 }}
"""
    )
    proc = Proc(lab.prefix(gw) + TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path), env=ENV)
    try:
        proc.wait_line(r"listening on 10\.231\.7\.1:7000")
        got = subprocess.run(lab.prefix(client) + [sys.executable, "-c", CLIENT, "10.231.7.1", "7000"], capture_output=True, text=True, timeout=60)
        assert got.stdout.strip() == "mac-user", got.stderr
        proc.wait_line(r"ClientDisconnect")
    finally:
        proc.stop()
        for server in servers:
            server.kill()
            server.wait()
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[0]["user"] == "device" and events[0]["identity"] == "assumed" and events[0]["rule"] == 0
    assert events[0]["client_ip"] == "10.231.7.2"
