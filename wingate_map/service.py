"""
The service tree: one listener per (mapping, address), the sessions, and an orderly stop.

Start-up is all or nothing: every listener is opened before any is announced, and if one cannot
bind, the ones already opened are closed and L{BindError} names the mapping, address and port.
Stopping closes the listeners at once, lets live sessions finish for C{drain_timeout} seconds,
then ends the rest with reason C{shutdown}.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable, Iterable

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import LoopingCall
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from .bindings import Adapter, Listener, plan_listeners
from .interception import TABLE, InterceptionError, Redirect, install, remove, ruleset
from .config import Config
from .destinations import StandardEndpointFactory
from .errors import BindError, BindingError, WingateMapError
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
        self._ports: dict[Listener, IListeningPort] = {}
        self.factories: dict[str, RelayFactory] = {}
        self._listening: dict[tuple[str, bool], Any] = {}
        self._started = False
        self._warned: set[str] = set()
        self._poller: LoopingCall | None = None
        self._ruleset: str | None = None

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
        if self._started:
            self.events.subscribe(sink)
        else:
            self._subscribed.append(sink)

    @property
    def listeners(self) -> list[tuple[Listener, IListeningPort]]:
        """
        The open listeners and their ports.
        """
        return list(self._ports.items())

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

    def _plan(self) -> list[Listener]:
        warnings: list[str] = []
        listeners = plan_listeners(self.config, None if self._adapters is None else self._adapters(), warnings)
        for warning in warnings:
            if warning not in self._warned:
                self._warned.add(warning)
                _log.warn("{warning}", warning=warning)
        return listeners

    def _open(self, listener: Listener) -> IListeningPort:
        """
        Listen for C{listener}; L{BindError} if it cannot.
        """
        factory = self._listening[(listener.mapping, listener.intercept)]
        endpoint = serverFromString(self.reactor, listen_description(listener.address, listener.port))
        results: list[Any] = []
        endpoint.listen(factory).addBoth(results.append)
        if not results:
            raise BindError(listener.mapping, listener.address, listener.port, "the endpoint did not listen synchronously")
        if isinstance(results[0], Failure):
            error = results[0].value
            socket_error = getattr(error, "socketError", None)
            why = getattr(socket_error, "strerror", None) or str(socket_error or error)
            raise BindError(listener.mapping, listener.address, listener.port, why)
        return results[0]

    def _redirects(self) -> list[Redirect]:
        """
        The nftables redirects transparent interception needs for the open listeners: for each
        bound adapter and address family, its first listening address.
        """
        chosen: dict[tuple[str, str, int], Redirect] = {}
        for listener in self._ports:
            mapping = self.config.mapping(listener.mapping)
            if not (mapping.intercept_transparent and listener.intercept and listener.adapter):
                continue
            address = ipaddress.ip_address(listener.address)
            if address.is_loopback:
                continue
            key = (mapping.name, listener.adapter, address.version)
            if key not in chosen:
                chosen[key] = Redirect(mapping.name, listener.adapter, listener.address, mapping.intercept)
        return list(chosen.values())

    def _apply_interception(self) -> None:
        if not any(m.intercept_transparent for m in self.config.enabled_mappings()):
            return
        script = ruleset(self._redirects())
        if script != self._ruleset:
            install(script)
            self._ruleset = script
            _log.info("transparent interception: nftables table inet {table} installed:\n{script}", table=TABLE, script=script)

    def _listen(self) -> None:
        """
        Open every listener, or none; install the interception table if any mapping asks.
        """
        listeners = self._plan()
        if self.config.service.audit_log:
            try:
                self._audit = AuditLogSink(self.config.service.audit_log)
            except OSError as e:
                raise WingateMapError(f"service.audit_log: cannot open {self.config.service.audit_log}: {e.strerror or e}") from None
        events = EventHub([LogSink()] + ([self._audit] if self._audit else []) + self._subscribed)
        self.events = events
        self.factories = {m.name: RelayFactory(self._runtime(m)) for m in self.config.enabled_mappings()}
        self._listening = {}
        for name, factory in self.factories.items():
            mapping = self.config.mapping(name)
            intercepting = RelayFactory(factory.runtime, intercepting=True)
            self._listening[(name, False)] = self._listening_factory(mapping, factory)
            self._listening[(name, True)] = self._listening_factory(mapping, intercepting)
        opened: dict[Listener, IListeningPort] = {}
        try:
            for listener in listeners:
                opened[listener] = self._open(listener)
            self._ports = opened
            self._apply_interception()
        except BaseException:
            self._ports = {}
            for port in opened.values():
                port.stopListening()
            if self._audit is not None:
                self._audit.close()
                self._audit = None
            raise
        self._started = True
        for warning in self.config.warnings:
            _log.warn("configuration: {warning}", warning=str(warning))
        for mapping in self.config.enabled_mappings():
            addresses = ", ".join(str(l) for l in opened if l.mapping == mapping.name and not l.intercept)
            default = " | ".join(str(d) for d in mapping.default) or "(none: unmatched clients are refused)"
            _log.info("mapping {mapping}: listening on {addresses}; default destination {default}", mapping=mapping.name, addresses=addresses or "(no address yet)", default=default)
            if mapping.intercept:
                ports = ", ".join(str(p) for p in mapping.intercept)
                _log.info("mapping {mapping}: intercepting port(s) {ports}{how}", mapping=mapping.name, ports=ports, how=" transparently (any destination)" if mapping.intercept_transparent else "")
        self._poller = LoopingCall(self.refresh_bindings)
        self._poller.clock = self.reactor
        self._poller.start(self.config.service.adapter_poll_interval, now=False).addErrback(
            lambda f: _log.failure("adapter watcher stopped", f)
        )

    def refresh_bindings(self) -> None:
        """
        Follow the adapters: listen on addresses that appeared, stop listening on ones that are
        gone (their sessions live on), and update the interception table.  Never fatal.
        """
        if not self._started:
            return
        try:
            wanted = self._plan()
        except BindingError as e:
            _log.error("cannot follow adapter changes: {error}", error=str(e))
            return
        current = set(self._ports)
        wanted_set = set(wanted)
        for listener in [l for l in self._ports if l not in wanted_set]:
            port = self._ports.pop(listener)
            port.stopListening()
            _log.info("mapping {mapping}: address {address} is gone; stopped listening on {listener}", mapping=listener.mapping, address=listener.address, listener=str(listener))
        for listener in wanted:
            if listener in current:
                continue
            try:
                self._ports[listener] = self._open(listener)
            except BindError as e:
                _log.error("{error} (will retry)", error=str(e))
                continue
            _log.info("mapping {mapping}: new address {address}; listening on {listener}", mapping=listener.mapping, address=listener.address, listener=str(listener))
        try:
            self._apply_interception()
        except InterceptionError as e:
            _log.error("{error}", error=str(e))

    def privilegedStartService(self) -> None:
        """
        Bind every listener (before twistd drops privileges).
        """
        if not self._started:
            self._listen()
        super().privilegedStartService()

    def startService(self) -> None:
        """
        Start; binds the listeners if L{privilegedStartService} has not.
        """
        if not self._started:
            self._listen()
        super().startService()

    def stopService(self) -> Deferred[Any]:
        """
        Stop accepting at once, drain live sessions for C{drain_timeout}, then end the rest.
        """
        stopped = [d for d in [super().stopService()] if d is not None]
        if self._poller is not None and self._poller.running:
            self._poller.stop()
        ports, self._ports = self._ports, {}
        self._started = False
        closing = [d for d in (port.stopListening() for port in ports.values()) if d is not None]
        if self._ruleset is not None:
            try:
                remove()
                _log.info("transparent interception: nftables table inet {table} removed", table=TABLE)
            except InterceptionError as e:
                _log.error("{error}", error=str(e))
            self._ruleset = None
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

