"""
TLS end to end with real peers: openssl s_server as a TLS destination, curl and openssl s_client
as TLS clients of a wingatemap listener that requires client certificates.
"""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess

import pytest

from .helpers import free_port
from .pki import PKI
from .test_end_to_end import TWISTD, Proc, web_root, wait_port  # noqa: F401  (fixture)


def openssl() -> str:
    path = shutil.which("openssl")
    assert path, "openssl is needed (.ci/run installs it)"
    return path


@pytest.fixture
def pki(tmp_path):
    return PKI(tmp_path)


def test_openssl_s_server_as_tls_destination(tmp_path, pki):
    """
    A plain client reaches openssl s_server through a mapping with a verified TLS
    destination, and gets its answer.
    """
    cert, key = pki.server()
    sport, wport = free_port(), free_port()
    server = subprocess.Popen(
        [openssl(), "s_server", "-accept", f"127.0.0.1:{sport}", "-cert", cert, "-key", key, "-www", "-quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    config = tmp_path / "wingatemap.toml"
    config.write_text(
        f'[mappings.m]\nport = {wport}\nbind = "127.0.0.1"\n'
        f'default = {{ host = "127.0.0.1", port = {sport}, tls = true, ca = "{pki.ca}", server_name = "localhost" }}\n'
    )
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path))
    try:
        wait_port(sport)
        proc.wait_line(rf"listening on 127\.0\.0\.1:{wport}")
        with socket.create_connection(("127.0.0.1", wport), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        assert data.startswith(b"HTTP/1.0 200 ok"), data[:200]
        line = proc.wait_line(r"ClientDisconnect")
        assert "reason=destination-closed" in line
    finally:
        proc.stop()
        server.kill()
        server.wait()


def tls_listener(tmp_path, pki, dest_port):
    cert, key = pki.server()
    port = free_port()
    config = tmp_path / "wingatemap.toml"
    config.write_text(
        f'[service]\naudit_log = "events.jsonl"\n'
        f'[users.alice]\ncertificates = ["alice"]\n'
        f'[mappings.secure]\nport = {port}\nbind = "127.0.0.1"\n'
        f'tls = {{ cert = "{cert}", key = "{key}", client_ca = "{pki.ca}" }}\n'
        f'[[mappings.secure.rules]]\nuser = "alice"\nto = {{ host = "127.0.0.1", port = {dest_port} }}\n'
    )
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path))
    proc.wait_line(rf"listening on 127\.0\.0\.1:{port}")
    return proc, port


def test_curl_through_tls_listener(tmp_path, pki, web_root):
    """
    curl (which offers ALPN) with a client certificate downloads 5 MB intact through a TLS
    listener and exits cleanly; the session is alice's, authenticated, on TLS.
    """
    dest_port, digest = web_root
    alice_cert, alice_key = pki.client("alice")
    proc, port = tls_listener(tmp_path, pki, dest_port)
    try:
        out = tmp_path / "out"
        result = subprocess.run(
            ["curl", "-sS", "--fail", "--max-time", "60", "--cacert", pki.ca, "--cert", alice_cert, "--key", alice_key,
             "-o", str(out), f"https://localhost:{port}/blob.bin"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
        proc.wait_line(r"ClientDisconnect")
        connect = proc.wait_line(r"ClientConnect")
        assert "user=alice (authenticated)" in connect
    finally:
        proc.stop()
    assert "Unhandled Error" not in proc.output() and "Traceback" not in proc.output(), proc.output()


def test_openssl_s_client_through_tls_listener(tmp_path, pki, web_root):
    """
    openssl s_client with a client certificate gets an HTTP answer through a TLS listener and
    closes cleanly (exit status 0); without a certificate the handshake fails and is logged.
    """
    dest_port, digest = web_root
    alice_cert, alice_key = pki.client("alice")
    proc, port = tls_listener(tmp_path, pki, dest_port)
    try:
        result = subprocess.run(
            [openssl(), "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-CAfile", pki.ca,
             "-cert", alice_cert, "-key", alice_key, "-quiet", "-verify_return_error"],
            input=b"HEAD / HTTP/1.0\r\n\r\n",
            capture_output=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(b"HTTP/1.0 200 OK"), result.stdout[:200]
        proc.wait_line(r"ClientDisconnect")
        refused = subprocess.run(
            [openssl(), "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", pki.ca, "-quiet"],
            input=b"HEAD / HTTP/1.0\r\n\r\n",
            capture_output=True,
            timeout=60,
        )
        assert not refused.stdout.startswith(b"HTTP/")
        proc.wait_line(r"TLS handshake with 127\.0\.0\.1:\d+ failed")
    finally:
        proc.stop()
    assert "Unhandled Error" not in proc.output(), proc.output()
