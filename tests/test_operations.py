"""
Operations end to end: the admin API (every endpoint, auth on and off), the sessions and kill
commands, reload by POST and SIGHUP (good and bad files, sessions and listeners kept),
connection limits and event handlers, with wingatemap running under twistd.
"""

from __future__ import annotations

import base64
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from .helpers import free_port
from .test_end_to_end import ENV, TWISTD, WINGATEMAP, Proc, wait_port

TOKEN = "test-token-123"


class EchoServer:
    """
    A threaded echo server in this process (a destination).
    """

    def __init__(self, tag: bytes = b""):
        import socketserver
        import threading

        tag_bytes = tag

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                if tag_bytes:
                    self.request.sendall(tag_bytes)
                while data := self.request.recv(65536):
                    self.request.sendall(data)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 256  # many relayed connections arrive at once

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def api(port, method, path, token=TOKEN, body=None, basic=None):
    """
    One admin API request (Bearer C{token}, or HTTP Basic with C{basic} = (user, password));
    (status, JSON or text body).
    """
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=json.dumps(body).encode() if body is not None else None)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if basic:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{basic[0]}:{basic[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            data = response.read()
            return response.status, (json.loads(data) if response.headers.get_content_type() == "application/json" else data.decode())
    except urllib.error.HTTPError as e:
        data = e.read()
        return e.code, json.loads(data) if data.startswith(b"{") else data.decode()


def start(tmp_path, text, name="wingatemap.toml"):
    config = tmp_path / name
    config.write_text(text)
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path))
    return proc, config


def events(tmp_path):
    path = tmp_path / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def connect(port, source="127.0.0.1"):
    s = socket.socket()
    s.settimeout(30)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def test_admin_api_endpoints_and_cli(tmp_path):
    """
    /healthz needs no token; everything else does (wrong or missing token: 401). /sessions
    shows a live session with live byte counts; kill (API and CLI) ends it with reason
    killed; /metrics counts it; credentials log a client address in as a user (authenticated)
    and out again; bad requests get 400/404 with a reason.
    """
    echo = EchoServer()
    port, admin = free_port(), free_port()
    proc, config = start(
        tmp_path,
        f'[service]\naudit_log = "events.jsonl"\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\ntoken = "{TOKEN}"\n'
        f'[users.alice]\nlocations = ["10.255.0.1"]\n'
        f'[mappings.web]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {echo.port} }}\n',
    )
    try:
        proc.wait_line(r"admin API listening")
        assert api(admin, "GET", "/healthz", token=None)[0] == 200
        status, body = api(admin, "GET", "/sessions", token=None)
        assert status == 401 and "missing or wrong token" in body["error"]
        assert api(admin, "GET", "/sessions", token="wrong-token-xx")[0] == 401
        assert api(admin, "GET", "/metrics", token=None)[0] == 401
        assert api(admin, "GET", "/sessions") == (200, [])
        client = connect(port)
        client.sendall(b"x" * 1000)
        assert len(client.recv(2000)) > 0
        status, sessions = api(admin, "GET", "/sessions")
        [live] = sessions
        assert live["mapping"] == "web" and live["user"] == "guest" and live["bytes_from_client"] == 1000
        client.sendall(b"y" * 500)
        client.recv(2000)
        assert api(admin, "GET", "/sessions")[1][0]["bytes_from_client"] == 1500
        listed = subprocess.run(WINGATEMAP + ["sessions", "--config", str(config)], capture_output=True, text=True, env=ENV)
        assert listed.returncode == 0 and live["session"] in listed.stdout and "guest (guest)" in listed.stdout
        assert api(admin, "DELETE", f"/sessions/{live['session']}") == (200, {"killed": live["session"]})
        try:
            assert client.recv(10) == b""
        except ConnectionResetError:
            pass
        assert api(admin, "DELETE", f"/sessions/{live['session']}")[0] == 404
        second = connect(port)
        second.sendall(b"z")
        second.recv(10)
        [other] = api(admin, "GET", "/sessions")[1]
        killed = subprocess.run(WINGATEMAP + ["kill", "--config", str(config), other["session"]], capture_output=True, text=True, env=ENV)
        assert killed.returncode == 0 and f"killed {other['session']}" in killed.stdout
        missing = subprocess.run(WINGATEMAP + ["kill", "--config", str(config), "nope"], capture_output=True, text=True, env=ENV)
        assert missing.returncode == 1 and "no live session nope" in missing.stderr
        proc.wait_line(r"ClientDisconnect .* reason=killed")
        metrics = api(admin, "GET", "/metrics")[1]
        assert 'wingatemap_sessions_ended_total{mapping="web",reason="killed"} 2.0' in metrics
        assert 'wingatemap_connections_accepted_total{mapping="web"} 2.0' in metrics
        assert "wingatemap_connect_latency_seconds_bucket" in metrics and "wingatemap_connections_active" in metrics
        # Credentials.
        assert api(admin, "PUT", "/credentials/127.0.0.1", body={"user": "alice", "ttl": 60}) == (200, {"client_ip": "127.0.0.1", "user": "alice", "ttl": 60})
        assert api(admin, "PUT", "/credentials/127.0.0.1", body={"user": "mallory", "ttl": 60})[1] == {"error": "'mallory' is not a user defined in [users]"}
        assert api(admin, "PUT", "/credentials/not-an-ip", body={"user": "alice", "ttl": 60})[0] == 400
        assert api(admin, "PUT", "/credentials/127.0.0.1", body={"user": "alice", "ttl": -1})[0] == 400
        assert api(admin, "GET", "/credentials")[1][0]["user"] == "alice"
        third = connect(port)
        third.sendall(b"a")
        third.recv(10)
        third.close()
        proc.wait_line(r"ClientConnect .* user=alice \(authenticated\)")
        assert api(admin, "DELETE", "/credentials/127.0.0.1") == (200, {"logged_out": "127.0.0.1"})
        assert api(admin, "DELETE", "/credentials/127.0.0.1")[0] == 404
        page = api(admin, "GET", "/", token=None, basic=("anyone", TOKEN))
        assert page[0] == 200 and "wingatemap" in page[1] and "live activity" in page[1]
        assert api(admin, "GET", "/", token=None)[0] == 401
        assert api(admin, "GET", f"/?token={TOKEN}", token=None)[0] == 401
    finally:
        proc.stop()
        echo.close()
    reasons = [e["reason"] for e in events(tmp_path) if e["event"] == "ClientDisconnect"]
    assert reasons.count("killed") == 2


def test_admin_without_token_on_loopback(tmp_path):
    """
    With no token (allowed only on loopback), the API answers without a header.
    """
    port, admin = free_port(), free_port()
    proc, config = start(tmp_path, f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\n[mappings.web]\nport = {port}\nbind = "127.0.0.1"\n')
    try:
        proc.wait_line(r"admin API listening")
        assert api(admin, "GET", "/sessions", token=None) == (200, [])
    finally:
        proc.stop()


def test_reload_by_post_and_sighup(tmp_path):
    """
    A valid new file is applied without dropping a session: the live session keeps flowing,
    new connections get the new rules, a new mapping's listener opens, a removed one closes,
    an unchanged one is kept.  An invalid file is refused (400, logged) and the running
    configuration stays; SIGHUP does the same.
    """
    first, second = EchoServer(b"first:"), EchoServer(b"second:")
    p1, p2, p3, admin = free_port(), free_port(), free_port(), free_port()
    head = f'[service]\ndrain_timeout = 1\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\ntoken = "{TOKEN}"\n'
    proc, config = start(
        tmp_path,
        head
        + f'[mappings.keep]\nport = {p1}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {first.port} }}\n'
        + f'[mappings.drop]\nport = {p3}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {first.port} }}\n',
    )
    try:
        proc.wait_line(r"admin API listening")
        live = connect(p1)
        assert live.recv(6) == b"first:"
        config.write_text(
            head
            + f'[mappings.keep]\nport = {p1}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {second.port} }}\n'
            + f'[mappings.added]\nport = {p2}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {second.port} }}\n'
        )
        assert api(admin, "POST", "/reload") == (200, {"reloaded": True})
        proc.wait_line(r"configuration reloaded .* 1 listener\(s\) opened, 1 closed, 1 kept")
        live.sendall(b"still here")
        assert live.recv(100) == b"still here"
        fresh = connect(p1)
        assert fresh.recv(7) == b"second:"
        fresh.close()
        assert connect(p2).recv(7) == b"second:"
        with pytest.raises(ConnectionRefusedError):
            connect(p3)
        config.write_text(head + "[mappings.keep]\nport = 0\n")
        status, body = api(admin, "POST", "/reload")
        assert status == 400 and body["errors"] == ["mappings.keep.port: 0 is not a valid port; expected an integer 1-65535"]
        proc.wait_line(r"reload refused, the running configuration stays: mappings\.keep\.port")
        assert connect(p1).recv(7) == b"second:"
        proc.popen.send_signal(signal.SIGHUP)
        proc.wait_line(r"SIGHUP: reloading")
        assert connect(p2).recv(7) == b"second:"  # still the previous, valid configuration
        config.write_text(head + f'[mappings.keep]\nport = {p1}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {first.port} }}\n')
        proc.popen.send_signal(signal.SIGHUP)
        proc.wait_line(r"configuration reloaded .* 0 listener\(s\) opened, 1 closed, 1 kept")
        assert connect(p1).recv(6) == b"first:"
        live.sendall(b"and now")
        assert live.recv(100) == b"and now"
    finally:
        proc.stop()
        first.close()
        second.close()


def test_connection_limits(tmp_path):
    """
    max_connections and max_connections_per_client refuse with reason limit, counting live
    sessions only.
    """
    echo = EchoServer(b"hi")
    port = free_port()
    proc, config = start(
        tmp_path,
        f'[service]\naudit_log = "events.jsonl"\ndrain_timeout = 1\n[mappings.m]\nport = {port}\nbind = "127.0.0.1"\nmax_connections = 3\n'
        f'max_connections_per_client = 2\ndefault = {{ host = "127.0.0.1", port = {echo.port} }}\n',
    )
    try:
        proc.wait_line(r"listening on")
        a1, a2 = connect(port, "127.0.0.31"), connect(port, "127.0.0.31")
        assert a1.recv(2) == b"hi" and a2.recv(2) == b"hi"
        a3 = connect(port, "127.0.0.31")
        assert a3.recv(2) == b""  # third from the same client
        # A refused connection counts until the gateway has closed its socket: wait for that
        # (its ClientDisconnect) before the next one, or it would still fill a place.
        proc.wait_count(r"ClientDisconnect .* reason=limit", 1)
        b1 = connect(port, "127.0.0.32")
        assert b1.recv(2) == b"hi"
        b2 = connect(port, "127.0.0.32")
        assert b2.recv(2) == b""  # fourth overall
        proc.wait_count(r"ClientDisconnect .* reason=limit", 2)
        a1.close()
        proc.wait_line(r"ClientDisconnect .* client=127\.0\.0\.31:.* reason=client-closed")
        b3 = connect(port, "127.0.0.32")
        assert b3.recv(2) == b"hi"  # a place was freed
    finally:
        proc.stop()
        echo.close()
    limited = [e for e in events(tmp_path) if e["event"] == "ClientDisconnect" and e["reason"] == "limit"]
    assert len(limited) == 2 and all(e["destination"] is None for e in limited)


def _fifo_lines(fd: int, heard: list[str], count: int, timeout: float = 30.0) -> list[str]:
    """
    The first C{count} lines read from fifo C{fd} (kept in C{heard}), waiting up to C{timeout}s.
    """
    deadline = time.monotonic() + timeout
    buffer = ""
    while len(heard) < count:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            raise AssertionError(f"only {len(heard)} of {count} lines within {timeout}s: {heard}")
        buffer += os.read(fd, 4096).decode()
        *lines, buffer = buffer.split("\n")
        heard.extend(lines)
    return heard[:count]


def test_event_handlers(tmp_path):
    """
    Handlers run in order: a program gets the fields as WINGATEMAP_* variables and blocks by
    exiting non-zero; a Python callable blocks by returning False and may answer with a
    Deferred; a failing or hanging handler blocks (or allows, with on_failure = "allow");
    ClientDisconnect programs run after the session without delaying it: while they still
    run, their sessions no longer count against max_connections = 1 and the next clients
    are served.
    """
    echo = EchoServer(b"ok")
    port = free_port()
    record = tmp_path / "env.txt"
    # Each ClientDisconnect program says "started" and "done" on one fifo and, in between,
    # waits (60 s at most) for a line the test writes on the other.
    announce_path, release_path = tmp_path / "announce", tmp_path / "release"
    os.mkfifo(announce_path)
    os.mkfifo(release_path)
    # Opened read-write by the test too, so a read never sees end-of-file between programs.
    announce = os.open(announce_path, os.O_RDWR | os.O_NONBLOCK)
    release = os.open(release_path, os.O_RDWR | os.O_NONBLOCK)
    heard: list[str] = []
    script = tmp_path / "check.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'env | grep ^WINGATEMAP_ | sort >> "{record}"\n'
        'test "$WINGATEMAP_CLIENT_IP" != "127.0.0.77"\n'
    )
    script.chmod(0o755)
    after = tmp_path / "after.sh"
    after.write_text(
        "#!/bin/bash\n"
        f'exec 3<> "{release_path}" 4<> "{announce_path}"\n'  # read-write opens of a fifo never block
        'echo "started $$ $WINGATEMAP_CLIENT_IP" >&4\n'
        "read -t 60 -u 3 line\n"
        'echo "done $$ $WINGATEMAP_CLIENT_IP" >&4\n'
    )
    after.chmod(0o755)
    proc, config = start(
        tmp_path,
        f'[service]\naudit_log = "events.jsonl"\n'
        f'[[events.ClientConnect]]\nrun = ["{script}"]\ntimeout = 10\n'
        f'[[events.ClientConnect]]\npython = "tests.handler_module:block_66"\n'
        f'[[events.ClientConnect]]\npython = "tests.handler_module:later_allow"\n'
        f'[[events.ClientDisconnect]]\nrun = ["{after}"]\ntimeout = 60\n'
        f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\nmax_connections = 1\n'
        f'default = {{ host = "127.0.0.1", port = {echo.port} }}\n',
    )
    try:
        proc.wait_line(r"listening on")
        ok = connect(port, "127.0.0.70")
        assert ok.recv(2) == b"ok"
        ok.close()
        proc.wait_line(r"ClientDisconnect .* client=127\.0\.0\.70:.* reason=client-closed")
        [first] = _fifo_lines(announce, heard, 1)
        # With max_connections = 1 these two are decided (blocked by a handler, not refused
        # over the limit) only if the session whose program is still running no longer counts.
        assert connect(port, "127.0.0.77").recv(2) == b""  # the program blocks it
        proc.wait_line(r"ClientDisconnect .* client=127\.0\.0\.77:.* reason=blocked")
        assert connect(port, "127.0.0.66").recv(2) == b""  # the Python callable blocks it
        proc.wait_line(r"ClientDisconnect .* client=127\.0\.0\.66:.* reason=blocked")
        started = _fifo_lines(announce, heard, 3)
        assert first.startswith("started ") and first.endswith(" 127.0.0.70")
        assert sorted(line.split()[2] for line in started) == ["127.0.0.66", "127.0.0.70", "127.0.0.77"]
        assert all(line.startswith("started ") for line in started)  # none has finished yet
        os.kill(int(first.split()[1]), 0)  # the first program is still running
        os.write(release, b"\n" * 3)
        assert sorted(line.split()[0] for line in _fifo_lines(announce, heard, 6)) == ["done"] * 3 + ["started"] * 3
    finally:
        os.write(release, b"\n" * 8)  # whatever still waits finishes now
        os.close(release)
        os.close(announce)
        proc.stop()
    env = record.read_text().splitlines()
    assert "WINGATEMAP_CLIENT_IP=127.0.0.70" in env and "WINGATEMAP_MAPPING=m" in env
    # One record per connection; in each, the original destination (none here) is empty.
    assert env.count("WINGATEMAP_EVENT=ClientConnect") == 3
    assert [line for line in env if line.startswith("WINGATEMAP_ORIGINAL_DST=")] == ["WINGATEMAP_ORIGINAL_DST="] * 3
    reasons = {e["client_ip"]: e["reason"] for e in events(tmp_path) if e["event"] == "ClientDisconnect"}
    assert reasons == {"127.0.0.70": "client-closed", "127.0.0.77": "blocked", "127.0.0.66": "blocked"}

    # Failures: block by default, allow when configured.
    for on_failure, expected in (("block", b""), ("allow", b"ok")):
        proc, config = start(
            tmp_path,
            f'[[events.ClientConnect]]\npython = "tests.handler_module:never"\ntimeout = 0.5\non_failure = "{on_failure}"\n'
            f'[[events.ClientConnect]]\npython = "tests.handler_module:explode"\non_failure = "{on_failure}"\n'
            f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {echo.port} }}\n',
            name=f"fail-{on_failure}.toml",
        )
        try:
            proc.wait_line(r"listening on")
            assert connect(port).recv(2) == expected
            proc.wait_line(r"no answer within 0\.5s")
        finally:
            proc.stop()
    echo.close()


def test_workers_share_listeners_with_one_admin_view(tmp_path):
    """
    With workers = 2, two processes accept on the same listeners; the primary's admin API lists
    the sessions of both, kills a session of either, and counts both in its metrics; a reload
    reaches the worker; SIGTERM stops both processes cleanly.
    """
    import psutil

    echo = EchoServer(b"hi")
    port, admin = free_port(), free_port()
    proc, config = start(
        tmp_path,
        f'[service]\nworkers = 2\ndrain_timeout = 1\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\ntoken = "{TOKEN}"\n'
        f'[users.alice]\nlocations = ["10.255.0.9"]\n'
        f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {echo.port} }}\n',
    )
    try:
        proc.wait_line(r"worker 1 started \(pid (\d+)\)")
        proc.wait_line(r"Site starting on .*worker-1\.sock")
        clients = [connect(port) for _ in range(24)]
        for c in clients:
            assert c.recv(2) == b"hi"
        status, sessions = api(admin, "GET", "/sessions")
        assert status == 200 and len(sessions) == 24
        prefixes = {s["session"].split("-")[0] for s in sessions}
        assert len(prefixes) == 2, prefixes  # both processes took connections
        by_prefix = {}
        for s in sessions:
            by_prefix.setdefault(s["session"].split("-")[0], s["session"])
        for session_id in by_prefix.values():
            assert api(admin, "DELETE", f"/sessions/{session_id}") == (200, {"killed": session_id})
        assert api(admin, "DELETE", "/sessions/nope-1")[0] == 404
        assert len(api(admin, "GET", "/sessions")[1]) == 22
        metrics = api(admin, "GET", "/metrics")[1]
        assert 'wingatemap_connections_accepted_total{mapping="m"} 24.0' in metrics
        assert 'wingatemap_sessions_ended_total{mapping="m",reason="killed"} 2.0' in metrics
        assert api(admin, "POST", "/reload") == (200, {"reloaded": True})
        proc.wait_line(r"SIGHUP: reloading")  # the worker reloads too
        # A login reaches every process: new connections, whichever process takes them, are alice's.
        assert api(admin, "PUT", "/credentials/127.0.0.1", body={"user": "alice", "ttl": 60})[0] == 200
        # The worker dies and is restarted: it still knows the login (a shared file).
        worker_pid = int(proc.wait_line(r"worker 1 started \(pid (\d+)\)").rsplit("pid ", 1)[1].split(")")[0])
        os.kill(worker_pid, signal.SIGKILL)
        proc.wait_line(r"worker 1 exited unexpectedly")
        proc.wait_count(r"Site starting on .*worker-1\.sock", 2)
        more = [connect(port) for _ in range(12)]
        for c in more:
            assert c.recv(2) == b"hi"
        live = api(admin, "GET", "/sessions")[1]
        fresh = [s for s in live if s["user"] == "alice"]
        assert len(fresh) == 12 and len({s["session"].split("-")[0] for s in fresh}) == 2
        active = [l for l in api(admin, "GET", "/metrics")[1].splitlines() if l.startswith("wingatemap_connections_active")]
        assert active == [f'wingatemap_connections_active{{mapping="m"}} {float(len(live))}'], active  # the dead worker's sessions are not counted
        clients += more
        children = psutil.Process(proc.popen.pid).children(recursive=True)
        assert children
        for c in clients:
            c.close()
    finally:
        code = proc.stop()
        echo.close()
    assert code in (0, -signal.SIGTERM), proc.output()
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive
    assert "Traceback" not in proc.output()
