"""
Client-supplied text is never printed as itself: the escaping helper, the operational log lines,
the audit log (JSON), the PROXY header errors the relay logs, and the C{wingatemap sessions}
table all show control characters and escape sequences as visible escapes.
"""

from __future__ import annotations

import json

import pytest
from twisted.logger import Logger, formatEvent

from wingate_map import cli
from wingate_map.config import Destination, parse_location
from wingate_map.events import AuditLogSink, LogSink
from wingate_map.printable import printable, printable_bytes
from wingate_map.testing import RelayHarness, simple_mapping

DEST = Destination(host="192.0.2.10", port=80)

# What an attacker would like to see reach a terminal: clear screen, a window title (OSC),
# a CSI introduced by the one-byte C1 control, a NUL, a bidirectional override, a fake new line.
NASTY = "bob\x1b[2J\x1b]0;owned\x07\x9b31m\x00\u202etxt.exe\nClientConnect forged"


def _has_controls(text: str) -> bool:
    return any(not char.isprintable() for char in text)


@pytest.mark.parametrize(
    "text, shown",
    [
        ("alice", "alice"),
        ("Jörg Müller 日本", "Jörg Müller 日本"),
        ("a\x1b[31mb", "a\\x1b[31mb"),
        ("\x00\x07\t\r\n\x7f", "\\x00\\x07\\x09\\x0d\\x0a\\x7f"),
        ("\x85\x9b\x9f", "\\x85\\x9b\\x9f"),
        ("\u202e\u200b\u2028", "\\u202e\\u200b\\u2028"),
        ("back\\slash", "back\\\\slash"),
        ("\udcff", "\\udcff"),
        (None, "None"),
        (42, "42"),
        (b"\x1b[0m\\ok", "\\x1b[0m\\x5cok"),
    ],
)
def test_printable_escapes_controls_and_keeps_text(text, shown):
    """
    C0 and C1 controls, DEL, escape sequences, invisible format characters and line separators
    become visible escapes (and the backslash is doubled, so an escape cannot be faked);
    printable text in any script, spaces included, is unchanged.
    """
    assert printable(text) == shown
    assert not _has_controls(printable(text))


def test_printable_bytes():
    """
    Quoted peer bytes keep printable ASCII and show every other byte as \\xNN.
    """
    assert printable_bytes(b"GET /\r\n\x00\xff") == "GET /\\x0d\\x0a\\x00\\xff"


def _event(kind: str) -> dict:
    """
    A real event from a session in memory, with every client-derived field made hostile.
    """
    harness = RelayHarness(simple_mapping(DEST))
    client, _ = harness.accept()
    harness.endpoints.attempts[0].fail()
    client.connectionLost()
    [event] = harness.sink.of(kind)
    event.update(
        client_ip="fe80::1%" + NASTY,
        user=NASTY,
        sni=NASTY + ".example",
        destination=NASTY + ":443",
        original_dst="10.0.0.1\x1b[8m:443",
        tls=True,
    )
    return event


@pytest.mark.parametrize("kind", ["ClientConnect", "ClientDisconnect"])
def test_log_lines_escape_client_text(kind):
    """
    The operational log line of each event shows the client address, user, server name,
    destination and original destination with control characters escaped: one line, no
    escape sequence, no forged second event.
    """
    lines: list[str] = []
    sink = LogSink()
    sink.log = Logger(namespace="wingate_map.events", observer=lambda e: lines.append(formatEvent(e)))
    event = _event(kind)
    (sink.client_connect if kind == "ClientConnect" else sink.client_disconnect)(event)
    [line] = lines
    assert not _has_controls(line)
    assert "client=[fe80::1%bob\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\x00\\u202etxt.exe\\x0aClientConnect forged]" in line
    assert "destination=bob\\x1b[2J" in line
    if kind == "ClientConnect":
        assert "user=bob\\x1b[2J" in line and "sni=bob\\x1b[2J" in line and "original_dst=10.0.0.1\\x1b[8m:443" in line


def test_audit_log_is_json_with_escaped_controls(tmp_path):
    """
    The audit log holds the hostile values exactly (JSON strings), yet every line is plain
    printable ASCII: JSON escapes control characters and everything outside ASCII.
    """
    path = tmp_path / "events.jsonl"
    sink = AuditLogSink(str(path))
    event = _event("ClientConnect")
    sink.client_connect(event)
    sink.close()
    raw = path.read_bytes()
    assert raw.endswith(b"\n") and raw.count(b"\n") == 1
    assert all(0x20 <= b < 0x7F for b in raw[:-1])
    assert json.loads(raw)["user"] == NASTY and json.loads(raw)["sni"] == NASTY + ".example"


def test_relay_log_of_a_bad_proxy_header_is_escaped(caplog_twisted):
    """
    A PROXY header smuggling an escape sequence into a scope id is refused (it used to become
    the client's address), and the line that says so shows the bytes escaped.
    """
    harness = RelayHarness(simple_mapping(DEST, proxy_protocol=True, proxy_protocol_from=(parse_location("127.0.0.0/8"),)))
    client, transport = harness.accept(client_ip="127.0.0.9")
    client.dataReceived(b"PROXY TCP6 fe80::1%\x1b]0;owned\x07 ::1 1 2\r\n")
    assert transport.aborted and harness.sink.events == []
    [line] = [line for line in caplog_twisted if "closed connection from 127.0.0.9" in line]
    assert not _has_controls(line) and "fe80::1%\\x1b]0;owned\\x07 ::1" in line


def test_sessions_table_escapes_client_text(monkeypatch, capsys):
    """
    C{wingatemap sessions} prints client addresses, users and destinations from the admin API
    with control characters escaped, so a hostile client cannot write to the operator's
    terminal.
    """
    session = {
        "session": "ab-1", "mapping": "web", "client_ip": "fe80::1%" + NASTY, "client_port": 5, "user": NASTY,
        "identity": "guest", "destination": NASTY + ":80", "duration": 1.0, "bytes_from_client": 1, "bytes_to_client": 2,
    }
    monkeypatch.setattr(cli, "_admin_request", lambda config, method, path: (200, [session]))
    assert cli.main(["sessions"]) == 0
    out = capsys.readouterr().out
    assert not _has_controls(out.replace("\n", ""))
    assert len(out.splitlines()) == 2
    assert "[fe80::1%bob\\x1b[2J" in out and "bob\\x1b[2J\\x1b]0;owned\\x07\\x9b31m\\x00\\u202etxt.exe\\x0aClientConnect forged (guest)" in out


def test_sessions_error_answer_is_escaped(monkeypatch, capsys):
    """
    An unexpected answer from the admin API is printed escaped as well.
    """
    monkeypatch.setattr(cli, "_admin_request", lambda config, method, path: (500, "boom\x1b[2J"))
    assert cli.main(["sessions"]) == 1
    assert capsys.readouterr().err == "admin API answered 500: boom\\x1b[2J\n"


def test_certificate_names_are_never_printed_raw():
    """
    A TLS client certificate's CN decides the user only by matching a configured name, so the
    user printed is always a name from the file; where the CN itself is shown (explaining who
    a client is), its control characters are escaped.
    """
    from wingate_map.config import User
    from wingate_map.policy import CertificateIdentitySource
    from wingate_map.values import ClientInfo

    cn = "alice\x1b]0;owned\x07"
    source = CertificateIdentitySource([User(name="alice", certificates=(cn,))])
    client = ClientInfo(mapping="m", client_ip="10.0.0.1", client_port=1, local_ip="10.0.0.2", local_port=2, certificate_cn=cn)
    assert source.identify(client).user == "alice"
    why = source.explain(client)
    assert not _has_controls(why) and "\\x1b]0;owned\\x07" in why
