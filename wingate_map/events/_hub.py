"""
The events ClientConnect and ClientDisconnect, and who hears them.

Each event goes, in order, to every subscribed L{IEventSink}: the structured log, the audit log
(one JSON object per line) and whatever an embedding application subscribed.  A ClientConnect
sink may veto the session; the first veto stops the chain and the session ends with reason
C{blocked}.  ClientDisconnect sinks can never delay or change anything.
"""

from __future__ import annotations

import errno
import json
import os
import time
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ..interfaces import IEventSink
from ..printable import printable
from ._batch import TurnBatch

_log = Logger(namespace="wingate_map.events")  # the name log lines carried before the module moved here


class EventHub:
    """
    Delivers events to the subscribed sinks, in subscription order.

    A session refused before the handlers (over a limit, rejected by a rule, no destination)
    still has its ClientConnect and ClientDisconnect, but a sink whose C{hears_refused}
    attribute is C{False} (the configured C{run} and C{python} handlers) hears neither.

    Each event is one dict, built once.  The built-in sinks, which only read it (their class
    says so with C{reads_events_only = True}), all get that dict; any other sink (one
    subscribed through the embedding API, a C{python} handler) gets a copy of its own, so what
    it does to its dict reaches no other sink.
    """

    def __init__(self, sinks: list[IEventSink] | tuple[IEventSink, ...] = ()) -> None:
        self._sinks: list[IEventSink] = []
        # (sink, whether it gets a copy) for every sink, and for those that hear refused
        # sessions: worked out once per subscription, not per event.
        self._chain: tuple[tuple[IEventSink, bool], ...] = ()
        self._refused_chain: tuple[tuple[IEventSink, bool], ...] = ()
        for sink in sinks:
            self.subscribe(sink)

    @property
    def sinks(self) -> tuple[IEventSink, ...]:
        """
        The subscribed sinks, in order.
        """
        return tuple(self._sinks)

    def subscribe(self, sink: IEventSink) -> None:
        """
        Add C{sink} at the end of the chain.
        """
        verifyObject(IEventSink, sink)
        self._sinks.append(sink)
        self._plan()

    def unsubscribe(self, sink: IEventSink) -> None:
        """
        Remove C{sink}; nothing happens if it was not subscribed.
        """
        if sink in self._sinks:
            self._sinks.remove(sink)
            self._plan()

    def _plan(self) -> None:
        chain = tuple((sink, getattr(sink, "reads_events_only", False) is not True) for sink in self._sinks)
        self._chain = chain
        self._refused_chain = tuple(link for link in chain if getattr(link[0], "hears_refused", True))

    def client_connect(self, event: dict[str, Any], refused: bool = False) -> bool | Deferred[bool]:
        """
        Offer ClientConnect to each sink in turn (for a session already C{refused}, only to
        those that hear refused sessions; their answer changes nothing).

        @return: C{True} when every sink allowed the session, C{False} at the first that
            blocked it (by returning C{False}, or by failing, which is logged); a Deferred firing
            with that answer if a sink answered with a Deferred (synchronous sinks cost no
            Deferred: this runs for every connection).
        """
        return self._offer(self._refused_chain if refused else self._chain, 0, event)

    def _offer(self, chain: tuple[tuple[IEventSink, bool], ...], index: int, event: dict[str, Any]) -> bool | Deferred[bool]:
        while index < len(chain):
            sink, copy = chain[index]
            try:
                result = sink.client_connect(dict(event) if copy else event)
            except Exception:
                _log.failure("event sink {sink!r} failed on ClientConnect of session {session}; blocking it", sink=sink, session=event["session"])
                return False
            if result is not None and result is not True:
                if isinstance(result, Deferred):
                    return result.addCallbacks(
                        lambda allowed, i=index: self._offer(chain, i + 1, event) if allowed is not False else False,
                        lambda failure, s=sink: _blocked_by_failure(failure, s, event),
                    )
                if result is False:
                    return False
            index += 1
        return True

    def client_disconnect(self, event: dict[str, Any], refused: bool = False) -> None:
        """
        Tell each sink about ClientDisconnect (of a session C{refused} before the handlers:
        only those that hear refused sessions); failures are logged, never raised.
        """
        for sink, copy in self._refused_chain if refused else self._chain:
            try:
                result = sink.client_disconnect(dict(event) if copy else event)
            except Exception:
                _log.failure("event sink {sink!r} failed on ClientDisconnect of session {session}", sink=sink, session=event["session"])
                continue
            if result is not None and isinstance(result, Deferred):
                result.addErrback(
                    lambda f, s=sink: _log.failure("event sink {sink!r} failed on ClientDisconnect of session {session}", f, sink=s, session=event["session"])
                )


def _blocked_by_failure(failure: Failure, sink: IEventSink, event: dict[str, Any]) -> bool:
    _log.failure("event sink {sink!r} failed on ClientConnect of session {session}; blocking it", failure, sink=sink, session=event["session"])
    return False


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _connect_text(event: dict[str, Any]) -> str:
    text = (
        f"ClientConnect {event['session']} mapping={event['mapping']} "
        f"client={_endpoint(event['client_ip'], event['client_port'])} user={event['user']} ({event['identity']}) "
        f"rule={event['rule']} destination={event['destination']}"
    )
    if event["original_dst"]:
        text += f" original_dst={event['original_dst']}"
    if event.get("sni"):
        text += f" sni={event['sni']}"
    if event["tls"]:
        text += " tls"
    return text


def _disconnect_text(event: dict[str, Any]) -> str:
    return (
        f"ClientDisconnect {event['session']} mapping={event['mapping']} "
        f"client={_endpoint(event['client_ip'], event['client_port'])} destination={event['destination']} "
        f"reason={event['reason']} bytes_from_client={event['bytes_from_client']} "
        f"bytes_to_client={event['bytes_to_client']} duration={event['duration']}"
    )


class _Line:
    """
    An event's log line, built (and escaped with L{printable}) the first time an observer
    formats it: when the log level drops the event, no text is ever built.  It formats, prints
    and C{repr}s (a JSON log's C{text} field) as the line itself.
    """

    __slots__ = ("_build", "_event", "_text")

    def __init__(self, build: Any, event: dict[str, Any]) -> None:
        self._build = build
        self._event = event
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            # The whole line is escaped at once: every field is, and the rest is our own text.
            self._text = printable(self._build(self._event))
            self._event = None  # type: ignore[assignment]
        return self._text

    __repr__ = __str__

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


@implementer(IEventSink)
class LogSink:
    """
    Events as structured twisted.logger events (every field is a key of the log event).  The
    text line escapes every field that can come from a client or a certificate (client
    address, user, server name, destinations) with L{printable}: a control character or escape
    sequence shows as C{\\x1b}, it never reaches a log file or a terminal as itself.

    Given the service's own log observer (the L{wingate_map.events.ServiceLogObserver} that
    L{wingate_map.events.install} makes twistd's only one for the plugin and C{wingatemap
    run}), an event below the observer's C{log_level} is not emitted at all: that observer
    would drop it, and no other observer is there to see it.  Without one (an embedded service
    or a C{.tac}, whose application may have observers of its own), every event is emitted,
    whatever the level.
    """

    reads_events_only = True  # see EventHub: it gets the event every built-in sink shares

    # The text is built with an f-string and logged as "{text}" (formatting a 14-field format
    # string through twisted.logger for every connection costs more than the relay), and only
    # when an observer formats the event (see _Line).  The event is published to the
    # logger's observer as Logger.emit would build it (the same keys), without emit's checks.

    def __init__(self, observer: Any = None) -> None:
        """
        @param observer: the service's L{ServiceLogObserver}, when it is the one log observer.
        """
        self._observer = observer
        self.log = Logger(namespace="wingate_map.events", source=self)

    def _emit(self, build: Any, event: dict[str, Any]) -> None:
        observer = self._observer
        if observer is not None and not observer.wants(LogLevel.info):
            return
        log = self.log
        log.observer(
            {
                "text": _Line(build, event),
                **event,
                "log_logger": log,
                "log_level": LogLevel.info,
                "log_namespace": log.namespace,
                "log_source": log.source,
                "log_format": "{text}",
                "log_time": time.time(),
            }
        )

    def client_connect(self, event: dict[str, Any]) -> None:
        """
        Log ClientConnect.
        """
        self._emit(_connect_text, event)

    def client_disconnect(self, event: dict[str, Any]) -> None:
        """
        Log ClientDisconnect.
        """
        self._emit(_disconnect_text, event)


AUDIT_LOG_MODE = 0o640



def _line_encoder() -> Any:
    """
    The audit log's JSON encoder, built once: C{json.dumps(separators=(",", ":"))}'s output
    (ASCII only), without building an encoder per call as C{JSONEncoder.encode} does (the C
    one, when the interpreter has it; an event is a flat dict of fresh values, so no cycle
    check).
    """
    encoder = json.JSONEncoder(separators=(",", ":"), check_circular=False)
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return encoder.encode
    iterencode = make(None, encoder.default, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, True)
    return lambda event: "".join(iterencode(event, 0))


_encode = _line_encoder()


def _open_audit_log(path: str) -> int:
    """
    Open C{path} for appending: created C{0640} whatever the umask, never through a symbolic
    link (C{O_NOFOLLOW}), C{O_APPEND} so that every line lands at the end even when several
    processes (workers) write the same file.

    @raise OSError: it cannot be opened; for a symbolic link the message says so.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
    for _ in range(3):  # the file may vanish or appear between the two opens (logrotate)
        try:
            # O_EXCL also refuses a (dangling) symbolic link, which then fails below.
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, AUDIT_LOG_MODE)
        except FileExistsError:
            pass
        else:
            os.fchmod(fd, AUDIT_LOG_MODE)  # the umask may have taken bits away
            return fd
        try:
            return os.open(path, flags)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno == errno.ELOOP and os.path.islink(path):
                raise OSError(errno.ELOOP, "it is a symbolic link, and the audit log is never opened through one") from None
            raise
    raise OSError(errno.ENOENT, "it keeps disappearing while being opened")


@implementer(IEventSink)
class AuditLogSink:
    """
    Every event as one JSON object on a line of a file, appended as it happens.  The file is
    created C{0640} and never opened through a symbolic link; L{reopen} opens the path anew, for
    log rotation (move the file away, then reload).

    Given a reactor, the lines of one reactor turn are written together, in order, with one
    C{write} of whole lines at the end of the turn (see L{TurnBatch}: at most one such write
    every 10 ms; also when 64 KiB are pending, before a reopen, at L{close} and at reactor
    shutdown); without one, each line is written as it comes.  Either way every C{write} holds
    whole lines only, so worker processes appending to the same file (C{O_APPEND}) never split
    or overwrite each other's lines.

    Once a write has failed (a full disk), each ClientConnect is written at once, with what is
    pending, until a write succeeds again: a session whose ClientConnect cannot be recorded is
    blocked (the failure propagates, as for any failing sink), not admitted unrecorded.
    """

    reads_events_only = True  # see EventHub: it gets the event every built-in sink shares

    def __init__(self, path: str, reactor: Any = None) -> None:
        self.path = path
        self._fd: int | None = _open_audit_log(path)
        self._batch = TurnBatch(self._write_text, reactor)
        self._failing = False  # the last write failed

    def reopen(self) -> None:
        """
        Open the path anew and write there from now on (logrotate moved the file away, or it
        was deleted); the file written so far is closed, with every line given before.

        @raise OSError: the path cannot be opened (e.g. it is now a symbolic link); the file
            written so far stays in use.
        """
        fd = _open_audit_log(self.path)
        try:
            self._batch.flush()
        finally:
            old, self._fd = self._fd, fd
            if old is not None:
                os.close(old)

    def flush(self) -> None:
        """
        Write the lines still waiting for the end of the reactor turn, now.
        """
        self._batch.flush()

    def _write_text(self, text: str) -> None:
        if self._fd is None:
            raise ValueError(f"audit log {self.path} is closed")
        data = memoryview(text.encode("utf-8"))
        self._failing = True
        while data:  # a regular file takes all of it at once unless the disk is full
            written = os.write(self._fd, data)
            if written <= 0:
                raise OSError(errno.EIO, f"audit log {self.path}: nothing could be written")
            data = data[written:]
        self._failing = False

    def _write(self, event: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"audit log {self.path} is closed")
        self._batch.add(_encode(event) + "\n")

    def client_connect(self, event: dict[str, Any]) -> None:
        """
        Append ClientConnect (at once, raising if it cannot be, after a failed write).
        """
        self._write(event)
        if self._failing:
            self._batch.flush()

    def client_disconnect(self, event: dict[str, Any]) -> None:
        """
        Append ClientDisconnect.
        """
        self._write(event)

    def close(self) -> None:
        """
        Write what is pending and close the file (again: nothing happens).
        """
        if self._fd is not None:
            try:
                self._batch.flush()
            finally:
                os.close(self._fd)
                self._fd = None
