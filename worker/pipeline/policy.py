"""What is retried, how often and how long: one table, looked up once per failure.

Precedence: the failure's class first, which `errors.translate_error` chose from the HTTP status
(any 429 follows the ThrottlingException rule, any 5xx or transport failure the
InternalServiceException rule, anything permanent is never retried), then the variant's rule.
"""

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, wait_random_exponential

from worker.pipeline.errors import (
    AccountSuspectError,
    ErrorVariant,
    EventFailure,
    MalformedEventError,
    PermanentApiError,
    ThrottledApiError,
    TransientApiError,
)
from worker.settings import WorkerSettings


@dataclass(frozen=True)
class RetryRule:
    """How a kind of failure is retried; `max_attempts` counts every call, the first included."""

    retry: bool
    max_attempts: int = 1
    max_seconds: float = 0.0


NEVER = RetryRule(retry=False)
# An event refused while the whole account seems refused is held, not dead-lettered: the
# account breaker paces its attempts, and the worker hands it back before consumer_timeout.
HOLD = RetryRule(retry=True, max_attempts=2**31, max_seconds=float("inf"))


def retry_table(settings: WorkerSettings) -> Mapping[ErrorVariant, RetryRule]:
    """Build the variant -> rule table from the configured budgets."""
    throttled = RetryRule(True, settings.throttle_max_attempts, settings.throttle_max_seconds)
    transient = RetryRule(True, settings.transient_max_attempts, settings.transient_max_seconds)
    return {
        ErrorVariant.THROTTLING: throttled,
        ErrorVariant.INTERNAL_SERVICE: transient,
        ErrorVariant.ACCESS_DENIED: NEVER,
        ErrorVariant.INVALID_REQUEST: NEVER,
        ErrorVariant.RESOURCE_NOT_FOUND: NEVER,
        ErrorVariant.UNKNOWN: NEVER,
        ErrorVariant.MALFORMED: NEVER,
    }


class RetryPolicy:
    """Decide whether a failed call is tried again, and build the tenacity loop that does it."""

    def __init__(
        self, table: Mapping[ErrorVariant, RetryRule], backoff_base: float, backoff_max: float
    ) -> None:
        self._table = table
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max

    @classmethod
    def from_settings(cls, settings: WorkerSettings) -> "RetryPolicy":
        """Build the policy the settings describe."""
        return cls(
            retry_table(settings), settings.backoff_base_seconds, settings.backoff_max_seconds
        )

    def rule_for(self, failure: BaseException) -> RetryRule:
        """Return the rule that governs a failure (status before variant, see module doc)."""
        if isinstance(failure, AccountSuspectError):
            return HOLD
        if isinstance(failure, ThrottledApiError):
            return self._table[ErrorVariant.THROTTLING]
        if isinstance(failure, TransientApiError):
            return self._table[ErrorVariant.INTERNAL_SERVICE]
        if isinstance(failure, PermanentApiError | MalformedEventError):
            return NEVER
        if isinstance(failure, EventFailure):
            return self._table.get(failure.variant, NEVER)
        return NEVER

    def should_retry(self, failure: BaseException, attempts: int, elapsed: float) -> bool:
        """Return True while the failure is retryable and its budget is not spent.

        `attempts` and `elapsed` are what was charged to the message: probes and time held
        back by the breakers and the rate limiter are not.
        """
        rule = self.rule_for(failure)
        return rule.retry and attempts < rule.max_attempts and elapsed < rule.max_seconds

    def first_wait(self) -> float:
        """Return the full-jitter wait before the first retry, as the tenacity loop's first."""
        return random.uniform(0, min(self._backoff_base, self._backoff_max))

    def retrying(
        self,
        charged: Callable[[], tuple[int, float]],
        before_sleep: Callable[[RetryCallState], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> AsyncRetrying:
        """Return a tenacity loop: full-jitter exponential backoff, stopped by the budget.

        `charged` returns the attempts and seconds charged to the message so far; `sleep`
        waits out a backoff (the worker's ends at once at shutdown).
        """

        def budget_spent(state: RetryCallState) -> bool:
            error = state.outcome.exception() if state.outcome else None
            return error is None or not self.should_retry(error, *charged())

        return AsyncRetrying(
            before_sleep=before_sleep,
            retry=retry_if_exception(lambda error: self.rule_for(error).retry),
            stop=budget_spent,
            wait=wait_random_exponential(multiplier=self._backoff_base, max=self._backoff_max),
            reraise=True,
            sleep=sleep,
        )
