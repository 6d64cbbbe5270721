"""Scaling benchmark: 1 worker process vs 2 on this machine, without a quota.

    python -m bench.scaling [--events 5000] [--conversations 1000] [--repeats 2]

Against one simulator with no quota and no latency, the same pre-published backlog is drained
by (alternating, `--repeats` times each, medians printed):

- 1 worker;
- 2 workers with WORKER_SPREAD_PARTITIONS=true: each replica takes the partitions nobody
  consumes yet, so the 8 partitions are split between the processes;
- 2 workers with the default (WORKER_SPREAD_PARTITIONS=false): the replica holding the leader
  lock is the single active consumer of every partition, the other one a standby;
- 1 and 2 bare loops (`bench.baseline`, competing consumers of one plain quorum queue), to
  show what the machine itself allows.

Measured as in `bench.throughput`: events/s from the first to the last API call, the same over
the second half of the calls, the CPU of all the consumer processes per event, and each
process's CPU (which process did the work).

What it tells a user about replicas: with the default, a second replica adds availability
(it takes over a partition within seconds when the leader dies), not throughput; its CPU
stays near zero. That is the right default in production, where Connect's quota, shared by
every replica of the account, bounds throughput long before CPU does (see `bench.quota`). Only
when the worker is CPU-bound (a high quota, or a fast simulator as here) does
WORKER_SPREAD_PARTITIONS=true help, and then only as far as free cores allow: on a 2-core
machine that also runs the broker and the simulator, the speed-up of 2 processes is bounded
by the cores they share, as the bare loops show.
"""

import asyncio
from collections.abc import Awaitable, Callable

from bench.common import (
    PREFETCH,
    Drain,
    Simulator,
    drain_parser,
    median,
    plain_queue,
    print_report,
    publish_to_queue,
    sample_events,
    start_baseline,
    table,
)
from bench.throughput import drain_processes, worker_drain

Run = Callable[[Simulator, list[bytes]], Awaitable[Drain]]


def workers(replicas: int, spread: bool) -> Run:
    """Return a run of worker processes."""

    async def run(sim: Simulator, bodies: list[bytes]) -> Drain:
        spread_setting = "true" if spread else "false"
        return await worker_drain(sim, bodies, replicas, WORKER_SPREAD_PARTITIONS=spread_setting)

    return run


def bare_loops(processes: int) -> Run:
    """Return a run of bare loops competing for one plain quorum queue."""

    async def run(sim: Simulator, bodies: list[bytes]) -> Drain:
        async with plain_queue() as (name, channel):
            await publish_to_queue(channel, name, bodies)
            await sim.post("reset")
            started = [await start_baseline(name, sim.url, 0) for _ in range(processes)]
            return await drain_processes(sim, started, len(bodies))

    return run


CONFIGURATIONS: dict[str, Run] = {
    "worker x1": workers(1, spread=True),
    "worker x2, spread": workers(2, spread=True),
    "worker x2, default (leader+standby)": workers(2, spread=False),
    "bare loop x1": bare_loops(1),
    "bare loop x2": bare_loops(2),
}


def summary(results: dict[str, list[Drain]]) -> str:
    """Return the medians of each configuration and the speed-up over one process."""
    rows = [["median of runs", "ev/s", "ev/s 2nd half", "speed-up", "CPU µs/ev", "CPU s/process"]]
    singles = {
        "worker": median([d.rate for d in results["worker x1"]]),
        "bare loop": median([d.rate for d in results["bare loop x1"]]),
    }
    for name, drains in results.items():
        rate = median([d.rate for d in drains])
        single = singles["worker" if name.startswith("worker") else "bare loop"]
        middle = sorted(drains, key=lambda d: d.rate)[len(drains) // 2]
        per_process = " / ".join(f"{cpu:.1f}" for cpu in middle.process_cpu)
        rows.append(
            [
                name,
                f"{rate:.0f}",
                f"{median([d.late_rate for d in drains]):.0f}",
                f"{rate / single:.2f}",
                f"{median([d.cpu_us_per_event for d in drains]):.0f}",
                per_process,
            ]
        )
    return table(rows)


def run_row(name: str, drain: Drain) -> list[str]:
    """Return the table row of one run."""
    per_process = " / ".join(f"{cpu:.1f}" for cpu in drain.process_cpu)
    rates = [f"{drain.rate:.0f}", f"{drain.late_rate:.0f}"]
    return [name, *rates, f"{drain.cpu_us_per_event:.0f}", per_process]


async def main(events: int, conversations: int, repeats: int) -> None:
    """Alternate the configurations against one simulator and print every run and medians."""
    bodies = list(sample_events(events, conversations))
    results: dict[str, list[Drain]] = {name: [] for name in CONFIGURATIONS}
    rows = [["run", "ev/s", "ev/s 2nd half", "CPU µs/ev", "CPU s/process"]]
    async with Simulator() as sim:
        for attempt in range(1, repeats + 1):
            for name, run in CONFIGURATIONS.items():
                drain = await run(sim, bodies)
                results[name].append(drain)
                rows.append(run_row(f"{name} #{attempt}", drain))
                print(f"done: {name} #{attempt}: {drain.rate:.0f} ev/s", flush=True)
    print_report(
        f"{events} events over {conversations} conversations, prefetch {PREFETCH} per "
        "process, simulator without quota or latency",
        table(rows),
        summary(results),
    )


if __name__ == "__main__":
    options = drain_parser(__doc__, repeats=2).parse_args()
    asyncio.run(main(options.events, options.conversations, options.repeats))
