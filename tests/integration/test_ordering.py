"""Per-conversation order across replicas, retries, throttles and a replica's crash."""

import asyncio
import json
import random
import signal
from collections import defaultdict

import pytest

from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, wait_until
from worker.models import conversation_key
from worker.testing.simulator import ConnectSimulator

pytestmark = pytest.mark.integration

CONVERSATIONS = 40
EVENTS = 25
# A replica that takes over learns the quota afresh: give throttles the production budget,
# not the integration tests' short one, or an event may be dead-lettered as throttled.
PRODUCTION_BUDGETS = {"WORKER_THROTTLE_MAX_ATTEMPTS": "10", "WORKER_TRANSIENT_MAX_ATTEMPTS": "6"}


def conversation_events(chat: int) -> list[bytes]:
    """Return one conversation: 24 messages then a DISCONNECT, numbered in Content."""
    events = []
    for turn in range(EVENTS):
        event: dict[str, object] = {"Type": "DISCONNECT"}
        if turn < EVENTS - 1:
            event = {"Type": "MESSAGE", "ContentType": "text/plain", "Content": f"{chat}:{turn}"}
        body = {"SourceId": f"+1555{chat:07d}", "DestinationId": "agent", "Event": event}
        events.append(json.dumps(body).encode())
    return events


async def publish_interleaved(broker: Broker) -> int:
    """Publish every conversation's events in order, interleaved across conversations."""
    queues = {chat: conversation_events(chat) for chat in range(CONVERSATIONS)}
    order = [chat for chat in queues for _ in range(EVENTS)]
    random.Random(4).shuffle(order)
    published = 0
    for chat in order:
        body = queues[chat].pop(0)
        await broker.publish(body, routing_key=conversation_key(json.loads(body)))
        published += 1
    return published


def turns_by_conversation(simulator: ConnectSimulator) -> dict[str, list[int]]:
    """Return, per conversation, the turn numbers Connect received, in arrival order."""
    arrived: dict[str, list[int]] = defaultdict(list)
    for call in simulator.received:
        source = call["body"]["SourceId"]
        event = call["body"]["Event"]
        turn = EVENTS - 1 if event["Type"] == "DISCONNECT" else int(event["Content"].split(":")[1])
        arrived[source].append(turn)
    return arrived


def first_deliveries(turns: list[int]) -> list[int]:
    """Drop redelivered duplicates, keeping each turn's first arrival."""
    seen: set[int] = set()
    return [turn for turn in turns if not (turn in seen or seen.add(turn))]


@pytest.mark.parametrize("spread", ["false", "true"], ids=["leader", "spread"])
async def test_two_replicas_deliver_every_conversation_in_order(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker, spread: str
) -> None:
    # Given a quota that throttles part of the calls, and two replicas started together
    # (by default one leads and one stands by; spread, they share the partitions)
    simulator.config.rate = 250
    simulator.config.burst = 5
    settings = {**PRODUCTION_BUDGETS, "WORKER_SPREAD_PARTITIONS": spread}
    first, second = await asyncio.gather(start_worker(**settings), start_worker(**settings))

    # When 40 conversations of 25 events are published interleaved
    total = await publish_interleaved(broker)
    await wait_until(lambda: len(simulator.received) >= total, timeout=90)

    # Then each conversation arrived complete, in order, without duplicates
    arrived = turns_by_conversation(simulator)
    assert len(arrived) == CONVERSATIONS
    for turns in arrived.values():
        assert turns == list(range(EVENTS))
    assert any(call["status"] == 429 for call in simulator.calls), "nothing was throttled"
    for worker in (first, second):
        worker.signal(signal.SIGTERM)
        assert await worker.wait() == 0


async def test_killing_the_active_replica_keeps_first_deliveries_in_order(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given two replicas, the first started being the active one, and a slowish Connect
    simulator.config.rate = 150
    simulator.config.burst = 5
    active = await start_worker(**PRODUCTION_BUDGETS)
    standby = await start_worker(**PRODUCTION_BUDGETS)
    total = await publish_interleaved(broker)

    # When the active replica is killed with SIGKILL in the middle of the traffic
    await wait_until(lambda: len(simulator.received) >= total // 3, timeout=60)
    active.signal(signal.SIGKILL)
    await active.wait()
    killed_at = len(simulator.received)

    # Then the standby takes over within seconds and everything is delivered
    await wait_until(lambda: len(simulator.received) > killed_at, timeout=10)
    await wait_until(lambda: _all_turns_arrived(simulator), timeout=90)
    arrived = turns_by_conversation(simulator)
    duplicates = sum(len(turns) - len(set(turns)) for turns in arrived.values())
    print(f"\nfailover: {duplicates} duplicate deliveries of {total} events")
    for turns in arrived.values():
        assert first_deliveries(turns) == list(range(EVENTS))
    assert duplicates <= 64  # at most what the killed replica held unacked
    await asyncio.sleep(0.5)
    assert await broker.work_count() == 0
    standby.signal(signal.SIGTERM)
    assert await standby.wait() == 0


def _all_turns_arrived(simulator: ConnectSimulator) -> bool:
    arrived = turns_by_conversation(simulator)
    return len(arrived) == CONVERSATIONS and all(
        set(turns) == set(range(EVENTS)) for turns in arrived.values()
    )
