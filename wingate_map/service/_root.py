"""
The root of the service tree: it builds what new connections use from the configuration,
reloads it, answers C{/healthz}, and orders the start and the stop of its child services.

Children, in the order they start: the audit log, the listeners, the interception table, the
admin site, the worker processes (a primary's) or the link to the primary (a worker's), the
active health checks, the cluster store, the adapter watcher and, for a service that is the
whole program, the signal handlers and systemd notification.  Each opens and closes what it
holds; see L{WingateMapService.stopService} for the order of the stop.

Start-up is all or nothing: if a child cannot open (a listener cannot bind: L{BindError} names
the mapping, address and port), the children opened before it are closed again.  Stopping
closes the listeners at once, lets live sessions finish for C{drain_timeout} seconds, then ends
the rest with reason C{shutdown}, then stops the other children.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..network import Adapter, Listener, plan_listeners
from ..network import InterceptionError, redirects, ruleset
from ..config import Config
from ..relay import StandardEndpointFactory
from ..errors import BindError, WingateMapError
from ..events import EventHub, LogSink
from ..policy import AssumedIdentitySource, CertificateIdentitySource, IdentityResolver
from ..interfaces import IDestinationEndpointFactory, IEventSink, IIdentitySource
from ..relay import RateLimits
from ..relay import DestinationList, HealthChecker, build_lists
from ..relay import MappingRuntime, RelayFactory, descriptors_for
from ..policy import MappingRuleService
from ..sessions import SessionRegistry
from ..policy import CredentialStore
from ..events import build_handlers
from ..events import Metrics
from ._notify import Notifier
from ._workers import (
    WorkerPool,
    hand_over,
    reset_on_death_reactor,
    runtime_dir,
    session_prefix,
    worker_index,
    worker_link,
    worker_socket,
)
from ..tls import half_close_tls_factory, server_options
from ._listeners import Listeners, listen_description
from ._parts import AdapterWatcher, AdminSite, AuditLog, ClusterMember, InterceptionTable, RuntimeDirectory, WorkerProcesses
from ._program import ProgramSignals, SystemdNotify

__all__ = ["WingateMapService", "listen_description"]

_log = Logger(namespace="wingate_map.service")


def _describe(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror} (errno {error.errno})"
    return str(error) or type(error).__name__


def _rule_timezone(config: Config) -> Any:
    """
    The zone the rules' C{when} schedules are read in: C{[service] timezone}, or the system's.
    """
    from ..config import load_timezone

    return load_timezone(config.service.timezone)


class WingateMapService(MultiService):
    """
    Runs every enabled mapping of a configuration: the root of a tree of child services (see
    the module docstring), which only orders their start and stop.  It changes nothing
    process-wide unless it is the whole program (C{standalone}), so several services can run
    in one process on one reactor.

    @ivar sessions: the live sessions (see L{SessionRegistry}).
    @ivar events: the event chain; L{subscribe} adds sinks after the built-in ones.
    @ivar standalone: whether this service is the whole program: it then reloads on SIGHUP,
        ends a drain at a second SIGTERM / SIGINT, reports to systemd when C{NOTIFY_SOCKET} is
        set, and a start failure exits with a one-line error instead of a traceback.  L{None}
        (the default) decides at start: standalone when twistd starts it (the plugin, any
        C{.tac}), which calls L{privilegedStartService}; embedded (no process-wide change)
        when the application calls L{startService}.
    @ivar log_observer: the L{wingate_map.events.ServiceLogObserver} twistd logs through, when
        the service installed it (events below its level are then not emitted), else L{None}.
    """

    log_observer: Any = None

    def __init__(
        self,
        config: Config,
        reactor: Any = None,
        sinks: Iterable[IEventSink] = (),
        endpoints: IDestinationEndpointFactory | None = None,
        identity_sources: Iterable[IIdentitySource] = (),
        adapters: Callable[[], Iterable[Adapter]] | None = None,
        config_path: str | None = None,
        extra_mappings: Iterable[Any] = (),
        standalone: bool | None = None,
        cluster_store: Any = None,
        socket_pump: bool = True,
    ) -> None:
        super().__init__()
        # Plain TCP sessions relayed by pump.SocketPump (False: Twisted's transports, as TLS).
        self._socket_pump = socket_pump
        # The data plane's poller for this service's reactor (relay._poller), made at the first
        # build, open while the service runs (closed after the drain).
        self._poller: Any = None
        # Every mapping's rate_limit buckets, shared by the sessions of a client or a mapping
        # across reloads (created with the reactor, at the first build).
        self.rate_limits: RateLimits | None = None
        self.config = config
        self.config_path = config_path
        self._extra_mappings = tuple(extra_mappings)
        self._reactor = reactor
        self._endpoints = endpoints
        self._identity_sources = tuple(identity_sources)
        self._adapters = adapters
        self.sessions = SessionRegistry()
        # [cluster] (SPEC §7): the store shared with the other gateways, started after the
        # listeners and stopped after the drain; session ids carry the node name.
        self.cluster: Any = cluster_store
        self._cluster_limits: Any = None
        self._cluster_problem: str | None = None
        if config.cluster is not None:
            import secrets

            self.sessions = SessionRegistry(prefix=f"{config.cluster.node}.{secrets.token_hex(4)}", node=config.cluster.node)
        self.events = EventHub()
        self._subscribed = list(sinks)
        self.factories: dict[str, RelayFactory] = {}
        self._started = False
        self._warned: set[str] = set()
        self.metrics = self._new_metrics()
        # The children every service has (the others are added at the first start, as the
        # configuration and the way it runs ask).
        self._audit = AuditLog(config.service.audit_log)
        self._audit.setServiceParent(self)
        self._listeners = Listeners(self._reactor)
        self._listeners.setServiceParent(self)
        self._table = InterceptionTable(self._interception_script)
        self._table.setServiceParent(self)
        self._admin: AdminSite | None = None
        self._watcher: AdapterWatcher | None = None
        # Destination lists (balancers, health) of the running configuration, and the active
        # checks of those with health_check (a child service, created at start).
        self.checker: HealthChecker | None = None
        self._kept_lists: dict[tuple[Any, ...], DestinationList] = {}
        self.credentials: CredentialStore | None = None
        # Whether this service is the whole program (see the class docstring); None: decided
        # at start, True under twistd (which calls privilegedStartService).
        self.standalone = standalone
        self._signals: ProgramSignals | None = None
        self._notifier: Notifier | None = None
        self._draining = False
        self._hurry = False  # end the drain at once (a second SIGTERM / SIGINT)
        self._watcher_problem: str | None = None
        # Worker processes (see workers.py): only when built for twistd (spawn_workers) and
        # the configuration asks for more than one.
        self.spawn_workers = False
        self.worker_index = worker_index()
        self._pool: WorkerPool | None = None
        self._link: Any = None  # a worker's link to the primary (workers.WorkerLink)
        self.worker_dir: str | None = None
        # twistd's --uid / --gid (set by the twistd plugin): what this service creates before
        # the privilege drop (worker state, worker sockets) is given to them.
        self.run_as: tuple[int | None, int | None] | None = None
        if config.service.workers > 1 and self.worker_index > 0:
            self._enable_workers()

    def _enable_workers(self) -> None:
        if self.worker_dir is not None:
            return
        self.worker_dir = runtime_dir()
        if self.worker_index == 0:
            hand_over([self.worker_dir], self.run_as)
        elif session_prefix():
            # Session ids unique across the processes: the primary gave this worker a prefix.
            self.sessions = SessionRegistry(prefix=session_prefix())
        self._link = worker_link(self.reactor, self.sessions)
        if self._link is not None:
            self._link.setServiceParent(self)
        self.metrics = self._new_metrics()

    def _new_metrics(self) -> Metrics:
        """
        This service's metrics: every enabled mapping's series from the start (also after a
        reload); in a primary with workers, C{/metrics} merges every process's.
        """
        return Metrics(
            self.sessions,
            mappings=lambda: [m.name for m in self.config.enabled_mappings()],
            workers=self._running_workers,
            reactor=self._reactor,
            destinations=self.destination_lists,
        )

    def _running_workers(self) -> list[tuple[int, int, str]]:
        """
        The running worker processes (primary only): (worker number, pid, private admin socket).
        """
        pool, directory = self._pool, self.worker_dir
        if pool is None or directory is None:
            return []
        return [(index, pid, worker_socket(directory, index)) for index, pid in sorted(pool.pids.items())]

    @property
    def multi_process(self) -> bool:
        """
        Whether this service is one of several worker processes.
        """
        return self.worker_dir is not None

    @property
    def admin_token(self) -> str | None:
        """
        The bearer token the admin API requires (a worker's private API needs none: its socket
        is in a directory only this user can enter).
        """
        if self.worker_index > 0 or self.config.admin is None:
            return None
        return self.config.admin.token

    def worker_sockets(self) -> list[str]:
        """
        The private admin sockets of the other workers (primary only).
        """
        if self.worker_index != 0 or self.worker_dir is None:
            return []
        return [worker_socket(self.worker_dir, i) for i in range(1, self.config.service.workers)]

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
        return list(self._listeners.ports.items())

    def _listening_factory(self, mapping: Any, factory: RelayFactory) -> Any:
        """
        What the mapping's listeners serve: the relay, behind TLS when the mapping has C{tls}.
        """
        if mapping.tls is None:
            return factory
        return half_close_tls_factory(server_options(mapping.tls), False, factory)

    def _runtime(self, config: Config, mapping: Any, events: EventHub, endpoints: IDestinationEndpointFactory) -> MappingRuntime:
        assert self.credentials is not None
        identities = IdentityResolver.of(
            self._identity_sources
            + (self.credentials, CertificateIdentitySource(config.users), AssumedIdentitySource(config.users))
        )
        return MappingRuntime(
            mapping=mapping,
            rules=MappingRuleService(mapping, identities, tz=_rule_timezone(config), now=self.reactor.seconds),
            endpoints=endpoints,
            events=events,
            sessions=self.sessions,
            clock=self.reactor,
            metrics=self.metrics,
            cluster=self._cluster_limits,
            balancers=build_lists(mapping, self.reactor, self._kept_lists),
            rate_limits=self._shared_rate_limits(),
            socket_pump=self._socket_pump,
            poller=self._data_plane(),
            sockets_linger=self.worker_index > 0,
        )

    def _data_plane(self) -> Any:
        if self._poller is None:
            self._poller = descriptors_for(self.reactor)
        return self._poller

    def _shared_rate_limits(self) -> RateLimits:
        if self.rate_limits is None:
            self.rate_limits = RateLimits(self.reactor)
        return self.rate_limits

    def _build(self, config: Config) -> tuple[EventHub, dict[str, RelayFactory], dict[tuple[str, bool], Any]]:
        """
        Everything new connections of C{config} use: the event chain, each mapping's relay
        factory, and what each (mapping, intercept?) listener serves.  Reads TLS files.
        """
        # Unchanged destination lists keep their balancer and health across a reload.
        self._kept_lists = {found.key: found for found in self.destination_lists()}
        # A worker reports each session to the primary first, before any handler can delay it.
        sinks = ([self._link] if self._link is not None else []) + [LogSink(self.log_observer)] + ([self._audit] if config.service.audit_log else []) + self._stream_sinks() + [self.metrics] + build_handlers(config.handlers, self.reactor, config.max_running) + self._subscribed
        events = EventHub(sinks)
        # A worker's outgoing sockets, like its accepted ones, are reset if the worker dies.
        endpoints = self._endpoints or StandardEndpointFactory(self.reactor if self.worker_index == 0 else reset_on_death_reactor(self.reactor))
        factories = {m.name: RelayFactory(self._runtime(config, m, events, endpoints)) for m in config.enabled_mappings()}
        targets = {}
        for name, factory in factories.items():
            mapping = config.mapping(name)
            targets[(name, False)] = self._listening_factory(mapping, factory)
            targets[(name, True)] = self._listening_factory(mapping, RelayFactory(factory.runtime, intercepting=True))
        return events, factories, targets

    def destination_lists(self) -> list[DestinationList]:
        """
        Every destination list of the enabled mappings (their balancers and health), in
        configuration order.
        """
        return [found for factory in self.factories.values() for found in factory.runtime.balancers.values()]

    def destination_states(self) -> list[dict[str, Any]]:
        """
        What C{GET /destinations} lists for this process: one entry per destination of every
        list (mapping, rule, destination, state, since, live, total, last_error).
        """
        return [state for found in self.destination_lists() for state in found.states()]

    def _check_destinations(self) -> None:
        """
        Point the active checker at the current destination lists (started with the service).
        """
        if self.checker is None:
            self.checker = HealthChecker(self.reactor)
            self.checker.setServiceParent(self)
        self.checker.metrics = self.metrics
        self.checker.update(factory.runtime for factory in self.factories.values())

    def _plan(self) -> list[Listener]:
        warnings: list[str] = []
        listeners = plan_listeners(self.config, None if self._adapters is None else self._adapters(), warnings)
        for warning in warnings:
            if warning not in self._warned:
                self._warned.add(warning)
                _log.warn("{warning}", warning=warning)
        return listeners

    def _interception_script(self) -> str | None:
        """
        What the interception table should hold (only the primary owns it): L{None} when no
        mapping intercepts transparently.
        """
        if self.worker_index > 0 or not any(m.intercept_transparent for m in self.config.enabled_mappings()):
            return None
        return ruleset(redirects(self.config, self._listeners.ports))

    def _compose(self) -> None:
        """
        Add the children that depend on the configuration and on how this service runs, in
        the order they start (the first start only; L{_listen} says which).
        """
        if self._admin is None:
            if self.worker_index > 0 and self.worker_dir is not None:
                private = worker_socket(self.worker_dir, self.worker_index)
                self._admin = AdminSite(self, f"unix:{private}:mode=600", private_socket=private)
            elif self.config.admin is not None:
                self._admin = AdminSite(self, self.config.admin.listen)
            if self._admin is not None:
                self._admin.setServiceParent(self)
        if self.worker_index == 0 and self.multi_process and self._pool is None:
            assert self.worker_dir is not None
            self._pool = WorkerPool(
                self.reactor,
                self.config.service.workers,
                self.worker_dir,
                on_exit=self.metrics.process_gone,
                on_lost=lambda event: self.events.client_disconnect(event),
            )
            WorkerProcesses(self._pool).setServiceParent(self)
            RuntimeDirectory(self.worker_dir).setServiceParent(self)
        self._check_destinations()
        if self.cluster is not None and "cluster" not in self.namedServices:
            ClusterMember(self.cluster, self._cluster_fatal).setServiceParent(self)
        if self._watcher is None:
            self._watcher = AdapterWatcher(self.reactor, self.config.service.adapter_poll_interval, self._watch)
            self._watcher.setServiceParent(self)
        if self.standalone and self._signals is None:
            self._signals = ProgramSignals(self.reactor, self.worker_index, self._sighup, self.end_drain)
            self._signals.setServiceParent(self)
        if self.standalone and self.worker_index == 0 and "systemd-notify" not in self.namedServices:
            notifier = Notifier.from_environment()
            if notifier is not None:
                self._notifier = notifier
                SystemdNotify(notifier, self._status_line).setServiceParent(self)

    def _open_children(self) -> None:
        """
        Open what every child holds, in order, or nothing: when one fails, the ones opened
        before it are closed again and the error is raised.
        """
        opened = []
        try:
            for child in self:
                child.privilegedStartService()
                opened.append(child)
        except BaseException:
            for child in reversed(opened):
                if getattr(child, "opened", False):
                    child.stopService()
            raise

    def _listen(self) -> None:
        """
        Open every listener, or none; install the interception table if any mapping asks.
        """
        if self.config.service.workers > 1:
            if self.spawn_workers or self.worker_index > 0:
                self._enable_workers()
            else:
                _log.warn("service.workers = {n}: worker processes are started only under twistd / wingatemap run; running one process", n=self.config.service.workers)
        self._listeners.reactor = self.reactor
        self._listeners.wanted = self._plan()
        self._listeners.shared = self.multi_process
        self._listeners.reset_on_death = self.worker_index > 0
        self._audit.run_as = self.run_as
        shared = os.path.join(self.worker_dir, "credentials.json") if self.worker_dir is not None else None
        self.credentials = CredentialStore(self.reactor, self.config.users, shared_path=shared)
        self._build_cluster()
        self.events, self.factories, targets = self._build(self.config)
        self._listeners.point(targets)
        self._compose()
        self._open_children()
        self._data_plane().open()
        self._started = True
        for warning in self.config.warnings:
            _log.warn("configuration: {warning}", warning=str(warning))
        for mapping in self.config.enabled_mappings():
            addresses = ", ".join(str(l) for l in self._listeners.ports if l.mapping == mapping.name and not l.intercept)
            default = " | ".join(str(d) for d in mapping.default) or "(none: unmatched clients are refused)"
            _log.info("mapping {mapping}: listening on {addresses}; default destination {default}", mapping=mapping.name, addresses=addresses or "(no address yet)", default=default)
            if mapping.intercept:
                ports = ", ".join(str(p) for p in mapping.intercept)
                _log.info("mapping {mapping}: intercepting port(s) {ports}{how}", mapping=mapping.name, ports=ports, how=" transparently (any destination)" if mapping.intercept_transparent else "")

    def _build_cluster(self) -> None:
        """
        With C{[cluster]}: the store (unless one was given), the relay's cluster limits, and
        logins kept in the store.
        """
        settings = self.config.cluster
        if settings is None:
            return
        from ..admin import session_json
        from ..cluster import ClusterLimits, RedisClusterStore, parse_redis_url

        if self.cluster is None:
            self.cluster = RedisClusterStore(
                parse_redis_url(settings.redis), settings.node, settings.node_ttl, settings.events_stream, settings.events_maxlen,
                reactor=self.reactor,
                sessions=lambda: [session_json(s, self.reactor.seconds()) for s in self.sessions.live()],
                on_kill=self._kill_here,
            )
        self._cluster_limits = ClusterLimits(self.cluster)
        assert self.credentials is not None
        self.credentials.cluster = self.cluster

    def _stream_sinks(self) -> list[Any]:
        """
        The event sink feeding C{[cluster] events_stream}, if there is one.
        """
        if self.cluster is None or self.config.cluster is None or self.config.cluster.events_stream is None:
            return []
        from ..cluster import StreamSink

        return [StreamSink(self.cluster)]

    def _kill_here(self, session_id: str) -> Any:
        """
        End C{session_id} if it runs here (a kill routed from another gateway): a Deferred
        firing with C{True} once it has ended, or C{False} if it is not here.
        """
        if not self.sessions.kill(session_id):
            return False
        _log.info("cluster: session {session} killed at another gateway's request", session=session_id)
        return self.sessions.when_gone(session_id).addCallback(lambda _: True)

    def _cluster_fatal(self, problem: str) -> None:
        """
        The cluster refused this gateway (its node name is taken): as a program, exit with the
        error (status 1); embedded, report it in /healthz (503).
        """
        self._cluster_problem = problem
        _log.critical("{problem}", problem=problem)
        if not self.standalone:
            return
        import sys

        (sys.__stderr__ or sys.stderr).write(f"wingatemap: error: {problem}\n")

        def exit_failed() -> None:
            # twistd has no exit status of its own for a reactor stopped on purpose.
            for stream in (sys.stdout, sys.stderr, sys.__stderr__):
                try:
                    stream.flush()
                except Exception:
                    pass
            os._exit(1)

        self.reactor.addSystemEventTrigger("after", "shutdown", exit_failed)
        self.reactor.stop()

    def _admin_reload(self, new: Config) -> str | None:
        """
        What a reload to C{new} does to the admin API: its token (C{token} / C{token_file}) is
        read from the running configuration at every request, so a new one applies at once;
        only C{admin.listen} (and adding or removing C{[admin]}) waits for a restart, which is
        logged.  A reload that would leave the open admin listener without a token on an
        address that is not loopback is refused: the problem, or L{None}.
        """
        from ..admin import is_loopback as _is_loopback

        old_listen = self.config.admin.listen if self.config.admin is not None else None
        new_listen = new.admin.listen if new.admin is not None else None
        port = self._admin.port if self._admin is not None and self.worker_index == 0 else None
        if port is not None and (new.admin is None or new.admin.token is None) and not _is_loopback(port.getHost()):
            return (
                f"admin.token: the admin API keeps listening on {old_listen} (not loopback) until the next restart, "
                "and a reload cannot take its token away; keep admin.token or admin.token_file until then"
            )
        if new_listen != old_listen:
            if old_listen is None:
                _log.warn("reload: admin.listen {new} takes effect at the next restart; the admin API stays off until then", new=new_listen)
            else:
                _log.warn("reload: admin.listen takes effect at the next restart; the admin API keeps listening on {old} until then", old=old_listen)
        return None

    def reload(self) -> list[str]:
        """
        Re-read the configuration file and apply it without dropping a session: new listeners
        open, removed ones close (their sessions live on), unchanged ones stay open, and new
        connections get the new rules, users, handlers and TLS files.  An invalid file changes
        nothing, and so does a reload while stopping.  Under systemd, RELOADING=1 / READY=1
        surround it.

        @return: the problems that stopped the reload (empty when it was applied).
        """
        if not self._started:
            problem = "the service is stopping: nothing to reload" if self._draining else "the service is not running: nothing to reload"
            _log.error("reload refused: {problem}", problem=problem)
            self.metrics.reloaded(False)
            return [problem]
        if self._notifier is not None:
            self._notifier.reloading()
        try:
            problems = self._reload()
        finally:
            if self._notifier is not None:
                self._notifier.ready(self._status_line())
        self.metrics.reloaded(not problems)
        return problems

    def _reload(self) -> list[str]:
        from ..config import load_config, with_mappings
        from ..errors import ConfigError

        if self.config_path is None:
            return ["this service was not built from a configuration file: nothing to reload"]
        try:
            new = with_mappings(load_config(self.config_path), self._extra_mappings)
            wanted = plan_listeners(new, None if self._adapters is None else self._adapters(), [])
        except ConfigError as e:
            problems = [str(p) for p in e.problems]
        except WingateMapError as e:
            problems = str(e).splitlines()
        else:
            problems = []
        if problems:
            for problem in problems:
                _log.error("reload refused, the running configuration stays: {problem}", problem=problem)
            return problems
        admin_problem = self._admin_reload(new)
        if admin_problem is not None:
            _log.error("reload refused, the running configuration stays: {problem}", problem=admin_problem)
            return [admin_problem]
        if new.cluster != self.config.cluster:
            _log.warn("reload: [cluster] changes take effect at the next restart")
        try:
            audit = self._audit.stage(new.service.audit_log)
        except WingateMapError as e:
            _log.error("reload refused, the running configuration stays: {problem}", problem=str(e))
            return [str(e)]
        try:
            events, factories, targets = self._build(new)
        except Exception as e:
            self._audit.discard(audit)
            message = f"cannot load TLS files: {e}"
            _log.error("reload refused, the running configuration stays: {problem}", problem=message)
            return [message]
        # Open what is new before touching anything, so a failure leaves all as it was.
        try:
            opened, closed, kept = self._listeners.reconfigure(wanted, targets)
        except BindError as e:
            self._audit.discard(audit)
            _log.error("reload refused, the running configuration stays: {problem}", problem=str(e))
            return [str(e)]
        # Commit.
        self._audit.commit(new.service.audit_log, audit)
        self.config = new
        self.events, self.factories = events, factories
        self._check_destinations()
        assert self.credentials is not None
        self.credentials.set_users(new.users)
        for warning in new.warnings:
            _log.warn("configuration: {warning}", warning=str(warning))
        self._apply_interception()
        if self._pool is not None:
            self._pool.signal("HUP")
        _log.info(
            "configuration reloaded from {path}: {mappings} mapping(s); {opened} listener(s) opened, {closed} closed, {kept} kept",
            path=self.config_path,
            mappings=len(new.enabled_mappings()),
            opened=opened,
            closed=closed,
            kept=kept,
        )
        return []

    def refresh_bindings(self) -> None:
        """
        Follow the adapters: listen on addresses that appeared, stop listening on ones that are
        gone (their sessions live on), and update the interception table.  Never fatal.
        """
        if not self._started:
            return
        try:
            wanted = self._plan()
        except Exception as e:
            # psutil raises OSError (EMFILE when out of file descriptors) as well as BindingError.
            self._watcher_failed(f"cannot follow adapter changes: {_describe(e)}")
            return
        if self._watcher_problem is not None:
            _log.info("adapter watcher recovered: following adapter changes again")
            self._watcher_problem = None
        self._listeners.follow(wanted)
        self._apply_interception()

    def _apply_interception(self) -> None:
        """
        Bring the interception table in line with the listeners; an nft error is logged (the
        listeners keep serving).
        """
        try:
            self._table.apply()
        except InterceptionError as e:
            _log.error("{error}", error=str(e))

    def _watch(self) -> None:
        """
        One poll of the adapter watcher: it survives any error, logged once per distinct
        error, and tries again at the next poll (L{health} names it meanwhile).
        """
        try:
            self.refresh_bindings()
        except Exception as e:
            self._watcher_failed(f"adapter watcher failed: {_describe(e)}")
        if self._notifier is not None and self._started:
            self._notifier.status(self._status_line())

    def _watcher_failed(self, problem: str) -> None:
        if problem != self._watcher_problem:
            _log.error("{problem} (will retry every {interval:g}s)", problem=problem, interval=self.config.service.adapter_poll_interval)
        self._watcher_problem = problem

    def health(self) -> tuple[int, dict[str, Any]]:
        """
        What C{GET /healthz} answers: 200 C{{"status": "ok"}} while every part works; 503
        C{{"status": "failing", "problems": [...]}} when a listener, a worker or the adapter
        watcher fails; 503 C{{"status": "draining"}} during a shutdown drain.

        @return: the HTTP status code and the JSON body.
        """
        counts = {"sessions": len(self.sessions), "listeners": len(self._listeners.ports), "workers": self.config.service.workers}
        if self._draining:
            return 503, {"status": "draining", **counts}
        if not self._started:
            return 503, {"status": "failing", "problems": ["the service is not running"], **counts}
        problems = [f"listener: {why}" for why in self._listeners.problems.values()]
        problems += [f"worker: {why}" for why in self._worker_problems()]
        if self._watcher_problem is not None:
            problems.append(f"adapter watcher: {self._watcher_problem}")
        if self._cluster_problem is not None:
            problems.append(f"cluster: {self._cluster_problem}")
        if problems:
            return 503, {"status": "failing", "problems": problems, **counts}
        if self.cluster is not None and self.cluster.state != "up":
            # Still serving (last known logins, node-local limits): a balancer must keep us.
            return 200, {"status": "degraded", "problems": [f"cluster: no link to the shared store (node {self.cluster.node}); serving with node-local state"], **counts}
        return 200, {"status": "ok", **counts}

    def _worker_problems(self) -> list[str]:
        pool_problems = getattr(self._pool, "problems", None)
        return list(pool_problems()) if pool_problems is not None else []

    def _status_line(self) -> str:
        """
        The STATUS= line systemd shows.
        """
        text = f"{len(self.sessions)} live session(s), {len(self._listeners.ports)} listener(s)"
        if self._pool is not None:
            text += f", {self.config.service.workers - 1} worker process(es)"
        return ("draining: " if self._draining else "") + text

    def _sighup(self) -> None:
        _log.info("SIGHUP: reloading {path}", path=self.config_path)
        self.reload()

    def end_drain(self) -> None:
        """
        End a shutdown drain at once: the sessions still live close with reason C{shutdown}
        (a second SIGTERM / SIGINT does this).  Called before the drain starts, the drain will
        not wait.
        """
        import signal

        self._hurry = True
        if self._pool is not None:
            # By number: Twisted's signalProcess knows only a few signal names.
            self._pool.signal(signal.SIGUSR2)  # type: ignore[arg-type]
        if self._draining and len(self.sessions):
            _log.info("second stop signal: ending the drain now, closing {count} session(s)", count=len(self.sessions))
            self.sessions.terminate_all("shutdown")

    def privilegedStartService(self) -> None:
        """
        Open what every child holds: bind every listener (before twistd drops privileges).
        Run as a program (see C{standalone}), a start failure exits with its one-line error,
        not a traceback.
        """
        if self.standalone is None:
            self.standalone = True
        if not self._started:
            self._listen_or_exit()
        # The children opened in _listen (all or nothing), not again here.
        Service.privilegedStartService(self)

    def startService(self) -> None:
        """
        Start every child; binds the listeners if L{privilegedStartService} has not.
        """
        if self.standalone is None:
            self.standalone = False
        if not self._started:
            self._listen_or_exit()
        super().startService()

    def _listen_or_exit(self) -> None:
        if not self.standalone or os.environ.get("WINGATEMAP_TRACEBACKS") is not None:
            self._listen()
            return
        try:
            self._listen()
        except WingateMapError as e:
            # An operator's error, not a crash: one line on the terminal (twistd has replaced
            # sys.stderr with its log), and the exit status twistd gives a failed start.
            import sys

            (sys.__stderr__ or sys.stderr).write(f"wingatemap: error: {e}\n")
            raise SystemExit(1) from None

    def stopService(self) -> Deferred[Any]:
        """
        Stop in order: first stop accepting (the adapter watcher, the health checks, the
        listeners, the interception table; a primary's workers are told to stop and drain on
        their own), then drain live sessions for C{drain_timeout} once every listening socket
        is closed, then end the rest with reason C{shutdown}, then stop every other child (the
        admin site, which stays up through the drain so that C{/healthz} answers 503 draining,
        the cluster store, the link to the primary, the audit log, ...).
        """
        Service.stopService(self)
        self._started = False
        self._draining = True
        if self._signals is not None:
            self._signals.draining()
        if self._notifier is not None:
            self._notifier.stopping(self._status_line())
        first = [self._watcher, self.checker, self._listeners, self._table, self.namedServices.get("workers")]
        stopping = {child: self._stop_child(child) for child in first if child is not None}
        # Drain once every listening socket is really closed (that takes one reactor turn).
        drained = stopping[self._listeners].addBoth(lambda _: self._drain())
        others = [d for child, d in stopping.items() if child is not self._listeners]
        return gatherResults(others + [drained], consumeErrors=True).addBoth(self._stopped)

    @staticmethod
    def _stop_child(child: Any) -> Deferred[Any]:
        """
        Stop C{child} if it runs (or holds something open): a Deferred firing once it has.
        """
        if not child.running and not getattr(child, "opened", False):
            return succeed(None)
        return maybeDeferred(child.stopService)

    def _drain(self) -> Deferred[None]:
        live = len(self.sessions)
        timeout = self.config.service.drain_timeout
        done = self.sessions.when_empty()
        if not live:
            return done
        if self._hurry:
            _log.info("listeners closed; not draining: closing {count} live session(s)", count=live)
            self.sessions.terminate_all("shutdown")
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

    def _stopped(self, result: Any) -> Deferred[Any]:
        """
        After the drain: stop every child still running, the last started first.
        """
        self._draining = False
        self._hurry = False
        if isinstance(result, Failure):
            _log.failure("error while stopping", result)
        if self._poller is not None:
            self._poller.close()  # no session is left to use it (a restart opens it again)
        rest = [self._stop_child(child) for child in reversed(list(self))]

        def stopped(result: Any) -> None:
            if isinstance(result, Failure):
                _log.failure("error while stopping", result)
            _log.info("stopped")

        return gatherResults(rest, consumeErrors=True).addBoth(stopped)
