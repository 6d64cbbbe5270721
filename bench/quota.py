"""Quota benchmark: drain a backlog against a token-bucket quota, worker vs bare aiobotocore.

    python -m bench.quota [--events 1500] [--rate 50] [--burst 10]

Prints, from the same run against the same simulator: the worker (1 and 2 replicas) and the
bare aiobotocore client in `adaptive` and `standard` retry modes at concurrency 64. Quota used
is successes per second over the drain (first call to last success) divided by the quota.
"""

import argparse
import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from bench.common import (
    Simulator,
    publish_backlog,
    sample_events,
    start_workers,
    stop_processes,
    table,
    topology,
    wait_for,
)
from worker.pipeline.errors import ErrorVariant
from worker.topology import dead_letter_queue_name

CONCURRENCY = 64


def summarise(name: str, calls: list[dict[str, Any]], rate: float, failed: int) -> list[str]:
    """Return one table row computed from the simulator's record of the calls."""
    ok = [call["at"] for call in calls if call["status"] == 200]
    throttled = sum(1 for call in calls if call["status"] == 429)
    drain = (max(ok) - min(call["at"] for call in calls)) if ok else float("nan")
    used = len(ok) / drain / rate if ok else 0.0
    return [
        name,
        str(len(ok)),
        str(failed),
        str(len(calls)),
        f"{100 * throttled / max(1, len(calls)):.1f}%",
        f"{drain:.1f}",
        f"{100 * used:.1f}%",
    ]


async def bare_client(sim: Simulator, mode: str, bodies: list[bytes]) -> int:
    """Send every body with the bare aiobotocore client; return how many it gave up on."""
    config = AioConfig(retries={"mode": mode}, max_pool_connections=CONCURRENCY)
    gate = asyncio.Semaphore(CONCURRENCY)
    gave_up = 0
    async with get_session().create_client(
        "connect",
        region_name="us-east-1",
        endpoint_url=sim.url,
        aws_access_key_id="AKIDBENCH",
        aws_secret_access_key="bench",
        config=config,
    ) as client:

        async def send(body: bytes) -> None:
            nonlocal gave_up
            async with gate:
                try:
                    await client.send_chat_integration_event(**json.loads(body))
                except ClientError:
                    gave_up += 1

        await asyncio.gather(*(send(body) for body in bodies))
    return gave_up


async def worker_run(sim: Simulator, replicas: int, bodies: list[bytes], **settings: str) -> int:
    """Drain the backlog with worker processes; return the number of dead letters."""
    async with topology() as (base, channel):
        await publish_backlog(channel, base, bodies)
        workers = await start_workers(
            replicas, base, sim.url, WORKER_LOG_LEVEL="WARNING", **settings
        )

        async def drained() -> bool:
            return int((await sim.get("stats"))["received"]) >= len(bodies)

        await wait_for(drained, timeout=10 * len(bodies) / sim.flags["rate"] + 60)
        await stop_processes(workers)
        dead = 0
        for variant in ErrorVariant:
            queue = await channel.declare_queue(dead_letter_queue_name(base, variant), passive=True)
            dead += queue.declaration_result.message_count or 0
        return dead


async def main(events: int, rate: float, burst: int) -> None:
    """Run every contender against a fresh bucket and print the table."""
    bodies = list(sample_events(events, conversations=events // 5))
    rows = [["run", "delivered", "gave up/DLQ", "calls", "throttled", "drain s", "quota used"]]
    contenders: list[tuple[str, Callable[[Simulator], Awaitable[int]]]] = [
        ("worker, 1 replica", lambda sim: worker_run(sim, 1, bodies)),
        ("worker, 2 replicas", lambda sim: worker_run(sim, 2, bodies)),
        (
            "worker, 2 replicas, spread",
            lambda sim: worker_run(sim, 2, bodies, WORKER_SPREAD_PARTITIONS="true"),
        ),
        ("aiobotocore adaptive", lambda sim: bare_client(sim, "adaptive", bodies)),
        ("aiobotocore standard", lambda sim: bare_client(sim, "standard", bodies)),
    ]
    async with Simulator(rate=rate, burst=burst, latency_ms=20, jitter_ms=10) as sim:
        for name, run in contenders:
            await sim.post("reset")
            await asyncio.sleep(1.0)
            failed = await run(sim)
            rows.append(summarise(name, await sim.calls(), rate, failed))
            print(f"done: {name}", flush=True)
    print(f"\n{events} events, quota {rate:g} req/s burst {burst}, concurrency/prefetch 64\n")
    print(table(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1500)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--burst", type=int, default=10)
    options = parser.parse_args()
    asyncio.run(main(options.events, options.rate, options.burst))
