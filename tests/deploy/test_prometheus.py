"""A real Prometheus with the shipped rules, scraping the real worker: dead letters fire an alert.

Prometheus (Debian's binary, .ci/ensure-prometheus) runs on a free port with a data directory
of its own, loads deploy/prometheus/alerts.yml itself (not a copy), and scrapes and evaluates
every second. The dead-letter alert has no `for`, so it fires at the first evaluation that
sees a dead letter.
"""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.deploy.support import ALERTS, prometheus_tool
from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, free_port, wait_until

pytestmark = pytest.mark.integration

JOB = "chat-worker"
ALERT = "ChatWorkerDeadLetters"


class Prometheus:
    """A Prometheus server process and its HTTP API."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, log: Path) -> None:
        self.process = process
        self.url = f"http://127.0.0.1:{port}"
        self.log = log

    async def get(self, path: str, **params: str) -> Any:
        """Return the `data` of a JSON API answer; None while Prometheus is not ready."""
        if self.process.returncode is not None:
            raise AssertionError("prometheus exited:\n" + self.log.read_text()[-3000:])
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.get(self.url + path, params=params) as response,
            ):
                if response.status != 200:  # 503 while it starts
                    return None
                return (await response.json())["data"]
        except aiohttp.ClientConnectionError:
            return None

    async def alerts(self, name: str, state: str) -> list[dict[str, Any]]:
        """Return the alerts of one name in one state (pending, firing)."""
        data = await self.get("/api/v1/alerts") or {"alerts": []}
        return [
            a for a in data["alerts"] if a["labels"]["alertname"] == name and a["state"] == state
        ]

    async def series(self, query: str) -> int:
        """Return how many series an instant query returns."""
        data = await self.get("/api/v1/query", query=query)
        return len(data["result"]) if data else 0

    async def last_evaluation(self, rule: str) -> str:
        """Return when the named alerting rule was last evaluated, as Prometheus writes it."""
        data = await self.get("/api/v1/rules", type="alert") or {"groups": []}
        for group in data["groups"]:
            for found in group["rules"]:
                if found["name"] == rule and found["health"] == "ok":
                    return str(found["lastEvaluation"])
        return ""


@pytest.fixture
def prometheus_config(tmp_path: Path) -> tuple[Path, int]:
    """Write a config that scrapes a worker on a free port; return it and that port."""
    worker_port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {"job_name": JOB, "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]}
        ],
    }
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path, worker_port


@pytest.fixture
async def prometheus(
    prometheus_config: tuple[Path, int], tmp_path: Path
) -> AsyncIterator[Prometheus]:
    """Run Prometheus on a free port with a data directory of its own."""
    config, _ = prometheus_config
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            prometheus_tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )
    server = Prometheus(process, port, log)
    try:
        await wait_until(lambda: _answers(server), timeout=30)
        yield server
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)


async def test_dead_letters_fire_the_shipped_dead_letter_alert(
    broker: Broker,
    start_worker: StartWorker,
    prometheus: Prometheus,
    prometheus_config: tuple[Path, int],
) -> None:
    # Given the worker, scraped twice, and the rule evaluated since: no dead-letter alert
    _, worker_port = prometheus_config
    await start_worker(WORKER_HTTP_PORT=str(worker_port))
    two_scrapes = f'count_over_time(chat_worker_dead_lettered_total{{job="{JOB}"}}[1m]) >= 2'
    await wait_until(lambda: _has_series(prometheus, two_scrapes), timeout=30)
    before = await prometheus.last_evaluation(ALERT)
    await wait_until(lambda: _evaluated_since(prometheus, before))
    assert await prometheus.alerts(ALERT, "firing") == []
    assert await prometheus.alerts(ALERT, "pending") == []

    # When two bodies that are not JSON are dead-lettered as MalformedEvent
    for _ in range(2):
        await broker.publish(b"not json at all")
    await wait_until(lambda: _dead_letters(broker), timeout=30)

    # Then Prometheus fires the alert, for that variant only
    await wait_until(lambda: prometheus.alerts(ALERT, "firing"), timeout=30)
    [alert] = await prometheus.alerts(ALERT, "firing")
    assert alert["labels"]["variant"] == "MalformedEvent"
    assert alert["labels"]["job"] == JOB
    assert alert["labels"]["severity"] == "warning"
    assert float(alert["value"]) >= 1


async def _dead_letters(broker: Broker) -> bool:
    """Return True once both malformed events are in their dead-letter queue."""
    return await broker.dead_letter_count("MalformedEvent") == 2


async def _answers(prometheus: Prometheus) -> bool:
    """Return True once Prometheus's API answers."""
    return await prometheus.get("/api/v1/status/buildinfo") is not None


async def _has_series(prometheus: Prometheus, query: str) -> bool:
    """Return True once an instant query returns a series."""
    return await prometheus.series(query) > 0


async def _evaluated_since(prometheus: Prometheus, before: str) -> bool:
    """Return True once the dead-letter rule was evaluated again."""
    return await prometheus.last_evaluation(ALERT) != before
