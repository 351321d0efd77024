"""
The C{cluster.redis} URL: C{redis://[[user]:password@]host[:port][/db]},
C{rediss://...} (TLS; C{?ca=/path/ca.pem} for a private CA) and
C{unix://[[user]:password@]/path/redis.sock[?db=N]}.

Parsed strictly: anything the URL says that would be ignored is an error naming C{cluster.redis}.
The password is never part of an error message or of L{RedisAddress.display}.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from attrs import field, frozen
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import Certificate, optionsForClientTLS

from ..errors import ConfigError, ConfigProblem

KEY = "cluster.redis"
DEFAULT_PORT = 6379


def _problem(message: str) -> ConfigError:
    return ConfigError([ConfigProblem(KEY, message)])


@frozen
class RedisAddress:
    """
    Where the cluster's Redis is and how to log in to it.

    @ivar scheme: C{redis}, C{rediss} or C{unix}.
    @ivar host: the host name or address (TCP only).
    @ivar port: the TCP port (TCP only).
    @ivar path: the Unix socket path (C{unix} only).
    @ivar db: the database number.
    @ivar username: the ACL user, if any.
    @ivar password: the password, if any (never shown).
    @ivar ca: a PEM file of the CA certificates a C{rediss} server is checked against (default:
        the system's trust store).
    """

    scheme: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca: str | None = None

    @property
    def tls(self) -> bool:
        """
        Whether the connection uses TLS.
        """
        return self.scheme == "rediss"

    def display(self) -> str:
        """
        The URL without its password, for logs and errors.
        """
        login = ""
        if self.username or self.password:
            login = f"{self.username or ''}{':***' if self.password else ''}@"
        if self.scheme == "unix":
            return f"unix://{login}{self.path}?db={self.db}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.scheme}://{login}{host}:{self.port}/{self.db}"

    def endpoint(self, reactor: Any, timeout: float) -> Any:
        """
        A client endpoint reaching the server, giving up an attempt after C{timeout} seconds.
        """
        if self.scheme == "unix":
            return UNIXClientEndpoint(reactor, self.path, timeout=timeout)
        endpoint = HostnameEndpoint(reactor, self.host, self.port, timeout=timeout)
        if not self.tls:
            return endpoint
        trust = None
        if self.ca is not None:
            try:
                with open(self.ca, "rb") as f:
                    trust = Certificate.loadPEM(f.read())
            except (OSError, ValueError) as e:
                raise _problem(f"cannot read the CA certificate {self.ca!r}: {e}") from None
        return wrapClientTLS(optionsForClientTLS(self.host, trustRoot=trust), endpoint)


def _db(text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise _problem(f"the database must be a number from 0 (got {text!r})")
    return int(text)


def parse_redis_url(url: str) -> RedisAddress:
    """
    The address a C{cluster.redis} URL names.

    @raise ConfigError: the URL is malformed or says something that would be ignored; the
        message names C{cluster.redis} and never repeats the password.
    """
    if not isinstance(url, str) or not url:
        raise _problem("must be a URL: redis://host:port/db, rediss://host:port/db or unix:///path?db=N")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise _problem(f"malformed URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("redis", "rediss", "unix"):
        raise _problem(f"the scheme must be redis://, rediss:// or unix:// (got {parts.scheme + '://' if parts.scheme else 'none'})")
    if parts.fragment:
        raise _problem("a URL fragment (#...) is not allowed")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    query = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False)
    allowed = {"unix": {"db"}, "redis": set(), "rediss": {"ca"}}[scheme]
    unknown = sorted({k for k, _ in query} - allowed)
    if unknown:
        raise _problem(f"unknown URL parameter {unknown[0]!r} (allowed: {', '.join(sorted(allowed)) or 'none'})")
    params = dict(query)
    if scheme == "unix":
        if parts.hostname or port is not None:
            raise _problem("a unix:// URL names a socket path, not a host: unix:///run/redis/redis.sock?db=0")
        if not parts.path.startswith("/") or parts.path == "/":
            raise _problem("a unix:// URL needs an absolute socket path: unix:///run/redis/redis.sock")
        return RedisAddress("unix", path=unquote(parts.path), db=_db(params.get("db", "0")), username=username, password=password)
    if not parts.hostname:
        raise _problem(f"a {scheme}:// URL needs a host: {scheme}://127.0.0.1:6379/0")
    if port == 0:
        raise _problem("the port must be 1-65535")
    path = parts.path
    if path in ("", "/"):
        db = 0
    elif path.count("/") == 1:
        db = _db(path[1:])
    else:
        raise _problem(f"the path must be the database number, as in /0 (got {path!r})")
    return RedisAddress(
        scheme,
        host=parts.hostname,
        port=port if port is not None else DEFAULT_PORT,
        db=db,
        username=username,
        password=password,
        ca=params.get("ca") or None,
    )
