"""The sending loop: the real guard and policy around a client that answers as told.

The client stands in for `ConnectClient` only (what Connect answers is scripted); the loop, the
guard's breakers and limiter, and the policy's table are the worker's own.
"""

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import pytest
import structlog
from aio_pika.abc import AbstractIncomingMessage

from tests.unit.failures import access_denied, internal_error, throttled
from tests.unit.fake_clock import FakeClock
from worker.metrics import Metrics
from worker.models import ChatIntegrationEvent
from worker.pipeline.accepted import Accepted
from worker.pipeline.account import AccountEvidence, EvidenceRules
from worker.pipeline.breaker import Breaker
from worker.pipeline.errors import (
    CallerRefusedError,
    EventFailure,
    ThrottledApiError,
    TransientApiError,
)
from worker.pipeline.guard import Attempts, CallGuard
from worker.pipeline.policy import RetryPolicy
from worker.pipeline.rate_limiter import AdaptiveRateLimiter, RateLimitConfig
from worker.pipeline.sending import Sender
from worker.settings import WorkerSettings

pytestmark = pytest.mark.usefixtures("isolated_settings")

EVENT = ChatIntegrationEvent.model_validate(
    {"SourceId": "+15550000001", "DestinationId": "agent", "Event": {"Type": "DISCONNECT"}}
)


@dataclass
class Message:
    """The two properties of a delivery that sending reads."""

    message_id: str = "m-1"
    routing_key: str = "0" * 64


@dataclass
class ScriptedClient:
    """Answer each call with the next scripted failure, then accept every call."""

    failures: list[EventFailure]
    calls: int = 0
    answer: asyncio.Event | None = None
    on_call: Callable[[], None] = lambda: None

    async def send(self, event: ChatIntegrationEvent) -> Accepted:
        self.calls += 1
        self.on_call()
        if self.answer is not None:
            await self.answer.wait()
        if self.failures:
            raise self.failures.pop(0)
        return Accepted("request-id", "contact-1", new_chat=False)


@dataclass
class Setup:
    client: ScriptedClient
    guard: CallGuard
    metrics: Metrics
    sender: Sender
    remembered: list[str]


def make_setup(*failures: EventFailure, account_threshold: int = 2, **budgets: Any) -> Setup:
    """Wire a sender as the worker does, with millisecond backoffs and probes."""
    settings = WorkerSettings(backoff_base_seconds=0.001, backoff_max_seconds=0.002, **budgets)
    guard = CallGuard(
        AdaptiveRateLimiter(RateLimitConfig(initial_rate=1000.0)),
        Breaker("outage", 5, 0.01, 0.02),
        Breaker("account", 1, 0.01, 0.02),
        AccountEvidence(EvidenceRules(streak=account_threshold, undecided_seconds=0.05)),
    )
    client = ScriptedClient(list(failures))
    metrics = Metrics(worker_id="test")
    remembered: list[str] = []

    async def remember(message: AbstractIncomingMessage) -> None:
        remembered.append(str(message.message_id))

    policy = RetryPolicy.from_settings(settings)
    sender = Sender(client, policy, guard, metrics, structlog.get_logger(), remember)
    return Setup(client, guard, metrics, sender, remembered)


async def send(setup: Setup, attempts: Attempts) -> None:
    message = cast(AbstractIncomingMessage, Message())
    await asyncio.wait_for(setup.sender.send(EVENT, message, attempts), 5.0)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(f"chat_worker_{name}", labels)


def retries(metrics: Metrics, reason: str) -> float | None:
    return sample(metrics, "retries_total", reason=reason)


async def test_an_accepted_event_takes_one_call() -> None:
    setup = make_setup()
    attempts = Attempts()

    await send(setup, attempts)

    assert (setup.client.calls, attempts.calls, attempts.charged) == (1, 1, 1)


async def test_throttles_are_retried_until_connect_accepts() -> None:
    setup = make_setup(throttled(), throttled(), throttle_max_attempts=3)
    attempts = Attempts()

    await send(setup, attempts)

    assert setup.client.calls == 3
    assert retries(setup.metrics, "throttled") == 2


async def test_the_failure_is_raised_once_the_budget_is_charged() -> None:
    # Given Connect failing four times for an event whose transient budget is three attempts
    failures = [internal_error() for _ in range(4)]
    setup = make_setup(*failures, transient_max_attempts=3)
    attempts = Attempts()

    # When it is sent, then the third failure ends it, as Connect made it
    with pytest.raises(TransientApiError) as raised:
        await send(setup, attempts)
    assert raised.value is failures[2]
    assert (setup.client.calls, attempts.charged) == (3, 3)
    assert retries(setup.metrics, "transient") == 2


async def test_the_failure_is_raised_once_the_seconds_budget_is_charged() -> None:
    # Given calls that each take 50 s on the event's clock, and a throttle budget of 120 s
    clock = FakeClock()
    setup = make_setup(*[throttled() for _ in range(9)], throttle_max_seconds=120.0)

    def take_50_seconds() -> None:
        clock.now += 50.0

    setup.client.on_call = take_50_seconds
    attempts = Attempts(clock=clock)

    # When it is sent, then the call that ends 150 s after the first began is the last
    with pytest.raises(ThrottledApiError):
        await send(setup, attempts)
    assert setup.client.calls == 3


async def test_a_lone_refusal_is_raised_after_one_call_once_undecided_time_passes() -> None:
    setup = make_setup(access_denied())
    attempts = Attempts(conversation="c1")

    with pytest.raises(CallerRefusedError):
        await send(setup, attempts)
    assert (attempts.calls, attempts.charged) == (1, 1)
    assert setup.guard.account.closed


def refuse_everyone(setup: Setup) -> None:
    """Have the guard's evidence judge the account refused (other conversations were)."""
    for conversation in ("x", "y"):
        setup.guard.evidence.record_refused(conversation)
    assert setup.guard.evidence.account_wide


async def test_refusals_while_everything_is_refused_are_held_uncharged_until_accepted() -> None:
    # Given a worker whose calls of other conversations were refused, and Connect refusing
    # the caller five more times
    setup = make_setup(*[access_denied() for _ in range(5)], transient_max_attempts=1)
    refuse_everyone(setup)
    attempts = Attempts(conversation="c1")

    # When an event is sent, then it is held through the refusals (the account breaker opens
    # and probes) and delivered at last, with none of the refusals charged to its budget
    await send(setup, attempts)
    assert (attempts.calls, attempts.charged) == (6, 0)  # the accepting call was a probe
    assert setup.guard.account.closed


async def test_held_calls_leave_the_budget_whole_for_failures_after_the_account_recovers() -> None:
    # Given three refusals while every call is refused, then two 500s, for an event whose
    # transient budget is one attempt
    refusals = [access_denied() for _ in range(3)]
    setup = make_setup(*refusals, internal_error(), internal_error(), transient_max_attempts=1)
    refuse_everyone(setup)
    attempts = Attempts(conversation="c1")

    # When it is sent, then it is delivered: the 500s came while the account breaker probed,
    # and neither they nor the refusals were charged
    await send(setup, attempts)
    assert (attempts.calls, attempts.charged) == (6, 0)


async def test_a_call_on_the_wire_finishes_when_its_task_is_cancelled_and_is_remembered() -> None:
    # Given a call on the wire, waiting for Connect's answer
    setup = make_setup()
    setup.client.answer = asyncio.Event()
    task = asyncio.create_task(send(setup, Attempts()))
    await asyncio.sleep(0.01)
    assert setup.client.calls == 1

    # When its task is cancelled (the channel closed), and Connect accepts afterwards
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    setup.client.answer.set()
    for _ in range(10):
        await asyncio.sleep(0)

    # Then the event is counted as delivered and the ledger learns of it
    assert task.cancelled()
    assert setup.remembered == ["m-1"]
    assert sample(setup.metrics, "delivered_total") == 1
