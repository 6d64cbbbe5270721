"""Fixtures that run the real worker process against the real RabbitMQ and the simulator."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aio_pika
import pytest

from tests.integration.support import (
    AMQP_URL,
    Broker,
    WorkerProcess,
    free_port,
    wait_until,
    worker_environment,
)
from worker.testing.simulator import ConnectSimulator
from worker.topology import declare_topology, delete_topology

PARTITIONS = 4


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    """Declare a topology under a unique base name, and delete it afterwards."""
    base = f"test-{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    await declare_topology(channel, base, PARTITIONS)
    yield Broker(connection, channel, base, PARTITIONS)
    cleanup = await connection.channel()
    await delete_topology(cleanup, base, PARTITIONS)
    await connection.close()


StartWorker = Callable[..., Awaitable[WorkerProcess]]


@pytest.fixture
async def start_worker(
    broker: Broker, simulator: ConnectSimulator, tmp_path: Path
) -> AsyncIterator[StartWorker]:
    """Start worker processes; wait until each consumes; kill any left at the end.

    Each serves health and metrics on a free port of its own (`WorkerProcess.port`).
    """
    started: list[WorkerProcess] = []

    async def start(**extra: str) -> WorkerProcess:
        log_path = tmp_path / f"worker-{len(started)}.log"
        extra.setdefault("WORKER_HTTP_PORT", str(free_port()))
        worker = await WorkerProcess.start(worker_environment(broker, simulator, **extra), log_path)
        started.append(worker)
        await wait_until(lambda: _consuming(worker), timeout=30.0)
        return worker

    yield start
    for worker in started:
        if worker.process.returncode is None:
            worker.process.kill()
            await worker.process.wait()


def _consuming(worker: WorkerProcess) -> bool:
    """Return True once the worker says it consumes every partition; fail fast if it died.

    The broker's consumer counts cannot tell: a single-active-consumer queue reports only
    its active consumer, not the standbys.
    """
    if worker.process.returncode is not None:
        raise AssertionError("worker exited early:\n" + "\n".join(worker.log_lines()[-20:]))
    return any('"worker.consuming"' in line for line in worker.log_lines())
