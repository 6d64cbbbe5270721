"""Readiness tells the truth when the broker takes the work queues away."""

import json

import aiohttp
import pytest

from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, chat_event, encode, wait_until
from worker.models import conversation_key
from worker.testing.simulator import ConnectSimulator

pytestmark = pytest.mark.integration


async def readyz(port: int) -> tuple[int, str]:
    """Return /readyz's status and reason."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}/readyz") as response,
    ):
        return response.status, json.loads(await response.text())["reason"]


async def test_deleted_work_queues_make_it_not_ready_until_they_are_back_and_bound(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a worker that consumes every partition and says so
    port = (await start_worker()).port
    await wait_until(lambda: _status_is(port, 200), timeout=10)

    # When the work queues are deleted under it
    seen: list[tuple[int, str]] = []
    for name in broker.work_queues:
        await broker.channel.queue_delete(name)

    # Then it reports not ready, saying why
    async def not_ready() -> bool:
        seen.append(await readyz(port))
        return seen[-1][0] == 503

    await wait_until(not_ready, timeout=5, every=0.02)
    reason = seen[-1][1]
    assert "cancelled" in reason and broker.work_queues[0] in reason, reason

    # And once it has declared them again, bound, it is ready, and an event published
    # afterwards reaches Connect
    await wait_until(lambda: _status_is(port, 200), timeout=30)
    body = chat_event("+15550001111", "agent", "after the queues came back")
    await broker.publish(encode(body), routing_key=conversation_key(body))
    await wait_until(lambda: len(simulator.received) == 1, timeout=10)
    assert await broker.work_count() == 0


async def _status_is(port: int, status: int) -> bool:
    """Return True when /readyz answers with `status`."""
    try:
        return (await readyz(port))[0] == status
    except (TimeoutError, aiohttp.ClientError):
        return False
