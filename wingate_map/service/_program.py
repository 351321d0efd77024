"""
What a service does only when it is the whole program (twistd, a C{.tac}, or an embedder that
built it with C{standalone=True}): signal handlers and systemd notification.  These are the
only process-wide changes a service makes, and an embedded service never makes them.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.application.service import Service

from ._notify import Notifier
from ._signals import SignalHandlers


class ProgramSignals(Service):
    """
    SIGHUP reloads the root; a worker also takes SIGUSR2 from the primary as "end the drain
    now".  During the drain (L{draining}) a second SIGTERM / SIGINT ends it at once; a worker
    ignores them instead: systemd signals every process of the unit and the primary signals
    its workers too, so a worker sees two at one stop; the primary passes a real second
    signal on as SIGUSR2.  Stopped, it puts back what was there, except that while the
    process ends later SIGTERMs stay ignored (twistd's own handler would try to stop a
    stopped reactor).
    """

    name = "signals"

    def __init__(self, reactor: Any, worker_index: int, reload: Callable[[], Any], end_drain: Callable[[], Any]) -> None:
        self.reactor = reactor
        self.worker_index = worker_index
        self.reload = reload
        self.end_drain = end_drain
        self._handlers = SignalHandlers(reactor)
        self._trigger: Any = None
        self._process_ending = False

    def startService(self) -> None:
        super().startService()
        if self._trigger is None:
            self._trigger = self.reactor.addSystemEventTrigger("before", "shutdown", self._reactor_stopping)
        self._handlers.restore()
        self._handlers.install(signal.SIGHUP, self.reload)
        if self.worker_index > 0:
            self._handlers.install(signal.SIGUSR2, self.end_drain)

    def _reactor_stopping(self) -> None:
        self._process_ending = True
        self._trigger = None

    def draining(self) -> None:
        """
        The drain begins: a second SIGTERM / SIGINT ends it (a worker ignores them).
        """
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._handlers.install(signum, self.end_drain if self.worker_index == 0 else None)

    def stopService(self) -> None:
        super().stopService()
        self._handlers.restore(signal.SIGHUP, signal.SIGUSR2)
        if not self._process_ending:
            self._handlers.restore()
            if self._trigger is not None:
                self.reactor.removeSystemEventTrigger(self._trigger)
                self._trigger = None


class SystemdNotify(Service):
    """
    Tells systemd (C{$NOTIFY_SOCKET}, C{Type=notify}) that the service is ready once every
    other child has started, and the root's status as it changes.

    @ivar notifier: where the messages go.
    """

    name = "systemd-notify"

    def __init__(self, notifier: Notifier, status: Any) -> None:
        self.notifier = notifier
        self._status = status

    def startService(self) -> None:
        super().startService()
        self.notifier.ready(self._status())
