"""Latency benchmark: publish -> API call time at half capacity, worker vs the bare loop.

    python -m bench.latency [--rate R] [--seconds 20] [--warmup 3] [--repeats 2]

Without `--rate`, capacity is measured first (a quick drain of 2,000 events by each contender,
events/s over the second half of the calls, as in `bench.throughput`), and the load is half of
the worker's capacity, the same for both contenders. Then, against a simulator with no quota
and no latency, each contender in turn (alternating, `--repeats` times) gets a steady stream at
that rate for `--warmup` + `--seconds` seconds: the worker through its normal topology, the
bare loop (`bench.baseline`) from a plain quorum queue. Each event carries its publish time
(time.time(), in `Event.Content`); the simulator records the arrival time of each call with
its body, so latency is arrival - publish, on one clock. Events published during the warm-up
(the worker's rate limiter starts at 20/s and learns its pace) are left out. Printed: p50, p90,
p99 and max latency, and the consumer's CPU per event at that load.
"""

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aio_pika

from bench.common import (
    PARTITIONS,
    PREFETCH,
    CpuSampler,
    Simulator,
    chat_message,
    consumers_ready,
    median,
    plain_queue,
    print_report,
    running_baseline,
    running_worker,
    sample_events,
    table,
    topology,
    wait_for,
)
from bench.throughput import baseline_drain, worker_drain
from worker.models import conversation_key
from worker.ops.publish import event_message
from worker.topology import work_queue_names

CONVERSATIONS = 1000

Publish = Callable[[bytes], Coroutine[Any, Any, Any]]


@dataclass(frozen=True)
class Latencies:
    """Publish -> API call latencies of the measured events, and the consumer's CPU."""

    seconds: list[float]
    cpu_us_per_event: float

    def percentile(self, fraction: float) -> float:
        """Return a latency percentile in milliseconds (nearest rank)."""
        ordered = sorted(self.seconds)
        rank = min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))
        return 1000 * ordered[rank]


def stamped_event(index: int) -> bytes:
    """Return a valid MESSAGE event whose Content starts with its publish time."""
    return chat_message(index % CONVERSATIONS, f"{time.time():.6f} latency message {index}")


def published_at(call: dict[str, Any]) -> float:
    """Read the publish time back from a call the simulator recorded."""
    return float(call["body"]["Event"]["Content"].split()[0])


async def publish_paced(publish: Publish, rate: float, seconds: float) -> int:
    """Publish stamped events at a steady rate for `seconds`; return how many.

    Each event is stamped when its turn comes, and confirms are awaited in the background, so
    a slow confirm does not delay the next event.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    pending: set[asyncio.Task[Any]] = set()
    count = 0
    while count / rate < seconds:
        delay = start + count / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(publish(stamped_event(count)))
        pending.add(task)
        task.add_done_callback(pending.discard)
        count += 1
    await asyncio.gather(*pending)
    return count


async def measure(
    sim: Simulator, pid: int, publish: Publish, rate: float, warmup: float, seconds: float
) -> Latencies:
    """Drive one running consumer at `rate`; return the latencies after the warm-up."""
    await sim.post("reset")
    sampler = CpuSampler([pid])
    sampler.start()
    started = time.time()
    count = await publish_paced(publish, rate, warmup + seconds)
    ended = time.time()

    async def received() -> bool:
        return int((await sim.get("stats"))["received"]) >= count

    if not await wait_for(received, timeout=60 + count / rate):
        raise RuntimeError("the consumer did not keep up: lower --rate")
    await sampler.stop()
    calls = [call for call in await sim.calls() if call["status"] == 200]
    measured = [call for call in calls if published_at(call) >= started + warmup]
    cpu = sampler.between(started + warmup, ended)
    return Latencies(
        [call["at"] - published_at(call) for call in measured], 1e6 * cpu / len(measured)
    )


async def worker_latency(sim: Simulator, rate: float, warmup: float, seconds: float) -> Latencies:
    """Measure the worker (its defaults, INFO logs) fed through its input exchange."""
    async with topology() as (base, channel), running_worker(base, sim.url) as worker:
        queues = work_queue_names(base, PARTITIONS)
        if not await wait_for(lambda: consumers_ready(channel, queues), timeout=60):
            raise RuntimeError("the worker did not start consuming")
        exchange = await channel.get_exchange(base)

        async def publish(body: bytes) -> Any:
            key = conversation_key(json.loads(body))
            return await exchange.publish(event_message(body), routing_key=key)

        return await measure(sim, worker.pid, publish, rate, warmup, seconds)


async def baseline_latency(sim: Simulator, rate: float, warmup: float, seconds: float) -> Latencies:
    """Measure the bare loop fed through its plain quorum queue."""
    async with plain_queue() as (name, channel), running_baseline(name, sim.url) as process:
        if not await wait_for(lambda: consumers_ready(channel, [name]), timeout=60):
            raise RuntimeError("the baseline did not start consuming")
        exchange: aio_pika.abc.AbstractExchange = channel.default_exchange

        async def publish(body: bytes) -> Any:
            return await exchange.publish(event_message(body), routing_key=name)

        return await measure(sim, process.pid, publish, rate, warmup, seconds)


async def capacity(sim: Simulator) -> tuple[float, float]:
    """Return the events/s of the worker and of the bare loop draining 2,000 events."""
    bodies = list(sample_events(2000, CONVERSATIONS))
    worker = await worker_drain(sim, bodies)
    baseline = await baseline_drain(sim, bodies)
    return worker.late_rate, baseline.late_rate


def row(name: str, latencies: Latencies) -> list[str]:
    """Return one table row."""
    return [
        name,
        str(len(latencies.seconds)),
        *(f"{latencies.percentile(p):.1f}" for p in (0.5, 0.9, 0.99, 1.0)),
        f"{latencies.cpu_us_per_event:.0f}",
    ]


def summary(results: dict[str, list[Latencies]]) -> str:
    """Return the medians of each contender and the ratios worker/baseline."""
    rows = [["median of runs", "p50 ms", "p99 ms", "CPU µs/ev"]]
    medians = {
        name: [
            median([r.percentile(0.5) for r in runs]),
            median([r.percentile(0.99) for r in runs]),
            median([r.cpu_us_per_event for r in runs]),
        ]
        for name, runs in results.items()
    }
    for name, (p50, p99, cpu) in medians.items():
        rows.append([name, f"{p50:.1f}", f"{p99:.1f}", f"{cpu:.0f}"])
    ratios = zip(medians["worker"], medians["baseline"], strict=True)
    rows.append(["ratio worker/baseline", *(f"{w / b:.2f}" for w, b in ratios)])
    return table(rows)


async def main(rate: float | None, seconds: float, warmup: float, repeats: int) -> None:
    """Find the load, run the contenders alternately, and print every run and the medians."""
    results: dict[str, list[Latencies]] = {"worker": [], "baseline": []}
    runs = {"worker": worker_latency, "baseline": baseline_latency}
    rows = [["run", "events", "p50 ms", "p90 ms", "p99 ms", "max ms", "CPU µs/ev"]]
    async with Simulator() as sim:
        if rate is None:
            rate = await half_capacity(sim)
        for attempt in range(1, repeats + 1):
            for name, run in runs.items():
                latencies = await run(sim, rate, warmup, seconds)
                results[name].append(latencies)
                rows.append(row(f"{name} #{attempt}", latencies))
                p50 = latencies.percentile(0.5)
                print(f"done: {name} #{attempt}: p50 {p50:.1f} ms", flush=True)
    print_report(
        f"steady load {rate:.0f} ev/s for {warmup:g} s warm-up + {seconds:g} s measured, "
        f"{CONVERSATIONS} conversations, prefetch {PREFETCH}, simulator without quota or latency",
        table(rows),
        summary(results),
    )


async def half_capacity(sim: Simulator) -> float:
    """Return half the worker's capacity: the load both contenders get."""
    worker_capacity, baseline_capacity = await capacity(sim)
    rate = worker_capacity / 2
    print(
        f"capacity: worker {worker_capacity:.0f} ev/s, baseline "
        f"{baseline_capacity:.0f} ev/s -> load {rate:.0f} ev/s for both",
        flush=True,
    )
    return rate


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--rate", type=float, default=None, help="events/s (default: half capacity)"
    )
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--repeats", type=int, default=2)
    options = parser.parse_args()
    asyncio.run(main(options.rate, options.seconds, options.warmup, options.repeats))
