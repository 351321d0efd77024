"""
Several processes sharing the listeners (C{[service] workers = N}), so a gateway uses every core.

The process started by twistd is the primary (worker 0).  Every process opens the same
listeners with C{SO_REUSEPORT}, and the kernel spreads new connections among them.  The primary
starts workers 1..N-1 as child processes running the same command, restarts one that dies,
forwards SIGHUP (reload) to them, and at shutdown stops them and waits for their drains.  Only
the primary installs the interception table and serves the admin API; each worker serves a
private admin API on a Unix socket in a directory only root can read, which the primary queries
to show (and kill) every process's sessions in one view.  Metrics are shared through
prometheus_client's multiprocess mode.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

_log = Logger()

WORKER_ENV = "WINGATEMAP_WORKER"
RUNTIME_ENV = "WINGATEMAP_WORKER_DIR"
RESTART_DELAY = 1.0


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
    The private directory the processes share (worker sockets, metrics), made by the primary.
    """
    existing = os.environ.get(RUNTIME_ENV)
    if existing:
        return existing
    path = tempfile.mkdtemp(prefix="wingatemap-workers-")
    os.chmod(path, 0o700)
    os.environ[RUNTIME_ENV] = path
    return path


def worker_socket(directory: str, index: int) -> str:
    """
    Where worker C{index}'s private admin API listens.
    """
    return os.path.join(directory, f"worker-{index}.sock")


class _Child(ProcessProtocol):
    def __init__(self, pool: "WorkerPool", index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)
        self.pool.ended(self.index, reason)


class WorkerPool:
    """
    Starts, watches and stops the worker processes of the primary.
    """

    def __init__(self, reactor: Any, count: int, directory: str, on_exit: Any = None) -> None:
        self.reactor = reactor
        self.count = count
        self.directory = directory
        self.on_exit = on_exit
        self.children: dict[int, tuple[Any, _Child]] = {}
        self.pids: dict[int, int] = {}
        self.stopping = False

    def argv(self) -> list[str]:
        """
        The command a worker runs: this process's own twistd command line.
        """
        return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"] + _twistd_arguments()

    def start(self) -> None:
        for index in range(1, self.count):
            self._spawn(index)

    def _spawn(self, index: int) -> None:
        env = dict(os.environ, **{WORKER_ENV: str(index), RUNTIME_ENV: self.directory})
        child = _Child(self, index)
        process = self.reactor.spawnProcess(child, sys.executable, self.argv(), env=env, childFDs={0: "w", 1: 1, 2: 2})
        self.children[index] = (process, child)
        self.pids[index] = process.pid
        _log.info("worker {index} started (pid {pid})", index=index, pid=process.pid)

    def ended(self, index: int, reason: Any) -> None:
        self.children.pop(index, None)
        pid = self.pids.pop(index, None)  # Twisted clears process.pid once it is reaped
        if self.on_exit is not None and pid is not None:
            self.on_exit(pid)
        if self.stopping:
            _log.info("worker {index} stopped", index=index)
            return
        _log.error("worker {index} exited unexpectedly ({why}); restarting it in {delay:g}s", index=index, why=reason.getErrorMessage(), delay=RESTART_DELAY)
        self.reactor.callLater(RESTART_DELAY, lambda: None if self.stopping else self._spawn(index))

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
        from twisted.internet.defer import gatherResults

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
