"""
The admin API's defences (SPEC §4): the token only in a header (Bearer or HTTP Basic), never in a
URL or a log; Host and Origin checks against DNS rebinding and cross-site requests; frame and
Referer headers; a token needed unless the address actually bound is loopback; Unix sockets
created 0600; credentials and size checked before a body is read; malformed JSON a 400; a cap on
connections and a deadline for a request to arrive.

Most run in memory (the admin site on a StringTransport and a Clock); the listener, the socket
file and the limits also run over real sockets on 127.0.0.1 and a Unix socket.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, LoopingCall
from twisted.internet.testing import StringTransport

from wingate_map.admin._api import (
    LINGER,
    LINGER_BYTES,
    MAX_BODY,
    MAX_CONNECTIONS,
    REQUEST_TIMEOUT,
    admin_site,
    listen_admin,
    offered_token,
)
from wingate_map.config import parse_config
from wingate_map.policy import CredentialStore
from wingate_map.errors import WingateMapError
from wingate_map.service import WingateMapService

from .helpers import free_port, start_service, wait_for

TOKEN = "test-token-123"
LOCAL = IPv4Address("TCP", "127.0.0.1", 8785)
PEER = IPv4Address("TCP", "127.0.0.1", 40000)
HOST = "127.0.0.1:8785"
BEARER = f"Bearer {TOKEN}"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def make_service(token: str | None = TOKEN, clock=None, token_file: str | None = None) -> WingateMapService:
    """
    A service (not started) whose admin API is configured with C{token} (or C{token_file}),
    running on C{clock} (a new Clock by default); reload calls are recorded in C{.reloads}.
    """
    auth = f'token = "{token}"\n' if token and not token_file else ""
    if token_file:
        auth = f'token_file = "{token_file}"\n'
    text = (
        f'[admin]\nlisten = "tcp:8785:interface=127.0.0.1"\n{auth}'
        '[users.alice]\nlocations = ["10.255.0.1"]\n[mappings.web]\nport = 9\nbind = "127.0.0.1"\n'
    )
    clock = clock if clock is not None else Clock()
    service = WingateMapService(parse_config(text), reactor=clock)
    service.credentials = CredentialStore(clock, service.config.users)
    service.reloads = []
    service.reload = lambda: service.reloads.append(True) or []
    return service


class Response:
    """
    The first HTTP response in C{raw}: status, headers (lower-case name -> values), body.
    """

    def __init__(self, raw: bytes):
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0].startswith("HTTP/") else None
        self.headers: dict[str, list[str]] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers.setdefault(name.strip().lower(), []).append(value.strip())
        length = int(self.headers.get("content-length", ["0"])[0])
        self.body = rest[:length]

    def header(self, name: str) -> str | None:
        values = self.headers.get(name)
        return values[0] if values else None

    def json(self):
        return json.loads(self.body)


class Connection:
    """
    One in-memory connection to an admin site (the server end on a StringTransport).
    """

    def __init__(self, site, local=LOCAL):
        self.protocol = site.buildProtocol(PEER)
        self.transport = StringTransport(hostAddress=local, peerAddress=PEER)
        self.protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def response(self) -> Response:
        return Response(self.transport.value())

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting


def head(method: str = "GET", path: str = "/sessions", host: str | None = HOST, auth: str | None = BEARER, headers=(), version="HTTP/1.1") -> bytes:
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    if auth is not None:
        lines.append(f"Authorization: {auth}")
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def ask(site, method="GET", path="/sessions", body: bytes | None = None, local=LOCAL, headers=(), **kwargs) -> Response:
    """
    One whole request on a new in-memory connection; its response.
    """
    connection = Connection(site, local)
    if body is not None:
        headers = (*headers, ("Content-Length", str(len(body))))
    connection.send(head(method, path, headers=headers, **kwargs) + (body or b""))
    return connection.response()


# --- item 7: the token in a header only; HTTP Basic for browsers --------------------------


@pytest.mark.parametrize(
    "header, offered",
    [
        (b"Bearer abc", b"abc"),
        (b"bearer abc", b"abc"),
        (b"BEARER   abc ", b"abc"),
        (b"Basic " + base64.b64encode(b"anyone:abc"), b"abc"),
        (b"basic " + base64.b64encode(b":abc"), b"abc"),
        (b"Basic " + base64.b64encode(b"user:pa:ss"), b"pa:ss"),
        (b"Basic " + base64.b64encode(b"no-colon"), None),
        (b"Basic not base64!", None),
        (b"Digest abc", None),
        (b"Bearer", None),
        (b"", None),
        (None, None),
    ],
)
def test_offered_token(header, offered):
    """
    The token is read from "Bearer TOKEN" or from HTTP Basic's password (any user name), with
    the scheme in any case; anything else offers no token.
    """
    assert offered_token(header) == offered


def test_token_in_url_is_never_accepted():
    """
    /?token=TOKEN and /sessions?token=TOKEN are refused (401, with a message saying why), so the
    token never has to be put where logs, Referer and history keep it.
    """
    site = admin_site(make_service())
    for path in (f"/?token={TOKEN}", f"/sessions?token={TOKEN}"):
        response = ask(site, path=path, auth=None)
        assert response.status == 401
        assert "never accepted" in response.json()["error"]


def test_bearer_any_case_and_basic_with_token_as_password():
    """
    Bearer works in any case; HTTP Basic with the token as the password works with any user
    name (so a browser can open the page); a wrong token either way gets 401.
    """
    site = admin_site(make_service())
    for auth in (BEARER, f"bearer {TOKEN}", f"BEARER {TOKEN}", basic("admin", TOKEN), basic("", TOKEN), basic("x", TOKEN).replace("Basic", "basic")):
        assert ask(site, auth=auth).status == 200, auth
    for auth in (None, "Bearer wrong-token-xx", basic("admin", "wrong-token-xx"), basic(TOKEN, ""), TOKEN):
        assert ask(site, auth=auth).status == 401, auth
    page = ask(site, path="/", auth=basic("me", TOKEN))
    assert page.status == 200 and b"live activity" in page.body
    assert b"token" not in page.body.lower().replace(b"admin token as the password", b"")


def test_unauthenticated_page_gets_a_basic_challenge():
    """
    Opening the page without credentials gets 401 with a Basic challenge, so the browser asks
    for them; /healthz still needs none.
    """
    site = admin_site(make_service())
    response = ask(site, path="/", auth=None)
    assert response.status == 401
    assert any(value.startswith("Basic realm=") for value in response.headers["www-authenticate"])


def test_token_from_token_file(tmp_path):
    """
    With admin.token_file, the token is the file's first line: it opens the API (Bearer and
    Basic), and other tokens do not.
    """
    path = tmp_path / "admin.token"
    path.write_text("file-token-456\nignored second line\n")
    path.chmod(0o600)
    site = admin_site(make_service(token_file=str(path)))
    assert ask(site, auth="Bearer file-token-456").status == 200
    assert ask(site, auth=basic("ops", "file-token-456")).status == 200
    assert ask(site, auth=BEARER).status == 401
    assert ask(site, auth=None).status == 401


# --- item 8: Host and Origin; page headers ------------------------------------------------


@pytest.mark.parametrize(
    "host, status",
    [
        ("127.0.0.1:8785", 200),
        ("localhost:8785", 200),
        ("LocalHost:8785", 200),
        ("attacker.example:8785", 421),
        ("attacker.example", 421),
        ("127.0.0.1:8786", 421),
        ("127.0.0.1", 421),  # port 80 implied
        ("localhost", 421),
        ("127.0.0.2:8785", 421),
        ("[::1]:8785", 421),
        ("127.0.0.1:8785@evil", 421),
        ("", 421),
        (None, 421),
    ],
)
def test_host_must_name_the_listener(host, status):
    """
    On TCP a request is served only when its Host names the address it arrived on or localhost,
    with the listening port (DNS rebinding gets 421), whatever the path and credentials.
    """
    site = admin_site(make_service())
    response = ask(site, host=host)
    assert response.status == status
    if status == 421:
        assert "8785" in response.json()["error"]
        assert ask(site, path="/healthz", host=host, auth=None).status == 421


def test_host_without_port_on_port_80_and_ipv6():
    """
    A Host without a port means port 80; an IPv6 listener is named in brackets.
    """
    site = admin_site(make_service())
    assert ask(site, host="127.0.0.1", local=IPv4Address("TCP", "127.0.0.1", 80)).status == 200
    assert ask(site, host="[::1]:8785", local=IPv6Address("TCP", "::1", 8785)).status == 200
    assert ask(site, host="localhost:8785", local=IPv6Address("TCP", "::1", 8785)).status == 200
    assert ask(site, host="127.0.0.1:8785", local=IPv6Address("TCP", "::1", 8785)).status == 421


def test_http10_request_without_host_is_refused():
    """
    An HTTP/1.0 request without Host cannot prove where it was meant to go: 421.
    """
    site = admin_site(make_service())
    assert ask(site, host=None, version="HTTP/1.0").status == 421


def test_any_host_on_a_unix_socket():
    """
    On a Unix socket (no web page can reach one) any Host, or none, is accepted.
    """
    site = admin_site(make_service())
    unix = UNIXAddress(b"/run/wingatemap/admin.sock")
    assert ask(site, host="attacker.example:1", local=unix).status == 200
    assert ask(site, host=None, local=unix).status == 200


def test_cross_site_state_changes_are_refused():
    """
    Without a token on loopback, a cross-site POST /reload, PUT or DELETE (an Origin the Host
    check would not accept, or "null") gets 403 and changes nothing; the same request from the
    page's own origin, or without an Origin (curl, the CLI), is served.
    """
    service = make_service(token=None)
    site = admin_site(service)
    for origin in ("http://attacker.example", "http://attacker.example:8785", "null", "http://127.0.0.1:8786", "https://127.0.0.1", "file://", "http://127.0.0.1:8785/x"):
        assert ask(site, "POST", "/reload", auth=None, headers=[("Origin", origin)]).status == 403, origin
        body = json.dumps({"user": "alice", "ttl": 60}).encode()
        assert ask(site, "PUT", "/credentials/10.0.0.1", body=body, auth=None, headers=[("Origin", origin)]).status == 403
        assert ask(site, "DELETE", "/sessions/x", auth=None, headers=[("Origin", origin)]).status == 403
    assert service.reloads == [] and service.credentials.active() == {}
    # A read is no state change (and a cross-site page cannot read the answer anyway).
    assert ask(site, "GET", "/sessions", auth=None, headers=[("Origin", "http://attacker.example")]).status == 200
    for origin in ("http://127.0.0.1:8785", "http://localhost:8785", None):
        headers = [("Origin", origin)] if origin else []
        assert ask(site, "POST", "/reload", auth=None, headers=headers).status == 200
    assert len(service.reloads) == 3
    assert ask(site, "POST", "/reload", auth=None, headers=[("Origin", "http://attacker.example")], local=UNIXAddress(b"/x")).status == 200


def test_page_headers_forbid_framing_and_referer():
    """
    The page (and every answer) says X-Frame-Options: DENY, frame-ancestors 'none' and
    Referrer-Policy: no-referrer.
    """
    site = admin_site(make_service())
    for path in ("/", "/sessions"):
        response = ask(site, path=path)
        assert response.status == 200
        assert response.header("x-frame-options") == "DENY"
        assert "frame-ancestors 'none'" in response.header("content-security-policy")
        assert response.header("referrer-policy") == "no-referrer"


# --- item 11: credentials and size before the body; JSON errors are 400 -------------------


def test_unauthenticated_body_refused_before_it_is_read():
    """
    A request with a 400 MB body and no credentials gets 401 as soon as its head arrives,
    without waiting for (or storing) the body, without "100 Continue", and the connection
    closes; what the client still sends is thrown away and the request never runs.
    """
    service = make_service()
    connection = Connection(admin_site(service))
    connection.send(head("POST", "/reload", auth=None, headers=[("Content-Length", "400000000"), ("Expect", "100-continue")]))
    response = connection.response()
    assert response.status == 401 and b"100 Continue" not in connection.transport.value()
    assert response.header("connection") == "close"
    assert any(v.startswith("Basic ") for v in response.headers["www-authenticate"])
    assert connection.closing
    sent = len(connection.transport.value())
    connection.send(b"x" * 100000)
    assert len(connection.transport.value()) == sent and service.reloads == []
    request = connection.protocol.requests[-1]
    assert getattr(request, "content", None) is None


class HalfCloseTransport(StringTransport):
    """
    A StringTransport that can shut its write side, like TCP and Unix transports.
    """

    write_closed = False
    aborted = False

    def loseWriteConnection(self):
        self.write_closed = True

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()


def refused_connection(clock):
    connection = Connection(admin_site(make_service(clock=clock)))
    connection.transport = HalfCloseTransport(hostAddress=LOCAL, peerAddress=PEER)
    connection.protocol.makeConnection(connection.transport)
    connection.send(head("POST", "/reload", auth=None, headers=[("Content-Length", "400000000")]))
    assert connection.response().status == 401
    return connection


def test_refusal_lingers_so_the_client_reads_the_answer():
    """
    After refusing, the server shuts only its sending side (so the answer is not lost to a
    reset while the client is still sending), discards what still arrives, and cuts the
    connection after 2 seconds or 1 MiB, whichever comes first.
    """
    clock = Clock()
    connection = refused_connection(clock)
    assert connection.transport.write_closed and not connection.transport.disconnecting
    connection.send(b"x" * 65536)
    clock.advance(LINGER - 0.1)
    assert not connection.transport.aborted
    clock.advance(0.2)
    assert connection.transport.aborted
    connection = refused_connection(clock)
    for _ in range(LINGER_BYTES // 65536 + 1):
        connection.send(b"x" * 65536)
    assert connection.transport.aborted


def test_unauthenticated_chunked_body_refused_at_once():
    """
    A chunked body without credentials is refused as soon as the head arrives, too.
    """
    connection = Connection(admin_site(make_service()))
    connection.send(head("PUT", "/credentials/10.0.0.1", auth="Bearer wrong-token-xx", headers=[("Transfer-Encoding", "chunked")]))
    assert connection.response().status == 401 and connection.closing


def test_body_over_64k_by_content_length():
    """
    An authenticated request announcing more than 64 KiB gets 413 at once, without reading it.
    """
    service = make_service()
    connection = Connection(admin_site(service))
    connection.send(head("POST", "/reload", headers=[("Content-Length", str(MAX_BODY + 1))]))
    assert connection.response().status == 413 and connection.closing and service.reloads == []


def test_chunked_body_over_64k_refused_once_64k_arrived():
    """
    A chunked body gets 413 as soon as more than 64 KiB of it have arrived; the rest is not
    read and the request never runs.
    """
    service = make_service()
    connection = Connection(admin_site(service))
    connection.send(head("POST", "/reload", headers=[("Transfer-Encoding", "chunked")]))
    chunk = b"%x\r\n%s\r\n" % (4096, b"a" * 4096)
    for _ in range(MAX_BODY // 4096):
        connection.send(chunk)
    assert connection.transport.value() == b""
    connection.send(chunk)
    assert connection.response().status == 413 and connection.closing
    connection.send(chunk * 10 + b"0\r\n\r\n")
    assert service.reloads == []


def test_body_of_64k_is_accepted():
    """
    A body of exactly 64 KiB is read whole and used (no silent truncation).
    """
    site = admin_site(make_service())
    body = json.dumps({"user": "alice", "ttl": 60}).encode()
    body = body[:-1] + b" " * (MAX_BODY - len(body)) + b"}"
    assert len(body) == MAX_BODY
    response = ask(site, "PUT", "/credentials/10.0.0.1", body=body)
    assert response.status == 200 and response.json()["user"] == "alice"


@pytest.mark.parametrize(
    "body",
    [
        b'{"user": "alice", "ttl": ',
        b"[" * 30000 + b"]" * 30000,
        b'{"a":' * 10000 + b"1" + b"}" * 10000,
        b"\xff\xfe\xfa",
        b"1" * 5000,
        b'"user"',
        b"[]",
        b'{"user": 5, "ttl": 60}',
        b'{"user": "alice", "ttl": "60"}',
        b'{"user": "alice", "ttl": NaN}',
    ],
)
def test_bad_json_is_400_never_500(body):
    """
    Malformed, deeply nested or wrongly typed JSON gets 400 with a reason, never a 500.
    """
    assert len(body) <= MAX_BODY
    response = ask(admin_site(make_service()), "PUT", "/credentials/10.0.0.1", body=body)
    assert response.status == 400 and response.json()["error"]


# --- item 12: a deadline for each request; a cap on connections ---------------------------


def test_slow_request_is_closed_at_the_deadline():
    """
    A client sending a byte every 3 seconds (which keeps resetting an idle timeout) is answered
    408 and closed once its request has taken 10 seconds without arriving whole.
    """
    clock = Clock()
    connection = Connection(admin_site(make_service(clock=clock)))
    request = head()
    sent = 0
    while not connection.closing and sent < len(request):
        connection.send(request[sent : sent + 1])
        sent += 1
        clock.advance(3)
    assert connection.response().status == 408
    assert sent == 4  # at 0, 3, 6 and 9 seconds; closed at 10
    assert clock.seconds() == 12


def test_silent_connection_is_closed_at_the_deadline():
    """
    A connection that never sends a byte is closed after the request deadline too.
    """
    clock = Clock()
    connection = Connection(admin_site(make_service(clock=clock)))
    clock.advance(REQUEST_TIMEOUT - 0.5)
    assert not connection.closing
    clock.advance(1)
    assert connection.closing


def test_deadline_is_per_request_not_per_connection():
    """
    A kept-alive connection may wait between requests (up to the idle timeout); each request
    then has the whole deadline from its first byte.
    """
    clock = Clock()
    connection = Connection(admin_site(make_service(clock=clock)))
    connection.send(head())
    assert connection.response().status == 200
    connection.transport.clear()
    clock.advance(30)
    assert not connection.closing
    request = head()
    connection.send(request[:5])
    clock.advance(REQUEST_TIMEOUT - 1)
    connection.send(request[5:])
    assert connection.response().status == 200 and not connection.closing


def test_connections_over_the_cap_get_503():
    """
    At most 64 admin connections are served at once: the next gets 503 and is closed; once one
    closes, a new one is served.
    """
    site = admin_site(make_service())
    open_ = [Connection(site) for _ in range(MAX_CONNECTIONS)]
    extra = Connection(site)
    assert extra.response().status == 503 and extra.closing
    open_[0].protocol.connectionLost(None)
    again = Connection(site)
    again.send(head())
    assert again.response().status == 200


# --- real sockets: the listener (items 9, 10) and the limits (11, 12) ---------------------


class RawClient(Protocol):
    """
    Sends what it is told; C{closed} fires with everything received when the connection ends.
    """

    def __init__(self) -> None:
        self.data = b""
        self.closed: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.closed.callback(self.data)


def tcp_client(port: int) -> Deferred[RawClient]:
    return connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=20), RawClient())


@inlineCallbacks
def exchange(port: int, data: bytes, keep_sending: bytes | None = None, interval: float = 0.1):
    """
    Connect to 127.0.0.1:C{port}, send C{data} (then C{keep_sending} every C{interval} seconds
    until the server closes); the response, once the connection has ended.
    """
    client = yield tcp_client(port)
    client.transport.write(data)
    sender = LoopingCall(client.transport.write, keep_sending) if keep_sending else None
    if sender is not None:
        sender.start(interval)
    try:
        answer = yield client.closed.addTimeout(30, reactor)
    finally:
        if sender is not None:
            sender.stop()
    return Response(answer)


def real_service(token: str | None = TOKEN) -> WingateMapService:
    return make_service(token=token, clock=reactor)


@pytest_twisted.inlineCallbacks
def test_loopback_decided_from_the_bound_address():
    """
    Without a token, a listen string that reads as loopback but binds 0.0.0.0 (Twisted takes the
    last interface=) is refused with an error naming admin.listen and admin.token, and nothing
    stays listening; 127.0.0.1 is served.
    """
    service = real_service(token=None)
    with pytest.raises(WingateMapError) as raised:
        listen_admin(service, "tcp:0:interface=127.0.0.1:interface=0.0.0.0")
    message = str(raised.value)
    assert "admin.listen" in message and "admin.token" in message and "0.0.0.0" in message
    port = listen_admin(service, "tcp:0:interface=127.0.0.1")
    try:
        assert port.getHost().host == "127.0.0.1"
    finally:
        yield port.stopListening()


def unix_request(path: str, request: bytes) -> Deferred[bytes]:
    client = RawClient()
    d = connectProtocol(UNIXClientEndpoint(reactor, path, timeout=20), client)
    d.addCallback(lambda proto: proto.transport.write(request))
    return d.addCallback(lambda _: client.closed)


@pytest_twisted.inlineCallbacks
def test_unix_socket_created_0600(tmp_path, caplog_twisted):
    """
    A Unix-socket admin listener is created mode 0600 (Twisted's default would be 0666), a wider
    mode= is narrowed with a warning, a stricter one is kept; it answers with any Host.  A
    stale socket file is replaced, any other file at the path is left alone.
    """
    service = real_service(token=None)
    for suffix, expected in (("", 0o600), (":mode=666", 0o600), (":mode=660", 0o600), (":mode=400", 0o400)):
        path = str(tmp_path / "admin.sock")
        port = listen_admin(service, f"unix:{path}{suffix}")
        try:
            assert stat.S_IMODE(os.stat(path).st_mode) == expected, suffix
            if expected == 0o600:
                answer = yield unix_request(path, b"GET /sessions HTTP/1.1\r\nHost: anything.example\r\nConnection: close\r\n\r\n")
                assert Response(answer).status == 200
        finally:
            yield port.stopListening()
    assert any("mode=666" in line and "0600" in line for line in caplog_twisted)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "stale.sock"))
    stale.close()
    port = listen_admin(service, f"unix:{tmp_path / 'stale.sock'}:lockfile=0")
    yield port.stopListening()
    (tmp_path / "precious").write_text("data")
    with pytest.raises(WingateMapError, match="admin.listen"):
        listen_admin(service, f"unix:{tmp_path / 'precious'}:lockfile=0")
    assert (tmp_path / "precious").read_text() == "data"


@pytest_twisted.inlineCallbacks
def test_real_socket_refusals_reach_the_client():
    """
    Over a real socket: a 400 MB upload without credentials gets 401 after its head (1 KiB of
    body sent, or while the client goes on sending), a foreign Host gets 421, and the client
    reads each answer before the close.
    """
    port = listen_admin(real_service(), "tcp:0:interface=127.0.0.1")
    number = port.getHost().port
    try:
        upload = head("POST", "/reload", host=f"127.0.0.1:{number}", auth=None, headers=[("Content-Length", "400000000")])
        assert (yield exchange(number, upload + b"x" * 1024)).status == 401
        # A client that goes on sending its body still reads the answer.
        assert (yield exchange(number, upload, keep_sending=b"x" * 16384, interval=0.001)).status == 401
        assert (yield exchange(number, b"GET /healthz HTTP/1.1\r\nHost: rebound.attacker.example\r\n\r\n")).status == 421
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_real_slowloris_is_closed():
    """
    Over a real socket, a client trickling header lines (each resets the idle timeout) is
    answered 408 and closed when the request deadline (1 s here) passes.
    """
    port = listen_admin(real_service(), "tcp:0:interface=127.0.0.1", request_timeout=1.0)
    number = port.getHost().port
    try:
        started = f"GET /sessions HTTP/1.1\r\nHost: 127.0.0.1:{number}\r\n".encode()
        assert (yield exchange(number, started, keep_sending=b"X-Slow: 1\r\n")).status == 408
    finally:
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_real_connection_cap():
    """
    Over real sockets: with 64 admin connections open the next gets 503 and is closed; after one
    closes, a new connection is served.
    """
    port = listen_admin(real_service(), "tcp:0:interface=127.0.0.1", request_timeout=600)
    number = port.getHost().port
    site = port.factory
    clients = []
    try:
        for _ in range(MAX_CONNECTIONS):
            clients.append((yield tcp_client(number)))
        yield wait_for(lambda: site.open_connections == MAX_CONNECTIONS, timeout=30)
        assert (yield exchange(number, b"")).status == 503
        clients.pop().transport.loseConnection()
        yield wait_for(lambda: site.open_connections == MAX_CONNECTIONS - 1, timeout=30)
        assert (yield exchange(number, head(host=f"127.0.0.1:{number}", headers=[("Connection", "close")]))).status == 200
    finally:
        for client in clients:
            client.transport.loseConnection()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_token_never_logged(tmp_path, caplog_twisted):
    """
    Whatever a client does (Bearer, Basic, the token pasted into a URL), the token appears in no
    log line; the access log records the path without its query.
    """
    path = tmp_path / "admin.token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    service = make_service(token_file=str(path), clock=reactor)
    port = listen_admin(service, "tcp:0:interface=127.0.0.1")
    number = port.getHost().port
    try:
        for target, auth in (("/sessions", BEARER), ("/", basic("ops", TOKEN)), (f"/?token={TOKEN}", None), (f"/sessions?token={TOKEN}&x=1", None)):
            request = head("GET", target, host=f"127.0.0.1:{number}", auth=auth, headers=[("Connection", "close"), ("Referer", f"http://127.0.0.1:{number}/?token={TOKEN}")])
            assert (yield exchange(number, request)).status == (200 if auth else 401)
    finally:
        yield port.stopListening()
    text = "\n".join(caplog_twisted)
    assert '"GET /sessions HTTP/1.1" 200' in text and '"GET / HTTP/1.1" 401' in text
    assert TOKEN not in text and base64.b64encode(f"ops:{TOKEN}".encode()).decode() not in text


@pytest_twisted.inlineCallbacks
def test_service_admin_socket_is_0600(tmp_path):
    """
    A service configured with a Unix-socket admin API (no token) creates it mode 0600, so other
    local users cannot kill sessions or log users in.
    """
    path = tmp_path / "admin.sock"
    service, _ = start_service(f'[admin]\nlisten = "unix:{path}"\n[mappings.web]\nport = {free_port()}\nbind = "127.0.0.1"\n')
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        answer = yield unix_request(str(path), b"GET /sessions HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert Response(answer).status == 200
    finally:
        yield service.stopService()
