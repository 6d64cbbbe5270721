"""Memory benchmark: resident memory over a long run, worker vs the bare loop.

    python -m bench.memory [--events 100000] [--prefetch 256] [--warmup 10000]
                           [--set WORKER_X=VALUE ...] [--skip-baseline]

Against a simulator with no quota and no latency, each contender in turn consumes `--events`
events at prefetch `--prefetch`: the worker (its defaults, INFO logs) through its topology,
the bare loop (`bench.baseline`) from a plain quorum queue. Events are published in confirmed
batches while the consumer runs, keeping at most `--window` of them waiting, so the broker's
backlog stays small and the run takes minutes, not hours. Every second the consumer's VmRSS
(/proc/<pid>/status) and the simulator's count of accepted calls are sampled.

Printed: RSS after the warm-up, at the end, the growth between them, the peak, and the slope
(least squares over the samples after the warm-up, MB per 10,000 events), plus RSS at every
10 % of the run. Flat means a slope near zero; the target for the worker is < 120 MB.

Note: the worker's in-memory dedupe ledger (no WORKER_REDIS_URL) keeps ~200 bytes per
delivered message_id, up to its entry cap, so RSS climbs until the cap is reached; compare
with `--set WORKER_DEDUPE_WINDOW_SECONDS=0` (ledger off) to separate it from any leak.
"""

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from bench.common import (
    Simulator,
    plain_queue,
    print_report,
    rss_bytes,
    running_baseline,
    running_worker,
    sample_events,
    table,
    topology,
)
from worker.models import conversation_key
from worker.ops.publish import event_message

BATCH = 500
MB = 1024 * 1024

PublishBatch = Callable[[list[bytes]], Awaitable[None]]


@dataclass(frozen=True)
class Sample:
    """One reading: seconds since the start, events accepted by the simulator, RSS in bytes."""

    seconds: float
    events: int
    rss: int


@dataclass(frozen=True)
class Profile:
    """The RSS readings of one run, and what they say."""

    samples: list[Sample]
    warmup: int

    def after_warmup(self) -> list[Sample]:
        """Return the samples taken once `warmup` events were accepted."""
        return [s for s in self.samples if s.events >= self.warmup] or self.samples[-1:]

    def at_fraction(self, fraction: float) -> Sample:
        """Return the first sample at or past a fraction of the events."""
        target = fraction * self.samples[-1].events
        return next(s for s in self.samples if s.events >= target)

    def slope_mb_per_10k(self) -> float:
        """Return the least-squares growth of RSS after the warm-up, MB per 10,000 events."""
        points = self.after_warmup()
        if len(points) < 2:
            return float("nan")
        mean_x = sum(p.events for p in points) / len(points)
        mean_y = sum(p.rss for p in points) / len(points)
        covariance = sum((p.events - mean_x) * (p.rss - mean_y) for p in points)
        variance = sum((p.events - mean_x) ** 2 for p in points)
        return covariance / variance * 10_000 / MB if variance else float("nan")


async def run(
    name: str,
    sim: Simulator,
    pid: int,
    publish_batch: PublishBatch,
    bodies: list[bytes],
    window: int,
    warmup: int,
) -> Profile:
    """Feed a running consumer every body, keeping the backlog small; sample its RSS."""
    await sim.post("reset")
    accepted = 0
    samples: list[Sample] = []
    started = time.monotonic()

    async def feed() -> None:
        published = 0
        while published < len(bodies):
            if published - accepted >= window:
                await asyncio.sleep(0.05)
                continue
            batch = bodies[published : published + BATCH]
            await publish_batch(batch)
            published += len(batch)

    feeder = asyncio.create_task(feed())
    next_report = 10_000
    try:
        while accepted < len(bodies):
            await asyncio.sleep(1.0)
            accepted = int((await sim.get("stats"))["received"])
            samples.append(Sample(time.monotonic() - started, accepted, rss_bytes(pid)))
            if feeder.done():
                feeder.result()  # surface a publishing failure
            if accepted >= next_report:
                print(f"  {name}: {accepted} events, RSS {samples[-1].rss / MB:.1f} MB", flush=True)
                next_report += 10_000
    finally:
        feeder.cancel()
    return Profile(samples, warmup)


async def worker_memory(
    sim: Simulator,
    bodies: list[bytes],
    prefetch: int,
    window: int,
    warmup: int,
    settings: dict[str, str],
) -> Profile:
    """Run the worker through its topology."""
    async with topology() as (base, channel):
        exchange = await channel.get_exchange(base)

        async def publish_batch(batch: list[bytes]) -> None:
            await asyncio.gather(
                *(
                    exchange.publish(
                        event_message(body), routing_key=conversation_key(json.loads(body))
                    )
                    for body in batch
                )
            )

        async with running_worker(
            base, sim.url, WORKER_PREFETCH=str(prefetch), **settings
        ) as worker:
            return await run("worker", sim, worker.pid, publish_batch, bodies, window, warmup)


async def baseline_memory(
    sim: Simulator, bodies: list[bytes], prefetch: int, window: int, warmup: int
) -> Profile:
    """Run the bare loop from a plain quorum queue."""
    async with plain_queue() as (name, channel):
        exchange: Any = channel.default_exchange

        async def publish_batch(batch: list[bytes]) -> None:
            await asyncio.gather(
                *(exchange.publish(event_message(body), routing_key=name) for body in batch)
            )

        async with running_baseline(name, sim.url, prefetch) as process:
            return await run("baseline", sim, process.pid, publish_batch, bodies, window, warmup)


def report(profiles: dict[str, Profile]) -> str:
    """Return the summary table, contenders side by side."""
    names = list(profiles)
    rows = [["", *names]]

    def line(label: str, value: Callable[[Profile], str]) -> None:
        rows.append([label, *(value(profiles[name]) for name in names)])

    line("RSS after warm-up, MB", lambda p: f"{p.after_warmup()[0].rss / MB:.1f}")
    line("RSS at the end, MB", lambda p: f"{p.samples[-1].rss / MB:.1f}")
    line(
        "growth, MB",
        lambda p: f"{(p.samples[-1].rss - p.after_warmup()[0].rss) / MB:+.1f}",
    )
    line("peak RSS, MB", lambda p: f"{max(s.rss for s in p.samples) / MB:.1f}")
    line("slope, MB per 10k events", lambda p: f"{p.slope_mb_per_10k():+.2f}")
    line("events", lambda p: str(p.samples[-1].events))
    line("run, s", lambda p: f"{p.samples[-1].seconds:.0f}")
    for tenth in range(1, 11):
        rows.append(
            [
                f"RSS at {10 * tenth}% of events, MB",
                *(f"{profiles[n].at_fraction(tenth / 10).rss / MB:.1f}" for n in names),
            ]
        )
    return table(rows)


async def main(
    events: int,
    prefetch: int,
    window: int,
    warmup: int,
    settings: dict[str, str],
    baseline: bool,
) -> None:
    """Run the worker, then the bare loop, and print both profiles side by side."""
    bodies = list(sample_events(events, conversations=1000))
    profiles: dict[str, Profile] = {}
    async with Simulator() as sim:
        profiles["worker"] = await worker_memory(sim, bodies, prefetch, window, warmup, settings)
        if baseline:
            profiles["baseline"] = await baseline_memory(sim, bodies, prefetch, window, warmup)
    setup = (
        f"{events} events over 1000 conversations, prefetch {prefetch}, warm-up {warmup} "
        "events, simulator without quota or latency"
    )
    if settings:
        setup += "\nworker settings: " + " ".join(f"{k}={v}" for k, v in settings.items())
    print_report(setup, report(profiles))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--prefetch", type=int, default=256)
    parser.add_argument("--window", type=int, default=5000, help="most events waiting at once")
    parser.add_argument("--warmup", type=int, default=10_000)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="WORKER_X=VALUE",
        help="extra worker setting (repeatable), e.g. WORKER_DEDUPE_WINDOW_SECONDS=0",
    )
    parser.add_argument("--skip-baseline", action="store_true")
    options = parser.parse_args()
    extra = dict(item.split("=", 1) for item in options.set)
    asyncio.run(
        main(
            options.events,
            options.prefetch,
            options.window,
            options.warmup,
            extra,
            not options.skip_baseline,
        )
    )
