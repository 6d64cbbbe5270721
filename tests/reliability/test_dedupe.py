"""The delivered-events ledger (message_id and body), within one process and across processes.

A redelivery after a lost ack reaches the worker as the same message_id again; publishing the
event twice under one message_id looks exactly like that to the worker.
"""

import signal

import pytest
from redis.asyncio import Redis

from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, metric, wait_until
from tests.reliability.conftest import REDIS_URL
from tests.reliability.ledger import quiescent, received_tokens, token_event
from worker.testing.simulator import ConnectSimulator

pytestmark = [pytest.mark.reliability, pytest.mark.integration]


@pytest.mark.parametrize(
    ("window", "calls", "skipped"),
    [("86400", 1, 1), ("0", 2, 0)],
    ids=["in-memory-ledger", "dedupe-off"],
)
async def test_a_redelivered_message_id_is_sent_once_with_the_ledger(
    window: str,
    calls: int,
    skipped: int,
    broker: Broker,
    simulator: ConnectSimulator,
    start_worker: StartWorker,
) -> None:
    # Given the same event published twice under one message_id, and a control event after it
    body = token_event("twice", 1)
    await broker.publish(body, routing_key="conversation-1", message_id="same-id")
    await broker.publish(body, routing_key="conversation-1", message_id="same-id")
    await broker.publish(token_event("after", 1), routing_key="conversation-1", message_id="next")

    # When one worker consumes them, with the in-memory ledger or with dedupe off
    worker = await start_worker(WORKER_DEDUPE_WINDOW_SECONDS=window)
    port = worker.port
    await wait_until(lambda: "after" in received_tokens(simulator), timeout=20)
    await wait_until(lambda: quiescent(broker, port), timeout=10, every=0.1)

    # Then Connect saw the event once (ledger) or twice (off), and the skip was counted
    assert received_tokens(simulator)["twice"] == calls
    assert len(simulator.calls) == calls + 1
    assert await metric(port, "chat_worker_duplicates_skipped_total") == skipped
    assert await metric(port, "chat_worker_delivered_total") == calls + 1
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0


@pytest.mark.parametrize(
    ("ledger_env", "calls"),
    [({"WORKER_REDIS_URL": REDIS_URL}, 1), ({}, 2)],
    ids=["redis-ledger", "in-memory-ledger"],
)
async def test_only_the_redis_ledger_outlives_the_process(
    ledger_env: dict[str, str],
    calls: int,
    broker: Broker,
    simulator: ConnectSimulator,
    start_worker: StartWorker,
    redis_ledger: Redis,
) -> None:
    # Given an event delivered by a worker that has since stopped
    body = token_event("again", 2)
    first = await start_worker(**ledger_env)
    await broker.publish(body, routing_key="conversation-2", message_id="again-id")
    await wait_until(lambda: "again" in received_tokens(simulator), timeout=20)
    first.signal(signal.SIGTERM)
    assert await first.wait() == 0

    # When the same message_id arrives again, at a new worker process
    await broker.publish(body, routing_key="conversation-2", message_id="again-id")
    await broker.publish(token_event("after", 2), routing_key="conversation-2", message_id="n")
    second = await start_worker(**ledger_env)
    port = second.port
    await wait_until(lambda: "after" in received_tokens(simulator), timeout=20)
    await wait_until(lambda: quiescent(broker, port), timeout=10, every=0.1)

    # Then Redis remembers it across processes; the in-memory ledger died with the first one
    assert received_tokens(simulator)["again"] == calls
    assert await metric(port, "chat_worker_duplicates_skipped_total") == 2 - calls
    second.signal(signal.SIGTERM)
    assert await second.wait() == 0


LEDGERS = [({}, "in-memory-ledger"), ({"WORKER_REDIS_URL": REDIS_URL}, "redis-ledger")]


@pytest.mark.parametrize("ledger_env", [env for env, _ in LEDGERS], ids=[i for _, i in LEDGERS])
async def test_a_reused_message_id_with_another_body_is_delivered_and_counted(
    ledger_env: dict[str, str],
    broker: Broker,
    simulator: ConnectSimulator,
    start_worker: StartWorker,
    redis_ledger: Redis,
) -> None:
    # Given two different events under one message_id (a producer's restarted counter),
    # the first of them redelivered, and a control event after them
    first, second = token_event("first", 3), token_event("second", 3)
    for body in (first, first, second, token_event("control", 3)):
        await broker.publish(body, routing_key="conversation-3", message_id="counter-1")

    # When one worker consumes them
    worker = await start_worker(**ledger_env)
    port = worker.port
    await wait_until(lambda: "control" in received_tokens(simulator), timeout=20)
    await wait_until(lambda: quiescent(broker, port), timeout=10, every=0.1)

    # Then both different events reached Connect, the redelivery did not, and the reuse counts
    tokens = received_tokens(simulator)
    assert (tokens["first"], tokens["second"], tokens["control"]) == (1, 1, 1)
    assert await metric(port, "chat_worker_duplicates_skipped_total") == 1
    assert await metric(port, "chat_worker_reused_message_ids_total") == 2
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0


async def test_the_redis_ledger_reads_and_writes_the_keys_of_earlier_versions(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker, redis_ledger: Redis
) -> None:
    # Given an event an earlier version delivered: it recorded `<queue>:delivered:<message_id>`
    await redis_ledger.set(f"{broker.base}:delivered:old-id", b"1", ex=600)
    await broker.publish(token_event("old", 4), routing_key="conversation-4", message_id="old-id")
    # ... and a new event
    await broker.publish(token_event("new", 4), routing_key="conversation-4", message_id="new-id")

    # When a worker of this version consumes them
    worker = await start_worker(WORKER_REDIS_URL=REDIS_URL)
    port = worker.port
    await wait_until(lambda: "new" in received_tokens(simulator), timeout=20)
    await wait_until(lambda: quiescent(broker, port), timeout=10, every=0.1)

    # Then the earlier version's delivery is not sent again, and this version's delivery is
    # recorded under the earlier key too, for replicas of that version in a rolling deploy
    assert "old" not in received_tokens(simulator)
    assert await metric(port, "chat_worker_duplicates_skipped_total") == 1
    assert await redis_ledger.get(f"{broker.base}:delivered:new-id") is not None
    assert len([key async for key in redis_ledger.scan_iter(f"{broker.base}:delivered:v2*")]) == 2
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0
