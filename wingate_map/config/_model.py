"""
Configuration: TOML text in, frozen attrs model out.

Everything wrong with a file is reported at once, each problem naming its key path, the bad value
and what is allowed; unknown keys are errors, with a "did you mean" when a known key is close.
The model knows nothing of the runtime: no reactor, no sockets.  Paths in the file (such as
C{audit_log}) are resolved against the directory the file is in.
"""

from __future__ import annotations

import difflib
import json
import ipaddress
import os
import re
import shutil
import tomllib
from typing import Any

from attrs import evolve, field, frozen

from ._balancing import MAX_WEIGHT, METHODS as BALANCE_METHODS
from ..errors import ConfigError, ConfigProblem
from ..values import EVERYONE
from ._locations import Location, parse_location
from ._rates import parse_rate
from ..tls import TLS_VERSIONS, ClientTls, ServerTls, check_pair, load_certificates

DEFAULT_CONFIG_PATH = "wingatemap.toml"

USAGE_CLASSES = ("internal", "external", "dmz")
BIND_KEYWORDS = USAGE_CLASSES + ("all",)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_HOST_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")

# The keys allowed in each table; anything else is an error (with a "did you mean").
_TOP_KEYS = ("service", "admin", "interfaces", "users", "mappings", "events", "cluster")
_CLUSTER_KEYS = ("redis", "node", "node_ttl", "events_stream", "events_maxlen")  # SPEC §7
LIMITS_SCOPES = ("node", "cluster")
_NODE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_ADMIN_KEYS = ("listen", "token", "token_file")
_EVENT_NAMES = ("ClientConnect", "ClientDisconnect")
_EVENTS_KEYS = _EVENT_NAMES + ("max_running",)
DEFAULT_MAX_RUNNING = 64
_HANDLER_KEYS = ("run", "python", "timeout", "on_failure")
_USER_KEYS = ("locations", "groups", "certificates")
_RULE_KEYS = ("user", "group", "from", "not_from", "sni", "when", "to", "action")
RESERVED_USERS = ("guest",)
_SERVICE_KEYS = ("drain_timeout", "audit_log", "workers", "adapter_poll_interval", "timezone", "log_level", "log_format")
LOG_LEVELS = ("debug", "info", "warn", "error")  # [service] log_level: the operational log's threshold
LOG_FORMATS = ("text", "json")
MAX_INTERCEPT_PORTS = 1024
_MAPPING_KEYS = (
    "port",
    "enabled",
    "bind",
    "connect_timeout",
    "idle_timeout",
    "default",
    "rules",
    "intercept",
    "intercept_transparent",
    "tls",
    "proxy_protocol",
    "proxy_protocol_from",
    "max_connections",
    "max_connections_per_client",
    "peek_sni",
    "peek_timeout",
    "limits_scope",
    "balance",
    "health_check",
    "rate_limit",
)
_DESTINATION_KEYS = (
    "host",
    "port",
    "endpoint",
    "tls",
    "server_name",
    "ca",
    "verify",
    "client_cert",
    "client_key",
    "min_tls",
    "proxy_protocol",
    "weight",
)
_HEALTH_CHECK_KEYS = ("interval", "timeout", "fall", "rise")
_RATE_LIMIT_KEYS = ("per_session", "per_client", "per_mapping")
_DESTINATION_TLS_KEYS = ("server_name", "ca", "verify", "client_cert", "client_key", "min_tls")
_SERVER_TLS_KEYS = ("cert", "key", "client_ca", "min_tls")

# Every table the parser reads, by its path pattern, and the keys it accepts there (NAME stands for
# a name the operator chooses, EVENT for ClientConnect / ClientDisconnect, [] for an array of
# tables; "destination" is any destination table: a mapping's default or a rule's to).
KEY_TABLES: dict[str, tuple[str, ...]] = {
    "": _TOP_KEYS,
    "service": _SERVICE_KEYS,
    "admin": _ADMIN_KEYS,
    "cluster": _CLUSTER_KEYS,
    "events": _EVENTS_KEYS,
    "events.EVENT[]": _HANDLER_KEYS,
    "users.NAME": _USER_KEYS,
    "mappings.NAME": _MAPPING_KEYS,
    "mappings.NAME.tls": _SERVER_TLS_KEYS,
    "mappings.NAME.rules[]": _RULE_KEYS,
    "mappings.NAME.health_check": _HEALTH_CHECK_KEYS,
    "mappings.NAME.rate_limit": _RATE_LIMIT_KEYS,
    "destination": _DESTINATION_KEYS,
}


def key_paths() -> list[str]:
    """
    Every configuration key the parser accepts, as documented paths (C{mappings.NAME.port}).
    """
    # Tables are documented by their own keys; [interfaces] takes any adapter name.
    tables = {"events.ClientConnect", "events.ClientDisconnect", "mappings.NAME.rules", "mappings.NAME.tls", "mappings.NAME.health_check", "mappings.NAME.rate_limit"}
    paths = ["interfaces.ADAPTER"]
    for table, keys in KEY_TABLES.items():
        if table:
            paths.extend(f"{table}.{key}" for key in keys if f"{table}.{key}" not in tables)
    return sorted(paths)


def format_host_port(host: str, port: int) -> str:
    """
    C{host:port}, with an IPv6 address in brackets.
    """
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@frozen
class Destination:
    """
    Where a mapping sends a client: C{host} and C{port}, or a Twisted client C{endpoint} string.

    @ivar proxy_protocol: L{None}, C{"v1"} or C{"v2"}: send a PROXY header telling the
        destination who the real client is.
    @ivar tls: L{None} for plain TCP, else how to speak TLS to it.
    @ivar weight: its share (1-256) under round-robin and least-connections balancing.
    """

    host: str | None = None
    port: int | None = None
    endpoint: str | None = None
    proxy_protocol: str | None = None
    tls: ClientTls | None = None
    weight: int = 1

    def __str__(self) -> str:
        if self.endpoint is not None:
            return self.endpoint
        assert self.host is not None and self.port is not None
        return format_host_port(self.host, self.port)


@frozen
class HealthCheck:
    """
    A mapping's C{health_check} table: active checks of its destinations every C{interval}
    seconds, each given C{timeout} seconds; C{fall} failures (checks or connections) in a row
    make a destination down, C{rise} successful checks in a row make it up again.
    """

    interval: float = 5.0
    timeout: float = 2.0
    fall: int = 3
    rise: int = 2


@frozen
class RateLimit:
    """
    A mapping's C{rate_limit} table: bits per second each direction of a session, of all the
    sessions from one client address, and of all the mapping's sessions may pass (None: no
    limit of that kind).
    """

    per_session: int | None = None
    per_client: int | None = None
    per_mapping: int | None = None


@frozen
class Mapping:
    """
    One TCP mapping: a service port on some adapters, relayed to a destination.

    @ivar default: the destinations tried for a client no rule matches; empty when
        unmatched clients are refused.
    @ivar balance: how each destination list is used (L{BALANCE_METHODS}).
    @ivar health_check: the active checks, or L{None} (passive marking only, with
        L{HealthCheck}'s defaults for C{fall} and the retry interval).
    """

    name: str
    port: int
    enabled: bool = True
    bind: tuple[str, ...] = ("internal",)
    connect_timeout: float = 10.0
    idle_timeout: float = 0.0
    default: tuple[Destination, ...] = ()
    rules: tuple["Rule", ...] = ()
    proxy_protocol: bool = False
    proxy_protocol_from: tuple[Location, ...] | None = None
    tls: ServerTls | None = None
    intercept: tuple[int, ...] = ()
    intercept_transparent: bool = False
    max_connections: int = 0
    max_connections_per_client: int = 0
    peek_sni: bool = False
    peek_timeout: float = 2.0
    limits_scope: str = "node"
    balance: str = "failover"
    health_check: HealthCheck | None = None
    rate_limit: RateLimit | None = None

    def ports(self) -> tuple[int, ...]:
        """
        The service port, then the intercept ports.
        """
        return (self.port,) + self.intercept


@frozen
class User:
    """
    A user from C{[users.NAME]}: recognised ("assumed") by the locations it connects from, or
    proven ("authenticated") by a verified TLS client certificate whose subject CN is its name or
    one of its C{certificates}.
    """

    name: str
    locations: tuple[Location, ...] = ()
    groups: tuple[str, ...] = ()
    certificates: tuple[str, ...] = ()


@frozen
class Rule:
    """
    One specific mapping: when every given condition holds, send the client C{to} its
    destinations (or reject it).  A condition left out (L{None}) always holds.

    @ivar index: 0-based position in the mapping's rules.
    @ivar action: C{"connect"} or C{"reject"}.
    """

    index: int
    users: tuple[str, ...] | None = None
    groups: tuple[str, ...] | None = None
    from_: tuple[Location, ...] | None = None
    not_from: tuple[Location, ...] | None = None
    to: tuple[Destination, ...] = ()
    action: str = "connect"
    sni: tuple[str, ...] | None = None
    when: tuple[str, ...] | None = None

    def conditions(self) -> str:
        """
        The conditions as the operator wrote them, e.g. C{user = alice, from = 10.0.0.0/8}.
        """
        parts = []
        conditions = (("user", self.users), ("group", self.groups), ("from", self.from_), ("not_from", self.not_from), ("sni", self.sni), ("when", self.when))
        for key, values in conditions:
            if values is not None:
                parts.append(f"{key} = {', '.join(str(v) for v in values)}")
        return "; ".join(parts)

    def outcome(self) -> str:
        """
        What the rule does, e.g. C{-> 10.0.0.20:3389} or C{reject}.
        """
        if self.action == "reject":
            return "reject"
        return "-> " + " | ".join(str(d) for d in self.to)


@frozen
class AdminSettings:
    """
    The C{[admin]} table: where the admin API listens, and its bearer token (given as C{token},
    or read from the first line of C{token_file} when the configuration is loaded).
    """

    listen: str
    token: str | None = None
    token_file: str | None = None


@frozen
class ClusterSettings:
    """
    The C{[cluster]} table (SPEC §7): the Redis URL (checked, kept as written), this gateway's
    unique node name, the lease time, and the optional events stream.
    """

    redis: str = field(repr=False)  # may hold a password
    node: str = "localhost"
    node_ttl: float = 15.0
    events_stream: str | None = None
    events_maxlen: int = 1_000_000


@frozen
class Handler:
    """
    One event handler from C{[[events.NAME]]}: a program to C{run} (argv) or a C{python}
    callable ("pkg.mod:fn"); C{on_failure} is C{block} or C{allow} (ClientConnect only).
    """

    event: str
    index: int
    run: tuple[str, ...] | None = None
    python: str | None = None
    timeout: float = 5.0
    on_failure: str = "block"

    def __str__(self) -> str:
        what = " ".join(self.run) if self.run is not None else f"python {self.python}"
        return f"events.{self.event}[{self.index}] ({what})"


@frozen
class ServiceSettings:
    """
    The C{[service]} table.
    """

    drain_timeout: float = 30.0
    audit_log: str | None = None
    workers: int = 1
    adapter_poll_interval: float = 2.0
    timezone: str | None = None
    log_level: str = "info"
    log_format: str = "text"


@frozen
class Config:
    """
    A whole, valid configuration.

    @ivar interfaces: adapter name -> usage class overrides from C{[interfaces]}.
    @ivar users: in file order (the order they are checked in).
    @ivar source: where it was read from, for messages.
    @ivar warnings: things that are allowed but probably not meant (a rule that can never match).
    """

    service: ServiceSettings = ServiceSettings()
    interfaces: tuple[tuple[str, str], ...] = ()
    mappings: tuple[Mapping, ...] = ()
    users: tuple[User, ...] = ()
    source: str = "<string>"
    warnings: tuple[ConfigProblem, ...] = ()
    admin: AdminSettings | None = None
    handlers: tuple[Handler, ...] = ()
    max_running: int = DEFAULT_MAX_RUNNING
    cluster: ClusterSettings | None = None

    def interface_classes(self) -> dict[str, str]:
        """
        The C{[interfaces]} overrides as a dict.
        """
        return dict(self.interfaces)

    def enabled_mappings(self) -> tuple[Mapping, ...]:
        """
        The mappings that should run.
        """
        return tuple(m for m in self.mappings if m.enabled)

    def mapping(self, name: str) -> Mapping:
        """
        The mapping called C{name}; L{KeyError} if there is none.
        """
        for m in self.mappings:
            if m.name == name:
                return m
        raise KeyError(name)


def _describe(value: Any) -> str:
    """
    A value as the operator wrote it, for messages.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return repr(value)


@frozen
class _Reader:
    """
    Collects problems while reading tables; one instance per file.
    """

    base_dir: str
    problems: list[ConfigProblem] = field(factory=list)
    warnings: list[ConfigProblem] = field(factory=list)

    def error(self, path: str, message: str) -> None:
        self.problems.append(ConfigProblem(path, message))

    def warn(self, path: str, message: str) -> None:
        self.warnings.append(ConfigProblem(path, message))

    def strings(self, table: dict[str, Any], key: str, path: str, what: str) -> tuple[str, ...] | None:
        """
        A string or list of strings (at least one), or L{None} when the key is absent.
        """
        if key not in table:
            return None
        value = table[key]
        items = value if isinstance(value, list) else [value]
        if not items or not all(isinstance(i, str) and i for i in items):
            self.error(path, f"{_describe(value)} is not allowed; expected {what} or a non-empty list of them")
            return None
        return tuple(dict.fromkeys(items))

    def locations(self, table: dict[str, Any], key: str, path: str) -> tuple[Location, ...] | None:
        """
        A list of locations (a single string is a list of one), or L{None} when absent.
        """
        if key not in table:
            return None
        value = table[key]
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            self.error(path, "an empty list is not allowed; leave the key out instead")
            return None
        found = []
        for i, item in enumerate(items):
            where = f"{path}[{i}]" if isinstance(value, list) else path
            if not isinstance(item, str):
                self.error(where, f"{_describe(item)} is not a location; expected a string")
                continue
            try:
                found.append(parse_location(item))
            except ValueError as e:
                self.error(where, str(e))
        return tuple(found)

    def check_keys(self, table: dict[str, Any], path: str, known: tuple[str, ...]) -> None:
        for key in table:
            if key not in known:
                self.error(f"{path}.{key}" if path else key, f"unknown key{_did_you_mean(key, known)}; allowed here: {', '.join(known)}")

    def table(self, parent: dict[str, Any], key: str, path: str) -> dict[str, Any]:
        value = parent.get(key, {})
        if not isinstance(value, dict):
            self.error(path, f"must be a table, not {_describe(value)}")
            return {}
        return value

    def number(
        self,
        table: dict[str, Any],
        key: str,
        path: str,
        default: float,
        minimum: float = 0.0,
        exclusive_minimum: bool = False,
    ) -> float:
        value = table.get(key, default)
        allowed = f"a number of seconds {'>' if exclusive_minimum else '>='} {minimum:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(path, f"{_describe(value)} is not allowed; expected {allowed}")
            return default
        if value < minimum or (exclusive_minimum and value == minimum) or value != value:
            self.error(path, f"{_describe(value)} is out of range; expected {allowed}")
            return default
        return float(value)

    def integer(
        self, table: dict[str, Any], key: str, path: str, default: int, lo: int, hi: int, what: str
    ) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            self.error(path, f"{_describe(value)} is not a valid {what}; expected an integer {lo}-{hi}")
            return default
        return value

    def one_of(self, table: dict[str, Any], key: str, path: str, allowed: tuple[str, ...], default: str) -> str:
        """
        One of the words C{allowed}; C{default} when the key is absent.
        """
        value = table.get(key, default)
        if value not in allowed:
            self.error(path, f"{_describe(value)} is not allowed{_did_you_mean(value, allowed)}; expected one of {', '.join(allowed)}")
            return default
        return value

    def boolean(self, table: dict[str, Any], key: str, path: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            self.error(path, f"{_describe(value)} is not allowed; expected true or false")
            return default
        return value

    def path_value(self, table: dict[str, Any], key: str, path: str, what: str = "a file path", parent_must_exist: bool = False) -> str | None:
        """
        A file path, resolved against the configuration file's directory; L{None} if absent.
        """
        value = table.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.error(path, f"{_describe(value)} is not allowed; expected {what}")
            return None
        full = os.path.join(self.base_dir, os.path.expanduser(value))
        parent = os.path.dirname(full) or "."
        if parent_must_exist and not os.path.isdir(parent):
            self.error(path, f"{_describe(value)}: directory {parent} does not exist")
            return None
        return full


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return bool(_HOST_RE.match(host)) and len(host) <= 253


def _read_destination(reader: _Reader, value: Any, path: str) -> Destination | None:
    if isinstance(value, str):
        return _read_destination_string(reader, value, path)
    if not isinstance(value, dict):
        reader.error(path, f"must be \"host:port\" or a table like {{ host = \"10.0.0.10\", port = 3389 }}, not {_describe(value)}")
        return None
    reader.check_keys(value, path, _DESTINATION_KEYS)
    proxy = value.get("proxy_protocol", False)
    if proxy not in (False, "v1", "v2"):
        reader.error(f"{path}.proxy_protocol", f"{_describe(proxy)} is not allowed; expected false, \"v1\" or \"v2\"")
        proxy = False
    proxy_protocol = proxy or None
    tls = _read_client_tls(reader, value, path)
    weight = reader.integer(value, "weight", f"{path}.weight", 1, 1, MAX_WEIGHT, "weight")
    endpoint = value.get("endpoint")
    host = value.get("host")
    if endpoint is not None:
        if "host" in value or "port" in value:
            reader.error(path, "give either endpoint or host and port, not both")
            return None
        if not isinstance(endpoint, str) or not endpoint:
            reader.error(f"{path}.endpoint", f"{_describe(endpoint)} is not allowed; expected a Twisted client endpoint string such as \"unix:path=/run/app.sock\"")
            return None
        problem = check_client_endpoint(endpoint)
        if problem:
            reader.error(f"{path}.endpoint", f"{_describe(endpoint)} is not a valid client endpoint: {problem}")
            return None
        return Destination(endpoint=endpoint, proxy_protocol=proxy_protocol, tls=tls, weight=weight)
    if host is None:
        reader.error(f"{path}.host", "is required (or give endpoint)")
        return None
    if not isinstance(host, str) or not _valid_host(host):
        reader.error(f"{path}.host", f"{_describe(host)} is not a host name or IP address")
        return None
    if "port" not in value:
        reader.error(f"{path}.port", "is required")
        return None
    port = reader.integer(value, "port", f"{path}.port", 0, 1, 65535, "port")
    if not port:
        return None
    return Destination(host=host, port=port, proxy_protocol=proxy_protocol, tls=tls, weight=weight)


def _read_destination_string(reader: _Reader, text: str, path: str) -> Destination | None:
    """
    A destination written C{"host:port"} or C{"[v6]:port"}.
    """
    usage = 'expected "host:port" or "[IPv6]:port", e.g. "10.0.0.21:3389" or "[fd00::21]:3389"'
    split = _split_host_port(text)
    if split is None:
        reader.error(path, f"{_describe(text)} is not a destination; {usage}")
        return None
    host, port = split
    if not _valid_host(host):
        reader.error(path, f"{_describe(text)}: {host!r} is not a host name or IP address; {usage}")
        return None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        reader.error(path, f"{_describe(text)}: the port must be an integer 1-65535; {usage}")
        return None
    return Destination(host=host, port=int(port))


def _read_min_tls(reader: _Reader, table: dict[str, Any], path: str) -> str:
    value = table.get("min_tls", "1.2")
    if value not in TLS_VERSIONS:
        reader.error(path, f"{_describe(value)} is not allowed; expected one of {', '.join(repr(v).replace(chr(39), chr(34)) for v in TLS_VERSIONS)}")
        return "1.2"
    return value


def _read_ca(reader: _Reader, table: dict[str, Any], key: str, path: str) -> str | None:
    """
    A PEM file of CA certificates: its path, checked to hold at least one certificate.
    """
    ca = reader.path_value(table, key, path, "a PEM file path")
    if ca is not None:
        try:
            load_certificates(ca)
        except ValueError as e:
            reader.error(path, str(e))
    return ca


def _check_pair(reader: _Reader, cert: str, key: str, path: str) -> bool:
    ok = True
    for problem in check_pair(cert, key):
        if problem.startswith("warning: "):
            reader.warn(path, problem[len("warning: ") :])
        else:
            reader.error(path, problem)
            ok = False
    return ok


def _read_client_tls(reader: _Reader, value: dict[str, Any], path: str) -> ClientTls | None:
    enabled = reader.boolean(value, "tls", f"{path}.tls", False)
    given = [k for k in _DESTINATION_TLS_KEYS if k in value]
    if not enabled:
        for key in given:
            reader.error(f"{path}.{key}", "is only allowed with tls = true")
        return None
    server_name = value.get("server_name")
    if server_name is not None and (not isinstance(server_name, str) or not _valid_host(server_name)):
        reader.error(f"{path}.server_name", f"{_describe(server_name)} is not a host name")
        server_name = None
    ca = _read_ca(reader, value, "ca", f"{path}.ca")
    verify = reader.boolean(value, "verify", f"{path}.verify", True)
    if not verify:
        reader.warn(f"{path}.verify", "false: the destination's certificate and name are NOT checked; anyone in the path can read and change this traffic")
    client_cert = reader.path_value(value, "client_cert", f"{path}.client_cert", "a PEM file path")
    client_key = reader.path_value(value, "client_key", f"{path}.client_key", "a PEM file path")
    if client_key is not None and client_cert is None:
        reader.error(f"{path}.client_key", "is only allowed with client_cert")
    if client_cert is not None:
        _check_pair(reader, client_cert, client_key or client_cert, f"{path}.client_cert")
    return ClientTls(
        server_name=server_name,
        ca=ca,
        verify=verify,
        client_cert=client_cert,
        client_key=client_key,
        min_tls=_read_min_tls(reader, value, f"{path}.min_tls"),
    )


def _read_server_tls(reader: _Reader, value: Any, path: str) -> ServerTls | None:
    if not isinstance(value, dict):
        reader.error(path, f"must be a table like {{ cert = \"gw.pem\", key = \"gw.key\" }}, not {_describe(value)}")
        return None
    reader.check_keys(value, path, _SERVER_TLS_KEYS)
    cert = reader.path_value(value, "cert", f"{path}.cert", "a PEM file path")
    if cert is None:
        if "cert" not in value:
            reader.error(f"{path}.cert", "is required (a PEM certificate, optionally followed by its chain)")
        return None
    key = reader.path_value(value, "key", f"{path}.key", "a PEM file path") or cert
    client_ca = _read_ca(reader, value, "client_ca", f"{path}.client_ca")
    min_tls = _read_min_tls(reader, value, f"{path}.min_tls")
    if not _check_pair(reader, cert, key, f"{path}.cert"):
        return None
    return ServerTls(cert=cert, key=key, client_ca=client_ca, min_tls=min_tls)


def check_client_endpoint(description: str) -> str | None:
    """
    Why C{description} is not a usable Twisted client endpoint string, or L{None} if it is.
    """
    from twisted.internet.endpoints import clientFromString

    try:
        # Parsing only stores the reactor; nothing connects here.
        clientFromString(_NoReactor(), description)
    except Exception as e:  # the parsers raise ValueError, KeyError, TypeError...
        return str(e) or e.__class__.__name__
    return None


class _NoReactor:
    """
    A stand-in reactor for parsing endpoint strings without touching the real one.
    """


def _read_destinations(reader: _Reader, value: Any, path: str) -> tuple[Destination, ...]:
    if isinstance(value, list):
        if not value:
            reader.error(path, "an empty list is not allowed; give at least one destination or leave the key out")
            return ()
        found = [_read_destination(reader, item, f"{path}[{i}]") for i, item in enumerate(value)]
        return tuple(d for d in found if d is not None)
    found_one = _read_destination(reader, value, path)
    return (found_one,) if found_one is not None else ()


def _read_bind(reader: _Reader, mapping: dict[str, Any], path: str) -> tuple[str, ...]:
    value = mapping.get("bind", "internal")
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        reader.error(path, "an empty list is not allowed; expected a usage class, \"all\", or a list of adapter names, IP addresses and usage classes")
        return ()
    out = []
    for i, item in enumerate(items):
        where = f"{path}[{i}]" if isinstance(value, list) else path
        if not isinstance(item, str) or not item:
            reader.error(where, f"{_describe(item)} is not allowed; expected one of {', '.join(BIND_KEYWORDS)}, an adapter name or an IP address")
            continue
        if item in BIND_KEYWORDS:
            out.append(item)
            continue
        try:
            out.append(str(ipaddress.ip_address(item)))
            continue
        except ValueError:
            pass
        if not re.match(r"^[A-Za-z0-9_.:@-]{1,15}$", item):
            reader.error(where, f"{_describe(item)} is not a usage class ({', '.join(BIND_KEYWORDS)}), an IP address or an adapter name")
            continue
        out.append(item)
    return tuple(dict.fromkeys(out))


def _read_users(reader: _Reader, data: dict[str, Any]) -> tuple[User, ...]:
    users = []
    for name, table in reader.table(data, "users", "users").items():
        path = f"users.{name}"
        if not isinstance(table, dict):
            reader.error(path, f"must be a table, not {_describe(table)}")
            continue
        if name in RESERVED_USERS:
            reader.error(path, f"{name!r} is the user nobody recognised is; choose another name")
        elif not name or any(c.isspace() for c in name):
            reader.error(path, "a user name must be non-empty and have no spaces")
        reader.check_keys(table, path, _USER_KEYS)
        locations = reader.locations(table, "locations", f"{path}.locations") or ()
        groups = reader.strings(table, "groups", f"{path}.groups", "a group name") or ()
        certificates = reader.strings(table, "certificates", f"{path}.certificates", "a certificate subject CN") or ()
        users.append(User(name=name, locations=locations, groups=tuple(g for g in groups if g != EVERYONE), certificates=certificates))
    return tuple(users)


def _did_you_mean(name: object, known: Any) -> str:
    """
    C{' (did you mean "X"?)'} for the name in C{known} closest to C{name}, or nothing.
    """
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6) if isinstance(name, str) else []
    return f' (did you mean "{close[0]}"?)' if close else ""


def _read_rules(reader: _Reader, value: Any, path: str, users: tuple[User, ...]) -> tuple[Rule, ...]:
    if not isinstance(value, list) or not all(isinstance(r, dict) for r in value):
        reader.error(path, "must be an array of tables: write each rule as [[mappings.NAME.rules]]")
        return ()
    known_users = {u.name for u in users} | set(RESERVED_USERS)
    known_groups = {g for u in users for g in u.groups} | {EVERYONE}
    rules: list[Rule] = []
    seen: dict[tuple[Any, ...], int] = {}
    catch_all: int | None = None
    for index, table in enumerate(value):
        where = f"{path}[{index}]"
        reader.check_keys(table, where, _RULE_KEYS)
        rule_users = reader.strings(table, "user", f"{where}.user", "a user name")
        for name in rule_users or ():
            if name not in known_users:
                reader.error(f"{where}.user", f"{name!r} is not a user defined in [users]{_did_you_mean(name, sorted(known_users))}")
        rule_groups = reader.strings(table, "group", f"{where}.group", "a group name")
        for name in rule_groups or ():
            if name not in known_groups:
                groups = ", ".join(sorted(known_groups))
                reader.error(f"{where}.group", f"{name!r} is not a group of any user (groups: {groups}){_did_you_mean(name, sorted(known_groups))}")
        from_ = reader.locations(table, "from", f"{where}.from")
        not_from = reader.locations(table, "not_from", f"{where}.not_from")
        sni = _read_sni_patterns(reader, table, f"{where}.sni")
        when = _read_windows(reader, table, f"{where}.when")
        if all(k not in table for k in ("user", "group", "from", "not_from", "sni", "when")):
            reader.error(where, 'a rule needs at least one condition (user, group, from, not_from, sni or when); to match every client use group = "everyone", or set the mapping\'s default')
        action = table.get("action")
        to: tuple[Destination, ...] = ()
        if action is not None and action != "reject":
            reader.error(f"{where}.action", f'{_describe(action)} is not allowed; the only action is "reject" (use to = {{...}} to send clients somewhere)')
        if action == "reject" and "to" in table:
            reader.error(where, 'give either to or action = "reject", not both')
        elif action is None:
            if "to" not in table:
                reader.error(f"{where}.to", 'is required (a destination or a failover list), or set action = "reject"')
            else:
                to = _read_destinations(reader, table["to"], f"{where}.to")
        rule = Rule(
            index=index,
            users=rule_users,
            groups=rule_groups,
            from_=from_,
            not_from=not_from,
            to=to,
            action="reject" if action == "reject" else "connect",
            sni=sni,
            when=when,
        )
        key = (
            frozenset(rule_users) if rule_users is not None else None,
            frozenset(rule_groups) if rule_groups is not None else None,
            frozenset(l.text for l in from_) if from_ is not None else None,
            frozenset(l.text for l in not_from) if not_from is not None else None,
            frozenset(p.lower() for p in sni) if sni is not None else None,
            frozenset(when) if when is not None else None,
        )
        if catch_all is not None:
            reader.warn(where, f"never matches: rule {catch_all} matches every client")
        elif key in seen:
            reader.warn(where, f"never matches: rule {seen[key]} has the same conditions")
        else:
            seen[key] = index
        if rule_groups is not None and EVERYONE in rule_groups and rule_users is None and from_ is None and not_from is None and sni is None and when is None:
            catch_all = index if catch_all is None else catch_all
        rules.append(rule)
    return tuple(rules)


def _read_sni_patterns(reader: _Reader, table: dict[str, Any], path: str) -> tuple[str, ...] | None:
    """
    A rule's C{sni} condition: server-name patterns (exact, or a leading C{*.}).
    """
    from ._names import check_sni_pattern

    patterns = reader.strings(table, "sni", path, "a server name pattern")
    for index, pattern in enumerate(patterns or ()):
        problem = check_sni_pattern(pattern)
        if problem:
            reader.error(f"{path}[{index}]" if isinstance(table.get("sni"), list) else path, problem)
    return patterns


def _read_windows(reader: _Reader, table: dict[str, Any], path: str) -> tuple[str, ...] | None:
    """
    A rule's C{when} condition: weekly windows, checked here, compiled by the rule service.
    """
    from ._schedule import parse_window

    windows = reader.strings(table, "when", path, "a time window")
    for index, window in enumerate(windows or ()):
        try:
            parse_window(window)
        except ValueError as e:
            reader.error(f"{path}[{index}]" if isinstance(table.get("when"), list) else path, str(e))
    return windows


def _read_intercept(reader: _Reader, table: dict[str, Any], path: str, port: int) -> tuple[int, ...]:
    value = table.get("intercept", [])
    where = f"{path}.intercept"
    if not isinstance(value, list):
        reader.error(where, f"{_describe(value)} is not allowed; expected a list of ports and \"lo-hi\" ranges, e.g. [3390, \"5000-5010\"]")
        return ()
    ports: list[int] = []
    for i, item in enumerate(value):
        item_path = f"{where}[{i}]"
        if isinstance(item, int) and not isinstance(item, bool):
            if not 1 <= item <= 65535:
                reader.error(item_path, f"{item} is not a valid port; expected an integer 1-65535")
                continue
            ports.append(item)
        elif isinstance(item, str) and re.match(r"^\d+-\d+$", item.strip()):
            lo, hi = (int(x) for x in item.strip().split("-"))
            if not (1 <= lo <= hi <= 65535):
                reader.error(item_path, f"{_describe(item)} is not a valid range; expected \"lo-hi\" with 1 <= lo <= hi <= 65535")
                continue
            ports.extend(range(lo, hi + 1))
        else:
            reader.error(item_path, f"{_describe(item)} is not allowed; expected a port or a \"lo-hi\" range")
    if port and port in ports:
        reader.error(where, f"includes the mapping's own port {port}")
    duplicates = sorted({p for p in ports if ports.count(p) > 1})
    if duplicates:
        reader.error(where, f"lists port(s) {', '.join(map(str, duplicates))} more than once")
    unique = tuple(sorted(set(ports) - {port}))
    if len(unique) > MAX_INTERCEPT_PORTS:
        reader.error(where, f"{len(unique)} ports is more than the {MAX_INTERCEPT_PORTS} allowed per mapping (each is a listener on every bound address)")
        return ()
    return unique


def _bind_overlap(a: "Mapping", b: "Mapping") -> bool:
    """
    Whether two mappings' bind lists certainly share addresses (a common item, or "all").
    Overlaps that depend on the adapters (a class and an address in it) are found when the
    listeners are planned, at start and by check, which name both mappings too.
    """
    return "all" in a.bind or "all" in b.bind or bool(set(a.bind) & set(b.bind))


def _check_port_conflicts(reader: _Reader, mappings: list["Mapping"]) -> None:
    enabled = [m for m in mappings if m.enabled]
    for i, a in enumerate(enabled):
        for b in enabled[i + 1 :]:
            shared = sorted(set(a.ports()) & set(b.ports()))
            if not shared or not _bind_overlap(a, b):
                continue
            for port in shared:
                what_a = "port" if port == a.port else "intercept"
                what_b = "port" if port == b.port else "intercept port"
                reader.error(
                    f"mappings.{b.name}.{'port' if port == b.port else 'intercept'}",
                    f"port {port} is also mapping {a.name}'s {'service port' if what_a == 'port' else 'intercept port'} on overlapping bindings ({', '.join(a.bind)} / {', '.join(b.bind)}); this mapping's {what_b} would clash",
                )


def _read_mapping(reader: _Reader, name: str, table: Any, users: tuple[User, ...]) -> Mapping | None:
    path = f"mappings.{name}"
    if not isinstance(table, dict):
        reader.error(path, f"must be a table, not {_describe(table)}")
        return None
    if not _NAME_RE.match(name):
        reader.error(path, "a mapping name may use only letters, digits, \"_\" and \"-\" and must start with a letter or digit")
    reader.check_keys(table, path, _MAPPING_KEYS)
    if "port" not in table:
        reader.error(f"{path}.port", "is required; expected an integer 1-65535")
        port = 0
    else:
        port = reader.integer(table, "port", f"{path}.port", 0, 1, 65535, "port")
    enabled = reader.boolean(table, "enabled", f"{path}.enabled", True)
    bind = _read_bind(reader, table, f"{path}.bind")
    connect_timeout = reader.number(table, "connect_timeout", f"{path}.connect_timeout", 10.0, 0.0, exclusive_minimum=True)
    idle_timeout = reader.number(table, "idle_timeout", f"{path}.idle_timeout", 0.0)
    default: tuple[Destination, ...] = ()
    if "default" in table:
        default = _read_destinations(reader, table["default"], f"{path}.default")
    rules = _read_rules(reader, table["rules"], f"{path}.rules", users) if "rules" in table else ()
    if rules and any(r.groups and EVERYONE in r.groups and r.users is None and r.from_ is None and r.not_from is None for r in rules) and default:
        reader.warn(f"{path}.default", "never used: a rule matches every client")
    proxy_protocol = reader.boolean(table, "proxy_protocol", f"{path}.proxy_protocol", False)
    proxy_from = reader.locations(table, "proxy_protocol_from", f"{path}.proxy_protocol_from")
    if proxy_from is not None and not proxy_protocol:
        reader.error(f"{path}.proxy_protocol_from", "is only allowed with proxy_protocol = true")
    if proxy_protocol and proxy_from is None:
        reader.warn(f"{path}.proxy_protocol", "any peer may send a PROXY header and so choose its client address; list your load balancers in proxy_protocol_from")
    intercept = _read_intercept(reader, table, path, port)
    transparent = reader.boolean(table, "intercept_transparent", f"{path}.intercept_transparent", False)
    if transparent and not intercept:
        reader.error(f"{path}.intercept_transparent", "needs intercept ports to catch (intercept = [...])")
    max_connections = reader.integer(table, "max_connections", f"{path}.max_connections", 0, 0, 10_000_000, "connection limit (0 = unlimited)")
    max_per_client = reader.integer(
        table, "max_connections_per_client", f"{path}.max_connections_per_client", 0, 0, 10_000_000, "connection limit (0 = unlimited)"
    )
    tls = _read_server_tls(reader, table["tls"], f"{path}.tls") if "tls" in table else None
    if tls is not None and proxy_protocol:
        reader.error(f"{path}.proxy_protocol", "cannot be combined with tls on the same mapping in this version")
    peek_sni = reader.boolean(table, "peek_sni", f"{path}.peek_sni", False)
    peek_timeout = reader.number(table, "peek_timeout", f"{path}.peek_timeout", 2.0, 0.0, exclusive_minimum=True)
    limits_scope = table.get("limits_scope", "node")
    if limits_scope not in LIMITS_SCOPES:
        reader.error(f"{path}.limits_scope", f"{_describe(limits_scope)} is not allowed; expected one of {', '.join(LIMITS_SCOPES)}")
        limits_scope = "node"
    balance = reader.one_of(table, "balance", f"{path}.balance", BALANCE_METHODS, "failover")
    health_check = _read_health_check(reader, table["health_check"], f"{path}.health_check") if "health_check" in table else None
    rate_limit = _read_rate_limit(reader, table["rate_limit"], f"{path}.rate_limit") if "rate_limit" in table else None
    if balance not in ("round-robin", "least-connections"):
        _warn_unused_weights(reader, table, path, balance)
    if "peek_timeout" in table and not peek_sni:
        reader.error(f"{path}.peek_timeout", "is only allowed with peek_sni = true")
    if peek_sni and tls is not None:
        reader.error(f"{path}.peek_sni", "cannot be combined with tls: a TLS listener knows the server name from its own handshake")
    if not peek_sni and tls is None:
        for rule in rules:
            if rule.sni is not None:
                reader.error(f"{path}.rules[{rule.index}].sni", "needs peek_sni = true (or tls on the mapping): otherwise the server name is never known")
    if not port:
        return None
    return Mapping(
        name=name,
        port=port,
        enabled=enabled,
        bind=bind,
        connect_timeout=connect_timeout,
        idle_timeout=idle_timeout,
        default=default,
        rules=rules,
        proxy_protocol=proxy_protocol,
        proxy_protocol_from=proxy_from,
        tls=tls,
        intercept=intercept,
        intercept_transparent=transparent,
        max_connections=max_connections,
        max_connections_per_client=max_per_client,
        peek_sni=peek_sni,
        peek_timeout=peek_timeout,
        limits_scope=limits_scope,
        balance=balance,
        health_check=health_check,
        rate_limit=rate_limit,
    )


def _read_rate_limit(reader: _Reader, value: Any, path: str) -> RateLimit | None:
    """
    A mapping's C{rate_limit} table: rates such as C{"50Mbit"} (see L{parse_rate}), each key
    optional.
    """
    if not isinstance(value, dict):
        reader.error(path, f'must be a table like {{ per_session = "50Mbit", per_client = "100Mbit", per_mapping = "1Gbit" }}, not {_describe(value)}')
        return None
    reader.check_keys(value, path, _RATE_LIMIT_KEYS)
    rates: dict[str, int | None] = {}
    for key in _RATE_LIMIT_KEYS:
        rates[key] = None
        if key in value:
            try:
                rates[key] = parse_rate(value[key])
            except ValueError as e:
                reader.error(f"{path}.{key}", str(e))
    return RateLimit(**rates) if any(rates.values()) else None


def _read_health_check(reader: _Reader, value: Any, path: str) -> HealthCheck | None:
    """
    A mapping's C{health_check} table (every key optional, with L{HealthCheck}'s defaults).
    """
    if not isinstance(value, dict):
        reader.error(path, f"must be a table like {{ interval = 5, timeout = 2, fall = 3, rise = 2 }}, not {_describe(value)}")
        return None
    reader.check_keys(value, path, _HEALTH_CHECK_KEYS)
    interval = reader.number(value, "interval", f"{path}.interval", 5.0, 0.0, exclusive_minimum=True)
    timeout = reader.number(value, "timeout", f"{path}.timeout", 2.0, 0.0, exclusive_minimum=True)
    fall = reader.integer(value, "fall", f"{path}.fall", 3, 1, 100, "count")
    rise = reader.integer(value, "rise", f"{path}.rise", 2, 1, 100, "count")
    return HealthCheck(interval=interval, timeout=timeout, fall=fall, rise=rise)


def _warn_unused_weights(reader: _Reader, table: dict[str, Any], path: str, balance: str) -> None:
    """
    Warn about C{weight} given where C{balance} does not use it (failover, source-hash).
    """
    lists = [(f"{path}.default", table.get("default"))]
    rules = table.get("rules")
    if isinstance(rules, list):
        lists += [(f"{path}.rules[{i}].to", r.get("to")) for i, r in enumerate(rules) if isinstance(r, dict)]
    for where, value in lists:
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            if isinstance(item, dict) and "weight" in item:
                at = f"{where}[{i}]" if isinstance(value, list) else where
                reader.warn(f"{at}.weight", f'not used: balance = "{balance}" ignores weights (only round-robin and least-connections use them)')


def _read_cluster(reader: _Reader, data: dict[str, Any]) -> ClusterSettings | None:
    """
    The C{[cluster]} table, or None when absent.
    """
    if "cluster" not in data:
        return None
    from ..cluster import parse_redis_url

    table = reader.table(data, "cluster", "cluster")
    reader.check_keys(table, "cluster", _CLUSTER_KEYS)
    redis = table.get("redis")
    if redis is None:
        reader.error("cluster.redis", "is required; expected a URL such as redis://127.0.0.1:6379/0")
    else:
        try:
            parse_redis_url(redis)
        except ConfigError as e:
            reader.problems.extend(e.problems)
    node = table.get("node")
    if node is None:
        import socket

        node = socket.gethostname()
        if not _NODE_RE.match(node):
            reader.error("cluster.node", f"the host name {node!r} cannot be a node name; set cluster.node (letters, digits, \".\", \"_\", \"-\", up to 63)")
    elif not isinstance(node, str) or not _NODE_RE.match(node):
        reader.error("cluster.node", f"{_describe(node)} is not allowed; expected a name of letters, digits, \".\", \"_\" and \"-\" (up to 63, unique per gateway)")
    node_ttl = reader.number(table, "node_ttl", "cluster.node_ttl", 15.0, 1.0)
    stream = table.get("events_stream")
    if stream is not None and (not isinstance(stream, str) or not stream):
        reader.error("cluster.events_stream", f"{_describe(stream)} is not allowed; expected a Redis key name such as \"wingatemap:events\"")
        stream = None
    maxlen = reader.integer(table, "events_maxlen", "cluster.events_maxlen", 1_000_000, 1, 1_000_000_000, "stream length")
    if reader.problems or redis is None:
        return None
    return ClusterSettings(redis=redis, node=node, node_ttl=node_ttl, events_stream=stream, events_maxlen=maxlen)


def _loopback_only(description: str) -> bool:
    """
    Whether a server endpoint string listens on loopback only (or a Unix socket).
    """
    if description.startswith("unix:"):
        return True
    # Twisted takes the last of repeated keywords: every one must be loopback, so that
    # "interface=127.0.0.1:interface=0.0.0.0" does not pass.  (The admin API checks the
    # address it actually bound too.)
    found = re.findall(r"(?:^|:)interface=((?:\\:|[^:])*)", description)
    if not found:
        return False
    try:
        return all(ipaddress.ip_address(value.replace("\\:", ":")).is_loopback for value in found)
    except ValueError:
        return False


def _endpoint_hint(listen: str) -> str | None:
    """
    The endpoint string meant by C{"127.0.0.1:9090"}, C{"[::1]:9090"}, C{":9090"} or C{"9090"}.
    """
    if listen.isdigit():
        return f"tcp:{listen}:interface=127.0.0.1"
    split = _split_host_port(listen)
    if split is None or not split[1].isdigit():
        return None
    host, port = split
    if not host:
        return f"tcp:{port}:interface=127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if address.version == 6:
        return f"tcp6:{port}:interface={str(address).replace(':', chr(92) + ':')}"
    return f"tcp:{port}:interface={address}"


def _read_token_file(reader: _Reader, table: dict[str, Any]) -> tuple[str | None, str | None]:
    """
    C{admin.token_file}: (resolved path, its first line stripped), or (path, None) on error.
    """
    path = reader.path_value(table, "token_file", "admin.token_file")
    if path is None:
        return None, None
    try:
        with open(path, "rb") as f:
            first = f.readline(4096)
    except OSError as e:
        reader.error("admin.token_file", f"cannot read {path}: {e.strerror or e}")
        return path, None
    try:
        token = first.decode("utf-8").strip()
    except UnicodeDecodeError:
        reader.error("admin.token_file", f"{path}: the first line is not UTF-8 text")
        return path, None
    if not token:
        reader.error("admin.token_file", f"{path}: the first line is empty; write the token there")
        return path, None
    return path, token


def _read_admin(reader: _Reader, data: dict[str, Any]) -> AdminSettings | None:
    if "admin" not in data:
        return None
    table = reader.table(data, "admin", "admin")
    reader.check_keys(table, "admin", _ADMIN_KEYS)
    listen = table.get("listen")
    if not isinstance(listen, str) or not listen:
        reader.error("admin.listen", 'is required: a Twisted server endpoint string such as "tcp:8780:interface=127.0.0.1"')
        return None
    from twisted.internet.endpoints import serverFromString

    hint = _endpoint_hint(listen)
    if hint is not None:
        reader.error("admin.listen", f"{_describe(listen)} is not a Twisted server endpoint string; write {_describe(hint)}")
        return None
    try:
        serverFromString(_NoReactor(), listen)
    except Exception as e:
        reader.error("admin.listen", f"{_describe(listen)} is not a valid server endpoint string: {e}")
        return None
    token = table.get("token")
    if token is not None and "token_file" in table:
        reader.error("admin.token_file", "give either admin.token or admin.token_file, not both")
        return None
    if token is not None and (not isinstance(token, str) or len(token) < 8):
        reader.error("admin.token", "must be a string of at least 8 characters")
        return None
    token_file, from_file = _read_token_file(reader, table)
    if token_file is not None:
        if from_file is None:
            return None
        if len(from_file) < 8:
            reader.error("admin.token_file", f"{token_file}: the token must be at least 8 characters")
            return None
        token = from_file
        _warn_if_readable(reader, token_file, "admin.token_file", "the file holding the admin token")
    if token is None and not _loopback_only(listen):
        reader.error("admin.token", f"is required when admin.listen ({listen}) is not loopback-only; anyone who can reach it could kill sessions and log users in")
    return AdminSettings(listen=listen, token=token, token_file=token_file)


def _warn_if_readable(reader: _Reader, path: str, key: str, what: str) -> None:
    """
    Warn when C{path} (a secret) can be read by users other than its owner and group.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o004:
        reader.warn(key, f"{path}: {what} is readable by every user (mode {mode & 0o777:04o}); chmod o-r {path}")


def _read_handlers(reader: _Reader, data: dict[str, Any]) -> tuple[Handler, ...]:
    if "events" not in data:
        return ()
    table = reader.table(data, "events", "events")
    reader.check_keys(table, "events", _EVENTS_KEYS)
    handlers = []
    for event in _EVENT_NAMES:
        entries = table.get(event, [])
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            reader.error(f"events.{event}", f"must be an array of tables: write each handler as [[events.{event}]]")
            continue
        for index, entry in enumerate(entries):
            path = f"events.{event}[{index}]"
            reader.check_keys(entry, path, _HANDLER_KEYS)
            run = entry.get("run")
            python = entry.get("python")
            if (run is None) == (python is None):
                reader.error(path, 'give exactly one of run = ["/path/to/program", "arg"] or python = "package.module:function"')
                continue
            if run is not None and (not isinstance(run, list) or not run or not all(isinstance(a, str) and a for a in run)):
                reader.error(f"{path}.run", f"{_describe(run)} is not allowed; expected a non-empty list of strings (program and arguments)")
                continue
            if run is not None:
                program = run[0] if os.path.isabs(run[0]) else shutil.which(run[0])
                if program is None or not os.access(program, os.X_OK):
                    reader.error(f"{path}.run", f"{_describe(run[0])} is not an executable program")
                    continue
            if python is not None:
                problem = _check_callable(python)
                if problem:
                    reader.error(f"{path}.python", f"{_describe(python)}: {problem}")
                    continue
            timeout = reader.number(entry, "timeout", f"{path}.timeout", 5.0, 0.0, exclusive_minimum=True)
            on_failure = entry.get("on_failure", "block")
            if on_failure not in ("block", "allow"):
                reader.error(f"{path}.on_failure", f'{_describe(on_failure)} is not allowed; expected "block" or "allow"')
                on_failure = "block"
            handlers.append(
                Handler(event=event, index=index, run=tuple(run) if run else None, python=python, timeout=timeout, on_failure=on_failure)
            )
    return tuple(handlers)


def _check_callable(text: Any) -> str | None:
    if not isinstance(text, str) or not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", text):
        return 'expected "package.module:function"'
    module_name, _, name = text.partition(":")
    import importlib

    try:
        module = importlib.import_module(module_name)
    except Exception as e:
        return f"cannot import {module_name}: {e.__class__.__name__}: {e}"
    if not callable(getattr(module, name, None)):
        return f"{module_name} has no callable {name}"
    return None


def _read_document(data: dict[str, Any], base_dir: str, source: str) -> Config:
    reader = _Reader(base_dir)
    reader.check_keys(data, "", _TOP_KEYS)

    service_table = reader.table(data, "service", "service")
    reader.check_keys(service_table, "service", _SERVICE_KEYS)
    drain_timeout = reader.number(service_table, "drain_timeout", "service.drain_timeout", 30.0)
    audit_log = reader.path_value(service_table, "audit_log", "service.audit_log", parent_must_exist=True)
    workers = reader.integer(service_table, "workers", "service.workers", 1, 1, 64, "number of worker processes")
    timezone = service_table.get("timezone")
    if timezone is not None:
        from ._schedule import load_timezone

        try:
            load_timezone(timezone)
        except ValueError as e:
            reader.error("service.timezone", str(e))
            timezone = None
    log_level = reader.one_of(service_table, "log_level", "service.log_level", LOG_LEVELS, "info")
    log_format = reader.one_of(service_table, "log_format", "service.log_format", LOG_FORMATS, "text")

    interfaces = []
    for adapter, usage in reader.table(data, "interfaces", "interfaces").items():
        if usage not in USAGE_CLASSES:
            reader.error(f"interfaces.{adapter}", f"{_describe(usage)} is not a usage class; expected one of {', '.join(USAGE_CLASSES)}")
        else:
            interfaces.append((adapter, usage))

    users = _read_users(reader, data)
    mappings = []
    for name, table in reader.table(data, "mappings", "mappings").items():
        mapping = _read_mapping(reader, name, table, users)
        if mapping is not None:
            mappings.append(mapping)
    _check_port_conflicts(reader, mappings)
    poll = reader.number(service_table, "adapter_poll_interval", "service.adapter_poll_interval", 2.0, 0.0, exclusive_minimum=True)

    admin = _read_admin(reader, data)
    handlers = _read_handlers(reader, data)
    max_running = reader.integer(reader.table(data, "events", "events"), "max_running", "events.max_running", DEFAULT_MAX_RUNNING, 1, 4096, "number of handler programs running at once")
    cluster = _read_cluster(reader, data)
    if "cluster" in data and workers > 1:
        reader.error("service.workers", "must be 1 with [cluster] in this version: run one gateway process per node instead (docs/cluster.md)")
    for mapping in mappings:
        if mapping.limits_scope == "cluster" and "cluster" not in data:
            reader.error(f"mappings.{mapping.name}.limits_scope", '"cluster" needs a [cluster] table (the Redis the gateways share)')
        elif mapping.limits_scope == "cluster" and not mapping.max_connections_per_client:
            reader.warn(f"mappings.{mapping.name}.limits_scope", "has no effect without max_connections_per_client")

    if reader.problems:
        raise ConfigError(reader.problems)
    return Config(
        admin=admin,
        handlers=handlers,
        max_running=max_running,
        cluster=cluster,
        service=ServiceSettings(drain_timeout=drain_timeout, audit_log=audit_log, workers=workers, adapter_poll_interval=poll, timezone=timezone, log_level=log_level, log_format=log_format),
        interfaces=tuple(interfaces),
        mappings=tuple(mappings),
        users=users,
        source=source,
        warnings=tuple(reader.warnings),
    )


def parse_config(text: str, source: str = "<string>", base_dir: str | None = None) -> Config:
    """
    Parse and validate configuration C{text}.

    @param base_dir: the directory relative paths are resolved against (default: the current one).
    @raise ConfigError: listing every problem found.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([ConfigProblem("", f"{source}: not valid TOML: {e}")]) from None
    return _read_document(data, base_dir or os.getcwd(), source)


def load_config(path: str = DEFAULT_CONFIG_PATH) -> Config:
    """
    Read, parse and validate the configuration file at C{path}.

    @raise ConfigError: the file cannot be read or is invalid.
    """
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError(
            [
                ConfigProblem(
                    "",
                    f"{path}: no such configuration file; give --config FILE, or start from the examples in "
                    f"docs/examples/ (wingatemap.toml), or try a quick mapping with --map 8080=HOST:PORT",
                )
            ]
        ) from None
    except OSError as e:
        raise ConfigError([ConfigProblem("", f"{path}: cannot read configuration: {e.strerror or e}")]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError([ConfigProblem("", f"{path}: not UTF-8 text: {e}")]) from None
    config = parse_config(text, source=path, base_dir=os.path.dirname(os.path.abspath(path)))
    if config.admin is not None and config.admin.token is not None and config.admin.token_file is None:
        reader = _Reader(os.path.dirname(os.path.abspath(path)))
        _warn_if_readable(reader, path, "admin.token", "the configuration file holding the admin token")
        if reader.warnings:
            config = evolve(config, warnings=config.warnings + tuple(reader.warnings))
    return config


def _split_host_port(text: str) -> tuple[str, str] | None:
    """
    C{"host:port"} or C{"[v6]:port"} -> (host, port text).
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            return None
        return text[1:end], text[end + 2 :]
    host, sep, port = text.rpartition(":")
    if not sep or not host or ":" in host:
        return None
    return host, port


def parse_map_option(text: str) -> Mapping:
    """
    A quick mapping from C{--map [ADDRESS:]PORT=HOST:PORT}.

    Without ADDRESS the mapping binds to the internal adapters, as a configured one would.

    @raise ConfigError: naming the option and what is allowed.
    """
    where = f"--map {text}"
    usage = "expected [ADDRESS:]PORT=HOST:PORT, e.g. 8080=db.internal:5432 or 127.0.0.1:8080=[::1]:80"
    listen, sep, target = text.partition("=")
    if not sep:
        raise ConfigError([ConfigProblem(where, usage)])
    problems = []
    bind: tuple[str, ...] = ("internal",)
    listen_port = listen
    if listen.startswith("[") or listen.count(":") == 1 or "]" in listen:
        split = _split_host_port(listen)
        if split is None:
            raise ConfigError([ConfigProblem(where, usage)])
        address, listen_port = split
        try:
            bind = (str(ipaddress.ip_address(address)),)
        except ValueError:
            if address in BIND_KEYWORDS or re.match(r"^[A-Za-z0-9_.@-]{1,15}$", address):
                bind = (address,)
            else:
                problems.append(ConfigProblem(where, f"{address!r} is not an IP address, adapter name or usage class"))
    if not listen_port.isdigit() or not 1 <= int(listen_port) <= 65535:
        problems.append(ConfigProblem(where, f"listening port {listen_port!r} is not an integer 1-65535"))
    split = _split_host_port(target)
    if split is None:
        problems.append(ConfigProblem(where, f"destination {target!r}: {usage}"))
    else:
        host, port = split
        if not _valid_host(host):
            problems.append(ConfigProblem(where, f"destination host {host!r} is not a host name or IP address"))
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            problems.append(ConfigProblem(where, f"destination port {port!r} is not an integer 1-65535"))
    if problems:
        raise ConfigError(problems)
    assert split is not None
    return Mapping(
        name=f"map-{int(listen_port)}",
        port=int(listen_port),
        bind=bind,
        default=(Destination(host=split[0], port=int(split[1])),),
    )


def with_mappings(config: Config, extra: list[Mapping] | tuple[Mapping, ...]) -> Config:
    """
    C{config} with C{extra} mappings added (from C{--map}); a name already taken gets a suffix.
    """
    names = {m.name for m in config.mappings}
    added = []
    for mapping in extra:
        name, n = mapping.name, 1
        while name in names:
            n += 1
            name = f"{mapping.name}-{n}"
        names.add(name)
        added.append(evolve(mapping, name=name))
    return evolve(config, mappings=config.mappings + tuple(added))

