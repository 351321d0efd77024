"""
Output gathered over one reactor turn and written at once: the log lines and audit log lines of
every connection a turn handles cost one write (and one flush) instead of one per line.

A batch is written when the reactor turn ends (a C{callLater(0)}: delayed calls due now run at
the start of the next turn, before the reactor waits for I/O again), when it grows past its
limit, when its owner asks (a warning, a close, a reopen) and when the reactor shuts down.
While no reactor runs it (before C{run}, after C{stop}), and for text from another thread,
nothing waits: the batch is written first, then the text, in order.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

# A batch past this many characters is written at once (a burst never holds much memory).
LIMIT = 64 * 1024


class TurnBatch:
    """
    Text for C{write}, gathered while the reactor turn lasts.

    @ivar pending: the text not written yet, in order.
    """

    __slots__ = ("_write", "_reactor", "_thread", "_scheduled", "_shutdown_hooked", "pending", "_size", "limit")

    def __init__(self, write: Callable[[str], object], reactor: Any = None, limit: int = LIMIT) -> None:
        """
        @param write: writes text, whole, in the order given (each call gets whole lines).
        @param reactor: whose turns the batch follows (anything with C{callLater}); L{None}
            writes every text at once.
        @param limit: characters held before the batch is written without waiting.
        """
        self._write = write
        self._reactor = reactor
        self._thread = threading.get_ident()  # the reactor's thread: the one that builds us
        self._scheduled = False
        self._shutdown_hooked = False
        self.pending: list[str] = []
        self._size = 0
        self.limit = limit

    def add(self, text: str) -> None:
        """
        Write C{text} after what came before it: at the end of the reactor turn, or at once if
        nothing will end the turn (see the module docstring).
        """
        reactor = self._reactor
        if reactor is None or not getattr(reactor, "running", True) or threading.get_ident() != self._thread:
            if self.pending:
                self.flush()
            self._write(text)
            return
        self.pending.append(text)
        self._size += len(text)
        if self._size >= self.limit:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            if not self._shutdown_hooked:
                self._hook_shutdown(reactor)
            reactor.callLater(0, self._turn_ended)

    def _hook_shutdown(self, reactor: Any) -> None:
        # "during": before any "after shutdown" trigger (one may end the process at once).
        self._shutdown_hooked = True
        hook = getattr(reactor, "addSystemEventTrigger", None)
        if hook is not None:
            hook("during", "shutdown", self.flush)

    def _turn_ended(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """
        Write what is pending, now, in one call (nothing happens when nothing is).
        """
        if not self.pending:
            return
        pending = self.pending
        self.pending = []
        self._size = 0
        self._write(pending[0] if len(pending) == 1 else "".join(pending))
