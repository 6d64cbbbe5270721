"""Health, readiness and metrics over HTTP (SPEC §7).

- `GET /healthz`: 200 while the event loop is responsive, judged by a heartbeat task;
- `GET /readyz`: 200 while the worker's `readiness` callable says so, else 503;
- `GET /metrics`: the Prometheus exposition of `Metrics`.

A handler that runs at all proves the loop runs *now*; the heartbeat also catches a loop that
stalled and recovered, and a heartbeat task that died. No handler raises: a failure becomes a
503 (or 500 for /metrics) with a short body.
"""

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from worker.metrics import Metrics

Readiness = Callable[[], tuple[bool, str]]
"""Return (ready, reason); the reason is shown to operators, e.g. "consuming"."""


@dataclass(frozen=True)
class LoopHealth:
    """What the heartbeat knows about the event loop at one moment."""

    status: str
    """`ok`, `stalled`, `recovered_from_stall` or `heartbeat_stopped`."""
    lag_seconds: float
    """How late the last heartbeat woke up."""
    max_lag_seconds: float
    """The worst lag since the heartbeat started."""
    heartbeat_age_seconds: float
    """Time since the last heartbeat."""
    stalls: int
    """Heartbeats that woke up later than the stall threshold."""

    @property
    def healthy(self) -> bool:
        """Return True when the loop is responsive and has not just stalled."""
        return self.status == "ok"


class LoopHeartbeat:
    """Measure event loop lag: sleep `interval` seconds, record how much later it woke up.

    The loop counts as stalled when no heartbeat came for `stall_threshold` seconds, and as
    recovering for `stall_threshold` seconds after a heartbeat that was that late, so that a
    probe arriving after a stall still sees it.
    """

    def __init__(self, interval: float = 1.0, stall_threshold: float = 10.0) -> None:
        self.interval = interval
        self.stall_threshold = stall_threshold
        self._task: asyncio.Task[None] | None = None
        self._last_beat = 0.0
        self._last_stall: float | None = None
        self._lag = 0.0
        self._max_lag = 0.0
        self._stalls = 0

    def start(self) -> None:
        """Start beating on the running loop."""
        self._last_beat = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._beat(), name="loop-heartbeat")

    async def stop(self) -> None:
        """Stop beating and wait for the task to end."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _beat(self) -> None:
        """Sleep, then record the overshoot; forever."""
        loop = asyncio.get_running_loop()
        while True:
            asleep_at = loop.time()
            await asyncio.sleep(self.interval)
            now = loop.time()
            self._record(now, now - asleep_at - self.interval)

    def _record(self, now: float, lag: float) -> None:
        """Note one heartbeat at `now` that woke up `lag` seconds late."""
        self._last_beat = now
        self._lag = max(lag, 0.0)
        self._max_lag = max(self._max_lag, self._lag)
        if self._lag > self.stall_threshold:
            self._stalls += 1
            self._last_stall = now

    def health(self) -> LoopHealth:
        """Return the loop's health as of now."""
        now = asyncio.get_running_loop().time()
        age = now - self._last_beat
        return LoopHealth(
            status=self._status(now, age),
            lag_seconds=round(self._lag, 4),
            max_lag_seconds=round(self._max_lag, 4),
            heartbeat_age_seconds=round(age, 4),
            stalls=self._stalls,
        )

    def _status(self, now: float, age: float) -> str:
        """Name the loop's state, worst first."""
        if self._task is None or self._task.done():
            return "heartbeat_stopped"
        if age > self.stall_threshold:
            return "stalled"
        if self._last_stall is not None and now - self._last_stall <= self.stall_threshold:
            return "recovered_from_stall"
        return "ok"


class HealthServer:
    """Serve /healthz, /readyz and /metrics on `host:port` (port 0 picks a free one).

    The worker passes `port=settings.http_port` and a `readiness` callable that reports
    whether it is connected and consuming.
    """

    def __init__(
        self,
        metrics: Metrics,
        readiness: Readiness,
        host: str = "0.0.0.0",
        port: int = 8080,
        *,
        heartbeat: LoopHeartbeat | None = None,
    ) -> None:
        self.metrics = metrics
        self.readiness = readiness
        self.host = host
        self.port = port
        self.heartbeat = heartbeat or LoopHeartbeat()
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Start listening and the heartbeat; return the bound port (also set on `.port`)."""
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        # A short shutdown timeout: a scraper's open request must not hold up the drain.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        self.heartbeat.start()
        return self.port

    async def stop(self) -> None:
        """Stop the heartbeat and the server; safe to call twice."""
        await self.heartbeat.stop()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        """Answer 200 while the loop is responsive, else 503; include the lag."""
        try:
            health = self.heartbeat.health()
        except Exception as error:  # never let a probe see a 500 stack trace
            return _json({"status": type(error).__name__}, ok=False)
        body: dict[str, Any] = {
            "status": health.status,
            "loop_lag_seconds": health.lag_seconds,
            "max_loop_lag_seconds": health.max_lag_seconds,
            "heartbeat_age_seconds": health.heartbeat_age_seconds,
            "stalls": health.stalls,
        }
        return _json(body, ok=health.healthy)

    async def _readyz(self, request: web.Request) -> web.Response:
        """Answer 200 while the readiness callable says ready, else 503 with its reason."""
        ready, reason = self._check_readiness()
        return _json({"ready": ready, "reason": reason}, ok=ready)

    def _check_readiness(self) -> tuple[bool, str]:
        """Call the readiness callable; a failure means not ready, named by its type."""
        try:
            ready, reason = self.readiness()
        except Exception as error:
            return False, type(error).__name__
        return bool(ready), str(reason)

    async def _metrics(self, request: web.Request) -> web.Response:
        """Answer the Prometheus exposition text."""
        try:
            body, content_type = self.metrics.render()
        except Exception as error:
            return web.Response(status=500, text=f"metrics unavailable: {type(error).__name__}\n")
        return web.Response(body=body, headers={"Content-Type": content_type})


def _json(body: dict[str, Any], *, ok: bool) -> web.Response:
    """Return `body` as JSON with 200 when `ok`, else 503."""
    return web.json_response(body, status=200 if ok else 503)
