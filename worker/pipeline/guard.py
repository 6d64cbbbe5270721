"""Decide when a call to Connect may go: the rate limiter and the two breakers, in one place.

Every attempt passes the outage breaker (Connect down), the account breaker (the caller is
refused everywhere), then the rate limiter. Each answer is reported back to all three. Time a
call spends waiting here is not charged to its message's retry budget, and neither are probes
nor attempts refused for a suspected account-wide reason.

The guard also knows which calls are on the wire and which tasks only wait (for a breaker, the
limiter, their conversation's turn, a backoff): at shutdown it ends every wait at once, since
nothing that waits can be sent any more, and lets only the calls on the wire finish.
"""

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from worker.pipeline.breaker import Breaker
from worker.pipeline.errors import (
    AccountSuspectError,
    EventFailure,
    ThrottledApiError,
    TransientApiError,
    is_account_error,
)
from worker.pipeline.inflight import InFlight, Stage, Stopping
from worker.pipeline.rate_limiter import AdaptiveRateLimiter

T = TypeVar("T")


@dataclass
class Attempts:
    """Count one message's calls: all of them, and those charged to its retry budget."""

    calls: int = 0
    charged: int = 0
    ambiguous: int = 0
    waited: float = 0.0
    first_at: datetime | None = None
    first_monotonic: float | None = None
    received_monotonic: float = field(default_factory=time.monotonic)

    def record_call(self) -> None:
        """Note one more call."""
        self.calls += 1
        if self.first_at is None:
            self.first_at = datetime.now(UTC)
            self.first_monotonic = time.monotonic()

    def budget_seconds(self) -> float:
        """Return the time spent since the first call, less the time spent held back."""
        if self.first_monotonic is None:
            return 0.0
        return max(0.0, time.monotonic() - self.first_monotonic - self.waited)


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
    ) -> None:
        self.limiter = limiter
        self.outage = outage
        self.account = account
        self._account_memory = account_memory_seconds
        self._observer = observer or CallObserver()
        # Where each delivery stands (waiting here, on the wire), for the worker's shutdown.
        self._stages = stages if stages is not None else InFlight()
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
        """Wait for the breakers and the limiter, make the call, and learn from its answer."""
        started = time.monotonic()
        outage_probe = account_probe = False
        try:
            self._refuse_if_closed()
            with self._stages.stage(Stage.GUARD):
                outage_probe = await self.outage.admit()
                account_probe = await self.account.admit()
                sent_at = await self.limiter.acquire()
            self._refuse_if_closed()
            attempts.waited += time.monotonic() - started
            attempts.record_call()
            result = await self._send(send)
        except EventFailure as failure:
            self._observer.on_answer(failure.code, time.monotonic() - sent_at)
            self._learn_from_failure(failure, sent_at, outage_probe, account_probe, attempts)
            raise self._reclassify(failure) from failure
        except BaseException:
            self._abandon(outage_probe, account_probe)
            raise
        self._observer.on_answer("ok", time.monotonic() - sent_at)
        self._learn_accepted()
        self.limiter.on_success()
        attempts.charged += not (outage_probe or account_probe)
        return result

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
        charged = not (outage_probe or account_probe)
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
        elif is_account_error(failure):
            # Connect answered, but a refusal never proves the account works.
            self.outage.record_success()
            if not self._accepted_recently():
                self.account.record_failure(account_probe)
                charged = False
        else:
            self._learn_accepted()
        attempts.charged += charged

    def _reclassify(self, failure: EventFailure) -> EventFailure:
        """Turn an account-wide refusal into a failure that holds the event instead."""
        if is_account_error(failure) and not self._accepted_recently():
            suspect = AccountSuspectError(**_fields(failure))
            return suspect
        return failure

    def _learn_accepted(self) -> None:
        """Note that Connect answered this caller: up, and the account accepted."""
        self._note_authenticated()
        self.outage.record_success()

    def _note_authenticated(self) -> None:
        """Note that a call got past authentication: the account works."""
        self._last_accepted = max(self._last_accepted, time.monotonic())
        self.account.record_success()

    def _accepted_recently(self) -> bool:
        """Return True when some call got past authentication within the memory window."""
        return time.monotonic() - self._last_accepted < self._account_memory

    def _abandon(self, outage_probe: bool, account_probe: bool) -> None:
        """Free the probe slot of a call that ended without an answer (cancelled)."""
        if outage_probe:
            self.outage.abandon_probe()
        if account_probe:
            self.account.abandon_probe()


def _fields(failure: EventFailure) -> dict[str, Any]:
    """Return a failure's fields, to rebuild it as another class."""
    return {
        "variant": failure.variant,
        "code": failure.code,
        "message": failure.message,
        "http_status": failure.http_status,
        "request_id": failure.request_id,
        "reason": failure.reason,
    }
