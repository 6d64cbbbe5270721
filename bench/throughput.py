"""Throughput benchmark: drain a backlog as fast as possible, worker vs the bare loop.

    python -m bench.throughput [--events 5000] [--conversations 1000] [--repeats 3] [--paired 3]

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
A third contender, the bare loop consuming the worker's 8 partitions, tells the cost of the
topology (broker side and client side) from the cost of the worker's code. A fourth, the bare
loop with the worker's botocore settings (`bench.baseline --tuned`: a User-Agent built once,
no parameter validation, no botocore retries), tells the cost of the worker's own code alone:
the worker gains from those settings what a user who tuned the bare loop would gain too.

The machine is shared: read the ratios, not the absolute numbers. Because runs made one after
the other still see different noise, `--paired` runs drain the worker and the bare loop at the
same moment, from two copies of the worker topology, and compare their CPU per event.
"""

import asyncio
from collections.abc import Awaitable, Callable

from bench.common import (
    PARTITIONS,
    PREFETCH,
    CpuSampler,
    Drain,
    Simulator,
    context_pids,
    drain_parser,
    measure_drain,
    median,
    plain_queue,
    print_report,
    publish_backlog,
    publish_to_queue,
    sample_events,
    start_baseline,
    start_workers,
    stopped_after,
    table,
    topology,
)
from worker.topology import work_queue_names


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
        workers = await start_workers(replicas, base, sim.url, **settings)
        return await drain_processes(sim, workers, len(bodies))


async def baseline_drain(
    sim: Simulator, bodies: list[bytes], prefetch: int = PREFETCH, tuned: bool = False
) -> Drain:
    """Drain the backlog with the bare loop from its own quorum queue; summarise it."""
    async with plain_queue() as (name, channel):
        await publish_to_queue(channel, name, bodies)
        await sim.post("reset")
        process = await start_baseline(name, sim.url, len(bodies), prefetch, tuned)
        return await drain_processes(sim, [process], len(bodies))


async def tuned_baseline_drain(sim: Simulator, bodies: list[bytes]) -> Drain:
    """Drain the backlog with the bare loop given the worker's botocore settings."""
    return await baseline_drain(sim, bodies, tuned=True)


async def drain_processes(
    sim: Simulator, processes: list[asyncio.subprocess.Process], count: int
) -> Drain:
    """Measure running consumer processes until the simulator has `count` calls; stop them."""
    sampler = CpuSampler([process.pid for process in processes], context_pids(sim))
    sampler.start()
    async with stopped_after(processes):
        try:
            return await measure_drain(sim, sampler, count, drain_timeout(count))
        finally:
            await sampler.stop()


async def baseline_topology_drain(
    sim: Simulator, bodies: list[bytes], prefetch: int = PREFETCH
) -> Drain:
    """Drain the backlog with the bare loop from the worker's partitions (topology cost only)."""
    async with topology() as (base, channel):
        await publish_backlog(channel, base, bodies)
        await sim.post("reset")
        queues = work_queue_names(base, PARTITIONS)
        process = await start_baseline(queues, sim.url, len(bodies), prefetch)
        return await drain_processes(sim, [process], len(bodies))


async def paired_drain(sim: Simulator, bodies: list[bytes]) -> tuple[float, float]:
    """Drain two copies of the backlog at the same time: worker and bare loop, same topology.

    Both suffer the same noise from the shared machine at the same moment, so the ratio of
    their CPU per event is steadier than that of runs made one after the other. Returns the
    CPU µs per event of the worker and of the bare loop.
    """
    async with topology() as (worker_base, worker_channel), topology() as (bare_base, channel):
        await publish_backlog(worker_channel, worker_base, bodies)
        await publish_backlog(channel, bare_base, bodies)
        await sim.post("reset")
        (worker,) = await start_workers(1, worker_base, sim.url)
        bare = await start_baseline(work_queue_names(bare_base, PARTITIONS), sim.url, len(bodies))
        pids = [worker.pid, bare.pid]
        sampler = CpuSampler(pids)
        sampler.start()
        async with stopped_after([worker, bare]):
            try:
                await measure_drain(sim, sampler, 2 * len(bodies), drain_timeout(2 * len(bodies)))
            finally:
                await sampler.stop()
        times = [call["at"] for call in await sim.calls() if call["status"] == 200]
        first, last = min(times), max(times)
        worker_us, bare_us = (
            1e6 * (sampler.at(pid, last) - sampler.at(pid, first)) / len(bodies) for pid in pids
        )
        return worker_us, bare_us


Contender = Callable[[Simulator, list[bytes]], Awaitable[Drain]]

CONTENDERS: dict[str, Contender] = {
    "worker": worker_drain,
    "baseline": baseline_drain,
    "baseline on worker topology": baseline_topology_drain,
    "baseline, worker's botocore settings": tuned_baseline_drain,
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


def summary(results: dict[str, list[Drain]], worker: str, baselines: list[str]) -> str:
    """Return the medians of each contender and the ratios of the worker to each baseline."""
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
    for baseline in baselines:
        w, b = medians[worker], medians[baseline]
        ratios = [f"{w[i] / b[i]:.2f}" for i in range(3)]
        rows.append([f"ratio {worker} / {baseline}", *ratios, "", ""])
    return table(rows)


async def main(events: int, conversations: int, repeats: int, paired: int) -> None:
    """Alternate the contenders against one simulator and print every run and the medians."""
    bodies = list(sample_events(events, conversations))
    results: dict[str, list[Drain]] = {name: [] for name in CONTENDERS}
    rows = [HEADER]
    pair_rows = [["pair", "worker CPU µs/ev", "bare loop CPU µs/ev", "ratio"]]
    async with Simulator() as sim:
        for attempt in range(1, repeats + 1):
            for name in results:
                drain = await CONTENDERS[name](sim, bodies)
                results[name].append(drain)
                rows.append(drain_row(f"{name} #{attempt}", drain))
                print(f"done: {name} #{attempt}: {drain.rate:.0f} ev/s", flush=True)
        ratios = []
        for attempt in range(1, paired + 1):
            worker_us, bare_us = await paired_drain(sim, bodies)
            ratios.append(worker_us / bare_us)
            pair_rows.append(
                [f"#{attempt}", f"{worker_us:.0f}", f"{bare_us:.0f}", f"{ratios[-1]:.2f}"]
            )
            print(f"done: pair #{attempt}: CPU ratio {ratios[-1]:.2f}", flush=True)
    sections = [
        table(rows),
        summary(results, "worker", ["baseline", "baseline, worker's botocore settings"]),
    ]
    if paired:
        pair_rows.append(["median", "", "", f"{median(ratios):.2f}"])
        sections.append(
            f"Same moment, same noise: worker and bare loop draining {events} events each\n"
            "at once from two copies of the worker topology (CPU from first to last call)\n\n"
            + table(pair_rows)
        )
    print_report(
        f"{events} events over {conversations} conversations, prefetch {PREFETCH}, "
        "simulator without quota or latency",
        *sections,
    )


if __name__ == "__main__":
    parser = drain_parser(__doc__, repeats=3)
    parser.add_argument("--paired", type=int, default=3, help="simultaneous pairs (0: none)")
    options = parser.parse_args()
    asyncio.run(main(options.events, options.conversations, options.repeats, options.paired))
