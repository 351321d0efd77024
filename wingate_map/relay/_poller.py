"""
How the data plane waits for its sockets: one epoll object per reactor, itself one descriptor
on the reactor (issue 11 item 2).

Twisted's reactor dispatches every event on every descriptor through C{log.callWithLogger}
and C{context.callWithContext} (about 1 µs per event), and registers a descriptor with its own
bookkeeping plus C{epoll_ctl} (a change of interest from reading to writing is a delete and an
add).  The socket pump's legs and the hand-started connects are many small, frequently
changing registrations, so they go to an L{EpollPoller} instead: a C{select.epoll} of our own,
registered once on the reactor as a reader (an epoll descriptor is readable while it has ready
events).  When the reactor says it is readable, the poller asks it for at most C{max_events}
events without waiting and calls each descriptor's C{doRead}/C{doWrite} itself; the rest of the
reactor (timers, listeners, the admin site) runs between two such batches, and events not
taken yet keep the poller's descriptor readable (level-triggered).  A change of interest is one
C{epoll_ctl} (C{modify}), and a connect's registration becomes its pump leg's with a modify.

Reactors that do not poll file descriptors themselves (Twisted's C{MemoryReactor} in tests)
or platforms without epoll get L{ReactorDescriptors}, the same interface over the reactor's
C{IReactorFDSet}; L{descriptors_for} chooses by capability.

An event for a descriptor unregistered earlier in the same batch is dropped (its number may
already belong to a new socket); a leg woken for nothing reads EAGAIN and waits, so a stale
event is harmless either way.

The poller belongs to whoever made it (a service, for its reactor): nothing here is
process-global; L{EpollPoller.close} gives the epoll descriptor back, and the next
registration opens a new one.
"""

from __future__ import annotations

import select
from typing import Any

from twisted.internet.interfaces import IReactorFDSet, IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

_log = Logger()

_EPOLL = getattr(select, "epoll", None)
#: The interest bits (epoll's values; L{ReactorDescriptors} uses them too).
READ = getattr(select, "EPOLLIN", 1)
WRITE = getattr(select, "EPOLLOUT", 4)
# An error or a hang-up wakes both sides: the descriptor's own recv/send says what it is.
_HANGUP = getattr(select, "EPOLLERR", 8) | getattr(select, "EPOLLHUP", 16)
_READABLE = READ | _HANGUP
_WRITABLE = WRITE | _HANGUP

#: The most events dispatched per reactor wake-up (the rest wait for the next one).
MAX_EVENTS = 256


class IDescriptors(Interface):
    """
    Where the data plane registers its descriptors (objects with C{doRead}, C{doWrite} and
    C{connectionLost}, like the reactor's): C{old} and C{new} are the interest before and after,
    an OR of L{READ} and L{WRITE} (0: not registered).
    """

    reports_errors = Attribute(
        "True if an error or hang-up on a descriptor is always reported as a read event, also "
        "when it is registered only for writing (then a write event alone means no error)."
    )

    def set(descriptor: Any, fd: int, old: int, new: int) -> None:
        """
        Change C{descriptor}'s interest on C{fd} from C{old} to C{new}.
        """

    def hand_over(previous: Any, descriptor: Any, fd: int, old: int, new: int) -> None:
        """
        C{fd}, registered for C{previous} with C{old}, now belongs to C{descriptor} with C{new}.
        """

    def open() -> None:
        """
        Be ready for registrations (a service opens it when it starts).
        """

    def close() -> None:
        """
        Release what it holds (when its service stops; every descriptor is unregistered by then).
        """


@implementer(IReadDescriptor, IDescriptors)
class EpollPoller:
    """
    An epoll object of our own, registered on C{reactor} as one reader (see the module's
    docstring); open from the first registration until L{close}.
    """

    __slots__ = ("reactor", "max_events", "_epoll", "_descriptors", "_dispatching", "_dropped")

    reports_errors = True  # EPOLLERR / EPOLLHUP go to doRead first

    def __init__(self, reactor: Any, max_events: int = MAX_EVENTS) -> None:
        self.reactor = reactor
        self.max_events = max_events
        self._epoll: Any = None
        self._descriptors: dict[int, Any] = {}  # fd -> the object its events go to
        self._dispatching = False
        self._dropped: set[int] = set()  # unregistered during the current batch

    def open(self) -> Any:
        """
        Open the epoll descriptor and register it on the reactor, unless it is open: the epoll
        object.  (The first registration opens it too.)
        """
        epoll = self._epoll
        if epoll is None:
            epoll = self._epoll = _EPOLL()  # type: ignore[misc]  # close-on-exec, as Python makes it
            self.reactor.addReader(self)
        return epoll

    def __len__(self) -> int:
        """
        How many descriptors are registered.
        """
        return len(self._descriptors)

    def set(self, descriptor: Any, fd: int, old: int, new: int) -> None:
        """
        Register, modify or unregister C{fd} (see L{IDescriptors.set}): one C{epoll_ctl}.
        """
        if new:
            epoll = self._epoll or self.open()
            if old:
                epoll.modify(fd, new)
            else:
                epoll.register(fd, new)
            self._descriptors[fd] = descriptor
        elif old:
            if self._descriptors.pop(fd, None) is not None and self._epoll is not None:
                self._epoll.unregister(fd)
            # (else the poller was closed or lost under it: nothing is registered any more)
            if self._dispatching:
                self._dropped.add(fd)

    def hand_over(self, previous: Any, descriptor: Any, fd: int, old: int, new: int) -> None:
        """
        C{fd}'s events go to C{descriptor} now (one table entry; an C{epoll_ctl} only if the
        interest changes).
        """
        if new != old:
            self.set(descriptor, fd, old, new)
        elif new:
            self._descriptors[fd] = descriptor

    def close(self) -> None:
        """
        Stop polling: leave the reactor and close the epoll descriptor (registered descriptors
        are forgotten; their owners have closed them, as a service does before this).
        """
        epoll, self._epoll = self._epoll, None
        self._descriptors.clear()
        if epoll is not None:
            self.reactor.removeReader(self)
            epoll.close()

    # -- the reactor's side ---------------------------------------------------------------------

    def fileno(self) -> int:
        """
        The epoll descriptor, -1 when closed.
        """
        epoll = self._epoll
        return epoll.fileno() if epoll is not None else -1

    def logPrefix(self) -> str:
        """
        How the reactor names this descriptor in its log.
        """
        return "wingatemap-poller"

    def doRead(self) -> None:
        """
        Some registered descriptors are ready: dispatch up to C{max_events} of their events.
        """
        epoll = self._epoll
        if epoll is None:
            return
        try:
            events = epoll.poll(0, self.max_events)
        except InterruptedError:
            return
        get = self._descriptors.get
        dropped = self._dropped
        readable, writable = _READABLE, _WRITABLE
        self._dispatching = True
        try:
            for fd, event in events:
                descriptor = get(fd)
                if descriptor is None or (dropped and fd in dropped):
                    continue  # unregistered since (the number may be a new socket's already)
                try:
                    if event & readable:
                        descriptor.doRead()
                    if event & writable:
                        descriptor.doWrite()
                except Exception:
                    self._lose(fd, descriptor, Failure())
        finally:
            self._dispatching = False
            if dropped:
                dropped.clear()

    def _lose(self, fd: int, descriptor: Any, failure: Failure) -> None:
        """
        What the reactor does with a descriptor that raises: it is unregistered, then lost.
        """
        _log.failure("data plane descriptor {descriptor} failed", failure, descriptor=descriptor)
        if self._descriptors.get(fd) is descriptor:
            del self._descriptors[fd]
            self._dropped.add(fd)
            try:
                self._epoll.unregister(fd)
            except (AttributeError, OSError, ValueError):
                pass  # closed already (the socket, or the poller)
        try:
            descriptor.connectionLost(failure)
        except Exception:
            _log.failure("data plane descriptor {descriptor} failed", descriptor=descriptor)

    def connectionLost(self, reason: Any) -> None:
        """
        The reactor dropped the poller (it disconnects every descriptor when it stops): every
        registered descriptor is lost the same way, then the epoll descriptor is closed.
        """
        epoll, self._epoll = self._epoll, None
        descriptors = list(self._descriptors.values())
        self._descriptors.clear()
        for descriptor in descriptors:
            try:
                descriptor.connectionLost(reason)
            except Exception:
                _log.failure("data plane descriptor {descriptor} failed", descriptor=descriptor)
        if epoll is not None:
            epoll.close()


@implementer(IDescriptors)
class ReactorDescriptors:
    """
    L{IDescriptors} over a reactor's own C{IReactorFDSet} (no epoll of our own).
    """

    __slots__ = ("reactor",)

    reports_errors = False  # the reactor tells a writer only connectionLost, or doWrite

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def open(self) -> None:
        """
        Nothing to open: the reactor is there.
        """

    def close(self) -> None:
        """
        Nothing to close.
        """

    def set(self, descriptor: Any, fd: int, old: int, new: int) -> None:
        """
        Add or remove C{descriptor} as a reader and a writer (see L{IDescriptors.set}).
        """
        changed = old ^ new
        reactor = self.reactor
        if changed & READ:
            if new & READ:
                reactor.addReader(descriptor)
            else:
                reactor.removeReader(descriptor)
        if changed & WRITE:
            if new & WRITE:
                reactor.addWriter(descriptor)
            else:
                reactor.removeWriter(descriptor)

    def hand_over(self, previous: Any, descriptor: Any, fd: int, old: int, new: int) -> None:
        """
        The reactor keys by object: remove C{previous}, add C{descriptor}.
        """
        self.set(previous, fd, old, 0)
        self.set(descriptor, fd, 0, new)


def polls_descriptors(reactor: Any) -> bool:
    """
    Whether C{reactor} really polls the file descriptors given to it (a posix reactor; not an
    in-memory one) and this platform has epoll: then an L{EpollPoller} can sit on it.
    """
    if _EPOLL is None or not IReactorFDSet.providedBy(reactor):
        return False
    from twisted.internet.posixbase import PosixReactorBase

    return isinstance(reactor, PosixReactorBase)


def descriptors_for(reactor: Any) -> EpollPoller | ReactorDescriptors:
    """
    The data plane's L{IDescriptors} for C{reactor}: a new L{EpollPoller} when the reactor
    polls descriptors (see L{polls_descriptors}), else the reactor's own C{IReactorFDSet}.
    """
    if polls_descriptors(reactor):
        return EpollPoller(reactor)
    return ReactorDescriptors(reactor)
