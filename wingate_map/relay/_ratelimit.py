"""
Bandwidth limits (C{rate_limit}): rates in bits per second, token buckets counting bytes, a
L{Limiter} that lets a read through only as far as every bucket it is subject to allows (session,
client address, mapping), and a L{Throttle} that enforces it with flow control: it pauses the
reading side until the bytes it may not pass yet are allowed, so that a limited session holds at
most one read's worth of data, never a growing buffer.  (The socket pump does better: it asks the
L{Limiter} how much is available and reads no more, so nothing is held at all.)  L{RateLimits}
keeps a process's shared buckets: one per client address and one per mapping, per direction.

Rates: C{rate_limit} values are strings of a decimal number, an optional decimal prefix C{k}
(1000), C{M} (1000000) or C{G} (10**9) and the unit C{bit}, optionally C{bit/s}: C{"512kbit"},
C{"50Mbit"}, C{"1.5Gbit/s"}.  The unit is required, so that bits and bytes cannot be confused;
prefixes are read case-insensitively (C{"50mbit"} is 50 Mbit/s, as in tc), since no one means
millibits.

Burst: a bucket starts full and holds at most its burst: by default a tenth of a second's worth
(at least 16 KiB), never more than one second's worth, so that a limit holds within a few
percent over any few seconds.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: Default burst: this many seconds' worth of the rate...
BURST_SECONDS = 0.1
#: ...but at least this many bytes (one large read), and never more than one second's worth.
MIN_BURST = 16 * 1024

# Rounding guard for float token counts: a bucket refilled for exactly the computed delay must
# allow the bytes it was computed for.
_EPSILON = 1e-6


def default_burst(rate: float) -> float:
    """
    The burst, in bytes, of a bucket passing C{rate} bytes per second: L{BURST_SECONDS} of it,
    at least L{MIN_BURST} bytes, at most one second's worth.
    """
    return min(rate, max(rate * BURST_SECONDS, MIN_BURST))


class TokenBucket:
    """
    A token bucket of bytes: it fills at C{rate} bytes per second up to C{burst} bytes, and each
    byte passed takes one token.  Shared by every session it limits (one per client address or
    per mapping, for instance).
    """

    def __init__(self, rate: float, burst: float | None = None, clock: IReactorTime | None = None) -> None:
        """
        @param rate: bytes per second, more than 0.
        @param burst: the most bytes passed at once after a quiet time; at least 1, at most
            C{rate} (one second's worth); default L{default_burst}.
        @param clock: where time comes from (the reactor; a L{twisted.internet.task.Clock} in
            tests).
        """
        if not rate > 0:
            raise ValueError(f"a rate must be more than 0 bytes per second, not {rate!r}")
        burst = default_burst(rate) if burst is None else burst
        if not 1 <= burst <= rate:
            raise ValueError(f"a burst must be between 1 byte and one second's worth ({rate:g} bytes), not {burst!r}")
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._updated = clock.seconds()

    def _refill(self) -> None:
        now = self._clock.seconds()
        # The reactor's clock is wall-clock time: if it steps back, refill nothing rather than
        # go negative; the bucket stays capped at its burst whatever the step forward.
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._updated = now

    def available(self) -> int:
        """
        How many bytes may pass now.
        """
        self._refill()
        return int(self._tokens + _EPSILON)

    def take(self, n: int) -> int:
        """
        Let up to C{n} bytes pass now: how many may (0 to C{n}), taken from the bucket.
        """
        allowed = max(0, min(n, self.available()))
        self._tokens -= allowed
        return allowed

    def delay_for(self, n: int) -> float:
        """
        Seconds until C{n} bytes may pass (0 if they may now).  C{n} is counted as at most the
        burst, since the bucket never holds more: ask again for the rest after taking it.
        """
        self._refill()
        missing = min(n, self.burst) - self._tokens
        return max(0.0, missing / self.rate)


class Limiter:
    """
    Several buckets that one stream is subject to at once (its session's, its client address's,
    its mapping's, in one direction): a read may pass only as far as all of them allow, and what
    passes is taken from each.
    """

    def __init__(self, buckets: Iterable[TokenBucket]) -> None:
        self.buckets = tuple(buckets)

    def available(self) -> int:
        """
        How many bytes every bucket allows now (what a reader may read without holding any).
        """
        return min([2**62, *(bucket.available() for bucket in self.buckets)])

    def take(self, n: int) -> int:
        """
        Let up to C{n} bytes pass now: as many as every bucket allows, taken from all of them.
        """
        allowed = min([n, *(bucket.available() for bucket in self.buckets)])
        for bucket in self.buckets:
            bucket.take(allowed)
        return max(0, allowed)

    def delay_for(self, n: int) -> float:
        """
        Seconds until every bucket allows C{n} bytes (each counting at most its burst).
        """
        return max([0.0, *(bucket.delay_for(n) for bucket in self.buckets)])

    @property
    def burst(self) -> float:
        """
        The most bytes that can ever pass at once: the smallest burst (infinite with no bucket).
        """
        return min([math.inf, *(bucket.burst for bucket in self.buckets)])


class Throttle:
    """
    Passes one direction of a session through a L{Limiter} using flow control.

    Each read is handed to L{write}: what the limiter allows goes on at once; the rest is held,
    the reading side is paused, and when the limiter allows more the held bytes go on and
    reading resumes.  So at most what the source sent before it was paused (one read) is held.
    With several reasons to pause a transport (the other side is slow too), the caller combines
    C{pause}/C{resume} with them.
    """

    def __init__(
        self,
        limiter: Limiter,
        clock: IReactorTime,
        write: Callable[[bytes], object],
        pause: Callable[[], object],
        resume: Callable[[], object],
    ) -> None:
        """
        @param write: passes bytes on (to the other leg's transport).
        @param pause: stops the source from reading (its C{pauseProducing}).
        @param resume: lets it read again (its C{resumeProducing}).
        """
        self._limiter = limiter
        self._clock = clock
        self._write = write
        self._pause = pause
        self._resume = resume
        self._held = bytearray()
        self._wake: IDelayedCall | None = None
        self._when_empty: list[Callable[[], object]] = []

    def when_empty(self, action: Callable[[], object]) -> None:
        """
        Call C{action} once nothing is held (now, if nothing is): what must follow the bytes
        held, such as passing on an end of stream that arrived with them.
        """
        if self._held:
            self._when_empty.append(action)
        else:
            action()

    @property
    def held(self) -> int:
        """
        How many bytes are held, waiting for the limit.
        """
        return len(self._held)

    @property
    def paused(self) -> bool:
        """
        Whether this throttle has the source paused.
        """
        return self._wake is not None

    def write(self, data: bytes) -> None:
        """
        Pass C{data} on as far as the limit allows now; hold the rest and pause the source.
        """
        if self._wake is not None:
            self._held += data  # sent before the pause took effect: wait with the rest
            return
        allowed = self._limiter.take(len(data))
        if allowed:
            self._write(data[:allowed] if allowed < len(data) else data)
        if allowed < len(data):
            self._held += data[allowed:]
            self._pause()
            self._schedule()

    def stop(self) -> None:
        """
        The session is over: drop what is held and cancel the wake-up.
        """
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        self._wake = None
        self._held = bytearray()
        self._when_empty = []

    def _schedule(self) -> None:
        delay = self._limiter.delay_for(len(self._held))
        self._wake = self._clock.callLater(max(delay, 0.001), self._flush)

    def _flush(self) -> None:
        allowed = self._limiter.take(len(self._held))
        if allowed:
            chunk = bytes(self._held[:allowed])
            del self._held[:allowed]
            self._write(chunk)
        if self._held:
            self._schedule()
            return
        self._wake = None
        self._resume()
        actions, self._when_empty = self._when_empty, []
        for action in actions:
            action()


class RateLimits:
    """
    The buckets of every mapping's C{rate_limit} in one process: a session gets its own pair
    (one per direction) and shares its client address's and its mapping's with the other
    sessions of that mapping.  A shared bucket lives while a session uses it (a client that
    comes back after all its sessions ended starts with a full burst).
    """

    def __init__(self, clock: IReactorTime | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self._clock = clock
        self._shared: dict[tuple[object, ...], list[object]] = {}  # key -> [bucket, users]

    def _bucket(self, key: tuple[object, ...], bits: int) -> TokenBucket:
        entry = self._shared.get(key)
        if entry is None:
            entry = self._shared[key] = [TokenBucket(bits / 8, clock=self._clock), 0]
        entry[1] += 1  # type: ignore[operator]
        return entry[0]  # type: ignore[return-value]

    def _release(self, key: tuple[object, ...]) -> None:
        entry = self._shared.get(key)
        if entry is not None:
            entry[1] -= 1  # type: ignore[operator]
            if entry[1] <= 0:
                del self._shared[key]

    def session(self, mapping: str, client_ip: str, per_session: int | None, per_client: int | None, per_mapping: int | None) -> tuple[Limiter | None, Limiter | None, Callable[[], None]]:
        """
        The limiters of a new session of C{mapping} from C{client_ip}: (what the client sends,
        what the destination sends, a call that releases its shared buckets when it ends).
        Rates in bits per second, None for no limit; both limiters None when nothing limits it.
        """
        keys: list[tuple[object, ...]] = []
        limiters: list[Limiter | None] = []
        for direction in ("up", "down"):
            buckets = []
            if per_session:
                buckets.append(TokenBucket(per_session / 8, clock=self._clock))
            for key, bits in (((mapping, client_ip, per_client, direction), per_client), ((mapping, None, per_mapping, direction), per_mapping)):
                if bits:
                    keys.append(key)
                    buckets.append(self._bucket(key, bits))
            limiters.append(Limiter(buckets) if buckets else None)

        def release() -> None:
            for key in keys:
                self._release(key)
            keys.clear()

        return limiters[0], limiters[1], release

    def __len__(self) -> int:
        """
        How many shared buckets are in use.
        """
        return len(self._shared)
