"""Settings and fixtures shared by every test."""

from collections.abc import AsyncIterator

import pytest

from worker import amqp_compat
from worker.testing.simulator import ConnectSimulator, SimulatorConfig

# The test process speaks AMQP through the same lenient codecs as the worker: it reads back
# whatever the worker copied into a dead letter, and its publishers can send the raw bytes a
# careless producer would (a str decoded with surrogateescape goes out as those bytes).
amqp_compat.install()


@pytest.fixture
async def simulator() -> AsyncIterator[ConnectSimulator]:
    """Run the Connect simulator in the test's loop, on a free port."""
    sim = ConnectSimulator(SimulatorConfig(seed=7))
    await sim.start()
    yield sim
    await sim.stop()
