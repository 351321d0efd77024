"""
The lean connection path (issue 11 item 3): what every new connection costs is paid only when
someone reads it.  An event's log line is built only when an observer formats it, and the
operational log formats the time of day once per second, not once per line.
"""

from __future__ import annotations

from twisted.logger import LogLevel, Logger, formatEvent, formatEventAsClassicLogText

from wingate_map.events import _hub as events
from wingate_map.events import _logs as logs
from wingate_map.events import LogSink
from wingate_map.sessions import Session


def _session() -> Session:
    return Session(
        id="s-1",
        mapping="web",
        client_ip="127.0.0.1",
        client_port=40000,
        local_ip="127.0.0.1",
        local_port=8080,
        started=1_700_000_000.0,
        user="alice",
        identity="assumed",
        destination="127.0.0.1:9000",
        rule=0,
    )


def test_event_lines_dropped_by_the_log_level_are_never_built(monkeypatch):
    """
    With the log level above info, a connection's ClientConnect and ClientDisconnect still
    reach the log observers as structured events, but their text line is never built (nor
    escaped); an observer that does format them gets the same line as before.
    """
    built: list[str] = []
    real = events.printable

    def counting(text: str) -> str:
        built.append(text)
        return real(text)

    monkeypatch.setattr(events, "printable", counting)
    seen: list[dict] = []
    sink = LogSink()
    sink.log = Logger(namespace="wingate_map.events", observer=seen.append)
    session = _session()
    sink.client_connect(session.connect_event(1_700_000_000.5))
    sink.client_disconnect(session.disconnect_event(1_700_000_001.0))
    assert [e["event"] for e in seen] == ["ClientConnect", "ClientDisconnect"] and built == []
    connect, disconnect = (formatEvent(e) for e in seen)
    assert connect == "ClientConnect s-1 mapping=web client=127.0.0.1:40000 user=alice (assumed) rule=0 destination=127.0.0.1:9000"
    assert disconnect.startswith("ClientDisconnect s-1 mapping=web client=127.0.0.1:40000 destination=127.0.0.1:9000 reason=None ")
    formatEvent(seen[0])  # formatted again: built once
    assert len(built) == 2


def test_text_log_formats_the_time_once_per_second(monkeypatch):
    """
    The text log's lines are twistd's own format, time included, but the time of day is
    formatted once per second however many lines that second has.
    """
    calls: list[float] = []
    real = logs.formatTime

    def counting(when: float | None) -> str:
        calls.append(when)
        return real(when)

    monkeypatch.setattr(logs, "formatTime", counting, raising=False)
    logs._last_second[:] = [None, "-"]
    lines = []
    for when in (1_700_000_000.1, 1_700_000_000.6, 1_700_000_000.9, 1_700_000_001.2):
        event = {"log_format": "line {n}", "n": 1, "log_time": when, "log_level": LogLevel.info, "log_namespace": "x"}
        lines.append(logs._text(event))
        assert lines[-1] == formatEventAsClassicLogText(event)
    assert len(calls) == 2
