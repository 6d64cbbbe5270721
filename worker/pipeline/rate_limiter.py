"""Client-side adaptive rate limiting: learn Connect's shared quota, and pace sends under it.

Connect answers 429 when the account's token bucket is empty; its size is not published and it
is shared by every replica. The limiter paces calls evenly at a rate it learns:

- start: the rate doubles every `start_doubling_seconds` while sends queue up behind it;
- on a throttle: keep the rate for a short measuring interval. With the quota's bucket empty,
  the successes in that interval are exactly what the quota lets through, so the new rate is
  `cut_to` times that measured rate (never below a quarter of the old one). Throttles during
  the interval are expected and cause no further cut;
- steady: while sends queue up, the rate climbs back by `increase_per_second` of itself up to
  the last measured quota, then creeps beyond it from `probe_per_second`, a pace that doubles
  every `probe_doubling_seconds` without a throttle, so a raised quota, or the share of a
  replica that left, is found again within seconds; the next throttle measures again.
  Creeping slowly just past the quota drains its bucket slowly, so a measurement costs about
  one throttled call.

The rate only grows while the limiter is the bottleneck, so an idle worker does not talk
itself into a rate it never tried.

Pacing is a token bucket refilled at the rate, holding at most `burst_seconds` of it (never less
than one call). At the small rates of a real quota it holds one token: calls are spaced evenly.
When the limiter is far from the bottleneck (a large quota), calls take a token and go without
waiting, in the bursts the broker delivers them in: pacing them one by one would cost every
process on the path (worker, broker, Connect's side) a wake-up per event.
"""

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

# A waiting call looks at the rate again this often, so a change applies at once.
MAX_SLEEP_SECONDS = 0.01
# A token refilled by a sleep of exactly the computed length may fall short by a rounding error.
ROUNDING = 1e-9


@dataclass(frozen=True)
class RateLimitConfig:
    """Tuning of the adaptive limiter; rates in requests per second."""

    initial_rate: float = 20.0
    min_rate: float = 0.2
    max_rate: float = 10_000.0
    start_doubling_seconds: float = 0.25
    increase_per_second: float = 0.02
    probe_per_second: float = 0.005
    probe_doubling_seconds: float = 1.5
    cut_to: float = 0.97
    measure_seconds: float = 0.3
    measure_min_calls: int = 8
    burst_seconds: float = 0.05


class AdaptiveRateLimiter:
    """Pace calls at a learned rate; tell it about every success and every throttle."""

    def __init__(
        self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.config = config
        self._clock = clock
        self.rate = config.initial_rate
        self.throttles = 0
        self._starting = True
        self._turns = asyncio.Lock()
        self._tokens = 1.0
        self._refilled = clock()
        self._last_cut = -math.inf
        self._last_growth = clock()
        self._last_wait = -math.inf
        self._busy_since = -math.inf
        self._above_since = clock()
        self._measure_start: float | None = None
        self._measure_until = 0.0
        self._measured = 0
        self._measured_quota = math.inf

    @property
    def measuring(self) -> bool:
        """Return True while the limiter is measuring the quota after a throttle."""
        return self._measure_start is not None

    async def acquire(self) -> float:
        """Wait for this call's turn; return the time it is sent at (for `on_throttle`).

        A call goes at once while the bucket holds a token and nobody queues before it.
        Otherwise callers queue on a fair lock and only the first one waits, for the next
        token at the rate of the time: a slot reserved far ahead at an old rate would hold the
        pace down after the rate grew, or let it run too fast after a cut.
        """
        now = self._clock()
        if not self._turns.locked() and self._take(now):
            return now
        self._note_wait(now)
        async with self._turns:
            while True:
                now = self._clock()
                if self._take(now):
                    return now
                self._note_wait(now)
                wait = (1.0 - self._tokens) / self.rate
                await asyncio.sleep(min(wait, MAX_SLEEP_SECONDS))

    def _take(self, now: float) -> bool:
        """Refill the bucket up to now and take a token from it if there is one."""
        capacity = max(1.0, self.rate * self.config.burst_seconds)
        self._tokens = min(capacity, self._tokens + (now - self._refilled) * self.rate)
        self._refilled = now
        if self._tokens < 1.0 - ROUNDING:
            return False
        self._tokens = max(0.0, self._tokens - 1.0)
        return True

    def on_success(self) -> None:
        """Count a call that got through, and let the rate grow if it holds sends back."""
        now = self._clock()
        # Only time spent as the bottleneck earns growth, not an idle spell before it.
        elapsed = now - max(self._last_growth, self._busy_since)
        self._last_growth = now
        if self.measuring:
            self._measured += 1
            self._finish_measuring_if_due(now)
            return
        if now - self._last_wait >= 1.0:
            return  # not the bottleneck: no evidence that a higher rate would pass
        if self._starting:
            growth = 2.0 ** (elapsed / self.config.start_doubling_seconds)
        elif self.rate < self._measured_quota:
            growth = 1.0 + self.config.increase_per_second * elapsed
            self._above_since = now
        else:
            # Convex, as CUBIC: slow just past the last measurement, faster the longer no
            # throttle comes, so a quota freed by a replica that finished is taken up in
            # seconds.
            above = now - self._above_since
            pace = self.config.probe_per_second * 2.0 ** (
                above / self.config.probe_doubling_seconds
            )
            growth = 1.0 + pace * elapsed
        self._set_rate(self.rate * growth)

    def on_throttle(self, sent_at: float) -> None:
        """Start measuring the quota, unless a measurement already answers this throttle."""
        self.throttles += 1
        now = self._clock()
        if self.measuring:
            self._finish_measuring_if_due(now)
            return
        if sent_at < self._last_cut:
            return  # sent at a rate that has since been cut
        self._starting = False
        self._measure_start = now
        self._measure_until = now + max(
            self.config.measure_seconds, self.config.measure_min_calls / self.rate
        )
        self._measured = 0

    def _note_wait(self, now: float) -> None:
        """Note that a call had to wait: the limiter is the bottleneck (since when, if new)."""
        if now - self._last_wait >= 1.0:
            self._busy_since = now
        self._last_wait = now

    def _finish_measuring_if_due(self, now: float) -> None:
        """Set the rate under what the quota let through during the measuring interval."""
        if self._measure_start is None or now < self._measure_until:
            return
        quota = self._measured / (now - self._measure_start)
        self._measured_quota = quota
        self._above_since = now
        self._set_rate(min(self.rate, max(self.config.cut_to * quota, self.rate / 4)))
        self._measure_start = None
        self._last_cut = now
        self._last_growth = now

    def _set_rate(self, rate: float) -> None:
        """Keep the rate within its configured bounds."""
        self.rate = min(self.config.max_rate, max(self.config.min_rate, rate))
