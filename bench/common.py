"""Shared pieces of the benchmarks: the simulator process, traffic, worker processes, reports."""

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp

from worker.models import conversation_key
from worker.ops.publish import event_message
from worker.testing.environment import simulated_worker_environment
from worker.topology import declare_topology, delete_topology, work_queue_names

REPO = Path(__file__).resolve().parents[1]
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PARTITIONS = 8
PREFETCH = 64
"""Unacked messages per consumer process: the worker's default, and the bare loop's."""


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

    async def __aenter__(self) -> "Simulator":
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

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


def chat_message(conversation: int, content: str) -> bytes:
    """Return a valid MESSAGE event of one conversation (its customer's number)."""
    event = {"Type": "MESSAGE", "ContentType": "text/plain", "Content": content}
    body = {"SourceId": f"+1555{conversation:07d}", "DestinationId": "+18005550199"}
    return json.dumps({**body, "Event": event}).encode()


def sample_events(count: int, conversations: int) -> Iterator[bytes]:
    """Yield `count` valid MESSAGE events spread round-robin over conversations."""
    for index in range(count):
        yield chat_message(index % conversations, f"bench message {index}")


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
    """Return the environment of a worker on topology `base`: its defaults, INFO logs."""
    defaults = {
        "WORKER_PARTITIONS": str(PARTITIONS),
        "WORKER_PREFETCH": str(PREFETCH),
        "WORKER_LOG_LEVEL": "INFO",
    }
    return simulated_worker_environment(AMQP_URL, base, endpoint, **{**defaults, **settings})


async def start_workers(
    count: int, base: str, endpoint: str, **settings: str
) -> list[asyncio.subprocess.Process]:
    """Start worker processes on topology `base`, calling the simulator at `endpoint`."""
    env = worker_env(base, endpoint, **settings)
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


async def stop_processes(processes: list[asyncio.subprocess.Process]) -> None:
    """SIGTERM consumer processes (workers or bare loops) still running and wait for them."""
    for process in processes:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
    for process in processes:
        await asyncio.wait_for(process.wait(), 60)


@asynccontextmanager
async def stopped_after(
    processes: list[asyncio.subprocess.Process],
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """Yield consumer processes; stop them when the block ends, however it ends."""
    try:
        yield processes
    finally:
        await stop_processes(processes)


@asynccontextmanager
async def running_worker(
    base: str, endpoint: str, **settings: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run one worker process on topology `base` for the block; stop it at the end."""
    async with stopped_after(await start_workers(1, base, endpoint, **settings)) as (worker,):
        yield worker


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


# --- Process measurements (CPU from /proc/<pid>/stat, memory from /proc/<pid>/status) ----------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return the user + system CPU seconds a process has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may hold spaces: count fields from after its closing parenthesis.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Return the resident set size of a process (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class CpuSampler:
    """Sample the CPU time of processes every few milliseconds, to read it at any past instant.

    The benchmarks count CPU between the first and the last API call (wall-clock times the
    simulator records), so the start-up of a process (imports, connecting) is left out.
    """

    def __init__(
        self, pids: list[int], context: dict[str, int] | None = None, every: float = 0.02
    ) -> None:
        self.pids = pids
        self.context = context or {}
        self.every = every
        watched = [*pids, *self.context.values()]
        self.samples: dict[int, list[tuple[float, float]]] = {pid: [] for pid in watched}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start sampling in the background."""
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop sampling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.every)

    def sample(self) -> None:
        """Record the CPU time of every process still alive, at the current wall-clock time."""
        now = time.time()
        for pid in self.samples:
            with contextlib.suppress(OSError, IndexError, ValueError):
                self.samples[pid].append((now, cpu_seconds(pid)))

    def at(self, pid: int, moment: float) -> float:
        """Return a process's CPU seconds at a wall-clock moment, interpolated between samples."""
        samples = self.samples[pid]
        if not samples:
            return 0.0
        if moment <= samples[0][0]:
            return samples[0][1]
        for (t0, c0), (t1, c1) in itertools.pairwise(samples):
            if t0 <= moment <= t1:
                return c0 + (c1 - c0) * (moment - t0) / max(t1 - t0, 1e-9)
        return samples[-1][1]

    def between(self, start: float, end: float) -> float:
        """Return the CPU seconds the measured processes used between two wall-clock moments."""
        return sum(self.at(pid, end) - self.at(pid, start) for pid in self.pids)

    def context_between(self, start: float, end: float) -> dict[str, float]:
        """Return the CPU seconds each context process (simulator, broker) used meanwhile."""
        return {name: self.at(pid, end) - self.at(pid, start) for name, pid in self.context.items()}


def broker_pid() -> int | None:
    """Return the pid of a local RabbitMQ (beam.smp) if this machine runs one we can see."""
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "beam.smp":
                return int(comm.parent.name)
    return None


def context_pids(sim: Simulator) -> dict[str, int]:
    """Return the processes that serve every contender: the simulator and the broker."""
    pids = {"simulator": sim.process.pid} if sim.process else {}
    broker = broker_pid()
    if broker is not None:
        pids["broker"] = broker
    return pids


@dataclass(frozen=True)
class Drain:
    """How one contender drained a backlog, from the simulator's record and the CPU samples."""

    events: int
    seconds: float
    late_rate: float
    cpu_seconds: float
    context_cpu: dict[str, float]
    process_cpu: tuple[float, ...] = ()

    @property
    def rate(self) -> float:
        """Return events per second from the first to the last API call."""
        return self.events / self.seconds if self.seconds > 0 else float("nan")

    @property
    def cpu_us_per_event(self) -> float:
        """Return the consumer's CPU microseconds per event over the drain."""
        return 1e6 * self.cpu_seconds / self.events if self.events else float("nan")

    def context_us_per_event(self, name: str) -> float:
        """Return a context process's CPU microseconds per event (NaN if not watched)."""
        if name not in self.context_cpu or not self.events:
            return float("nan")
        return 1e6 * self.context_cpu[name] / self.events


async def measure_drain(
    sim: Simulator, sampler: CpuSampler, expected: int, timeout: float
) -> Drain:
    """Wait until the simulator accepted `expected` calls; summarise the drain.

    `late_rate` is the rate over the second half of the calls: it leaves out a start-up ramp
    (such as a rate limiter learning its pace) and shows the steady per-event cost.
    """

    async def done() -> bool:
        return int((await sim.get("stats"))["received"]) >= expected

    if not await wait_for(done, timeout, every=0.25):
        raise RuntimeError(f"drain of {expected} events did not finish within {timeout:.0f} s")
    await asyncio.sleep(3 * sampler.every)
    sampler.sample()
    times = sorted(call["at"] for call in await sim.calls() if call["status"] == 200)
    first, last = times[0], times[-1]
    middle = times[len(times) // 2]
    late = (len(times) - len(times) // 2 - 1) / (last - middle) if last > middle else float("nan")
    return Drain(
        len(times),
        last - first,
        late,
        sampler.between(first, last),
        sampler.context_between(first, last),
        tuple(sampler.at(pid, last) - sampler.at(pid, first) for pid in sampler.pids),
    )


def median(values: list[float]) -> float:
    """Return the median of a non-empty list."""
    return statistics.median(values)


async def declare_plain_queue(channel: Any, name: str) -> Any:
    """Declare a plain durable quorum queue (the baseline's input), bound to nothing else."""
    return await channel.declare_queue(name, durable=True, arguments={"x-queue-type": "quorum"})


async def publish_to_queue(channel: Any, name: str, bodies: list[bytes]) -> None:
    """Publish bodies straight to one queue (default exchange), confirmed in batches."""
    batch = []
    for body in bodies:
        batch.append(channel.default_exchange.publish(event_message(body), routing_key=name))
        if len(batch) == 200:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)


async def start_baseline(
    queue: str | list[str], endpoint: str, count: int, prefetch: int = PREFETCH, tuned: bool = False
) -> asyncio.subprocess.Process:
    """Start `python -m bench.baseline` on queues; it exits after acking `count` events.

    `tuned` gives its client the worker's botocore settings (see `bench.baseline`).
    """
    env = worker_env("unused", endpoint)
    queues = [queue] if isinstance(queue, str) else queue
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.baseline",
        *itertools.chain.from_iterable(("--queue", name) for name in queues),
        "--endpoint",
        endpoint,
        "--count",
        str(count),
        "--prefetch",
        str(prefetch),
        *(["--tuned"] if tuned else []),
        env=env,
        cwd=REPO,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


@asynccontextmanager
async def running_baseline(
    queue: str, endpoint: str, prefetch: int = PREFETCH
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Run the bare loop on a queue for the block (it stops only when told); stop it at the end."""
    async with stopped_after([await start_baseline(queue, endpoint, 0, prefetch)]) as (process,):
        yield process


def command_line() -> str:
    """Return the command that ran this benchmark, to print under its table."""
    module = Path(sys.argv[0]).with_suffix("").relative_to(REPO).as_posix().replace("/", ".")
    return " ".join(["python", "-m", module, *sys.argv[1:]])


def print_report(setup: str, *sections: str) -> None:
    """Print what ran and how, the report's sections, and the command that repeats it."""
    print(f"\n{setup}\n")
    print("\n\n".join(sections))
    print(f"\n$ {command_line()}")


def drain_parser(description: str | None, repeats: int) -> argparse.ArgumentParser:
    """Return the flags of a benchmark that drains backlogs: their size, spread and count."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


@asynccontextmanager
async def plain_queue() -> Any:
    """Declare a fresh durable quorum queue for the baseline; delete it afterwards.

    Yield its name and a channel with publisher confirms.
    """
    name = f"bench-baseline-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_plain_queue(channel, name)
        yield name, channel
        await (await connection.channel()).queue_delete(name)
    finally:
        await connection.close()


async def consumers_ready(channel: Any, queues: list[str]) -> bool:
    """Return True once every queue has at least one consumer."""
    for name in queues:
        queue = await channel.declare_queue(name, passive=True)
        if not queue.declaration_result.consumer_count:
            return False
    return True
