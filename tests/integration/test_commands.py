"""The commands a user runs first: declare, publish, demo."""

import asyncio
import json
import os
import re
import signal
import sys
import uuid
from pathlib import Path

import aio_pika
import pytest

from tests.integration.support import AMQP_URL, REPO, run_command, wait_until
from worker.models import conversation_key
from worker.settings import WorkerSettings
from worker.testing.environment import clean_environment
from worker.topology import delete_topology, work_queue_names

DEFAULT_PARTITIONS = WorkerSettings.model_fields["partitions"].default

pytestmark = pytest.mark.integration


@pytest.fixture
async def base() -> object:
    """A unique topology name, deleted afterwards."""
    name = f"test-cmd-{uuid.uuid4().hex[:8]}"
    yield name
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        await delete_topology(await connection.channel(), name, DEFAULT_PARTITIONS)


async def test_demo_accounts_for_every_event(base: str) -> None:
    done = await run_command("demo", "--queue", base, "--amqp-url", AMQP_URL)
    assert done.code == 0, done.output
    assert "every event accounted for: yes" in done.output
    assert "delivered to Connect                             30" in done.output


async def test_two_demos_on_one_broker_each_use_and_delete_a_topology_of_their_own(
    base: str,
) -> None:
    # When two demos run at the same time on one broker
    runs = await asyncio.gather(
        *(run_command("demo", "--queue", base, "--amqp-url", AMQP_URL) for _ in range(2))
    )

    # Then each accounts for every one of its events, on a topology named after the base
    names = []
    for done in runs:
        assert done.code == 0, done.output
        assert "every event accounted for: yes" in done.output
        names.append(re.search(r"exchange '([^']+)'", done.output).group(1))
    assert names[0] != names[1]
    assert all(name.startswith(f"{base}-demo-") for name in names)

    # And neither topology is left behind
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        for name in names:
            with pytest.raises(aio_pika.exceptions.ChannelNotFoundEntity):
                channel = await connection.channel()
                await channel.declare_queue(work_queue_names(name, 1)[0], passive=True)


async def test_declare_then_publish_routes_by_conversation_key(base: str) -> None:
    # Given a declared topology
    declared = await run_command("declare", "--queue", base, "--amqp-url", AMQP_URL)
    assert declared.code == 0, declared.output
    assert "guest:***@" in declared.output and "guest:guest" not in declared.output

    # When two events are published from stdin (blank lines skipped)
    event = {"SourceId": "+15550001", "DestinationId": "d", "Event": {"Type": "DISCONNECT"}}
    lines = (json.dumps(event) + "\n\n" + json.dumps(event) + "\n").encode()
    published = await run_command(
        "publish", "-", "--queue", base, "--amqp-url", AMQP_URL, stdin=lines
    )
    assert published.code == 0, published.output

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
    done = await run_command("declare", "--queue", "bad name with spaces")
    assert done.code == 2
    assert "queue" in done.output


async def test_the_container_entrypoint_runs_the_worker_and_its_healthcheck_passes(
    base: str, tmp_path: Path
) -> None:
    # Given the exec-form ENTRYPOINT and CMD of the Dockerfile, run as the image would
    dockerfile = (REPO / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", dockerfile, re.M).group(1))
    command = json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1))
    healthcheck = json.loads(re.search(r"CMD (\[\"python\".+\])$", dockerfile, re.M).group(1))
    assert entrypoint == ["chat-worker"] and command == ["run"]
    env = clean_environment(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        WORKER_QUEUE=base,
        WORKER_AMQP_URL=AMQP_URL,
        WORKER_HTTP_PORT="8080",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="y",
    )
    process = await asyncio.create_subprocess_exec(
        *entrypoint,
        *command,
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        # When the HEALTHCHECK command runs against it
        async def healthy() -> bool:
            assert process.returncode is None, "the worker exited"
            check = await asyncio.create_subprocess_exec(
                sys.executable, *healthcheck[1:], stderr=asyncio.subprocess.DEVNULL
            )
            return await check.wait() == 0

        await wait_until(healthy, timeout=30, every=0.5)
    finally:
        # Then SIGTERM (docker stop) ends it with exit code 0
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
