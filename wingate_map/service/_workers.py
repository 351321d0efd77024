"""
Several processes sharing the listeners (C{[service] workers = N}), so a gateway uses every core.

The process started by twistd is the primary (worker 0).  Every process opens the same
listeners with C{SO_REUSEPORT}, and the kernel spreads new connections among them.  The primary
starts workers 1..N-1 as child processes running the same command (before twistd gives up root,
so that they can bind the same ports and then drop to the same C{--uid}/C{--gid}), restarts one
that dies, forwards SIGHUP (reload) to them, and at shutdown stops them and waits for their
drains.  Only the primary installs the interception table and serves the admin API; each worker
serves a private admin API on a Unix socket in a directory only the run-as user can read, which
the primary queries to show (and kill) every process's sessions in one view, and for each
process's metrics, which its C{/metrics} adds up (see metrics.py).

What ties a worker to the primary (L{WorkerLink} in the worker, L{WorkerPool} in the primary):

  - A report pipe (the worker's fd 3): one line per session start (its ClientConnect fields),
    per session end, and every few seconds the byte counts of live sessions.  When a worker
    dies, the primary ends each session it still knows of with a ClientDisconnect of reason
    C{lost} through its own event chain (log, audit log, metrics, sinks).
  - Dying together: the worker's standard input is a pipe from the primary (end of file when
    the primary is gone), the kernel sends it a signal when the primary dies
    (C{PR_SET_PDEATHSIG}), and it checks its parent at start.  An orphaned worker closes its
    listeners at once, ends its sessions (reason C{shutdown}) and exits.
  - Resets, not FINs: in a worker, every accepted and outgoing TCP socket has C{SO_LINGER}
    C{{1, 0}} while it is open, so a worker's death makes the kernel reset its connections
    (a truncated stream looks truncated); an orderly close clears it first (with it set, Linux
    would reset even after C{shutdown(2)} and discard unsent data).  The relay's socket pump,
    which takes a session's sockets over from these wrappers, keeps the setting while it
    relays and clears it the same way before an orderly close (wingate_map/pump.py).
"""

from __future__ import annotations

import collections
import json
import os
import secrets
import select
import signal
import socket
import struct
import sys
import tempfile
import time
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import IHalfCloseableProtocol, IReadDescriptor, IWriteDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from zope.interface import directlyProvides, implementer, providedBy

from ..errors import WingateMapError
from ..interfaces import IEventSink
from ..sessions import utc_iso

_log = Logger(namespace="wingate_map.workers")  # the name log lines carried before the module moved here

WORKER_ENV = "WINGATEMAP_WORKER"
RUNTIME_ENV = "WINGATEMAP_WORKER_DIR"
PRIMARY_ENV = "WINGATEMAP_PRIMARY_PID"
PREFIX_ENV = "WINGATEMAP_SESSION_PREFIX"
RESTART_DELAY = 1.0
REPORT_FD = 3  # the worker's end of its report pipe
BYTES_INTERVAL = 5.0  # how often a worker reports its live sessions' byte counts
MAX_TRACKED = 100_000  # sessions the primary tracks per worker
MAX_LINE = 65536  # a longer report line is dropped
MAX_PENDING = 4 * 1024 * 1024  # report bytes a worker buffers while the pipe is full
# The kernel sends it to a worker when the primary dies (PR_SET_PDEATHSIG).  A real-time signal
# nothing else uses (SIGUSR2 tells a worker to end its drain; SIGUSR1 rotates twistd's log);
# until the handler is installed its default action ends the process, which is right too.
ORPHAN_SIGNAL = signal.SIGRTMIN + 2
ORPHAN_DEADLINE = 5  # seconds an orphaned worker has to exit before SIGALRM ends it
CRASH_WINDOW = 60.0
CRASH_COUNT = 3
_PR_SET_PDEATHSIG = 1
_LINGER_RESET = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


def worker_index() -> int:
    """
    This process's worker number (0 for the primary).
    """
    try:
        return int(os.environ.get(WORKER_ENV, "0"))
    except ValueError:
        return 0


def runtime_dir() -> str:
    """
    The private directory the processes share (worker sockets, logins): in a worker, the one
    its primary named in its environment; in the primary, a new one (its L{WorkerPool} passes
    it to each worker's environment; this process's own environment is left alone, so that
    another service in the process does not take it for its own).
    """
    existing = os.environ.get(RUNTIME_ENV) if worker_index() > 0 else None
    if existing:
        return existing
    path = tempfile.mkdtemp(prefix="wingatemap-workers-")
    os.chmod(path, 0o700)
    return path


def worker_socket(directory: str, index: int) -> str:
    """
    Where worker C{index}'s private admin API listens.
    """
    return os.path.join(directory, f"worker-{index}.sock")


def hand_over(paths: list[str], run_as: tuple[int | None, int | None] | None) -> None:
    """
    Give C{paths} to the user and group twistd will run as (C{--uid}/C{--gid}), when this process
    is still root: what it creates before the privilege drop must stay usable after it.

    @raise WingateMapError: a path could not be given away (naming it).
    """
    if run_as is None or os.geteuid() != 0:
        return
    uid, gid = run_as
    if uid is None and gid is None:
        return
    for path in paths:
        try:
            os.chown(path, -1 if uid is None else uid, -1 if gid is None else gid)
        except OSError as e:
            raise WingateMapError(f"service.workers: cannot give {path} to uid {uid} gid {gid}: {e.strerror or e}") from None


def session_prefix() -> str | None:
    """
    The session id prefix the primary gave this worker (unique among the processes), if any.
    """
    if worker_index() == 0:
        return None
    return os.environ.get(PREFIX_ENV) or None


# -- resets, not FINs, when a worker dies ------------------------------------------------------


def _linger(transport: Any, value: bytes) -> None:
    try:
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, value)
    except (AttributeError, OSError):
        pass  # not a socket (a test transport), or already closed


@implementer(IHalfCloseableProtocol)
class _ResetOnDeath(ProtocolWrapper):
    """
    Sits between a TCP transport and its protocol: sets C{SO_LINGER {1, 0}} at once (so the
    kernel resets the connection if this process dies) and clears it before any orderly close
    (so that close still sends every byte and a FIN).  Half-close passes through.
    """

    def makeConnection(self, transport: Any) -> None:
        _linger(transport, _LINGER_RESET)
        super().makeConnection(transport)

    def loseConnection(self) -> None:
        _linger(self.transport, _LINGER_OFF)
        super().loseConnection()

    def stopProducing(self) -> None:
        # A transport's stopProducing is its loseConnection (the other leg is gone).
        _linger(self.transport, _LINGER_OFF)
        self.transport.stopProducing()

    def readConnectionLost(self) -> None:
        half = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if half is not None:
            half.readConnectionLost()
        else:
            self.loseConnection()  # what the transport does for a protocol without half-close

    def writeConnectionLost(self) -> None:
        half = IHalfCloseableProtocol(self.wrappedProtocol, None)
        if half is not None:
            half.writeConnectionLost()


class ResetOnDeathFactory(WrappingFactory):
    """
    Wraps C{factory}'s protocols in L{_ResetOnDeath} (a worker's listeners and connections).
    """

    protocol = _ResetOnDeath
    noisy = False

    def buildProtocol(self, addr: Any) -> Any:
        inner = self.wrappedFactory.buildProtocol(addr)
        return None if inner is None else self.protocol(self, inner)

    def registerProtocol(self, p: Any) -> None:
        """
        Keep no list of the live wrappers (WrappingFactory does): a session whose sockets the
        relay's socket pump takes never tells its wrapper C{connectionLost}, so on a listening
        port the list would only grow, holding every ended session.
        """

    def unregisterProtocol(self, p: Any) -> None:
        """
        Nothing to forget (see L{registerProtocol}).
        """

    def logPrefix(self) -> str:
        inner = getattr(self.wrappedFactory, "logPrefix", None)
        return inner() if inner is not None else "wingatemap"


class _ResetOnDeathReactor:
    """
    The reactor, except that C{connectTCP} wraps the factory in L{ResetOnDeathFactory}: what a
    worker's destination endpoints connect with (every endpoint they build ends in connectTCP).

    @cvar resets_on_death: read by the relay's hand-started connect, which then sets the same
        linger on its own sockets.
    """

    resets_on_death = True

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        directlyProvides(self, providedBy(reactor))

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30, bindAddress: Any = None) -> Any:
        return self._reactor.connectTCP(host, port, ResetOnDeathFactory(factory), timeout, bindAddress)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def reset_on_death_reactor(reactor: Any) -> Any:
    """
    C{reactor} for a worker's outgoing connections (see L{_ResetOnDeathReactor}).
    """
    return _ResetOnDeathReactor(reactor)


# -- the worker's side ------------------------------------------------------------------------


@implementer(IWriteDescriptor)
class _LineWriter:
    """
    Report lines to the primary on a pipe: written at once while the pipe has room (so a line
    is out before this process could die), else buffered (up to L{MAX_PENDING}) and written as
    the pipe drains.
    """

    def __init__(self, reactor: Any, fd: int) -> None:
        self.reactor = reactor
        self.fd = fd
        self._pending = bytearray()
        self.broken = False
        self.dropped = 0
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "wingatemap-worker-report"

    def send(self, line: bytes) -> None:
        """
        Send one line (with its newline).
        """
        if self.broken:
            return
        if self._pending:
            if len(self._pending) + len(line) > MAX_PENDING:
                if not self.dropped:
                    _log.error("worker report pipe full: the primary is not reading; dropping session reports")
                self.dropped += 1
                return
            self._pending += line
            return
        try:
            written = os.write(self.fd, line)
        except BlockingIOError:
            written = 0
        except OSError as e:
            self._break(e)
            return
        if written < len(line):
            self._pending += line[written:]
            self.reactor.addWriter(self)

    def doWrite(self) -> None:
        try:
            written = os.write(self.fd, self._pending)
        except BlockingIOError:
            return
        except OSError as e:
            self._break(e)
            return
        del self._pending[:written]
        if not self._pending:
            self.reactor.removeWriter(self)

    def flush(self, timeout: float) -> None:
        """
        Write what is buffered, waiting up to C{timeout}s for the pipe (at stop).
        """
        deadline = time.monotonic() + timeout
        while self._pending and not self.broken:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [self.fd], [], left)[1]:
                return
            self.doWrite()

    def connectionLost(self, reason: Any) -> None:
        self.broken = True

    def _break(self, error: OSError) -> None:
        if self._pending:
            self.reactor.removeWriter(self)
        self.broken = True
        self._pending.clear()
        _log.info("worker report pipe closed: {why}", why=error.strerror or str(error))


@implementer(IReadDescriptor)
class _PrimaryWatch:
    """
    The worker's standard input, a pipe whose other end only the primary holds: end of file
    means the primary is gone.
    """

    def __init__(self, reactor: Any, fd: int, gone: Callable[[str], None]) -> None:
        self.reactor = reactor
        self.fd = fd
        self.gone = gone
        os.set_blocking(fd, False)

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "wingatemap-worker-watch"

    def doRead(self) -> None:
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return
        except OSError as e:
            data = b""
            why = f"lost the pipe from the primary: {e.strerror or e}"
        else:
            why = "end of file on the pipe from the primary"
        if not data:
            self.reactor.removeReader(self)
            self.gone(why)

    def connectionLost(self, reason: Any) -> None:
        pass


@implementer(IEventSink)
class WorkerLink(Service):
    """
    A worker's link to its primary, a child service of the worker's service: the first event
    sink of its chain (it reports every session start and end on the report pipe, and the
    live sessions' byte counts every L{BYTES_INTERVAL}s), and the watch that ends this worker
    when the primary is gone.
    """

    name = "worker-link"

    def __init__(self, reactor: Any, index: int, sessions: Any, primary_pid: int, report_fd: int = REPORT_FD, watch_fd: int = 0) -> None:
        self.reactor = reactor
        self.index = index
        self.sessions = sessions
        self.primary_pid = primary_pid
        self.orphaned = False
        self._writer = _LineWriter(reactor, report_fd)
        self._watch = _PrimaryWatch(reactor, watch_fd, self.parent_gone)
        self._reported: dict[str, tuple[int, int]] = {}
        self._bytes = LoopingCall(self.report_bytes)
        self._bytes.clock = reactor

    # IEventSink: the first sink, so the primary knows a session before any handler runs.

    def client_connect(self, event: dict[str, Any]) -> None:
        """
        Report a session start (its ClientConnect fields) to the primary.
        """
        session = self.sessions.get(event["session"])
        started = session.started if session is not None else self.reactor.seconds()
        fields = json.dumps(event, separators=(",", ":"))
        self._writer.send(f"c {event['session']} {started!r} {fields}\n".encode())

    def client_disconnect(self, event: dict[str, Any]) -> None:
        """
        Report a session end to the primary.
        """
        self._reported.pop(event["session"], None)
        self._writer.send(f"d {event['session']}\n".encode())

    def report_bytes(self) -> None:
        """
        Report the byte counts of live sessions that changed since the last report.
        """
        lines = []
        for session in self.sessions.live():
            counts = (session.bytes_from_client, session.bytes_to_client)
            if counts != (0, 0) and self._reported.get(session.id) != counts:
                self._reported[session.id] = counts
                lines.append(f"b {session.id} {counts[0]} {counts[1]}\n")
        if lines:
            self._writer.send("".join(lines).encode())

    # The watch.

    def startService(self) -> None:
        """
        After the privilege drop (which would clear it): ask the kernel for L{ORPHAN_SIGNAL}
        when the primary dies, watch the pipe from it, and check it is still there.
        """
        super().startService()
        signal.signal(ORPHAN_SIGNAL, self._on_signal)
        _die_with_parent(ORPHAN_SIGNAL)
        self.reactor.addReader(self._watch)
        self._bytes.start(BYTES_INTERVAL, now=False)
        if os.getppid() != self.primary_pid:
            self.parent_gone("the primary process exited before this worker started")

    def stopService(self) -> None:
        """
        Send what is left of the reports (the drain's session ends) and stop watching.
        """
        super().stopService()
        if self._bytes.running:
            self._bytes.stop()
        self.reactor.removeReader(self._watch)
        self._writer.flush(2.0)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(self._check_parent)

    def _check_parent(self) -> None:
        if os.getppid() != self.primary_pid:
            self.parent_gone("the primary process exited")
        else:
            _log.info("worker {index}: signal {signal} ignored: the primary is alive", index=self.index, signal=int(ORPHAN_SIGNAL))

    def parent_gone(self, why: str) -> None:
        """
        The primary is gone: close the listeners at once, end every session (reason
        C{shutdown}) and exit; SIGALRM ends this process if that takes over L{ORPHAN_DEADLINE}s.
        """
        if self.orphaned:
            return
        self.orphaned = True
        _log.error("worker {index}: {why}; a worker never serves alone: closing the listeners, ending {count} session(s) and exiting", index=self.index, why=why, count=len(self.sessions))
        signal.alarm(ORPHAN_DEADLINE)
        self.reactor.callWhenRunning(self._stop)

    def _stop(self) -> None:
        def end_sessions() -> None:
            self.sessions.terminate_all("shutdown")

        hurry = getattr(self.parent, "end_drain", None)
        if hurry is not None:
            hurry()  # the service's stop will not drain: it ends the sessions after the listeners
            end_sessions = lambda: None  # noqa: E731
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            end_sessions()  # already stopping: cut its drain short
            return
        # After the service's own "before shutdown" trigger, which closes the listeners first.
        self.reactor.addSystemEventTrigger("before", "shutdown", end_sessions)


def _die_with_parent(signum: int) -> None:
    """
    prctl(PR_SET_PDEATHSIG, signum): Linux signals this process when its parent dies.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    except (OSError, AttributeError) as e:
        _log.warn("cannot ask to be signalled when the primary dies ({why}); relying on the pipe from it", why=str(e))


def worker_link(reactor: Any, sessions: Any) -> WorkerLink | None:
    """
    This worker's link to its primary, or L{None} in the primary (or a worker started by hand).
    """
    index = worker_index()
    try:
        primary = int(os.environ.get(PRIMARY_ENV, ""))
    except ValueError:
        return None
    if index == 0:
        return None
    return WorkerLink(reactor, index, sessions, primary)


# -- the primary's side -----------------------------------------------------------------------


class _Child(ProcessProtocol):
    """
    One worker process as the primary sees it: its exit, and the sessions it reported live
    (id -> [ClientConnect fields as JSON, start time, bytes from client, bytes to client]).
    """

    def __init__(self, pool: "WorkerPool", index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: Deferred[None] = Deferred()
        self.live: dict[str, list[Any]] = {}
        self.untracked = 0
        self._partial = b""
        self._skipping = False

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD != REPORT_FD:
            return
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            self._partial = b""
            self._skipping = True
        for line in lines:
            if self._skipping:
                self._skipping = False  # the end of an over-long line
                continue
            try:
                self._report(line.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                _log.warn("worker {index}: unreadable session report line dropped", index=self.index)

    def _report(self, line: str) -> None:
        kind, _, rest = line.partition(" ")
        if kind == "c":
            session, started, fields = rest.split(" ", 2)
            if session not in self.live and len(self.live) >= MAX_TRACKED:
                self.untracked += 1
                return
            self.live[session] = [fields, float(started), 0, 0]
        elif kind == "d":
            self.live.pop(rest, None)
        elif kind == "b":
            session, sent, received = rest.split(" ")
            entry = self.live.get(session)
            if entry is not None:
                entry[2], entry[3] = int(sent), int(received)

    def lost_events(self, now: float) -> list[dict[str, Any]]:
        """
        A ClientDisconnect (reason C{lost}) for every session this worker still had: its
        ClientConnect fields, the byte counts it last reported, the duration until now.
        """
        events = []
        for fields, started, sent, received in self.live.values():
            event = json.loads(fields)
            event.update(
                event="ClientDisconnect",
                time=utc_iso(now),
                bytes_from_client=sent,
                bytes_to_client=received,
                duration=round(max(0.0, now - started), 6),
                reason="lost",
            )
            events.append(event)
        self.live.clear()
        return events

    def processEnded(self, reason: Any) -> None:
        try:
            self.pool.ended(self, reason)
        finally:
            self.ended.callback(None)


class WorkerPool:
    """
    Starts, watches and stops the worker processes of the primary, and ends the sessions of a
    worker that dies (C{on_lost} gets each ClientDisconnect of reason C{lost}).
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        directory: str,
        on_exit: Callable[[int], Any] | None = None,
        on_lost: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.reactor = reactor
        self.count = count
        self.directory = directory
        self.on_exit = on_exit
        self.on_lost = on_lost
        self.children: dict[int, tuple[Any, _Child]] = {}
        self.pids: dict[int, int] = {}
        self.stopping = False
        self._prefix = secrets.token_hex(4)
        self._spawned = 0
        self._root_at_start = False
        self._last_exit: dict[int, str] = {}
        self._exits: dict[int, collections.deque[float]] = {}
        self._abandoned: set[int] = set()

    def argv(self) -> list[str]:
        """
        The command a worker runs: this process's own twistd command line.
        """
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"] + _twistd_arguments()

    def start(self) -> None:
        """
        Start every worker (under twistd: before it drops privileges, so that the workers bind
        as root too and then drop to the same user).
        """
        self._root_at_start = os.geteuid() == 0
        # The admin API asks the workers through twisted.web.client: import it now, as root,
        # for after the privilege drop the interpreter's files may no longer be readable.
        import twisted.web.client  # noqa: F401

        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        if self.stopping or index in self.children:
            return
        self._spawned += 1
        env = dict(
            os.environ,
            **{
                WORKER_ENV: str(index),
                RUNTIME_ENV: self.directory,
                PRIMARY_ENV: str(os.getpid()),
                PREFIX_ENV: f"{self._prefix}w{self._spawned}",
            },
        )
        child = _Child(self, index)
        try:
            process = self.reactor.spawnProcess(child, sys.executable, self.argv(), env=env, childFDs={0: "w", 1: 1, 2: 2, REPORT_FD: "r"})
        except OSError as e:
            self._last_exit[index] = f"cannot start: {e.strerror or e}"
            _log.error("worker {index} cannot start: {why}; retrying in {delay:g}s", index=index, why=e.strerror or str(e), delay=RESTART_DELAY)
            self.reactor.callLater(RESTART_DELAY, self._spawn, index)
            return
        self.children[index] = (process, child)
        self.pids[index] = process.pid
        _log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def ended(self, child: _Child, reason: Any) -> None:
        """
        Worker C{child} exited: tell the metrics (C{on_exit}), end its sessions (reason C{lost}), and
        restart it unless stopping.
        """
        index = child.index
        if self.children.get(index, (None, None))[1] is child:
            del self.children[index]
        pid = self.pids.pop(index, None)  # Twisted clears process.pid once it is reaped
        if self.on_exit is not None and pid is not None:
            self.on_exit(pid)
        self._end_sessions(child)
        why = reason.getErrorMessage()
        if self.stopping:
            _log.info("worker {index} stopped", index=index)
            return
        self._last_exit[index] = why
        self._exits.setdefault(index, collections.deque(maxlen=CRASH_COUNT)).append(self.reactor.seconds())
        if self._root_at_start and os.geteuid() != 0:
            # Its listeners belong to root (SO_REUSEPORT shares a port only within one user):
            # a worker started now, without root, could not bind them.
            self._abandoned.add(index)
            _log.error("worker {index} exited unexpectedly ({why}) and cannot be restarted: this process no longer has root privileges (twistd --uid) to start a worker that binds the listeners; restart wingatemap", index=index, why=why)
            return
        _log.error("worker {index} exited unexpectedly ({why}); restarting it in {delay:g}s", index=index, why=why, delay=RESTART_DELAY)
        self.reactor.callLater(RESTART_DELAY, self._spawn, index)

    def _end_sessions(self, child: _Child) -> None:
        events = child.lost_events(self.reactor.seconds())
        if events:
            _log.warn("worker {index} ended with {count} live session(s); ending them with reason lost", index=child.index, count=len(events))
        if child.untracked:
            _log.warn("worker {index} had {count} more session(s) than the primary tracks ({limit}); they get no ClientDisconnect", index=child.index, count=child.untracked, limit=MAX_TRACKED)
        for event in events:
            if self.on_lost is None:
                continue
            try:
                self.on_lost(event)
            except Exception:
                _log.failure("ending lost session {session}", session=event.get("session"))

    def problems(self) -> list[str]:
        """
        What is wrong with the workers right now, one sentence each (empty when all is well):
        a worker that is not running, one that keeps exiting, a state directory this process
        cannot use.
        """
        if self.stopping:
            return []
        found = []
        if not os.access(self.directory, os.R_OK | os.W_OK | os.X_OK):
            found.append(f"worker state directory {self.directory} is not usable by uid {os.geteuid()}")
        now = self.reactor.seconds()
        for index in range(1, self.count):
            why = self._last_exit.get(index, "not started yet")
            if index in self._abandoned:
                found.append(f"worker {index} exited ({why}) and cannot be restarted without root privileges: restart wingatemap")
            elif index not in self.children:
                found.append(f"worker {index} is not running ({why}); restarting")
            else:
                recent = [t for t in self._exits.get(index, ()) if now - t <= CRASH_WINDOW]
                if len(recent) >= CRASH_COUNT:
                    found.append(f"worker {index} keeps exiting ({len(recent)} times in {CRASH_WINDOW:g}s; last: {why})")
        return found

    def signal(self, name: str) -> None:
        """
        Send a signal (e.g. "HUP") to every worker.
        """
        for process, _ in list(self.children.values()):
            try:
                process.signalProcess(name)
            except Exception:
                pass

    def stop(self) -> Deferred[Any]:
        """
        SIGTERM every worker; fires when all have exited (each drains as the primary does).
        """
        self.stopping = True
        waits = [child.ended for _, child in self.children.values()]
        self.signal("TERM")
        return gatherResults(waits, consumeErrors=True)


def _twistd_arguments() -> list[str]:
    """
    twistd's arguments for a worker: the primary's own, in the foreground, without a pid file
    (its log goes where the primary's goes: the same --logfile, or the same standard output).
    """
    cleaned: list[str] = []
    skip = False
    for argument in sys.argv[1:]:
        if skip:
            skip = False
            continue
        if argument == "--pidfile":
            skip = True
            continue
        if argument.startswith("--pidfile=") or argument in ("-n", "--nodaemon"):
            continue
        cleaned.append(argument)
    return ["--nodaemon", "--pidfile="] + cleaned
