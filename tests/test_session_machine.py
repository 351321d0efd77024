"""
The relay session's state machine (L{wingate_map.relay._protocol.TRANSITIONS}), in memory.

Every transition of the table is driven once from a real session (RelayHarness: fake
transports, fake endpoints, a test clock) and that session is then brought to its end, which
must send exactly one ClientDisconnect (none for a connection dropped before it became a
session).  The named paths of issue 11 are driven end to end and their events counted; an
input the current phase does not accept is refused; every phase is reachable.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from attrs import define, field
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from wingate_map.config import Destination
from wingate_map.interfaces import IRuleService
from wingate_map.relay._protocol import TRANSITIONS, Phase, RelayProtocol
from wingate_map.testing import RelayHarness, simple_mapping
from wingate_map.tls import ClientTls, ServerTls
from wingate_map.values import ClientInfo

DEST = Destination(host="192.0.2.10", port=80)
DEST2 = Destination(host="192.0.2.11", port=80)
TLS_DEST = Destination(host="192.0.2.20", port=443, tls=ClientTls())
TLS_DEST2 = Destination(host="192.0.2.21", port=443, tls=ClientTls())
IDLE = 100.0
PROXY_HEADER = b"PROXY TCP4 198.51.100.7 192.0.2.1 40000 8080\r\n"


@implementer(IRuleService)
@define
class HeldRules:
    """
    A rule service that answers only when the test says so (the session stays DECIDING).
    """

    inner: Any
    waiting: list[tuple[ClientInfo, Deferred[Any]]] = field(factory=list)

    def decide(self, client: ClientInfo) -> Deferred[Any]:
        """
        See L{IRuleService.decide}: a Deferred the test fires with L{answer} or L{fail}.
        """
        d: Deferred[Any] = Deferred()
        self.waiting.append((client, d))
        return d

    def answer(self) -> None:
        """
        Give the mapping's own decision.
        """
        client, d = self.waiting.pop(0)
        d.callback(self.inner.decide(client))

    def fail(self) -> None:
        """
        The rule service fails.
        """
        _, d = self.waiting.pop(0)
        d.errback(RuntimeError("rule service down"))


@define
class Run:
    """
    One session under test: its harness, client leg, and what the test has already closed.
    """

    harness: RelayHarness
    client: RelayProtocol
    held: HeldRules | None = None
    client_closed: bool = False
    closed_attempts: set[int] = field(factory=set)
    transitions: list[tuple[Phase, str, bool]] = field(factory=list)

    @property
    def attempt(self) -> Any:
        """
        The latest connection attempt.
        """
        return self.harness.endpoints.attempts[-1]

    def lose_client(self, clean: bool = True) -> None:
        """
        The client leg is gone (what the transport reports after a close or an abort).
        """
        assert not self.client_closed
        self.client_closed = True
        self.client.connectionLost(Failure(ConnectionDone() if clean else ConnectionLost()))

    def lose_destination(self, clean: bool = True) -> None:
        """
        The latest destination leg is gone.
        """
        self.closed_attempts.add(len(self.harness.endpoints.attempts) - 1)
        self.attempt.close(clean)

    def finish(self) -> None:
        """
        Bring everything still open to its end, as the reactor would after the relay's closes
        and aborts: answer held decisions and ClientConnects, lose both legs.
        """
        while self.held is not None and self.held.waiting:
            self.held.answer()
        allow = self.harness.sink.allow
        if isinstance(allow, Deferred) and not allow.called:
            allow.callback(True)
        if not self.client_closed:
            self.lose_client(clean=False)
        for index, attempt in enumerate(self.harness.endpoints.attempts):
            if attempt.protocol is not None and index not in self.closed_attempts:
                self.closed_attempts.add(index)
                attempt.close(False)

    def count(self, name: str) -> int:
        """
        How many events called C{name} the session sent.
        """
        return len(self.harness.sink.of(name))


def start(
    monkeypatch: pytest.MonkeyPatch,
    *destinations: Destination,
    hold_rules: bool = False,
    hold_allow: bool = False,
    **mapping: Any,
) -> Run:
    """
    Accept one client on a mapping to C{destinations} (idle_timeout L{IDLE} unless given),
    recording every transition it makes.
    """
    mapping.setdefault("idle_timeout", IDLE)
    harness = RelayHarness(simple_mapping(*(destinations or (DEST,)), **mapping))
    held = None
    if hold_rules:
        held = HeldRules(harness.factory.runtime.rules)
        harness.factory.runtime.rules = held
    if hold_allow:
        harness.sink.allow = Deferred()
    transitions: list[tuple[Phase, str, bool]] = []
    go = RelayProtocol._go

    def recording_go(self: RelayProtocol, input: str) -> bool:
        before = self.phase
        made = go(self, input)
        transitions.append((before, input, made))
        return made

    monkeypatch.setattr(RelayProtocol, "_go", recording_go)
    client, _ = harness.accept()
    return Run(harness, client, held, transitions=transitions)


# -- routes to each phase --------------------------------------------------------------------


def to_pending(mp: pytest.MonkeyPatch, **kw: Any) -> Run:
    """
    A connection on a PROXY-protocol mapping, its header still to come.
    """
    return start(mp, proxy_protocol=True, **kw)


def to_deciding(mp: pytest.MonkeyPatch, **kw: Any) -> Run:
    """
    A session whose rule service has not answered yet.
    """
    return start(mp, hold_rules=True, **kw)


def to_peeking(mp: pytest.MonkeyPatch, **kw: Any) -> Run:
    """
    A peek_sni session waiting for the client's ClientHello.
    """
    return start(mp, peek_sni=True, **kw)


def to_asking(mp: pytest.MonkeyPatch, **kw: Any) -> Run:
    """
    A session whose ClientConnect sinks have not answered yet.
    """
    return start(mp, hold_allow=True, **kw)


def to_connecting(mp: pytest.MonkeyPatch, *destinations: Destination, **kw: Any) -> Run:
    """
    A session connecting its first destination.
    """
    return start(mp, *destinations, **kw)


def to_securing(mp: pytest.MonkeyPatch, *destinations: Destination, **kw: Any) -> Run:
    """
    A session whose TLS destination accepted TCP; its handshake still to come.
    """
    run = start(mp, *(destinations or (TLS_DEST,)), **kw)
    run.attempt.succeed()
    return run


def to_relaying(mp: pytest.MonkeyPatch, **kw: Any) -> Run:
    """
    A session relaying to a plain destination.
    """
    run = start(mp, **kw)
    run.attempt.succeed()
    return run


def to_client_done(mp: pytest.MonkeyPatch, **kw: Any) -> Run:
    """
    A relayed session whose client sent FIN.
    """
    run = to_relaying(mp, **kw)
    run.client.readConnectionLost()
    return run


def to_destination_done(mp: pytest.MonkeyPatch, **kw: Any) -> Run:
    """
    A relayed session whose destination sent FIN.
    """
    run = to_relaying(mp, **kw)
    run.attempt.protocol.readConnectionLost()
    return run


def to_closing(mp: pytest.MonkeyPatch, **kw: Any) -> Run:
    """
    A session a sink refused: closing, its client not gone yet.
    """
    run = start(mp, hold_allow=True, **kw)
    run.harness.sink.allow.callback(False)
    return run


ROUTES: dict[Phase, Callable[..., Run]] = {
    Phase.PENDING: to_pending,
    Phase.DECIDING: to_deciding,
    Phase.PEEKING: to_peeking,
    Phase.ASKING: to_asking,
    Phase.CONNECTING: to_connecting,
    Phase.SECURING: to_securing,
    Phase.RELAYING: to_relaying,
    Phase.CLIENT_DONE: to_client_done,
    Phase.DESTINATION_DONE: to_destination_done,
    Phase.CLOSING: to_closing,
}


# -- inputs ------------------------------------------------------------------------------------


def kill(run: Run) -> None:
    """
    The session is killed (admin API), as the live registry does it.
    """
    assert run.harness.sessions.kill(run.client.session.id)


def shutdown(run: Run) -> None:
    """
    The service stops: every session is terminated with reason shutdown.
    """
    run.harness.sessions.terminate_all("shutdown")


# (phase, input) -> (route keyword arguments or destinations, the action that makes the input).
Action = Callable[[Run], None]
LEG_INPUTS: dict[str, Action] = {
    "lost": lambda run: run.lose_client(clean=True),
    "reset": lambda run: run.lose_client(clean=False),
    "killed": kill,
    "shutdown": shutdown,
    "idle": lambda run: run.harness.clock.advance(IDLE + 1),
    "client_eof": lambda run: run.client.readConnectionLost(),
    "destination_eof": lambda run: run.attempt.protocol.readConnectionLost(),
}


def _asking_then(action: Action) -> Action:
    def act(run: Run) -> None:
        action(run)
        run.harness.sink.allow.callback(True)

    return act


CASES: dict[tuple[Phase, str], tuple[dict[str, Any], Action]] = {
    (Phase.PENDING, "accepted"): ({"route": start}, lambda run: None),
    (Phase.PENDING, "header_read"): ({}, lambda run: run.client.dataReceived(PROXY_HEADER)),
    (Phase.PENDING, "handshake_done"): (
        {"route": start, "tls": ServerTls(cert="unused.pem", key="unused.key")},
        lambda run: run.client.handshakeCompleted(),
    ),
    (Phase.PENDING, "dropped"): ({}, lambda run: run.client.dataReceived(b"GET / HTTP/1.0\r\n\r\n")),
    (Phase.PENDING, "lost"): (  # its TLS handshake failed
        {"route": start, "tls": ServerTls(cert="unused.pem", key="unused.key")},
        lambda run: run.lose_client(clean=False),
    ),
    (Phase.DECIDING, "peek"): ({"route": start, "peek_sni": True}, lambda run: None),
    (Phase.DECIDING, "decided"): ({}, lambda run: run.held.answer()),
    (Phase.DECIDING, "refused"): ({}, lambda run: run.held.fail()),
    (Phase.PEEKING, "peeked"): ({}, lambda run: run.client.dataReceived(b"not a ClientHello\r\n")),
    (Phase.ASKING, "allowed"): ({}, lambda run: run.harness.sink.allow.callback(True)),
    (Phase.ASKING, "refused"): ({}, lambda run: run.harness.sink.allow.callback(False)),
    (Phase.ASKING, "lost"): ({}, _asking_then(LEG_INPUTS["lost"])),
    (Phase.ASKING, "killed"): ({}, _asking_then(kill)),
    (Phase.ASKING, "shutdown"): ({}, _asking_then(shutdown)),
    (Phase.CONNECTING, "connected"): ({}, lambda run: run.attempt.succeed()),
    (Phase.CONNECTING, "handshaking"): ({"destinations": (TLS_DEST,)}, lambda run: run.attempt.succeed()),
    (Phase.CONNECTING, "failover"): ({"destinations": (DEST, DEST2)}, lambda run: run.attempt.fail()),
    (Phase.CONNECTING, "connect_failed"): ({}, lambda run: run.attempt.fail()),
    (Phase.SECURING, "secured"): ({}, lambda run: run.attempt.handshake()),
    (Phase.SECURING, "failover"): ({"destinations": (TLS_DEST, TLS_DEST2)}, lambda run: run.lose_destination(clean=False)),
    (Phase.SECURING, "connect_failed"): ({}, lambda run: run.lose_destination(clean=False)),
    (Phase.CLOSING, "both_done"): ({}, lambda run: run.lose_client(clean=True)),
    # After its FIN the client's leg closing counts as clean: a reset here is the destination's.
    (Phase.CLIENT_DONE, "reset"): ({}, lambda run: run.lose_destination(clean=False)),
}
for _phase in (Phase.CONNECTING, Phase.SECURING, Phase.RELAYING, Phase.CLIENT_DONE, Phase.DESTINATION_DONE):
    for _input in TRANSITIONS[_phase]:
        if _input in LEG_INPUTS:
            CASES.setdefault((_phase, _input), ({}, LEG_INPUTS[_input]))


def drive(monkeypatch: pytest.MonkeyPatch, phase: Phase, input: str) -> Run:
    """
    Reach C{phase}, make C{input}, then bring the session to its end.
    """
    options, action = CASES[(phase, input)]
    options = dict(options)
    route = options.pop("route", ROUTES[phase])
    destinations = options.pop("destinations", ())
    run = route(monkeypatch, *destinations, **options)
    if route is not start:
        assert run.client.phase is phase
    action(run)
    run.finish()
    return run


def test_every_transition_has_a_case():
    """
    The cases below cover exactly the table: a transition added to the table needs a test.
    """
    table = {(phase, input) for phase, inputs in TRANSITIONS.items() for input in inputs}
    assert set(CASES) == table


@pytest.mark.parametrize(("phase", "input"), sorted(CASES, key=lambda case: (list(Phase).index(case[0]), case[1])), ids=lambda v: getattr(v, "value", v))
def test_transition(monkeypatch, phase, input):
    """
    Each transition of the table happens from a real session, and whatever it leads to, the
    session ends with exactly one ClientDisconnect (none if it never became a session), no
    input along the way is refused, and no timer is left running.
    """
    run = drive(monkeypatch, phase, input)
    assert (phase, input, True) in run.transitions
    assert [t for t in run.transitions if not t[2]] == []
    assert run.harness.clock.getDelayedCalls() == []  # no phase's timer outlives it
    if run.client.session is None:
        assert run.client.phase is Phase.DROPPED
        assert run.harness.sink.events == []
    else:
        assert run.client.phase is Phase.ENDED
        assert run.count("ClientConnect") == 1
        assert run.count("ClientDisconnect") == 1
        assert len(run.harness.sessions) == 0


def test_an_illegal_input_is_refused_and_logged(monkeypatch):
    """
    An input the current phase does not accept changes nothing and is logged as a failure.
    """
    run = to_relaying(monkeypatch)
    seen: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        assert run.client._go("allowed") is False
        assert run.client._go("no-such-input") is False
    finally:
        globalLogPublisher.removeObserver(seen.append)
    assert run.client.phase is Phase.RELAYING
    refused = [e for e in seen if e.get("log_failure") is not None and e.get("phase") == "relaying"]
    assert [e["input"] for e in refused] == ["allowed", "no-such-input"]
    run.finish()
    assert run.count("ClientDisconnect") == 1


def test_ended_and_dropped_have_no_way_out():
    """
    ENDED (ClientDisconnect sent) and DROPPED accept no input: a session ends once.
    """
    assert TRANSITIONS[Phase.ENDED] == {} and TRANSITIONS[Phase.DROPPED] == {}
    assert [phase for phase, inputs in TRANSITIONS.items() if Phase.ENDED in inputs.values()] == [Phase.CLOSING]


def test_every_phase_is_reachable_and_can_end():
    """
    From PENDING every phase is reachable, and from every phase ENDED or DROPPED is.
    """
    reached, todo = {Phase.PENDING}, [Phase.PENDING]
    while todo:
        for following in TRANSITIONS[todo.pop()].values():
            if following not in reached:
                reached.add(following)
                todo.append(following)
    assert reached == set(Phase)
    for phase in Phase:
        seen, todo = {phase}, [phase]
        while todo:
            for following in TRANSITIONS[todo.pop()].values():
                if following not in seen:
                    seen.add(following)
                    todo.append(following)
        assert seen & {Phase.ENDED, Phase.DROPPED}, phase


# -- named paths, end to end -------------------------------------------------------------------


def path_refused(mp: pytest.MonkeyPatch) -> Run:
    """
    A sink vetoes the session.
    """
    run = start(mp, hold_allow=True)
    run.harness.sink.allow.callback(False)
    run.lose_client()
    return run


def path_connect_failed_with_failover(mp: pytest.MonkeyPatch) -> Run:
    """
    The first destination refuses, the second too.
    """
    run = start(mp, DEST, DEST2)
    run.attempt.fail()
    run.attempt.fail()
    run.lose_client()
    return run


def path_client_reset_while_connecting(mp: pytest.MonkeyPatch) -> Run:
    """
    The client resets while the destination is still connecting.
    """
    run = start(mp)
    run.lose_client(clean=False)
    return run


def path_kill_while_deciding(mp: pytest.MonkeyPatch) -> Run:
    """
    The session is killed while its rule service has not answered.
    """
    run = start(mp, hold_rules=True)
    kill(run)
    run.lose_client(clean=False)
    run.held.answer()
    return run


def path_idle_timeout(mp: pytest.MonkeyPatch) -> Run:
    """
    A relayed session idles past idle_timeout.
    """
    run = to_relaying(mp)
    run.harness.clock.advance(IDLE + 1)
    run.lose_client(clean=False)
    run.lose_destination(clean=False)
    return run


def path_shutdown_while_peeking(mp: pytest.MonkeyPatch) -> Run:
    """
    The service stops while a peek_sni session waits for its ClientHello.
    """
    run = to_peeking(mp)
    shutdown(run)
    run.lose_client(clean=False)
    return run


def path_destination_reset_while_relaying(mp: pytest.MonkeyPatch) -> Run:
    """
    The destination resets mid-session; the reset is passed on to the client.
    """
    run = to_relaying(mp)
    run.lose_destination(clean=False)
    assert run.harness.endpoints.attempts and run.client.transport.aborted
    run.lose_client(clean=False)
    return run


def path_half_close_client_first(mp: pytest.MonkeyPatch) -> Run:
    """
    The client sends FIN, then the destination: both legs close in order.
    """
    run = to_client_done(mp)
    run.attempt.protocol.readConnectionLost()
    run.lose_destination()
    run.lose_client()
    return run


def path_half_close_destination_first(mp: pytest.MonkeyPatch) -> Run:
    """
    The destination sends FIN, then the client.
    """
    run = to_destination_done(mp)
    run.client.readConnectionLost()
    run.lose_client()
    run.lose_destination()
    return run


PATHS = {
    "refused": (path_refused, "blocked"),
    "connect-failed-with-failover": (path_connect_failed_with_failover, "connect-failed"),
    "client-reset-while-connecting": (path_client_reset_while_connecting, "client-closed"),
    "kill-while-deciding": (path_kill_while_deciding, "killed"),
    "idle-timeout": (path_idle_timeout, "idle-timeout"),
    "shutdown-while-peeking": (path_shutdown_while_peeking, "shutdown"),
    "destination-reset-while-relaying": (path_destination_reset_while_relaying, "destination-closed"),
    "half-close-client-first": (path_half_close_client_first, "client-closed"),
    "half-close-destination-first": (path_half_close_destination_first, "destination-closed"),
}


@pytest.mark.parametrize("name", list(PATHS))
def test_exactly_one_client_disconnect(monkeypatch, name):
    """
    Whichever way a session ends, it sends one ClientConnect and one ClientDisconnect (with the
    reason of what ended it), even when more endings arrive afterwards; it leaves the registry.
    """
    path, reason = PATHS[name]
    run = path(monkeypatch)
    assert run.client.phase is Phase.ENDED
    assert (run.count("ClientConnect"), run.count("ClientDisconnect")) == (1, 1)
    assert run.harness.sink.of("ClientDisconnect")[0]["reason"] == reason
    # Late news changes nothing: another kill, a stray end of input from either leg.
    run.harness.sessions.terminate_all("shutdown")
    run.client.terminate("killed")
    if run.harness.endpoints.attempts and run.attempt.protocol is not None:
        run.attempt.protocol.readConnectionLost()
    assert run.count("ClientDisconnect") == 1
    assert len(run.harness.sessions) == 0
    assert [t for t in run.transitions if not t[2]] == []
