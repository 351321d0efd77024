"""
The operational log: C{[service] log_level} (the threshold) and C{log_format} (C{text} or one
JSON object per line), and journald-friendly lines when systemd reads standard output.

Twisted routes every log event to the observers given to C{globalLogBeginner}; twistd picks
them in this order: its C{--logger} option, else the application's L{ILogObserver} component,
else its own (C{--logfile}, C{--syslog}).  L{install} sets that component, writing where
twistd would have (the same C{--logfile}, rotated the same way, or standard output), so that
C{--logger} and C{--syslog} still win.  Only the twistd plugin and a C{.tac} that asks for it
call L{install}: a service embedded in another application never touches its logging.
"""

from __future__ import annotations

import json
import os
import sys
from typing import IO, Any, Callable

from twisted.logger import ILogObserver, LogLevel, eventAsText, formatEvent, formatEventAsClassicLogText, formatTime
from twisted.python.components import Componentized
from zope.interface import implementer

from ..sessions import utc_iso
from ._batch import TurnBatch
from ._hub import _Line

# sd-daemon(3) priority prefixes: journald strips them and sets PRIORITY (no time of ours:
# journald stamps every line itself).
_PRIORITIES = {
    LogLevel.debug: "<7>",
    LogLevel.info: "<6>",
    LogLevel.warn: "<4>",
    LogLevel.error: "<3>",
    LogLevel.critical: "<2>",
}

# What twisted.python.log (legacy) events carry besides log_* keys; not structured fields.
_LEGACY_KEYS = frozenset(("message", "isError", "system", "time", "format", "why", "failure"))


def levels_from(threshold: str) -> frozenset[Any]:
    """
    The twisted.logger levels at or above C{threshold} (a C{[service] log_level}).
    """
    lowest = LogLevel.levelWithName(threshold)
    return frozenset(level for level in LogLevel.iterconstants() if level >= lowest)


def is_journal(out: IO[str], environ: dict[str, str] | None = None) -> bool:
    """
    Whether C{out} is systemd's journal stream: C{$JOURNAL_STREAM} names its device and inode
    (systemd.exec(5)); a file or terminal the unit redirected output to is not.
    """
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    try:
        st = os.fstat(out.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return stream == f"{st.st_dev}:{st.st_ino}"


def _json_value(value: Any) -> Any:
    """
    C{value} if JSON can hold it, else its C{repr} (an object, a NaN, a cycle).
    """
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
    return value


def _own_message(event: dict[str, Any]) -> str | None:
    """
    The message of a ClientConnect / ClientDisconnect line (L{LogSink}'s C{"{text}"} events),
    which twisted.logger's formatter would give too, without its C{string.Formatter} work;
    L{None} for any other event.
    """
    text = event.get("text")
    if type(text) is _Line and event.get("log_format") == "{text}" and "log_flattened" not in event and "log_failure" not in event:
        return str(text)
    return None


def event_as_json(event: dict[str, Any]) -> str:
    """
    C{event} as one line of JSON: C{log_time} (UTC ISO 8601), C{log_level}, C{log_namespace},
    C{log_text} (the formatted message), C{log_failure} (a traceback, when there is one), then
    every structured field.  The C{log_} prefix is twisted.logger's and never a field's, so no
    field is hidden.  A value JSON cannot hold is written as its C{repr}; never raises.
    """
    level = event.get("log_level")
    record: dict[str, Any] = {
        "log_time": utc_iso(event.get("log_time") or 0.0),
        "log_level": getattr(level, "name", None),
        "log_namespace": event.get("log_namespace"),
        "log_text": _own_message(event) or formatEvent(event),
    }
    failure = event.get("log_failure")
    if failure is not None:
        try:
            record["log_failure"] = failure.getTraceback()
        except Exception:
            record["log_failure"] = repr(failure)
    legacy = "isError" in event and "message" in event
    for key, value in event.items():
        if not str(key).startswith("log_") and not (legacy and key in _LEGACY_KEYS):
            record[key] = value
    try:
        # ASCII only: no character (U+2028, a control character) can split the line.
        return json.dumps(record, allow_nan=False, default=repr)
    except (TypeError, ValueError, RecursionError):
        return json.dumps({str(k): _json_value(v) for k, v in record.items()})


_last_second: list[Any] = [None, "-"]


def _format_time(when: float | None) -> str:
    """
    twisted.logger's C{formatTime}, computed once per second (it has no fraction of a second):
    it costs a third of a log line, and every connection writes two.
    """
    if when is None:
        return formatTime(when)
    whole = int(when)
    if _last_second[0] != whole:
        _last_second[1] = formatTime(whole)
        _last_second[0] = whole
    return _last_second[1]


def _classic(event: dict[str, Any], timestamp: bool) -> str | None:
    """
    twisted.logger's C{formatEventAsClassicLogText} (with C{timestamp}, else C{eventAsText}
    without the time, continuation lines indented), byte for byte; for our own event lines
    (L{_own_message}) built directly, since every connection writes two.
    """
    message = _own_message(event)
    if not message or event.get("log_system") is not None:
        if timestamp:
            return formatEventAsClassicLogText(event, formatTime=_format_time)
        text = eventAsText(event, includeTimestamp=False)
        return text.replace("\n", "\n\t") + "\n" if text else None
    level = event.get("log_level")
    system = f"[{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}] "
    line = f"{_format_time(event.get('log_time'))} {system}{message}" if timestamp else system + message
    return line.replace("\n", "\n\t") + "\n"


def _text(event: dict[str, Any]) -> str | None:
    # twistd's own format: "2024-05-01T10:00:00+0000 [namespace#info] message\n".
    return _classic(event, True)


def _json(event: dict[str, Any]) -> str:
    return event_as_json(event) + "\n"


def _journal_text(event: dict[str, Any]) -> str | None:
    # twistd's format without the time: journald stamps every line itself.
    return _classic(event, False)


def _journal(line: Callable[[dict[str, Any]], str | None]) -> Callable[[dict[str, Any]], str | None]:
    """
    C{line}'s output with the event's priority prefix on every line (journald splits at
    newlines, so a traceback's lines keep the event's priority).
    """

    def formatted(event: dict[str, Any]) -> str | None:
        text = line(event)
        if not text:
            return None
        prefix = _PRIORITIES.get(event.get("log_level"), "<6>")  # type: ignore[arg-type]
        return prefix + text[:-1].replace("\n", "\n" + prefix) + "\n"

    return formatted


# Lines at these levels are written (with every line before them) at once, not at the end of
# the reactor turn: what goes wrong is on disk before anything else happens.
_AT_ONCE = frozenset((LogLevel.warn, LogLevel.error, LogLevel.critical))


@implementer(ILogObserver)
class ServiceLogObserver:
    """
    Writes the events at or above the service's C{log_level} to C{out} in its C{log_format},
    one event per line (continuation lines of a text traceback start with a tab).  It follows
    the running configuration: after a reload the new level and format apply.

    Given a reactor, the info and debug lines of one reactor turn are written (and C{out}
    flushed) once, at the end of the turn (see L{TurnBatch}: at most one such write every
    10 ms; also when 64 KiB are pending, and at reactor shutdown); a warning or worse is written at once, after every line before it.
    Lines logged while the reactor is not running, or from another thread, are written at once.

    @ivar journal: whether C{out} is systemd's journal (priority prefixes, no timestamp).
    """

    def __init__(self, service: Any, out: IO[str], journal: bool | None = None, reactor: Any = None) -> None:
        """
        @param reactor: whose turns batch the lines; L{None}: every line is written at once.
        """
        self._service = service
        self._out = out
        self.journal = is_journal(out) if journal is None else journal
        self._settings: Any = None
        self._levels: frozenset[Any] = frozenset()
        self._format: Callable[[dict[str, Any]], str | None] = _text
        self._batch = TurnBatch(self._write, reactor)
        self._follow()

    def _follow(self) -> Any:
        settings = self._service.config.service
        if settings is not self._settings:
            self._settings = settings
            self._levels = levels_from(settings.log_level)
            if settings.log_format == "json":
                self._format = _journal(_json) if self.journal else _json
            else:
                self._format = _journal(_journal_text) if self.journal else _text
        return settings

    def wants(self, level: Any) -> bool:
        """
        Whether an event at C{level} would be written (under the running configuration).
        """
        if self._service.config.service is not self._settings:
            self._follow()
        return level in self._levels

    def _write(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()

    def flush(self) -> None:
        """
        Write the lines still waiting for the end of the reactor turn, now.
        """
        self._batch.flush()

    def __call__(self, event: dict[str, Any]) -> None:
        """
        Write C{event} if its level is at or above the threshold.
        """
        # The cheapest test first: most events below the threshold end here.  (twisted's
        # FilteringLogObserver with LogLevelFilterPredicate costs about 1 µs more per event.)
        if self._service.config.service is not self._settings:
            self._follow()
        level = event.get("log_level", LogLevel.info)
        if level not in self._levels:
            return
        text = self._format(event)
        if not text:
            return
        if level in _AT_ONCE:
            self._batch.flush()
            self._write(text)
        else:
            self._batch.add(text)


def _open_log_file(path: str) -> IO[str]:
    """
    twistd's log file for C{--logfile PATH}: rotated at 1 MB, every old file kept, and rotated
    on SIGUSR1 (as twistd does, unless the signal already has a handler).
    """
    import signal

    from twisted.python.logfile import LogFile

    log_file = LogFile.fromFullPath(path)
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: Any) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)

        signal.signal(signal.SIGUSR1, rotate)
    return log_file  # type: ignore[return-value]


def twistd_output(twistd_options: Any) -> IO[str] | None:
    """
    Where twistd would write its log for these twistd options: standard output in the
    foreground without C{--logfile} or with C{--logfile -}, else the file (default
    C{twistd.log}).  L{None} where twistd's own observer must stay: C{--logger} or
    C{--syslog} given, or C{--logfile -} for a daemon (twistd refuses that itself).
    """
    if twistd_options.get("logger") or twistd_options.get("syslog"):
        return None
    path = twistd_options.get("logfile") or ""
    foreground = bool(twistd_options.get("nodaemon"))
    if path == "-" or (foreground and not path):
        return sys.stdout if foreground else None
    return _open_log_file(path or "twistd.log")


def install(application: Any, service: Any, twistd_options: Any) -> ServiceLogObserver | None:
    """
    Make C{application}'s log observer (the one twistd starts with) a L{ServiceLogObserver}
    for C{service}, writing where twistd would for C{twistd_options}.  Nothing happens when
    C{application} is not a twistd application, already has an observer, or twistd's own must
    stay (see L{twistd_output}).

    @return: the observer installed, or L{None}.
    """
    if not isinstance(application, Componentized) or application.getComponent(ILogObserver) is not None:
        return None
    out = twistd_output(twistd_options)
    if out is None:
        return None
    observer = ServiceLogObserver(service, out, reactor=getattr(service, "reactor", None))
    service.log_observer = observer
    application.setComponent(ILogObserver, observer)
    return observer
