"""
Signal handlers for a service that is the whole program (the twistd plugin, a C{.tac} file, or
an embedder that opts in): SIGHUP reloads, and a second SIGTERM / SIGINT ends a shutdown drain.

Only a service that runs as a program installs them, so an embedding application keeps its own
signal dispositions.  A handler passes the signal on to one another wingatemap service installed
before it (two services in one process both reload), and L{SignalHandlers.restore} puts back
what was there.
"""

from __future__ import annotations

import signal
from typing import Any, Callable

from twisted.logger import Logger

_log = Logger(namespace="wingate_map.signals")  # the name log lines carried before the module moved here


class SignalHandlers:
    """
    The signal handlers one service installed, and what they replaced.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._installed: dict[int, tuple[Any, Any]] = {}

    def install(self, signum: int, callback: Callable[[], Any] | None) -> None:
        """
        On C{signum}, call C{callback} in the reactor thread (L{None}: ignore the signal).
        """
        self.restore(signum)
        previous = signal.getsignal(signum)

        def handler(number: int, frame: Any) -> None:
            if callback is not None:
                self.reactor.callFromThread(callback)
            if getattr(previous, "wingatemap", False):
                previous(number, frame)

        handler.wingatemap = True  # type: ignore[attr-defined]
        try:
            signal.signal(signum, handler)
        except ValueError:
            # Not the main thread: only the main thread may handle signals.
            _log.warn("cannot handle {signal} outside the main thread", signal=signal.Signals(signum).name)
            return
        self._installed[signum] = (handler, previous)

    def restore(self, *signums: int) -> None:
        """
        Put back what C{signums} (default: every signal this object handles) did before, unless
        something else has replaced our handler since.
        """
        for signum in signums or tuple(self._installed):
            handler, previous = self._installed.pop(signum, (None, None))
            if handler is not None and signal.getsignal(signum) is handler:
                signal.signal(signum, signal.SIG_DFL if previous is None else previous)
