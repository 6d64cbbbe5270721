"""Helpers for integration tests: the broker view, the worker process, polling."""

import asyncio
import json
import os
import signal
import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from worker.testing.simulator import ConnectSimulator
from worker.topology import dead_letter_queue_name, work_queue_names

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
REPO = Path(__file__).resolve().parents[2]

# Short budgets so that retried failures reach their dead-letter queue in well under a second.
FAST_RETRIES = {
    "WORKER_THROTTLE_MAX_ATTEMPTS": "3",
    "WORKER_TRANSIENT_MAX_ATTEMPTS": "3",
    "WORKER_BACKOFF_BASE_SECONDS": "0.01",
    "WORKER_BACKOFF_MAX_SECONDS": "0.05",
    "WORKER_DEAD_LETTER_RETRY_DELAY_SECONDS": "0.2",
}


def chat_event(source: str, destination: str, content: str, **fields: object) -> dict[str, Any]:
    """Return a valid MESSAGE event from `source`, with extra top-level fields."""
    body: dict[str, Any] = {
        "SourceId": source,
        "DestinationId": destination,
        "Event": {"Type": "MESSAGE", "ContentType": "text/plain", "Content": content},
    }
    body.update(fields)
    return body


def encode(body: dict[str, Any]) -> bytes:
    """Encode like a producer: compact JSON, UTF-8."""
    return json.dumps(body, separators=(",", ":")).encode()


async def wait_until(
    predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 20.0, every: float = 0.05
) -> None:
    """Poll until the predicate holds; fail the test with a clear message on timeout."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        outcome = predicate()
        if isinstance(outcome, Awaitable):
            outcome = await outcome
        if outcome:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(every)


class Broker:
    """A test's view of the topology: publish, count and read back messages."""

    def __init__(
        self, connection: AbstractConnection, channel: AbstractChannel, base: str, partitions: int
    ):
        self.connection = connection
        self.channel = channel
        self.base = base
        self.partitions = partitions
        self.work_queues = work_queue_names(base, partitions)

    async def publish(self, body: bytes, routing_key: str = "k", **properties: Any) -> str:
        """Publish a raw body to the input exchange with confirms; return its message_id."""
        properties.setdefault("message_id", str(uuid.uuid4()))
        exchange = await self.channel.get_exchange(self.base)
        message = aio_pika.Message(body=body, delivery_mode=2, **properties)
        await exchange.publish(message, routing_key=routing_key, mandatory=True)
        return str(properties["message_id"])

    async def count(self, queue: str) -> int:
        """Return the number of ready messages in a queue."""
        declared = await self.channel.declare_queue(queue, passive=True)
        assert declared.declaration_result.message_count is not None
        return declared.declaration_result.message_count

    async def consumers(self, queue: str) -> int:
        """Return the number of consumers of a queue."""
        declared = await self.channel.declare_queue(queue, passive=True)
        return declared.declaration_result.consumer_count or 0

    async def dead_letter_count(self, variant: str) -> int:
        """Return how many dead letters one variant's queue holds."""
        return await self.count(dead_letter_queue_name(self.base, variant))

    async def work_count(self) -> int:
        """Return how many events wait in the work queues."""
        return sum([await self.count(name) for name in self.work_queues])

    async def work_consumers(self) -> int:
        """Return the number of consumers over all partitions (active and standby)."""
        return sum([await self.consumers(name) for name in self.work_queues])

    async def take_all(self, queue: str) -> list[AbstractIncomingMessage]:
        """Remove and return every ready message of a queue."""
        declared = await self.channel.declare_queue(queue, passive=True)
        taken = []
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return taken

    async def take_dead_letters(self, variant: str) -> list[AbstractIncomingMessage]:
        """Remove and return one variant's dead letters."""
        return await self.take_all(dead_letter_queue_name(self.base, variant))


class WorkerProcess:
    """The real `python -m worker run`, as a subprocess with its output in a file."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self.process = process
        self.log_path = log_path

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal to the worker."""
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:
        """Wait for the exit code."""
        return await asyncio.wait_for(self.process.wait(), timeout)

    def log_lines(self) -> list[str]:
        """Return what the worker printed."""
        return self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()


def worker_environment(broker: Broker, simulator: ConnectSimulator, **extra: str) -> dict[str, str]:
    """Build a clean environment: only this test's settings reach the worker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "AWS_"))}
    env.update(
        WORKER_AMQP_URL=AMQP_URL,
        WORKER_QUEUE=broker.base,
        WORKER_PARTITIONS=str(broker.partitions),
        WORKER_HTTP_PORT="0",
        WORKER_CONFIG=str(REPO / "config" / "worker.toml"),
        AWS_ENDPOINT_URL_CONNECT=simulator.url,
        AWS_ACCESS_KEY_ID="AKIDTESTWORKER",
        AWS_SECRET_ACCESS_KEY="test-secret-do-not-log",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        PYTHONUNBUFFERED="1",
    )
    env.update(FAST_RETRIES)
    env.update(extra)
    return env


def free_port() -> int:
    """Return a TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class TcpProxy:
    """A TCP proxy in front of the broker that a test can cut, as a network failure would."""

    def __init__(self, target_port: int = 5672) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()
        self.refusing = False

    @property
    def url(self) -> str:
        """Return the AMQP URL that goes through the proxy."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self) -> None:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and cut every connection."""
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self, refuse: bool = True) -> None:
        """Drop every open connection; with `refuse`, also drop new ones until `restore`."""
        self.refusing = refuse
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    def restore(self) -> None:
        """Accept connections again."""
        self.refusing = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Pipe one client connection to the broker, both ways."""
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self._pipes |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy bytes until either side closes."""
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            self._pipes.discard(writer)
            writer.transport.abort()
