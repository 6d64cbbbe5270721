"""Decide when a call to Connect may go: the rate limiter and the breakers, in one place.

Every attempt passes the endpoint tripwire (not Connect answering), the outage breaker
(Connect down), the account breaker (the caller is refused everywhere), then the rate
limiter. Each answer is reported back to all of them. Time a
call spends waiting here is not charged to its message's retry budget, and neither are probes.

The guard reports what it knows and decides nothing about the event: whether a refusal of the
caller is the event's own or the account's is its `account_verdict`, judged by
`account.AccountEvidence` from every answer the guard feeds it, an input of `policy`'s decision.
While the evidence is undecided, the verdict waits for more answers (a bounded time).

The guard also knows which calls are on the wire and which tasks only wait (for a breaker, the
limiter, their conversation's turn, a backoff): at shutdown it ends every wait at once, since
nothing that waits can be sent any more, and lets only the calls on the wire finish.
"""

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import TypeVar

from worker.pipeline.accepted import Accepted
from worker.pipeline.account import AccountEvidence, AccountVerdict
from worker.pipeline.breaker import Breaker, Tripwire
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

    conversation: str = ""
    calls: int = 0
    charged: int = 0
    ambiguous: int = 0
    waited: float = 0.0
    first_at: datetime | None = None
    first_monotonic: float | None = None
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    utc_clock: Callable[[], datetime] = field(default=utc_now, repr=False, compare=False)
    received_monotonic: float = field(init=False)
    refused_at: float | None = field(default=None, init=False)
    """When the caller was last refused for this message (the key of its account verdict)."""
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
        evidence: AccountEvidence,
        observer: CallObserver | None = None,
        stages: InFlight | None = None,
        clock: Callable[[], float] = time.monotonic,
        endpoint: Tripwire | None = None,
    ) -> None:
        self.limiter = limiter
        self.endpoint = endpoint or Tripwire("endpoint", threshold=5)
        self.outage = outage
        self.account = account
        self.evidence = evidence
        self._observer = observer or CallObserver()
        # Where each delivery stands (waiting here, on the wire), for the worker's shutdown.
        self._stages = stages if stages is not None else InFlight()
        self._clock = clock
        self._closed = False
        self._answered = asyncio.Event()
        # Conversations waiting at the open account breaker, and the last one refused as
        # its probe: probes rotate, so one truly forbidden event cannot keep it open.
        self._account_waiting: Counter[str] = Counter()
        self._last_refused_probe: str | None = None

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
                await self.endpoint.admit()
                outage_probe = await self.outage.admit()
                account_probe = await self._admit_account(attempts.conversation)
                sent_at = await self.limiter.acquire()
            self._refuse_if_closed()
            sent = self._clock()
            attempts.waited += sent - started
            attempts.record_call()
            result = await self._send(send)
        except EventFailure as failure:
            self._observer.on_answer(failure.code, self._clock() - sent)
            self._learn_from_failure(
                failure, sent_at, sent, (outage_probe, account_probe), attempts
            )
            attempts.record_answer(probe=outage_probe or account_probe)
            raise
        except BaseException:
            self._abandon(outage_probe, account_probe)
            raise
        finally:
            self._wake_waiters()
        self._observer.on_answer("ok", self._clock() - sent)
        if isinstance(result, Accepted):
            self._judge_endpoint(result)
        self._learn_accepted(attempts.conversation, sent)
        self.limiter.on_success()
        attempts.record_answer(probe=outage_probe or account_probe)
        return result

    async def account_verdict(self, failure: EventFailure, attempts: Attempts) -> AccountVerdict:
        """Judge a refusal of the caller by the answers to other calls; wait while undecided.

        Only a refusal (`CallerRefusedError`) is judged, by `account.AccountEvidence`'s rule;
        any other failure's verdict is moot. The wait is bounded by the rule's
        `undecided_seconds`, and shutdown ends it like any wait in the guard.
        """
        refused_at = attempts.refused_at
        if not isinstance(failure, CallerRefusedError) or refused_at is None:
            return AccountVerdict.ACCEPTED
        while True:
            verdict = self.evidence.judge(attempts.conversation, refused_at)
            if verdict is not AccountVerdict.UNDECIDED:
                return verdict
            wait = self.evidence.undecided_left(refused_at)
            await self.hold(partial(self._next_answer, wait))

    async def _admit_account(self, conversation: str) -> bool:
        """Wait for the account breaker; pass the probe on when this conversation failed the last.

        Without the rotation, one truly forbidden event could be every probe, and keep the
        breaker open after the account is accepted again.
        """
        self._account_waiting[conversation] += 1
        try:
            while True:
                probe = await self.account.admit()
                if not (probe and self._passes_probe_on(conversation)):
                    return probe
                self.account.abandon_probe()
                await self._next_answer(None)  # another conversation's probe answers first
        finally:
            self._account_waiting[conversation] -= 1
            if not self._account_waiting[conversation]:
                del self._account_waiting[conversation]

    def _passes_probe_on(self, conversation: str) -> bool:
        """Return True when the last probe refused was this conversation's and others wait."""
        if conversation != self._last_refused_probe:
            return False
        return any(other != conversation for other in self._account_waiting)

    async def _next_answer(self, seconds: float | None) -> None:
        """Wait until the next call ends, at most `seconds` (None: no bound)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._answered.wait(), seconds)

    def _wake_waiters(self) -> None:
        """Wake what waits for evidence: a call has ended."""
        self._answered.set()
        self._answered = asyncio.Event()

    async def _send(self, send: Callable[[], Awaitable[T]]) -> T:
        """Make the call, in the WIRE stage meanwhile (shutdown lets it finish)."""
        with self._stages.stage(Stage.WIRE):
            return await send()

    def _learn_from_failure(
        self,
        failure: EventFailure,
        sent_at: float,
        sent: float,
        probes: tuple[bool, bool],
        attempts: Attempts,
    ) -> None:
        """Tell the limiter, breakers and evidence what this failure says about Connect.

        `sent_at` is the limiter's send time, `sent` the guard's; `probes` says whether the
        call was the outage breaker's probe, and the account breaker's.
        """
        outage_probe, account_probe = probes
        if isinstance(failure, ThrottledApiError):
            # A throttle says nothing about an outage: neither ends a failure streak nor
            # answers a probe (another call probes). It does prove the caller authenticated.
            self.limiter.on_throttle(sent_at)
            self._note_authenticated(attempts.conversation, sent)
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
            self._learn_refused(attempts, account_probe)
        else:
            self._learn_accepted(attempts.conversation, sent)

    def _learn_refused(self, attempts: Attempts, account_probe: bool) -> None:
        """Note a refusal of the caller; open the account breaker once it looks account-wide."""
        # Connect answered, but a refusal never proves the account works.
        self.outage.record_success()
        attempts.refused_at = self.evidence.record_refused(attempts.conversation)
        if account_probe:
            self._last_refused_probe = attempts.conversation
        if self.evidence.account_wide:
            self.account.record_failure(account_probe)

    def _judge_endpoint(self, accepted: Accepted) -> None:
        """Tell the tripwire whether a 2xx reads as Connect's: request id, output shape."""
        if accepted.request_id is None:
            self.endpoint.trip(
                "a 2xx answer without x-amzn-RequestId: not Connect's (wrong endpoint?)"
            )
        elif accepted.odd_body is not None:
            self.endpoint.record_odd(
                f"2xx with a body that is not Connect's output shape (last: {accepted.odd_body})"
            )
        else:
            self.endpoint.record_fine()

    def _learn_accepted(self, conversation: str, sent: float) -> None:
        """Note that Connect answered this caller: up, and the account accepted."""
        self._note_authenticated(conversation, sent)
        self.outage.record_success()

    def _note_authenticated(self, conversation: str, sent: float) -> None:
        """Note that a call sent at `sent` got past authentication: the account works.

        An answer to a call sent before the account was judged refused closes nothing.
        """
        if self.evidence.record_accepted(conversation, sent):
            self.account.record_success()

    def _abandon(self, outage_probe: bool, account_probe: bool) -> None:
        """Free the probe slot of a call that ended without an answer (cancelled)."""
        if outage_probe:
            self.outage.abandon_probe()
        if account_probe:
            self.account.abandon_probe()
