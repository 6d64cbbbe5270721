"""Connect failing or stalling mid-backlog: transient outages cost no event and no dead letter.

A stalled call that outlives the worker's read timeout is ambiguous: Connect may have accepted
it. The API has no idempotency token, so its retry can deliver the event twice; that is the
documented duplicate risk, counted here against the ambiguous attempts the worker reports.
"""

import signal
import time

import pytest
from redis.asyncio import Redis

from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, control, metric, readiness, wait_until
from tests.reliability.conftest import REDIS_URL
from tests.reliability.ledger import Ledger, drained, quiescent, received_tokens, remembered_ids
from worker.testing.simulator import ConnectSimulator

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

PREFETCH = 32
# Generous budgets, as the production defaults are: an outage must not exhaust them.
BUDGETS = {
    "WORKER_TRANSIENT_MAX_ATTEMPTS": "20",
    "WORKER_THROTTLE_MAX_ATTEMPTS": "20",
    "WORKER_PREFETCH": str(PREFETCH),
}


async def test_failing_connect_for_10s_mid_backlog_loses_nothing(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a backlog of 1200 events draining at Connect's quota of 200/s
    simulator.config.rate = 200
    simulator.config.burst = 20
    ledger = Ledger()
    await ledger.publish_tokens(broker, 1200, prefix="fail")
    worker = await start_worker(**BUDGETS)
    port = worker.port
    await wait_until(lambda: len(simulator.received) >= 300, timeout=30)

    # When Connect answers every call with InternalServiceException for 10 seconds
    calls_before = len(simulator.calls)
    await control(simulator, "outage", {"seconds": 10, "code": "InternalServiceException"})
    await wait_until(lambda: _paused(port), timeout=5)

    # Then the worker holds the backlog, and delivers all of it once Connect is back
    await wait_until(lambda: drained(broker, ledger, simulator), timeout=60, every=0.25)
    await wait_until(lambda: quiescent(broker, port), timeout=20, every=0.25)
    failed = [c for c in simulator.calls[calls_before:] if c["code"] == "InternalServiceException"]
    ambiguous = await metric(port, "chat_worker_ambiguous_retries_total")
    await ledger.collect_dead_letters(broker)
    tally = ledger.tally(simulator)
    print(
        f"\n10s of InternalServiceException: {len(failed)} failed calls, "
        f"ambiguous_retries={ambiguous:.0f}: {tally.summary()}"
    )
    assert tally.lost == []
    assert tally.strangers == 0
    assert not tally.dead_lettered, "a transient outage emptied events into a dead-letter queue"
    # A 500 is an answer: Connect did not take the event, so a retry cannot duplicate it.
    assert ambiguous == 0
    assert tally.duplicates == 0
    assert len(failed) <= PREFETCH + 20, "the worker hammered a failing Connect"
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0


@pytest.mark.parametrize("ledger_kind", ["memory-ledger", "redis-ledger"])
async def test_stalled_connect_beyond_the_read_timeout_loses_nothing(
    ledger_kind: str,
    broker: Broker,
    simulator: ConnectSimulator,
    start_worker: StartWorker,
    redis_ledger: Redis,
) -> None:
    # Given a backlog of 800 events, and a worker that waits 1 s for an answer
    simulator.config.rate = 200
    simulator.config.burst = 20
    ledger = Ledger()
    await ledger.publish_tokens(broker, 800, prefix=ledger_kind)
    extra = {"WORKER_REDIS_URL": REDIS_URL} if ledger_kind == "redis-ledger" else {}
    worker = await start_worker(WORKER_READ_TIMEOUT_SECONDS="1", **BUDGETS, **extra)
    port = worker.port
    await wait_until(lambda: len(simulator.received) >= 200, timeout=30)

    # When, for 6 seconds, Connect takes 2 s to answer (and accepts the event all the same)
    await control(simulator, "outage", {"seconds": 6, "stall": 2})
    stalled_at = time.monotonic()

    # Then every event is delivered, none dead-lettered, within the outage plus the drain
    await wait_until(lambda: drained(broker, ledger, simulator), timeout=60, every=0.25)
    await wait_until(lambda: quiescent(broker, port), timeout=20, every=0.25)
    drained_after = time.monotonic() - stalled_at
    timeouts = await metric(port, "chat_worker_api_calls_total", outcome="ReadTimeoutError")
    ambiguous = await metric(port, "chat_worker_ambiguous_retries_total")
    await ledger.collect_dead_letters(broker)
    tally = ledger.tally(simulator)
    print(
        f"\n{ledger_kind}: 6s of 2s stalls, read timeout 1s, drained {drained_after:.1f}s after: "
        f"read_timeouts={timeouts:.0f} ambiguous_retries={ambiguous:.0f}: {tally.summary()}"
    )
    assert tally.lost == []
    assert tally.strangers == 0
    assert not tally.dead_lettered, "a stall emptied events into a dead-letter queue"
    assert ambiguous >= 1, "no call timed out: the stall did not bite"
    # Each duplicate is a timed-out call that Connect accepted anyway and the worker retried.
    assert tally.duplicates <= ambiguous
    # The ledger remembers only what Connect confirmed: nothing in it is missing from Connect.
    if ledger_kind == "redis-ledger":
        ids = await remembered_ids(redis_ledger, broker.base, ledger)
        assert ids == set(ledger.published)
        assert ids <= set(received_tokens(simulator))
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0


async def _paused(port: int) -> bool:
    """Return True when the worker reports not-ready because Connect is failing."""
    return await readiness(port) == 503
