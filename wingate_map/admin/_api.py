"""
The admin API (twisted.web): live sessions, kill, Prometheus metrics, health, reload, logins for
client addresses, and a live activity page for a person with the summary it polls
(C{GET /activity.json}, built in L{wingate_map.activity}).

Authentication (SPEC §4): when a token is set, every path but C{/healthz} needs
C{Authorization: Bearer TOKEN} (scheme in any case) or HTTP Basic with the token as the password
(any user name), so that a browser can open the activity page; compared in constant time.  A
token in a URL is never accepted, and the access log records paths without their query.

Every request is checked when its head has arrived, before any of its body is read
(L{_AdminChannel}): a C{Host} naming neither the address the connection arrived on nor
C{localhost} with its port gets 421 (DNS rebinding; any Host on a Unix socket); a body without
valid credentials gets 401 and one over L{MAX_BODY} gets 413, without reading the rest.  A
state-changing request whose C{Origin} the Host check would not accept gets 403.  At most
L{MAX_CONNECTIONS} connections are served at once, and each request must arrive whole within
L{REQUEST_TIMEOUT} seconds (like nginx's C{client_header_timeout}).  L{listen_admin} opens the
listener: Unix sockets are created mode 0600, and without a token the address actually bound
must be loopback.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import json
import os
import stat
from io import BytesIO
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXServerEndpoint, serverFromString
from twisted.internet.interfaces import IAddress, IListeningPort, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, HTTPChannel
from twisted.web.iweb import IAccessLogFormatter
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import provider

from ..relay import combine_states
from ._activity import ACTIVITY_PAGE, MAX_LIMIT, ActivityQuery, merge, session_json, summarise
from ..errors import WingateMapError
from ..printable import printable

_log = Logger(namespace="wingate_map.admin")  # the name log lines carried before the module moved here

MAX_BODY = 64 * 1024
"""The largest request body accepted (bytes); a longer one gets 413 without being read."""

MAX_CONNECTIONS = 64
"""How many admin connections are served at once; more get 503 and are closed."""

REQUEST_TIMEOUT = 10.0
"""Seconds a request may take to arrive whole (head and body), counted from its first byte (or
from the connection for the first request); a slower one gets 408 and the connection closes."""

IDLE_TIMEOUT = 60.0
"""Seconds a kept-alive connection may wait, idle, for its next request."""

LINGER = 2.0
"""Seconds a refused connection stays half-open so that the client reads the answer before the
close (closing with unread request bytes would reset it and could lose the answer)."""

LINGER_BYTES = 1024 * 1024
"""Bytes of a refused request discarded while lingering before the connection is cut."""

REALM = "wingatemap admin"

_REASONS = {421: b"Misdirected Request"}  # not in twisted.web.http.RESPONSES

_CHALLENGE = (
    ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"'),
    ("WWW-Authenticate", f'Bearer realm="{REALM}"'),
)

_PAGE_HEADERS = (
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-content-type-options", b"nosniff"),
)

_PAGE_POLICY = b"default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def offered_token(authorization: bytes | None) -> bytes | None:
    """
    The token an C{Authorization} header offers: C{Bearer TOKEN}, or C{Basic} with the token as
    the password and any user name (scheme names in any case); None for anything else.
    """
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(b" ")
    scheme, value = scheme.lower(), value.strip()
    if scheme == b"bearer":
        return value or None
    if scheme == b"basic":
        try:
            decoded = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return None
        _user, colon, password = decoded.partition(b":")
        return password if colon else None
    return None


def token_matches(offered: bytes | None, token: str) -> bool:
    """
    Whether C{offered} is C{token}, in time that depends on neither (digests are compared, so
    not even the length shows).
    """
    if offered is None:
        return False
    return hmac.compare_digest(hashlib.sha256(offered).digest(), hashlib.sha256(token.encode()).digest())


def _split_authority(text: str) -> tuple[str, int | None] | None:
    """
    C{host}, C{host:port}, C{[v6]} or C{[v6]:port} as (lower-case host, port or None); None when
    malformed.
    """
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if rest and not rest.startswith(":"):
            return None
        port_text = rest[1:] if rest else None
    elif text.count(":") > 1:
        return None  # an IPv6 address must be in brackets
    else:
        host, colon, port_text_found = text.partition(":")
        port_text = port_text_found if colon else None
    if not host:
        return None
    if port_text is None or port_text == "":
        return host.lower(), None
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        return None
    return host.lower(), int(port_text)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    An address as an object (IPv4-mapped IPv6 as IPv4); None when C{text} is not one.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def authority_allowed(authority: str | None, local: IAddress, default_port: int) -> bool:
    """
    Whether a C{Host} value (or an Origin's host:port) names this listener: on TCP, the address
    the connection arrived on or C{localhost}, with its port (C{default_port} when none is
    given); on a Unix socket anything, since no web page can reach one.
    """
    if not isinstance(local, (IPv4Address, IPv6Address)):
        return True
    if authority is None:
        return False
    parsed = _split_authority(authority)
    if parsed is None:
        return False
    host, port = parsed
    if (default_port if port is None else port) != local.port:
        return False
    if host == "localhost":
        return True
    named = _ip(host)
    return named is not None and named == _ip(local.host.split("%", 1)[0])


def origin_allowed(origin: str, local: IAddress) -> bool:
    """
    Whether an C{Origin} header names a host:port that L{authority_allowed} accepts (C{null} and
    anything but http/https never do, except on a Unix socket).
    """
    if not isinstance(local, (IPv4Address, IPv6Address)):
        return True
    scheme, sep, rest = origin.partition("://")
    default_port = {"http": 80, "https": 443}.get(scheme.lower())
    if not sep or default_port is None or "/" in rest:
        return False
    return authority_allowed(rest, local, default_port)


def _is_loopback(address: IAddress) -> bool:
    """
    Whether a bound address can be reached from this host only (a Unix socket or loopback).
    """
    if isinstance(address, UNIXAddress):
        return True
    if isinstance(address, (IPv4Address, IPv6Address)):
        ip = _ip(address.host.split("%", 1)[0])
        return ip is not None and ip.is_loopback
    return False


def _printable(value: bytes | str | None) -> str:
    """
    Client-supplied text for a log line: escaped (L{printable}), quotes too.
    """
    return "-" if value is None else printable(value).replace('"', '\\"')


@provider(IAccessLogFormatter)
def access_log_line(timestamp: str, request: Any) -> str:
    """
    One access log line: like the combined format, but the path without its query string and no
    Referer, so that nothing a client put in a URL (a token pasted by mistake) reaches the log.
    """
    client = request.getClientAddress()
    ip = client.host if isinstance(client, (IPv4Address, IPv6Address)) else "-"
    return '"%s" - - %s "%s %s %s" %d %s "%s"' % (
        ip,
        timestamp,
        _printable(request.method),
        _printable(request.path),
        _printable(request.clientproto),
        request.code,
        request.sentLength or "-",
        _printable(request.getHeader(b"user-agent")),
    )


def json_body(request: Any) -> Any:
    """
    The request body as JSON (an empty body as C{{}}).

    @raise ValueError: the body is not JSON, or is nested too deeply to decode (a 400, never a
        500).
    """
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("the body is nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"the body is not valid JSON: {e}") from None


class _Json(Resource):
    isLeaf = True

    def __init__(self, service: Any) -> None:
        super().__init__()
        self.service = service

    def reply(self, request: Any, code: int, body: Any) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body).encode() + b"\n"


class _BodyReader(Protocol):
    """
    Collects a worker's answer body (at most L{_WORKER_BODY_LIMIT} bytes).

    twisted.web.client.readBody would do, but it warns (DeprecationWarning) whenever the body
    is still arriving, because the agent's transport proxy has no C{abortConnection}; a worker
    answering over a Unix socket hits that every time.  The connection is closed after each
    request anyway, so a body too large is simply refused.
    """

    def __init__(self, finished: Deferred[bytes]) -> None:
        self.finished = finished
        self.parts: list[bytes] = []
        self.size = 0

    def dataReceived(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > _WORKER_BODY_LIMIT:
            if self.transport is not None:
                self.transport.stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Any = None) -> None:
        from twisted.web.client import ResponseDone
        from twisted.web.http import PotentialDataLoss

        finished, self.finished = self.finished, None
        if finished is None:
            return
        if self.size > _WORKER_BODY_LIMIT:
            finished.errback(ValueError(f"a worker's answer is over {_WORKER_BODY_LIMIT} bytes"))
        elif reason is not None and reason.check(ResponseDone, PotentialDataLoss):
            finished.callback(b"".join(self.parts))
        else:
            finished.errback(reason)


#: The largest answer taken from a worker (its session list for /sessions is the largest).
_WORKER_BODY_LIMIT = 256 * 1024 * 1024


def _read_body(response: Any) -> Deferred[bytes]:
    """
    The whole body of a worker's C{response} (see L{_BodyReader}).
    """
    finished: Deferred[bytes] = Deferred()
    response.deliverBody(_BodyReader(finished))
    return finished


def _ask_worker(reactor: Any, socket_path: str, method: bytes, path: bytes, body: bytes | None = None) -> Deferred[tuple[int, Any]]:
    """
    One request to a worker's private admin API over its Unix socket: (status, JSON body).
    """
    from twisted.internet.endpoints import UNIXClientEndpoint
    from io import BytesIO

    from twisted.web.client import Agent, FileBodyProducer
    from zope.interface import implementer
    from twisted.web.iweb import IAgentEndpointFactory

    @implementer(IAgentEndpointFactory)
    class _ToSocket:
        def endpointForURI(self, uri: Any) -> Any:
            return UNIXClientEndpoint(reactor, socket_path, timeout=5)

    agent = Agent.usingEndpointFactory(reactor, _ToSocket())
    producer = FileBodyProducer(BytesIO(body)) if body is not None else None
    d = agent.request(method, b"http://worker" + path, None, producer)
    timer = reactor.callLater(10, d.cancel)

    def got(response: Any) -> Deferred[tuple[int, Any]]:
        return _read_body(response).addCallback(lambda body: (response.code, json.loads(body or b"null")))

    def settled(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    return d.addCallback(got).addBoth(settled)


def _ask_workers(service: Any, path: bytes, kind: type) -> Deferred[list[Any]]:
    """
    C{GET path} from every worker process: the JSON bodies of those that answered 200 with a
    C{kind} (a worker that did not answer is logged and left out).
    """
    asked = [_ask_worker(service.reactor, socket_path, b"GET", path) for socket_path in service.worker_sockets()]

    def answered(results: list[tuple[bool, Any]]) -> list[Any]:
        bodies = []
        for ok, answer in results:
            if ok and answer[0] == 200 and isinstance(answer[1], kind):
                bodies.append(answer[1])
            elif not ok:
                _log.warn("admin: a worker did not answer: {why}", why=answer.getErrorMessage())
        return bodies

    return DeferredList(asked, consumeErrors=True).addCallback(answered)


def _reply_later(resource: "_Json", request: Any, body: Deferred[Any]) -> Any:
    """
    Answer C{request} with 200 and the JSON C{body} fires with, unless the client has gone.
    """
    gone: list[bool] = []
    request.notifyFinish().addErrback(lambda _: gone.append(True))

    def send(answer: Any) -> None:
        if not gone:
            request.write(resource.reply(request, 200, answer))
            request.finish()

    body.addCallback(send).addErrback(lambda f: _log.failure("admin: cannot answer {path}", f, path=_printable(request.path)))
    return NOT_DONE_YET


class Sessions(_Json):
    """
    C{GET /sessions}, C{DELETE /sessions/ID}; with worker processes, over all of them.  With
    C{[cluster]}, C{GET /sessions?scope=cluster} lists every gateway's sessions (this one's
    live, the others' from the session directory) and a DELETE of a session that is not here
    is routed to its gateway: 200 once it confirmed, 404 if no gateway has it, 504 when no
    confirmation came in time, 503 while the cluster link is down.
    """

    def render_GET(self, request: Any) -> Any:
        if request.postpath and request.postpath != [b""]:
            return self.reply(request, 404, {"error": "no such resource"})
        now = self.service.reactor.seconds()
        own = [session_json(s, now) for s in self.service.sessions.live()]
        scope = request.args.get(b"scope", [b"node"])[-1]
        if scope not in (b"node", b"cluster"):
            return self.reply(request, 400, {"error": "scope must be node or cluster"})
        if scope == b"cluster":
            return self._cluster_sessions(request, own)
        if not self.service.worker_sockets():
            return self.reply(request, 200, own)
        combined = _ask_workers(self.service, b"/sessions", list).addCallback(lambda lists: own + [s for answer in lists for s in answer])
        return _reply_later(self, request, combined)

    def render_DELETE(self, request: Any) -> Any:
        if len(request.postpath) != 1 or not request.postpath[0]:
            return self.reply(request, 400, {"error": "DELETE /sessions/ID"})
        session_id = request.postpath[0].decode("utf-8", "replace")
        if self.service.sessions.kill(session_id):
            _log.info("admin: session {session} killed by {peer}", session=session_id, peer=_peer(request))
            return self.reply(request, 200, {"killed": session_id})
        workers = self.service.worker_sockets()
        if self.service.cluster is not None:
            return self._cluster_kill(request, session_id)
        if not workers:
            return self.reply(request, 404, {"error": f"no live session {session_id}"})
        path = b"/sessions/" + request.postpath[0]

        def next_worker(index: int) -> Deferred[None] | None:
            if index >= len(workers):
                request.write(self.reply(request, 404, {"error": f"no live session {session_id}"}))
                request.finish()
                return None

            def answered(answer: tuple[int, Any]) -> Any:
                if answer[0] == 200:
                    _log.info("admin: session {session} (worker {worker}) killed by {peer}", session=session_id, worker=index + 1, peer=_peer(request))
                    request.write(self.reply(request, 200, {"killed": session_id}))
                    request.finish()
                    return None
                return next_worker(index + 1)

            return _ask_worker(self.service.reactor, workers[index], b"DELETE", path).addCallbacks(answered, lambda f: next_worker(index + 1))

        next_worker(0)
        return NOT_DONE_YET

    def _cluster_sessions(self, request: Any, own: list[dict[str, Any]]) -> Any:
        """
        C{GET /sessions?scope=cluster}: this gateway's live sessions and the other gateways'.
        """
        store = self.service.cluster
        if store is None:
            return self.reply(request, 200, own)
        if store.state != "up":
            return self.reply(request, 503, {"error": "the cluster link is down: only this gateway's sessions are known (GET /sessions)"})

        def merged(found: list[dict[str, Any]]) -> list[dict[str, Any]]:
            # This gateway's own sessions as they are now; the others' as last published.
            return own + [s for s in found if s.get("node") != store.node]

        return self._answer_later(request, store.cluster_sessions().addCallback(lambda found: (200, merged(found))))

    def _cluster_kill(self, request: Any, session_id: str) -> Any:
        """
        C{DELETE /sessions/ID} of a session not here: asked of the other gateways.
        """
        from ..cluster import ClusterUnavailable, KillTimeout

        store = self.service.cluster
        peer = _peer(request)

        def done(killed: bool) -> tuple[int, Any]:
            if not killed:
                return 404, {"error": f"no live session {session_id} on any gateway"}
            _log.info("admin: session {session} killed on another gateway by {peer}", session=session_id, peer=peer)
            return 200, {"killed": session_id}

        def failed(failure: Failure) -> tuple[int, Any]:
            if failure.check(KillTimeout):
                return 504, {"error": str(failure.value)}
            if failure.check(ClusterUnavailable):
                return 503, {"error": f"no live session {session_id} here, and the cluster link is down: {failure.getErrorMessage()}"}
            return failure  # type: ignore[return-value]

        return self._answer_later(request, store.kill(session_id).addCallbacks(done, failed))

    def _answer_later(self, request: Any, answer: Deferred[tuple[int, Any]]) -> Any:
        """
        Answer C{request} with the (status, JSON body) C{answer} fires with, unless the client
        has gone; 500 if it fails.
        """
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def send(result: tuple[int, Any]) -> None:
            if not gone:
                request.write(self.reply(request, *result))
                request.finish()

        def failed(failure: Failure) -> None:
            _log.failure("admin: cannot answer {path}", failure, path=_printable(request.path))
            send((500, {"error": "internal error"}))

        answer.addCallbacks(send, failed)
        return NOT_DONE_YET


def _peer(request: Any) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or "a local client"


class ActivitySummary(_Json):
    """
    C{GET /activity.json}: what the activity page polls, per mapping totals (live sessions,
    accepted, refused and dropped by reason, bytes each way) and one page of the live sessions,
    sorted, filtered and paged here (see L{ActivityQuery} for the parameters; a bad one gets 400
    naming it).  With worker processes each answers for its own sessions and counters up to the
    end of the page, and the answers are merged.
    """

    def render_GET(self, request: Any) -> Any:
        if request.postpath and request.postpath != [b""]:
            return self.reply(request, 404, {"error": "no such resource"})
        service = self.service
        try:
            # The primary asks its workers for whole windows (offset + limit sessions).
            query = ActivityQuery.from_args(request.args, max_limit=MAX_LIMIT if service.worker_index == 0 else None)
        except ValueError as e:
            return self.reply(request, 400, {"error": str(e)})
        workers = service.worker_sockets()
        own = summarise(
            service.sessions.live(),
            query.window() if workers else query,
            service.reactor.seconds(),
            metrics=service.metrics,
            mappings=[mapping.name for mapping in service.config.enabled_mappings()],
        )
        if not workers:
            return self.reply(request, 200, own)

        def combine(answers: list[Any]) -> dict[str, Any]:
            summary = merge([own, *answers], query)
            summary["workers"] = {"asked": len(workers), "answered": len(answers)}
            return summary

        answers = _ask_workers(service, b"/activity.json?" + query.window().query_string(), dict)
        return _reply_later(self, request, answers.addCallback(combine))


class Destinations(_Json):
    """
    C{GET /destinations}: every destination of every list with its health (SPEC §4),
    C{{"destinations": [{"mapping", "rule", "destination", "state", "since", "live", "total",
    "last_error"}]}}.  With worker processes, each keeps its own health: the answers are
    combined (L{combine_states}: down when any process sees it down, counts added up).
    """

    def render_GET(self, request: Any) -> Any:
        if request.postpath and request.postpath != [b""]:
            return self.reply(request, 404, {"error": "no such resource"})
        own = self.service.destination_states()
        if not self.service.worker_sockets():
            return self.reply(request, 200, {"destinations": own})
        answers = _ask_workers(self.service, b"/destinations", dict)
        return _reply_later(self, request, answers.addCallback(lambda found: {"destinations": combine_states([own] + [a.get("destinations", []) for a in found])}))


class Metrics(Resource):
    """
    C{GET /metrics}: Prometheus text format.
    """

    isLeaf = True

    def __init__(self, service: Any) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        # With worker processes the primary asks each of them first (metrics.exposition).
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def send(body: bytes) -> None:
            if not gone:
                request.write(body)
                request.finish()

        def failed(failure: Failure) -> None:
            _log.failure("admin: cannot answer /metrics", failure)
            if not gone:
                request.setResponseCode(500)
                request.finish()

        self.service.metrics.exposition().addCallbacks(send, failed)
        return NOT_DONE_YET


class Health(_Json):
    """
    C{GET /healthz}: no authentication; what the service's C{health()} says (200 ok, 503
    failing with the problems, 503 draining).
    """

    def render_GET(self, request: Any) -> bytes:
        code, body = self.service.health()
        return self.reply(request, code, body)


class Reload(_Json):
    """
    C{POST /reload}.
    """

    def render_POST(self, request: Any) -> bytes:
        problems = self.service.reload()
        if problems:
            return self.reply(request, 400, {"reloaded": False, "errors": problems})
        return self.reply(request, 200, {"reloaded": True})


class Credentials(_Json):
    """
    C{PUT /credentials/CLIENT_IP} with C{{"user": ..., "ttl": seconds}};
    C{DELETE /credentials/CLIENT_IP}; C{GET /credentials} lists them.
    """

    def _ip(self, request: Any) -> str | None:
        if len(request.postpath) != 1 or not request.postpath[0]:
            return None
        return request.postpath[0].decode("utf-8", "replace")

    def render_GET(self, request: Any) -> bytes:
        now = self.service.reactor.seconds()
        entries = self.service.credentials.active()
        return self.reply(request, 200, [{"client_ip": ip, "user": user, "expires_in": round(exp - now, 3)} for ip, (user, exp) in entries.items()])

    def render_PUT(self, request: Any) -> bytes:
        client_ip = self._ip(request)
        if client_ip is None:
            return self.reply(request, 400, {"error": "PUT /credentials/CLIENT_IP"})
        try:
            body = json_body(request)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            user, ttl = body.get("user"), body.get("ttl")
            if not isinstance(user, str):
                raise ValueError('"user" is required (a user name from [users])')
            self.service.credentials.login(client_ip, user, ttl)
        except ValueError as e:
            return self.reply(request, 400, {"error": str(e)})
        _log.info("admin: {client_ip} logged in as {user} for {ttl}s", client_ip=client_ip, user=user, ttl=ttl)
        return self.reply(request, 200, {"client_ip": self.service.credentials.key(client_ip), "user": user, "ttl": ttl})

    def render_DELETE(self, request: Any) -> bytes:
        client_ip = self._ip(request)
        if client_ip is None:
            return self.reply(request, 400, {"error": "DELETE /credentials/CLIENT_IP"})
        try:
            found = self.service.credentials.logout(client_ip)
        except ValueError as e:
            return self.reply(request, 400, {"error": str(e)})
        if not found:
            return self.reply(request, 404, {"error": f"no login for {client_ip}"})
        _log.info("admin: {client_ip} logged out", client_ip=client_ip)
        return self.reply(request, 200, {"logged_out": client_ip})


class Activity(Resource):
    """
    C{GET /}: the live activity page (it may not be framed; its own API calls carry the
    browser's Basic credentials, never a token in a URL).
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        if request.postpath and request.postpath != [b""]:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", _PAGE_POLICY)
        return ACTIVITY_PAGE


_UNAUTHORISED = "missing or wrong token: send Authorization: Bearer TOKEN, or HTTP Basic with the token as the password"


class AdminRoot(Resource):
    """
    Routes every admin request: authentication (all but C{/healthz}), then the Origin check
    for state-changing methods, then the resource.
    """

    def __init__(self, service: Any) -> None:
        super().__init__()
        self.service = service
        self.children_by_name = {
            b"sessions": Sessions(service),
            b"activity.json": ActivitySummary(service),
            b"destinations": Destinations(service),
            b"metrics": Metrics(service),
            b"healthz": Health(service),
            b"reload": Reload(service),
            b"credentials": Credentials(service),
            b"": Activity(),
        }

    def getChild(self, name: bytes, request: Any) -> Resource:
        if name != b"healthz" and not authorised(self.service, request):
            if b"token" in request.args:
                return _Error(401, "a token in a URL is never accepted (it would be logged and leak through Referer and history); " + _UNAUTHORISED, challenge=True)
            return _Error(401, _UNAUTHORISED, challenge=True)
        if request.method not in (b"GET", b"HEAD", b"OPTIONS"):
            origin = request.getHeader(b"origin")
            if origin is not None and not origin_allowed(origin.decode("latin-1"), request.getHost()):
                _log.warn("admin: refused a cross-site {method} from {peer} (Origin {origin})", method=_printable(request.method), peer=_peer(request), origin=_printable(origin))
                return _Error(403, "cross-site request refused: the Origin names another site")
        child = self.children_by_name.get(name)
        if child is None:
            return _Error(404, "no such resource")
        return child

    def render(self, request: Any) -> bytes:
        return self.getChild(b"", request).render(request)


def authorised(service: Any, request: Any) -> bool:
    """
    Whether C{request} may use the admin API: no token is set, or its C{Authorization} header
    offers the token (Bearer or Basic).
    """
    token = service.admin_token
    return token is None or token_matches(offered_token(request.getHeader(b"authorization")), token)


class _Error(Resource):
    isLeaf = True

    def __init__(self, code: int, message: str, challenge: bool = False) -> None:
        super().__init__()
        self.code = code
        self.message = message
        self.challenge = challenge

    def render(self, request: Any) -> bytes:
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        if self.challenge:
            for name, value in _CHALLENGE:
                request.responseHeaders.addRawHeader(name, value)
        return json.dumps({"error": self.message}).encode() + b"\n"


def _check_head(request: "_AdminRequest", length: int | None) -> tuple[int, str, tuple[tuple[str, str], ...]] | None:
    """
    What to answer a request whose head has arrived, before any of its body is read: None to go
    on, or (status, message, extra headers) to refuse it.
    """
    local = request.getHost()
    hosts = request.requestHeaders.getRawHeaders(b"host") or []
    if len(hosts) > 1:
        return 400, "more than one Host header", ()
    host = hosts[0].decode("latin-1") if hosts else None
    if not authority_allowed(host, local, 443 if request.isSecure() else 80):
        port = getattr(local, "port", "")
        return 421, f"Host must name this listener (its address or localhost, with port {port})", ()
    has_body = length is None or length > 0
    if has_body and not authorised(request.channel.site.service, request):
        return 401, _UNAUTHORISED, _CHALLENGE
    if length is not None and length > MAX_BODY:
        return 413, f"the body is over {MAX_BODY} bytes", ()
    return None


class _AdminRequest(Request):
    """
    A request whose body is kept in memory and bounded by L{MAX_BODY} as it arrives (a chunked
    body too), and whose every answer forbids framing and Referer.
    """

    _received = 0

    def gotLength(self, length: int | None) -> None:
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        self._received += len(data)
        if self._received > MAX_BODY:
            if self.channel is not None:
                self.channel.refuse(413, f"the body is over {MAX_BODY} bytes")
            return
        super().handleContentChunk(data)

    def process(self) -> None:
        for name, value in _PAGE_HEADERS:
            self.setHeader(name, value)
        self.setHeader(b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
        super().process()


class _AdminChannel(HTTPChannel):
    """
    HTTP/1.1 for the admin API: each request's head is checked before its body is read
    (L{_check_head}); a refused request gets its answer and the connection is closed without
    reading the rest; a request that does not arrive whole within the site's C{request_timeout}
    gets 408.
    """

    site: "AdminSite"
    _refused = False
    _busy = False
    _deadline: Any = None
    _linger: Any = None
    _discarded = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self._start_deadline()

    def _start_deadline(self) -> None:
        if self._deadline is None and not self._refused:
            self._deadline = self.callLater(self.site.request_timeout, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        self.refuse(408, f"the request did not arrive within {self.site.request_timeout:g}s")

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            self._discarded += len(data)
            if self._discarded > LINGER_BYTES:
                self.transport.abortConnection()
            return
        if not self._busy:
            self._start_deadline()
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if not self._refused:
            super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._refused:
            super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        refusal = _check_head(self.requests[-1], self.length)
        if refusal is not None:
            self.refuse(*refusal)
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._cancel_deadline()
        self._busy = True
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        self._busy = False
        super().requestDone(request)

    def refuse(self, code: int, message: str, headers: tuple[tuple[str, str], ...] = ()) -> None:
        """
        Answer the request being received with C{code} and close the connection, reading no
        more of it: the answer is sent, our side is shut, and whatever the client still sends
        is discarded until it closes (at most L{LINGER} seconds and L{LINGER_BYTES}).
        """
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        self.setTimeout(None)
        _log.info("admin: answered {code} to {peer} and closed the connection: {reason}", code=code, peer=_address_text(self.transport.getPeer()), reason=message)
        body = json.dumps({"error": message}).encode() + b"\n"
        head = [
            b"HTTP/1.1 %d %s" % (code, _REASONS.get(code) or RESPONSES.get(code, b"Error")),
            b"Content-Type: application/json",
            b"Cache-Control: no-store",
            b"Connection: close",
            b"Content-Length: %d" % len(body),
        ]
        head.extend(f"{name}: {value}".encode() for name, value in headers)
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self._linger = self.callLater(LINGER, self.transport.abortConnection)
        if ISSLTransport.providedBy(self.transport) or not hasattr(self.transport, "loseWriteConnection"):
            self.transport.loseConnection()
        else:
            self.transport.loseWriteConnection()

    def connectionLost(self, reason: Any) -> None:
        self._cancel_deadline()
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self.site.channel_closed()
        super().connectionLost(reason)


class _Overloaded(Protocol):
    """
    The answer to a connection over L{MAX_CONNECTIONS}: 503, then close.
    """

    def connectionMade(self) -> None:
        body = b'{"error": "too many admin connections"}\n'
        self.transport.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.transport.loseConnection()


class AdminSite(Site):
    """
    The twisted.web site of the admin API: at most C{max_connections} connections at once
    (more get 503), C{request_timeout} seconds for a request to arrive whole, C{idle_timeout}
    seconds for a kept-alive connection between requests.
    """

    protocol = _AdminChannel
    requestFactory = _AdminRequest
    noisy = False
    displayTracebacks = False

    def __init__(self, service: Any, *, max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT) -> None:
        # Bodies are JSON, never forms: nothing parses a form body into request.args.
        super().__init__(AdminRoot(service), parsePOSTFormSubmission=False, timeout=idle_timeout, logFormatter=access_log_line, reactor=service.reactor)
        self.service = service
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.open_connections = 0
        self._full = False

    def buildProtocol(self, addr: IAddress) -> Any:
        if self.open_connections >= self.max_connections:
            if not self._full:
                self._full = True
                _log.warn("admin: {limit} connections open; refusing more until some close", limit=self.max_connections)
            return _Overloaded()
        self.open_connections += 1
        return super().buildProtocol(addr)

    def channel_closed(self) -> None:
        """
        One of this site's connections closed.
        """
        self.open_connections -= 1
        if self.open_connections < self.max_connections:
            self._full = False


def admin_site(service: Any, **limits: Any) -> AdminSite:
    """
    The twisted.web site of the admin API (C{limits}: see L{AdminSite}).
    """
    return AdminSite(service, **limits)


def _address_text(address: IAddress) -> str:
    if isinstance(address, (IPv4Address, IPv6Address)):
        return f"{address.host}:{address.port}"
    return "a local client"


def _endpoint_fields(description: str) -> tuple[list[str], dict[str, str]]:
    """
    A server endpoint string split the way Twisted splits it: positional arguments and
    keywords (a backslash escapes the next character).
    """
    fields: list[list[str]] = [[""]]
    chars = iter(description)
    for char in chars:
        if char == "\\":
            fields[-1][-1] += next(chars, "")
        elif char == ":":
            fields.append([""])
        elif char == "=":
            fields[-1].append("")
        else:
            fields[-1][-1] += char
    args = [field[0] for field in fields if len(field) == 1]
    kwargs = {field[0]: "=".join(field[1:]) for field in fields if len(field) > 1}
    return args, kwargs


def _unix_endpoint(reactor: Any, description: str) -> tuple[UNIXServerEndpoint, str]:
    """
    The endpoint of a C{unix:} admin listener, created mode 0600 (or the stricter mode given;
    permissions beyond the owner's are dropped, with a warning), and its path.
    """
    args, kwargs = _endpoint_fields(description)
    path = kwargs.get("address") or (args[1] if len(args) > 1 else "")
    requested = int(kwargs.get("mode", "600"), 8)
    mode = requested & 0o600
    if mode != requested:
        _log.warn("admin.listen: mode={requested} would let other users reach the admin API; the socket is created mode {mode}", requested=f"{requested:o}", mode=f"{mode:04o}")
    backlog = int(kwargs.get("backlog", "50"))
    want_pid = bool(int(kwargs.get("lockfile", "1")))
    return UNIXServerEndpoint(reactor, path, backlog=backlog, mode=mode, wantPID=want_pid), path


def listen_admin(service: Any, description: str, **limits: Any) -> IListeningPort:
    """
    Start the admin API listening as C{description} (a server endpoint string) says, at once.

    A C{unix:} socket is created mode 0600 (a stale socket file at its path is removed first).
    Without a token the address actually bound must be loopback: a description that reads as
    loopback but binds elsewhere is closed again and refused.

    @param limits: passed to L{AdminSite} (tests use short timeouts).
    @raise WingateMapError: it could not listen, or would serve a non-loopback address without
        a token; the message names C{admin.listen}.
    """
    reactor = service.reactor
    if description.startswith("unix:"):
        endpoint, path = _unix_endpoint(reactor, description)
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # left by a process that died
        except OSError:
            pass
    else:
        endpoint = serverFromString(reactor, description)
    results: list[Any] = []
    endpoint.listen(admin_site(service, **limits)).addBoth(results.append)
    if not results or isinstance(results[0], Failure):
        why = results[0].getErrorMessage() if results else "did not listen synchronously"
        raise WingateMapError(f"admin.listen: cannot listen on {description}: {why}")
    port: IListeningPort = results[0]
    bound = port.getHost()
    if service.admin_token is None and not _is_loopback(bound):
        port.stopListening()
        raise WingateMapError(
            f"admin.listen: {description} is bound to {_address_text(bound)}, which is not a loopback address, and no "
            "admin.token (or admin.token_file) is set: anyone who can reach it could kill sessions and log users in"
        )
    if service.worker_index == 0:
        _log.info("admin API listening on {listen} ({address}){auth}", listen=description, address=_address_text(bound) if not isinstance(bound, UNIXAddress) else "unix socket", auth="" if service.admin_token else " (no token: reachable from this host only)")
    return port
