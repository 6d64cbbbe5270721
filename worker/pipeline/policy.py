"""What follows a failed call: retry after how long, hold, or stop. One table, one decision.

A failure's kind is the row of its nearest class in `FAILURE_KINDS`, found along the class
hierarchy (`errors.translate_error` chose the class from Connect's answer), so a new subclass
falls to its nearest base. The kind, not the variant, picks the rule in the table that
`retry_table` builds from the settings; the variant only names the dead-letter queue.

- throttled (any 429): retried within the throttle budget; the limiter slows the pace meanwhile.
- transient (any 5xx, a transport failure): retried within the transient budget.
- held (the caller refused, unless the guard's `AccountVerdict` says it is the event's own):
  retried without a budget and never charged; the account breaker paces the attempts, and the
  worker hands the event back at shutdown.
- permanent (anything else, a refusal while other calls get through included): dead-lettered.

Budgets count what was charged to the message: probes and time held back by the guard are not.
Waits are full-jitter exponential backoff (tenacity's `wait_random_exponential`).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum

from tenacity import RetryCallState, Retrying, wait_random_exponential
from tenacity.wait import WaitBaseT

from worker.pipeline.account import AccountVerdict
from worker.pipeline.errors import (
    CallerRefusedError,
    EventFailure,
    ThrottledApiError,
    TransientApiError,
)
from worker.settings import WorkerSettings


class FailureKind(StrEnum):
    """What a failure says about retrying it; the key of the retry table."""

    THROTTLED = "throttled"
    """Connect's shared quota is exhausted for now."""
    TRANSIENT = "transient"
    """Connect or the network failed in a way a later attempt may not."""
    HELD = "held"
    """The caller is refused while every call seems to be: the account, not the event."""
    PERMANENT = "permanent"
    """A retry will not change the answer."""


class Action(Enum):
    """What a decision tells the sender to do."""

    RETRY = "retry"
    """Call again after the wait, charging the budget."""
    HOLD = "hold"
    """Call again after the wait, when the account breaker lets it; charge nothing."""
    STOP = "stop"
    """Give up: the failure is dead-lettered."""


FAILURE_KINDS: Mapping[type[EventFailure], FailureKind] = {
    ThrottledApiError: FailureKind.THROTTLED,
    TransientApiError: FailureKind.TRANSIENT,
    CallerRefusedError: FailureKind.HELD,  # permanent while the account verdict is ACCEPTED
    EventFailure: FailureKind.PERMANENT,
}
"""The kind of each failure class; a class not listed takes its nearest listed base's."""


@dataclass(frozen=True)
class RetryRule:
    """How a kind of failure is handled; `max_attempts` counts every charged call."""

    action: Action
    max_attempts: float = float("inf")
    max_seconds: float = float("inf")


@dataclass(frozen=True)
class Spent:
    """What one message has spent: calls made, and the attempts and seconds charged."""

    calls: int
    attempts: int
    seconds: float


@dataclass(frozen=True)
class Decision:
    """The answer to a failed call: what to do, after how many seconds, and why."""

    action: Action
    kind: FailureKind
    wait: float = 0.0

    @property
    def charged(self) -> bool:
        """Return True when the failed call counts against the message's budget."""
        return self.action is not Action.HOLD


def retry_table(settings: WorkerSettings) -> Mapping[FailureKind, RetryRule]:
    """Build the kind -> rule table from the configured budgets."""
    return {
        FailureKind.THROTTLED: RetryRule(
            Action.RETRY, settings.throttle_max_attempts, settings.throttle_max_seconds
        ),
        FailureKind.TRANSIENT: RetryRule(
            Action.RETRY, settings.transient_max_attempts, settings.transient_max_seconds
        ),
        FailureKind.HELD: RetryRule(Action.HOLD),
        FailureKind.PERMANENT: RetryRule(Action.STOP),
    }


def kind_of(failure: EventFailure, account: AccountVerdict) -> FailureKind:
    """Return the kind of a failure: the row of the nearest class in its hierarchy.

    A refusal of the caller is held only while the account looks refused everywhere; while
    other calls get past authentication, it is this event's own refusal, and permanent.
    """
    kind = next(FAILURE_KINDS[cls] for cls in type(failure).__mro__ if cls in FAILURE_KINDS)
    if kind is FailureKind.HELD and account is AccountVerdict.ACCEPTED:
        return FailureKind.PERMANENT
    return kind


class RetryPolicy:
    """Decide what follows a failed call, from the table and a backoff strategy."""

    def __init__(self, table: Mapping[FailureKind, RetryRule], backoff: WaitBaseT) -> None:
        self._table = table
        self._backoff = backoff
        self._retrying = Retrying(wait=backoff)  # only what a RetryCallState must name

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> "RetryPolicy":
        """Build the policy the settings describe: their budgets, full-jitter backoff."""
        backoff = wait_random_exponential(
            multiplier=settings.backoff_base_seconds, max=settings.backoff_max_seconds
        )
        return cls(retry_table(settings), backoff)

    def decide(self, failure: EventFailure, spent: Spent, account: AccountVerdict) -> Decision:
        """Decide on a failed call: retry or hold after a backoff, or stop.

        `spent` includes the failed call; `account` is the guard's verdict on refusals.
        """
        kind = kind_of(failure, account)
        rule = self._table[kind]
        within_budget = spent.attempts < rule.max_attempts and spent.seconds < rule.max_seconds
        if rule.action is Action.STOP or not within_budget:
            return Decision(Action.STOP, kind)
        return Decision(rule.action, kind, self.backoff(spent.calls))

    def backoff(self, calls: int) -> float:
        """Return the wait after the `calls`-th call failed (after the first: up to the base)."""
        # tenacity's wait strategies read the number of the failed attempt off a retry state.
        state = RetryCallState(self._retrying, fn=None, args=(), kwargs={})
        state.attempt_number = calls
        return float(self._backoff(state))
