"""Decide when a call to Connect may go: the rate limiter and the two breakers, in one place.

Every attempt passes the outage breaker (Connect down), the account breaker (the caller is
refused everywhere), then the rate limiter. Each answer is reported back to all three. Time a
call spends waiting here is not charged to its message's retry budget, and neither are probes.

The guard reports what it knows and decides nothing about the event: whether refusals of the
caller currently look account-wide is its `account_verdict`, an input of `policy`'s decision.

The guard also knows which calls are on the wire and which tasks only wait (for a breaker, the
limiter, their conversation's turn, a backoff): at shutdown it ends every wait at once, since
nothing that waits can be sent any more, and lets only the calls on the wire finish.
"""

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import TypeVar

from worker.pipeline.breaker import Breaker
from worker.pipeline.errors import (
    CallerRefusedError,
    EventFailure,
    ThrottledApiError,
    TransientApiError,
)
from worker.pipeline.inflight import InFlight, Stage, Stopping
from worker.pipeline.rate_limiter import AdaptiveRateLimiter

T = TypeVar("T")


def utc_now() -> datetime:
    """Return the wall-clock time, in UTC."""
    return datetime.now(UTC)


@dataclass
class Attempts:
    """Count one message's calls: all of them, and those charged to its retry budget.

    `clock` (monotonic seconds) and `utc_clock` are injected so that rules about time are
    tested without sleeping; the worker uses the real ones.
    """

    calls: int = 0
    charged: int = 0
    ambiguous: int = 0
    waited: float = 0.0
    first_at: datetime | None = None
    first_monotonic: float | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    utc_clock: Callable[[], datetime] = field(default=utc_now, repr=False, compare=False)
    received_monotonic: float = field(init=False)
    _last_charged: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.received_monotonic = self.clock()

    def record_call(self) -> None:
        """Note one more call."""
        self.calls += 1
        if self.first_at is None:
            self.first_at = self.utc_clock()
            self.first_monotonic = self.clock()

    def record_answer(self, probe: bool) -> None:
        """Charge an answered call to the retry budget, unless it was a breaker's probe."""
        self._last_charged = not probe
        self.charged += self._last_charged

    def forgive_last(self) -> None:
        """Take the last answered call off the budget: the event was held, not at fault."""
        self.charged -= self._last_charged
        self._last_charged = False

    def budget_seconds(self) -> float:
        """Return the time spent since the first call, less the time spent held back."""
        if self.first_monotonic is None:
            return 0.0
        return max(0.0, self.clock() - self.first_monotonic - self.waited)


class AccountVerdict(Enum):
    """What the guard can tell about the account when Connect refuses the caller."""

    ACCEPTED = "accepted"
    """Some call got past authentication lately: a refusal concerns that event alone."""
    SUSPECT = "suspect"
    """Nothing got past authentication lately: refusals look account-wide."""


@dataclass
class CallObserver:
    """Hooks for metrics; each is optional."""

    on_answer: Callable[[str, float], None] = lambda outcome, seconds: None
    on_ambiguous: Callable[[], None] = lambda: None


class CallGuard:
    """Hold calls back while Connect cannot take them; learn from every answer."""

    def __init__(
        self,
        limiter: AdaptiveRateLimiter,
        outage: Breaker,
        account: Breaker,
        account_memory_seconds: float,
        observer: CallObserver | None = None,
        stages: InFlight | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limiter = limiter
        self.outage = outage
        self.account = account
        self._account_memory = account_memory_seconds
        self._observer = observer or CallObserver()
        # Where each delivery stands (waiting here, on the wire), for the worker's shutdown.
        self._stages = stages if stages is not None else InFlight()
        self._clock = clock
        self._last_accepted = -float("inf")
        self._closed = False

    @property
    def closed(self) -> bool:
        """Return True once the worker refuses new calls (it is handing messages back)."""
        return self._closed

    def close(self) -> None:
        """Refuse every call not yet sent: the worker is handing its messages back.

        A delivery that waits here (for a breaker, the limiter, a backoff) is in the GUARD
        stage of the worker's `InFlight`, which ends those waits; calls on the wire finish.
        """
        self._closed = True

    def reopen(self) -> None:
        """Accept calls again after `close` (the worker consumed afresh and goes on)."""
        self._closed = False

    async def hold(self, wait: Callable[[], Awaitable[T]]) -> T:
        """Wait for something a call needs first (a backoff), as a wait shutdown may end."""
        self._refuse_if_closed()
        with self._stages.stage(Stage.GUARD):
            return await wait()

    def _refuse_if_closed(self) -> None:
        """Refuse a call once the worker hands its messages back: it must not be sent."""
        if self._closed:
            raise Stopping

    async def call(self, send: Callable[[], Awaitable[T]], attempts: Attempts) -> T:
        """Wait for the breakers and the limiter, make the call, and learn from its answer.

        A failure is raised as Connect's answer made it; what follows is the policy's call.
        """
        started = self._clock()
        outage_probe = account_probe = False
        try:
            self._refuse_if_closed()
            with self._stages.stage(Stage.GUARD):
                outage_probe = await self.outage.admit()
                account_probe = await self.account.admit()
                sent_at = await self.limiter.acquire()
            self._refuse_if_closed()
            sent = self._clock()
            attempts.waited += sent - started
            attempts.record_call()
            result = await self._send(send)
        except EventFailure as failure:
            self._observer.on_answer(failure.code, self._clock() - sent)
            self._learn_from_failure(failure, sent_at, outage_probe, account_probe, attempts)
            attempts.record_answer(probe=outage_probe or account_probe)
            raise
        except BaseException:
            self._abandon(outage_probe, account_probe)
            raise
        self._observer.on_answer("ok", self._clock() - sent)
        self._learn_accepted()
        self.limiter.on_success()
        attempts.record_answer(probe=outage_probe or account_probe)
        return result

    def account_verdict(self) -> AccountVerdict:
        """Say whether refusals of the caller look account-wide now.

        Today's rule: they do when nothing got past authentication within the account memory
        (`account_memory_seconds`). This is the one place that judges it.
        """
        if self._clock() - self._last_accepted < self._account_memory:
            return AccountVerdict.ACCEPTED
        return AccountVerdict.SUSPECT

    async def _send(self, send: Callable[[], Awaitable[T]]) -> T:
        """Make the call, in the WIRE stage meanwhile (shutdown lets it finish)."""
        with self._stages.stage(Stage.WIRE):
            return await send()

    def _learn_from_failure(
        self,
        failure: EventFailure,
        sent_at: float,
        outage_probe: bool,
        account_probe: bool,
        attempts: Attempts,
    ) -> None:
        """Tell the limiter and breakers what this failure says about Connect and the account."""
        if isinstance(failure, ThrottledApiError):
            # A throttle says nothing about an outage: neither ends a failure streak nor
            # answers a probe (another call probes). It does prove the caller authenticated.
            self.limiter.on_throttle(sent_at)
            self._note_authenticated()
            if outage_probe:
                self.outage.abandon_probe()
        elif isinstance(failure, TransientApiError):
            self.outage.record_failure(outage_probe)
            if account_probe:
                self.account.abandon_probe()  # Connect failed before judging the caller
            if failure.ambiguous:
                attempts.ambiguous += 1
                self._observer.on_ambiguous()
        elif isinstance(failure, CallerRefusedError):
            # Connect answered, but a refusal never proves the account works.
            self.outage.record_success()
            if self.account_verdict() is AccountVerdict.SUSPECT:
                self.account.record_failure(account_probe)
        else:
            self._learn_accepted()

    def _learn_accepted(self) -> None:
        """Note that Connect answered this caller: up, and the account accepted."""
        self._note_authenticated()
        self.outage.record_success()

    def _note_authenticated(self) -> None:
        """Note that a call got past authentication: the account works."""
        self._last_accepted = max(self._last_accepted, self._clock())
        self.account.record_success()

    def _abandon(self, outage_probe: bool, account_probe: bool) -> None:
        """Free the probe slot of a call that ended without an answer (cancelled)."""
        if outage_probe:
            self.outage.abandon_probe()
        if account_probe:
            self.account.abandon_probe()
