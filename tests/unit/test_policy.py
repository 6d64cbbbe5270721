"""The retry policy: one table, its precedence, and the tenacity loop built from it (SPEC §5)."""

import asyncio
import os
import time
from pathlib import Path

import pytest
from tenacity import RetryCallState

from worker.pipeline.errors import (
    ErrorVariant,
    EventFailure,
    MalformedEventError,
    PermanentApiError,
    ThrottledApiError,
    TransientApiError,
)
from worker.pipeline.policy import NEVER, RetryPolicy, RetryRule, retry_table
from worker.settings import WorkerSettings

PERMANENT_VARIANTS = [
    ErrorVariant.ACCESS_DENIED,
    ErrorVariant.INVALID_REQUEST,
    ErrorVariant.RESOURCE_NOT_FOUND,
    ErrorVariant.UNKNOWN,
    ErrorVariant.MALFORMED,
]


@pytest.fixture(autouse=True)
def isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Keep the caller's WORKER_* variables and config/worker.toml out of the settings."""
    for name in list(os.environ):
        if name.upper().startswith("WORKER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def fast_policy(**budgets: float) -> RetryPolicy:
    """Return a policy with the given budgets and a backoff too short to notice."""
    settings = WorkerSettings(**budgets)  # type: ignore[arg-type]
    return RetryPolicy(retry_table(settings), backoff_base=0.001, backoff_max=0.002)


def throttled(variant: ErrorVariant = ErrorVariant.THROTTLING) -> ThrottledApiError:
    return ThrottledApiError(variant, variant.value, http_status=429)


def transient(variant: ErrorVariant = ErrorVariant.INTERNAL_SERVICE) -> TransientApiError:
    return TransientApiError(variant, variant.value, http_status=500)


def permanent(variant: ErrorVariant = ErrorVariant.ACCESS_DENIED) -> PermanentApiError:
    return PermanentApiError(variant, variant.value, http_status=400)


class Charge:
    """Count attempts and seconds like the consumer does, for the policy's budget."""

    def __init__(self) -> None:
        self.attempts = 0
        self.started = time.monotonic()

    def __call__(self) -> tuple[int, float]:
        return self.attempts, time.monotonic() - self.started


async def run_calls(
    policy: RetryPolicy, outcomes: list[BaseException | None], calls: list[int]
) -> None:
    """Drive the policy's loop over calls that fail (or succeed, None) in turn; note each call."""
    charge = Charge()
    async for attempt in policy.retrying(charge):
        with attempt:
            charge.attempts += 1
            outcome = outcomes[min(len(calls), len(outcomes) - 1)]
            calls.append(attempt.retry_state.attempt_number)
            if outcome is not None:
                raise outcome


# --- the table -------------------------------------------------------------------------------


def test_every_variant_has_a_rule() -> None:
    assert set(retry_table(WorkerSettings())) == set(ErrorVariant)


@pytest.mark.parametrize("variant", PERMANENT_VARIANTS)
def test_permanent_variants_are_never_retried(variant: ErrorVariant) -> None:
    assert retry_table(WorkerSettings())[variant].retry is False


def test_throttling_rule_uses_the_throttle_budget() -> None:
    settings = WorkerSettings(throttle_max_attempts=7, throttle_max_seconds=42.0)

    assert retry_table(settings)[ErrorVariant.THROTTLING] == RetryRule(True, 7, 42.0)


def test_internal_service_rule_uses_the_transient_budget() -> None:
    settings = WorkerSettings(transient_max_attempts=4, transient_max_seconds=9.5)

    assert retry_table(settings)[ErrorVariant.INTERNAL_SERVICE] == RetryRule(True, 4, 9.5)


def test_default_budgets_stay_well_under_the_broker_consumer_timeout() -> None:
    # RabbitMQ closes a channel holding an unacked delivery after 30 minutes by default.
    settings = WorkerSettings()
    worst_case = max(settings.throttle_max_seconds, settings.transient_max_seconds)

    assert worst_case + settings.backoff_max_seconds + settings.read_timeout_seconds < 30 * 60 / 2


# --- rule_for: status class before variant ---------------------------------------------------


def test_throttled_failure_follows_the_throttling_rule_whatever_its_variant() -> None:
    policy = fast_policy(throttle_max_attempts=3)

    assert policy.rule_for(throttled(ErrorVariant.UNKNOWN)) == RetryRule(True, 3, 300.0)


def test_transient_unknown_error_follows_the_internal_service_rule() -> None:
    policy = fast_policy(transient_max_attempts=5)

    assert policy.rule_for(transient(ErrorVariant.UNKNOWN)) == RetryRule(True, 5, 120.0)


def test_transient_failure_with_a_permanent_code_is_still_retried() -> None:
    # A 503 that says AccessDeniedException: the status decides that it is retried.
    policy = fast_policy()

    assert policy.rule_for(transient(ErrorVariant.ACCESS_DENIED)).retry is True


@pytest.mark.parametrize("variant", PERMANENT_VARIANTS)
def test_permanent_failure_is_never_retried(variant: ErrorVariant) -> None:
    assert fast_policy().rule_for(permanent(variant)) == NEVER


@pytest.mark.parametrize("variant", [ErrorVariant.THROTTLING, ErrorVariant.INTERNAL_SERVICE])
def test_permanent_class_is_never_retried_whatever_its_variant(variant: ErrorVariant) -> None:
    assert fast_policy().rule_for(permanent(variant)).retry is False


def test_malformed_event_is_never_retried() -> None:
    failure = MalformedEventError(ErrorVariant.MALFORMED, "NotJson", "body is not valid JSON")

    assert fast_policy().rule_for(failure) == NEVER


def test_unexpected_exception_is_never_retried() -> None:
    assert fast_policy().rule_for(RuntimeError("bug")) == NEVER


def test_from_settings_uses_the_configured_budgets() -> None:
    policy = RetryPolicy.from_settings(WorkerSettings(throttle_max_attempts=2))

    assert policy.rule_for(throttled()).max_attempts == 2


# --- should_retry ----------------------------------------------------------------------------


def test_should_retry_until_max_attempts() -> None:
    policy = fast_policy(throttle_max_attempts=3)

    assert policy.should_retry(throttled(), attempts=1, elapsed=0.0)
    assert policy.should_retry(throttled(), attempts=2, elapsed=0.0)
    assert not policy.should_retry(throttled(), attempts=3, elapsed=0.0)


def test_should_retry_until_max_seconds() -> None:
    policy = fast_policy(transient_max_seconds=10.0)

    assert policy.should_retry(transient(), attempts=1, elapsed=9.99)
    assert not policy.should_retry(transient(), attempts=1, elapsed=10.0)


def test_should_not_retry_a_permanent_failure_on_its_first_attempt() -> None:
    assert not fast_policy().should_retry(permanent(), attempts=1, elapsed=0.0)


# --- the tenacity loop -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failure", "budget", "expected_calls"),
    [
        (throttled(), {"throttle_max_attempts": 4}, 4),
        (transient(), {"transient_max_attempts": 3}, 3),
        (transient(ErrorVariant.UNKNOWN), {"transient_max_attempts": 2}, 2),
    ],
    ids=["throttled", "internal-service", "transport"],
)
async def test_loop_retries_a_transient_failure_until_the_attempt_budget_then_reraises_it(
    failure: EventFailure, budget: dict[str, int], expected_calls: int
) -> None:
    policy = fast_policy(**budget)
    calls: list[int] = []

    with pytest.raises(type(failure)) as caught:
        await run_calls(policy, [failure], calls)

    assert caught.value is failure
    assert calls == list(range(1, expected_calls + 1))


async def test_loop_calls_a_permanent_failure_exactly_once() -> None:
    failure = permanent()
    calls: list[int] = []

    with pytest.raises(PermanentApiError) as caught:
        await run_calls(fast_policy(), [failure], calls)

    assert calls == [1]
    assert caught.value is failure


async def test_loop_calls_an_unexpected_exception_exactly_once() -> None:
    calls: list[int] = []

    with pytest.raises(RuntimeError):
        await run_calls(fast_policy(), [RuntimeError("bug")], calls)

    assert calls == [1]


async def test_loop_stops_as_soon_as_a_call_succeeds() -> None:
    policy = fast_policy(throttle_max_attempts=10)
    calls: list[int] = []

    await run_calls(policy, [throttled(), transient(), None], calls)

    assert calls == [1, 2, 3]


async def test_loop_makes_one_call_when_the_first_succeeds() -> None:
    calls: list[int] = []

    await run_calls(fast_policy(), [None], calls)

    assert calls == [1]


async def test_loop_stops_when_the_time_budget_is_spent() -> None:
    # Given a generous attempt budget but a 0.2 s time budget, and calls of 0.05 s each
    policy = fast_policy(transient_max_attempts=100, transient_max_seconds=0.2)
    calls = 0
    charge = Charge()

    with pytest.raises(TransientApiError):
        async for attempt in policy.retrying(charge):
            with attempt:
                calls += 1
                charge.attempts += 1
                await asyncio.sleep(0.05)
                raise transient()

    assert 2 <= calls <= 5


async def test_loop_reports_each_wait_to_before_sleep() -> None:
    policy = fast_policy(throttle_max_attempts=3)
    sleeps: list[int] = []

    def note(state: RetryCallState) -> None:
        sleeps.append(state.attempt_number)

    charge = Charge()
    with pytest.raises(ThrottledApiError):
        async for attempt in policy.retrying(charge, before_sleep=note):
            with attempt:
                charge.attempts += 1
                raise throttled()

    assert sleeps == [1, 2]


async def test_loop_switches_rule_when_the_failure_changes() -> None:
    # A throttle followed by an AccessDenied: the permanent failure ends the loop at once.
    policy = fast_policy(throttle_max_attempts=10)

    calls: list[int] = []

    with pytest.raises(PermanentApiError):
        await run_calls(policy, [throttled(), permanent()], calls)

    assert calls == [1, 2]
