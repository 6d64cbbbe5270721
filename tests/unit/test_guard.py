"""The call guard: breakers and rate limiter in front of every call, learning from every answer.

Real breakers and a real limiter; `send` is a fake coroutine that answers or raises the failures
`worker.pipeline.errors` makes of Connect's answers.
"""

import asyncio
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from botocore.exceptions import ReadTimeoutError

import worker.pipeline.guard as guard_module
from worker.pipeline.breaker import Breaker, BreakerState
from worker.pipeline.errors import (
    AccountSuspectError,
    ErrorVariant,
    EventFailure,
    PermanentApiError,
    ThrottledApiError,
    TransientApiError,
    translate_error,
)
from worker.pipeline.guard import Attempts, CallGuard, CallObserver
from worker.pipeline.rate_limiter import AdaptiveRateLimiter, RateLimitConfig

OUTAGE_THRESHOLD = 3
ACCOUNT_THRESHOLD = 2


def throttled() -> ThrottledApiError:
    return ThrottledApiError(ErrorVariant.THROTTLING, "ThrottlingException", http_status=429)


def internal_error() -> TransientApiError:
    return TransientApiError(
        ErrorVariant.INTERNAL_SERVICE, "InternalServiceException", http_status=500
    )


def access_denied() -> PermanentApiError:
    return PermanentApiError(
        ErrorVariant.ACCESS_DENIED,
        "AccessDeniedException",
        "not authorized",
        http_status=403,
        request_id="req-1",
    )


def answering(result: str = "ok") -> Callable[[], Awaitable[str]]:
    async def send() -> str:
        return result

    return send


def recording(sent: list[str]) -> Callable[[], Awaitable[str]]:
    """Return a send that notes each call it makes, and succeeds."""

    async def send() -> str:
        sent.append("sent")
        return "ok"

    return send


def failing(failure: Exception) -> Callable[[], Awaitable[str]]:
    async def send() -> str:
        raise failure

    return send


@dataclass
class Observed:
    """What the guard told its observer."""

    answers: list[str] = field(default_factory=list)
    ambiguous: int = 0

    def observer(self) -> CallObserver:
        def on_ambiguous() -> None:
            self.ambiguous += 1

        return CallObserver(
            on_answer=lambda outcome, seconds: self.answers.append(outcome),
            on_ambiguous=on_ambiguous,
        )


def make_guard(
    observed: Observed | None = None,
    probe_seconds: float = 60.0,
    initial_rate: float = 1000.0,
    account_memory_seconds: float = 60.0,
) -> CallGuard:
    return CallGuard(
        AdaptiveRateLimiter(RateLimitConfig(initial_rate=initial_rate)),
        Breaker("outage", OUTAGE_THRESHOLD, probe_seconds, probe_seconds * 4),
        Breaker("account", ACCOUNT_THRESHOLD, probe_seconds, probe_seconds * 4),
        account_memory_seconds,
        (observed or Observed()).observer(),
    )


async def call_failing(guard: CallGuard, failure: Exception, attempts: Attempts) -> EventFailure:
    """Make a call that fails with `failure`; return what the guard raised."""
    with pytest.raises(EventFailure) as raised:
        await guard.call(failing(failure), attempts)
    return raised.value


# Answers


async def test_a_success_returns_the_result_and_counts_a_charged_attempt() -> None:
    observed = Observed()
    guard = make_guard(observed)
    attempts = Attempts()

    result = await guard.call(answering("sent"), attempts)

    assert result == "sent"
    assert (attempts.calls, attempts.charged, attempts.ambiguous) == (1, 1, 0)
    assert attempts.first_at is not None
    assert observed.answers == ["ok"]


async def test_access_denied_with_nothing_accepted_recently_is_an_account_suspect() -> None:
    # Given a guard that has not had a call accepted yet
    observed = Observed()
    guard = make_guard(observed)
    attempts = Attempts()
    denied = access_denied()

    # When a call is refused with AccessDenied
    raised = await call_failing(guard, denied, attempts)

    # Then it is held as a suspected account-wide refusal, keeping what Connect said
    assert type(raised) is AccountSuspectError
    assert raised.__cause__ is denied
    assert (raised.variant, raised.code, raised.http_status, raised.request_id) == (
        ErrorVariant.ACCESS_DENIED,
        "AccessDeniedException",
        403,
        "req-1",
    )
    # And the attempt is made but not charged to the event's retry budget
    assert (attempts.calls, attempts.charged) == (1, 0)
    assert guard.account.failures == 1
    assert observed.answers == ["AccessDeniedException"]


async def test_access_denied_for_every_call_opens_the_account_breaker() -> None:
    guard = make_guard()

    for _ in range(ACCOUNT_THRESHOLD):
        await call_failing(guard, access_denied(), Attempts())

    assert guard.account.state is BreakerState.OPEN
    assert guard.outage.closed


async def test_access_denied_after_a_success_is_permanent_for_that_event() -> None:
    # Given a guard that has just had a call accepted
    guard = make_guard()
    await guard.call(answering(), Attempts())
    attempts = Attempts()
    denied = access_denied()

    # When the next call is refused with AccessDenied
    raised = await call_failing(guard, denied, attempts)

    # Then the refusal is raised unchanged, to be dead-lettered at once, and charged
    assert raised is denied
    assert (attempts.calls, attempts.charged) == (1, 1)
    assert guard.account.closed
    assert guard.account.failures == 0


async def test_consecutive_internal_errors_open_the_outage_breaker_at_the_threshold() -> None:
    # Given a guard whose outage breaker opens after 3 consecutive failures
    guard = make_guard()
    attempts = Attempts()

    # When calls fail with 500 up to the threshold
    for count in range(1, OUTAGE_THRESHOLD + 1):
        assert guard.outage.closed, f"opened after {count - 1} failures"
        raised = await call_failing(guard, internal_error(), attempts)
        assert type(raised) is TransientApiError

    # Then the breaker is open, and every attempt was charged
    assert guard.outage.state is BreakerState.OPEN
    assert (attempts.calls, attempts.charged) == (OUTAGE_THRESHOLD, OUTAGE_THRESHOLD)

    # And the next call is held instead of being sent
    sent: list[str] = []
    held = asyncio.create_task(guard.call(recording(sent), Attempts()))
    await asyncio.sleep(0.05)
    assert not held.done()
    assert sent == []
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)


async def test_a_success_between_internal_errors_keeps_the_outage_breaker_closed() -> None:
    guard = make_guard()

    for _ in range(OUTAGE_THRESHOLD - 1):
        await call_failing(guard, internal_error(), Attempts())
    await guard.call(answering(), Attempts())
    for _ in range(OUTAGE_THRESHOLD - 1):
        await call_failing(guard, internal_error(), Attempts())

    assert guard.outage.closed


async def test_a_probe_that_succeeds_closes_the_outage_breaker_and_is_not_charged() -> None:
    # Given an open outage breaker whose probe is due at once
    guard = make_guard(probe_seconds=0.01)
    for _ in range(OUTAGE_THRESHOLD):
        await call_failing(guard, internal_error(), Attempts())
    await asyncio.sleep(0.02)
    attempts = Attempts()

    # When the next call goes through as the probe and succeeds
    await asyncio.wait_for(guard.call(answering(), attempts), 1.0)

    # Then the breaker is closed, and the probe was not charged to the event
    assert guard.outage.closed
    assert (attempts.calls, attempts.charged) == (1, 0)


async def test_throttles_feed_the_limiter_and_do_not_open_the_outage_breaker() -> None:
    # Given a guard whose outage breaker opens after 3 failures
    guard = make_guard()
    attempts = Attempts()

    # When more calls than that are throttled
    for _ in range(OUTAGE_THRESHOLD + 2):
        raised = await call_failing(guard, throttled(), attempts)
        assert type(raised) is ThrottledApiError

    # Then the limiter heard of every throttle and is measuring the quota
    assert guard.limiter.throttles == OUTAGE_THRESHOLD + 2
    assert guard.limiter.measuring
    # And Connect is not considered down: the breaker stays closed, the attempts are charged
    assert guard.outage.closed
    assert guard.outage.failures == 0
    assert attempts.charged == OUTAGE_THRESHOLD + 2


async def test_a_throttle_counts_as_accepted_so_a_later_access_denied_is_permanent() -> None:
    guard = make_guard()
    await call_failing(guard, throttled(), Attempts())

    raised = await call_failing(guard, access_denied(), Attempts())

    assert type(raised) is PermanentApiError


async def test_a_read_timeout_counts_an_ambiguous_attempt() -> None:
    # Given a call whose answer is lost after the request went out (a read timeout)
    observed = Observed()
    guard = make_guard(observed)
    attempts = Attempts()
    timeout = translate_error(ReadTimeoutError(endpoint_url="https://connect.example"))
    assert isinstance(timeout, TransientApiError)
    assert timeout.ambiguous

    # When the guard makes the call
    raised = await call_failing(guard, timeout, attempts)

    # Then the attempt is counted as ambiguous (Connect may hold a duplicate) and reported
    assert raised is timeout
    assert (attempts.calls, attempts.charged, attempts.ambiguous) == (1, 1, 1)
    assert observed.ambiguous == 1
    assert observed.answers == ["ReadTimeoutError"]
    assert guard.outage.failures == 1


async def test_an_internal_error_is_not_ambiguous() -> None:
    observed = Observed()
    guard = make_guard(observed)
    attempts = Attempts()

    await call_failing(guard, internal_error(), attempts)

    assert attempts.ambiguous == 0
    assert observed.ambiguous == 0


# Known defects


class FakeMonotonic:
    """Stands in for the `time` module inside worker.pipeline.guard, so its memory runs on it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def test_refusals_alone_do_not_keep_the_account_looking_accepted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a guard with a 10 s account memory, whose last accepted call was at t=1000
    clock = FakeMonotonic()
    monkeypatch.setattr(guard_module, "time", types.SimpleNamespace(monotonic=clock.monotonic))
    guard = make_guard(account_memory_seconds=10.0)
    await guard.call(answering(), Attempts())

    # When the credentials expire and every later call is refused, one per second
    raised: list[type[EventFailure]] = []
    while guard.account.state is BreakerState.CLOSED and len(raised) < 30:
        clock.now += 1.0
        raised.append(type(await call_failing(guard, access_denied(), Attempts())))

    # Then once nothing has been accepted for 10 s, refusals are held as account suspects,
    # and after the threshold of them the account breaker opens (calls then wait)
    assert raised[:9] == [PermanentApiError] * 9
    assert raised[9:] == [AccountSuspectError] * ACCOUNT_THRESHOLD
    assert guard.account.state is BreakerState.OPEN


async def test_a_probe_cancelled_before_it_is_sent_frees_the_probe_slot() -> None:
    # Given an open outage breaker whose probe is due, and a limiter at 1/s that just sent
    guard = make_guard(probe_seconds=0.01, initial_rate=1.0)
    for _ in range(OUTAGE_THRESHOLD):
        guard.outage.record_failure(probe=False)
    await guard.limiter.acquire()
    await asyncio.sleep(0.02)

    # When the probe call is cancelled while it waits for the limiter
    probe = asyncio.create_task(guard.call(answering(), Attempts()))
    await asyncio.sleep(0.02)
    assert not probe.done()
    assert guard.outage.state is BreakerState.PROBING
    probe.cancel()
    await asyncio.gather(probe, return_exceptions=True)

    # Then another call may probe at once
    state_after: BreakerState = guard.outage.state
    assert state_after is BreakerState.OPEN  # actual: PROBING
    assert await asyncio.wait_for(guard.outage.admit(), 0.1) is True  # actual: waits forever
