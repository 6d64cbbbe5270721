"""`chat-worker demo`: the simulator, sample traffic of every outcome, the real worker, a report."""

import asyncio
import json
import signal
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aio_pika.abc import AbstractChannel

from worker.broker import connect_plain
from worker.ops.publish import publish_bodies
from worker.pipeline.errors import ErrorVariant
from worker.settings import WorkerSettings
from worker.testing.environment import simulated_worker_environment
from worker.testing.simulator import ConnectSimulator, SimulatorConfig
from worker.topology import (
    dead_letter_queue_name,
    declare_topology,
    delete_topology,
    work_queue_names,
)

DRAIN_TIMEOUT_SECONDS = 90.0
API_ERRORS = [
    "AccessDeniedException:403",
    "InvalidRequestException:400",
    "ResourceNotFoundException:404",
    "ThrottlingException:429",
    "InternalServiceException:500",
    "UnsupportedOperationException:400",
]
MALFORMED = [
    b"this is not JSON",
    b'{"SourceId": "\xff\xfe"}',
    b'["a", "JSON", "array"]',
    b'{"SourceId": "+15550100", "Event": {"Type": "DISCONNECT"}}',
    b'{"SourceId": "+15550100", "DestinationId": "x", "Event": {"Type": "HELLO"}}',
]


def _event(source: str, destination: str, kind: str, text: str = "") -> bytes:
    """Encode one sample event."""
    event: dict[str, Any] = {"Type": kind}
    if kind == "MESSAGE":
        event.update(ContentType="text/plain", Content=text)
    body: dict[str, Any] = {"SourceId": source, "DestinationId": destination}
    body.update(Subtype="connect:SMS", Event=event)
    return json.dumps(body).encode()


def sample_traffic() -> list[bytes]:
    """Return 6 conversations of 5 events, one event per API error, and malformed bodies."""
    bodies = []
    for chat in range(6):
        source = f"+1555010{chat:04d}"
        for turn in range(4):
            bodies.append(_event(source, "+18005550199", "MESSAGE", f"demo message {turn}"))
        bodies.append(_event(source, "+18005550199", "DISCONNECT"))
    for error in API_ERRORS:
        bodies.append(_event("+15550109999", f"simulate:{error}", "MESSAGE", "will fail"))
    return bodies + MALFORMED


def demo_environment(settings: WorkerSettings, base: str, endpoint: str) -> dict[str, str]:
    """Return the worker's environment: the simulator as Connect, short retry budgets."""
    return simulated_worker_environment(
        settings.amqp_url.get_secret_value(),
        base,
        endpoint,
        WORKER_PARTITIONS=str(settings.partitions),
        WORKER_THROTTLE_MAX_ATTEMPTS="4",
        WORKER_TRANSIENT_MAX_ATTEMPTS="4",
        WORKER_BACKOFF_MAX_SECONDS="0.5",
    )


def demo_base_name(queue: str) -> str:
    """Return a base name of this run's own, so that demos sharing a broker never meet."""
    return f"{queue}-demo-{uuid.uuid4().hex[:8]}"


async def _dead_letter_counts(channel: AbstractChannel, base: str) -> dict[str, int]:
    """Count the messages in each dead-letter queue."""
    counts = {}
    for variant in ErrorVariant:
        queue = await channel.declare_queue(dead_letter_queue_name(base, variant), passive=True)
        counts[variant.value] = queue.declaration_result.message_count or 0
    return counts


async def _wait_for_outcomes(
    sim: ConnectSimulator, channel: AbstractChannel, base: str, expected: int
) -> dict[str, int]:
    """Wait until every published event was delivered or dead-lettered."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_TIMEOUT_SECONDS
    while True:
        counts = await _dead_letter_counts(channel, base)
        if len(sim.received) + sum(counts.values()) >= expected or loop.time() > deadline:
            return counts
        await asyncio.sleep(0.2)


async def _waiting(channel: AbstractChannel, base: str, partitions: int) -> int:
    """Count the events still waiting in the work queues."""
    total = 0
    for name in work_queue_names(base, partitions):
        queue = await channel.declare_queue(name, passive=True)
        total += queue.declaration_result.message_count or 0
    return total


async def _start_worker(env: dict[str, str], log_path: Path) -> asyncio.subprocess.Process:
    """Start `chat-worker run` as its own process, logging to a file."""
    with log_path.open("wb") as log_file:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "worker", "run", env=env, stdout=log_file, stderr=log_file
        )


async def _throttle_one_conversation(url: str) -> None:
    """Ask the simulator to throttle the first chat twice, to show a retry that succeeds."""
    rule = {"match": {"SourceId": "+15550100000"}, "code": "ThrottlingException", "times": 2}
    async with aiohttp.ClientSession() as http, http.post(f"{url}/_sim/rules", json=rule) as r:
        r.raise_for_status()


def print_report(
    base: str, published: int, sim: ConnectSimulator, counts: dict[str, int], left: int, code: int
) -> None:
    """Print what happened to every event."""
    outcomes = Counter(call["code"] or "ok" for call in sim.calls)
    rows = [("published", published), ("delivered to Connect", len(sim.received))]
    rows += [(f"  dead-lettered {variant}", n) for variant, n in counts.items()]
    rows += [("left in the work queue", left), ("worker exit code", code)]
    print(f"\nconnect-chat-worker demo: exchange {base!r}, Connect simulator {sim.url}\n")
    for label, value in rows:
        print(f"  {label:<45}{value:>6}")
    calls = ", ".join(f"{name} {n}" for name, n in sorted(outcomes.items()))
    print(f"\n  API calls made: {len(sim.calls)} ({calls})")
    accounted = len(sim.received) + sum(counts.values()) == published and left == 0
    print(f"  every event accounted for: {'yes' if accounted else 'NO'}\n")


async def run_demo(settings: WorkerSettings) -> int:
    """Run the whole demo on a topology of its own, deleted at the end; 0: all accounted for."""
    base = demo_base_name(settings.queue)
    sim = ConnectSimulator(SimulatorConfig(latency_ms=20, latency_jitter_ms=20, seed=1))
    await sim.start()
    log_path = Path(tempfile.gettempdir()) / f"chat-worker-{base}.log"
    # A plain connection: a robust channel answers a passive declare from its cache, so the
    # message counts the demo polls would never change.
    connection = await connect_plain(settings)
    worker: asyncio.subprocess.Process | None = None
    try:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        await declare_topology(channel, base, settings.partitions)
        await _throttle_one_conversation(sim.url)
        bodies = sample_traffic()
        exchange = await channel.get_exchange(base)
        published = await publish_bodies(exchange, bodies)
        print(f"published {published} sample events; starting the worker (log: {log_path})")
        worker = await _start_worker(demo_environment(settings, base, sim.url), log_path)
        counts = await _wait_for_outcomes(sim, channel, base, published)
        worker.send_signal(signal.SIGTERM)
        code = await worker.wait()
        remaining = await _waiting(channel, base, settings.partitions)
        print_report(base, published, sim, counts, remaining, code)
        ok = code == 0 and len(sim.received) + sum(counts.values()) == published
        return 0 if ok and remaining == 0 else 1
    finally:
        if worker is not None and worker.returncode is None:
            worker.kill()
            await worker.wait()
        await delete_topology(await connection.channel(), base, settings.partitions)
        await connection.close()
        await sim.stop()
