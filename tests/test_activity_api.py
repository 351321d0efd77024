"""
C{GET /activity.json}, what the activity page polls: per-mapping totals (live sessions,
accepted, refused and dropped by reason, bytes each way) and one page of the live sessions,
sorted, filtered and paged by the server, so that 10,000 sessions make a small answer.

In memory: a service that is not started, its session registry filled with sessions, and the
admin resource called with twisted.web's DummyRequest; the worker case runs a second service's
admin API on a real Unix socket, as a worker process would.
"""

from __future__ import annotations

import json
import time

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.web.resource import getChildForRequest
from twisted.web.test.requesthelper import DummyRequest

from wingate_map.admin._activity import DEFAULT_LIMIT, MAX_LIMIT
from wingate_map.admin._api import AdminRoot, admin_site, listen_admin
from wingate_map.config import parse_config
from wingate_map.service import WingateMapService
from wingate_map.sessions import Session

from .test_admin_security import Connection, head
from .test_admin_security import make_service as make_service_with_token

START = 1_800_000_000.0

CONFIG = """
[mappings.web]
port = 9
bind = "127.0.0.1"
[mappings.db]
port = 10
bind = "127.0.0.1"
[mappings.idle]
port = 11
bind = "127.0.0.1"
"""


def make_service(clock=None) -> WingateMapService:
    """
    A service (not started) with mappings web, db and idle, on C{clock} (a Clock at START by
    default).
    """
    if clock is None:
        clock = Clock()
        clock.advance(START)
    return WingateMapService(parse_config(CONFIG), reactor=clock)


def add(service, client_ip="10.0.0.1", mapping="web", user="alice", age=0.0, up=0, down=0, port=40000) -> Session:
    """
    A live session of C{mapping} from C{client_ip}, started C{age} seconds ago, with C{up} bytes
    from the client and C{down} to it.
    """
    session = Session(
        id=service.sessions.new_id(),
        mapping=mapping,
        client_ip=client_ip,
        client_port=port,
        local_ip="127.0.0.1",
        local_port=9,
        started=service.reactor.seconds() - age,
        user=user,
        identity="assumed" if user else None,
        destination="127.0.0.1:80",
        rule="default",
    )
    session.bytes_from_client, session.bytes_to_client = up, down
    service.sessions.add(session)
    service.metrics.client_connect(session.connect_event(session.started))
    return session


def end(service, session: Session, reason: str) -> None:
    """
    C{session} ends with C{reason}: its ClientDisconnect reaches the metrics, and it leaves
    the registry.
    """
    session.reason = reason
    service.metrics.client_disconnect(session.disconnect_event(service.reactor.seconds()))
    service.sessions.remove(session)


def request(path: str = "activity.json", **args: str) -> DummyRequest:
    """
    A GET of C{/path} with these query arguments.
    """
    req = DummyRequest([part.encode() for part in path.split("/")])
    req.args = {name.encode(): [value.encode()] for name, value in args.items()}
    return req


def get(service, path: str = "activity.json", **args: str) -> tuple[int, object, int]:
    """
    Answer C{GET /path?args} in memory: (status, JSON body, body size in bytes).
    """
    req = request(path, **args)
    body = getChildForRequest(AdminRoot(service), req).render(req)
    return req.responseCode or 200, json.loads(body), len(body)


def ids(answer) -> list[str]:
    """
    The session ids of an answer's page, in order.
    """
    return [s["session"] for s in answer["sessions"]]


def test_totals_per_mapping():
    """
    Each mapping's totals count its live sessions, the sessions accepted and refused (by
    reason), the connections dropped before they became sessions (by reason), and the bytes
    each way of ended and live sessions; a configured mapping without traffic is listed at zero;
    the filters choose the sessions listed, never the totals.
    """
    service = make_service()
    add(service, "10.0.0.1", up=100, down=200)
    add(service, "10.0.0.2", up=1000, down=2000)
    add(service, "10.0.0.3", mapping="db", up=1, down=2)
    end(service, add(service, "10.0.0.4", up=5, down=7), "killed")
    end(service, add(service, "10.0.0.5"), "limit")
    end(service, add(service, "10.0.0.5"), "limit")
    end(service, add(service, "10.0.0.6"), "no-destination")
    service.metrics.not_a_session("web", "tls-failed")
    status, answer, _ = get(service)
    assert status == 200
    assert answer["live"] == 3 and answer["total"] == 3
    assert answer["mappings"] == [
        {
            "mapping": "db",
            "live": 1,
            "accepted": 1,
            "refused": {},
            "dropped": {},
            "bytes_from_client": 1,
            "bytes_to_client": 2,
            "live_bytes_from_client": 1,
            "live_bytes_to_client": 2,
        },
        {
            "mapping": "idle",
            "live": 0,
            "accepted": 0,
            "refused": {},
            "dropped": {},
            "bytes_from_client": 0,
            "bytes_to_client": 0,
            "live_bytes_from_client": 0,
            "live_bytes_to_client": 0,
        },
        {
            "mapping": "web",
            "live": 2,
            "accepted": 6,
            "refused": {"limit": 2, "no-destination": 1},
            "dropped": {"tls-failed": 1},
            "bytes_from_client": 1105,
            "bytes_to_client": 2207,
            "live_bytes_from_client": 1100,
            "live_bytes_to_client": 2200,
        },
    ]
    status, filtered, _ = get(service, mapping="db")
    assert filtered["total"] == 1 and filtered["mappings"] == answer["mappings"]


def test_sorting():
    """
    Sessions sort by duration and bytes (largest first unless order=asc), and by client
    (addresses in numeric order, IPv4 before IPv6), user (any case) and mapping (then client),
    smallest first unless order=desc.
    """
    service = make_service()
    a = add(service, "127.0.0.10", user="bob", age=30, up=5, down=5, mapping="web")
    b = add(service, "127.0.0.9", user="Alice", age=10, up=500, down=0, mapping="web")
    c = add(service, "::1", user=None, age=20, up=0, down=50, mapping="db")
    d = add(service, "10.0.0.2", user="carol", age=5, up=1, down=1, mapping="db")
    expected = {
        "duration": [a, c, b, d],
        "bytes": [b, c, a, d],
        "client": [d, b, a, c],
        "user": [c, b, a, d],
        "mapping": [d, c, b, a],
    }
    for sort, order in expected.items():
        status, answer, _ = get(service, sort=sort)
        assert status == 200, answer
        assert ids(answer) == [s.id for s in order], sort
        flipped = "asc" if answer["query"]["order"] == "desc" else "desc"
        assert ids(get(service, sort=sort, order=flipped)[1]) == [s.id for s in reversed(order)], sort
    assert get(service)[1]["query"]["sort"] == "duration"


def test_filters():
    """
    The mapping filter takes an exact name, the client filter any part of the address (a
    prefix such as 10.1. too), the user filter any part of the name in any case; combined, a
    session must pass all of them; C{total} counts the sessions that pass.
    """
    service = make_service()
    a = add(service, "10.1.0.1", user="alice", mapping="web")
    b = add(service, "10.1.0.2", user="Malice", mapping="db")
    c = add(service, "10.10.0.3", user="bob", mapping="web")
    d = add(service, "192.168.10.1", user=None, mapping="web")

    def listed(**args):
        answer = get(service, sort="client", **args)[1]
        assert answer["total"] == len(answer["sessions"])
        return set(ids(answer))

    assert listed(mapping="web") == {a.id, c.id, d.id}
    assert listed(mapping="we") == set()
    assert listed(client="10.1.") == {a.id, b.id}
    assert listed(client="10.1") == {a.id, b.id, c.id, d.id}
    assert listed(client=".0.3") == {c.id}
    assert listed(user="ALICE") == {a.id, b.id}
    assert listed(user="alice", mapping="web") == {a.id}
    assert listed(user="alice", client="10.1.0.2") == {b.id}
    assert listed(client=" 10.10. ") == {c.id}


def test_paging_10000_sessions():
    """
    With 10,000 live sessions a poll answers one page (50 sessions by default, a few tens of
    KB, where C{GET /sessions} is megabytes); walking the pages shows every session exactly
    once in the sorted order, the last page is short, and a page past the end is empty.  The
    time to build one answer is printed (tests never assert speed).
    """
    service = make_service()
    for i in range(10_000):
        add(service, f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", user=f"user{i % 97}", age=i * 0.5, up=i, down=2 * i, mapping=("web", "db")[i % 2])
    began = time.perf_counter()
    status, first, size = get(service)
    took = time.perf_counter() - began
    assert status == 200
    assert first["live"] == first["total"] == 10_000 and len(first["sessions"]) == DEFAULT_LIMIT
    assert size < 64 * 1024
    listing = request("sessions")
    whole = getChildForRequest(AdminRoot(service), listing).render(listing)
    assert len(whole) > 3_000_000
    seen: list[str] = []
    for offset in range(0, 10_000, MAX_LIMIT):
        page = get(service, sort="bytes", limit=str(MAX_LIMIT), offset=str(offset))[1]
        assert page["total"] == 10_000 and len(page["sessions"]) == MAX_LIMIT
        seen += ids(page)
    assert len(set(seen)) == 10_000
    assert seen == [s.id for s in reversed(service.sessions.live())]  # most bytes first
    last = get(service, limit="300", offset="9900")[1]
    assert len(last["sessions"]) == 100 and last["total"] == 10_000
    assert get(service, offset="10000")[1]["sessions"] == []
    began = time.perf_counter()
    for _ in range(10):
        get(service, sort="client", client="10.0.", user="user1")
    print(f"\nactivity.json with 10,000 sessions: {took * 1000:.1f} ms (default page), {(time.perf_counter() - began) * 100:.1f} ms (sorted by client, filtered)")


def test_bad_parameters():
    """
    A bad or unknown parameter gets 400 with a message that starts with its name.
    """
    service = make_service()
    for args, name in [
        ({"sort": "size"}, "sort"),
        ({"order": "up"}, "order"),
        ({"limit": "0"}, "limit"),
        ({"limit": str(MAX_LIMIT + 1)}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"offset": "-1"}, "offset"),
        ({"sortby": "bytes"}, "sortby"),
    ]:
        status, answer, _ = get(service, **args)
        assert status == 400, args
        assert answer["error"].startswith(name + ": "), answer
    req = request()
    req.args = {b"limit": [b"1", b"2"]}
    getChildForRequest(AdminRoot(service), req).render(req)
    assert req.responseCode == 400
    status, answer, _ = get(service, "activity.json/more")
    assert status == 404


def test_needs_the_token():
    """
    Like every path but /healthz, the summary needs the token.
    """
    site = admin_site(make_service_with_token())
    anonymous = Connection(site)
    anonymous.send(head(path="/activity.json", auth=None) + b"\r\n")
    assert anonymous.response().status == 401
    operator = Connection(site)
    operator.send(head(path="/activity.json?sort=client&limit=5") + b"\r\n")
    answer = operator.response()
    assert answer.status == 200 and answer.json()["query"]["limit"] == 5


@pytest_twisted.inlineCallbacks
def test_workers_answers_are_merged(tmp_path):
    """
    With worker processes the primary asks each worker for its sessions up to the end of the
    page (however deep), merges them in the sort order and cuts the page; totals and counts add
    up.  A worker that does not answer is left out, and the answer says how many answered.
    """
    primary = WingateMapService(parse_config(CONFIG), reactor=reactor)
    worker = WingateMapService(parse_config(CONFIG), reactor=reactor)
    worker.worker_index = 1  # a worker's private API: no token, no limit on a window
    path = str(tmp_path / "worker-1.sock")
    port = listen_admin(worker, f"unix:{path}")
    try:
        mine = [add(primary, f"10.0.0.{i}", up=10) for i in (1, 4)]
        theirs = [add(worker, f"10.0.0.{i}", up=1) for i in (2, 3, 5)]
        end(worker, add(worker, "10.0.0.9"), "limit")
        primary.worker_sockets = lambda: [path]
        req = request(sort="client", limit="2", offset="2")
        getChildForRequest(AdminRoot(primary), req).render(req)
        yield req.notifyFinish()
        answer = json.loads(b"".join(req.written))
        assert ids(answer) == [theirs[1].id, mine[1].id]  # 10.0.0.3 and 10.0.0.4
        assert answer["total"] == answer["live"] == 5
        assert answer["workers"] == {"asked": 1, "answered": 1}
        [web] = [m for m in answer["mappings"] if m["mapping"] == "web"]
        assert (web["live"], web["accepted"], web["refused"], web["bytes_from_client"]) == (5, 6, {"limit": 1}, 23)
        primary.worker_sockets = lambda: [path, str(tmp_path / "gone.sock")]
        req = request(sort="client")
        getChildForRequest(AdminRoot(primary), req).render(req)
        yield req.notifyFinish()
        answer = json.loads(b"".join(req.written))
        assert answer["workers"] == {"asked": 2, "answered": 1} and answer["total"] == 5
        # A deep page: the worker is asked for more than MAX_LIMIT sessions, and gives them.
        primary.worker_sockets = lambda: [path]
        req = request(sort="client", limit=str(MAX_LIMIT), offset="3")
        getChildForRequest(AdminRoot(primary), req).render(req)
        yield req.notifyFinish()
        answer = json.loads(b"".join(req.written))
        assert answer["workers"] == {"asked": 1, "answered": 1}
        assert ids(answer) == [mine[1].id, theirs[2].id]  # 10.0.0.4 and 10.0.0.5
    finally:
        yield port.stopListening()
