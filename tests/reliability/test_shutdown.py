"""SIGTERM on a bad day: the worker exits 0 within its shutdown bound and loses nothing.

The bound (`shutdown_timeout_seconds`, 25 s by default) sits below the 30 s an orchestrator
waits before SIGKILL. Events that wait to be sent are handed back at once; calls on the wire
get what is left of the bound and are abandoned after it, their events handed back too.
"""

import pytest

from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, control, readiness, wait_until
from tests.integration.test_ordering import (
    CONVERSATIONS,
    EVENTS,
    PRODUCTION_BUDGETS,
    first_deliveries,
    publish_interleaved,
    turns_by_conversation,
)
from tests.reliability.ledger import Ledger, drained
from worker.settings import WorkerSettings
from worker.testing.simulator import ConnectSimulator

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

BOUND = WorkerSettings.model_fields["shutdown_timeout_seconds"].default
STOP_TIMEOUT = BOUND + 30
# What a test may add to the bound: the signal's delivery and the test's own polling.
SLACK = 1.0
BUDGETS = {
    "WORKER_TRANSIENT_MAX_ATTEMPTS": "50",
    "WORKER_TRANSIENT_MAX_SECONDS": "600",
    "WORKER_PREFETCH": "32",
}


async def assert_nothing_lost(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker, ledger: Ledger
) -> None:
    """Have a fresh worker deliver what was handed back; check that nothing was lost."""
    await control(simulator, "outage", {"seconds": 0})
    worker = await start_worker(**BUDGETS)
    await wait_until(lambda: drained(broker, ledger, simulator), timeout=60, every=0.25)
    code, _ = await worker.stop(STOP_TIMEOUT)
    assert code == 0
    await ledger.collect_dead_letters(broker)
    tally = ledger.tally(simulator)
    print(tally.summary())
    assert tally.lost == []
    assert not tally.dead_lettered


async def test_sigterm_while_connect_hangs_exits_within_the_bound_and_loses_nothing(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a backlog, and a worker whose read timeout (60 s) outlasts the shutdown bound, so
    # that only the bound can end the calls on the wire
    ledger = Ledger()
    await ledger.publish_tokens(broker, 300, prefix="hang")
    worker = await start_worker(WORKER_READ_TIMEOUT_SECONDS="60", **BUDGETS)
    await wait_until(lambda: len(simulator.received) >= 20, timeout=30)

    # When Connect stops answering (each call hangs for 100 s) and the worker gets SIGTERM
    # while its calls hang
    await control(simulator, "outage", {"seconds": 300, "stall": 100})
    before_the_stall = simulator.arrived
    await wait_until(lambda: simulator.arrived > before_the_stall, timeout=10)
    code, took = await worker.stop(STOP_TIMEOUT)

    # Then it exits 0 within the bound, having abandoned the calls it could not wait for
    print(f"\nexit {code} {took:.1f}s after SIGTERM, with Connect hanging (bound {BOUND:g}s)")
    assert code == 0
    assert took < BOUND + SLACK, f"took {took:.1f}s, beyond the {BOUND:g}s bound"
    assert any('"worker.calls_abandoned"' in line for line in worker.log_lines())

    # And nothing is lost: every event not delivered is back in a work queue, from where a
    # fresh worker delivers it once Connect answers again
    await assert_nothing_lost(broker, simulator, start_worker, ledger)


async def test_sigterm_while_the_outage_breaker_is_open_exits_at_once_and_loses_nothing(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a backlog, and a worker that paused because Connect fails every call
    ledger = Ledger()
    await ledger.publish_tokens(broker, 300, prefix="outage")
    worker = await start_worker(**BUDGETS)
    port = worker.port
    await wait_until(lambda: len(simulator.received) >= 20, timeout=30)
    await control(simulator, "outage", {"seconds": 300, "code": "InternalServiceException"})
    await wait_until(lambda: _paused(port), timeout=10)

    # When it gets SIGTERM while the outage breaker holds every event
    code, took = await worker.stop(STOP_TIMEOUT)

    # Then it exits 0 within a couple of seconds, not after the grace period: nothing that
    # waits for the breaker could be sent
    print(f"\nexit {code} {took:.1f}s after SIGTERM, with the outage breaker open")
    assert code == 0
    assert took < 3.0, f"took {took:.1f}s: it waited for events that could not be sent"

    # And nothing is lost or dead-lettered
    await assert_nothing_lost(broker, simulator, start_worker, ledger)


async def test_a_replica_stopped_mid_traffic_hands_over_without_breaking_any_order(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given two replicas, the first one active and the second standing by, and a Connect that
    # takes 100 ms a call, so that the active one holds calls on the wire and events in line
    simulator.config.latency_ms = 100
    active = await start_worker(**PRODUCTION_BUDGETS)
    standby = await start_worker(**PRODUCTION_BUDGETS)
    total = await publish_interleaved(broker)

    # When the active one gets SIGTERM in the middle of the traffic
    await wait_until(lambda: len(simulator.received) >= total // 3, timeout=60)
    code, _ = await active.stop(STOP_TIMEOUT)

    # Then the standby delivers the rest, and every conversation's first deliveries are in
    # order: it took no partition over while the stopped one still held earlier events
    assert code == 0
    await wait_until(lambda: _every_turn_arrived(simulator), timeout=90)
    for turns in turns_by_conversation(simulator).values():
        assert first_deliveries(turns) == list(range(EVENTS))
    code, _ = await standby.stop(STOP_TIMEOUT)
    assert code == 0


def _every_turn_arrived(simulator: ConnectSimulator) -> bool:
    """Return True once Connect has received every turn of every conversation."""
    arrived = turns_by_conversation(simulator)
    return len(arrived) == CONVERSATIONS and all(
        set(turns) == set(range(EVENTS)) for turns in arrived.values()
    )


async def _paused(port: int) -> bool:
    """Return True when the worker reports not-ready because Connect is failing."""
    return await readiness(port) == 503
