"""A broker outage in the middle of a backlog, as the worker sees it: its connection is cut.

The broker itself is shared with other tests, so the outage is a TCP proxy between the worker
and RabbitMQ that drops every connection and refuses new ones for a few seconds. Producers
keep publishing straight to the broker meanwhile, as they would to another cluster node.
"""

import asyncio
import signal
import time
from collections.abc import AsyncIterator

import pytest

from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, TcpProxy, readiness, wait_until
from tests.reliability.ledger import Ledger, drained, quiescent, token_event
from worker.testing.simulator import ConnectSimulator

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

EVENTS = 1500
DURING_OUTAGE = 200
PREFETCH = 64
OUTAGE_SECONDS = 4.0
DEAD_END = "simulate:ResourceNotFoundException"


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    """Put a TCP proxy in front of the broker."""
    tcp = TcpProxy()
    await tcp.start()
    yield tcp
    await tcp.stop()


async def test_cut_connection_mid_backlog_resumes_without_loss(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker, proxy: TcpProxy
) -> None:
    # Given a backlog of 1500 events, one in 50 bound for a destination that does not exist,
    # drained at Connect's quota of 300/s by a worker connected through the proxy
    simulator.config.rate = 300
    simulator.config.burst = 20
    ledger = Ledger()
    for index in range(0, EVENTS, 50):
        await asyncio.gather(
            *(_publish(ledger, broker, mid) for mid in range(index, index + 50)),
        )
    worker = await start_worker(
        WORKER_AMQP_URL=proxy.url,
        WORKER_PREFETCH=str(PREFETCH),
        WORKER_THROTTLE_MAX_ATTEMPTS="10",
    )
    port = worker.port
    await wait_until(lambda: len(simulator.received) >= EVENTS // 4, timeout=60)

    # When the broker is unreachable for 4 seconds while more events are published
    proxy.cut()
    cut_at = len(simulator.received)
    await asyncio.gather(
        *(_publish(ledger, broker, mid) for mid in range(EVENTS, EVENTS + DURING_OUTAGE))
    )
    await asyncio.sleep(OUTAGE_SECONDS)
    assert await readiness(port) == 503, "the worker claims readiness without a broker"
    proxy.restore()
    restored = time.monotonic()

    # Then the same process reconnects by itself and resumes consuming
    await wait_until(lambda: len(simulator.received) > cut_at + 50, timeout=30)
    await wait_until(lambda: drained(broker, ledger, simulator), timeout=60, every=0.25)
    resumed_in = time.monotonic() - restored
    await wait_until(lambda: quiescent(broker, port), timeout=30, every=0.25)
    assert worker.process.returncode is None

    # And every event was delivered or dead-lettered, none lost, duplicates bounded
    await ledger.collect_dead_letters(broker)
    tally = ledger.tally(simulator)
    print(f"\nbroker cut {OUTAGE_SECONDS}s, drained {resumed_in:.1f}s later: {tally.summary()}")
    assert tally.lost == []
    assert tally.strangers == 0
    expected_dead = {mid for mid, body in ledger.published.items() if DEAD_END.encode() in body}
    dead_ids = {letter.message_id for letter in ledger.dead_letters["ResourceNotFoundException"]}
    assert dead_ids == expected_dead
    assert set(tally.dead_lettered) == {"ResourceNotFoundException"}
    # A cut can duplicate at most what the worker held unacked when it happened.
    assert tally.duplicates + tally.dead_letter_duplicates <= PREFETCH
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0


async def test_calls_on_the_wire_at_a_cut_are_not_sent_twice_by_the_same_process(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker, proxy: TcpProxy
) -> None:
    # Given a slow Connect (1.5 s per call) and a worker with the default in-memory ledger
    simulator.config.latency_ms = 1500
    worker = await start_worker(WORKER_AMQP_URL=proxy.url, WORKER_READ_TIMEOUT_SECONDS="10")
    port = worker.port
    ledger = Ledger()
    for index in range(8):
        message_id = f"wire-{index}"
        await ledger.publish(broker, token_event(message_id, index), message_id)

    # When the broker connection is cut while those calls are on the wire, and Connect
    # answers them before it is back
    await wait_until(lambda: simulator.arrived == 8, timeout=10)
    cut_at = time.time()
    proxy.cut()
    await wait_until(lambda: len(simulator.calls) == 8, timeout=10)
    proxy.restore()
    await wait_until(lambda: drained(broker, ledger, simulator), timeout=30, every=0.25)
    await wait_until(lambda: quiescent(broker, port), timeout=30, every=0.25)
    on_the_wire = sum(call["at"] < cut_at for call in simulator.calls)
    assert on_the_wire >= 4, "the cut came too late to catch calls on the wire"

    # Then Connect accepted each of them once: the same process remembers what it delivered
    await ledger.collect_dead_letters(broker)
    tally = ledger.tally(simulator)
    print(f"\ncut with {on_the_wire} calls on the wire: {tally.summary()}")
    assert tally.lost == []
    assert worker.process.returncode is None
    assert tally.duplicates == 0


async def _publish(ledger: Ledger, broker: Broker, index: int) -> None:
    """Publish event `index`; every 50th goes to a destination Connect does not know."""
    message_id = f"cut-{index:05d}"
    destination = DEAD_END if index % 50 == 7 else "agent"
    await ledger.publish(broker, token_event(message_id, index % 40, destination), message_id)
