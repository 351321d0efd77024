"""
What an idle plain-TCP session keeps in memory once the socket pump owns its sockets: not the
Twisted transports (and destination protocol, connector, factory) the pump took them from.
The figure itself (KB per idle session) is measured by bench/idlemem.py, never by a test.
"""

from __future__ import annotations

import gc

import pytest
import pytest_twisted
from twisted.internet import tcp
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol

from wingate_map.relay._pump import SocketPump

from .helpers import Peer, PeerFactory, free_port, mapping_config, relay_of, start_service, wait_for


def reactor():
    from twisted.internet import reactor as r

    return r


def _transports_over(*socks) -> list[tcp.Connection]:
    """
    The Twisted TCP connections still alive that wrap one of C{socks}.
    """
    gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, tcp.Connection) and any(getattr(o, "socket", None) is s for s in socks)]


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
@pytest_twisted.inlineCallbacks
def test_a_wired_plain_session_lets_go_of_its_twisted_transports(host):
    """
    Once a plain TCP session is relayed by the socket pump, no Twisted transport of either leg
    stays alive (they would cost about 1 KB per idle session); the session still relays both
    ways and can still be killed, with its ClientDisconnect.  Destinations given by IP literal
    and by name (connected through an endpoint, with a protocol and a connector) alike.
    """
    servers = PeerFactory(half_close=False, close_on_eof=False)
    server_port = yield TCP4ServerEndpoint(reactor(), 0, interface="127.0.0.1").listen(servers)
    port = free_port()
    service, sink = start_service(mapping_config(port, f'{{ host = "{host}", port = {server_port.getHost().port} }}'))
    try:
        client = Peer(half_close=False, close_on_eof=False)
        yield connectProtocol(TCP4ClientEndpoint(reactor(), "127.0.0.1", port), client)
        server = yield servers.next_peer(0)
        yield wait_for(lambda: len(service.sessions.live()) == 1 and relay_of(service.sessions.live()[0])._pump is not None)
        [session] = service.sessions.live()
        relay = relay_of(session)
        pump = relay._pump
        assert type(pump) is SocketPump
        assert relay.transports() is None
        assert _transports_over(pump.client.sock, pump.destination.sock) == []
        # Still a working session: bytes both ways, then a kill.
        client.transport.write(b"ping")
        yield server.when_received(4)
        server.transport.write(b"pong!")
        yield client.when_received(5)
        assert service.sessions.kill(session.id)
        [event] = yield sink.disconnects(1)
        assert event["reason"] == "killed"
        assert event["bytes_from_client"] == 4 and event["bytes_to_client"] == 5
        yield client.lost
    finally:
        yield service.stopService()
        yield server_port.stopListening()
