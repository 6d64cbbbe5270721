"""Every benchmark command runs from a clean clone and prints its side-by-side report.

Tiny sizes, so that the suite proves the commands work, not how fast anything is: the figures
are never asserted (the README's come from full runs on a quiet machine).
"""

import subprocess
import sys

import pytest

from tests.integration.support import REPO

pytestmark = pytest.mark.integration

COMMANDS = {
    "throughput": (
        ["--events", "300", "--conversations", "50", "--repeats", "1", "--paired", "1"],
        ["ratio worker / baseline", "median", "CPU µs/ev"],
    ),
    "latency": (
        ["--rate", "50", "--seconds", "2", "--warmup", "1", "--repeats", "1"],
        ["ratio worker/baseline", "p99 ms"],
    ),
    "memory": (
        ["--events", "1500", "--warmup", "500", "--window", "500"],
        ["RSS after warm-up, MB", "slope, MB per 10k events"],
    ),
    "scaling": (
        ["--events", "300", "--conversations", "50", "--repeats", "1"],
        ["worker x2, spread", "bare loop x2", "speed-up"],
    ),
    "quota": (["--events", "100", "--rate", "50"], ["worker, 1 replica", "quota used"]),
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_benchmark_command_prints_its_report(name: str) -> None:
    # Given a benchmark with tiny sizes
    flags, expected = COMMANDS[name]

    # When it runs as the README says (python -m bench.<name>)
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{name}", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    # Then it succeeds and prints the worker and the baseline side by side
    assert done.returncode == 0, done.stderr[-3000:]
    for text in expected:
        assert text in done.stdout, done.stdout[-3000:]
