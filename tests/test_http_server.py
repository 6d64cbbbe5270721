"""/healthz, /readyz and /metrics over real HTTP, against a server on a free port."""

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.http_server import HealthServer, LoopHeartbeat
from worker.metrics import Metrics


class Readiness:
    """A readiness callable the test can flip, or make raise."""

    def __init__(self) -> None:
        self.state: tuple[bool, str] = (True, "consuming")
        self.error: Exception | None = None

    def __call__(self) -> tuple[bool, str]:
        if self.error is not None:
            raise self.error
        return self.state


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(worker_id="test-worker")


@pytest.fixture
def readiness() -> Readiness:
    return Readiness()


@pytest.fixture
def heartbeat() -> LoopHeartbeat:
    return LoopHeartbeat(interval=0.02, stall_threshold=0.3)


@pytest.fixture
async def server(
    metrics: Metrics, readiness: Readiness, heartbeat: LoopHeartbeat
) -> AsyncIterator[HealthServer]:
    server = HealthServer(metrics, readiness, host="127.0.0.1", port=0, heartbeat=heartbeat)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def get_json(
    http: aiohttp.ClientSession, server: HealthServer, path: str
) -> tuple[int, dict[str, Any]]:
    """GET `path` and return the status and JSON body."""
    async with http.get(f"http://127.0.0.1:{server.port}{path}") as response:
        return response.status, await response.json()


async def test_start_binds_a_free_port_when_asked_for_0(server: HealthServer) -> None:
    assert server.port > 0


async def test_healthz_is_ok_with_lag_while_the_loop_runs(
    server: HealthServer, http: aiohttp.ClientSession
) -> None:
    await asyncio.sleep(0.1)  # a few heartbeats

    status, body = await get_json(http, server, "/healthz")

    assert status == 200
    assert body["status"] == "ok"
    assert body["loop_lag_seconds"] >= 0.0
    assert body["stalls"] == 0


async def test_healthz_shows_a_stall_after_the_loop_recovers(
    server: HealthServer, http: aiohttp.ClientSession
) -> None:
    # Given a loop blocked for longer than the stall threshold, then running again
    time.sleep(0.5)  # noqa: ASYNC251 - blocking the loop is the point

    # When a probe arrives right after
    status, body = await get_json(http, server, "/healthz")

    # Then it fails, whether or not the heartbeat has woken up first
    assert status == 503
    assert body["status"] in {"stalled", "recovered_from_stall"}
    assert body["max_loop_lag_seconds"] > 0.3 or body["heartbeat_age_seconds"] > 0.3


async def test_healthz_recovers_after_the_stall_window(
    server: HealthServer, http: aiohttp.ClientSession
) -> None:
    time.sleep(0.5)  # noqa: ASYNC251
    await asyncio.sleep(0.5)  # longer than the threshold, with heartbeats

    status, body = await get_json(http, server, "/healthz")

    assert status == 200
    assert body["stalls"] == 1
    assert body["max_loop_lag_seconds"] > 0.3


async def test_healthz_fails_when_the_heartbeat_is_dead(
    server: HealthServer, http: aiohttp.ClientSession
) -> None:
    await server.heartbeat.stop()

    status, body = await get_json(http, server, "/healthz")

    assert status == 503
    assert body["status"] == "heartbeat_stopped"


async def test_readyz_follows_the_readiness_callable(
    server: HealthServer, http: aiohttp.ClientSession, readiness: Readiness
) -> None:
    assert await get_json(http, server, "/readyz") == (200, {"ready": True, "reason": "consuming"})

    readiness.state = (False, "broker unreachable")

    assert await get_json(http, server, "/readyz") == (
        503,
        {"ready": False, "reason": "broker unreachable"},
    )


async def test_readyz_is_503_when_the_callable_raises(
    server: HealthServer, http: aiohttp.ClientSession, readiness: Readiness
) -> None:
    readiness.error = RuntimeError("boom")

    assert await get_json(http, server, "/readyz") == (
        503,
        {"ready": False, "reason": "RuntimeError"},
    )


async def test_metrics_parse_and_show_what_was_counted(
    server: HealthServer, http: aiohttp.ClientSession, metrics: Metrics
) -> None:
    metrics.delivered.inc(5)

    async with http.get(f"http://127.0.0.1:{server.port}/metrics") as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        text = await response.text()

    families = {family.name: family for family in text_string_to_metric_families(text)}
    delivered = families["chat_worker_delivered"]
    assert delivered.type == "counter"
    assert [s.value for s in delivered.samples if s.name == "chat_worker_delivered_total"] == [5.0]


async def test_metrics_is_500_when_rendering_fails(
    server: HealthServer, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> tuple[bytes, str]:
        raise ValueError("bad metric")

    monkeypatch.setattr(server.metrics, "render", broken)

    async with http.get(f"http://127.0.0.1:{server.port}/metrics") as response:
        assert response.status == 500
        assert "ValueError" in await response.text()


async def test_stop_closes_the_port_and_may_be_repeated(
    metrics: Metrics, readiness: Readiness, http: aiohttp.ClientSession
) -> None:
    server = HealthServer(metrics, readiness, host="127.0.0.1", port=0)
    port = await server.start()

    await server.stop()
    await server.stop()

    with pytest.raises(aiohttp.ClientConnectionError):
        await http.get(f"http://127.0.0.1:{port}/healthz")
