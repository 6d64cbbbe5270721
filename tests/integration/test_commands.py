"""The commands a user runs first: declare, publish, demo."""

import asyncio
import json
import sys
import uuid

import aio_pika
import pytest

from tests.integration.support import AMQP_URL, REPO
from worker.models import conversation_key
from worker.settings import WorkerSettings
from worker.topology import delete_topology, work_queue_names

DEFAULT_PARTITIONS = WorkerSettings.model_fields["partitions"].default

pytestmark = pytest.mark.integration


async def run_command(*args: str, stdin: bytes | None = None) -> tuple[int, str]:
    """Run `python -m worker ARGS`; return its exit code and output."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=REPO,
    )
    output, _ = await asyncio.wait_for(process.communicate(stdin), 120)
    assert process.returncode is not None
    return process.returncode, output.decode()


@pytest.fixture
async def base() -> object:
    """A unique topology name, deleted afterwards."""
    name = f"test-cmd-{uuid.uuid4().hex[:8]}"
    yield name
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await delete_topology(await connection.channel(), name, DEFAULT_PARTITIONS)


async def test_demo_accounts_for_every_event(base: str) -> None:
    code, output = await run_command("demo", "--queue", base, "--amqp-url", AMQP_URL)
    assert code == 0, output
    assert "every event accounted for: yes" in output
    assert "delivered to Connect                             30" in output


async def test_declare_then_publish_routes_by_conversation_key(base: str) -> None:
    # Given a declared topology
    code, output = await run_command("declare", "--queue", base, "--amqp-url", AMQP_URL)
    assert code == 0, output
    assert "guest:***@" in output and "guest:guest" not in output

    # When two events are published from stdin (blank lines skipped)
    event = {"SourceId": "+15550001", "DestinationId": "d", "Event": {"Type": "DISCONNECT"}}
    lines = (json.dumps(event) + "\n\n" + json.dumps(event) + "\n").encode()
    code, output = await run_command(
        "publish", "-", "--queue", base, "--amqp-url", AMQP_URL, stdin=lines
    )
    assert code == 0, output

    # Then both wait in the same partition, keyed by the conversation key
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        counts = {}
        for name in work_queue_names(base, DEFAULT_PARTITIONS):
            queue = await channel.declare_queue(name, passive=True)
            counts[name] = queue.declaration_result.message_count
        [(partition, count)] = [(name, n) for name, n in counts.items() if n]
        assert count == 2
        # basic.get is refused on single-active-consumer queues: consume one instead
        async with (await channel.get_queue(partition)).iterator() as messages:
            first = await anext(aiter(messages))
        assert first.routing_key == conversation_key(event)
        assert first.message_id and first.timestamp


async def test_bad_setting_is_a_clear_error(base: str) -> None:
    code, output = await run_command("declare", "--queue", "bad name with spaces")
    assert code == 2
    assert "queue" in output
