"""Nothing dropped by the broker itself: delivery limits, expirations and peeks.

RabbitMQ 4.0-4.2 give quorum queues a delivery limit of 20 by default; the broker here (3.10)
has none, so these tests imitate it with an operator policy, which combines with any user
policy (PITFALLS). Workers run in this test's own event loop (`Worker.run`), against the real
broker and the simulator over HTTP.
"""

import asyncio
import contextlib
import json
import re
import shlex
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aio_pika
import pytest

from tests.integration.support import AMQP_URL, Broker, control, run_command, wait_until
from tests.integration.test_pipeline import aws_credentials, settings_for  # noqa: F401
from tests.reliability.ledger import Ledger, Tally, drained
from worker.ops.dead_letter_queues import list_queues, show_messages
from worker.pipeline.errors import ErrorVariant
from worker.runner.lifecycle import Worker
from worker.testing.simulator import ConnectSimulator
from worker.topology import (
    LEGACY_PARTITION,
    dead_letter_exchange_name,
    declare_topology,
    delete_topology,
    work_queue_names,
)

pytestmark = pytest.mark.integration

BROKER_DEAD = ErrorVariant.BROKER_DEAD_LETTERED.value
OUTAGE = {"seconds": 600, "code": "InternalServiceException"}
# An outage must not use up the events' retry budgets: only the broker's limit is under test.
# Patient budgets, and the cautious prefetch these tests are about (off by default).
PATIENT = {
    "transient_max_attempts": 1000,
    "transient_max_seconds": 3600.0,
    "cautious_prefetch": True,
}

ImposeLimit = Callable[[str, int], Awaitable[None]]


def rabbitmqctl(*args: str) -> str:
    """Run rabbitmqctl on the local node; return what it printed."""
    done = subprocess.run(["rabbitmqctl", *args], capture_output=True, text=True, check=True)
    return done.stdout


def policy_on(pattern: str, column: str) -> dict[str, str]:
    """Return the queues matching `pattern` with one policy column of `list_queues`."""
    lines = rabbitmqctl("list_queues", "-q", "--no-table-headers", "name", column).splitlines()
    rows = [line.split("\t") for line in lines if "\t" in line]
    return {name: value for name, value in rows if re.match(pattern, name)}


@pytest.fixture
async def delivery_limit() -> AsyncIterator[ImposeLimit]:
    """Imitate RabbitMQ 4.x's delivery limit with an operator policy; remove it afterwards."""
    names: list[str] = []

    async def impose(base: str, limit: int) -> None:
        name = f"{base}-delivery-limit"
        pattern = "^" + re.escape(base) + r"\."
        definition = json.dumps({"delivery-limit": limit})
        # 3.10 cannot list a queue's operator policy; a quorum queue receives the change as a
        # command of its log before rabbitmqctl returns, ahead of what the test does next.
        rabbitmqctl("set_operator_policy", name, pattern, definition, "--apply-to", "queues")
        names.append(name)

    yield impose
    for name in names:
        rabbitmqctl("clear_operator_policy", name)


async def take_broker_dead_letters(broker: Broker) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Remove and return what the broker dead-lettered from the work queues."""
    return await broker.take_dead_letters(BROKER_DEAD)


def reason_of(letter: aio_pika.abc.AbstractIncomingMessage) -> tuple[str, str]:
    """Return the broker's reason and source queue, from the latest `x-death` entry."""
    death = (letter.headers or {})["x-death"][0]  # type: ignore[index]
    return str(death["reason"]), str(death["queue"])


# --- expiration ----------------------------------------------------------------------------


async def test_an_expired_event_lands_in_the_broker_dead_letter_queue(broker: Broker) -> None:
    # Given an event whose producer gave it 0.3 s to live, and no worker to take it
    message_id = await broker.publish(b'{"k": 1}', routing_key="conv-1", expiration=0.3)

    # When it waits past its expiration
    await wait_until(lambda: _count(broker, BROKER_DEAD, 1), timeout=20)

    # Then it is in the new dead-letter queue, whole, with the broker's reason
    [letter] = await take_broker_dead_letters(broker)
    assert letter.message_id == message_id and letter.body == b'{"k": 1}'
    reason, queue = reason_of(letter)
    assert reason == "expired"
    assert queue in broker.work_queues
    assert await broker.work_count() == 0


async def _count(broker: Broker, variant: str, expected: int) -> bool:
    return await broker.dead_letter_count(variant) == expected


# --- peeks ---------------------------------------------------------------------------------


async def test_thirty_lists_and_shows_under_a_limit_of_20_keep_every_dead_letter(
    broker: Broker, delivery_limit: ImposeLimit, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given three dead letters in a queue under an imitated delivery limit of 20
    variant = ErrorVariant.THROTTLING.value
    exchange = await broker.channel.get_exchange(dead_letter_exchange_name(broker.base))
    ids = [f"dead-{n}" for n in range(3)]
    for message_id in ids:
        message = aio_pika.Message(b"{}", message_id=message_id, delivery_mode=2)
        await exchange.publish(message, routing_key=variant, mandatory=True)
    await delivery_limit(broker.base, 20)

    # When `dlq list` and `dlq show` run 30 times each
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for _ in range(30):
            assert await list_queues(connection, broker.base, as_json=True) == 0
            assert await show_messages(connection, broker.base, variant, 5, reveal=False) == 0
    printed = capsys.readouterr().out

    # Then every dead letter is still there, in its order, and show printed each one
    assert [m.message_id for m in await broker.take_dead_letters(variant)] == ids
    assert printed.count("dead-0") == printed.count("dead-2") == 30


# --- restarts during an outage -------------------------------------------------------------


async def run_until_holding(broker: Broker, simulator: ConnectSimulator) -> None:
    """Start a worker, let it take deliveries it cannot send, and stop it (a deploy)."""
    worker = Worker(settings_for(broker, **PATIENT), endpoint_url=simulator.url)
    task = asyncio.create_task(worker.run())
    try:
        await wait_until(lambda: _holding(worker, broker.partitions), timeout=30)
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)


async def _holding(worker: Worker, partitions: int) -> bool:
    return worker.partitions.consuming() and len(worker.inflight) >= partitions


async def deliver_the_rest(broker: Broker, simulator: ConnectSimulator, ledger: Ledger) -> None:
    """End the outage and let a worker deliver everything left in the work queues."""
    await control(simulator, "outage", {"seconds": 0})
    worker = Worker(settings_for(broker, **PATIENT), endpoint_url=simulator.url)
    await asyncio.wait_for(worker.run(burst=True), 120)
    await wait_until(lambda: drained(broker, ledger, simulator), timeout=30)


async def test_the_full_prefetch_comes_once_connect_accepts_and_goes_when_it_fails(
    broker: Broker, simulator: ConnectSimulator
) -> None:
    # Given a worker started with a backlog and Connect up
    ledger = Ledger()
    await ledger.publish_tokens(broker, 40, prefix="prefetch")
    worker = Worker(settings_for(broker, **PATIENT), endpoint_url=simulator.url)
    task = asyncio.create_task(worker.run())
    try:
        # When Connect has accepted calls, it consumes with the full prefetch
        assert worker.partitions.prefetch_per_partition() == 1
        await wait_until(lambda: not worker.partitions.cautious, timeout=30)
        assert worker.partitions.prefetch_per_partition() == 64 // broker.partitions
        # And once Connect fails and the outage breaker opens, with one per partition again
        await control(simulator, "outage", OUTAGE)
        await ledger.publish_tokens(broker, 40, prefix="later")
        await wait_until(lambda: worker.partitions.cautious, timeout=30)
        await wait_until(lambda: _holding(worker, broker.partitions), timeout=30)
        assert len(worker.inflight) == broker.partitions
    finally:
        worker.request_stop()
        await asyncio.wait_for(task, 60)


async def restart_then_deliver(
    broker: Broker, simulator: ConnectSimulator, ledger: Ledger, restarts: int
) -> Tally:
    """Restart workers during the outage, then deliver; check that only the broker dead-lettered.

    Whatever the broker dead-lettered must carry its reason, a delivery limit.
    """
    for _ in range(restarts):
        await run_until_holding(broker, simulator)
    await deliver_the_rest(broker, simulator, ledger)
    await ledger.collect_dead_letters(broker)
    tally = ledger.tally(simulator)
    assert tally.lost == []
    assert set(tally.dead_lettered) <= {BROKER_DEAD}
    reasons = {reason_of(letter)[0] for letter in ledger.dead_letters[BROKER_DEAD]}
    assert reasons <= {"delivery_limit"}
    return tally


async def test_25_restarts_during_an_outage_under_a_limit_of_20_drop_nothing(
    broker: Broker, simulator: ConnectSimulator, delivery_limit: ImposeLimit
) -> None:
    # Given 200 events, RabbitMQ 4.x's delivery limit imitated, and Connect down
    await delivery_limit(broker.base, 20)
    ledger = Ledger()
    await ledger.publish_tokens(broker, 200, prefix="restart")
    await control(simulator, "outage", OUTAGE)

    # When the worker is restarted 25 times (a deploy repeated during the incident)
    tally = await restart_then_deliver(broker, simulator, ledger, restarts=25)

    # Then none is dropped: at most 16 dead-lettered by the broker, with their reason
    print(f"\n25 restarts under a delivery limit of 20: {tally.summary()}")
    assert tally.dead_lettered[BROKER_DEAD] <= 16


# --- upgrading a deployment ----------------------------------------------------------------


@pytest.fixture
async def old_deployment() -> AsyncIterator[Broker]:
    """A topology whose work queues an older version declared (without dead-lettering)."""
    base = f"test-{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    for name in work_queue_names(base, 4):
        await channel.declare_queue(name, durable=True, arguments=LEGACY_PARTITION)
    await declare_topology(channel, base, 4)
    yield Broker(connection, channel, base, 4)
    with contextlib.suppress(subprocess.CalledProcessError):
        rabbitmqctl("clear_policy", f"{base}.work-dead-lettering")
    await delete_topology(await connection.channel(), base, 4)
    await connection.close()


async def test_an_old_deployment_upgraded_by_the_printed_policy_loses_nothing(
    old_deployment: Broker, simulator: ConnectSimulator, delivery_limit: ImposeLimit
) -> None:
    broker = old_deployment
    # Given old work queues with a backlog held by a running replica while Connect is down
    ledger = Ledger()
    await ledger.publish_tokens(broker, 60, prefix="upgrade")
    await control(simulator, "outage", OUTAGE)
    await delivery_limit(broker.base, 3)
    await run_until_holding(broker, simulator)

    # When `declare` (the new version) runs and the policy it prints is applied
    done = await run_command("declare", "--queue", broker.base, "--amqp-url", AMQP_URL)
    assert done.code == 0, done.output
    [command] = [line.strip() for line in done.lines if line.strip().startswith("rabbitmqctl")]
    rabbitmqctl(*shlex.split(command)[1:])
    pattern = "^" + re.escape(broker.base) + r"\.work\."
    await wait_until(lambda: all(policy_on(pattern, "policy").values()), timeout=20, every=0.5)

    # And new replicas are restarted on them past the imitated limit, then Connect comes back
    tally = await restart_then_deliver(broker, simulator, ledger, restarts=4)

    # Then nothing is lost: the returns over the limit were dead-lettered, with their reason
    print(f"\nupgraded by the policy: {tally.summary()}")
    assert tally.dead_lettered[BROKER_DEAD] >= 1
    checked = await run_command("check", "--queue", broker.base, "--amqp-url", AMQP_URL)
    assert checked.code == 0, checked.output
    assert "declared by an older version" in checked.output
