"""
The event path of every connection, kept cheap without losing anything: one event dict shared
by the built-in sinks (a copy for anybody else's), ClientConnect / ClientDisconnect log lines
not emitted when the service's own log would drop them and written byte for byte as twistd
would, and the log and audit log lines of a reactor turn written together at its end, in
order, whole, and never lost at a close, a reopen or a shutdown.
"""

from __future__ import annotations

import io
import json
import os

import pytest
import pytest_twisted
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, LogPublisher, eventAsText, formatEvent, formatEventAsClassicLogText
from zope.interface import implementer

from wingate_map.config import Config, ServiceSettings
from wingate_map.events import AuditLogSink, EventHub, LogSink, Metrics, ServiceLogObserver
from wingate_map.events import _hub as hub
from wingate_map.events import _logs as logs
from wingate_map.events._batch import SPACING, TurnBatch
from wingate_map.interfaces import IEventSink
from wingate_map.service._parts import AuditLog
from wingate_map.sessions import Session, SessionRegistry

from .helpers import wait_for


class _Service:
    """
    Stands in for a running service: the log observer reads only C{config.service}.
    """

    def __init__(self, **settings: str) -> None:
        self.config = Config(service=ServiceSettings(**settings))


def _session() -> Session:
    session = Session(
        id="s-1", mapping="web", client_ip="127.0.0.1", client_port=40000, local_ip="127.0.0.1", local_port=8080, started=1_700_000_000.0
    )
    session.user, session.identity, session.rule, session.destination = "alice", "assumed", 0, "127.0.0.1:9000"
    return session


def _running_reactor() -> MemoryReactorClock:
    reactor = MemoryReactorClock()
    reactor.running = True
    return reactor


def _fire_shutdown(reactor: MemoryReactorClock, phase: str) -> None:
    for call, args, kwargs in reactor.triggers.get(phase, {}).get("shutdown", []):
        call(*args, **kwargs)


class _Out(io.StringIO):
    """
    A log output that counts its writes and flushes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1


# -- the hub: one event dict ---------------------------------------------------------------------


@implementer(IEventSink)
class _Keeper:
    """
    A sink that keeps the dicts it is given; C{meddle} adds a key to each (as an embedding
    application's sink may).
    """

    def __init__(self, reads_only: bool = False, meddle: bool = False) -> None:
        if reads_only:
            self.reads_events_only = True
        self.meddle = meddle
        self.seen: list[dict] = []

    def client_connect(self, event: dict) -> None:
        self.seen.append(event)
        if self.meddle:
            event["mine"] = True

    def client_disconnect(self, event: dict) -> None:
        self.client_connect(event)


def test_built_in_sinks_share_one_event_and_other_sinks_get_their_own():
    """
    The sinks that only read events (the built-in ones say so) are all handed the very dict
    the session built, ClientConnect and ClientDisconnect; a sink of the embedding API gets a
    copy of its own, and what it does to it reaches no other sink.
    """
    first, meddler, last, stranger = _Keeper(reads_only=True), _Keeper(meddle=True), _Keeper(reads_only=True), _Keeper()
    events = EventHub([first, meddler, last, stranger])
    session = _session()
    connect = session.connect_event(1_700_000_000.5)
    assert events.client_connect(connect) is True
    session.reason = "client-closed"
    disconnect = session.disconnect_event(1_700_000_001.0)
    events.client_disconnect(disconnect)
    assert first.seen == [connect, disconnect] and last.seen[0] is connect and last.seen[1] is disconnect
    assert first.seen[0] is connect and first.seen[1] is disconnect
    assert meddler.seen[0] is not connect and meddler.seen[0]["mine"] is True
    assert "mine" not in connect and "mine" not in disconnect and stranger.seen == [connect, disconnect]
    assert stranger.seen[0] is not connect and stranger.seen[0] is not meddler.seen[0]


def test_sinks_of_the_service_say_they_only_read():
    """
    The log, the audit log (file and service), the metrics and program handlers take the
    shared event; a python handler, being somebody else's code, does not say so.
    """
    from wingate_map.events._handlers import ProgramHandler, PythonHandler

    for kind in (LogSink, AuditLogSink, AuditLog, Metrics, ProgramHandler):
        assert kind.reads_events_only is True, kind
    assert getattr(PythonHandler, "reads_events_only", False) is False


def test_refused_sessions_reach_only_the_sinks_that_hear_them():
    """
    A refused session's events skip the sinks that hear no refused sessions (the handlers),
    also after sinks are subscribed and unsubscribed.
    """
    deaf, hearing = _Keeper(reads_only=True), _Keeper()
    deaf.hears_refused = False
    events = EventHub([deaf])
    events.subscribe(hearing)
    event = _session().connect_event(1.0)
    events.client_connect(event, refused=True)
    assert deaf.seen == [] and hearing.seen == [event]
    events.unsubscribe(hearing)
    events.client_connect(event, refused=False)
    assert deaf.seen == [event] and hearing.seen == [event] and events.sinks == (deaf,)


# -- the log sink ------------------------------------------------------------------------------


def test_events_below_the_service_log_level_are_not_emitted():
    """
    With the service's own observer (twistd's), a ClientConnect / ClientDisconnect below its
    level is never emitted; after a reload to info they are, as Logger.emit would emit them.
    """
    seen: list[dict] = []
    service = _Service(log_level="warn")
    observer = ServiceLogObserver(service, io.StringIO(), journal=False)
    sink = LogSink(observer)
    sink.log = Logger(namespace="wingate_map.events", source=sink, observer=seen.append)
    session = _session()
    sink.client_connect(session.connect_event(1_700_000_000.5))
    assert seen == []
    service.config = Config(service=ServiceSettings(log_level="info"))
    sink.client_connect(session.connect_event(1_700_000_000.5))
    [event] = seen
    assert event["log_level"] is LogLevel.info and event["log_namespace"] == "wingate_map.events" and event["log_format"] == "{text}"
    assert event["log_source"] is sink and event["log_logger"] is sink.log and isinstance(event["log_time"], float)
    assert {key: event[key] for key in session.connect_event(1_700_000_000.5)} == session.connect_event(1_700_000_000.5)


@pytest_twisted.inlineCallbacks
@pytest.mark.parametrize("ours", [True, False])
def test_the_service_log_sink_asks_the_observer_install_made(caplog_twisted, ours):
    """
    A service whose log observer L{install} made (the plugin's) logs no ClientConnect below
    its log_level; the same service without one (embedded) logs it for the application's
    observers.
    """
    from twisted.application.service import Application

    from wingate_map import service_from_string
    from wingate_map.events import install

    from .helpers import free_port, mapping_config

    service = service_from_string(mapping_config(free_port(), [("127.0.0.1", 9)], service='log_level = "warn"'))
    if ours:
        observer = install(Application("wingatemap"), service, {"nodaemon": True})
        assert service.log_observer is observer
    service.startService()
    try:
        event = _session().connect_event(1_700_000_000.5)
        event["mapping"] = "m"
        service.events.client_connect(event)
    finally:
        yield service.stopService()
    assert any(line.startswith("ClientConnect s-1 ") for line in caplog_twisted) is not ours


def test_without_the_service_observer_every_event_is_emitted():
    """
    An embedded service's log sink has no observer of ours: its events go to whatever
    observers the application has, at every level.
    """
    seen: list[dict] = []
    sink = LogSink()
    sink.log = Logger(namespace="wingate_map.events", source=sink, observer=seen.append)
    sink.client_disconnect(_session().disconnect_event(1_700_000_001.0))
    assert [event["event"] for event in seen] == ["ClientDisconnect"]


@pytest.mark.parametrize("event_name", ["ClientConnect", "ClientDisconnect"])
def test_event_lines_are_byte_for_byte_twistds(event_name):
    """
    The text, journal and JSON lines of a ClientConnect / ClientDisconnect (built without
    twisted.logger's formatter) are exactly what twisted.logger's own formatting gives, client
    text escaped included.
    """
    seen: list[dict] = []
    sink = LogSink()
    sink.log = Logger(namespace="wingate_map.events", source=sink, observer=seen.append)
    session = _session()
    session.user, session.sni, session.tls, session.original_dst = "al\x1bice\nx", "ex\u202eample", True, "10.0.0.1:443"
    session.destination = "db\x1b[2J.internal:5432"
    session.reason = "client-closed"
    if event_name == "ClientConnect":
        sink.client_connect(session.connect_event(1_700_000_000.5))
    else:
        sink.client_disconnect(session.disconnect_event(1_700_000_001.0))
    [event] = seen
    line = logs._text(event)
    assert line == formatEventAsClassicLogText(event) and line.count("\n") == 1 and "\\x1b" in line
    assert logs._journal_text(event) == eventAsText(event, includeTimestamp=False) + "\n"
    assert json.loads(logs.event_as_json(event))["log_text"] == formatEvent(event)
    with_system = dict(event, log_system="elsewhere")
    assert logs._text(with_system) == formatEventAsClassicLogText(with_system)


# -- the log observer: one write per reactor turn --------------------------------------------


def _observer(reactor, **settings: str) -> tuple[ServiceLogObserver, _Out, Logger]:
    out = _Out()
    observer = ServiceLogObserver(_Service(**settings), out, journal=False, reactor=reactor)
    return observer, out, Logger(namespace="wingate_map.test", observer=LogPublisher(observer))


def test_info_lines_of_a_turn_are_written_at_its_end_in_one_write():
    """
    Info lines logged during a reactor turn are written, in order, with one write and one
    flush when the turn ends, not one per line.
    """
    reactor = _running_reactor()
    observer, out, log = _observer(reactor)
    for n in range(3):
        log.info("line {n}", n=n)
    assert out.getvalue() == "" and out.flushes == 0
    reactor.advance(0)
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == ["line 0", "line 1", "line 2"]
    assert len(out.writes) == 1 and out.flushes == 1
    log.info("line 3")
    reactor.advance(SPACING)  # the next turn end that writes (see the spacing test)
    assert out.getvalue().endswith("] line 3\n") and len(out.writes) == 2


def test_a_warning_is_written_at_once_after_the_lines_before_it():
    """
    A warning (or worse) does not wait for the end of the turn: it is written at once, after
    the info lines logged before it.
    """
    reactor = _running_reactor()
    observer, out, log = _observer(reactor)
    log.info("before")
    log.warn("trouble")
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == ["before", "trouble"] and out.flushes >= 1
    reactor.advance(0)
    assert out.getvalue().count("\n") == 2


def test_lines_are_written_at_once_while_no_reactor_turn_will_end():
    """
    Before the reactor runs, after it stopped, from another thread, and without a reactor,
    every line is written as it comes.
    """
    import threading

    reactor = MemoryReactorClock()  # not running
    observer, out, log = _observer(reactor)
    log.info("starting")
    assert out.getvalue().endswith("] starting\n")
    reactor.running = True
    log.info("queued")
    thread = threading.Thread(target=lambda: log.info("from a thread"))
    thread.start()
    thread.join(30)
    assert [line.split("] ", 1)[1] for line in out.getvalue().splitlines()] == ["starting", "queued", "from a thread"]
    observer, out, log = _observer(None)
    log.info("no reactor")
    assert out.getvalue().endswith("] no reactor\n")


def test_lines_pending_at_shutdown_are_written():
    """
    Lines still waiting for the end of a turn when the reactor shuts down are written during
    the shutdown (before any "after shutdown" trigger, which may end the process).
    """
    reactor = _running_reactor()
    observer, out, log = _observer(reactor)
    log.info("last words")
    assert "during" in reactor.triggers and "after" not in reactor.triggers
    _fire_shutdown(reactor, "during")
    assert out.getvalue().endswith("] last words\n")
    reactor.running = False  # as the reactor's own "during shutdown" trigger does
    log.info("main loop terminated")
    assert out.getvalue().endswith("] main loop terminated\n")


def test_one_turn_end_for_every_batch_of_a_reactor(tmp_path):
    """
    The log and the audit log waiting for the same turn's end cost one delayed call, not one
    each; the next turn schedules the next one.
    """
    reactor = _running_reactor()
    observer, out, log = _observer(reactor)
    audit = AuditLogSink(str(tmp_path / "events.jsonl"), reactor)
    log.info("a line")
    audit.client_connect(_event(1))
    log.info("another")
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(0)
    assert out.getvalue().count("\n") == 2 and _lines(tmp_path / "events.jsonl") == [_event(1)]
    assert reactor.getDelayedCalls() == []
    audit.client_connect(_event(2))
    assert len(reactor.getDelayedCalls()) == 1
    audit.close()


def test_batches_keep_no_finished_reactor_alive():
    """
    Sharing a reactor's turn end keeps nothing of a reactor nobody uses any more (a test's,
    an embedding application's second one).
    """
    import gc
    import weakref

    reactor = _running_reactor()
    batch = TurnBatch(lambda text: None, reactor)
    batch.add("a line\n")
    reactor.advance(0)
    gone = weakref.ref(reactor)
    del batch, reactor
    gc.collect()
    assert gone() is None


def test_turn_ends_that_write_are_spaced():
    """
    A turn end that writes comes at least SPACING after the last one: the lines of the turns
    in between wait for it (written together, in order); after a quiet SPACING, the next turn's
    lines are written at the end of that turn, as the first were.
    """
    reactor = _running_reactor()
    written: list[str] = []
    batch = TurnBatch(written.append, reactor)
    batch.add("a\n")
    reactor.advance(0)
    assert written == ["a\n"]
    reactor.advance(SPACING / 4)
    batch.add("b\n")
    reactor.advance(0)
    batch.add("c\n")
    assert written == ["a\n"] and len(reactor.getDelayedCalls()) == 1
    reactor.advance(SPACING / 2)
    assert written == ["a\n"]
    reactor.advance(SPACING / 4)
    assert written == ["a\n", "b\nc\n"]
    reactor.advance(SPACING * 2)
    batch.add("d\n")
    reactor.advance(0)
    assert written == ["a\n", "b\nc\n", "d\n"]


def test_a_reactor_without_weak_references_still_ends_turns():
    """
    A reactor (wrapper) that takes no weak reference cannot share its turn end: each batch
    then waits on a delayed call of its own, and its lines are written all the same.
    """
    from twisted.internet.task import Clock

    class Wrapper:
        __slots__ = ("clock",)
        running = True

        def __init__(self) -> None:
            self.clock = Clock()

        def callLater(self, delay: float, call, *args):
            return self.clock.callLater(delay, call, *args)

    reactor, written = Wrapper(), []
    batch = TurnBatch(written.append, reactor)
    batch.add("a\n")
    batch.add("b\n")
    assert written == [] and len(reactor.clock.getDelayedCalls()) == 1
    reactor.clock.advance(0)
    assert written == ["a\nb\n"]


def test_a_failed_write_stops_no_other_batch():
    """
    When one batch cannot be written at the end of a turn (a full disk), the others of the
    turn are written all the same, the failure reaches the reactor (which logs it), and the
    failed batch waits for the next turn's end again with its next line.
    """
    reactor = _running_reactor()
    written: list[str] = []

    def full(text: str) -> None:
        raise OSError(28, "No space left on device")

    broken, fine = TurnBatch(full, reactor), TurnBatch(written.append, reactor)
    broken.add("lost\n")
    fine.add("kept\n")
    with pytest.raises(OSError):
        reactor.advance(0)
    assert written == ["kept\n"]
    broken.add("again\n")
    fine.add("more\n")
    assert len(reactor.getDelayedCalls()) == 1


def test_a_large_batch_is_written_without_waiting():
    """
    A burst never holds more than the batch's limit: past it, what is pending is written.
    """
    written: list[str] = []
    batch = TurnBatch(written.append, _running_reactor(), limit=10)
    batch.add("12345\n")
    assert written == []
    batch.add("67890\n")
    assert written == ["12345\n67890\n"] and batch.pending == []


@pytest_twisted.inlineCallbacks
def test_a_logged_line_reaches_the_file_with_the_real_reactor(tmp_path):
    """
    On the running reactor, a ClientConnect line logged through the service's observer is in
    the log file once the reactor has turned, without anything else being logged.
    """
    from twisted.internet import reactor

    path = tmp_path / "twistd.log"
    with open(path, "a", encoding="utf-8") as out:
        observer = ServiceLogObserver(_Service(), out, journal=False, reactor=reactor)
        sink = LogSink(observer)
        sink.log = Logger(namespace="wingate_map.events", source=sink, observer=LogPublisher(observer))
        sink.client_connect(_session().connect_event(1_700_000_000.5))
        assert path.read_text() == ""
        yield wait_for(lambda: "ClientConnect s-1 mapping=web" in path.read_text())


# -- the audit log: one write per reactor turn -------------------------------------------------


def _event(n: int) -> dict:
    return {"event": "ClientConnect", "session": f"s-{n}", "user": "äl\x1b", "duration": 0.25}


def _lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def writes(monkeypatch):
    """
    What the audit log hands to C{os.write}, one entry per call.
    """
    calls: list[bytes] = []
    real = os.write

    def spy(fd: int, data) -> int:
        calls.append(bytes(data))
        return real(fd, data)

    monkeypatch.setattr(hub.os, "write", spy)
    return calls


def test_audit_lines_of_a_turn_arrive_whole_in_order_in_one_write(tmp_path, writes):
    """
    The audit lines of one reactor turn are written at its end with one write of whole lines,
    in the order of the events; the next turn's lines with the next write.
    """
    path = tmp_path / "events.jsonl"
    reactor = _running_reactor()
    sink = AuditLogSink(str(path), reactor)
    for n in range(3):
        sink.client_connect(_event(n))
    assert path.read_text() == "" and writes == []
    reactor.advance(0)
    assert _lines(path) == [_event(n) for n in range(3)] and len(writes) == 1 and writes[0].endswith(b"\n")
    sink.client_disconnect(_event(3))
    reactor.advance(SPACING)
    assert _lines(path) == [_event(n) for n in range(4)] and len(writes) == 2
    sink.close()


def test_after_a_failed_write_an_unrecorded_client_connect_blocks_its_session(tmp_path, monkeypatch):
    """
    When the audit log cannot be written (a full disk), the failure is reported at the end of
    the turn; from then on a session whose ClientConnect cannot be written at once is blocked,
    and once the disk takes lines again they are written at once, then batched again.
    """
    import errno

    path = tmp_path / "events.jsonl"
    reactor = _running_reactor()
    sink = AuditLogSink(str(path), reactor)
    full = [True]
    real = os.write

    def write(fd: int, data) -> int:
        if fd == sink._fd and full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(hub.os, "write", write)
    sink.client_connect(_event(1))
    with pytest.raises(OSError):
        reactor.advance(0)
    assert EventHub([sink]).client_connect(_event(2)) is False
    full[0] = False
    sink.client_connect(_event(3))
    assert _lines(path) == [_event(3)]
    sink.client_disconnect(_event(4))
    sink.client_connect(_event(5))
    assert _lines(path) == [_event(3)]
    reactor.advance(SPACING)
    assert _lines(path) == [_event(3), _event(4), _event(5)]
    sink.close()


def test_audit_line_is_the_same_json(tmp_path):
    """
    The prebuilt encoder writes what C{json.dumps} with compact separators writes (ASCII
    only), and it reads back as the same object.
    """
    path = tmp_path / "events.jsonl"
    sink = AuditLogSink(str(path))
    session = _session()
    session.user, session.reason = "äl\x1b\u2028ice", "client-closed"
    event = session.disconnect_event(1_700_000_001.123456)
    sink.client_disconnect(event)
    sink.close()
    assert path.read_text(encoding="utf-8") == json.dumps(event, separators=(",", ":")) + "\n"
    assert _lines(path) == [event]


def test_audit_lines_pending_are_written_by_close_reopen_and_shutdown(tmp_path):
    """
    No audit line waits forever: closing writes what is pending, a reopen (log rotation)
    writes it to the file it was given for first, and so does the reactor's shutdown.
    """
    path = tmp_path / "events.jsonl"
    reactor = _running_reactor()
    sink = AuditLogSink(str(path), reactor)
    sink.client_connect(_event(1))
    os.rename(path, tmp_path / "events.jsonl.1")
    sink.reopen()
    sink.client_connect(_event(2))
    _fire_shutdown(reactor, "during")
    assert _lines(tmp_path / "events.jsonl.1") == [_event(1)] and _lines(path) == [_event(2)]
    sink.client_connect(_event(3))
    sink.close()
    reactor.advance(0)  # the turn's end after the close: nothing more, nothing fails
    assert _lines(path) == [_event(2), _event(3)]


def test_the_audit_log_service_writes_everything_when_it_stops(tmp_path):
    """
    The service's audit log batches on the service's reactor, and stopping it (the last step
    of a shutdown, after the drain) leaves every line of the current turn in the file.
    """
    from twisted.application.service import MultiService

    path = tmp_path / "events.jsonl"
    reactor = _running_reactor()
    parent = MultiService()
    parent.reactor = reactor
    audit = AuditLog(str(path))
    audit.setServiceParent(parent)
    audit.startService()
    audit.client_connect(_event(1))
    audit.client_disconnect(_event(2))
    assert path.read_text() == ""
    audit.stopService()
    assert _lines(path) == [_event(1), _event(2)]


def test_metrics_count_events_of_a_new_mapping():
    """
    The per-event counters of a mapping are looked up once; a mapping first seen in an event,
    and a reason outside the known ones, are counted all the same.
    """
    metrics = Metrics(SessionRegistry())
    session = _session()
    metrics.client_connect(session.connect_event(1.0))
    session.reason, session.bytes_from_client, session.bytes_to_client = "limit", 3, 0
    metrics.client_disconnect(session.disconnect_event(2.0))
    session.reason = "odd"
    metrics.client_disconnect(session.disconnect_event(2.0))
    text = metrics.render().decode()
    assert 'wingatemap_connections_accepted_total{mapping="web"} 1.0' in text
    assert 'wingatemap_connections_refused_total{mapping="web",reason="limit"} 1.0' in text
    assert 'wingatemap_sessions_ended_total{mapping="web",reason="odd"} 1.0' in text
    assert 'wingatemap_bytes_total{direction="from_client",mapping="web"} 6.0' in text


@pytest.mark.parametrize("seconds", [1_700_000_000.0, 1_700_000_000.0005, 1_700_000_000.5, 1_700_000_000.999999, 1_700_000_001.25, -1.5])
def test_event_time_is_utc_iso_with_milliseconds(seconds):
    """
    An event's time is UTC ISO 8601 with the milliseconds truncated, whatever the second
    (also the same second again, the next one, and before 1970).
    """
    from datetime import datetime, timezone

    from wingate_map.sessions import utc_iso

    whole = int(seconds)
    millis = min(999, int((seconds - whole) * 1000))
    expected = datetime.fromtimestamp(whole, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S") + f".{millis:03d}Z"
    assert utc_iso(seconds) == expected and utc_iso(seconds) == expected


def test_no_line_is_lost_when_the_service_stops(tmp_path):
    """
    Under twistd with --logfile and an audit log, sessions still open when SIGTERM arrives end
    in the drain (reason shutdown) and every session has its ClientConnect and ClientDisconnect
    line in the log file and in the audit log after the process has exited.
    """
    import signal
    import socket

    from .helpers import free_port, mapping_config
    from .test_end_to_end import TWISTD, Proc

    count = 8
    destination = socket.socket()
    destination.bind(("127.0.0.1", 0))
    destination.listen(count + 1)
    destination.settimeout(30)
    port = free_port()
    config = tmp_path / "wingatemap.toml"
    config.write_text(mapping_config(port, [destination.getsockname()], service='drain_timeout = 0.5\naudit_log = "events.jsonl"'))
    proc = Proc(TWISTD + ["-n", "--pidfile=", "--logfile=twistd.log", "wingatemap", "run", "--config", str(config)], cwd=str(tmp_path))
    clients, relayed = [], []
    try:
        from .test_end_to_end import wait_port

        wait_port(port)
        for _ in range(count):
            clients.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        for _ in range(count + 1):  # each one dialled (wait_port's too): its ClientConnect was raised
            relayed.append(destination.accept()[0])
        proc.popen.send_signal(signal.SIGTERM)
        assert proc.finish(60) == -signal.SIGTERM, proc.output()
    finally:
        proc.stop()
        for sock in clients + relayed + [destination]:
            sock.close()
    log = (tmp_path / "twistd.log").read_text(encoding="utf-8")
    audit = _lines(tmp_path / "events.jsonl")
    connects = {e["session"] for e in audit if e["event"] == "ClientConnect"}
    disconnects = {e["session"]: e["reason"] for e in audit if e["event"] == "ClientDisconnect"}
    assert len(audit) == 2 * (count + 1) and len(connects) == count + 1 and set(disconnects) == connects
    assert list(disconnects.values()).count("shutdown") >= count
    for session in connects:
        assert log.count(f"ClientConnect {session} ") == 1 and log.count(f"ClientDisconnect {session} ") == 1, log
