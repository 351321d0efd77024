"""
The service tree: one listener per (mapping, address), the sessions, and an orderly stop.

Start-up is all or nothing: every listener is opened before any is announced, and if one cannot
bind, the ones already opened are closed and L{BindError} names the mapping, address and port.
Stopping closes the listeners at once, lets live sessions finish for C{drain_timeout} seconds,
then ends the rest with reason C{shutdown}.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from .bindings import Adapter, Listener, plan_listeners
from .config import Config
from .destinations import StandardEndpointFactory
from .errors import BindError, WingateMapError
from .events import AuditLogSink, EventHub, LogSink
from .identity import AssumedIdentitySource, CertificateIdentitySource, IdentityResolver
from .interfaces import IDestinationEndpointFactory, IEventSink, IIdentitySource
from .relay import MappingRuntime, RelayFactory
from .rules import MappingRuleService
from .sessions import SessionRegistry
from .tls import half_close_tls_factory, server_options

_log = Logger()

LISTEN_BACKLOG = 511


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def listen_description(address: str, port: int) -> str:
    """
    The Twisted server endpoint string for a listener on C{address}:C{port}.
    """
    kind = "tcp6" if ":" in address else "tcp"
    return f"{kind}:{port}:interface={_escape(address)}:backlog={LISTEN_BACKLOG}"


class WingateMapService(MultiService):
    """
    Runs every enabled mapping of a configuration.

    @ivar sessions: the live sessions (see L{SessionRegistry}).
    @ivar events: the event chain; L{subscribe} adds sinks after the built-in ones.
    """

    def __init__(
        self,
        config: Config,
        reactor: Any = None,
        sinks: Iterable[IEventSink] = (),
        endpoints: IDestinationEndpointFactory | None = None,
        identity_sources: Iterable[IIdentitySource] = (),
        adapters: Callable[[], Iterable[Adapter]] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self._reactor = reactor
        self._endpoints = endpoints
        self._identity_sources = tuple(identity_sources)
        self._adapters = adapters
        self.sessions = SessionRegistry()
        self.events = EventHub()
        self._subscribed = list(sinks)
        self._audit: AuditLogSink | None = None
        self._ports: list[tuple[Listener, IListeningPort]] = []
        self.factories: dict[str, RelayFactory] = {}
        self._listening = False

    @property
    def reactor(self) -> Any:
        """
        The reactor this service runs on (the global one unless one was given).
        """
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def subscribe(self, sink: IEventSink) -> None:
        """
        Add an event sink after the built-in ones; it may veto ClientConnect.
        """
        if self._listening:
            self.events.subscribe(sink)
        else:
            self._subscribed.append(sink)

    @property
    def listeners(self) -> list[tuple[Listener, IListeningPort]]:
        """
        The open listeners and their ports.
        """
        return list(self._ports)

    def _listening_factory(self, mapping: Any, factory: RelayFactory) -> Any:
        """
        What the mapping's listeners serve: the relay, behind TLS when the mapping has C{tls}.
        """
        if mapping.tls is None:
            return factory
        return half_close_tls_factory(server_options(mapping.tls), False, factory)

    def _runtime(self, mapping: Any) -> MappingRuntime:
        identities = IdentityResolver.of(
            self._identity_sources
            + (CertificateIdentitySource(self.config.users), AssumedIdentitySource(self.config.users))
        )
        return MappingRuntime(
            mapping=mapping,
            rules=MappingRuleService(mapping, identities),
            endpoints=self._endpoints or StandardEndpointFactory(self.reactor),
            events=self.events,
            sessions=self.sessions,
            clock=self.reactor,
        )

    def _listen(self) -> None:
        """
        Open every listener, or none.
        """
        listeners = plan_listeners(self.config, None if self._adapters is None else self._adapters())
        if self.config.service.audit_log:
            try:
                self._audit = AuditLogSink(self.config.service.audit_log)
            except OSError as e:
                raise WingateMapError(f"service.audit_log: cannot open {self.config.service.audit_log}: {e.strerror or e}") from None
        events = EventHub([LogSink()] + ([self._audit] if self._audit else []) + self._subscribed)
        self.events = events
        factories = {m.name: RelayFactory(self._runtime(m)) for m in self.config.enabled_mappings()}
        listening = {name: self._listening_factory(self.config.mapping(name), f) for name, f in factories.items()}
        opened: list[tuple[Listener, IListeningPort]] = []
        try:
            for listener in listeners:
                endpoint = serverFromString(self.reactor, listen_description(listener.address, listener.port))
                results: list[Any] = []
                endpoint.listen(listening[listener.mapping]).addBoth(results.append)
                if not results:
                    raise BindError(listener.mapping, listener.address, listener.port, "the endpoint did not listen synchronously")
                if isinstance(results[0], Failure):
                    error = results[0].value
                    socket_error = getattr(error, "socketError", None)
                    why = getattr(socket_error, "strerror", None) or str(socket_error or error)
                    raise BindError(listener.mapping, listener.address, listener.port, why)
                opened.append((listener, results[0]))
        except BaseException:
            for _, port in opened:
                port.stopListening()
            if self._audit is not None:
                self._audit.close()
                self._audit = None
            raise
        self._ports = opened
        self.factories = factories
        self._listening = True
        for warning in self.config.warnings:
            _log.warn("configuration: {warning}", warning=str(warning))
        for mapping in self.config.enabled_mappings():
            addresses = ", ".join(str(l) for l, _ in opened if l.mapping == mapping.name)
            default = " | ".join(str(d) for d in mapping.default) or "(none: unmatched clients are refused)"
            _log.info("mapping {mapping}: listening on {addresses}; default destination {default}", mapping=mapping.name, addresses=addresses, default=default)

    def privilegedStartService(self) -> None:
        """
        Bind every listener (before twistd drops privileges).
        """
        if not self._listening:
            self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        """
        Start; binds the listeners if L{privilegedStartService} has not.
        """
        if not self._listening:
            self._listen()
        super().startService()

    def stopService(self) -> Deferred[Any]:
        """
        Stop accepting at once, drain live sessions for C{drain_timeout}, then end the rest.
        """
        stopped = [d for d in [super().stopService()] if d is not None]
        ports, self._ports = self._ports, []
        self._listening = False
        closing = [d for d in (port.stopListening() for _, port in ports) if d is not None]
        # Drain once every listening socket is really closed (that takes one reactor turn).
        drained = gatherResults(closing, consumeErrors=True).addBoth(lambda _: self._drain())
        return gatherResults(stopped + [drained], consumeErrors=True).addBoth(self._stopped)

    def _drain(self) -> Deferred[None]:
        live = len(self.sessions)
        timeout = self.config.service.drain_timeout
        done = self.sessions.when_empty()
        if not live:
            return done
        _log.info("listeners closed; draining {count} live session(s) for up to {timeout:g}s", count=live, timeout=timeout)

        def expire() -> None:
            left = len(self.sessions)
            if left:
                _log.info("drain timeout: closing {count} session(s)", count=left)
            self.sessions.terminate_all("shutdown")

        timer = self.reactor.callLater(timeout, expire)

        def finished(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            return result

        return done.addBoth(finished)

    def _stopped(self, result: Any) -> None:
        if self._audit is not None:
            self._audit.close()
            self._audit = None
        if isinstance(result, Failure):
            _log.failure("error while stopping", result)
        _log.info("stopped")

