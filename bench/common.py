"""Shared pieces of the benchmarks: the simulator process, traffic, worker processes, reports."""

import asyncio
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from worker.models import conversation_key
from worker.publisher import event_message
from worker.topology import declare_topology, delete_topology, work_queue_names

REPO = Path(__file__).resolve().parents[1]
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PARTITIONS = 8


def free_port() -> int:
    """Return a TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Simulator:
    """The Connect simulator in its own process, driven through its control API."""

    def __init__(self, **flags: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.flags = flags
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start `chat-worker simulate` and wait until it answers."""
        args = [sys.executable, "-m", "worker", "simulate", "--port", str(self.port)]
        for name, value in self.flags.items():
            if value is not None:
                args += [f"--{name.replace('_', '-')}", str(value)]
        self.process = await asyncio.create_subprocess_exec(
            *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL, cwd=REPO
        )
        for _ in range(100):
            try:
                await self.get("stats")
                return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        raise RuntimeError("simulator did not start")

    async def stop(self) -> None:
        """Stop the simulator process."""
        if self.process and self.process.returncode is None:
            self.process.terminate()
            await self.process.wait()

    async def get(self, what: str) -> Any:
        """GET a control endpoint."""
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/_sim/{what}") as r:
            r.raise_for_status()
            return await r.json()

    async def post(self, what: str, body: dict[str, Any] | None = None) -> None:
        """POST to a control endpoint."""
        url = f"{self.url}/_sim/{what}"
        async with aiohttp.ClientSession() as http, http.post(url, json=body or {}) as r:
            r.raise_for_status()

    async def calls(self) -> list[dict[str, Any]]:
        """Return every call the simulator answered, in arrival order."""
        return list((await self.get("calls"))["calls"])


def sample_events(count: int, conversations: int) -> Iterator[bytes]:
    """Yield `count` valid MESSAGE events spread round-robin over conversations."""
    for index in range(count):
        chat = index % conversations
        yield json.dumps(
            {
                "SourceId": f"+1555{chat:07d}",
                "DestinationId": "+18005550199",
                "Event": {
                    "Type": "MESSAGE",
                    "ContentType": "text/plain",
                    "Content": f"bench message {index}",
                },
            }
        ).encode()


@asynccontextmanager
async def topology(partitions: int = PARTITIONS) -> Any:
    """Declare a fresh topology for one run and delete it afterwards; yield its channel."""
    base = f"bench-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare_topology(channel, base, partitions)
        yield base, channel
        await delete_topology(await connection.channel(), base, partitions)
    finally:
        await connection.close()


async def publish_backlog(channel: Any, base: str, bodies: list[bytes]) -> None:
    """Publish bodies to the input exchange, keyed by conversation, confirmed in batches."""
    exchange = await channel.get_exchange(base)
    batch = []
    for body in bodies:
        key = conversation_key(json.loads(body))
        batch.append(exchange.publish(event_message(body), routing_key=key))
        if len(batch) == 200:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)


async def backlog_size(channel: Any, base: str, partitions: int = PARTITIONS) -> int:
    """Return the number of ready events in the work queues."""
    total = 0
    for name in work_queue_names(base, partitions):
        queue = await channel.declare_queue(name, passive=True)
        total += queue.declaration_result.message_count or 0
    return total


def worker_env(base: str, endpoint: str, **settings: str) -> dict[str, str]:
    """Return a worker process environment pointed at the simulator."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "AWS_"))}
    env.update(
        WORKER_AMQP_URL=AMQP_URL,
        WORKER_QUEUE=base,
        WORKER_PARTITIONS=str(PARTITIONS),
        WORKER_HTTP_PORT="0",
        WORKER_LOG_LEVEL="WARNING",
        AWS_ENDPOINT_URL_CONNECT=endpoint,
        AWS_ACCESS_KEY_ID="AKIDBENCH",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
    )
    env.update(settings)
    return env


async def start_workers(count: int, env: dict[str, str]) -> list[asyncio.subprocess.Process]:
    """Start worker processes."""
    return [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "run",
            env=env,
            cwd=REPO,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for _ in range(count)
    ]


async def stop_workers(processes: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM the workers and wait for them."""
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        await asyncio.wait_for(process.wait(), 60)


async def wait_for(predicate: Any, timeout: float, every: float = 0.2) -> bool:
    """Poll an async predicate until it holds or the timeout passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await predicate():
            return True
        await asyncio.sleep(every)
    return False


def table(rows: list[list[str]]) -> str:
    """Format rows as an aligned text table, first row as header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
