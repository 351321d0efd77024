"""
Routing wired end to end (issue 12 items 1-3): the configuration keys balance, health_check and
weight; the relay trying a destination list in the balancer's order and reporting each attempt
to the destination's health; peeking at the client's TLS ClientHello for its server name
(peek_sni) and relaying the peeked bytes untouched; the sni event field.
"""

from __future__ import annotations

import pytest

from wingate_map.config._model import HealthCheck, parse_config
from wingate_map.errors import ConfigError


def _mapping(extra: str, default: str = '["127.0.0.1:1", "127.0.0.1:2"]') -> str:
    return f'[mappings.m]\nport = 9000\nbind = "127.0.0.1"\ndefault = {default}\n{extra}\n'


def test_balance_health_check_and_weight_are_read():
    """
    balance, health_check (each key optional, with its defaults) and a destination's weight
    are accepted and reach the mapping.
    """
    config = parse_config(
        _mapping(
            'balance = "least-connections"\nhealth_check = { interval = 1, fall = 4 }',
            '["127.0.0.1:1", { host = "127.0.0.1", port = 2, weight = 3 }]',
        )
    )
    mapping = config.mapping("m")
    assert mapping.balance == "least-connections"
    assert mapping.health_check == HealthCheck(interval=1.0, timeout=2.0, fall=4, rise=2)
    assert [d.weight for d in mapping.default] == [1, 3]
    plain = parse_config(_mapping("")).mapping("m")
    assert plain.balance == "failover" and plain.health_check is None


@pytest.mark.parametrize(
    "extra, default, path",
    [
        ('balance = "roundrobin"', None, "mappings.m.balance"),
        ("health_check = { interval = 0 }", None, "mappings.m.health_check.interval"),
        ("health_check = { fall = 0 }", None, "mappings.m.health_check.fall"),
        ("health_check = { every = 5 }", None, "mappings.m.health_check.every"),
        ("health_check = 5", None, "mappings.m.health_check"),
        ('balance = "round-robin"', '[{ host = "a", port = 1, weight = 257 }]', "mappings.m.default[0].weight"),
        ('balance = "round-robin"', '[{ host = "a", port = 1, weight = 0 }]', "mappings.m.default[0].weight"),
    ],
)
def test_bad_values_name_the_key(extra, default, path):
    """
    A bad balance method, health_check value or weight is a configuration error naming its key.
    """
    with pytest.raises(ConfigError) as caught:
        parse_config(_mapping(extra, default) if default else _mapping(extra))
    assert path in str(caught.value)


def test_weight_without_a_weighted_method_is_warned():
    """
    A weight under failover or source-hash does nothing: it is warned about, with its key.
    """
    config = parse_config(_mapping('balance = "source-hash"', '[{ host = "a", port = 1, weight = 2 }, "b:1"]'))
    assert any(w.path == "mappings.m.default[0].weight" for w in config.warnings)


# -- the relay with balancers, in memory --------------------------------------------------------

from twisted.internet.error import ConnectionRefusedError  # noqa: E402
from twisted.logger import capturedLogs  # noqa: E402

from wingate_map.relay._balance import DOWN, UP  # noqa: E402
from wingate_map.relay import build_lists  # noqa: E402
from wingate_map.relay._protocol import Phase  # noqa: E402
from wingate_map.testing import RelayHarness  # noqa: E402

from .test_sni import python_hello  # noqa: E402


def harness(text: str) -> RelayHarness:
    """
    The relay of mapping "m" of configuration C{text}, in memory, with its destination lists.
    """
    mapping = parse_config(text).mapping("m")
    found = RelayHarness(mapping)
    found.factory.runtime.balancers = build_lists(mapping, found.clock)
    return found


def health(found: RelayHarness, rule: int | str = "default"):
    """
    The health of each destination of list C{rule}.
    """
    return found.factory.runtime.balancers[rule].balancer.health


def attempted(found: RelayHarness) -> list[str]:
    """
    The destinations connected to so far, in order.
    """
    return [str(a.destination) for a in found.endpoints.attempts]


def test_a_dead_first_destination_is_skipped_after_fall_failures():
    """
    failover: after fall (3) failed connections in a row to the first destination it is down,
    and the next clients go straight to the second (no attempt, no delay); the first gets one
    real connection again after interval (5 s) and is up at its first success.
    """
    found = harness(_mapping(""))
    for n in range(3):
        found.accept(client_port=1000 + n)
        found.endpoints.attempts[-1].fail(ConnectionRefusedError())
        found.endpoints.attempts[-1].succeed()
    assert attempted(found) == ["127.0.0.1:1", "127.0.0.1:2"] * 3
    assert [h.state for h in health(found)] == [DOWN, UP]
    found.accept(client_port=2000)
    assert attempted(found)[-1] == "127.0.0.1:2" and len(found.endpoints.attempts) == 7
    found.endpoints.attempts[-1].succeed()
    # ClientConnect names the destination chosen: the second.
    assert found.sink.of("ClientConnect")[-1]["destination"] == "127.0.0.1:2"
    found.clock.advance(5)
    found.accept(client_port=2001)
    assert attempted(found)[-1] == "127.0.0.1:1"
    found.endpoints.attempts[-1].succeed()
    assert [h.state for h in health(found)] == [UP, UP]


def test_each_attempt_gets_connect_timeout_then_the_next_is_tried():
    """
    A destination that does not answer costs connect_timeout once per attempt; the next one is
    tried then, and ClientDisconnect names the one actually connected to.
    """
    found = harness(_mapping("connect_timeout = 4"))
    protocol, transport = found.accept()
    found.clock.advance(3.9)
    assert attempted(found) == ["127.0.0.1:1"]
    found.clock.advance(0.1)
    assert attempted(found) == ["127.0.0.1:1", "127.0.0.1:2"]
    found.endpoints.attempts[1].succeed()
    assert protocol.phase is Phase.RELAYING
    assert health(found)[0].last_error == "no connection within 4s"
    transport.loseConnection()
    protocol.connectionLost()
    found.endpoints.attempts[1].close()
    [event] = found.sink.of("ClientDisconnect")
    assert event["destination"] == "127.0.0.1:2"
    assert [h.live for h in health(found)] == [0, 0] and health(found)[1].total == 1


def test_round_robin_with_weights_and_least_connections():
    """
    round-robin spreads new clients by weight; least-connections sends each to the destination
    with the fewest live sessions for its weight.
    """
    default = '[{ host = "127.0.0.1", port = 1, weight = 2 }, "127.0.0.1:2"]'
    found = harness(_mapping('balance = "round-robin"', default))
    for n in range(6):
        found.accept(client_port=1000 + n)
    assert attempted(found) == ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:1"] * 2

    found = harness(_mapping('balance = "least-connections"', default))
    for n in range(3):
        found.accept(client_port=1000 + n)
        found.endpoints.attempts[-1].succeed()
    # Live 2 on the weight-2 destination, 1 on the other: equal per weight.
    assert sorted(attempted(found)) == ["127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:2"]
    assert [h.live for h in health(found)] == [2, 1]


def test_source_hash_keeps_a_client_on_its_destination():
    """
    source-hash: the same client address reaches the same destination every time.
    """
    found = harness(_mapping('balance = "source-hash"', '["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]'))
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
        for port in range(3):
            found.accept(client_ip=ip, client_port=1000 + port)
    chosen = attempted(found)
    assert all(len(set(chosen[i : i + 3])) == 1 for i in range(0, 12, 3))
    assert len(set(chosen)) > 1


def test_a_rule_list_has_its_own_balancer():
    """
    Each destination list (the default, each rule's to) has its own state, named by its rule.
    """
    text = _mapping('balance = "round-robin"\n[[mappings.m.rules]]\nfrom = ["10.9.0.0/16"]\nto = ["127.0.0.1:7", "127.0.0.1:8"]')
    found = harness(text)
    assert set(found.factory.runtime.balancers) == {"default", 0}
    found.accept(client_ip="10.9.0.1")
    found.accept(client_ip="10.9.0.1", client_port=2)
    found.accept(client_ip="10.8.0.1")
    assert attempted(found) == ["127.0.0.1:7", "127.0.0.1:8", "127.0.0.1:1"]
    states = found.factory.runtime.balancers[0].states()
    assert [(s["mapping"], s["rule"], s["destination"]) for s in states] == [("m", 0, "127.0.0.1:7"), ("m", 0, "127.0.0.1:8")]


def test_state_changes_are_logged_once_naming_the_list():
    """
    A destination going down is logged once (a warning naming the mapping, the list and the
    last error), not at every later failure.
    """
    found = harness(_mapping("", '["127.0.0.1:1"]'))
    with capturedLogs() as events:
        for n in range(6):
            found.accept(client_port=1000 + n)
            found.endpoints.attempts[-1].fail(ConnectionRefusedError())
    changes = [e for e in events if e.get("state") == DOWN]
    assert len(changes) == 1
    assert changes[0]["where"] == "mapping m default: " and changes[0]["destination"] == "127.0.0.1:1"


# -- peek_sni, in memory ------------------------------------------------------------------------

SNI_CONFIG = """
[mappings.m]
port = 9000
bind = "127.0.0.1"
peek_sni = true
peek_timeout = 2
default = "127.0.0.1:9"

[[mappings.m.rules]]
sni = ["git.example.com"]
to = "127.0.0.1:1"

[[mappings.m.rules]]
sni = ["*.apps.example.com"]
to = "127.0.0.1:2"
"""


@pytest.mark.parametrize(
    "name, destination",
    [("git.example.com", "127.0.0.1:1"), ("A.B.Apps.Example.com", "127.0.0.1:2"), ("other.example.com", "127.0.0.1:9"), (None, "127.0.0.1:9")],
)
def test_peeked_server_name_chooses_and_the_bytes_pass_untouched(name, destination):
    """
    With peek_sni, the ClientHello (here in three pieces) is read without being consumed: the
    rule matching its server name decides, the sni field carries the name (lowercased), and
    the destination receives exactly the bytes the client sent, then the rest as it comes.
    """
    hello = python_hello(name)
    found = harness(SNI_CONFIG)
    protocol, transport = found.accept()
    assert protocol.phase is Phase.PEEKING and found.endpoints.attempts == []
    assert transport.producerState == "producing"
    for piece in (hello[:3], hello[3:50], hello[50:]):
        protocol.dataReceived(piece)
    assert attempted(found) == [destination]
    assert transport.producerState == "paused"
    [event] = found.sink.of("ClientConnect")
    assert event["sni"] == (name.lower() if name else None) and event["tls"] is False
    attempt = found.endpoints.attempts[0]
    attempt.succeed()
    protocol.dataReceived(b"more")
    assert attempt.transport.value() == hello + b"more"


def test_a_silent_client_goes_on_after_peek_timeout():
    """
    A client that sends nothing (a server-speaks-first protocol) reaches the default after
    peek_timeout, with sni null, and hears its destination's banner.
    """
    found = harness(SNI_CONFIG)
    protocol, transport = found.accept()
    found.clock.advance(1.9)
    assert found.endpoints.attempts == []
    found.clock.advance(0.1)
    assert attempted(found) == ["127.0.0.1:9"]
    assert found.sink.of("ClientConnect")[0]["sni"] is None
    attempt = found.endpoints.attempts[0]
    attempt.succeed()
    attempt.protocol.dataReceived(b"220 banner\r\n")
    assert transport.value() == b"220 banner\r\n" and attempt.transport.value() == b""


def test_not_tls_goes_on_at_once():
    """
    A first byte that cannot start a TLS handshake (plain HTTP) ends the peek at once: the
    client reaches the default with sni null and its request passes unchanged.
    """
    found = harness(SNI_CONFIG)
    protocol, _ = found.accept()
    protocol.dataReceived(b"GET / HTTP/1.1\r\n")
    assert attempted(found) == ["127.0.0.1:9"]
    attempt = found.endpoints.attempts[0]
    attempt.succeed()
    assert attempt.transport.value() == b"GET / HTTP/1.1\r\n"


def test_truncated_hello_then_fin_and_a_reset_while_peeking():
    """
    A client that half-closes in the middle of its ClientHello still gets a session: decided
    with no name, what it sent is relayed and its FIN passed on.  One reset while peeking is a
    session ended at once (both events, reason client-closed), never connected.
    """
    hello = python_hello("git.example.com")
    found = harness(SNI_CONFIG)
    protocol, transport = found.accept()
    protocol.dataReceived(hello[:40])
    protocol.readConnectionLost()
    assert attempted(found) == ["127.0.0.1:9"]
    attempt = found.endpoints.attempts[0]
    attempt.succeed()
    assert attempt.transport.value() == hello[:40] and attempt.transport.write_closed

    protocol, transport = found.accept(client_port=2)
    protocol.dataReceived(hello[:40])
    protocol.connectionLost()
    assert len(found.endpoints.attempts) == 1
    event = found.sink.of("ClientDisconnect")[-1]
    assert event["reason"] == "client-closed" and event["sni"] is None


def test_oversized_hello_is_no_name_and_relayed_whole():
    """
    A handshake record larger than a ClientHello may be is "no server name" at once; every
    byte read is still relayed.
    """
    big = b"\x16\x03\x01\x40\x00" + b"\x01\x00\x3f\xfc" + b"\x00" * 20000
    found = harness(SNI_CONFIG)
    protocol, _ = found.accept()
    protocol.dataReceived(big)
    assert attempted(found) == ["127.0.0.1:9"]
    attempt = found.endpoints.attempts[0]
    attempt.succeed()
    assert attempt.transport.value() == big


# -- end to end: a twistd process, real clients and servers on loopback ---------------------------

import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402

from .helpers import free_port  # noqa: E402
from .test_end_to_end import ENV, WINGATEMAP, Proc  # noqa: E402
from .test_operations import TOKEN, EchoServer, api, connect, events, start  # noqa: E402


class Switchable:
    """
    A tagged echo server on a fixed port that can be stopped and started again.
    """

    def __init__(self, tag: bytes) -> None:
        self.tag = tag
        self.port = free_port()
        self.server: EchoServer | None = None
        self.start()

    def start(self) -> None:
        """
        Listen (again) on the same port.
        """
        import socketserver
        import threading

        tag = self.tag

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                self.request.sendall(tag)
                while data := self.request.recv(65536):
                    self.request.sendall(data)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """
        Stop listening: connections to the port are refused.
        """
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
        self.server = None


def reached(port: int, source: str = "127.0.0.1", size: int = 1) -> bytes:
    """
    Connect to the gateway and read the tag of the echo server reached.
    """
    with connect(port, source) as s:
        return s.recv(size)


def admin_config(admin: int) -> str:
    return f'[service]\naudit_log = "events.jsonl"\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\ntoken = "{TOKEN}"\n'


def by_destination(admin: int) -> dict[str, dict]:
    status, body = api(admin, "GET", "/destinations")
    assert status == 200, body
    return {d["destination"]: d for d in body["destinations"]}


def test_health_transitions_seen_through_destinations_cli_and_metrics(tmp_path):
    """
    With health_check, a destination that stops answering is down after fall failed checks
    (logged once) and clients go to the other; it is up again after rise passed checks.
    GET /destinations, `wingatemap destinations` and /metrics show each state.
    """
    a, b = Switchable(b"A"), Switchable(b"B")
    port, admin = free_port(), free_port()
    text = admin_config(admin) + (
        f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\n'
        "health_check = { interval = 0.2, timeout = 1, fall = 2, rise = 2 }\n"
        f'default = ["127.0.0.1:{a.port}", "127.0.0.1:{b.port}"]\n'
    )
    proc, path = start(tmp_path, text)
    name_a = f"127.0.0.1:{a.port}"
    try:
        proc.wait_line(r"admin API listening")
        states = by_destination(admin)
        assert [states[name_a]["state"], states[f"127.0.0.1:{b.port}"]["state"]] == ["up", "up"]
        assert set(states[name_a]) == {"mapping", "rule", "destination", "state", "since", "live", "total", "last_error"}
        assert states[name_a]["mapping"] == "m" and states[name_a]["rule"] == "default"
        assert reached(port) == b"A"

        a.stop()
        proc.wait_line(rf"destination {re.escape(name_a)} is down: 2 failed checks in a row")
        states = by_destination(admin)
        assert states[name_a]["state"] == "down" and "refused" in states[name_a]["last_error"].lower()
        assert states[name_a]["since"].endswith("Z")
        assert reached(port) == b"B"
        cli = subprocess.run(WINGATEMAP + ["destinations", "--config", str(path)], capture_output=True, text=True, env=ENV, timeout=60)
        assert cli.returncode == 0, cli.stderr
        lines = {line.split()[0]: line.split()[1] for line in cli.stdout.splitlines()[1:]}
        assert lines == {name_a: "down", f"127.0.0.1:{b.port}": "up"}
        status, metrics = api(admin, "GET", "/metrics")
        assert f'wingatemap_destination_up{{destination="{name_a}",mapping="m",rule="default"}} 0.0' in metrics
        failures = re.search(rf'wingatemap_destination_check_failures_total{{destination="{re.escape(name_a)}",mapping="m",rule="default"}} (\S+)', metrics)
        assert failures is not None and float(failures.group(1)) >= 2

        a.start()
        proc.wait_line(rf"destination {re.escape(name_a)} is up: 2 successful checks in a row")
        assert by_destination(admin)[name_a]["state"] == "up"
        assert reached(port) == b"A"
        assert sum(1 for line in proc.lines if f"destination {name_a} is down" in line) == 1
    finally:
        proc.stop()
        a.stop()
        b.stop()


def test_passive_marking_skips_a_dead_first_destination(tmp_path):
    """
    Without health_check, fall (3) refused connections in a row mark the first destination
    down; the next clients go straight to the second without trying it.
    """
    dead, b = free_port(), Switchable(b"B")
    port, admin = free_port(), free_port()
    text = admin_config(admin) + f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\ndefault = ["127.0.0.1:{dead}", "127.0.0.1:{b.port}"]\n'
    proc, _ = start(tmp_path, text)
    try:
        proc.wait_line(r"admin API listening")
        for _ in range(3):
            assert reached(port) == b"B"
        proc.wait_line(rf"destination 127.0.0.1:{dead} is down: 3 failed connections in a row")
        for _ in range(3):
            assert reached(port) == b"B"
        proc.wait_count(r"ClientDisconnect", 6)
        assert sum(1 for line in proc.lines if f"cannot connect to 127.0.0.1:{dead}" in line) == 3
        assert by_destination(admin)[f"127.0.0.1:{dead}"]["state"] == "down"
        assert [e["destination"] for e in events(tmp_path) if e["event"] == "ClientConnect"][3:] == [f"127.0.0.1:{b.port}"] * 3
    finally:
        proc.stop()
        b.stop()


def test_balancing_spreads_over_real_servers(tmp_path):
    """
    round-robin with weights 2, 1, 1 sends 2 of every 4 clients to the first server and one to
    each other; least-connections sends a new client to the server with the fewest live ones;
    source-hash keeps each client address on one server.
    """
    servers = [EchoServer(tag) for tag in (b"1", b"2", b"3")]
    rr, lc, sh, admin = (free_port() for _ in range(4))
    listed = ", ".join(f'{{ host = "127.0.0.1", port = {s.port}, weight = {w} }}' for s, w in zip(servers, (2, 1, 1)))
    plain = ", ".join(f'"127.0.0.1:{s.port}"' for s in servers)
    text = admin_config(admin) + (
        f'[mappings.rr]\nport = {rr}\nbind = "127.0.0.1"\nbalance = "round-robin"\ndefault = [{listed}]\n'
        f'[mappings.lc]\nport = {lc}\nbind = "127.0.0.1"\nbalance = "least-connections"\ndefault = [{plain}]\n'
        f'[mappings.sh]\nport = {sh}\nbind = "127.0.0.1"\nbalance = "source-hash"\ndefault = [{plain}]\n'
    )
    proc, _ = start(tmp_path, text)
    try:
        proc.wait_line(r"admin API listening")
        tags = [reached(rr) for _ in range(40)]
        assert (tags.count(b"1"), tags.count(b"2"), tags.count(b"3")) == (20, 10, 10)

        held = [connect(lc), connect(lc)]
        first = sorted(s.recv(1) for s in held)
        assert len(set(first)) == 2  # the second client went to another server
        missing = ({b"1", b"2", b"3"} - set(first)).pop()
        assert reached(lc) == missing  # the only one with no live session
        for s in held:
            s.close()

        for source in ("127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"):
            assert len({reached(sh, source) for _ in range(4)}) == 1
    finally:
        proc.stop()
        for server in servers:
            server.close()


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")


@needs_openssl
def test_sni_routes_tls_to_the_right_server_without_terminating_it(tmp_path):
    """
    peek_sni with two `openssl s_server` destinations holding different certificates: `openssl
    s_client -servername` reaches the one its rule names and sees (and verifies) that server's
    own certificate, so nothing was terminated; the events carry the name and tls false.  A
    plain-HTTP client reaches the default at once; a silent client whose server speaks first
    reaches its destination after peek_timeout and hears the banner.
    """
    from .pki import PKI

    pki = PKI(tmp_path)
    servers, ports = [], {}
    banner = EchoServer(b"220 banner\r\n")
    try:
        for label, name in (("git", "git.example.com"), ("app", "a.apps.example.com")):
            cert, key = pki.issue(label, name, names=(name,))
            ports[label] = free_port()
            server = Proc(["openssl", "s_server", "-accept", f"127.0.0.1:{ports[label]}", "-cert", cert, "-key", key, "-www"])
            servers.append(server)
            server.wait_line(r"ACCEPT")
        port, admin = free_port(), free_port()
        text = admin_config(admin) + (
            f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\npeek_sni = true\npeek_timeout = 1\ndefault = "127.0.0.1:{banner.port}"\n'
            f'[[mappings.m.rules]]\nsni = ["git.example.com"]\nto = "127.0.0.1:{ports["git"]}"\n'
            f'[[mappings.m.rules]]\nsni = ["*.apps.example.com"]\nto = "127.0.0.1:{ports["app"]}"\n'
        )
        proc, _ = start(tmp_path, text)
        try:
            proc.wait_line(r"admin API listening")
            for name in ("git.example.com", "A.Apps.Example.com"):
                client = subprocess.run(
                    f"openssl s_client -connect 127.0.0.1:{port} -servername {name} -CAfile {pki.ca} -verify_return_error < /dev/null",
                    shell=True, capture_output=True, text=True, timeout=60,
                )
                assert re.search(rf"subject=.*CN ?= ?{re.escape(name.lower())}", client.stdout), client.stdout + client.stderr
                assert "Verify return code: 0 (ok)" in client.stdout

            with connect(port) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert s.recv(12) == b"220 banner\r\n"
            with connect(port) as s:
                assert s.recv(12) == b"220 banner\r\n"
            proc.wait_count(r"ClientDisconnect", 4)
            connects = [e for e in events(tmp_path) if e["event"] == "ClientConnect"]
            assert [e["sni"] for e in connects] == ["git.example.com", "a.apps.example.com", None, None]
            assert [e["rule"] for e in connects] == [0, 1, "default", "default"]
            assert not any(e["tls"] for e in connects)
        finally:
            proc.stop()
    finally:
        for server in servers:
            server.stop()
        banner.close()


def test_tls_listener_sni_is_the_name_asked_for(tmp_path):
    """
    On a TLS listener, the sni field is the server name the client asked for in the handshake
    wingatemap terminated, and rules match it.
    """
    from .pki import PKI

    cert, key = PKI(tmp_path).issue("gw", "gateway", names=("gateway",))
    alpha, other = EchoServer(b"A"), EchoServer(b"O")
    port, admin = free_port(), free_port()
    text = admin_config(admin) + (
        f'[mappings.m]\nport = {port}\nbind = "127.0.0.1"\ntls = {{ cert = "{cert}", key = "{key}" }}\ndefault = "127.0.0.1:{other.port}"\n'
        f'[[mappings.m.rules]]\nsni = ["alpha.example"]\nto = "127.0.0.1:{alpha.port}"\n'
    )
    proc, _ = start(tmp_path, text)
    try:
        proc.wait_line(r"admin API listening")
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        for name, tag in (("Alpha.Example", b"A"), ("beta.example", b"O")):
            with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=30), server_hostname=name) as s:
                assert s.recv(1) == tag
        proc.wait_count(r"ClientDisconnect", 2)
        assert [e["sni"] for e in events(tmp_path) if e["event"] == "ClientConnect"] == ["alpha.example", "beta.example"]
    finally:
        proc.stop()
        alpha.close()
        other.close()
