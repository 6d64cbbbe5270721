"""The registry of held deliveries: stages the guard marks, what shutdown can end, ages."""

import asyncio

import pytest

from worker.pipeline.account import AccountEvidence, EvidenceRules
from worker.pipeline.breaker import Breaker
from worker.pipeline.guard import Attempts, CallGuard
from worker.pipeline.inflight import WAITING, InFlight, Stage, Stopping
from worker.pipeline.rate_limiter import AdaptiveRateLimiter, RateLimitConfig

THRESHOLD = 3


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def guard_over(inflight: InFlight, probe_seconds: float = 60.0) -> CallGuard:
    """Return a guard that marks the stages of the deliveries `inflight` holds."""
    return CallGuard(
        AdaptiveRateLimiter(RateLimitConfig(initial_rate=1000.0)),
        Breaker("outage", THRESHOLD, probe_seconds, probe_seconds * 4),
        Breaker("account", THRESHOLD, probe_seconds, probe_seconds * 4),
        AccountEvidence(EvidenceRules()),
        stages=inflight,
    )


async def held_call(
    inflight: InFlight, guard: CallGuard, send: asyncio.Event, sent: list[str]
) -> str:
    """Carry one delivery as the worker does: held in the registry while its call is made."""
    with inflight.hold("queue", None):

        async def call() -> str:
            sent.append("sent")
            await send.wait()
            return "accepted"

        return await guard.call(call, Attempts())


async def test_a_call_waiting_for_an_open_breaker_can_be_ended_without_being_sent() -> None:
    # Given an open outage breaker whose next probe is a minute away, and a delivery waiting
    inflight = InFlight()
    guard = guard_over(inflight)
    for _ in range(THRESHOLD):
        guard.outage.record_failure(probe=False)
    sent: list[str] = []
    delivery = asyncio.create_task(held_call(inflight, guard, asyncio.Event(), sent))
    await asyncio.sleep(0.01)

    # When the worker stops: the guard closes and the deliveries that wait are cancelled
    assert inflight.tasks(WAITING) == {delivery}
    guard.close()
    for task in inflight.tasks(WAITING):
        task.cancel()

    # Then the delivery ends at once, unsent, and leaves the registry
    await asyncio.gather(delivery, return_exceptions=True)
    assert delivery.cancelled()
    assert sent == []
    assert len(inflight) == 0


async def test_a_call_on_the_wire_finishes_after_close_and_the_next_is_refused() -> None:
    # Given a delivery whose call is on the wire
    inflight = InFlight()
    guard = guard_over(inflight)
    answer = asyncio.Event()
    sent: list[str] = []
    delivery = asyncio.create_task(held_call(inflight, guard, answer, sent))
    await asyncio.sleep(0.01)
    assert inflight.tasks(frozenset({Stage.WIRE})) == {delivery}
    assert inflight.tasks(WAITING) == set()

    # When the guard closes, and the answer comes afterwards
    guard.close()
    answer.set()

    # Then the call gets its answer, and a new call is refused without being sent
    assert await delivery == "accepted"
    with pytest.raises(Stopping):
        await guard.call(lambda: asyncio.sleep(0, "never"), Attempts())


async def test_a_backoff_is_a_guard_wait_and_no_backoff_starts_after_close() -> None:
    inflight = InFlight()
    guard = guard_over(inflight)

    async def backing_off() -> None:
        with inflight.hold("queue", None):
            await guard.hold(lambda: asyncio.sleep(60))

    backoff = asyncio.create_task(backing_off())
    await asyncio.sleep(0.01)
    assert inflight.tasks(frozenset({Stage.GUARD})) == {backoff}

    guard.close()
    started: list[bool] = []

    async def wait() -> None:
        started.append(True)

    with pytest.raises(Stopping):
        await guard.hold(wait)
    assert started == []
    backoff.cancel()
    await asyncio.gather(backoff, return_exceptions=True)


async def test_ages_come_from_the_oldest_delivery_and_are_absent_when_none_is_held() -> None:
    monotonic, wall = FakeClock(100.0), FakeClock(1_000.0)
    inflight = InFlight(monotonic=monotonic, wall=wall)
    assert inflight.oldest_event_age() is None
    assert inflight.longest_hold() == 0.0
    release = asyncio.Event()

    async def deliver(published_at: float | None) -> None:
        with inflight.hold("queue", published_at):
            await release.wait()

    # Given an event published 10 s before it was taken, and 30 s later one without timestamp
    first = asyncio.create_task(deliver(990.0))
    await asyncio.sleep(0)
    monotonic.now, wall.now = 130.0, 1_030.0
    second = asyncio.create_task(deliver(None))
    await asyncio.sleep(0)

    # Then the longest hold is the first one's, and so is the oldest event
    assert inflight.longest_hold() == 30.0
    assert inflight.oldest_event_age() == 40.0

    # And once both are settled, there is no oldest event at all
    release.set()
    await asyncio.gather(first, second)
    assert inflight.oldest_event_age() is None
