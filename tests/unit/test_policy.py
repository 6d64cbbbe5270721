"""The retry decision: one table keyed by kind, looked up along the class hierarchy (SPEC §5)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tenacity import wait_exponential

from tests.unit.failures import client_error, internal_error, throttled
from worker.pipeline.account import AccountVerdict
from worker.pipeline.errors import (
    CallerRefusedError,
    ErrorVariant,
    EventFailure,
    MalformedEventError,
    PermanentApiError,
    ThrottledApiError,
    TransientApiError,
    translate_error,
)
from worker.pipeline.policy import (
    Action,
    Decision,
    FailureKind,
    RetryPolicy,
    RetryRule,
    Spent,
    kind_of,
    retry_table,
)
from worker.settings import WorkerSettings

pytestmark = pytest.mark.usefixtures("isolated_settings")

ACCEPTED = AccountVerdict.ACCEPTED
SUSPECT = AccountVerdict.SUSPECT


def policy(**budgets: float) -> RetryPolicy:
    """Return a policy with the given budgets and a deterministic backoff: 1, 2, 4, 8 s."""
    settings = WorkerSettings(**budgets)  # type: ignore[arg-type]
    return RetryPolicy(retry_table(settings), wait_exponential(multiplier=1, max=8))


def spent(calls: int = 1, attempts: int | None = None, seconds: float = 0.0) -> Spent:
    """Return what a message spent; by default every call was charged."""
    return Spent(calls, calls if attempts is None else attempts, seconds)


def refused() -> CallerRefusedError:
    return CallerRefusedError(ErrorVariant.ACCESS_DENIED, "AccessDeniedException", http_status=403)


def invalid() -> PermanentApiError:
    return PermanentApiError(ErrorVariant.INVALID_REQUEST, "InvalidRequestException")


# --- the table -------------------------------------------------------------------------------


def test_every_kind_has_a_rule() -> None:
    assert set(retry_table(WorkerSettings())) == set(FailureKind)


def test_throttled_rule_is_a_retry_within_the_throttle_budget() -> None:
    settings = WorkerSettings(throttle_max_attempts=7, throttle_max_seconds=42.0)

    assert retry_table(settings)[FailureKind.THROTTLED] == RetryRule(Action.RETRY, 7, 42.0)


def test_transient_rule_is_a_retry_within_the_transient_budget() -> None:
    settings = WorkerSettings(transient_max_attempts=4, transient_max_seconds=9.5)

    assert retry_table(settings)[FailureKind.TRANSIENT] == RetryRule(Action.RETRY, 4, 9.5)


def test_held_rule_holds_without_a_budget_and_permanent_rule_stops() -> None:
    table = retry_table(WorkerSettings())

    assert table[FailureKind.HELD] == RetryRule(Action.HOLD)
    assert table[FailureKind.PERMANENT] == RetryRule(Action.STOP)


def test_default_budgets_stay_well_under_the_broker_consumer_timeout() -> None:
    # RabbitMQ closes a channel holding an unacked delivery after 30 minutes by default.
    settings = WorkerSettings()
    worst_case = max(settings.throttle_max_seconds, settings.transient_max_seconds)

    assert worst_case + settings.backoff_max_seconds + settings.read_timeout_seconds < 30 * 60 / 2


# --- kinds, along the class hierarchy ----------------------------------------------------------


class SlowDownError(ThrottledApiError):
    """A subclass of a class in the table."""


class GatewayError(TransientApiError):
    """Another one."""


class RevokedKeyError(CallerRefusedError):
    """A subclass of the held row's class."""


class StrangeError(EventFailure):
    """An EventFailure subclass the table does not know."""


class StrangePermanentError(PermanentApiError):
    """A permanent subclass the table does not know: its nearest listed base is EventFailure."""


@pytest.mark.parametrize(
    ("failure", "kind"),
    [
        (throttled(), FailureKind.THROTTLED),
        (internal_error(), FailureKind.TRANSIENT),
        (invalid(), FailureKind.PERMANENT),
        (MalformedEventError(ErrorVariant.MALFORMED, "NotJson"), FailureKind.PERMANENT),
        (SlowDownError(ErrorVariant.UNKNOWN, "SlowDown"), FailureKind.THROTTLED),
        (GatewayError(ErrorVariant.UNKNOWN, "BadGateway"), FailureKind.TRANSIENT),
        (StrangeError(ErrorVariant.UNKNOWN, "Strange"), FailureKind.PERMANENT),
        (StrangePermanentError(ErrorVariant.UNKNOWN, "Strange"), FailureKind.PERMANENT),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, EventFailure) else str(value),
)
def test_a_failure_takes_the_kind_of_its_nearest_class_in_the_table(
    failure: EventFailure, kind: FailureKind
) -> None:
    assert kind_of(failure, ACCEPTED) is kind
    assert kind_of(failure, SUSPECT) is kind  # the verdict only ever concerns refusals


@pytest.mark.parametrize("failure", [refused(), RevokedKeyError(ErrorVariant.UNKNOWN, "Revoked")])
def test_a_refusal_of_the_caller_is_held_only_while_the_account_looks_refused(
    failure: EventFailure,
) -> None:
    assert kind_of(failure, SUSPECT) is FailureKind.HELD
    assert kind_of(failure, ACCEPTED) is FailureKind.PERMANENT


@pytest.mark.parametrize(
    ("code", "status", "kind"),
    [
        ("AccessDeniedException", 429, FailureKind.THROTTLED),
        ("TooManyRequestsException", 429, FailureKind.THROTTLED),
        ("AccessDeniedException", 503, FailureKind.TRANSIENT),
        ("ServiceUnavailableException", 503, FailureKind.TRANSIENT),
        ("AccessDeniedException", 403, FailureKind.HELD),
        ("ThrottlingException", 400, FailureKind.THROTTLED),
        ("InvalidRequestException", 400, FailureKind.PERMANENT),
    ],
)
def test_a_known_code_else_the_status_decides_the_kind(
    code: str, status: int, kind: FailureKind
) -> None:
    # Seen by an account that looks refused everywhere, so that a refusal shows as held.
    assert kind_of(translate_error(client_error(code, status)), SUSPECT) is kind


# --- the decision ------------------------------------------------------------------------------


def test_a_throttle_is_retried_until_the_attempt_budget_is_charged() -> None:
    rules = policy(throttle_max_attempts=3)

    assert rules.decide(throttled(), spent(calls=1), ACCEPTED).action is Action.RETRY
    assert rules.decide(throttled(), spent(calls=2), ACCEPTED).action is Action.RETRY
    assert rules.decide(throttled(), spent(calls=3), ACCEPTED) == Decision(
        Action.STOP, FailureKind.THROTTLED
    )


def test_a_throttle_is_retried_until_the_seconds_budget_is_charged() -> None:
    rules = policy(throttle_max_attempts=100, throttle_max_seconds=30.0)

    assert rules.decide(throttled(), spent(seconds=29.99), ACCEPTED).action is Action.RETRY
    assert rules.decide(throttled(), spent(seconds=30.0), ACCEPTED).action is Action.STOP


def test_a_transient_failure_is_retried_within_its_own_budget() -> None:
    rules = policy(transient_max_attempts=2, transient_max_seconds=10.0, throttle_max_attempts=9)

    assert rules.decide(internal_error(), spent(calls=1), ACCEPTED).action is Action.RETRY
    assert rules.decide(internal_error(), spent(calls=2), ACCEPTED).action is Action.STOP
    assert rules.decide(internal_error(), spent(seconds=10.0), ACCEPTED).action is Action.STOP


def test_only_charged_attempts_count_against_the_budget() -> None:
    # Five calls made, of which two were probes: three attempts charged, within a budget of 4.
    rules = policy(transient_max_attempts=4)

    decision = rules.decide(internal_error(), spent(calls=5, attempts=3), ACCEPTED)

    assert decision.action is Action.RETRY


@pytest.mark.parametrize(
    "failure",
    [invalid(), MalformedEventError(ErrorVariant.MALFORMED, "NotJson"), refused()],
    ids=["invalid-request", "malformed", "refused-while-others-pass"],
)
def test_a_permanent_failure_stops_at_its_first_attempt(failure: EventFailure) -> None:
    decision = policy().decide(failure, spent(calls=1), ACCEPTED)

    assert decision == Decision(Action.STOP, FailureKind.PERMANENT)
    assert decision.charged


def test_a_refusal_while_the_account_looks_refused_is_held_and_never_charged() -> None:
    # However much the event has spent, it waits for the account instead of being dead-lettered.
    decision = policy().decide(refused(), spent(calls=10_000, seconds=10_000.0), SUSPECT)

    assert decision.action is Action.HOLD
    assert decision.kind is FailureKind.HELD
    assert not decision.charged


@pytest.mark.parametrize("failure", [throttled(), internal_error()], ids=["throttled", "transient"])
def test_retries_are_charged(failure: EventFailure) -> None:
    assert policy().decide(failure, spent(), SUSPECT).charged


def test_the_wait_grows_with_the_calls_made_held_ones_included() -> None:
    rules = policy()  # 1, 2, 4, 8 s, capped at 8

    waits = [rules.decide(internal_error(), spent(calls=n), ACCEPTED).wait for n in (1, 2, 3, 4, 5)]
    held = rules.decide(refused(), spent(calls=4, attempts=0), SUSPECT).wait

    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert held == 8.0


def test_the_configured_backoff_is_full_jitter_exponential() -> None:
    settings = WorkerSettings(backoff_base_seconds=0.5, backoff_max_seconds=3.0)
    rules = RetryPolicy.from_settings(settings)

    for calls, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 3.0), (9, 3.0)]:
        waits = [rules.backoff(calls) for _ in range(300)]
        assert all(0.0 <= wait <= ceiling for wait in waits), calls
        assert max(waits) > ceiling / 2, calls  # spread over the whole window
        assert len(set(waits)) > 250, calls  # jittered, not fixed


def test_from_settings_uses_the_configured_budgets() -> None:
    rules = RetryPolicy.from_settings(WorkerSettings(throttle_max_attempts=2))

    assert rules.decide(throttled(), spent(calls=1), ACCEPTED).action is Action.RETRY
    assert rules.decide(throttled(), spent(calls=2), ACCEPTED).action is Action.STOP


@given(
    kind=st.sampled_from(["throttled", "transient", "invalid", "refused"]),
    verdict=st.sampled_from(list(AccountVerdict)),
    calls=st.integers(1, 50),
    probes=st.integers(0, 50),
    seconds=st.floats(0.0, 1000.0),
)
def test_no_decision_retries_past_its_budget_or_stops_a_held_event(
    kind: str, verdict: AccountVerdict, calls: int, probes: int, seconds: float
) -> None:
    failure = {
        "throttled": throttled(),
        "transient": internal_error(),
        "invalid": invalid(),
        "refused": refused(),
    }[kind]
    settings = WorkerSettings(
        throttle_max_attempts=5,
        throttle_max_seconds=60.0,
        transient_max_attempts=3,
        transient_max_seconds=20.0,
    )
    rules = RetryPolicy(retry_table(settings), wait_exponential(max=8))
    charged = max(0, calls - probes)

    decision = rules.decide(failure, Spent(calls, charged, seconds), verdict)

    budget = {"throttled": (5, 60.0), "transient": (3, 20.0)}.get(kind)
    if decision.action is Action.RETRY:
        assert budget is not None and charged < budget[0] and seconds < budget[1]
    assert (decision.action is Action.HOLD) == (kind == "refused" and verdict is not ACCEPTED)
    assert 0.0 <= decision.wait <= 8.0
