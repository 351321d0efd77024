"""
The cluster store's contract (SPEC §7), run against the in-memory fake and against a real
redis-server: the same tests, so the fake stays honest.

Each "gateway" is a store instance with its own node name; they share one backend (a
L{FakeClusterBackend}, or a redis-server process this module starts on a free loopback port with
a temporary directory and no persistence).  Time-dependent behaviour uses small TTLs and waits
on conditions: virtual time for the fake, real time (bounded) for Redis.
"""

from __future__ import annotations

import os
import secrets
import shutil
from typing import Any, Callable

import pytest
import pytest_twisted
from twisted.internet import defer, task
from zope.interface.verify import verifyObject

from tests.helpers import free_port
from tests.test_end_to_end import Proc
from wingate_map.cluster import (
    DOWN,
    UP,
    ClusterUnavailable,
    KillTimeout,
    NodeNameTaken,
    parse_redis_url,
)
from wingate_map.errors import ConfigError
from wingate_map.interfaces import IClusterStore
from wingate_map.testing import FakeClusterBackend, FakeClusterStore

NODE_TTL = 1.0
KILL_TIMEOUT = 1.0
MAPPING = "rdp"
CLIENT = "10.0.0.5"


def require_redis() -> str:
    """
    The redis-server binary; skip (saying why) where it is missing, fail under CI.
    """
    path = shutil.which("redis-server")
    if path is None:
        why = "redis-server is not installed (Debian package redis-server)"
        if os.environ.get("CI"):
            pytest.fail(f"cluster store tests must run in CI: {why}")
        pytest.skip(why)
    return path


class RedisServer:
    """
    A redis-server process of our own on a free loopback port (and a Unix socket) in a temporary
    directory, without persistence; L{stop} and L{start} again play a Redis restart.
    """

    def __init__(self, directory: str, *extra: str) -> None:
        self.binary = require_redis()
        self.directory = directory
        self.port = free_port()
        self.socket = os.path.join(directory, "redis.sock")
        self.extra = extra
        self.proc: Proc | None = None

    def start(self) -> None:
        """
        Start the server and wait until it accepts connections.
        """
        self.proc = Proc([
            self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.directory,
            "--save", "", "--appendonly", "no", "--unixsocket", self.socket, "--unixsocketperm", "700",
            "--logfile", "", "--daemonize", "no", "--stream-node-max-entries", "10", *self.extra,
        ])
        self.proc.wait_line(r"Ready to accept connections")

    def stop(self) -> None:
        """
        Stop the server (SIGTERM) and wait for it to exit.
        """
        if self.proc is not None and self.proc.popen.poll() is None:
            self.proc.popen.terminate()
            self.proc.popen.wait(timeout=60)
        self.proc = None

    def url(self, db: int = 0) -> str:
        """
        The C{cluster.redis} URL of this server over TCP.
        """
        return f"redis://127.0.0.1:{self.port}/{db}"


def session(session_id: str, **fields: Any) -> dict[str, Any]:
    """
    A session as the directory holds it (a few of the /sessions fields).
    """
    return {"session": session_id, "mapping": MAPPING, "client_ip": CLIENT, "bytes_from_client": 0, **fields}


class ClusterStoreContract:
    """
    Tests every L{IClusterStore} passes.  A subclass provides L{make} (a store, not started, of
    the given node name sharing this test's backend), L{stop_backend}, L{start_backend} and
    L{pause}.
    """

    stores: list[Any]

    def make(self, node: str, **kwargs: Any) -> Any:
        raise NotImplementedError

    def stop_backend(self) -> None:
        raise NotImplementedError

    def start_backend(self) -> None:
        raise NotImplementedError

    def pause(self, seconds: float) -> defer.Deferred[None]:
        raise NotImplementedError

    @defer.inlineCallbacks
    def started(self, node: str, **kwargs: Any) -> Any:
        """
        A store of node C{node}, started.
        """
        store = self.make(node, **kwargs)
        yield store.start()
        return store

    @defer.inlineCallbacks
    def eventually(self, check: Callable[[], Any], timeout: float = 30.0, step: float = 0.02) -> Any:
        """
        Wait until C{check()} (or the Deferred it returns) is true; fail after C{timeout} s.
        """
        for _ in range(int(timeout / step)):
            if (yield defer.maybeDeferred(check)):
                return
            yield self.pause(step)
        raise AssertionError(f"condition not met within {timeout}s: {check}")

    @pytest_twisted.inlineCallbacks
    def test_provides_the_interface(self):
        """
        The store provides every method and attribute of IClusterStore.
        """
        store = yield self.started("gw-a")
        assert verifyObject(IClusterStore, store)
        assert store.state == UP
        assert store.dropped == 0

    @pytest_twisted.inlineCallbacks
    def test_login_on_one_gateway_holds_on_another(self):
        """
        A login made on gateway A is seen by gateway B promptly, and a logout on B by A.
        """
        # No periodic re-read during the test: the change must arrive as a notification.
        a = yield self.started("gw-a", resync_interval=3600)
        b = yield self.started("gw-b", resync_interval=3600)
        shared = yield a.put_login(CLIENT, "alice", 60)
        assert shared is True
        assert a.login(CLIENT)[0] == "alice"
        yield self.eventually(lambda: b.login(CLIENT) is not None, timeout=10)
        assert b.login(CLIENT)[0] == "alice"
        assert CLIENT in b.logins()
        yield b.delete_login(CLIENT)
        yield self.eventually(lambda: a.login(CLIENT) is None, timeout=10)

    @pytest_twisted.inlineCallbacks
    def test_login_expires_after_its_ttl(self):
        """
        A login lasts its TTL on every gateway, also one that started after it was made.
        """
        a = yield self.started("gw-a")
        yield a.put_login(CLIENT, "alice", 0.5)
        late = yield self.started("gw-late")
        assert late.login(CLIENT)[0] == "alice"
        yield self.eventually(lambda: a.login(CLIENT) is None and late.login(CLIENT) is None)
        after = yield self.started("gw-after")
        assert after.logins() == {}

    @pytest_twisted.inlineCallbacks
    def test_limit_of_two_across_three_gateways(self):
        """
        With a cluster limit of 2, a client's third session is refused whichever gateway it
        reaches; once one ends, a new one is admitted.
        """
        a = yield self.started("gw-a")
        b = yield self.started("gw-b")
        c = yield self.started("gw-c")
        assert (yield a.acquire(MAPPING, CLIENT, 2, "a-1")) is True
        assert (yield b.acquire(MAPPING, CLIENT, 2, "b-1")) is True
        assert (yield c.acquire(MAPPING, CLIENT, 2, "c-1")) is False
        assert (yield a.acquire(MAPPING, CLIENT, 2, "a-2")) is False
        assert (yield c.acquire(MAPPING, "10.0.0.6", 2, "c-2")) is True, "another client has its own count"
        assert (yield c.acquire("ssh", CLIENT, 2, "c-3")) is True, "another mapping has its own count"
        a.release("a-1")
        yield self.eventually(lambda: c.acquire(MAPPING, CLIENT, 2, "c-1"))
        assert (yield b.acquire(MAPPING, CLIENT, 2, "b-2")) is False

    @pytest_twisted.inlineCallbacks
    def test_dead_gateway_counts_and_sessions_expire(self):
        """
        A gateway that dies (stops heartbeating without cleaning up) stops counting and leaves
        the cluster view after node_ttl; a clean stop frees its counts at once.
        """
        a = yield self.started("gw-a")
        b = yield self.started("gw-b")
        c = yield self.started("gw-c")
        assert (yield a.acquire(MAPPING, CLIENT, 1, "a-1")) is True
        yield a.publish_sessions([session("a-1")])
        assert [s["node"] for s in (yield b.cluster_sessions())] == ["gw-a"]
        assert (yield b.acquire(MAPPING, CLIENT, 1, "b-1")) is False
        yield a.stop(deregister=False)
        yield self.eventually(lambda: b.acquire(MAPPING, CLIENT, 1, "b-1"))
        yield self.eventually(lambda: b.cluster_sessions().addCallback(lambda found: found == []))
        yield b.stop()
        assert (yield c.acquire(MAPPING, CLIENT, 1, "c-1")) is True, "a cleanly stopped gateway's counts are gone at once"

    @pytest_twisted.inlineCallbacks
    def test_duplicate_node_name_refused(self):
        """
        A second live gateway with the same node name is refused with an error naming
        cluster.node; once the first has stopped, the name is free again.
        """
        first = yield self.started("gw-a")
        second = self.make("gw-a")
        with pytest.raises(NodeNameTaken, match=r"cluster\.node.*gw-a"):
            yield second.start()
        yield first.stop()
        third = yield self.started("gw-a")
        assert third.state == UP

    @pytest_twisted.inlineCallbacks
    def test_session_directory_merges_nodes(self):
        """
        Every gateway's published sessions appear in the cluster view of any gateway, with
        node; a re-publish replaces the previous list.
        """
        a = yield self.started("gw-a")
        b = yield self.started("gw-b")
        yield a.publish_sessions([session("a-1"), session("a-2")])
        yield b.publish_sessions([session("b-1", bytes_from_client=7)])
        found = yield a.cluster_sessions()
        assert sorted((s["node"], s["session"]) for s in found) == [("gw-a", "a-1"), ("gw-a", "a-2"), ("gw-b", "b-1")]
        assert [s["bytes_from_client"] for s in found if s["session"] == "b-1"] == [7]
        yield a.publish_sessions([session("a-2")])
        found = yield b.cluster_sessions()
        assert sorted(s["session"] for s in found) == ["a-2", "b-1"]

    @pytest_twisted.inlineCallbacks
    def test_sessions_source_published_on_heartbeat(self):
        """
        A gateway's live sessions reach the cluster view by themselves, through its heartbeat.
        """
        live = [session("a-1")]
        yield self.started("gw-a", sessions=lambda: list(live))
        b = yield self.started("gw-b")
        live.append(session("a-2"))
        yield self.eventually(lambda: b.cluster_sessions().addCallback(lambda found: len(found) == 2))

    @pytest_twisted.inlineCallbacks
    def test_kill_reaches_the_owner_and_is_confirmed(self):
        """
        A kill on any gateway ends the session on the gateway that runs it and answers only
        after that gateway confirmed; an unknown session is reported as not found; an owner
        that never confirms makes the kill fail after the bound.
        """
        killed: list[tuple[str, str]] = []
        stuck = defer.Deferred()

        def owner(node: str, sessions: set[str]) -> Callable[[str], Any]:
            def on_kill(session_id: str) -> Any:
                if session_id == "stuck" and node == "gw-a":
                    return stuck
                if session_id in sessions:
                    killed.append((node, session_id))
                    return True
                return False

            return on_kill

        yield self.started("gw-a", on_kill=owner("gw-a", {"a-1"}), kill_timeout=KILL_TIMEOUT)
        b = yield self.started("gw-b", on_kill=owner("gw-b", {"b-1"}), kill_timeout=KILL_TIMEOUT)
        c = yield self.started("gw-c", on_kill=owner("gw-c", set()), kill_timeout=KILL_TIMEOUT)
        assert (yield c.kill("a-1")) is True
        assert killed == [("gw-a", "a-1")]
        assert (yield c.kill("b-1")) is True
        assert (yield b.kill("nobody-1")) is False
        assert killed == [("gw-a", "a-1"), ("gw-b", "b-1")]
        d = c.kill("stuck")
        yield self.eventually(lambda: d.called, timeout=10 * KILL_TIMEOUT)
        with pytest.raises(KillTimeout, match="stuck"):
            yield d
        stuck.callback(True)

    @pytest_twisted.inlineCallbacks
    def test_events_stream_is_capped(self):
        """
        Events reach the stream as JSON, in order, and the stream stays near events_maxlen.
        """
        store = yield self.started("gw-a", events_stream="wgm:events", events_maxlen=20)
        for i in range(300):
            store.add_event({"event": "ClientConnect", "session": f"a-{i}", "node": "gw-a"})
        yield self.eventually(lambda: store.recent_events(1).addCallback(lambda e: e == [{"event": "ClientConnect", "session": "a-299", "node": "gw-a"}]))
        length = yield store.events_length()
        assert 20 <= length <= 20 + 100 and length < 300
        assert [e["session"] for e in (yield store.recent_events(3))] == ["a-297", "a-298", "a-299"]
        assert store.dropped == 0

    @pytest_twisted.inlineCallbacks
    def test_events_dropped_and_counted_while_backend_down(self):
        """
        While the shared store is down, events wait in a bounded buffer; beyond it they are
        dropped and counted; the waiting ones are written once it is back.
        """
        store = yield self.started("gw-a", events_stream="wgm:events", event_buffer=10)
        self.stop_backend()
        yield self.eventually(lambda: store.state == DOWN)
        for i in range(15):
            store.add_event({"event": "ClientDisconnect", "session": f"a-{i}"})
        assert store.dropped == 5
        self.start_backend()
        yield self.eventually(lambda: store.state == UP)
        yield self.eventually(lambda: store.events_length().addCallback(lambda n: n == 10))
        assert [e["session"] for e in (yield store.recent_events(10))] == [f"a-{i}" for i in range(10)]
        assert store.dropped == 5

    @pytest_twisted.inlineCallbacks
    def test_reconnect_publishes_counts_sessions_and_logins_again(self):
        """
        After the shared store restarts empty, each gateway reconnects, re-registers and
        publishes its counts, its sessions and the logins it knows again; observers hear the
        link go down and up.
        """
        states: list[str] = []
        a = yield self.started("gw-a", sessions=lambda: [session("a-1")])
        a.add_state_observer(states.append)
        b = yield self.started("gw-b")
        assert (yield a.acquire(MAPPING, CLIENT, 1, "a-1")) is True
        yield a.put_login(CLIENT, "alice", 60)
        self.stop_backend()
        yield self.eventually(lambda: a.state == DOWN and b.state == DOWN)
        with pytest.raises(ClusterUnavailable):
            yield b.acquire(MAPPING, CLIENT, 1, "b-1")
        assert a.login(CLIENT)[0] == "alice", "the last known logins still hold"
        assert (yield b.put_login("10.0.0.9", "bob", 60)) is False, "a login made while down holds locally"
        self.start_backend()
        yield self.eventually(lambda: a.state == UP and b.state == UP)
        yield self.eventually(lambda: a.when_state(UP).addCallback(lambda _: True))
        assert states == [DOWN, UP]
        assert (yield b.acquire(MAPPING, CLIENT, 1, "b-1")) is False, "a's count was published again"
        yield self.eventually(lambda: b.cluster_sessions().addCallback(lambda found: [s["session"] for s in found] == ["a-1"]))
        c = yield self.started("gw-c")
        assert c.login(CLIENT)[0] == "alice"
        assert c.login("10.0.0.9")[0] == "bob"

    @pytest_twisted.inlineCallbacks
    def test_session_admitted_while_down_counts_after_reconnect(self):
        """
        A session admitted on node-local limits while the link was down counts cluster-wide
        once it is back; one that ended meanwhile does not.
        """
        a = yield self.started("gw-a")
        b = yield self.started("gw-b")
        assert (yield a.acquire(MAPPING, CLIENT, 1, "a-1")) is True
        self.stop_backend()
        yield self.eventually(lambda: a.state == DOWN)
        a.release("a-1")
        a.hold(MAPPING, "10.0.0.7", "a-2")
        self.start_backend()
        yield self.eventually(lambda: a.state == UP and b.state == UP)
        assert (yield b.acquire(MAPPING, CLIENT, 1, "b-1")) is True
        assert (yield b.acquire(MAPPING, "10.0.0.7", 1, "b-2")) is False


class TestFakeClusterStore(ClusterStoreContract):
    """
    The contract, on the in-memory fake (virtual time).
    """

    @pytest.fixture(autouse=True)
    def backend(self):
        """
        One fake backend per test; every store stopped afterwards.
        """
        self.shared = FakeClusterBackend()
        self.stores = []
        yield self.shared
        for store in self.stores:
            store.stop(deregister=False)

    def make(self, node: str, **kwargs: Any) -> FakeClusterStore:
        store = FakeClusterStore(self.shared, node, NODE_TTL, **kwargs)
        self.stores.append(store)
        return store

    def stop_backend(self) -> None:
        self.shared.stop()

    def start_backend(self) -> None:
        self.shared.start()

    def pause(self, seconds: float) -> defer.Deferred[None]:
        self.shared.clock.advance(seconds)
        return defer.succeed(None)


class TestRedisClusterStore(ClusterStoreContract):
    """
    The contract, on a real redis-server.
    """

    @pytest.fixture(autouse=True)
    def redis(self, tmp_path):
        """
        A redis-server of this test's own; every store stopped and the server ended afterwards.
        """
        self.server = RedisServer(str(tmp_path))
        self.server.start()
        self.prefix = f"wgm-test-{secrets.token_hex(3)}"
        self.stores = []
        yield self.server
        for store in self.stores:
            pytest_twisted.blockon(store.stop(deregister=False))
        self.server.stop()

    def make(self, node: str, **kwargs: Any) -> Any:
        from wingate_map.cluster import RedisClusterStore

        store = RedisClusterStore(
            parse_redis_url(self.server.url()), node, NODE_TTL, prefix=self.prefix,
            timeout=5.0, connect_timeout=20.0, retry_initial=0.05, retry_max=0.2, **kwargs,
        )
        self.stores.append(store)
        return store

    def stop_backend(self) -> None:
        self.server.stop()

    def start_backend(self) -> None:
        self.server.start()

    def pause(self, seconds: float) -> defer.Deferred[None]:
        from twisted.internet import reactor

        return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.inlineCallbacks
def test_unix_socket_password_and_database(tmp_path):
    """
    A unix:// URL with a password and a database reaches the same data as a TCP URL with them;
    a wrong password makes the start fail at once, saying so (without the password).
    """
    from wingate_map.cluster import RedisClusterStore

    server = RedisServer(str(tmp_path), "--requirepass", "s3cret")
    server.start()
    stores = []
    try:
        over_unix = RedisClusterStore(parse_redis_url(f"unix://:s3cret@{server.socket}?db=3"), "gw-u", NODE_TTL, connect_timeout=20.0)
        over_tcp = RedisClusterStore(parse_redis_url(f"redis://:s3cret@127.0.0.1:{server.port}/3"), "gw-t", NODE_TTL, connect_timeout=20.0)
        other_db = RedisClusterStore(parse_redis_url(f"redis://:s3cret@127.0.0.1:{server.port}/4"), "gw-o", NODE_TTL, connect_timeout=20.0)
        wrong = RedisClusterStore(parse_redis_url(f"redis://:nope@127.0.0.1:{server.port}/3"), "gw-w", NODE_TTL, connect_timeout=1.0)
        stores = [over_unix, over_tcp, other_db, wrong]
        for store in stores[:3]:
            yield store.start()
        yield over_unix.put_login(CLIENT, "alice", 60)
        assert (yield over_unix.acquire(MAPPING, CLIENT, 1, "u-1")) is True
        assert (yield over_tcp.acquire(MAPPING, CLIENT, 1, "t-1")) is False
        assert (yield other_db.acquire(MAPPING, CLIENT, 1, "o-1")) is True, "another database is another cluster"
        with pytest.raises(ClusterUnavailable, match=r"cluster\.redis: redis://:\*\*\*@127\.0\.0\.1:\d+/3 refused .*WRONGPASS"):
            yield wrong.start()
        assert wrong.state == DOWN
    finally:
        for store in stores:
            yield store.stop(deregister=False)
        server.stop()


@pytest.mark.parametrize(
    "url, expected",
    [
        ("redis://127.0.0.1", dict(scheme="redis", host="127.0.0.1", port=6379, db=0, password=None)),
        ("redis://:p%40ss@redis.example:6380/2", dict(host="redis.example", port=6380, db=2, password="p@ss", username=None)),
        ("redis://gw:pw@[::1]:7000/", dict(host="::1", port=7000, db=0, username="gw", password="pw")),
        ("rediss://redis.example/1?ca=/etc/ca.pem", dict(scheme="rediss", port=6379, db=1, ca="/etc/ca.pem")),
        ("unix:///run/redis/redis.sock?db=5", dict(scheme="unix", path="/run/redis/redis.sock", db=5, host=None)),
        ("unix://:pw@/run/redis.sock", dict(scheme="unix", path="/run/redis.sock", db=0, password="pw")),
    ],
)
def test_redis_url_parsed(url, expected):
    """
    cluster.redis URLs give their host, port, socket path, database and login.
    """
    address = parse_redis_url(url)
    for name, value in expected.items():
        assert getattr(address, name) == value, name


@pytest.mark.parametrize(
    "url, message",
    [
        ("http://127.0.0.1:6379", "scheme must be redis://, rediss:// or unix://"),
        ("127.0.0.1:6379", "scheme"),
        ("redis://127.0.0.1:99999", "malformed URL"),
        ("redis://127.0.0.1:0", "port must be 1-65535"),
        ("redis://127.0.0.1/x", "database must be a number"),
        ("redis://127.0.0.1/0/1", "path must be the database number"),
        ("redis:///0", "needs a host"),
        ("redis://127.0.0.1/0?db=1", "unknown URL parameter 'db'"),
        ("redis://127.0.0.1/0#frag", "fragment"),
        ("unix://host/run/redis.sock", "names a socket path, not a host"),
        ("unix://", "absolute socket path"),
        ("unix:///run/redis.sock?db=-1", "database must be a number"),
        ("unix:///run/redis.sock?timeout=1", "unknown URL parameter 'timeout'"),
        ("", "must be a URL"),
    ],
)
def test_redis_url_rejected_with_the_key(url, message):
    """
    A malformed cluster.redis URL is an error naming the key and what is wrong.
    """
    with pytest.raises(ConfigError) as caught:
        parse_redis_url(url)
    assert str(caught.value).startswith("cluster.redis: ")
    assert message in str(caught.value)


def test_redis_url_password_never_shown():
    """
    The password appears neither in errors, nor in the address's repr or display form.
    """
    address = parse_redis_url("redis://gw:hunter2@127.0.0.1:6379/1")
    assert "hunter2" not in repr(address)
    assert address.display() == "redis://gw:***@127.0.0.1:6379/1"
    with pytest.raises(ConfigError) as caught:
        parse_redis_url("redis://gw:hunter2@127.0.0.1:6379/zz")
    assert "hunter2" not in str(caught.value)


def test_rediss_endpoint_uses_tls():
    """
    A rediss:// URL connects with TLS, checking the server's name.
    """
    from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint
    from twisted.internet.interfaces import IStreamClientEndpoint
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    tls = parse_redis_url("rediss://redis.example/0").endpoint(reactor, 5)
    assert IStreamClientEndpoint.providedBy(tls) and not isinstance(tls, HostnameEndpoint)
    assert isinstance(parse_redis_url("redis://redis.example/0").endpoint(reactor, 5), HostnameEndpoint)
    assert isinstance(parse_redis_url("unix:///run/redis.sock").endpoint(reactor, 5), UNIXClientEndpoint)
    with pytest.raises(ConfigError, match=r"cluster\.redis: cannot read the CA certificate"):
        parse_redis_url("rediss://redis.example/0?ca=/nonexistent/ca.pem").endpoint(reactor, 5)
