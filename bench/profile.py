"""Where the worker's time goes: sample it with py-spy while it drains a backlog.

    python -m bench.profile [--events 20000] [--contender worker|baseline|tuned] [--top 30]
                            [--output profile.txt]

Against a simulator with no quota and no latency, the contender drains `--events` events at
prefetch 64 while `py-spy record` samples it (100 Hz, idle frames left out, the process paused
at each sample so that stacks are whole). Contenders: `worker` (its defaults, INFO logs),
`baseline` (the bare loop on the worker's partitions), `tuned` (the same with the worker's
botocore settings). Printed: the functions with the most samples on their own (self) and under
them (inclusive), as shares of all samples. `--output` keeps the collapsed stacks
(flamegraph.pl or speedscope read them).

py-spy must be installed (`pip install -e '.[bench]'`) and allowed to ptrace the process
(root, or kernel.yama.ptrace_scope=0).
"""

import argparse
import asyncio
import collections
import shutil
import sys
import tempfile
from pathlib import Path

from bench.common import (
    PARTITIONS,
    Simulator,
    publish_backlog,
    sample_events,
    start_baseline,
    start_workers,
    stop_processes,
    table,
    topology,
    wait_for,
)
from worker.topology import work_queue_names


def parse_stacks(text: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """Return self and inclusive sample counts per function from py-spy's collapsed stacks."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame.split(" (")[0] + " " + _where(frame) for frame in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    return own, inclusive, total


def _where(frame: str) -> str:
    """Return a frame's file as `package/module.py`, without its line number."""
    if " (" not in frame:
        return ""
    location = frame.split(" (", 1)[1].rstrip(")")
    path = location.rsplit(":", 1)[0]
    return "(" + "/".join(Path(path).parts[-2:]) + ")"


def top(counts: collections.Counter[str], total: int, limit: int) -> list[list[str]]:
    """Return table rows of the most sampled functions, as shares of all samples."""
    return [[f"{100 * n / total:5.1f} %", name] for name, n in counts.most_common(limit)]


async def start_contender(
    contender: str, sim: Simulator, base: str, events: int
) -> asyncio.subprocess.Process:
    """Start the contender on the topology `base`."""
    if contender == "worker":
        (process,) = await start_workers(1, base, sim.url)
        return process
    queues = work_queue_names(base, PARTITIONS)
    return await start_baseline(queues, sim.url, events, tuned=contender == "tuned")


async def profile(contender: str, events: int, output: Path) -> None:
    """Drain a backlog with the contender under py-spy; write the collapsed stacks."""
    async with Simulator() as sim, topology() as (base, channel):
        await publish_backlog(channel, base, list(sample_events(events, 1000)))
        await sim.post("reset")
        process = await start_contender(contender, sim, base, events)
        spy = await asyncio.create_subprocess_exec(
            "py-spy", "record", "--pid", str(process.pid), "--rate", "100", "--format", "raw",
            "--output", str(output),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip

        async def drained() -> bool:
            return int((await sim.get("stats"))["received"]) >= events

        await wait_for(drained, events / 50 + 60, every=0.25)
        if spy.returncode is None:  # the bare loop exits by itself, and py-spy with it
            spy.send_signal(2)  # SIGINT: py-spy writes what it has and exits
        await asyncio.wait_for(spy.wait(), 30)
        await stop_processes([process])


def main() -> None:
    """Parse the flags, profile, print the hottest functions."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--contender", choices=["worker", "baseline", "tuned"], default="worker")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--output", type=Path)
    options = parser.parse_args()
    if shutil.which("py-spy") is None:
        sys.exit("py-spy is not installed: pip install -e '.[bench]'")
    with tempfile.TemporaryDirectory() as scratch:
        output = options.output or Path(scratch) / "stacks.txt"
        asyncio.run(profile(options.contender, options.events, output))
        own, inclusive, total = parse_stacks(output.read_text())
    print(f"{options.contender}: {total} samples while draining {options.events} events\n")
    print(table([["self", "function"], *top(own, total, options.top)]))
    print()
    print(table([["inclusive", "function"], *top(inclusive, total, options.top)]))


if __name__ == "__main__":
    main()
