"""
The cluster store on Redis, through txredisapi (a Twisted-native client).

Two connections: one for commands (replies in order, so commands sent back to back are
pipelined on the wire) and one subscribed to the store's channels (login changes, kill requests,
replies to this node).  Both reconnect with exponential backoff (txredisapi's ClientService
slots); the store is C{up} while both are connected and this node is registered.  Each
(re)connection registers the node again, sends the releases that could not be sent, re-publishes
the counted sessions, the session directory and (if Redis lost its data) the logins, re-reads
the logins and writes the buffered events.
"""

from __future__ import annotations

import json
import secrets
from typing import Any, Callable, Iterable

import txredisapi
from twisted.internet.defer import Deferred, DeferredList, gatherResults, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ..interfaces import IClusterStore
from . import _scripts
from ._errors import ClusterUnavailable, KillTimeout, NodeNameTaken
from ._state import DOWN, UP, StoreBase
from ._url import RedisAddress

_log = Logger()

# Fields per HSET / HDEL command when writing the session directory.
_CHUNK = 1000


class _CommandFactory(txredisapi.RedisFactory):
    """
    One command connection that tells the store when it is usable and when it is gone.
    (C{addConnection} runs once AUTH and SELECT are done.)
    """

    def __init__(self, store: "RedisClusterStore", address: RedisAddress, reply_timeout: float | None, dbid: int | None) -> None:
        super().__init__(
            address.display(), dbid, 1, isLazy=True, password=address.password,
            replyTimeout=reply_timeout, convertNumbers=False, username=address.username,
        )
        self.store = store
        # txredisapi reports a failed login here (and then stops trying); nobody else waits on it.
        self.deferred.addErrback(self._refused)

    def _refused(self, failure: Failure) -> None:
        _log.error(
            "cluster node {node}: {redis} refused the connection, not retrying: {why}",
            node=self.store.node, redis=self.store.address.display(), why=failure.getErrorMessage(),
        )
        self.store._start_failed(Failure(ClusterUnavailable(
            f"cluster.redis: {self.store.address.display()} refused the connection: {failure.getErrorMessage()}"
        )))

    def addConnection(self, conn: Any) -> None:
        super().addConnection(conn)
        if conn in self.pool:
            self.store._connection_up(self, conn)

    def delConnection(self, conn: Any) -> None:
        super().delConnection(conn)
        self.store._connection_down(self, conn)


class _SubscriberProtocol(txredisapi.SubscriberProtocol):
    """
    The subscribed connection: hands every message to the store.
    """

    def messageReceived(self, pattern: Any, channel: str, message: str) -> None:
        self.factory.store._message(channel, message)


class _SubscriberFactory(_CommandFactory):
    """
    The connection subscribed to the store's channels (no reply timeout: it waits for messages).
    """

    protocol = _SubscriberProtocol


@implementer(IClusterStore)
class RedisClusterStore(StoreBase):
    """
    See L{IClusterStore}; the Redis layout is in L{wingate_map.cluster._scripts}.

    @param address: where Redis is (L{wingate_map.cluster.parse_redis_url}).
    @param node: this gateway's unique node name.
    @param node_ttl: seconds after which a silent node is gone; heartbeats every third of it.
    @param events_stream: the stream events are XADDed to, or None.
    @param events_maxlen: the stream's approximate cap (C{MAXLEN ~}).
    @param sessions: called on every heartbeat for this node's live sessions (dicts with at
        least C{session}), which are then published.
    @param on_kill: called with a session id to end it here; returns (a Deferred of) whether
        this node had it.
    @param timeout: seconds a command may take before the connection is considered dead (the
        bound on L{acquire}).
    @param connect_timeout: how long L{start} waits for the link before failing with
        L{ClusterUnavailable}.
    @param kill_timeout: how long L{kill} waits for the owner's confirmation.
    @param event_buffer: events waiting at most; beyond, they are dropped and counted.
    @param event_batch: events per pipelined write.
    @param resync_interval: seconds between full re-reads of the logins.
    @param retry_initial: first reconnect delay, growing to C{retry_max}.
    """

    def __init__(
        self,
        address: RedisAddress,
        node: str,
        node_ttl: float = 15.0,
        events_stream: str | None = None,
        events_maxlen: int = 1_000_000,
        *,
        reactor: Any = None,
        prefix: str = "wingatemap",
        sessions: Callable[[], Iterable[dict[str, Any]]] | None = None,
        on_kill: Callable[[str], Any] | None = None,
        timeout: float = 2.0,
        connect_timeout: float = 5.0,
        kill_timeout: float = 5.0,
        event_buffer: int = 10_000,
        event_batch: int = 500,
        resync_interval: float = 30.0,
        retry_initial: float = 0.5,
        retry_max: float = 10.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.reactor = reactor
        self.address = address
        self.prefix = prefix
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.event_batch = event_batch
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self._init_common(
            reactor, node, node_ttl, events_stream, events_maxlen, event_buffer, sessions, on_kill,
            kill_timeout, resync_interval,
        )
        self._token = secrets.token_hex(16)
        self._conn: Any = None
        self._subscriber: Any = None
        self._subscribed = False
        self._registered = False
        self._syncing = False
        self._beating = False
        self._flushing = False
        self._flush_call: Any = None
        self._published: dict[str, str] | None = None
        self._kill_waits: dict[str, _KillWait] = {}
        self._starting: Deferred[None] | None = None
        self._start_timer: Any = None
        self._factories: list[_CommandFactory] = []
        self._heartbeat: LoopingCall | None = None
        self._stopped = False

    # --- keys -------------------------------------------------------------------------------

    def _key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    @property
    def _channels(self) -> list[str]:
        return [self._key("logins"), self._key("kill"), self._key("control", self.node)]

    # --- state ------------------------------------------------------------------------------

    def _update_state(self, why: str = "") -> None:
        up = self._conn is not None and self._subscribed and self._registered
        self._link.set(UP if up else DOWN, why)
        if up:
            self._start_done(None)
            self._schedule_flush()

    # --- lifecycle --------------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        See L{IClusterStore.start}.
        """
        self._starting = Deferred()
        commands = _CommandFactory(self, self.address, self.timeout, self.address.db)
        subscriber = _SubscriberFactory(self, self.address, None, None)
        for factory in (commands, subscriber):
            factory.initialDelay = self.retry_initial
            factory.maxDelay = self.retry_max
            factory.startConnecting(self.address.endpoint(self.reactor, self.connect_timeout))
        self._factories = [commands, subscriber]
        self._heartbeat = LoopingCall(self._beat)
        self._heartbeat.clock = self.reactor
        self._heartbeat.start(self.node_ttl / 3, now=False)
        self._start_timer = self.reactor.callLater(self.connect_timeout, self._start_failed, None)
        _log.info("cluster node {node}: connecting to {redis}", node=self.node, redis=self.address.display())
        return self._starting

    def _start_done(self, failure: Failure | None) -> None:
        starting, self._starting = self._starting, None
        if self._start_timer is not None and self._start_timer.active():
            self._start_timer.cancel()
        self._start_timer = None
        if starting is not None:
            starting.callback(None) if failure is None else starting.errback(failure)

    def _start_failed(self, failure: Failure | None) -> None:
        self._start_timer = None
        if failure is None:
            failure = Failure(ClusterUnavailable(
                f"cluster.redis: {self.address.display()} not reachable within {self.connect_timeout:g} s; "
                "serving with node-local state and retrying"
            ))
        self._start_done(failure)

    @inlineCallbacks
    def stop(self, deregister: bool = True) -> Any:
        """
        See L{IClusterStore.stop}.
        """
        self._stopped = True
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._start_failed(Failure(ClusterUnavailable("the cluster store was stopped")))
        for wait in list(self._kill_waits.values()):
            wait.fail(ClusterUnavailable("the cluster store was stopped"))
        if deregister and self._conn is not None and self._registered:
            try:
                deadline = self.reactor.seconds() + self.timeout
                while self._events.pending and self._conn is not None and self.reactor.seconds() < deadline:
                    yield self._write_events()
                conn = self._conn
                yield conn.eval(_scripts.DEREGISTER, [self._key("node", self.node)], [self._token])
                yield conn.eval(_scripts.SWEEP, [self._key("nodes")], [self.prefix])
            except Exception as e:
                _log.warn("cluster node {node}: could not deregister cleanly: {why}", node=self.node, why=str(e))
        self._registered = False
        factories, self._factories = self._factories, []
        yield gatherResults([f.disconnect() for f in factories], consumeErrors=True)
        self._conn = self._subscriber = None
        self._subscribed = False
        self._update_state("stopped")

    # --- connections ------------------------------------------------------------------------

    def _connection_up(self, factory: _CommandFactory, conn: Any) -> None:
        if self._stopped:
            return
        if isinstance(factory, _SubscriberFactory):
            self._subscriber = conn
            d = conn.subscribe(self._channels)
            d.addCallback(lambda _: self._subscriber_ready(conn))
            d.addErrback(lambda f: _log.warn("cluster node {node}: cannot subscribe: {why}", node=self.node, why=f.getErrorMessage()))
        else:
            self._conn = conn
            self._sync()

    def _subscriber_ready(self, conn: Any) -> None:
        if conn is not self._subscriber:
            return
        self._subscribed = True
        self._update_state()
        if self._registered:
            # Messages may have been missed while the subscription was down.
            self._resync_logins().addErrback(lambda _: None)

    def _connection_down(self, factory: _CommandFactory, conn: Any) -> None:
        if conn is self._subscriber:
            self._subscriber = None
            self._subscribed = False
        elif conn is self._conn:
            self._conn = None
            self._registered = False
            self._published = None
        else:
            return
        self._update_state("connection lost")

    def _command(self, *args: Any) -> Deferred[Any]:
        if self._conn is None:
            raise ClusterUnavailable("cluster link is down")
        return self._conn.execute_command(*args)

    def _eval(self, script: str, keys: list[str], args: list[Any]) -> Deferred[Any]:
        if self._conn is None:
            raise ClusterUnavailable("cluster link is down")
        return self._conn.eval(script, keys, args)

    @inlineCallbacks
    def _sync(self) -> Any:
        """
        The command connection is (again) usable: register, re-publish, re-read.
        """
        if self._syncing:
            return
        self._syncing = True
        try:
            registered = yield self._register()
            if not registered:
                if self._starting is not None:
                    self._start_done(Failure(NodeNameTaken(self.node)))
                    yield self.stop(deregister=False)
                else:
                    _log.error("{why}", why=str(NodeNameTaken(self.node)))
                return
            instance = yield self._eval(_scripts.INSTANCE, [self._key("instance")], [secrets.token_hex(8)])
            lost_data = self._instance is not None and instance != self._instance
            self._instance = instance
            yield self._send_releases()
            yield self._republish_counts()
            yield self._send_logins(lost_data)
            self._published = None
            yield self._publish_from_source()
            yield self._resync_logins()
            self._registered = True
            self._update_state()
        except Exception as e:
            _log.warn("cluster node {node}: resynchronising with {redis} failed: {why}", node=self.node, redis=self.address.display(), why=str(e))
        finally:
            self._syncing = False

    @inlineCallbacks
    def _register(self) -> Any:
        result = yield self._eval(
            _scripts.REGISTER, [self._key("node", self.node), self._key("nodes")],
            [self._token, int(self.node_ttl * 1000), self.node],
        )
        return int(result) == 1

    @inlineCallbacks
    def _beat(self) -> Any:
        """
        Every third of node_ttl: renew the lease, publish the sessions, sweep dead nodes and
        now and then re-read the logins.  A lost lease makes the node re-register.
        """
        if self._beating or self._conn is None or self._syncing:
            return
        if not self._registered:
            self._sync()
            return
        self._beating = True
        try:
            if not (yield self._register()):
                self._registered = False
                self._update_state("node registration lost")
                _log.error("{why}", why=str(NodeNameTaken(self.node)))
                return
            yield self._publish_from_source()
            yield self._eval(_scripts.SWEEP, [self._key("nodes")], [self.prefix])
            if self.reactor.seconds() - self._last_resync >= self.resync_interval:
                yield self._resync_logins()
        except Exception as e:
            _log.warn("cluster node {node}: heartbeat failed: {why}", node=self.node, why=str(e))
        finally:
            self._beating = False

    # --- logins -----------------------------------------------------------------------------

    def _write_login(self, client_ip: str, user: str | None, ttl: float) -> Deferred[bool]:
        if self._link.state != UP:
            self._unsent_logins[client_ip] = (user, self.reactor.seconds() + ttl)
            return succeed(False)
        key = self._key("login", client_ip)
        write = self._command("SET", key, user, "PX", max(1, int(ttl * 1000))) if user is not None else self._command("DEL", key)
        message = json.dumps({"client_ip": client_ip, "user": user, "ttl": ttl})
        announce = self._command("PUBLISH", self._key("logins"), message)

        def failed(f: Failure) -> bool:
            self._unsent_logins[client_ip] = (user, self.reactor.seconds() + ttl)
            return False

        return gatherResults([write, announce], consumeErrors=True).addCallbacks(lambda _: True, failed)

    @inlineCallbacks
    def _send_logins(self, lost_data: bool) -> Any:
        """
        Write the login changes made while the link was down; if Redis lost its data, also every
        login this node knows (without overwriting newer ones).
        """
        now = self.reactor.seconds()
        writes = []
        unsent, self._unsent_logins = self._unsent_logins, {}
        for client_ip, (user, expires) in unsent.items():
            key = self._key("login", client_ip)
            if user is None:
                writes.append(self._command("DEL", key))
            elif expires > now:
                writes.append(self._command("SET", key, user, "PX", max(1, int((expires - now) * 1000))))
            writes.append(self._command("PUBLISH", self._key("logins"), json.dumps({"client_ip": client_ip, "user": user, "ttl": max(0.0, expires - now)})))
        if lost_data:
            for client_ip, (user, expires) in self._logins.snapshot().items():
                if client_ip not in unsent:
                    writes.append(self._command("SET", self._key("login", client_ip), user, "PX", max(1, int((expires - now) * 1000)), "NX"))
        yield gatherResults(writes, consumeErrors=True)

    @inlineCallbacks
    def _resync_logins(self) -> Any:
        """
        Replace the login cache with what Redis holds (SCAN, then GET and PTTL pipelined).
        """
        self._last_resync = self.reactor.seconds()
        self._logins.begin_resync()
        try:
            keys: list[str] = []
            cursor = "0"
            for _ in range(1_000_000):
                reply = yield self._command("SCAN", cursor, "MATCH", self._key("login", "*"), "COUNT", 1000)
                cursor, batch = reply[0], reply[1]
                keys.extend(batch)
                if str(cursor) == "0":
                    break
            replies = yield gatherResults(
                [self._command(op, key) for key in keys for op in ("GET", "PTTL")], consumeErrors=True
            )
        except BaseException:
            self._logins.abort_resync()
            raise
        prefix = len(self._key("login", ""))
        snapshot = []
        for i, key in enumerate(keys):
            user, pttl = replies[2 * i], int(replies[2 * i + 1])
            if user is not None and pttl > 0:
                snapshot.append((key[prefix:], user, pttl / 1000.0))
        self._logins.replace(snapshot)

    # --- cluster limits ---------------------------------------------------------------------

    def acquire(self, mapping: str, client_ip: str, limit: int, session_id: str) -> Deferred[bool]:
        """
        See L{IClusterStore.acquire}.  One EVALSHA round trip.
        """
        if self._link.state != UP:
            return _unavailable()
        key = self._key("conn", mapping, client_ip)
        pair = (mapping, client_ip)

        def counted(result: Any) -> bool:
            if int(result) == 1:
                self._counts.held[session_id] = pair
                return True
            return False

        def failed(f: Failure) -> Failure:
            # The script may have run: make sure a release reaches Redis.
            self._counts.unsent_releases[session_id] = pair
            return Failure(ClusterUnavailable(f"cluster limit check failed: {f.getErrorMessage()}"))

        d = self._eval(_scripts.ACQUIRE, [key, self._key("held", self.node)], [int(limit), self.node, session_id, self._key("node", "")])
        return d.addCallbacks(counted, failed)

    def hold(self, mapping: str, client_ip: str, session_id: str) -> None:
        """
        See L{IClusterStore.hold}.
        """
        self._counts.held[session_id] = (mapping, client_ip)
        self._counts.unsent_releases.pop(session_id, None)
        if self._link.state == UP:
            self._write_holds({(mapping, client_ip): [session_id]}).addErrback(lambda _: None)

    def release(self, session_id: str) -> None:
        """
        See L{IClusterStore.release}.
        """
        pair = self._counts.held.pop(session_id, None) or self._counts.unsent_releases.pop(session_id, None)
        if pair is None:
            return
        if self._link.state != UP:
            self._counts.unsent_releases[session_id] = pair
            return

        def failed(f: Failure) -> None:
            self._counts.unsent_releases[session_id] = pair

        self._release(session_id, pair).addErrback(failed)

    def _release(self, session_id: str, pair: tuple[str, str]) -> Deferred[Any]:
        return self._eval(_scripts.RELEASE, [self._key("conn", *pair), self._key("held", self.node)], [session_id, self.node])

    def _send_releases(self) -> Deferred[Any]:
        unsent, self._counts.unsent_releases = self._counts.unsent_releases, {}
        return gatherResults([self._release(s, pair) for s, pair in unsent.items()], consumeErrors=True)

    def _write_holds(self, pairs: dict[tuple[str, str], list[str]]) -> Deferred[Any]:
        writes = []
        held = self._key("held", self.node)
        for pair, sessions in pairs.items():
            key = self._key("conn", *pair)
            fields = [x for s in sessions for x in (s, self.node)]
            writes.append(self._command("HSET", key, *fields))
            writes.append(self._command("SADD", held, key))
        return gatherResults(writes, consumeErrors=True)

    def _republish_counts(self) -> Deferred[Any]:
        return self._write_holds(self._counts.pairs())

    # --- session directory ------------------------------------------------------------------

    def _publish_from_source(self) -> Deferred[Any]:
        if self.sessions_source is None:
            return self.publish_sessions(()) if self._published is None else succeed(None)
        return self.publish_sessions(self.sessions_source())

    def publish_sessions(self, sessions: Iterable[dict[str, Any]]) -> Deferred[None]:
        """
        See L{IClusterStore.publish_sessions}.  Writes only what changed since the last publish
        (everything after a reconnect), pipelined, and renews the directory's TTL.
        """
        if self._conn is None:
            return _unavailable()
        key = self._key("sessions", self.node)
        now = {s["session"]: json.dumps(s, separators=(",", ":"), default=str) for s in sessions}
        writes = []
        previous = self._published
        if previous is None:
            writes.append(self._command("DEL", key))
            previous = {}
        gone = [s for s in previous if s not in now]
        changed = [x for s, v in now.items() if previous.get(s) != v for x in (s, v)]
        for i in range(0, len(gone), _CHUNK):
            writes.append(self._command("HDEL", key, *gone[i : i + _CHUNK]))
        for i in range(0, len(changed), 2 * _CHUNK):
            writes.append(self._command("HSET", key, *changed[i : i + 2 * _CHUNK]))
        writes.append(self._command("PEXPIRE", key, int(self.node_ttl * 1000)))
        self._published = now

        def failed(f: Failure) -> Failure:
            self._published = None
            return f

        return gatherResults(writes, consumeErrors=True).addCallbacks(lambda _: None, failed)

    @inlineCallbacks
    def cluster_sessions(self) -> Any:
        """
        See L{IClusterStore.cluster_sessions}.
        """
        flat = yield self._eval(_scripts.SESSIONS, [self._key("nodes")], [self.prefix])
        found = []
        for i in range(0, len(flat), 2):
            session = json.loads(flat[i + 1])
            session["node"] = flat[i]
            found.append(session)
        return found

    # --- kill -------------------------------------------------------------------------------

    @inlineCallbacks
    def kill(self, session_id: str) -> Any:
        """
        See L{IClusterStore.kill}: asks this node first, then every other subscribed gateway
        (one PUBLISH); the answer is the owner's confirmation, or C{False} once every other
        gateway said it does not have the session.
        """
        if self.on_kill is not None and (yield maybeDeferred(self.on_kill, session_id)):
            return True
        if self._link.state != UP:
            raise ClusterUnavailable("cluster link is down: cannot reach the other gateways")
        request = secrets.token_hex(8)
        wait = _KillWait(session_id, self.kill_timeout, self.reactor, lambda: self._kill_waits.pop(request, None))
        self._kill_waits[request] = wait
        message = json.dumps({"request": request, "session": session_id, "from": self.node})
        try:
            receivers = yield self._command("PUBLISH", self._key("kill"), message)
        except Exception as e:
            wait.fail(ClusterUnavailable(f"cannot send the kill request: {e}"))
        else:
            # Our own subscription hears the request too and ignores it.
            wait.expect(int(receivers) - 1)
        return (yield wait.done)

    @inlineCallbacks
    def _answer_kill(self, request: dict[str, Any]) -> Any:
        ok = False
        if self.on_kill is not None:
            try:
                ok = bool((yield maybeDeferred(self.on_kill, request["session"])))
            except Exception:
                _log.failure("cluster node {node}: killing session {session} failed", node=self.node, session=request["session"])
        reply = json.dumps({"request": request["request"], "ok": ok, "node": self.node})
        try:
            yield self._command("PUBLISH", self._key("control", str(request["from"])), reply)
        except Exception as e:
            _log.warn("cluster node {node}: cannot confirm kill of {session}: {why}", node=self.node, session=request["session"], why=str(e))

    # --- messages ---------------------------------------------------------------------------

    def _message(self, channel: str, message: str) -> None:
        try:
            data = json.loads(message)
            if channel == self._key("logins"):
                self._logins.apply(str(data["client_ip"]), data["user"], float(data["ttl"]))
            elif channel == self._key("kill"):
                if data["from"] != self.node:
                    self._answer_kill(data)
            elif channel == self._key("control", self.node):
                wait = self._kill_waits.get(data["request"])
                if wait is not None:
                    wait.answer(bool(data["ok"]))
        except (ValueError, KeyError, TypeError) as e:
            _log.warn("cluster node {node}: ignoring a malformed message on {channel}: {why}", node=self.node, channel=channel, why=str(e))

    # --- events -----------------------------------------------------------------------------

    def _events_added(self) -> None:
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flushing or self._stopped or not self._events.pending or self._link.state != UP:
            return
        if self._flush_call is None or not self._flush_call.active():
            # Events added in the same reactor turn go out in one batch.
            self._flush_call = self.reactor.callLater(0, self._flush)

    @inlineCallbacks
    def _flush(self) -> Any:
        self._flushing = True
        try:
            yield self._write_events()
        finally:
            self._flushing = False
        self._schedule_flush()

    @inlineCallbacks
    def _write_events(self) -> Any:
        batch = self._events.take(self.event_batch)
        if not batch:
            return
        try:
            writes = [
                self._command("XADD", self.events_stream, "MAXLEN", "~", self.events_maxlen, "*", "json", entry)
                for entry in batch
            ]
        except ClusterUnavailable:
            self._events.put_back(batch)
            return
        results = yield DeferredList(writes, consumeErrors=True)
        failed = [entry for entry, (ok, _) in zip(batch, results) if not ok]
        if failed:
            self._events.put_back(failed)
        else:
            self._events.written()

    @inlineCallbacks
    def recent_events(self, count: int) -> Any:
        """
        See L{IClusterStore.recent_events}.
        """
        if self.events_stream is None:
            return []
        entries = yield self._command("XREVRANGE", self.events_stream, "+", "-", "COUNT", int(count))
        events = []
        for _, fields in reversed(entries):
            pairs = dict(zip(fields[::2], fields[1::2]))
            events.append(json.loads(pairs["json"]))
        return events

    @inlineCallbacks
    def events_length(self) -> Any:
        """
        See L{IClusterStore.events_length}.
        """
        if self.events_stream is None:
            return 0
        return int((yield self._command("XLEN", self.events_stream)))


def _unavailable() -> Deferred[Any]:
    d: Deferred[Any] = Deferred()
    d.errback(ClusterUnavailable("cluster link is down"))
    return d


class _KillWait:
    """
    One kill request waiting for answers: the first C{True} wins; C{False} once every expected
    gateway said no; L{KillTimeout} after the bound.
    """

    def __init__(self, session_id: str, timeout: float, reactor: Any, forget: Callable[[], object]) -> None:
        self.session_id = session_id
        self.done: Deferred[bool] = Deferred()
        self.expected: int | None = None
        self.noes = 0
        self._forget = forget
        self._timeout = timeout
        self._timer = reactor.callLater(timeout, self._timed_out)

    def _finish(self, result: Any) -> None:
        if self.done.called:
            return
        if self._timer.active():
            self._timer.cancel()
        self._forget()
        if isinstance(result, BaseException):
            self.done.errback(Failure(result))
        else:
            self.done.callback(result)

    def _timed_out(self) -> None:
        self._finish(KillTimeout(self.session_id, self._timeout))

    def expect(self, count: int) -> None:
        """
        C{count} other gateways heard the request.
        """
        self.expected = count
        self._check()

    def answer(self, ok: bool) -> None:
        """
        One gateway answered.
        """
        if ok:
            self._finish(True)
        else:
            self.noes += 1
            self._check()

    def _check(self) -> None:
        if self.expected is not None and self.noes >= self.expected:
            self._finish(False)

    def fail(self, error: BaseException) -> None:
        """
        Give up with C{error}.
        """
        self._finish(error)
