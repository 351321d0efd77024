"""
The operational log: C{[service] log_level} and C{log_format}, journald-friendly lines under
systemd, twistd's C{--logfile} and C{--logger}, and embedded services left alone.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import signal
import socket
import sys

import pytest
from twisted.application.service import Application, MultiService
from twisted.logger import ILogObserver, Logger, LogLevel, LogPublisher
from twisted.python.failure import Failure

from wingate_map.config import Config, ServiceSettings, parse_config
from wingate_map.errors import ConfigError
from wingate_map.events._logs import ServiceLogObserver, event_as_json, install, is_journal

from .test_end_to_end import ENV, TWISTD, WINGATEMAP, Proc

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


class _Service:
    """
    Stands in for a running service: L{ServiceLogObserver} reads only C{config.service}.
    """

    def __init__(self, **settings: str) -> None:
        self.config = Config(service=ServiceSettings(**settings))


def _logged(observer: ServiceLogObserver, emit) -> None:
    """
    Run C{emit(log)} with a Logger whose events go to C{observer} only.
    """
    publisher = LogPublisher(observer)
    emit(Logger(namespace="wingate_map.test", observer=publisher))


# -- configuration ----------------------------------------------------------------------------


def test_log_keys_default_and_are_checked():
    """
    log_level defaults to info and log_format to text; any other word is an error naming the
    key, with the allowed words (and the close one for a near miss).
    """
    assert parse_config("").service.log_level == "info"
    assert parse_config("").service.log_format == "text"
    with pytest.raises(ConfigError) as caught:
        parse_config('[service]\nlog_level = "warning"\nlog_format = "JSON"\n')
    problems = [str(p) for p in caught.value.problems]
    assert problems == [
        'service.log_level: "warning" is not allowed (did you mean "warn"?); expected one of debug, info, warn, error',
        'service.log_format: "JSON" is not allowed; expected one of text, json',
    ]


# -- formats, in memory -----------------------------------------------------------------------


class _Unserialisable:
    def __repr__(self) -> str:
        return "<unserialisable>"


def test_json_line_holds_any_field():
    """
    A json log line is one line of valid JSON with the time, level, namespace, message and every
    structured field; a value JSON cannot hold (an object, NaN, a cycle, a tuple key) is
    written as its repr instead of breaking the line.
    """
    cycle: list = []
    cycle.append(cycle)
    out = io.StringIO()
    observer = ServiceLogObserver(_Service(log_format="json"), out, journal=False)
    _logged(observer, lambda log: log.info("session {session}\nsecond line\u2028", session="s1", thing=_Unserialisable(), nan=math.nan, cycle=cycle, keyed={(1, 2): 3}, raw=b"\x00"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["log_level"] == "info"
    assert record["log_namespace"] == "wingate_map.test"
    assert record["log_text"] == "session s1\nsecond line\u2028"
    assert TIMESTAMP.match(record["log_time"]) and record["log_time"].endswith("Z")
    assert record["session"] == "s1"
    assert record["thing"] == "<unserialisable>"
    assert record["nan"] == "nan"
    assert record["cycle"] == "[[...]]"
    assert record["keyed"] == "{(1, 2): 3}"
    assert record["raw"] == "b'\\x00'"


def test_json_line_carries_the_traceback():
    """
    A failure logged in json format keeps its traceback in log_failure, on the same line.
    """
    out = io.StringIO()
    observer = ServiceLogObserver(_Service(log_format="json"), out, journal=False)
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()
    _logged(observer, lambda log: log.failure("it broke", failure))
    (line,) = out.getvalue().splitlines()
    record = json.loads(line)
    assert record["log_level"] == "critical"
    assert "ZeroDivisionError" in record["log_failure"]


def test_event_as_json_never_raises():
    """
    Even an event whose keys are not strings becomes a JSON line.
    """
    record = json.loads(event_as_json({"log_format": "x", 1: float("inf"), "log_level": LogLevel.warn}))
    assert record["1"] == "inf"
    assert record["log_level"] == "warn"


def test_level_threshold():
    """
    log_level = warn writes warnings and errors and drops debug and info events.
    """
    out = io.StringIO()
    observer = ServiceLogObserver(_Service(log_level="warn"), out, journal=False)

    def emit(log: Logger) -> None:
        log.debug("a debug line")
        log.info("an info line")
        log.warn("a warn line")
        log.error("an error line")

    _logged(observer, emit)
    text = out.getvalue()
    assert "a debug line" not in text and "an info line" not in text
    assert "a warn line" in text and "an error line" in text
    assert all(TIMESTAMP.match(line) for line in text.splitlines())


def test_debug_threshold_shows_debug():
    """
    log_level = debug writes debug events too.
    """
    out = io.StringIO()
    _logged(ServiceLogObserver(_Service(log_level="debug"), out, journal=False), lambda log: log.debug("a debug line"))
    assert "[wingate_map.test#debug] a debug line" in out.getvalue()


def test_reload_changes_level_and_format():
    """
    After a reload the new log_level and log_format apply to the next event.
    """
    service = _Service()
    out = io.StringIO()
    observer = ServiceLogObserver(service, out, journal=False)
    _logged(observer, lambda log: log.info("before"))
    service.config = Config(service=ServiceSettings(log_level="error", log_format="json"))
    _logged(observer, lambda log: log.warn("dropped now"))
    _logged(observer, lambda log: log.error("after"))
    first, second = out.getvalue().splitlines()
    assert TIMESTAMP.match(first) and first.endswith("before")
    assert json.loads(second)["log_text"] == "after"


def test_journal_lines(tmp_path):
    """
    When standard output is systemd's journal stream, each line starts with its sd-daemon
    priority (<6> info, <4> warn, <3> error, also on every line of a traceback) and carries
    no timestamp of its own.
    """
    out = io.StringIO()
    observer = ServiceLogObserver(_Service(), out, journal=True)
    try:
        1 / 0
    except ZeroDivisionError:
        failure = Failure()

    def emit(log: Logger) -> None:
        log.info("an info line")
        log.warn("a warn line")
        log.failure("an error", failure, level=LogLevel.error)

    _logged(observer, emit)
    lines = out.getvalue().splitlines()
    assert lines[0] == "<6>[wingate_map.test#info] an info line"
    assert lines[1] == "<4>[wingate_map.test#warn] a warn line"
    assert lines[2] == "<3>[wingate_map.test#error] an error"
    assert len(lines) > 4 and all(line.startswith("<3>\t") for line in lines[3:])
    json_out = io.StringIO()
    _logged(ServiceLogObserver(_Service(log_format="json"), json_out, journal=True), lambda log: log.warn("w"))
    assert json_out.getvalue().startswith("<4>{") and json.loads(json_out.getvalue()[3:])["log_text"] == "w"


def test_journal_detection(tmp_path):
    """
    Output is the journal only when $JOURNAL_STREAM names that very file's device and inode.
    """
    with open(tmp_path / "out", "w") as f, open(tmp_path / "other", "w") as other:
        st = os.fstat(f.fileno())
        stream = f"{st.st_dev}:{st.st_ino}"
        assert is_journal(f, {"JOURNAL_STREAM": stream})
        assert not is_journal(other, {"JOURNAL_STREAM": stream})
        assert not is_journal(f, {})
        assert not is_journal(f, {"INVOCATION_ID": "0123"})
    assert not is_journal(io.StringIO(), {"JOURNAL_STREAM": stream})


# -- where the observer is installed ----------------------------------------------------------


def test_install_on_twistd_application_with_logfile(tmp_path):
    """
    On twistd's application the service's observer becomes the log observer, writing to the
    --logfile file as twistd would; with --logger or --syslog, or an observer already set,
    twistd's choice stays.
    """
    service = _Service(log_format="json")
    application = Application("wingatemap")
    path = tmp_path / "twistd.log"
    observer = install(application, service, {"logfile": str(path), "nodaemon": True})
    assert observer is not None and application.getComponent(ILogObserver) is observer
    _logged(observer, lambda log: log.info("to the file"))
    assert json.loads(path.read_text())["log_text"] == "to the file"
    assert install(Application("a"), service, {"logger": "my.observer", "nodaemon": True}) is None
    assert install(Application("b"), service, {"syslog": True, "nodaemon": True}) is None
    assert install(application, service, {"nodaemon": True}) is None
    foreground = Application("c")
    assert install(foreground, service, {"nodaemon": True, "logfile": "-"})._out is sys.stdout


def test_embedded_service_leaves_logging_alone():
    """
    A service added to an ordinary parent service (embedding) installs no observer.
    """
    from wingate_map import service_from_string

    parent = MultiService()
    service = service_from_string('[service]\nlog_format = "json"\n')
    assert install(parent, service, {"nodaemon": True}) is None
    application = Application("host")
    service.setServiceParent(application)
    assert application.getComponent(ILogObserver) is None


# -- real processes ---------------------------------------------------------------------------


# A rule no test client matches, whose verify = false is warned about at start.
_VERIFY_FALSE_RULE = '[[mappings.web.rules]]\nfrom = ["127.9.9.9"]\nto = { host = "127.0.0.1", port = 9, tls = true, verify = false }\n'


def _config(tmp_path, service: str, port: int, dest_port: int, extra: str = "") -> str:
    path = tmp_path / "wingatemap.toml"
    path.write_text(
        f"[service]\n{service}\n"
        f'[mappings.web]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {dest_port} }}\n{extra}'
    )
    return str(path)


def _free_port() -> int:
    from .helpers import free_port

    return free_port()


def test_twistd_json_lines(tmp_path):
    """
    twistd -n wingatemap run with log_format = "json" writes only JSON lines, one per event,
    and a client's ClientConnect line holds the event's fields.
    """
    port, destination = _free_port(), _free_port()  # nothing listens at the destination
    proc = Proc(TWISTD + ["-n", "--pidfile=", "wingatemap", "run", "--config", _config(tmp_path, 'log_format = "json"', port, destination)])
    try:
        proc.wait_line(r'"log_text": "mapping web: listening on')
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            line = proc.wait_line(r"ClientConnect")
            client_port = client.getsockname()[1]
    finally:
        proc.stop()
    record = json.loads(line)
    assert record["event"] == "ClientConnect"
    assert record["mapping"] == "web"
    assert record["client_ip"] == "127.0.0.1" and record["client_port"] == client_port
    assert record["destination"] == f"127.0.0.1:{destination}"
    assert record["identity"] == "guest" and record["rule"] == "default"
    assert record["session"] and record["time"].endswith("Z")
    assert record["log_namespace"].startswith("wingate_map.events") and record["log_level"] == "info"
    for output_line in proc.lines:
        assert isinstance(json.loads(output_line), dict), output_line


def test_wingatemap_run_warn_level(tmp_path):
    """
    wingatemap run with log_level = "warn" writes the warnings and none of the info lines
    (start-up, ClientConnect, ClientDisconnect, shutdown).
    """
    port, closed_port = _free_port(), _free_port()
    config = _config(tmp_path, 'log_level = "warn"', port, closed_port, _VERIFY_FALSE_RULE)
    proc = Proc(WINGATEMAP + ["run", "--config", config])
    try:
        proc.wait_line(r"#warn\] configuration: .*verify")
        with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
            client.settimeout(30)
            # Nothing listens at the destination: the service ends the session and closes us.
            assert client.recv(1) == b""
    finally:
        code = proc.stop()
    output = proc.output()
    assert code == -signal.SIGTERM, output  # twistd ends by re-raising SIGTERM
    assert "#info]" not in output, output
    assert "ClientConnect" not in output and "ClientDisconnect" not in output


def test_journal_prefixes_under_systemd(tmp_path):
    """
    With $JOURNAL_STREAM naming the process's standard output (as systemd sets it), every line
    starts with a <N> priority (<6> info, <4> a warning) and has no timestamp.
    """
    port = _free_port()
    config = _config(tmp_path, "", port, 9, _VERIFY_FALSE_RULE)
    as_systemd = [
        sys.executable,
        "-c",
        "import os; st = os.fstat(1); os.environ['JOURNAL_STREAM'] = f'{st.st_dev}:{st.st_ino}'; "
        "from twisted.scripts.twistd import run; run()",
    ]
    proc = Proc(as_systemd + ["-n", "--pidfile=", "wingatemap", "run", "--config", config])
    try:
        proc.wait_line(r"mapping web: listening on")
    finally:
        proc.stop()
    lines = proc.output().splitlines()
    assert any(re.match(r"^<6>\[wingate_map\.service#info\] mapping web: listening on", line) for line in lines), lines
    assert any(re.match(r"^<4>\[wingate_map\.service#warn\] configuration: mappings\.web\.rules\[0\]\.to\.verify", line) for line in lines), lines
    for line in lines:
        assert re.match(r"^<[0-7]>", line), line
        assert not TIMESTAMP.match(line[3:].lstrip("\t")), line


def test_twistd_logfile_kept(tmp_path):
    """
    twistd --logfile FILE still writes the log to FILE (here in json format).
    """
    from .test_end_to_end import wait_port

    port = _free_port()
    logfile = tmp_path / "service.log"
    proc = Proc(TWISTD + ["-n", "--pidfile=", f"--logfile={logfile}", "wingatemap", "run", "--config", _config(tmp_path, 'log_format = "json"', port, 9)], env=dict(ENV))
    try:
        wait_port(port)
    finally:
        proc.stop()
    records = [json.loads(line) for line in logfile.read_text().splitlines()]
    assert any(r["log_text"].startswith("mapping web: listening on") for r in records)
    assert proc.output() == ""
