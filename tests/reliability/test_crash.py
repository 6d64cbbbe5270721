"""SIGKILL in the middle of a backlog: nothing is lost, duplicates stay within what was in flight.

A killed worker's unacked deliveries go back to their queues. Those that Connect had already
accepted (sent but not yet acked, or acked but the ack still in a socket buffer at the kill)
are sent again by the next worker, unless a ledger shared across processes remembers them:
Redis does; the default in-memory ledger dies with the process, so it only catches
redeliveries within one process (a cut connection), never the ones after a restart.
"""

import signal
import time

import pytest
from redis.asyncio import Redis

from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, wait_until
from tests.reliability.conftest import REDIS_URL
from tests.reliability.ledger import (
    Ledger,
    drained,
    quiescent,
    received_at_least,
    received_tokens,
    remembered_ids,
)
from worker.testing.simulator import ConnectSimulator

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

EVENTS = 3000
PREFETCH = 64  # 16 per partition over 4 partitions: the most a worker holds unacked
KILLS = 2


LEDGERS = {
    # No ledger at all: every redelivery after the kill is sent again.
    "dedupe-off": {"WORKER_DEDUPE_WINDOW_SECONDS": "0"},
    # A ledger that outlives the process: redeliveries Connect already accepted are skipped.
    "redis-ledger": {"WORKER_REDIS_URL": REDIS_URL},
}


@pytest.mark.parametrize("ledger_kind", list(LEDGERS))
async def test_sigkill_mid_backlog_loses_nothing(
    ledger_kind: str,
    broker: Broker,
    simulator: ConnectSimulator,
    start_worker: StartWorker,
    redis_ledger: Redis,
) -> None:
    # Given a backlog of 3000 events over 50 conversations, and Connect's quota at 400/s
    simulator.config.rate = 400
    simulator.config.burst = 20
    simulator.config.latency_ms = 5
    ledger = Ledger()
    await ledger.publish_tokens(broker, EVENTS, prefix=ledger_kind)
    # Production retry budgets: a new worker re-learning the quota is throttled a few times.
    settings = {
        "WORKER_PREFETCH": str(PREFETCH),
        "WORKER_THROTTLE_MAX_ATTEMPTS": "10",
        "WORKER_TRANSIENT_MAX_ATTEMPTS": "6",
        **LEDGERS[ledger_kind],
    }
    worker = await start_worker(**settings)
    workers = [worker]
    started = time.monotonic()

    # When the worker is killed with SIGKILL twice during the drain, and replaced each time
    for kill in range(1, KILLS + 1):
        target = EVENTS * kill // (KILLS + 1)
        await wait_until(received_at_least(simulator, target), timeout=60)
        worker.signal(signal.SIGKILL)
        assert await worker.wait() == -signal.SIGKILL
        worker = await start_worker(**settings)
        workers.append(worker)

    # Then every event is delivered (none dead-lettered), and the queues are empty
    await wait_until(lambda: drained(broker, ledger, simulator), timeout=90, every=0.25)
    drain_seconds = time.monotonic() - started
    # Quiescent: nothing waits or is held, so every redelivery has had its chance to duplicate.
    await wait_until(lambda: quiescent(broker, worker.port), timeout=20, every=0.25)
    await ledger.collect_dead_letters(broker)
    tally = ledger.tally(simulator)
    skipped = sum(
        '"event.duplicate_skipped"' in line for each in workers for line in each.log_lines()
    )
    print(
        f"\n{ledger_kind}: {KILLS} kills, {drain_seconds:.1f}s: {tally.summary()} "
        f"redeliveries_skipped_by_ledger={skipped}"
    )
    assert tally.lost == []
    assert tally.strangers == 0
    assert not tally.dead_lettered
    # Each kill can duplicate at most what the killed worker held unacked.
    assert tally.duplicates <= KILLS * PREFETCH
    # With Redis, every remembered delivery really reached Connect: the ledger hides no loss.
    if ledger_kind == "redis-ledger":
        ids = await remembered_ids(redis_ledger, broker.base, ledger)
        assert ids, "the Redis ledger remembered nothing"
        assert ids <= set(received_tokens(simulator))
    else:
        assert skipped == 0
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0
