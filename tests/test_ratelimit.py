"""
Bandwidth limits in memory: rates, token buckets, limiters combining a session's, a client's and
a mapping's buckets, and a throttled pump on a simulated clock showing flow control (the source
paused and resumed) keeping the rate within 10 % and the bytes held under the burst.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from wingate_map.relay._ratelimit import MIN_BURST, Limiter, Throttle, TokenBucket, default_burst
from wingate_map.config import parse_rate


@pytest.mark.parametrize(
    "text, bits",
    [
        ("50Mbit", 50_000_000),
        ("100Mbit", 100_000_000),
        ("1Gbit", 1_000_000_000),
        ("512kbit", 512_000),
        ("512Kbit", 512_000),
        ("50mbit", 50_000_000),
        ("1.5Mbit", 1_500_000),
        ("64bit", 64),
        ("10 Mbit/s", 10_000_000),
        (" 2Gbit ", 2_000_000_000),
    ],
)
def test_parse_rate(text, bits):
    """
    Rates are bits per second with an optional decimal prefix k, M or G (any case) and the unit
    bit (or bit/s).
    """
    assert parse_rate(text) == bits


@pytest.mark.parametrize(
    "text, words",
    [
        ("50M", "'50Mbit'"),
        ("50MB", "the unit 'bit'"),
        ("50Mbps", "the unit 'bit'"),
        ("fast", "'512kbit'"),
        ("-5Mbit", "'512kbit'"),
        ("1e6bit", "'512kbit'"),
        ("5Tbit", "'512kbit'"),
        ("0bit", "at least 8bit"),
        ("0.001kbit", "at least 8bit"),
        (50_000_000, "not int"),
    ],
)
def test_bad_rates(text, words):
    """
    A rate without the unit, with another unit or prefix, negative, or under a byte per
    second is refused with a message showing what is allowed.
    """
    with pytest.raises(ValueError) as caught:
        parse_rate(text)
    assert words in str(caught.value)


def test_default_burst():
    """
    The default burst is a tenth of a second's worth, at least 16 KiB, never over one second's
    worth.
    """
    assert default_burst(10_000_000) == 1_000_000
    assert default_burst(50_000) == MIN_BURST
    assert default_burst(1000) == 1000


def test_bucket_starts_full_and_refills():
    """
    A bucket passes its burst at once, then refills at its rate, never beyond the burst.
    """
    clock = Clock()
    bucket = TokenBucket(1000, 500, clock)
    assert bucket.take(800) == 500
    assert bucket.take(1) == 0
    clock.advance(0.1)
    assert bucket.take(1000) == 100
    clock.advance(60)
    assert bucket.available() == 500


def test_bucket_delay_for():
    """
    delay_for says when n bytes will pass, counting at most the burst, and is right: after that
    delay they do pass.
    """
    clock = Clock()
    bucket = TokenBucket(1000, 500, clock)
    assert bucket.delay_for(400) == 0
    bucket.take(500)
    assert bucket.delay_for(250) == pytest.approx(0.25)
    assert bucket.delay_for(10_000) == pytest.approx(0.5)
    for n in (1, 3, 77, 333, 500):
        fresh = TokenBucket(999, 500, clock)
        fresh.take(500)
        clock.advance(fresh.delay_for(n))
        assert fresh.take(n) == n, n


def test_bucket_clock_steps_back():
    """
    If the clock steps back the bucket refills nothing instead of going wrong.
    """
    clock = Clock()
    clock.advance(100)
    bucket = TokenBucket(1000, 1000, clock)
    bucket.take(1000)
    clock.rightNow = 50.0
    assert bucket.available() == 0
    clock.advance(0.5)
    assert bucket.available() == 500


@pytest.mark.parametrize(
    "rate, burst, words",
    [(0, None, "more than 0"), (-1, None, "more than 0"), (1000, 1001, "one second's worth"), (1000, 0.5, "between 1 byte")],
)
def test_bucket_limits(rate, burst, words):
    """
    A rate must be positive; a burst between one byte and one second's worth.
    """
    with pytest.raises(ValueError, match=words):
        TokenBucket(rate, burst, Clock())


def test_limiter_takes_what_all_allow():
    """
    A read passes only as far as every bucket allows, is taken from each, and waits for the
    slowest.
    """
    clock = Clock()
    session, client, mapping = TokenBucket(1000, 1000, clock), TokenBucket(500, 300, clock), TokenBucket(10_000, 5000, clock)
    limiter = Limiter([session, client, mapping])
    assert limiter.burst == 300
    assert limiter.take(1000) == 300
    assert (session.available(), client.available(), mapping.available()) == (700, 0, 4700)
    assert limiter.delay_for(100) == pytest.approx(0.2)
    clock.advance(0.2)
    assert limiter.take(1000) == 100
    assert Limiter([]).take(5) == 5 and Limiter([]).delay_for(5) == 0


def test_client_bucket_shared_by_sessions():
    """
    Two sessions of one client share its bucket: together they pass no more than it allows.
    """
    clock = Clock()
    client = TokenBucket(1000, 1000, clock)
    first = Limiter([TokenBucket(800, 800, clock), client])
    second = Limiter([TokenBucket(800, 800, clock), client])
    assert first.take(800) == 800
    assert second.take(800) == 200


class Source:
    """
    A client sending as fast as it is allowed: every 10 ms, while not paused, one read of
    C{chunk} bytes arrives.
    """

    def __init__(self, clock: Clock, chunk: int) -> None:
        self.clock = clock
        self.chunk = chunk
        self.paused = False
        self.pauses = 0
        self.resumes = 0
        self.sink = None

    def pause(self) -> None:
        assert not self.paused
        self.paused = True
        self.pauses += 1

    def resume(self) -> None:
        assert self.paused
        self.paused = False
        self.resumes += 1

    def tick(self) -> None:
        if not self.paused:
            self.sink.write(b"x" * self.chunk)


def pump(make_limiters, seconds: float = 10, chunk: int = 16 * 1024):
    """
    Run one throttled source per limiter that C{make_limiters(clock)} builds, on a simulated
    clock for C{seconds}: the bytes each passed, the sources, and the most bytes any throttle
    held at once.
    """
    clock = Clock()
    limiters = make_limiters(clock)
    passed = [0] * len(limiters)
    sources, throttles = [], []
    for i, limiter in enumerate(limiters):
        source = Source(clock, chunk)

        def write(data: bytes, i: int = i) -> None:
            passed[i] += len(data)

        throttle = Throttle(limiter, clock, write, source.pause, source.resume)
        source.sink = throttle
        sources.append(source)
        throttles.append(throttle)
    most_held = 0
    for _ in range(int(seconds * 100)):
        for source in sources:
            source.tick()
        most_held = max([most_held, *(t.held for t in throttles)])
        clock.advance(0.01)
    return passed, sources, most_held


def test_throttled_pump_holds_the_rate_by_pausing():
    """
    A client sending 1.6 MB/s through an 8 Mbit/s (1 MB/s) limit is paused and resumed: over 10
    simulated seconds it passes 1 MB/s within 10 %, and the gateway never holds more than the
    burst (in fact at most one read).
    """
    rate = parse_rate("8Mbit") / 8
    buckets = []

    def limiters(clock):
        buckets.append(TokenBucket(rate, None, clock))
        return [Limiter(buckets)]

    passed, (source,), most_held = pump(limiters)
    assert abs(passed[0] / 10 - rate) <= 0.1 * rate, passed
    assert most_held <= min(buckets[0].burst, 16 * 1024)
    assert source.pauses > 10 and source.resumes >= source.pauses - 1


def test_throttled_pump_shared_client_limit():
    """
    Two sessions of one client, each limited to 8 Mbit/s but the client to 4 Mbit/s, pass
    4 Mbit/s together (within 10 %) and share it about evenly, each holding at most one read.
    """

    def limiters(clock):
        client = TokenBucket(500_000, None, clock)
        return [Limiter([TokenBucket(1_000_000, None, clock), client]) for _ in range(2)]

    passed, sources, most_held = pump(limiters)
    assert abs(sum(passed) / 10 - 500_000) <= 50_000, passed
    assert abs(passed[0] - passed[1]) <= 0.2 * max(passed)
    assert most_held <= 16 * 1024
    assert all(source.pauses > 10 for source in sources)


def test_throttle_under_the_limit_never_pauses():
    """
    A session sending less than its limit passes everything at once and is never paused.
    """
    clock = Clock()
    out = []
    paused = []
    throttle = Throttle(Limiter([TokenBucket(1_000_000, None, clock)]), clock, out.append, lambda: paused.append(1), lambda: None)
    for _ in range(100):
        throttle.write(b"y" * 1000)
        clock.advance(0.01)
    assert sum(map(len, out)) == 100_000 and not paused and throttle.held == 0


def test_throttle_keeps_order_and_bytes():
    """
    Bytes pass unchanged and in order, also those sent after the pause took effect, and a read
    larger than the burst passes in pieces.
    """
    clock = Clock()
    out = bytearray()
    state = {"paused": False}
    throttle = Throttle(
        Limiter([TokenBucket(1000, 100, clock)]),
        clock,
        out.extend,
        lambda: state.update(paused=True),
        lambda: state.update(paused=False),
    )
    data = bytes(range(256)) * 2
    throttle.write(data[:300])
    assert state["paused"] and bytes(out) == data[:100]
    throttle.write(data[300:])
    for _ in range(100):
        clock.advance(0.05)
    assert bytes(out) == data and not state["paused"] and throttle.held == 0
    assert not clock.getDelayedCalls()


def test_throttle_stop():
    """
    When the session ends the held bytes are dropped and no wake-up is left behind.
    """
    clock = Clock()
    throttle = Throttle(Limiter([TokenBucket(1000, 100, clock)]), clock, lambda d: None, lambda: None, lambda: None)
    throttle.write(b"z" * 500)
    assert throttle.held == 400 and throttle.paused
    throttle.stop()
    assert throttle.held == 0 and not throttle.paused and not clock.getDelayedCalls()
