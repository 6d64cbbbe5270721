"""Throughput benchmark: drain a backlog as fast as possible, worker vs the bare loop.

    python -m bench.throughput [--events 5000] [--conversations 1000] [--repeats 3]

Against one simulator process with no quota and no latency, each contender drains the same
backlog of valid MESSAGE events from RabbitMQ, in its own process:

- worker: `python -m worker run` with its defaults (validation, per-conversation ordering,
  adaptive rate limiting, breakers, metrics, INFO logging), prefetch 64, on a fresh topology
  (`bench.common.topology()`: fanout -> consistent hash -> 8 quorum partitions);
- baseline: `python -m bench.baseline`, the hand-written aio-pika -> aiobotocore -> ack loop,
  prefetch 64, on a plain durable quorum queue holding the same backlog.

The backlog is published before the consumer starts. Measured, per run: events/s from the
first to the last API call (the simulator's arrival times), the same over the second half of
the calls (no start-up ramp), and the consumer process's CPU (utime + stime from /proc,
sampled every 20 ms and interpolated at the first and last call) per event. Contenders
alternate, `--repeats` times each; the medians and the ratios worker/baseline are printed.
The machine is shared: read the ratios, not the absolute numbers.
"""

import argparse
import asyncio
import uuid

import aio_pika

from bench.common import (
    AMQP_URL,
    PARTITIONS,
    CpuSampler,
    Drain,
    Simulator,
    command_line,
    context_pids,
    declare_plain_queue,
    measure_drain,
    median,
    publish_backlog,
    publish_to_queue,
    sample_events,
    start_baseline,
    start_workers,
    stop_workers,
    table,
    topology,
    worker_env,
)
from worker.topology import work_queue_names

PREFETCH = 64


def drain_timeout(events: int) -> float:
    """Return how long a drain may take before the run counts as stuck."""
    return events / 50 + 60


async def worker_drain(
    sim: Simulator, bodies: list[bytes], replicas: int = 1, **settings: str
) -> Drain:
    """Drain the backlog with worker processes (their defaults, INFO logs); summarise it."""
    async with topology() as (base, channel):
        await publish_backlog(channel, base, bodies)
        await sim.post("reset")
        env = worker_env(
            base,
            sim.url,
            WORKER_LOG_LEVEL="INFO",
            WORKER_PREFETCH=str(PREFETCH),
            **settings,
        )
        workers = await start_workers(replicas, env)
        sampler = CpuSampler([worker.pid for worker in workers], context_pids(sim))
        sampler.start()
        try:
            return await measure_drain(sim, sampler, len(bodies), drain_timeout(len(bodies)))
        finally:
            await sampler.stop()
            await stop_workers(workers)


async def baseline_drain(sim: Simulator, bodies: list[bytes], prefetch: int = PREFETCH) -> Drain:
    """Drain the backlog with the bare loop from its own quorum queue; summarise it."""
    name = f"bench-baseline-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await declare_plain_queue(channel, name)
        await publish_to_queue(channel, name, bodies)
        await sim.post("reset")
        process = await start_baseline(name, sim.url, len(bodies), prefetch)
        sampler = CpuSampler([process.pid], context_pids(sim))
        sampler.start()
        try:
            return await measure_drain(sim, sampler, len(bodies), drain_timeout(len(bodies)))
        finally:
            await sampler.stop()
            if process.returncode is None:
                process.terminate()
            await asyncio.wait_for(process.wait(), 30)
    finally:
        await (await connection.channel()).queue_delete(name)
        await connection.close()


async def baseline_topology_drain(
    sim: Simulator, bodies: list[bytes], prefetch: int = PREFETCH
) -> Drain:
    """Drain the backlog with the bare loop from the worker's partitions (topology cost only)."""
    async with topology() as (base, channel):
        await publish_backlog(channel, base, bodies)
        await sim.post("reset")
        queues = work_queue_names(base, PARTITIONS)
        process = await start_baseline(queues, sim.url, len(bodies), prefetch)
        sampler = CpuSampler([process.pid], context_pids(sim))
        sampler.start()
        try:
            return await measure_drain(sim, sampler, len(bodies), drain_timeout(len(bodies)))
        finally:
            await sampler.stop()
            if process.returncode is None:
                process.terminate()
            await asyncio.wait_for(process.wait(), 30)


CONTENDERS = {
    "worker": worker_drain,
    "baseline": baseline_drain,
    "baseline on worker topology": baseline_topology_drain,
}


def drain_row(name: str, drain: Drain) -> list[str]:
    """Return one table row."""
    return [
        name,
        str(drain.events),
        f"{drain.seconds:.2f}",
        f"{drain.rate:.0f}",
        f"{drain.late_rate:.0f}",
        f"{drain.cpu_seconds:.2f}",
        f"{drain.cpu_us_per_event:.0f}",
        f"{drain.context_us_per_event('simulator'):.0f}",
        f"{drain.context_us_per_event('broker'):.0f}",
    ]


HEADER = [
    "run",
    "events",
    "drain s",
    "ev/s",
    "ev/s 2nd half",
    "CPU s",
    "CPU µs/ev",
    "sim µs/ev",
    "broker µs/ev",
]


def summary(results: dict[str, list[Drain]], worker: str, baseline: str) -> str:
    """Return the medians of each contender and the ratios worker/baseline."""
    medians = {
        name: (
            median([d.rate for d in drains]),
            median([d.late_rate for d in drains]),
            median([d.cpu_us_per_event for d in drains]),
        )
        for name, drains in results.items()
    }
    rows = [["median of runs", "ev/s", "ev/s 2nd half", "CPU µs/ev", "sim µs/ev", "broker µs/ev"]]
    for name, (rate, late, cpu) in medians.items():
        context = [
            f"{median([d.context_us_per_event(what) for d in results[name]]):.0f}"
            for what in ("simulator", "broker")
        ]
        rows.append([name, f"{rate:.0f}", f"{late:.0f}", f"{cpu:.0f}", *context])
    w, b = medians[worker], medians[baseline]
    ratios = [f"{w[i] / b[i]:.2f}" for i in range(3)]
    rows.append([f"ratio {worker}/{baseline}", *ratios, "", ""])
    return table(rows)


async def main(events: int, conversations: int, repeats: int) -> None:
    """Alternate the contenders against one simulator and print every run and the medians."""
    sim = Simulator()
    await sim.start()
    bodies = list(sample_events(events, conversations))
    results: dict[str, list[Drain]] = {name: [] for name in CONTENDERS}
    rows = [HEADER]
    try:
        for attempt in range(1, repeats + 1):
            for name in results:
                drain = await CONTENDERS[name](sim, bodies)
                results[name].append(drain)
                rows.append(drain_row(f"{name} #{attempt}", drain))
                print(f"done: {name} #{attempt}: {drain.rate:.0f} ev/s", flush=True)
    finally:
        await sim.stop()
    print(
        f"\n{events} events over {conversations} conversations, prefetch {PREFETCH}, "
        "simulator without quota or latency\n"
    )
    print(table(rows))
    print()
    print(summary(results, "worker", "baseline"))
    print(f"\n$ {command_line()}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=5000)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    options = parser.parse_args()
    asyncio.run(main(options.events, options.conversations, options.repeats))
