"""Refusals of the caller judged by evidence, end to end: the real worker in burst mode.

An account refused mid-stream (a role revoked, credentials expired) must hold the backlog and
resume, while an event that is itself forbidden is still dead-lettered after one call. The
worker runs in this loop (`Worker.run(burst=True)`) against the real RabbitMQ and a simulator
served from this same loop, through the worker's real AWS code path.
"""

import asyncio
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web

from tests.integration.support import (
    Broker,
    chat_event,
    control,
    encode,
    free_port,
    http_get,
    wait_until,
)
from tests.integration.test_pipeline import aws_credentials, settings_for  # noqa: F401
from worker.models import conversation_key
from worker.pipeline.errors import ErrorVariant
from worker.runner.lifecycle import Worker
from worker.testing.simulator import ConnectSimulator

pytestmark = pytest.mark.integration

BURST_TIMEOUT = 90.0
CONVERSATIONS = 100


def body(index: int, conversations: int = CONVERSATIONS) -> dict[str, Any]:
    """Return a valid event whose content carries its index, in one of `conversations`."""
    return chat_event(f"+1555100{index % conversations:04d}", "agent", f"m{index}")


async def publish_all(broker: Broker, bodies: list[dict[str, Any]]) -> None:
    """Publish events keyed by conversation, as producers do."""
    for item in bodies:
        await broker.publish(encode(item), routing_key=conversation_key(item))


def delivered(simulator: ConnectSimulator) -> list[str]:
    """Return the contents Connect accepted, in arrival order."""
    return [call["body"]["Event"]["Content"] for call in simulator.received]


async def dead_letters(broker: Broker) -> int:
    """Return how many dead letters all variants' queues hold."""
    return sum([await broker.dead_letter_count(variant) for variant in ErrorVariant])


async def forbid(simulator: ConnectSimulator, source: str) -> None:
    """Make Connect refuse every call of one conversation with AccessDenied (a real IAM deny)."""
    spec = {"match": {"SourceId": source}, "code": "AccessDeniedException"}
    await control(simulator, "rules", spec)


class Burst:
    """The real worker draining in this loop, with what /readyz said meanwhile."""

    def __init__(self, broker: Broker, simulator: ConnectSimulator, **overrides: Any) -> None:
        self.port = free_port()
        settings = settings_for(broker, http_port=self.port, **overrides)
        self.worker = Worker(settings, endpoint_url=simulator.url)
        self.paused: list[str] = []

    async def run(self, while_running: Callable[[], bool] = lambda: True) -> None:
        """Drain the queues; note each reason /readyz gave for a 503 about the account."""
        run = asyncio.create_task(asyncio.wait_for(self.worker.run(burst=True), BURST_TIMEOUT))
        while not run.done():
            status, answer = await http_get(self.port, "/readyz")
            if status == 503 and "account" in answer:
                self.paused.append(json.loads(answer)["reason"])
            await asyncio.wait([run], timeout=0.2)
        await run


# An account refused mid-stream


@pytest.mark.parametrize(
    ("code", "status", "variant"),
    [
        ("AccessDeniedException", 403, ErrorVariant.ACCESS_DENIED),
        ("ExpiredTokenException", 400, ErrorVariant.UNKNOWN),
        ("UnrecognizedClientException", 403, ErrorVariant.UNKNOWN),
    ],
)
async def test_an_account_refused_mid_stream_holds_the_backlog_and_resumes(
    broker: Broker, simulator: ConnectSimulator, code: str, status: int, variant: ErrorVariant
) -> None:
    # Given a backlog of 1,000 events over 100 conversations, and a Connect that refuses
    # every call with `code` for 15 s once it has accepted 200
    await publish_all(broker, [body(i) for i in range(1000)])
    spec = {"seconds": 15, "code": code, "status": status, "after_accepted": 200}
    await control(simulator, "outage", spec)

    # When the real worker drains the backlog
    burst = Burst(broker, simulator, probe_seconds=0.5, probe_max_seconds=2.0)
    await burst.run()

    # Then the refusals came, /readyz said the account was refused while they did,
    # every event was delivered afterwards, and at most 20 were dead-lettered
    assert any(call["code"] == code for call in simulator.calls)
    assert burst.paused, "readiness never reported the account refused"
    assert all("refuses this account" in reason for reason in burst.paused)
    letters = await dead_letters(broker)
    assert letters <= 20, letters
    assert len(set(delivered(simulator))) == 1000 - letters
    assert await broker.work_count() == 0


# Refusals that are the event's own


async def test_a_forbidden_event_among_accepted_ones_is_dead_lettered_after_one_call(
    broker: Broker, simulator: ConnectSimulator
) -> None:
    # Given one forbidden conversation among 200 that Connect accepts, early in the stream,
    # and a worker that would wait 60 s before deciding on a refusal without evidence
    forbidden = body(25, conversations=200)
    await forbid(simulator, forbidden["SourceId"])
    await publish_all(broker, [body(i, conversations=200) for i in range(200)])
    burst = Burst(broker, simulator, account_undecided_seconds=60.0)

    # When the worker drains them, then the forbidden event is dead-lettered within 5 s,
    # long before the 60 s: the accepted calls of other conversations decided it
    run = asyncio.create_task(burst.run())
    await wait_until(lambda: broker.dead_letter_count(ErrorVariant.ACCESS_DENIED), timeout=5.0)
    await run

    # And after one call: it was its own refusal, not the account's
    [letter] = await broker.take_dead_letters(ErrorVariant.ACCESS_DENIED)
    assert letter.headers["x-attempts"] == "1"
    assert [c["code"] for c in simulator.calls].count("AccessDeniedException") == 1
    assert len(simulator.received) == 199
    assert not burst.paused


async def test_five_forbidden_conversations_among_a_hundred_are_exactly_those_dead_lettered(
    broker: Broker, simulator: ConnectSimulator
) -> None:
    # Given 100 accepted events and 5 forbidden ones of different conversations spread
    # among them
    bodies = [body(i) for i in range(100)]
    forbidden = [chat_event(f"+1555200{n:04d}", "agent", f"forbidden{n}") for n in range(5)]
    for n, event in enumerate(forbidden):
        await forbid(simulator, event["SourceId"])
        bodies.insert(10 + n * 20, event)
    await publish_all(broker, bodies)

    # When the worker drains them
    burst = Burst(broker, simulator)
    await burst.run()

    # Then exactly the 5 forbidden events are dead-lettered, after one call each
    letters = await broker.take_dead_letters(ErrorVariant.ACCESS_DENIED)
    contents = sorted(json.loads(letter.body)["Event"]["Content"] for letter in letters)
    assert contents == [f"forbidden{n}" for n in range(5)]
    assert {letter.headers["x-attempts"] for letter in letters} == {"1"}
    assert sorted(delivered(simulator)) == sorted(f"m{i}" for i in range(100))
    assert not burst.paused


async def test_a_lone_forbidden_event_in_a_quiet_stream_is_dead_lettered_within_the_bound(
    broker: Broker, simulator: ConnectSimulator
) -> None:
    # Given a single event, forbidden, and no other traffic to judge it by
    event = body(1)
    await forbid(simulator, event["SourceId"])
    await publish_all(broker, [event])

    # When the worker, with the default bound of 5 s on an undecided refusal, drains it
    burst = Burst(broker, simulator)
    assert burst.worker.settings.account_undecided_seconds == 5.0
    run = asyncio.create_task(burst.run())

    # Then it is held while undecided, and dead-lettered within the bound, after one call
    await wait_until(lambda: broker.dead_letter_count(ErrorVariant.ACCESS_DENIED), timeout=8.0)
    await run
    [letter] = await broker.take_dead_letters(ErrorVariant.ACCESS_DENIED)
    assert letter.headers["x-attempts"] == "1"
    assert len(simulator.calls) == 1


# A credential source failing mid-stream


class CredentialSource:
    """A container credentials endpoint of the test's own: short-lived keys, then errors.

    botocore's container provider (`AWS_CONTAINER_CREDENTIALS_FULL_URI`) refreshes its keys
    on every call once they expire within its mandatory refresh period (10 min), and raises
    when that refresh fails. Keys served here expire 10 min and `lifetime` seconds from now,
    so the worker fetches new ones about every `lifetime` seconds, mid-stream.
    """

    MANDATORY_REFRESH_SECONDS = 600.0

    def __init__(self, lifetime: float, fail_when: Callable[[], bool], fail_seconds: float):
        self.lifetime = lifetime
        self.served = 0
        self.failed = 0
        self._fail_when = fail_when
        self._fail_seconds = fail_seconds
        self._failing_until: float | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Serve on a free loopback port; return the URL botocore is to read."""
        app = web.Application()
        app.router.add_get("/credentials", self._credentials)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        return f"http://127.0.0.1:{port}/credentials"

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()

    def failing(self) -> bool:
        """Return True while the source fails; start failing once `fail_when` holds."""
        now = time.monotonic()
        if self._failing_until is None and self._fail_when():
            self._failing_until = now + self._fail_seconds
        return self._failing_until is not None and now < self._failing_until

    async def _credentials(self, _: web.Request) -> web.Response:
        """Answer a refresh: new keys, or a 500 while failing."""
        if self.failing():
            self.failed += 1
            return web.json_response({"message": "credential source unavailable"}, status=500)
        self.served += 1
        expiry = datetime.now(UTC) + timedelta(
            seconds=self.MANDATORY_REFRESH_SECONDS + self.lifetime
        )
        return web.json_response(
            {
                "AccessKeyId": f"ASIATESTKEY{self.served:06d}",
                "SecretAccessKey": "test-secret-do-not-log",
                "Token": "test-session-token",
                "Expiration": expiry.isoformat(),
            }
        )


async def test_a_credential_source_failing_mid_stream_holds_the_backlog_and_resumes(
    broker: Broker, simulator: ConnectSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker whose keys come from a container credentials endpoint, refreshed about
    # every second, which fails for 15 s from its first refresh after 200 accepted calls
    source = CredentialSource(1.0, lambda: len(simulator.received) >= 200, fail_seconds=15.0)
    monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", await source.start())
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    await publish_all(broker, [body(i) for i in range(1000)])

    # When the real worker drains the backlog, at a pace of 150 calls/s that keeps it flowing
    # past the first refreshes
    pace = {"rate_initial": 150.0, "rate_max": 150.0}
    burst = Burst(broker, simulator, probe_seconds=0.5, probe_max_seconds=2.0, **pace)
    try:
        await burst.run()
    finally:
        await source.stop()

    # Then the keys were refreshed mid-stream, the source failed, and the refreshes that
    # failed held the backlog: /readyz said so, every event was delivered afterwards
    assert source.served >= 3 and source.failed > 0, (source.served, source.failed)
    assert burst.paused, "readiness never reported the account refused"
    letters = await dead_letters(broker)
    assert letters <= 20, letters
    assert len(set(delivered(simulator))) == 1000 - letters
    assert await broker.work_count() == 0
