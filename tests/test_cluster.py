"""
Several gateways, one service (SPEC §7), end to end: a real redis-server and several
C{twistd -n wingatemap run} gateway processes on loopback, with real clients from distinct
127.x addresses and real echo servers as destinations.  Waits are on log lines, ports and
bounded polls of the admin API or Redis; nothing sleeps for a guess.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import socketserver
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

import pytest

from tests.helpers import free_port
from tests.test_cluster_store import RedisServer
from tests.test_end_to_end import ENV, TWISTD, WINGATEMAP, Proc, wait_port
from wingate_map.cluster import ClusterLimits
from wingate_map.config import Destination, parse_config
from wingate_map.service import WingateMapService
from wingate_map.testing import FakeClusterBackend, FakeClusterStore, RelayHarness, simple_mapping

NODE_TTL = 3
MAPPING = "m"
LIMIT = 2


# --- in memory: the wiring on the fake store ---------------------------------------------------


def gateway_in_memory(backend: FakeClusterBackend, node: str, limit: int = 1, scope: str = "cluster") -> tuple[RelayHarness, FakeClusterStore]:
    """
    One gateway's relay on the fake store: a mapping with a per-client limit of C{limit} in
    C{scope}.
    """
    store = FakeClusterStore(backend, node)
    store.start()
    harness = RelayHarness(simple_mapping(Destination(host="192.0.2.10", port=80), max_connections_per_client=limit, limits_scope=scope), clock=backend.clock)
    harness.factory.runtime.cluster = ClusterLimits(store)
    return harness, store


def test_cluster_limit_is_shared_and_released_once_in_memory():
    """
    With limits_scope = "cluster", a client's session on one gateway counts on another: the
    second is refused (reason limit, both events), and once the first ends (counted out exactly
    once) the other gateway admits it.
    """
    backend = FakeClusterBackend()
    (a, _), (b, _) = gateway_in_memory(backend, "gw-a"), gateway_in_memory(backend, "gw-b")
    first, _ = a.accept("10.0.0.5")
    assert len(a.endpoints.attempts) == 1
    a.endpoints.attempts[0].succeed()
    refused, _ = b.accept("10.0.0.5")
    assert b.endpoints.attempts == []
    refused.connectionLost()
    assert [e["event"] for e in b.sink.events] == ["ClientConnect", "ClientDisconnect"]
    assert b.sink.of("ClientDisconnect")[0]["reason"] == "limit"
    assert backend.counts[("test", "10.0.0.5")] == {first.session.id: "gw-a"}
    a.endpoints.attempts[0].close()
    first.connectionLost()
    assert backend.counts[("test", "10.0.0.5")] == {}
    b.accept("10.0.0.5")
    assert len(b.endpoints.attempts) == 1


def test_node_scope_mappings_never_ask_the_store_in_memory():
    """
    A mapping with limits_scope = "node" is decided on this gateway's count alone: nothing is
    counted in the store, even at its limit on another gateway.
    """
    backend = FakeClusterBackend()
    (a, _), (b, _) = gateway_in_memory(backend, "gw-a", scope="node"), gateway_in_memory(backend, "gw-b", scope="node")
    a.accept("10.0.0.5")
    b.accept("10.0.0.5")
    assert len(a.endpoints.attempts) == len(b.endpoints.attempts) == 1
    assert backend.counts == {}


def test_store_down_admits_on_node_local_counts_and_counts_later_in_memory():
    """
    While the store is down a cluster-limited session is admitted on this gateway's own count
    (no waiting), a second one over the local limit is refused, and the admitted one is counted
    in the store when it is back.
    """
    backend = FakeClusterBackend()
    a, store = gateway_in_memory(backend, "gw-a")
    backend.stop()
    first, _ = a.accept("10.0.0.6")
    assert len(a.endpoints.attempts) == 1
    second, _ = a.accept("10.0.0.6")
    assert len(a.endpoints.attempts) == 1
    second.connectionLost()
    assert a.sink.of("ClientDisconnect")[0]["reason"] == "limit"
    backend.start()
    assert store.state == "up"
    assert backend.counts[("test", "10.0.0.6")] == {first.session.id: "gw-a"}


def test_health_is_degraded_while_only_the_cluster_link_is_down_in_memory():
    """
    /healthz answers 200 degraded (naming the cluster) while the shared store is down, and ok
    again once it is back; sessions carry the node name and their ids start with it.
    """
    from twisted.internet.testing import MemoryReactorClock

    backend = FakeClusterBackend()
    config = parse_config('[cluster]\nredis = "redis://127.0.0.1:1/0"\nnode = "gw-x"\n[mappings.m]\nport = 1\nbind = "127.0.0.1"\n')
    store = FakeClusterStore(backend, "gw-x")
    service = WingateMapService(config, reactor=MemoryReactorClock(), cluster_store=store, standalone=False)
    service.startService()
    try:
        assert service.health() == (200, {"status": "ok", "sessions": 0, "listeners": 1, "workers": 1})
        backend.stop()
        code, body = service.health()
        assert code == 200 and body["status"] == "degraded" and body["problems"][0].startswith("cluster: ")
        backend.start()
        assert service.health()[1]["status"] == "ok"
        assert service.sessions.new_id().startswith("gw-x.") and service.sessions.node == "gw-x"
    finally:
        service.stopService()


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    """
    Poll C{condition} (an admin API request, a Redis read) until it returns something true;
    bounded by C{timeout}.  Each poll is a real request; between them, a short select() on
    nothing, as tests/test_end_to_end.py's wait_port does.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        select.select([], [], [], 0.05)


class EchoServer:
    """
    A destination: says C{banner} and a newline when a client connects, then echoes.
    """

    def __init__(self, banner: str) -> None:
        banner_bytes = (banner + "\n").encode()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                self.request.sendall(banner_bytes)
                while True:
                    try:
                        data = self.request.recv(65536)
                    except OSError:
                        return
                    if not data:
                        return
                    self.request.sendall(data)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        """
        Stop accepting.
        """
        self.server.shutdown()
        self.server.server_close()


class Gateway:
    """
    One gateway process with its own node name, listener, admin API and audit log, sharing the
    test's Redis.
    """

    def __init__(
        self, directory: str, node: str, redis_url: str, default_port: int, alice_port: int, proxy: bool = False,
        address: str = "127.0.0.1", port: int | None = None, admin_port: int | None = None,
    ) -> None:
        self.node = node
        self.directory = directory
        self.address = address
        self.port = port or free_port()
        self.admin_port = admin_port or free_port()
        self.audit_path = os.path.join(directory, f"events-{node}.jsonl")
        self.config = os.path.join(directory, f"{node}.toml")
        proxy_keys = 'proxy_protocol = true\nproxy_protocol_from = ["127.0.0.1"]\n' if proxy else ""
        with open(self.config, "w") as f:
            f.write(
                f'[service]\naudit_log = "{self.audit_path}"\ndrain_timeout = 1\n'
                f'[admin]\nlisten = "tcp:{self.admin_port}:interface={address}"\n'
                f'[cluster]\nredis = "{redis_url}"\nnode = "{node}"\nnode_ttl = {NODE_TTL}\n'
                f'events_stream = "wingatemap:events"\n'
                f'[users.alice]\nlocations = ["10.255.255.1"]\n'
                f'[mappings.{MAPPING}]\nport = {self.port}\nbind = "{address}"\n{proxy_keys}'
                f'max_connections_per_client = {LIMIT}\nlimits_scope = "cluster"\n'
                f'default = {{ host = "127.0.0.1", port = {default_port} }}\n'
                f'[[mappings.{MAPPING}.rules]]\nuser = "alice"\nto = {{ host = "127.0.0.1", port = {alice_port} }}\n'
            )
        self.proc: Proc | None = None

    def start(self, wait_up: bool = True) -> "Gateway":
        """
        Start the process; wait until it listens and (C{wait_up}) its cluster link is up.
        """
        self.proc = Proc(TWISTD + ["-n", "--pidfile", "", "wingatemap", "run", "--config", self.config], cwd=self.directory)
        if wait_up:
            self.proc.wait_line(rf"cluster node {self.node}: link to the shared store is up", timeout=60)
            self.proc.wait_line(rf"mapping {MAPPING}: listening on")
            wait_port(self.admin_port, self.address)
        return self

    def stop(self) -> None:
        """
        SIGTERM and wait (a no-op once it has ended).
        """
        if self.proc is not None:
            self.proc.stop()

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """
        One admin API request: (status, JSON body).
        """
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://{self.address}:{self.admin_port}{path}", data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def events(self) -> list[dict[str, Any]]:
        """
        The audit log so far.
        """
        if not os.path.exists(self.audit_path):
            return []
        with open(self.audit_path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]

    def connect(self, client_ip: str) -> "Client":
        """
        A client from C{client_ip} connected to this gateway's mapping.
        """
        return Client(client_ip, self.port, self.address)


class Client:
    """
    A blocking TCP client from a chosen loopback address.
    """

    def __init__(self, client_ip: str, port: int, address: str = "127.0.0.1") -> None:
        self.sock = socket.socket()
        self.sock.settimeout(30)
        self.sock.bind((client_ip, 0))
        self.sock.connect((address, port))
        self._buffer = b""

    def line(self) -> bytes:
        """
        The next line from the destination, or b"" when the gateway closed the connection.
        """
        while b"\n" not in self._buffer:
            try:
                data = self.sock.recv(65536)
            except ConnectionResetError:
                return b""
            if not data:
                return b""
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def echo(self, text: bytes) -> bool:
        """
        Whether C{text} comes back through the session.
        """
        self.sock.sendall(text + b"\n")
        return self.line() == text

    def close(self) -> None:
        """
        Close the connection.
        """
        self.sock.close()


def redis_cli(redis: RedisServer, *args: str) -> str:
    """
    One redis-cli command against the test's server; its output, stripped.
    """
    exe = shutil.which("redis-cli")
    assert exe, "redis-cli comes with redis-server"
    return subprocess.run([exe, "-p", str(redis.port), "--raw", *args], capture_output=True, text=True, timeout=30).stdout.strip()


@pytest.fixture
def cluster(tmp_path):
    """
    A redis-server, two echo destinations (default: banner "default", alice's: "alice") and a
    factory of gateways; everything is stopped at the end.
    """
    redis = RedisServer(str(tmp_path))
    redis.start()
    default, alice = EchoServer("default"), EchoServer("alice")
    gateways: list[Gateway] = []

    class Cluster:
        """
        The test's Redis and its gateways.
        """

        def __init__(self) -> None:
            self.redis = redis
            self.gateways = gateways

        def gateway(self, node: str, start: bool = True, **kwargs: Any) -> Gateway:
            """
            A gateway called C{node} on this Redis (started unless C{start} is false).
            """
            gw = Gateway(str(tmp_path), node, redis.url(), default.port, alice.port, **kwargs)
            gateways.append(gw)
            return gw.start() if start else gw

    try:
        yield Cluster()
    finally:
        for gw in gateways:
            try:
                gw.stop()
            except Exception:
                pass
        redis.stop()
        default.close()
        alice.close()


def session_of(gw: Gateway, client_ip: str) -> dict[str, Any]:
    """
    The one live session of C{client_ip} on C{gw}.
    """
    status, sessions = gw.api("GET", "/sessions")
    assert status == 200
    [found] = [s for s in sessions if s["client_ip"] == client_ip]
    return found


def test_login_on_one_gateway_is_honoured_on_another(cluster):
    """
    PUT /credentials on gateway A: a connection from that client address to gateway B is that
    user (alice's rule picks her destination), in B's events with B's node name; the events
    reach the shared stream; DELETE /credentials on B logs her out on A too.
    """
    a, b = cluster.gateway("gw-a"), cluster.gateway("gw-b")
    assert a.api("PUT", "/credentials/127.0.0.5", {"user": "alice", "ttl": 600})[0] == 200
    wait_until(lambda: any(e["client_ip"] == "127.0.0.5" for e in b.api("GET", "/credentials")[1]), "B to know the login")
    client = b.connect("127.0.0.5")
    assert client.line() == b"alice"
    client.close()
    wait_until(lambda: [e for e in b.events() if e["event"] == "ClientDisconnect"], "B's ClientDisconnect")
    connect = [e for e in b.events() if e["event"] == "ClientConnect"][0]
    assert connect["user"] == "alice" and connect["identity"] == "authenticated"
    assert connect["node"] == "gw-b" and connect["session"].startswith("gw-b.")
    stream = wait_until(lambda: [json.loads(line) for line in redis_cli(cluster.redis, "XRANGE", "wingatemap:events", "-", "+").splitlines() if line.startswith("{")], "the events stream")
    assert {(e["event"], e["node"]) for e in stream} >= {("ClientConnect", "gw-b")}
    assert b.api("DELETE", "/credentials/127.0.0.5")[0] == 200
    wait_until(lambda: not any(e["client_ip"] == "127.0.0.5" for e in a.api("GET", "/credentials")[1]), "A to forget the login")
    client = a.connect("127.0.0.5")
    assert client.line() == b"default"
    client.close()


def counted(cluster: Any, client_ip: str) -> int:
    """
    How many sessions of C{client_ip} Redis counts against the cluster limit.
    """
    return int(redis_cli(cluster.redis, "HLEN", f"wingatemap:conn:{MAPPING}:{client_ip}") or 0)


def test_cluster_limit_counts_across_three_gateways(cluster):
    """
    With limits_scope = "cluster" and max_connections_per_client = 2, a client with a session on
    each of two gateways is refused on the third (reason limit, in that gateway's events); once
    one of its sessions ends, the third gateway admits it.
    """
    gateways = [cluster.gateway(f"gw-{i}") for i in (1, 2, 3)]
    first, second = gateways[0].connect("127.0.0.6"), gateways[1].connect("127.0.0.6")
    assert first.line() == b"default" and second.line() == b"default"
    third = gateways[2].connect("127.0.0.6")
    assert third.line() == b""
    third.close()
    refused = wait_until(lambda: [e for e in gateways[2].events() if e["event"] == "ClientDisconnect"], "the refusal's event")
    assert refused[0]["reason"] == "limit" and refused[0]["node"] == "gw-3"
    first.close()
    wait_until(lambda: counted(cluster, "127.0.0.6") == 1, "the first session's release")
    again = gateways[2].connect("127.0.0.6")
    assert again.line() == b"default" and again.echo(b"through gw-3")
    again.close()
    second.close()
    wait_until(lambda: counted(cluster, "127.0.0.6") == 0, "every release")


def test_kill_from_any_gateway_and_the_cluster_view(cluster):
    """
    GET /sessions?scope=cluster on one gateway lists another's session with its node; DELETE
    /sessions/{id} there ends it where it runs (reason killed) and answers 200 only then; an
    unknown id is 404; a gateway that hears the request but never answers makes it 504.
    """
    a, b, c = cluster.gateway("gw-a"), cluster.gateway("gw-b"), cluster.gateway("gw-c")
    client = a.connect("127.0.0.7")
    assert client.line() == b"default"
    session = session_of(a, "127.0.0.7")
    assert session["node"] == "gw-a"

    def listed() -> list[dict[str, Any]]:
        status, sessions = b.api("GET", "/sessions?scope=cluster")
        return [s for s in sessions if s["session"] == session["session"]] if status == 200 else []

    [seen] = wait_until(listed, "gw-a's session in the cluster view")
    assert seen["node"] == "gw-a" and seen["client_ip"] == "127.0.0.7"
    table = subprocess.run(WINGATEMAP + ["sessions", "--cluster", "--config", b.config], capture_output=True, text=True, env=ENV, timeout=60)
    assert table.returncode == 0, table.stderr
    [header, row] = table.stdout.splitlines()
    assert header.split()[:2] == ["session", "node"] and row.split()[:2] == [session["session"], "gw-a"]
    assert "127.0.0.7" not in subprocess.run(WINGATEMAP + ["sessions", "--config", b.config], capture_output=True, text=True, env=ENV, timeout=60).stdout
    assert b.api("GET", "/sessions")[1] == []
    assert b.api("DELETE", f"/sessions/{session['session']}") == (200, {"killed": session["session"]})
    # Confirmed means ended: the event is on gw-a's audit log (at its next spaced write).
    [ended] = wait_until(lambda: [e for e in a.events() if e["event"] == "ClientDisconnect"], "A's ClientDisconnect")
    assert ended["reason"] == "killed" and ended["node"] == "gw-a"
    assert client.line() == b""
    client.close()
    assert b.api("DELETE", "/sessions/gw-a.nosuch-1")[0] == 404
    assert c.proc is not None
    c.proc.popen.send_signal(signal.SIGSTOP)
    try:
        status, body = b.api("DELETE", "/sessions/gw-a.nosuch-2")
    finally:
        c.proc.popen.send_signal(signal.SIGCONT)
    assert status == 504 and "no gateway confirmed" in body["error"]


def test_a_sigkilled_gateway_leaves_the_cluster_after_node_ttl(cluster):
    """
    A gateway killed with SIGKILL (no goodbye) leaves the cluster view and stops counting
    against cluster limits once node_ttl has passed: the client it held at the limit is
    admitted elsewhere again.
    """
    a, b = cluster.gateway("gw-a"), cluster.gateway("gw-b")
    clients = [a.connect("127.0.0.8") for _ in range(LIMIT)]
    assert all(c.line() == b"default" for c in clients)
    wait_until(lambda: len([s for s in b.api("GET", "/sessions?scope=cluster")[1] if s["node"] == "gw-a"]) == LIMIT, "gw-a's sessions in the view")
    refused = b.connect("127.0.0.8")
    assert refused.line() == b""
    refused.close()
    assert a.proc is not None
    a.proc.popen.kill()
    a.proc.popen.wait(30)
    killed_at = time.monotonic()
    wait_until(lambda: not [s for s in b.api("GET", "/sessions?scope=cluster")[1] if s["node"] == "gw-a"], "gw-a to leave the view")
    assert time.monotonic() - killed_at > NODE_TTL / 2  # its lease ran out; nothing removed it at once
    admitted = b.connect("127.0.0.8")
    assert admitted.line() == b"default"
    admitted.close()
    for c in clients:
        c.close()


def test_duplicate_node_name_is_refused_at_start(cluster):
    """
    A second gateway started with the node name of a live one exits with status 1 and a clear
    error naming cluster.node; the first keeps running.
    """
    first = cluster.gateway("gw-same")
    second = cluster.gateway("gw-same", start=False)
    second.start(wait_up=False)
    assert second.proc is not None
    status = second.proc.finish(60)
    assert status == 1
    assert "wingatemap: error: cluster.node: another live gateway is registered as 'gw-same'" in second.proc.output()
    assert first.api("GET", "/healthz") == (200, {"status": "ok", "sessions": 0, "listeners": 1, "workers": 1})


class Pump:
    """
    Load on live sessions: a thread per client echoing 1 KiB lines back to back until stopped
    (bounded by a count); failures are collected.
    """

    def __init__(self, clients: list[Client]) -> None:
        self.stopping = threading.Event()
        self.failures: list[str] = []
        self.rounds = [0] * len(clients)
        self.threads = [threading.Thread(target=self._run, args=(i, c), daemon=True) for i, c in enumerate(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self, index: int, client: Client) -> None:
        payload = b"x" * 1024
        for _ in range(1_000_000):
            if self.stopping.is_set():
                return
            try:
                if not client.echo(payload):
                    self.failures.append(f"client {index}: wrong echo or closed")
                    return
            except OSError as e:
                self.failures.append(f"client {index}: {e}")
                return
            self.rounds[index] += 1

    def progress(self) -> list[int]:
        """
        Echoes completed so far, per client.
        """
        return list(self.rounds)

    def stop(self) -> None:
        """
        Stop and wait for every thread.
        """
        self.stopping.set()
        for thread in self.threads:
            thread.join(60)


def health(gw: Gateway) -> str:
    """
    What /healthz says (its status field).
    """
    return gw.api("GET", "/healthz")[1]["status"]


def test_redis_stopped_and_restarted_under_load_drops_no_session(cluster):
    """
    Redis stops while sessions relay on two gateways: every session keeps relaying, /healthz
    answers 200 degraded, new sessions are admitted on node-local limits (a client at the
    limit on this gateway is still refused); when Redis is back (empty) the gateways return to
    ok and publish their sessions and counts again; no session ended on the way.
    """
    a, b = cluster.gateway("gw-a"), cluster.gateway("gw-b")
    clients = [gw.connect(f"127.0.0.{20 + i}") for i, gw in enumerate([a, b, a, b])]
    assert all(c.line() == b"default" for c in clients)
    pump = Pump(clients)
    try:
        wait_until(lambda: min(pump.progress()) > 0, "the load to flow")
        cluster.redis.stop()
        wait_until(lambda: health(a) == "degraded" and health(b) == "degraded", "/healthz degraded")
        status, body = a.api("GET", "/healthz")
        assert status == 200 and "cluster" in body["problems"][0]
        before = pump.progress()
        wait_until(lambda: all(n > m for n, m in zip(pump.progress(), before)), "relaying while Redis is down")
        # 127.0.0.20 has one session on gw-a: a second one is admitted on the local count...
        second = a.connect("127.0.0.20")
        assert second.line() == b"default"
        # ...and a third one is refused by it.
        third = a.connect("127.0.0.20")
        assert third.line() == b""
        third.close()
        cluster.redis.start()
        wait_until(lambda: health(a) == "ok" and health(b) == "ok", "/healthz ok again", timeout=60)
        # The counts, including the one admitted while down, are in the new Redis.
        wait_until(lambda: counted(cluster, "127.0.0.20") == 2 and counted(cluster, "127.0.0.21") == 1, "the counts republished")
        wait_until(lambda: len(a.api("GET", "/sessions?scope=cluster")[1]) == 5, "the session directory republished")
        before = pump.progress()
        wait_until(lambda: all(n > m for n, m in zip(pump.progress(), before)), "relaying after Redis is back")
        assert pump.failures == []
        second.close()
    finally:
        pump.stop()
    assert pump.failures == []
    ended = [e for gw in (a, b) for e in gw.events() if e["event"] == "ClientDisconnect" and e["reason"] != "limit"]
    assert [e["client_ip"] for e in ended if e["client_ip"] != "127.0.0.20"] == []
    for c in clients:
        c.close()


def haproxy_servers(stats_socket: str) -> dict[str, str]:
    """
    HAProxy's view of the gateways backend: server name -> status (UP, DOWN...).
    """
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(stats_socket)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:] if line]
    return {r["svname"]: r["status"] for r in rows if r["pxname"] == "gateways" and r["svname"] not in ("FRONTEND", "BACKEND")}


HAPROXY_CONFIG = """\
global
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend rdp
    bind 127.0.0.1:{front}
    default_backend gateways

backend gateways
    balance roundrobin
    option httpchk
    http-check send meth GET uri /healthz ver HTTP/1.1 hdr Host localhost:{admin}
    http-check expect status 200
    default-server inter 500ms fall 2 rise 1
{servers}
"""


def test_haproxy_in_front_spreads_connections_over_the_gateways(cluster, tmp_path):
    """
    HAProxy (mode tcp, send-proxy-v2, health checks on /healthz) round-robins clients over
    three gateways with proxy_protocol = true: each gateway gets its share, with the real
    client address from the PROXY header; with Redis down every gateway stays in the pool
    (/healthz 200 degraded) and connections still spread over all of them.
    """
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("haproxy is not installed")
    port, admin = free_port(), free_port()
    gateways = [
        cluster.gateway(f"gw-{i}", proxy=True, address=f"127.0.1.{i}", port=port, admin_port=admin) for i in (1, 2, 3)
    ]
    front, stats = free_port(), str(tmp_path / "haproxy.sock")
    servers = "\n".join(
        f"    server {gw.node} {gw.address}:{port} send-proxy-v2 check port {admin} source 127.0.0.1" for gw in gateways
    )
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(stats=stats, front=front, admin=admin, servers=servers))
    proxy = Proc([haproxy, "-db", "-f", str(config)])
    try:
        wait_until(lambda: os.path.exists(stats) and haproxy_servers(stats) == {gw.node: "UP" for gw in gateways}, "HAProxy to see every gateway up")

        def spread(first: int) -> None:
            for i in range(first, first + 6):
                client = Client(f"127.0.0.{i}", front)
                assert client.line() == b"default"
                client.close()

            def ended(gw: Gateway) -> list[dict[str, Any]]:
                return [e for e in gw.events() if e["event"] == "ClientDisconnect" and first <= int(e["client_ip"].rsplit(".", 1)[1]) < first + 6]

            wait_until(lambda: sum(len(ended(gw)) for gw in gateways) == 6, "every session's end")
            for gw in gateways:
                seen = ended(gw)
                assert len(seen) == 2 and all(e["node"] == gw.node for e in seen)

        spread(40)
        cluster.redis.stop()
        wait_until(lambda: all(health(gw) == "degraded" for gw in gateways), "/healthz degraded")
        # HAProxy checks every gateway more than `fall` times while it is degraded...
        checked = r'"GET /healthz HTTP/1.1" \d+'
        for gw in gateways:
            assert gw.proc is not None
            gw.proc.wait_count(checked, sum(1 for line in gw.proc.lines if re.search(checked, line)) + 3)
        # ...and keeps it in the pool.
        assert haproxy_servers(stats) == {gw.node: "UP" for gw in gateways}
        spread(50)
    finally:
        proxy.stop()
