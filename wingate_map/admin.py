"""
The admin API (twisted.web): live sessions, kill, Prometheus metrics, health, reload, logins for
client addresses, and a live activity page for a person.

Every path but C{/healthz} needs C{Authorization: Bearer TOKEN} when a token is configured
(compared in constant time).  The activity page at C{/} may instead be opened as
C{/?token=TOKEN}: a browser cannot send the header on navigation; the page then sends the
header itself on every API call.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from .activity import ACTIVITY_PAGE

_log = Logger()


def _session_json(session: Any, now: float) -> dict[str, Any]:
    fields = session.fields("ClientConnect", session.started)
    del fields["event"]
    fields["bytes_from_client"] = session.bytes_from_client
    fields["bytes_to_client"] = session.bytes_to_client
    fields["duration"] = round(max(0.0, now - session.started), 3)
    return fields


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


def _ask_worker(reactor: Any, socket_path: str, method: bytes, path: bytes, body: bytes | None = None) -> Deferred[tuple[int, Any]]:
    """
    One request to a worker's private admin API over its Unix socket: (status, JSON body).
    """
    from twisted.internet.endpoints import UNIXClientEndpoint
    from io import BytesIO

    from twisted.web.client import Agent, FileBodyProducer, readBody
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
        return readBody(response).addCallback(lambda body: (response.code, json.loads(body or b"null")))

    def settled(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    return d.addCallback(got).addBoth(settled)


class Sessions(_Json):
    """
    C{GET /sessions}, C{DELETE /sessions/ID}; with worker processes, over all of them.
    """

    def render_GET(self, request: Any) -> Any:
        if request.postpath and request.postpath != [b""]:
            return self.reply(request, 404, {"error": "no such resource"})
        now = self.service.reactor.seconds()
        own = [_session_json(s, now) for s in self.service.sessions.live()]
        workers = self.service.worker_sockets()
        if not workers:
            return self.reply(request, 200, own)
        asked = [_ask_worker(self.service.reactor, path, b"GET", b"/sessions") for path in workers]

        def combine(results: list[tuple[bool, Any]]) -> None:
            combined = list(own)
            for ok, answer in results:
                if ok and answer[0] == 200 and isinstance(answer[1], list):
                    combined.extend(answer[1])
                elif not ok:
                    _log.warn("admin: a worker did not answer: {why}", why=answer.getErrorMessage())
            request.write(self.reply(request, 200, combined))
            request.finish()

        DeferredList(asked, consumeErrors=True).addCallback(combine)
        return NOT_DONE_YET

    def render_DELETE(self, request: Any) -> Any:
        if len(request.postpath) != 1 or not request.postpath[0]:
            return self.reply(request, 400, {"error": "DELETE /sessions/ID"})
        session_id = request.postpath[0].decode("utf-8", "replace")
        if self.service.sessions.kill(session_id):
            _log.info("admin: session {session} killed by {peer}", session=session_id, peer=_peer(request))
            return self.reply(request, 200, {"killed": session_id})
        workers = self.service.worker_sockets()
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


def _peer(request: Any) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", None) or "a local client"


class Metrics(Resource):
    """
    C{GET /metrics}: Prometheus text format.
    """

    isLeaf = True

    def __init__(self, service: Any) -> None:
        super().__init__()
        self.service = service

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.service.metrics.render()


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
            body = json.loads(request.content.read(65536) or b"{}")
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
    C{GET /}: the live activity page.
    """

    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        if request.postpath and request.postpath != [b""]:
            request.setResponseCode(404)
            return b"not found\n"
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-security-policy", b"default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'")
        return ACTIVITY_PAGE


class AdminRoot(Resource):
    """
    Routes and authenticates every admin request.
    """

    def __init__(self, service: Any) -> None:
        super().__init__()
        self.service = service
        self.children_by_name = {
            b"sessions": Sessions(service),
            b"metrics": Metrics(service),
            b"healthz": Health(service),
            b"reload": Reload(service),
            b"credentials": Credentials(service),
            b"": Activity(),
        }

    def _authorised(self, request: Any, allow_query: bool) -> bool:
        token = self.service.admin_token
        if token is None:
            return True
        offered = b""
        header = request.getHeader(b"authorization") or ""
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if header.startswith("Bearer "):
            offered = header[len("Bearer ") :].strip().encode()
        elif allow_query:
            offered = (request.args.get(b"token") or [b""])[0]
        return hmac.compare_digest(offered, token.encode())

    def getChild(self, name: bytes, request: Any) -> Resource:
        child = self.children_by_name.get(name)
        if child is None:
            return _Error(404, "no such resource")
        if name != b"healthz" and not self._authorised(request, allow_query=name == b""):
            return _Error(401, "missing or wrong bearer token", challenge=True)
        return child

    def render(self, request: Any) -> bytes:
        return self.getChild(b"", request).render(request)


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
        if self.challenge:
            request.setHeader(b"www-authenticate", b'Bearer realm="wingatemap"')
        return json.dumps({"error": self.message}).encode() + b"\n"


def admin_site(service: Any) -> Site:
    """
    The twisted.web site of the admin API.
    """
    site = Site(AdminRoot(service))
    site.noisy = False
    site.displayTracebacks = False
    return site
