"""
The listeners: one listening port per (mapping, address, intercepting?) of the plan, a child
service of the root.

Each port is a L{wingate_map.relay.ListeningPort} (plain connections accepted lean, TCP_NODELAY
and SO_KEEPALIVE set once on the listening socket) serving a L{_Switch} the root points at the
current relay factory, so that a reload changes what new connections get without closing a port.  Opening is all or nothing: if one
listener cannot bind, the ones already opened are closed and L{BindError} names the mapping,
address and port.  Stopping closes every port; the Deferred it returns fires once every
listening socket is really closed (the root drains after that).
"""

from __future__ import annotations

from typing import Any, Iterable

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort
from twisted.internet.posixbase import PosixReactorBase
from twisted.internet.protocol import Factory
from twisted.internet.tcp import makeBinding
from twisted.logger import Logger

from ..network import Listener
from ..relay import ListeningPort
from ..errors import BindError
from ._workers import ResetOnDeathFactory
from ._resource import Resource

_log = Logger(namespace="wingate_map.service")

LISTEN_BACKLOG = 511


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def listen_description(address: str, port: int) -> str:
    """
    The Twisted server endpoint string for a listener on C{address}:C{port}.
    """
    kind = "tcp6" if ":" in address else "tcp"
    return f"{kind}:{port}:interface={_escape(address)}:backlog={LISTEN_BACKLOG}"


class _Switch(Factory):
    """
    What a listening port serves, switchable on reload without closing the port.
    """

    noisy = False

    def __init__(self, target: Any) -> None:
        self.target = target

    def buildProtocol(self, addr: Any) -> Any:
        return self.target.buildProtocol(addr)

    def logPrefix(self) -> str:
        return self.target.logPrefix() if hasattr(self.target, "logPrefix") else "wingatemap"


class Listeners(Resource):
    """
    The listening ports of every enabled mapping.

    @ivar ports: the open ports, by listener.
    @ivar wanted: the listeners L{open} opens (the root sets the plan before starting).
    @ivar problems: listeners the adapter watcher could not open, and why (retried each poll).
    @ivar shared: listen with C{SO_REUSEPORT} (worker processes share the ports).
    @ivar reset_on_death: accepted sockets reset if this process dies (a worker's).
    """

    name = "listeners"

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.ports: dict[Listener, IListeningPort] = {}
        self.wanted: list[Listener] = []
        self.problems: dict[Listener, str] = {}
        self.shared = False
        self.reset_on_death = False
        self._switches: dict[tuple[str, bool], _Switch] = {}

    def point(self, targets: dict[tuple[str, bool], Any]) -> None:
        """
        Serve C{targets} (what each (mapping, intercepting?) listener serves) from now on.
        """
        for key, target in targets.items():
            switch = self._switches.get(key)
            if switch is None:
                self._switches[key] = _Switch(target)
            else:
                switch.target = target

    def _listen(self, listener: Listener) -> IListeningPort:
        """
        Listen for C{listener}; L{BindError} if it cannot.
        """
        served: Any = self._switches[(listener.mapping, listener.intercept)]
        port: Any = listener.port
        if self.shared:
            # Every worker listens on the same address and port; the kernel spreads connections.
            port = makeBinding(listener.address, listener.port, reuseAddress=True, reusePort=True)
            if self.reset_on_death:
                served = ResetOnDeathFactory(served)
        try:
            if isinstance(self.reactor, PosixReactorBase):
                # What listenTCP does (on a real reactor; a test's fake gets listenTCP), with the port that accepts plain connections lean.
                listening = ListeningPort(port, served, LISTEN_BACKLOG, listener.address, self.reactor)
                listening.startListening()
                return listening
            return self.reactor.listenTCP(port, served, backlog=LISTEN_BACKLOG, interface=listener.address)
        except (CannotListenError, OSError, ValueError) as error:
            socket_error = getattr(error, "socketError", None)
            why = getattr(socket_error, "strerror", None) or str(socket_error or error)
            raise BindError(listener.mapping, listener.address, listener.port, why) from None

    def _listen_all(self, listeners: Iterable[Listener]) -> dict[Listener, IListeningPort]:
        """
        Listen for each of C{listeners} not open yet, or for none: L{BindError} after closing
        the ones this call opened.
        """
        opened: dict[Listener, IListeningPort] = {}
        try:
            for listener in listeners:
                if listener not in self.ports and listener not in opened:
                    opened[listener] = self._listen(listener)
        except BaseException:
            for port in opened.values():
                port.stopListening()
            raise
        return opened

    def open(self) -> None:
        """
        Open every wanted listener, or none (L{BindError}).
        """
        self.ports = self._listen_all(self.wanted)

    def close(self) -> Deferred[Any]:
        """
        Close every port; fires once each listening socket is closed.
        """
        ports, self.ports = self.ports, {}
        self.problems = {}
        closing = [d for d in (port.stopListening() for port in ports.values()) if d is not None]
        return gatherResults(closing, consumeErrors=True)

    def reconfigure(self, wanted: list[Listener], targets: dict[tuple[str, bool], Any]) -> tuple[int, int, int]:
        """
        A reload: open the listeners of C{wanted} that are new, then serve C{targets}, and close
        the listeners not wanted any more (their sessions live on).  Unchanged listeners stay
        open.  A L{BindError} leaves everything as it was.

        @return: how many listeners were opened, closed and kept.
        """
        old_switches = dict(self._switches)
        for key, target in targets.items():
            if key not in self._switches:
                self._switches[key] = _Switch(target)
        try:
            opened = self._listen_all(wanted)
        except BindError:
            self._switches = old_switches
            raise
        self.point(targets)
        self.wanted = list(wanted)
        wanted_set = set(wanted)
        closed = [listener for listener in self.ports if listener not in wanted_set]
        for listener in closed:
            self.ports.pop(listener).stopListening()
        self.ports.update(opened)
        return len(opened), len(closed), len(self.ports) - len(opened)

    def follow(self, wanted: list[Listener]) -> None:
        """
        Follow the adapters: listen on addresses that appeared, stop listening on ones that
        are gone (their sessions live on).  A listener that cannot bind is logged once per
        distinct error, kept in L{problems} and retried at the next call.
        """
        current = set(self.ports)
        wanted_set = set(wanted)
        self.wanted = list(wanted)
        for listener in [l for l in self.problems if l not in wanted_set]:
            del self.problems[listener]
        for listener in [l for l in self.ports if l not in wanted_set]:
            port = self.ports.pop(listener)
            port.stopListening()
            _log.info("mapping {mapping}: address {address} is gone; stopped listening on {listener}", mapping=listener.mapping, address=listener.address, listener=str(listener))
        for listener in wanted:
            if listener in current:
                continue
            try:
                self.ports[listener] = self._listen(listener)
            except BindError as e:
                if self.problems.get(listener) != str(e):
                    _log.error("{error} (will retry)", error=str(e))
                self.problems[listener] = str(e)
                continue
            self.problems.pop(listener, None)
            _log.info("mapping {mapping}: new address {address}; listening on {listener}", mapping=listener.mapping, address=listener.address, listener=str(listener))
