"""Circuit breakers: stop calling Connect while it is down or refuses the whole account.

When `threshold` consecutive calls (across messages) fail the breaker's way, it opens: calls
wait instead of burning their retry budgets, and one probe goes through every probe interval
(doubling up to a maximum). A probe that succeeds closes the breaker and everything resumes.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable
from enum import IntEnum


class BreakerState(IntEnum):
    """Where a breaker stands; the values are what the metric exports."""

    CLOSED = 0
    """Calls flow."""
    OPEN = 1
    """Calls wait; the next probe is scheduled."""
    PROBING = 2
    """One probe call is out; the others wait for its answer."""


class Breaker:
    """Open after consecutive failures; let probes through at a low rate; close on success."""

    def __init__(
        self,
        name: str,
        threshold: int,
        probe_seconds: float,
        max_probe_seconds: float,
        on_change: Callable[["Breaker"], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at: float | None = None
        self._threshold = threshold
        self._probe_seconds = probe_seconds
        self._max_probe_seconds = max_probe_seconds
        self._interval = probe_seconds
        self._next_probe = 0.0
        self._on_change = on_change
        self._clock = clock
        self._changed = asyncio.Event()

    @property
    def closed(self) -> bool:
        """Return True while calls flow."""
        return self.state is BreakerState.CLOSED

    async def admit(self) -> bool:
        """Wait until a call may go; return True when the call is the probe."""
        while self.state is not BreakerState.CLOSED:
            changed = self._changed
            wait = None
            if self.state is BreakerState.OPEN:
                wait = self._next_probe - self._clock()
                if wait <= 0:
                    self._set(BreakerState.PROBING)
                    return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), wait)
        return False

    def record_success(self) -> None:
        """Note a call that got an answer other than this breaker's failure."""
        self.failures = 0
        if self.state is not BreakerState.CLOSED:
            self._interval = self._probe_seconds
            self.opened_at = None
            self._set(BreakerState.CLOSED)

    def record_failure(self, probe: bool) -> None:
        """Note a failure of this breaker's kind; open at the threshold, or after a probe."""
        self.failures += 1
        if self.state is BreakerState.CLOSED and self.failures >= self._threshold:
            self.opened_at = self._clock()
            self._schedule_probe(self._probe_seconds)
        elif probe and self.state is BreakerState.PROBING:
            self._schedule_probe(min(self._interval * 2, self._max_probe_seconds))

    def abandon_probe(self) -> None:
        """Let another call probe at once: this probe ended without an answer."""
        if self.state is BreakerState.PROBING:
            self._next_probe = self._clock()  # keep the backoff the failed probes earned
            self._set(BreakerState.OPEN)

    def _schedule_probe(self, interval: float) -> None:
        """Open (again) with the next probe `interval` seconds from now."""
        self._interval = max(interval, self._probe_seconds)
        self._next_probe = self._clock() + interval
        self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        """Change state and wake every waiting call."""
        changed = state is not self.state
        self.state = state
        self._changed.set()
        self._changed = asyncio.Event()
        if changed and self._on_change is not None:
            self._on_change(self)


class Tripwire:
    """Stop every call for good once tripped, saying why: what trips it needs a person.

    It guards against a wrong endpoint that answers 2xx to everything: every such answer
    would ack an event that never reached Connect. Unlike a `Breaker` it sends no probe,
    since a probe answered 2xx is acked too: the event would be lost. It trips at once on
    `trip`, or after `threshold` odd answers in a row (`record_odd`); a restart resets it.
    """

    def __init__(
        self,
        name: str,
        threshold: int,
        on_trip: Callable[["Tripwire"], None] | None = None,
    ) -> None:
        self.name = name
        self.reason: str | None = None
        self.odd_in_a_row = 0
        self._threshold = threshold
        self._on_trip = on_trip
        self._never = asyncio.Event()

    @property
    def closed(self) -> bool:
        """Return True while calls flow."""
        return self.reason is None

    async def admit(self) -> None:
        """Let a call go, or wait for good (until cancelled, at shutdown) once tripped."""
        if self.reason is not None:
            await self._never.wait()

    def record_fine(self) -> None:
        """Note an answer that reads as expected: the odd ones were not in a row."""
        self.odd_in_a_row = 0

    def record_odd(self, what: str) -> None:
        """Note an odd answer; trip once `threshold` of them came in a row."""
        self.odd_in_a_row += 1
        if self.odd_in_a_row >= self._threshold:
            self.trip(f"{self.odd_in_a_row} answers in a row were {what}")

    def trip(self, reason: str) -> None:
        """Stop every call from now on, for `reason` (the first reason is kept)."""
        if self.reason is None:
            self.reason = reason
            if self._on_trip is not None:
                self._on_trip(self)
