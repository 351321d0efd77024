"""
End to end with real third-party peers: HAProxy in front of wingatemap sending PROXY v2, and
nginx behind it reading the PROXY header wingatemap sends.  CI installs both (.ci/run); on a
machine without them these tests are skipped, except under CI where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import socketserver
import subprocess
import threading

import pytest

from .helpers import free_port
from .test_end_to_end import TWISTD, Proc, wait_port


def need(program: str) -> str:
    path = shutil.which(program) or (f"/usr/sbin/{program}" if os.path.exists(f"/usr/sbin/{program}") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is not installed; .ci/run must install it")
        pytest.skip(f"{program} is not installed")
    return path


class _Tagged(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def tagged_server(tag: bytes) -> _Tagged:
    """
    A server that answers every connection with C{tag} and closes.
    """

    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(tag)

    server = _Tagged(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def read_all(source_ip: str, port: int) -> bytes:
    with socket.socket() as s:
        s.settimeout(30)
        s.bind((source_ip, 0))
        s.connect(("127.0.0.1", port))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


def test_haproxy_in_front_sends_proxy_v2(tmp_path):
    """
    Clients reach HAProxy, which connects to wingatemap with send-proxy-v2: the rule for the
    real client address (not HAProxy's) applies, and the events name the real client.
    """
    haproxy = need("haproxy")
    lab, other = tagged_server(b"lab"), tagged_server(b"other")
    wport, hport = free_port(), free_port()
    config = tmp_path / "wingatemap.toml"
    config.write_text(
        f"""
[service]
audit_log = "events.jsonl"
[mappings.behind_lb]
port = {wport}
bind = "127.0.0.1"
proxy_protocol = true
proxy_protocol_from = ["127.0.0.1"]
default = {{ host = "127.0.0.1", port = {other.server_address[1]} }}
[[mappings.behind_lb.rules]]
from = ["127.0.0.44"]
to = {{ host = "127.0.0.1", port = {lab.server_address[1]} }}
"""
    )
    (tmp_path / "haproxy.cfg").write_text(
        f"""
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{hport}
    default_backend be
backend be
    server wingatemap 127.0.0.1:{wport} send-proxy-v2
"""
    )
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path))
    lb = subprocess.Popen([haproxy, "-db", "-f", str(tmp_path / "haproxy.cfg")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        proc.wait_line(rf"listening on 127\.0\.0\.1:{wport}")
        wait_port(hport)
        assert read_all("127.0.0.44", hport) == b"lab"
        assert read_all("127.0.0.45", hport) == b"other"
        line = proc.wait_line(r"ClientDisconnect .* client=127\.0\.0\.45:")
        assert "reason=destination-closed" in line
        # Straight to wingatemap without a header: cut off (reset), logged with peer and why.
        with pytest.raises(ConnectionResetError):
            with socket.create_connection(("127.0.0.1", wport), timeout=30) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                while s.recv(4096):
                    pass
        proc.wait_line(r"closed connection from 127\.0\.0\.1:\d+: no PROXY header")
    finally:
        lb.terminate()
        lb.wait(10)
        proc.stop()
        lab.shutdown()
        other.shutdown()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_nginx_destination_sees_real_client(tmp_path, version):
    """
    A destination with proxy_protocol = v1/v2 (nginx with a proxy_protocol listener) learns
    the real client's address and port.
    """
    nginx = need("nginx")
    nport, wport = free_port(), free_port()
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (tmp_path / sub).mkdir()
    (tmp_path / "nginx.conf").write_text(
        f"""
daemon off;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp_path}/body;
    proxy_temp_path {tmp_path}/proxy;
    fastcgi_temp_path {tmp_path}/fastcgi;
    uwsgi_temp_path {tmp_path}/uwsgi;
    scgi_temp_path {tmp_path}/scgi;
    server {{
        listen 127.0.0.1:{nport} proxy_protocol;
        location / {{ return 200 "client=$proxy_protocol_addr:$proxy_protocol_port\\n"; }}
    }}
}}
"""
    )
    server = subprocess.Popen([nginx, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", str(tmp_path / "error.log")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    config = tmp_path / "wingatemap.toml"
    config.write_text(
        f'[mappings.web]\nport = {wport}\nbind = "127.0.0.1"\n'
        f'default = {{ host = "127.0.0.1", port = {nport}, proxy_protocol = "{version}" }}\n'
    )
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path))
    try:
        wait_port(nport)
        proc.wait_line(rf"listening on 127\.0\.0\.1:{wport}")
        with socket.socket() as s:
            s.settimeout(30)
            s.bind(("127.0.0.55", 0))
            source_port = s.getsockname()[1]
            s.connect(("127.0.0.1", wport))
            s.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 200"), data
        assert f"client=127.0.0.55:{source_port}".encode() in data
    finally:
        proc.stop()
        server.terminate()
        server.wait(10)
