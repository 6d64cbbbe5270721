"""Throttling-aware sending end to end: outages, failing events, account-wide refusals."""

import json
from itertools import pairwise

import pytest

from tests.integration.conftest import StartWorker
from tests.integration.support import (
    Broker,
    chat_event,
    control,
    encode,
    http_get,
    readiness,
    wait_until,
)
from worker.models import conversation_key
from worker.pipeline.errors import ErrorVariant
from worker.testing.simulator import ConnectSimulator

pytestmark = pytest.mark.integration

PROBE_SECONDS = 1.0


def body(index: int, destination: str = "agent") -> bytes:
    """Return a valid MESSAGE event whose content carries its index."""
    return encode(chat_event(f"+1555000{index % 50:04d}", destination, f"m{index}"))


async def publish_all(broker: Broker, bodies: list[bytes]) -> None:
    """Publish bodies keyed by conversation, as a producer does."""
    for item in bodies:
        await broker.publish(item, routing_key=conversation_key(json.loads(item)))


def delivered(simulator: ConnectSimulator) -> set[str]:
    """Return the contents Connect accepted."""
    return {call["body"]["Event"]["Content"] for call in simulator.received}


async def no_dead_letters(broker: Broker) -> bool:
    """Return True when every dead-letter queue is empty."""
    return all([await broker.dead_letter_count(variant) == 0 for variant in ErrorVariant])


async def test_an_outage_mid_backlog_is_ridden_out_without_dead_letters(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a backlog of 300 events draining at Connect's quota of 40/s
    simulator.config.rate = 40
    simulator.config.burst = 10
    await publish_all(broker, [body(i) for i in range(300)])
    await start_worker(
        WORKER_PREFETCH="16", WORKER_TRANSIENT_MAX_ATTEMPTS="6", WORKER_THROTTLE_MAX_ATTEMPTS="10"
    )
    await wait_until(lambda: len(simulator.received) >= 60)

    # When Connect fails every call for 15 seconds
    calls_before = len(simulator.calls)
    await control(simulator, "outage", {"seconds": 15, "code": "InternalServiceException"})

    # Then every event is delivered afterwards, none is dead-lettered,
    # and the outage saw the calls in flight plus a few probes, not a storm
    await wait_until(lambda: len(delivered(simulator)) == 300, timeout=90)
    assert delivered(simulator) == {f"m{i}" for i in range(300)}
    assert await no_dead_letters(broker)
    failed = [c for c in simulator.calls[calls_before:] if c["code"] == "InternalServiceException"]
    assert len(failed) <= 16 + 20, len(failed)


async def test_an_event_that_always_fails_is_dead_lettered_after_its_budget(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given good events and one that Connect always answers with InternalServiceException
    await publish_all(broker, [body(i) for i in range(20)])
    await publish_all(broker, [body(99, "simulate:InternalServiceException")])

    # When the worker, with a budget of 3 attempts, has processed them
    await start_worker(WORKER_TRANSIENT_MAX_ATTEMPTS="3")
    await wait_until(lambda: broker.dead_letter_count("InternalServiceException"))

    # Then the failing one is dead-lettered after exactly 3 calls, the others delivered
    [letter] = await broker.take_dead_letters("InternalServiceException")
    assert letter.headers["x-attempts"] == "3"
    assert letter.headers["x-http-status"] == "500"
    calls = [c for c in simulator.calls if c["code"] == "InternalServiceException"]
    assert len(calls) == 3
    await wait_until(lambda: len(delivered(simulator)) == 20)


async def test_access_denied_everywhere_pauses_with_the_backlog_intact(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given Connect refusing the account (a wrong role or expired credentials)
    await control(simulator, "outage", {"seconds": 120, "code": "AccessDeniedException"})
    await publish_all(broker, [body(i) for i in range(40)])
    port = (await start_worker(WORKER_PREFETCH="8", WORKER_PROBE_SECONDS=str(PROBE_SECONDS))).port

    # When the worker has met the refusals
    async def paused() -> bool:
        status, answer = await http_get(port, "/readyz")
        return status == 503 and "account" in json.loads(answer)["reason"].lower()

    await wait_until(paused)
    await wait_until(lambda: len(simulator.calls) >= 8)
    calls_when_paused = len(simulator.calls)

    # Then it holds every event instead of dead-lettering them, and only probes: it calls at
    # the probe pace (the calls already on their way when it paused aside)
    await wait_until(lambda: _probing(simulator, since=calls_when_paused), timeout=10)
    assert await broker.dead_letter_count("AccessDeniedException") == 0
    assert simulator.arrived - calls_when_paused <= 4
    assert simulator.arrived <= 8 + 8

    # When Connect accepts the account again, everything goes through and readiness returns
    await control(simulator, "outage", {"seconds": 0})
    await wait_until(lambda: len(delivered(simulator)) == 40, timeout=40)
    await wait_until(lambda: _ready(port))
    assert await no_dead_letters(broker)


def _probing(simulator: ConnectSimulator, since: int) -> bool:
    """Return True once two calls after the first `since` arrived a probe interval apart."""
    arrivals = [call["at"] for call in simulator.calls[since:]]
    return any(later - earlier >= PROBE_SECONDS for earlier, later in pairwise(arrivals))


async def _ready(port: int) -> bool:
    return await readiness(port) == 200
