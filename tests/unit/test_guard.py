"""The call guard: breakers and rate limiter in front of every call, learning from every answer.

Real breakers and a real limiter; `send` is a fake coroutine that answers or raises the failures
`worker.pipeline.errors` makes of Connect's answers.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial

import pytest
from botocore.exceptions import ReadTimeoutError

from tests.unit.failures import access_denied, internal_error, invalid_request, throttled
from tests.unit.fake_clock import FakeClock
from worker.pipeline.accepted import Accepted
from worker.pipeline.account import AccountEvidence, AccountVerdict, EvidenceRules
from worker.pipeline.breaker import Breaker, BreakerState
from worker.pipeline.errors import (
    EventFailure,
    ThrottledApiError,
    TransientApiError,
    translate_error,
)
from worker.pipeline.guard import Attempts, CallGuard, CallObserver
from worker.pipeline.rate_limiter import AdaptiveRateLimiter, RateLimitConfig

OUTAGE_THRESHOLD = 3
ACCOUNT_THRESHOLD = 2


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
    latencies: list[float] = field(default_factory=list)
    ambiguous: int = 0

    def on_answer(self, outcome: str, seconds: float) -> None:
        self.answers.append(outcome)
        self.latencies.append(seconds)

    def observer(self) -> CallObserver:
        def on_ambiguous() -> None:
            self.ambiguous += 1

        return CallObserver(on_answer=self.on_answer, on_ambiguous=on_ambiguous)


def make_guard(
    observed: Observed | None = None,
    probe_seconds: float = 60.0,
    initial_rate: float = 1000.0,
    undecided_seconds: float = 5.0,
    clock: FakeClock | None = None,
) -> CallGuard:
    """Return a guard wired as the worker's; `clock`, if given, is the guard's own."""
    now = clock or time.monotonic
    rules = EvidenceRules(streak=ACCOUNT_THRESHOLD, undecided_seconds=undecided_seconds)
    return CallGuard(
        AdaptiveRateLimiter(RateLimitConfig(initial_rate=initial_rate)),
        Breaker("outage", OUTAGE_THRESHOLD, probe_seconds, probe_seconds * 4),
        Breaker("account", 1, probe_seconds, probe_seconds * 4, clock=now),
        AccountEvidence(rules, now),
        (observed or Observed()).observer(),
        clock=now,
    )


def judged(guard: CallGuard, attempts: Attempts) -> AccountVerdict:
    """Return the verdict on the refusal `attempts` last had, as the evidence stands now."""
    assert attempts.refused_at is not None
    return guard.evidence.judge(attempts.conversation, attempts.refused_at)


async def accept_others(guard: CallGuard, count: int = 3) -> None:
    """Have `count` calls of other conversations accepted."""
    for n in range(count):
        await guard.call(answering(), Attempts(conversation=f"other-{n}"))


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


async def test_a_lone_access_denied_is_raised_held_undecided_and_opens_nothing() -> None:
    # Given a guard that has not had a call accepted yet
    observed = Observed()
    guard = make_guard(observed)
    attempts = Attempts(conversation="c1")
    denied = access_denied()

    # When a call is refused with AccessDenied
    raised = await call_failing(guard, denied, attempts)

    # Then the refusal is raised as Connect's answer made it: the policy decides what follows
    assert raised is denied
    # And one refusal proves nothing yet: undecided, and the account breaker stays closed
    assert judged(guard, attempts) is AccountVerdict.UNDECIDED
    assert guard.account.closed
    assert (attempts.calls, attempts.charged) == (1, 1)
    assert observed.answers == ["AccessDeniedException"]


async def test_access_denied_for_distinct_conversations_opens_the_account_breaker() -> None:
    guard = make_guard()
    await accept_others(guard)  # the account worked a moment ago: the clock proves nothing

    for n in range(ACCOUNT_THRESHOLD):
        await call_failing(guard, access_denied(), Attempts(conversation=f"c{n}"))

    assert guard.account.state is BreakerState.OPEN
    assert guard.outage.closed


async def test_refusals_of_one_conversation_do_not_open_the_account_breaker() -> None:
    guard = make_guard()

    for _ in range(ACCOUNT_THRESHOLD + 2):
        await call_failing(guard, access_denied(), Attempts(conversation="c1"))

    assert guard.account.closed


async def test_access_denied_then_other_conversations_accepted_is_that_events_own() -> None:
    # Given a call refused with AccessDenied
    guard = make_guard()
    attempts = Attempts(conversation="c1")
    denied = access_denied()
    raised = await call_failing(guard, denied, attempts)

    # When the verdict is asked, and calls of other conversations are accepted meanwhile
    verdict = asyncio.create_task(guard.account_verdict(raised, attempts))
    await asyncio.sleep(0)
    assert not verdict.done()
    await accept_others(guard)

    # Then the refusal is that event's own, and says nothing against the account
    assert await asyncio.wait_for(verdict, 1.0) is AccountVerdict.ACCEPTED
    assert guard.account.closed


async def test_an_event_refused_for_its_content_proves_the_account_works() -> None:
    guard = make_guard()
    attempts = Attempts(conversation="c1")
    await call_failing(guard, access_denied(), attempts)

    for n in range(3):
        await call_failing(guard, invalid_request(), Attempts(conversation=f"other-{n}"))

    assert judged(guard, attempts) is AccountVerdict.ACCEPTED


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


async def test_throttles_of_other_conversations_prove_the_account_works() -> None:
    guard = make_guard()
    attempts = Attempts(conversation="c1")
    await call_failing(guard, access_denied(), attempts)

    for n in range(3):
        await call_failing(guard, throttled(), Attempts(conversation=f"other-{n}"))

    assert judged(guard, attempts) is AccountVerdict.ACCEPTED
    assert guard.account.closed


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


# The clock


async def test_a_lone_refusal_in_a_quiet_stream_is_decided_on_the_injected_clock() -> None:
    # Given a guard that leaves a refusal undecided for 5 s, and one refusal at t=1000
    clock = FakeClock(1000.0)
    guard = make_guard(undecided_seconds=5.0, clock=clock)
    attempts = Attempts(conversation="c1")
    await call_failing(guard, access_denied(), attempts)

    # Then it is undecided just short of 5 s later, and the event's own at 5 s
    clock.now = 1004.99
    assert judged(guard, attempts) is AccountVerdict.UNDECIDED
    clock.now = 1005.0
    assert judged(guard, attempts) is AccountVerdict.ACCEPTED


async def test_credentials_expiring_after_accepted_calls_are_judged_account_wide() -> None:
    # Given a guard that has just had calls accepted (what the clock rule took as proof)
    clock = FakeClock(1000.0)
    guard = make_guard(clock=clock)
    await accept_others(guard)

    # When the credentials expire and the next calls, of distinct conversations, are refused
    refused = [Attempts(conversation=f"c{n}") for n in range(ACCOUNT_THRESHOLD)]
    for attempts in refused:
        clock.now += 0.1
        await call_failing(guard, access_denied(), attempts)

    # Then every one of them is judged account-wide, and the account breaker is open
    assert [judged(guard, a) for a in refused] == [AccountVerdict.SUSPECT] * ACCOUNT_THRESHOLD
    assert guard.account.state is BreakerState.OPEN


async def test_probes_rotate_away_from_the_conversation_whose_probe_was_refused() -> None:
    # Given an account breaker opened by refusals, whose probe (conversation c0) was refused
    clock = FakeClock(1000.0)
    guard = make_guard(probe_seconds=0.05, clock=clock)
    for n in range(ACCOUNT_THRESHOLD):
        await call_failing(guard, access_denied(), Attempts(conversation=f"c{n}"))
    clock.now += 1.0
    await call_failing(guard, access_denied(), Attempts(conversation="c0"))
    assert guard.account.state is BreakerState.OPEN

    # When c0 and then c1 wait for the next probe, and its time comes
    sent: list[str] = []

    async def send_as(conversation: str) -> str:
        sent.append(conversation)
        return "ok"

    calls = [
        asyncio.create_task(guard.call(partial(send_as, c), Attempts(conversation=c)))
        for c in ("c0", "c1")
    ]
    await asyncio.sleep(0.01)
    assert sent == []
    clock.now += 1.0
    await asyncio.wait_for(asyncio.gather(*calls), 1.0)

    # Then c1 was the probe: its acceptance closed the breaker, and c0 went after it
    assert sent == ["c1", "c0"]
    assert guard.account.closed


async def test_latency_is_measured_on_the_injected_clock() -> None:
    clock = FakeClock()
    observed = Observed()
    guard = make_guard(observed, clock=clock)

    async def slow() -> str:
        clock.now += 0.25
        return "ok"

    await guard.call(slow, Attempts())

    assert observed.latencies == [0.25]


def test_attempts_charge_seconds_since_the_first_call_less_the_time_held_back() -> None:
    clock = FakeClock(50.0)
    attempts = Attempts(clock=clock)
    assert attempts.budget_seconds() == 0.0

    clock.now = 60.0
    attempts.record_call()
    clock.now = 75.0
    attempts.waited = 5.0

    assert attempts.received_monotonic == 50.0
    assert attempts.first_monotonic == 60.0
    assert attempts.budget_seconds() == 10.0


def test_attempts_note_the_first_call_on_the_injected_wall_clock() -> None:
    moment = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    attempts = Attempts(utc_clock=lambda: moment)

    attempts.record_call()
    attempts.record_call()

    assert attempts.first_at == moment
    assert attempts.calls == 2


def test_attempts_forgive_a_held_call_once_and_never_a_probe() -> None:
    attempts = Attempts()

    attempts.record_answer(probe=False)
    attempts.record_answer(probe=False)
    attempts.forgive_last()
    attempts.forgive_last()
    assert attempts.charged == 1

    attempts.record_answer(probe=True)
    attempts.forgive_last()
    assert attempts.charged == 1


# Known defects


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


# --- the endpoint tripwire: 2xx answers that are not Connect's ------------------------------


def accepting(answer: Accepted) -> Callable[[], Awaitable[Accepted]]:
    """Return a send that answers 2xx with `answer`."""

    async def send() -> Accepted:
        return answer

    return send


FINE = Accepted("r-1", "c-1", new_chat=True)
ODD = Accepted("r-2", odd_body="list")


async def test_a_2xx_without_request_id_trips_the_endpoint_tripwire_at_once() -> None:
    guard = make_guard()

    answer = await guard.call(accepting(Accepted(None, "c-1")), Attempts())

    assert answer.contact_id == "c-1"  # delivered all the same
    assert guard.endpoint.reason is not None
    assert "x-amzn-RequestId" in guard.endpoint.reason
    with pytest.raises(TimeoutError):  # and no call goes any more
        await asyncio.wait_for(guard.call(accepting(FINE), Attempts()), 0.05)


async def test_odd_bodies_trip_the_tripwire_only_when_they_come_in_a_row() -> None:
    guard = make_guard()
    for _ in range(4):
        await guard.call(accepting(ODD), Attempts())
    await guard.call(accepting(FINE), Attempts())
    for _ in range(4):
        await guard.call(accepting(ODD), Attempts())
    assert guard.endpoint.closed

    await guard.call(accepting(ODD), Attempts())

    assert guard.endpoint.reason == (
        "5 answers in a row were 2xx with a body that is not Connect's output shape (last: list)"
    )
