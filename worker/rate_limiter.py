"""Client-side adaptive rate limiting: learn Connect's shared quota, and pace sends under it.

Connect answers 429 when the account's token bucket is empty; its size is not published and it
is shared by every replica. The limiter paces calls evenly at a rate it learns:

- start: the rate doubles every `start_doubling_seconds` while sends queue up behind it;
- on a throttle: keep the rate for a short measuring interval. With the quota's bucket empty,
  the successes in that interval are exactly what the quota lets through, so the new rate is
  `cut_to` times that measured rate (never below a quarter of the old one). Throttles during
  the interval are expected and cause no further cut;
- steady: while sends queue up, the rate creeps up by `increase_per_second` of itself, so a
  raised quota, or a replica that left, is found again; the next throttle measures again.

The rate only grows while the limiter is the bottleneck, so an idle worker does not talk
itself into a rate it never tried.
"""

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RateLimitConfig:
    """Tuning of the adaptive limiter; rates in requests per second."""

    initial_rate: float = 20.0
    min_rate: float = 0.2
    max_rate: float = 10_000.0
    start_doubling_seconds: float = 0.25
    increase_per_second: float = 0.02
    cut_to: float = 0.97
    measure_seconds: float = 0.3
    measure_min_calls: int = 8


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
        self._next_slot = clock()
        self._epoch = 0
        self._last_cut = -math.inf
        self._last_growth = clock()
        self._last_wait = -math.inf
        self._measure_start: float | None = None
        self._measure_until = 0.0
        self._measured = 0

    @property
    def measuring(self) -> bool:
        """Return True while the limiter is measuring the quota after a throttle."""
        return self._measure_start is not None

    async def acquire(self) -> float:
        """Wait for this call's turn; return the time it is sent at (for `on_throttle`)."""
        while True:
            now = self._clock()
            slot = max(now, self._next_slot)
            self._next_slot = slot + 1.0 / self.rate
            if slot <= now:
                return now
            self._last_wait = now
            epoch = self._epoch
            await asyncio.sleep(slot - now)
            if self._epoch == epoch:
                return self._clock()
            # The rate was cut while we waited: the slot was spaced for the old rate.

    def on_success(self) -> None:
        """Count a call that got through, and let the rate grow if it holds sends back."""
        now = self._clock()
        elapsed, self._last_growth = now - self._last_growth, now
        if self.measuring:
            self._measured += 1
            self._finish_measuring_if_due(now)
            return
        if now - self._last_wait >= 1.0:
            return  # not the bottleneck: no evidence that a higher rate would pass
        if self._starting:
            growth = 2.0 ** (elapsed / self.config.start_doubling_seconds)
        else:
            growth = 1.0 + self.config.increase_per_second * elapsed
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

    def _finish_measuring_if_due(self, now: float) -> None:
        """Set the rate under what the quota let through during the measuring interval."""
        if self._measure_start is None or now < self._measure_until:
            return
        quota = self._measured / (now - self._measure_start)
        self._set_rate(min(self.rate, max(self.config.cut_to * quota, self.rate / 4)))
        self._measure_start = None
        self._last_cut = now
        self._last_growth = now
        self._epoch += 1
        self._next_slot = now + 1.0 / self.rate

    def _set_rate(self, rate: float) -> None:
        """Keep the rate within its configured bounds."""
        self.rate = min(self.config.max_rate, max(self.config.min_rate, rate))
