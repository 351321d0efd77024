"""
The relay in memory: what a client and its destination see, and what the events say.
"""

from __future__ import annotations

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost, TimeoutError
from twisted.python.failure import Failure

from wingate_map.config import Destination, parse_config
from wingate_map.testing import RecordingSink, RelayHarness, simple_mapping

DEST = Destination(host="192.0.2.10", port=80)
DEST2 = Destination(host="192.0.2.11", port=80)


def connected(harness: RelayHarness | None = None):
    harness = harness or RelayHarness(simple_mapping(DEST))
    client, client_t = harness.accept()
    attempt = harness.endpoints.attempts[0]
    attempt.succeed()
    return harness, client, client_t, attempt


def test_client_is_paused_until_destination_connects():
    """
    No client byte is read before the destination is connected; then reading resumes.
    """
    harness = RelayHarness(simple_mapping(DEST))
    client, client_t = harness.accept()
    assert client_t.producerState == "paused"
    assert len(harness.endpoints.attempts) == 1
    harness.endpoints.attempts[0].succeed()
    assert client_t.producerState == "producing"


def test_client_connect_event_comes_before_connecting():
    """
    ClientConnect carries every SPEC field and is emitted before the destination is dialled.
    """
    harness = RelayHarness(simple_mapping(DEST))
    harness.sink.allow = Deferred()
    harness.accept(client_ip="127.0.0.9", client_port=40001)
    assert harness.endpoints.attempts == []
    [event] = harness.sink.of("ClientConnect")
    assert set(event) == {
        "event", "time", "session", "mapping", "client_ip", "client_port", "user", "identity",
        "local_ip", "local_port", "original_dst", "destination", "tls", "rule", "sni", "node",
    }
    assert event["client_ip"] == "127.0.0.9" and event["client_port"] == 40001
    assert event["destination"] == "192.0.2.10:80"
    assert event["rule"] == "default" and event["user"] == "guest" and event["identity"] == "guest"
    assert event["local_port"] == 8080 and event["original_dst"] is None and event["tls"] is False
    assert event["time"].endswith("Z")
    harness.sink.allow.callback(True)
    assert len(harness.endpoints.attempts) == 1


def test_bytes_relayed_both_ways_and_counted():
    """
    Bytes pass unchanged in both directions and the byte counts are exact.
    """
    harness, client, client_t, attempt = connected()
    client.dataReceived(b"hello ")
    client.dataReceived(b"world")
    attempt.protocol.dataReceived(b"\x00\xffreply")
    assert attempt.transport.value() == b"hello world"
    assert client_t.value() == b"\x00\xffreply"
    assert client.session.bytes_from_client == 11
    assert client.session.bytes_to_client == 7


def test_flow_control_registered_both_ways():
    """
    Each leg is the other's streaming producer, so a slow reader pauses the fast writer.
    """
    harness, client, client_t, attempt = connected()
    assert client_t.producer is attempt.transport and client_t.streaming
    assert attempt.transport.producer is client_t and attempt.transport.streaming
    assert client_t.keepalive and attempt.transport.keepalive


def test_half_close_from_client():
    """
    A FIN from the client is passed to the destination, which can still answer; the session
    ends when both are done, with reason client-closed.
    """
    harness, client, client_t, attempt = connected()
    client.dataReceived(b"request")
    client.readConnectionLost()
    assert attempt.transport.write_closed
    assert not client_t.disconnecting
    attempt.protocol.dataReceived(b"response")
    assert client_t.value() == b"response"
    attempt.protocol.readConnectionLost()
    assert client_t.disconnecting and attempt.transport.disconnecting
    attempt.close()
    client.connectionLost(Failure(ConnectionLost()))
    [event] = harness.sink.of("ClientDisconnect")
    assert event["reason"] == "client-closed"
    assert (event["bytes_from_client"], event["bytes_to_client"]) == (7, 8)


def test_half_close_from_destination():
    """
    A FIN from the destination is passed to the client, which can keep sending.
    """
    harness, client, client_t, attempt = connected()
    attempt.protocol.dataReceived(b"banner")
    attempt.protocol.readConnectionLost()
    assert client_t.write_closed and not attempt.transport.disconnecting
    client.dataReceived(b"more")
    assert attempt.transport.value() == b"more"
    client.readConnectionLost()
    attempt.close()
    client.connectionLost()
    [event] = harness.sink.of("ClientDisconnect")
    assert event["reason"] == "destination-closed"


def test_destination_reset_is_passed_on():
    """
    A destination reset mid-stream aborts the client leg, so the client never mistakes a
    truncated stream for a complete one.
    """
    harness, client, client_t, attempt = connected()
    attempt.close(clean=False)
    assert client_t.aborted
    client.connectionLost()
    assert harness.sink.of("ClientDisconnect")[0]["reason"] == "destination-closed"


def test_client_vanishing_aborts_destination():
    """
    A client reset mid-stream aborts the destination leg; reason client-closed.
    """
    harness, client, client_t, attempt = connected()
    client.connectionLost(Failure(ConnectionLost()))
    assert attempt.transport.aborted
    attempt.close(clean=False)
    assert harness.sink.of("ClientDisconnect")[0]["reason"] == "client-closed"
    assert len(harness.sessions) == 0


def test_connect_timeout():
    """
    A destination that does not answer within connect_timeout ends the session with reason
    connect-timeout.
    """
    harness = RelayHarness(simple_mapping(DEST, connect_timeout=5))
    client, client_t = harness.accept()
    attempt = harness.endpoints.attempts[0]
    assert attempt.timeout == 5
    harness.clock.advance(4.9)
    assert not attempt.deferred.called
    harness.clock.advance(0.2)
    assert attempt.deferred.called
    assert client_t.disconnecting
    client.connectionLost()
    [event] = harness.sink.of("ClientDisconnect")
    assert event["reason"] == "connect-timeout"


def test_connect_timeout_reported_by_endpoint():
    """
    A TCP-level connect timeout also counts as connect-timeout.
    """
    harness = RelayHarness(simple_mapping(DEST))
    client, client_t = harness.accept()
    harness.endpoints.attempts[0].fail(TimeoutError())
    client.connectionLost()
    assert harness.sink.of("ClientDisconnect")[0]["reason"] == "connect-timeout"


def test_failover_to_next_destination():
    """
    When the first destination refuses, the next is tried; ClientDisconnect names the one
    actually connected to.
    """
    harness = RelayHarness(simple_mapping(DEST, DEST2))
    client, client_t = harness.accept()
    harness.endpoints.attempts[0].fail()
    assert [a.destination for a in harness.endpoints.attempts] == [DEST, DEST2]
    harness.endpoints.attempts[1].succeed()
    assert harness.sink.of("ClientConnect")[0]["destination"] == "192.0.2.10:80"
    client.connectionLost()
    harness.endpoints.attempts[1].close()
    [event] = harness.sink.of("ClientDisconnect")
    assert event["destination"] == "192.0.2.11:80"


def test_all_destinations_refuse():
    """
    When every destination refuses, the client is closed with reason connect-failed.
    """
    harness = RelayHarness(simple_mapping(DEST, DEST2))
    client, client_t = harness.accept()
    harness.endpoints.attempts[0].fail()
    harness.endpoints.attempts[1].fail()
    assert client_t.disconnecting
    client.connectionLost()
    assert harness.sink.of("ClientDisconnect")[0]["reason"] == "connect-failed"


def test_no_default_means_no_destination():
    """
    A mapping with no destination for this client refuses it: both events, destination null,
    reason no-destination, and nothing dialled.
    """
    harness = RelayHarness(simple_mapping())
    client, client_t = harness.accept()
    assert client_t.disconnecting and harness.endpoints.attempts == []
    client.connectionLost()
    connect, disconnect = harness.sink.events
    assert connect["event"] == "ClientConnect" and connect["destination"] is None and connect["rule"] is None
    assert disconnect["reason"] == "no-destination" and disconnect["bytes_from_client"] == 0


def test_sink_veto_blocks():
    """
    A sink that answers False to ClientConnect blocks the session before anything is dialled.
    """
    harness = RelayHarness(simple_mapping(DEST))
    harness.sink.allow = False
    client, client_t = harness.accept()
    assert harness.endpoints.attempts == [] and client_t.disconnecting
    client.connectionLost()
    assert harness.sink.of("ClientDisconnect")[0]["reason"] == "blocked"


def test_client_leaves_while_sink_deliberates():
    """
    A client gone before the ClientConnect chain answers gets ClientDisconnect only after it,
    and nothing is dialled.
    """
    harness = RelayHarness(simple_mapping(DEST))
    harness.sink.allow = Deferred()
    client, client_t = harness.accept()
    client.connectionLost()
    assert harness.sink.of("ClientDisconnect") == []
    harness.sink.allow.callback(True)
    assert harness.endpoints.attempts == []
    assert [e["event"] for e in harness.sink.events] == ["ClientConnect", "ClientDisconnect"]
    assert harness.sink.events[1]["reason"] == "client-closed"


def test_client_leaves_while_connecting():
    """
    A client gone while its destination is being dialled cancels the attempt.
    """
    harness = RelayHarness(simple_mapping(DEST))
    client, client_t = harness.accept()
    attempt = harness.endpoints.attempts[0]
    client.connectionLost()
    assert attempt.deferred.called
    assert harness.sink.of("ClientDisconnect")[0]["reason"] == "client-closed"


def test_idle_timeout():
    """
    A session with no traffic either way for idle_timeout seconds is ended (idle-timeout);
    traffic in either direction keeps it alive.
    """
    harness, client, client_t, attempt = connected(RelayHarness(simple_mapping(DEST, idle_timeout=10)))
    harness.clock.advance(8)
    attempt.protocol.dataReceived(b"x")
    harness.clock.advance(8)
    assert not client_t.aborted
    client.dataReceived(b"y")
    harness.clock.advance(9.9)
    assert not client_t.aborted
    harness.clock.advance(0.2)
    assert client_t.aborted and attempt.transport.aborted
    client.connectionLost()
    attempt.close(clean=False)
    assert harness.sink.of("ClientDisconnect")[0]["reason"] == "idle-timeout"


def test_kill_ends_session():
    """
    Killing a live session through the registry aborts both legs with reason killed.
    """
    harness, client, client_t, attempt = connected()
    assert harness.sessions.kill(client.session.id)
    assert client_t.aborted and attempt.transport.aborted
    client.connectionLost()
    attempt.close(clean=False)
    assert harness.sink.of("ClientDisconnect")[0]["reason"] == "killed"
    assert not harness.sessions.kill(client.session.id)


def test_exactly_one_event_of_each():
    """
    However a session ends, it gets exactly one ClientConnect then one ClientDisconnect.
    """
    harness, client, client_t, attempt = connected()
    client.readConnectionLost()
    client.readConnectionLost()
    attempt.protocol.readConnectionLost()
    attempt.protocol.readConnectionLost()
    harness.sessions.kill(client.session.id)
    client.connectionLost()
    attempt.close()
    assert [e["event"] for e in harness.sink.events] == ["ClientConnect", "ClientDisconnect"]


def test_duration_uses_the_clock():
    """
    The duration is measured on the reactor's clock.
    """
    harness, client, client_t, attempt = connected()
    harness.clock.advance(2.5)
    client.connectionLost()
    attempt.close()
    assert harness.sink.of("ClientDisconnect")[0]["duration"] == 2.5


# -- a half-close before the destination is ready ----------------------------------------------


def test_half_close_while_deciding_is_passed_on_once_connected():
    """
    A client that sends its request and half-closes while its destination is still being
    chosen (as a TLS client's close_notify arrives with its first bytes) is not closed: the
    request and then the FIN reach the destination once it is connected, and the answer
    reaches the client.
    """
    harness = RelayHarness(simple_mapping(DEST))
    harness.sink.allow = Deferred()
    client, client_t = harness.accept()
    client.dataReceived(b"request")
    client.readConnectionLost()
    assert not client_t.disconnecting
    harness.sink.allow.callback(True)
    attempt = harness.endpoints.attempts[0]
    attempt.succeed()
    assert attempt.transport.value() == b"request" and attempt.transport.write_closed
    attempt.protocol.dataReceived(b"answer")
    assert client_t.value() == b"answer" and not client_t.disconnecting
    attempt.protocol.readConnectionLost()
    assert client_t.disconnecting
    attempt.close()
    client.connectionLost()
    [event] = harness.sink.of("ClientDisconnect")
    assert event["reason"] == "client-closed"
    assert (event["bytes_from_client"], event["bytes_to_client"]) == (7, 6)


def test_half_close_while_connecting_is_passed_on_once_connected():
    """
    A client that half-closes while its destination is being connected is not closed; its
    request and FIN are passed on when the destination connects, and reading is not resumed
    on a client that has finished sending.
    """
    harness = RelayHarness(simple_mapping(DEST))
    client, client_t = harness.accept()
    attempt = harness.endpoints.attempts[0]
    client.dataReceived(b"request")
    client.readConnectionLost()
    assert not client_t.disconnecting
    attempt.succeed()
    assert attempt.transport.value() == b"request" and attempt.transport.write_closed
    assert client_t.producerState == "paused"
    attempt.protocol.dataReceived(b"answer")
    assert client_t.value() == b"answer"


def test_half_close_then_no_destination_reachable_closes_the_client():
    """
    A client that half-closed while connecting is closed when no destination can be reached.
    """
    harness = RelayHarness(simple_mapping(DEST))
    client, client_t = harness.accept()
    client.readConnectionLost()
    harness.endpoints.attempts[0].fail()
    assert client_t.disconnecting
    client.connectionLost()
    assert harness.sink.of("ClientDisconnect")[0]["reason"] == "connect-failed"


# -- limits and refusals before the handlers ---------------------------------------------------


class HandlerSink(RecordingSink):
    """
    Stands for a configured handler: it does not hear sessions refused before the handlers.
    """

    hears_refused = False


def harness_with_handler(mapping):
    """
    A harness for C{mapping} whose event chain also has a L{HandlerSink}.
    """
    harness = RelayHarness(mapping)
    handler = HandlerSink()
    harness.factory.runtime.events.subscribe(handler)
    return harness, handler


REFUSED_MAPPINGS = {
    "limit": "max_connections = 1\ndefault = \"192.0.2.10:80\"",
    "rejected": "default = \"192.0.2.10:80\"\n[[mappings.m.rules]]\nfrom = [\"127.0.0.0/8\"]\naction = \"reject\"",
    "no-destination": "",
}


@pytest.mark.parametrize("reason", sorted(REFUSED_MAPPINGS))
def test_refused_sessions_have_both_events_but_no_handler_hears_them(reason):
    """
    A session refused before the handlers (over a limit, rejected, no destination) gets its
    ClientConnect and ClientDisconnect on the other sinks, while the handlers hear neither.
    """
    mapping = parse_config(f"[mappings.m]\nport = 8080\n{REFUSED_MAPPINGS[reason]}\n").mapping("m")
    harness, handler = harness_with_handler(mapping)
    if reason == "limit":
        harness.accept(client_port=1)
        harness.endpoints.attempts[0].succeed()
    client, client_t = harness.accept(client_port=2)
    assert client_t.disconnecting
    client.connectionLost()
    refused = [e for e in harness.sink.events if e["client_port"] == 2]
    assert [(e["event"], e.get("reason")) for e in refused] == [("ClientConnect", None), ("ClientDisconnect", reason)]
    assert [e for e in handler.events if e["client_port"] == 2] == []


def test_handlers_hear_sessions_they_block_and_failed_connections():
    """
    Sessions that were offered to the handlers (blocked by a sink, or failing to connect
    after being allowed) are heard by the handlers from start to end.
    """
    harness, handler = harness_with_handler(simple_mapping(DEST))
    client, client_t = harness.accept()
    harness.endpoints.attempts[0].fail()
    client.connectionLost()
    handler.allow = False
    client, client_t = harness.accept()
    client.connectionLost()
    assert [(e["event"], e.get("reason")) for e in handler.events] == [
        ("ClientConnect", None), ("ClientDisconnect", "connect-failed"), ("ClientConnect", None), ("ClientDisconnect", "blocked"),
    ]


def test_rule_service_failure_still_gives_both_events():
    """
    When the rule service fails, the session gets ClientConnect and ClientDisconnect
    (no-destination), and no handler hears it.
    """

    class Broken:
        def decide(self, client):
            raise RuntimeError("rules exploded")

    harness = RelayHarness(simple_mapping(DEST), rules=Broken())
    handler = HandlerSink()
    harness.factory.runtime.events.subscribe(handler)
    client, client_t = harness.accept()
    client.connectionLost()
    assert [(e["event"], e.get("reason")) for e in harness.sink.events] == [("ClientConnect", None), ("ClientDisconnect", "no-destination")]
    assert handler.events == []


# -- pending connections count against the limits ---------------------------------------------


def pending_mapping(extra):
    """
    A mapping "m" expecting PROXY headers, with the C{extra} TOML lines.
    """
    return parse_config(f"[mappings.m]\nport = 8080\nproxy_protocol = true\ndefault = \"192.0.2.10:80\"\n{extra}\n").mapping("m")


def test_pending_connections_count_for_their_peer():
    """
    With max_connections_per_client = 1, a peer still sending its PROXY header holds its one
    connection: its further connections are closed at once (no session, no event), and the
    first becomes a session once its header arrives.
    """
    harness = RelayHarness(pending_mapping("max_connections_per_client = 1"))
    first, first_t = harness.accept(client_port=1)
    others = [harness.accept(client_port=2 + i) for i in range(5)]
    assert not first_t.aborted and all(t.aborted for _, t in others)
    for protocol, _ in others:
        protocol.connectionLost()
    assert harness.sink.events == [] and harness.sessions.connections("m") == 1
    first.dataReceived(b"PROXY TCP4 10.1.2.3 10.0.0.1 4000 8080\r\n")
    assert [e["client_ip"] for e in harness.sink.of("ClientConnect")] == ["10.1.2.3"]
    assert harness.sessions.connections("m") == 1 and harness.sessions.connections("m", "127.0.0.5") == 0


def test_trusted_proxy_pending_connections_count_only_for_the_mapping():
    """
    Connections from a trusted PROXY sender (proxy_protocol_from) are not counted against that
    sender's per-client limit while their headers arrive, but max_connections counts them.
    """
    harness = RelayHarness(pending_mapping('proxy_protocol_from = ["127.0.0.5"]\nmax_connections_per_client = 1\nmax_connections = 3'))
    accepted = [harness.accept(client_port=1 + i) for i in range(4)]
    assert [t.aborted for _, t in accepted] == [False, False, False, True]
    accepted[3][0].connectionLost()
    for i, (protocol, _) in enumerate(accepted[:3]):
        protocol.dataReceived(b"PROXY TCP4 10.1.2.%d 10.0.0.1 4000 8080\r\n" % (i + 1))
    assert len(harness.sink.of("ClientConnect")) == 3 and harness.sink.of("ClientDisconnect") == []


def test_a_pending_connection_that_ends_stops_counting():
    """
    A pending connection that closes, or whose header times out, no longer counts.
    """
    harness = RelayHarness(pending_mapping("max_connections = 1"))
    first, _ = harness.accept(client_port=1)
    first.connectionLost()
    assert harness.sessions.connections("m") == 0
    second, second_t = harness.accept(client_port=2)
    harness.clock.advance(60)
    assert second_t.aborted
    second.connectionLost()
    third, third_t = harness.accept(client_port=3)
    assert not third_t.aborted and harness.sessions.connections("m") == 1


def test_limit_check_failure_still_gives_both_events():
    """
    When the cluster-wide limit check fails (before ClientConnect), the session still gets
    ClientConnect and ClientDisconnect (no-destination), and no handler hears it.
    """
    from twisted.internet.defer import fail

    class BrokenCluster:
        def admit(self, mapping, session):
            return fail(RuntimeError("store exploded"))

        def ended(self, mapping, session):
            pass

    harness, handler = harness_with_handler(simple_mapping(DEST))
    harness.factory.runtime.cluster = BrokenCluster()
    client, client_t = harness.accept()
    assert client_t.disconnecting
    client.connectionLost()
    assert [(e["event"], e.get("reason")) for e in harness.sink.events] == [("ClientConnect", None), ("ClientDisconnect", "no-destination")]
    assert handler.events == []
