"""Helpers for integration tests: the broker view, the worker process, commands, polling."""

import asyncio
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from prometheus_client.parser import text_string_to_metric_families

from worker.testing.environment import clean_environment, simulated_worker_environment
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


async def take_ready(queue: AbstractQueue) -> list[AbstractIncomingMessage]:
    """Remove and return every ready message of a queue (basic.get: SAC queues refuse it)."""
    taken = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        taken.append(message)
    return taken


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
        return await take_ready(await self.channel.declare_queue(queue, passive=True))

    async def take_dead_letters(self, variant: str) -> list[AbstractIncomingMessage]:
        """Remove and return one variant's dead letters."""
        return await self.take_all(dead_letter_queue_name(self.base, variant))


class WorkerProcess:
    """The real `python -m worker run`, as a subprocess with its output in a file."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path, port: int) -> None:
        self.process = process
        self.log_path = log_path
        self.port = port
        """Where it serves health and metrics (0: a port of its own choosing)."""

    @classmethod
    async def start(cls, env: dict[str, str], log_path: Path, *args: str) -> "WorkerProcess":
        """Start `python -m worker run ARGS` in `env`, stdout and stderr to `log_path`."""
        with log_path.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *[sys.executable, "-m", "worker", "run", *args],
                env=env,
                stdout=log_file,
                stderr=asyncio.subprocess.STDOUT,
                cwd=REPO,
            )
        return cls(process, log_path, int(env.get("WORKER_HTTP_PORT", "0")))

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send a signal to the worker."""
        self.process.send_signal(signum)

    async def wait(self, timeout: float = 30.0) -> int:
        """Wait for the exit code."""
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self, timeout: float = 30.0) -> tuple[int, float]:
        """Send SIGTERM; return the exit code and the seconds it took to exit."""
        signalled_at = time.monotonic()
        self.signal(signal.SIGTERM)
        code = await self.wait(timeout)
        return code, time.monotonic() - signalled_at

    def text(self) -> str:
        """Return what the worker printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_lines(self) -> list[str]:
        """Return what the worker printed, line by line."""
        return self.text().splitlines()

    async def wait_for(self, text: str, timeout: float = 30.0) -> None:
        """Wait until the worker prints a text; fail if it exits first or takes too long."""

        def printed() -> bool:
            assert self.process.returncode is None, f"exited early:\n{self.text()}"
            return text in self.text()

        await wait_until(printed, timeout, every=0.1)


def worker_environment(broker: Broker, simulator: ConnectSimulator, **extra: str) -> dict[str, str]:
    """Build a clean environment: only this test's settings reach the worker."""
    settings = {
        "WORKER_PARTITIONS": str(broker.partitions),
        "WORKER_CONFIG": str(REPO / "config" / "worker.toml"),
        "PYTHONUNBUFFERED": "1",
        **FAST_RETRIES,
        **extra,
    }
    return simulated_worker_environment(AMQP_URL, broker.base, simulator.url, **settings)


@dataclass
class Outcome:
    """What a command did: its exit code, what it printed, and how long it took."""

    code: int
    output: str
    """stdout, and stderr too unless it was kept apart."""
    errors: str
    """stderr when it was kept apart, else empty."""
    seconds: float

    @property
    def lines(self) -> list[str]:
        """Return the lines of `output`."""
        return self.output.splitlines()


async def run_command(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    stderr_apart: bool = False,
    timeout: float = 120.0,
) -> Outcome:
    """Run `python -m worker ARGS` to its end, as a user does; return what it did.

    Without `env`, in a clean environment (no WORKER_ or AWS_ variable): only the flags given
    reach the command.
    """
    started = time.monotonic()
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "worker", *args],
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if stderr_apart else asyncio.subprocess.STDOUT,
        cwd=REPO,
        env=clean_environment() if env is None else env,
    )
    output, errors = await asyncio.wait_for(process.communicate(stdin), timeout)
    assert process.returncode is not None
    return Outcome(
        process.returncode,
        output.decode(errors="replace"),
        (errors or b"").decode(errors="replace"),
        time.monotonic() - started,
    )


async def run_dlq(base: str, *args: str) -> tuple[int, str, str]:
    """Run `python -m worker dlq ARGS` on a topology; return exit code, stdout and stderr."""
    done = await run_command(
        "dlq", *args, "--queue", base, "--amqp-url", AMQP_URL, stderr_apart=True, timeout=30
    )
    return done.code, done.output, done.errors


def free_port() -> int:
    """Return a TCP port nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- The worker's HTTP endpoints, the simulator's control API ----------------------------------

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def http_get(port: int, path: str) -> tuple[int, str]:
    """GET one of the worker's endpoints; a refused connection reads as status 0."""
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}{path}") as response,
        ):
            return response.status, await response.text()
    except aiohttp.ClientConnectionError:
        return 0, ""


async def readiness(port: int) -> int:
    """Return the status of the worker's /readyz (0 when it does not answer)."""
    return (await http_get(port, "/readyz"))[0]


async def scrape(port: int) -> Samples:
    """GET /metrics and parse it as Prometheus does: {(sample name, labels): value}."""
    status, text = await http_get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def metric(port: int, name: str, **labels: str) -> float:
    """Return the sum of a metric's samples that carry `labels`, from /metrics (0 if none)."""
    return sum(
        sample_value
        for (sample_name, sample_labels), sample_value in (await scrape(port)).items()
        if sample_name == name and labels.items() <= dict(sample_labels).items()
    )


async def control(simulator: ConnectSimulator, what: str, spec: dict[str, Any]) -> None:
    """POST to the simulator's control API (`/_sim/WHAT`), as an operator of it would."""
    url = f"{simulator.url}/_sim/{what}"
    async with aiohttp.ClientSession() as http, http.post(url, json=spec) as response:
        assert response.status == 200, await response.text()


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
