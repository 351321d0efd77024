"""
Output gathered over one reactor turn and written at once: the log lines and audit log lines of
every connection a turn handles cost one write (and one flush) instead of one per line.

A batch is written when the reactor turn ends (a C{callLater(0)}: delayed calls due now run at
the start of the next turn, before the reactor waits for I/O again), when it grows past its
limit, when its owner asks (a warning, a close, a reopen) and when the reactor shuts down.
The ends of a reactor's turns that write are at least L{SPACING} apart: when one came less than
that long ago, the next waits for the rest of it (a C{callLater} of that delay), gathering the
turns between.  A busy service (thousands of connections a second, each turn handling one or
two) so writes each file at most 100 times a second, not once per connection; a quiet one,
whose turns are further apart, still at the end of every turn.
While no reactor runs it (before C{run}, after C{stop}), and for text from another thread,
nothing waits: the batch is written first, then the text, in order.

Every batch of a reactor waits on one delayed call per turn end (L{_TurnEnd}), not one each: the
only state this module keeps beyond its batches, a weak map from a reactor to its L{_TurnEnd},
which holds nothing once the turn's batches are written.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

# A batch past this many characters is written at once (a burst never holds much memory).
LIMIT = 64 * 1024
# The least time (s) between two turn ends of a reactor that write: no line waits longer.
SPACING = 0.01


class _TurnEnd:
    """
    The batches of one reactor waiting for the end of the current turn, written by one
    C{callLater}: of 0, or of what is left of L{SPACING} since the last turn end it wrote at.
    """

    __slots__ = ("_waiting", "_due")

    def __init__(self) -> None:
        # No reference to the reactor: the map's value must not keep its key alive.
        self._waiting: list[TurnBatch] = []
        self._due = float("-inf")  # when the last turn end was scheduled for

    def wait(self, batch: "TurnBatch", reactor: Any) -> None:
        """
        Write C{batch} when C{reactor}'s turn ends, and at least L{SPACING} after the last
        turn end that did.
        """
        if not self._waiting:
            now = reactor.seconds()
            due = self._due + SPACING
            if due > now:
                self._due = due
                reactor.callLater(due - now, self._ended)
            else:
                self._due = now
                reactor.callLater(0, self._ended)
        self._waiting.append(batch)

    def _ended(self) -> None:
        waiting, self._waiting = self._waiting, []
        failed: BaseException | None = None
        for batch in waiting:
            try:
                batch._turn_ended()
            except Exception as e:  # one batch's failed write (a full disk) stops no other
                failed = failed or e
        if failed is not None:
            raise failed  # the reactor logs it


_turn_ends: "weakref.WeakKeyDictionary[Any, _TurnEnd]" = weakref.WeakKeyDictionary()


def _turn_end(reactor: Any) -> _TurnEnd | None:
    """
    C{reactor}'s L{_TurnEnd}; L{None} for a reactor that takes no weak reference or tells no
    time (each batch then waits on a C{callLater(0)} of its own, every turn).
    """
    if not hasattr(reactor, "seconds"):
        return None
    try:
        return _turn_ends[reactor]
    except KeyError:
        end = _turn_ends[reactor] = _TurnEnd()
        return end
    except TypeError:
        return None


class TurnBatch:
    """
    Text for C{write}, gathered while the reactor turn lasts.

    @ivar pending: the text not written yet, in order.
    """

    __slots__ = ("_write", "_reactor", "_end", "_hooked", "_thread", "_scheduled", "pending", "_size", "limit")

    def __init__(self, write: Callable[[str], object], reactor: Any = None, limit: int = LIMIT) -> None:
        """
        @param write: writes text, whole, in the order given (each call gets whole lines).
        @param reactor: whose turns the batch follows (anything with C{callLater}); L{None}
            writes every text at once.
        @param limit: characters held before the batch is written without waiting.
        """
        self._write = write
        self._reactor = reactor
        self._end: _TurnEnd | None = None
        self._hooked = False  # the shutdown trigger is added and _end looked up
        self._thread = threading.get_ident()  # the reactor's thread: the one that builds us
        self._scheduled = False
        self.pending: list[str] = []
        self._size = 0
        self.limit = limit

    def add(self, text: str) -> None:
        """
        Write C{text} after what came before it: at the end of the reactor turn, or at once if
        nothing will end the turn (see the module docstring).
        """
        if self._scheduled and threading.get_ident() == self._thread:
            # The turn's end is on its way (so the reactor runs): the common case.
            self.pending.append(text)
            self._size += len(text)
            if self._size >= self.limit:
                self.flush()
            return
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
            return
        if not self._hooked:
            self._hooked = True
            self._end = _turn_end(reactor)
            # "during": before any "after shutdown" trigger (one may end the process at once).
            hook = getattr(reactor, "addSystemEventTrigger", None)
            if hook is not None:
                hook("during", "shutdown", self._shut_down)
        self._scheduled = True
        if self._end is not None:
            self._end.wait(self, reactor)
        else:
            reactor.callLater(0, self._turn_ended)

    def _turn_ended(self) -> None:
        self._scheduled = False
        self.flush()

    def _shut_down(self) -> None:
        # The turn's end will not come: from now on (the reactor no longer runs) text is
        # written as it comes.
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
