"""
The root's other child services, each starting and stopping itself: the audit log, the
interception table, the admin site, the worker processes and their directory, the adapter
watcher and the link to the cluster store.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from ..errors import WingateMapError
from ..events import AuditLogSink
from ..network import TABLE, InterceptionError, install, remove
from ..interfaces import IEventSink
from ._workers import WorkerPool, hand_over
from ._resource import Resource

_log = Logger(namespace="wingate_map.service")


def _give(path: str, run_as: tuple[int | None, int | None] | None) -> None:
    """
    Under twistd's C{--uid}/C{--gid}, give C{path} (created as root before the privilege drop)
    to that user, so that it stays usable after the drop.
    """
    if run_as is None or os.geteuid() != 0:
        return
    uid, gid = run_as
    if uid is None and gid is None:
        return
    os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)


@implementer(IEventSink)
class AuditLog(Resource):
    """
    C{[service] audit_log}: every event appended to a file as a JSON line.  In the event chain
    (when a path is set) it passes events to the open file; a reload L{stage}s the new path
    (a new file, or the same path opened anew after log rotation) and L{commit}s it.

    @ivar path: the file, or L{None}.
    @ivar sink: the open file, while started.
    @ivar run_as: twistd's C{--uid}/C{--gid}: the file is given to them (a reload after log
        rotation, after the privilege drop, must be able to open it again).
    """

    name = "audit-log"
    reads_events_only = True  # the EventHub's shared event (wingate_map.events.EventHub)

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.sink: AuditLogSink | None = None
        self.run_as: tuple[int | None, int | None] | None = None

    def _open_file(self, path: str) -> AuditLogSink:
        try:
            sink = AuditLogSink(path, getattr(self.parent, "reactor", None))  # batched per reactor turn
            _give(path, self.run_as)
        except OSError as e:
            raise WingateMapError(f"service.audit_log: cannot open {path}: {e.strerror or e}") from None
        return sink

    def open(self) -> None:
        """
        Open the file, if a path is set; L{WingateMapError} naming C{service.audit_log}.
        """
        if self.path:
            self.sink = self._open_file(self.path)

    def close(self) -> None:
        """
        Close the file.
        """
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.close()

    def stage(self, path: str | None) -> AuditLogSink | None:
        """
        What a reload to C{path} writes to: the same path is opened anew at once (logrotate
        moves the file, then reloads); a new one is opened beside the running one until
        L{commit}.

        @raise WingateMapError: it cannot be opened (the running file stays in use).
        """
        if path and path == self.path and self.sink is not None:
            try:
                self.sink.reopen()
            except OSError as e:
                raise WingateMapError(f"service.audit_log: cannot open {path}: {e.strerror or e}") from None
            return self.sink
        return self._open_file(path) if path else None

    def commit(self, path: str | None, sink: AuditLogSink | None) -> None:
        """
        Write to C{sink} (from L{stage}) from now on; the previous file is closed.
        """
        if sink is not self.sink and self.sink is not None:
            self.sink.close()
        self.path, self.sink = path, sink

    def discard(self, sink: AuditLogSink | None) -> None:
        """
        A reload that staged C{sink} was refused: close it unless it is the running file.
        """
        if sink is not None and sink is not self.sink:
            sink.close()

    def client_connect(self, event: dict[str, Any]) -> None:
        """
        Append ClientConnect.
        """
        if self.sink is not None:
            self.sink.client_connect(event)

    def client_disconnect(self, event: dict[str, Any]) -> None:
        """
        Append ClientDisconnect.
        """
        if self.sink is not None:
            self.sink.client_disconnect(event)


class InterceptionTable(Resource):
    """
    The nftables table of transparent interception (primary only): installed once the
    listeners are open, updated as they change, removed when stopped (as soon as the
    listeners close: intercepted connections then go to their own destinations).

    @ivar script: what the table should hold now (L{None}: no table), from the root.
    @ivar installed: the ruleset installed, or L{None}.
    """

    name = "interception"

    def __init__(self, script: Callable[[], str | None]) -> None:
        self.script = script
        self.installed: str | None = None

    def apply(self) -> None:
        """
        Install the table L{script} describes, replace it if it changed, remove it when
        L{script} says none.

        @raise InterceptionError: nft refused.
        """
        script = self.script()
        if script is None:
            self.remove()
        elif script != self.installed:
            install(script)
            self.installed = script
            _log.info("transparent interception: nftables table inet {table} installed:\n{script}", table=TABLE, script=script)

    def remove(self) -> None:
        """
        Remove the table, if installed.

        @raise InterceptionError: nft refused.
        """
        if self.installed is not None:
            self.installed = None
            remove()

    def open(self) -> None:
        self.apply()

    def close(self) -> None:
        if self.installed is None:
            return
        try:
            self.remove()
            _log.info("transparent interception: nftables table inet {table} removed", table=TABLE)
        except InterceptionError as e:
            _log.error("{error}", error=str(e))


class AdminSite(Resource):
    """
    The admin API's listener: C{admin.listen}, or a worker's private Unix socket (given to
    twistd's C{--uid}/C{--gid}).  It stays open through the shutdown drain (C{/healthz}
    answers 503 draining) and closes after it.

    @ivar port: the listening port, while open.
    """

    name = "admin"

    def __init__(self, root: Any, listen: str, private_socket: str | None = None) -> None:
        self.root = root
        self.listen = listen
        self.private_socket = private_socket
        self.port: IListeningPort | None = None

    def open(self) -> None:
        from ..admin import listen_admin

        self.port = listen_admin(self.root, self.listen)
        if self.private_socket is not None:
            try:
                hand_over([self.private_socket], self.root.run_as)
            except BaseException:
                self.close()
                raise

    def close(self) -> Any:
        port, self.port = self.port, None
        return None if port is None else port.stopListening()


class WorkerProcesses(Resource):
    """
    The worker processes of a primary (see workers.py): started at once (under twistd before
    the privilege drop, so that the workers bind the same ports as root, then drop); stopped
    with the listeners, each worker draining as the primary does.
    """

    name = "workers"

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool

    def open(self) -> None:
        self.pool.start()
        _log.info("starting {n} worker processes sharing the listeners (SO_REUSEPORT)", n=self.pool.count - 1)

    def close(self) -> Any:
        return self.pool.stop()


class RuntimeDirectory(Service):
    """
    The primary's private directory shared with its workers (sockets, logins): removed when
    stopped, after the drain.
    """

    name = "runtime-directory"

    def __init__(self, path: str) -> None:
        self.path = path

    def stopService(self) -> None:
        super().stopService()
        shutil.rmtree(self.path, ignore_errors=True)


class AdapterWatcher(Service):
    """
    Polls the machine's adapters every C{interval} seconds (C{poll}, which never raises).
    """

    name = "adapter-watcher"

    def __init__(self, clock: Any, interval: float, poll: Callable[[], None]) -> None:
        self._loop = LoopingCall(poll)
        self._loop.clock = clock
        self.interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False).addErrback(lambda f: _log.failure("adapter watcher stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()


class ClusterMember(Service):
    """
    This gateway in C{[cluster]} (SPEC §7): connects the store once the listeners are open,
    deregisters after the drain (the last sessions' releases and events are written first).
    An unreachable Redis is not fatal (the store keeps trying); a node name another live
    gateway holds is: C{on_fatal} is called with the problem.
    """

    name = "cluster"

    def __init__(self, store: Any, on_fatal: Callable[[str], None]) -> None:
        self.store = store
        self.on_fatal = on_fatal

    def startService(self) -> None:
        super().startService()
        from ..cluster import NodeNameTaken

        def failed(failure: Any) -> None:
            if failure.check(NodeNameTaken):
                self.on_fatal(str(failure.value))
            else:
                _log.warn("cluster: {why}", why=failure.getErrorMessage())

        self.store.start().addErrback(failed)

    def stopService(self) -> Any:
        super().stopService()
        return self.store.stop(deregister=True)
