"""The real worker in the test's own event loop: one pipeline, end to end, in burst mode.

`Worker.run(burst=True)` consumes until every partition is empty and nothing is held, then
drains and returns, like arq's burst mode. It runs against the real RabbitMQ and a simulator
served from this same loop, through the worker's real AWS code path. These tests fail if the
turn protocol (per-conversation order), the settle decision (ack, dead letter, hand back) or
the retry decision (retry, stop) regresses.
"""

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import pytest
from pydantic import SecretStr

from tests.integration.support import AMQP_URL, Broker, chat_event, encode
from worker.models import conversation_key
from worker.runner.lifecycle import Worker
from worker.settings import WorkerSettings
from worker.testing.simulator import ConnectSimulator

pytestmark = pytest.mark.integration

BURST_TIMEOUT = 60.0


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Give botocore's chain test credentials, and nothing from the host."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "AKIDTESTPIPELINE",
        "AWS_SECRET_ACCESS_KEY": "test-secret-do-not-log",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    }.items():
        monkeypatch.setenv(name, value)


def settings_for(broker: Broker, **overrides: Any) -> WorkerSettings:
    """Return settings for one in-process worker: short budgets, no quota start."""
    values: dict[str, Any] = {
        "amqp_url": SecretStr(AMQP_URL),
        "queue": broker.base,
        "partitions": broker.partitions,
        "http_port": 0,
        "aws_region": "us-east-1",
        "throttle_max_attempts": 3,
        "transient_max_attempts": 3,
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 0.05,
        "dead_letter_retry_delay_seconds": 0.2,
        "rate_initial": 1000.0,
    }
    values.update(overrides)
    return WorkerSettings(**values)


async def run_burst(broker: Broker, simulator: ConnectSimulator, **overrides: Any) -> Worker:
    """Run the real worker in this loop until it has nothing left to do; return it."""
    worker = Worker(settings_for(broker, **overrides), endpoint_url=simulator.url)
    await asyncio.wait_for(worker.run(burst=True), BURST_TIMEOUT)
    return worker


async def publish(broker: Broker, source: str, destination: str, content: str) -> None:
    """Publish one event with its conversation key, as producers do."""
    body = chat_event(source, destination, content)
    await broker.publish(encode(body), routing_key=conversation_key(body))


async def throttle(simulator: ConnectSimulator, match: dict[str, str], times: int | None) -> None:
    """Make the simulator answer 429 ThrottlingException to matching calls."""
    await simulator_rule(simulator, match, "ThrottlingException", times)


async def simulator_rule(
    simulator: ConnectSimulator, match: dict[str, str], code: str, times: int | None
) -> None:
    """Add a fault rule through the simulator's control API, as an operator would."""
    spec: dict[str, Any] = {"match": match, "code": code}
    if times is not None:
        spec["times"] = times
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{simulator.url}/_sim/rules", json=spec) as response,
    ):
        assert response.status == 200, await response.text()


def contents(simulator: ConnectSimulator, source: str) -> list[str]:
    """Return the contents Connect accepted from one source, in arrival order."""
    return [
        call["body"]["Event"]["Content"]
        for call in simulator.received
        if call["body"]["SourceId"] == source
    ]


async def test_each_conversation_reaches_connect_in_order_while_its_head_is_retried(
    broker: Broker, simulator: ConnectSimulator
) -> None:
    # Given two conversations published interleaved, the first calls of A throttled twice
    for index in range(1, 7):
        await publish(broker, "+15550000001", "agent", f"A{index}")
        await publish(broker, "+15550000002", "agent", f"B{index}")
    await throttle(simulator, {"SourceId": "+15550000001"}, times=2)

    # When the real worker drains them in this loop
    worker = await run_burst(broker, simulator)

    # Then each conversation arrived once each, in publish order, and nothing is left
    assert contents(simulator, "+15550000001") == [f"A{i}" for i in range(1, 7)]
    assert contents(simulator, "+15550000002") == [f"B{i}" for i in range(1, 7)]
    assert len(simulator.calls) == 12 + 2
    assert await broker.work_count() == 0
    assert len(worker.inflight) == 0


async def test_each_outcome_is_settled_by_its_own_verb(
    broker: Broker, simulator: ConnectSimulator
) -> None:
    # Given one event of each fate: accepted, malformed, refused, throttled past its budget
    await publish(broker, "+15550000011", "agent", "accepted")
    await broker.publish(b"{not json", routing_key="junk")
    await publish(broker, "+15550000012", "simulate:InvalidRequestException", "refused")
    await publish(broker, "+15550000013", "agent", "throttled")
    await throttle(simulator, {"SourceId": "+15550000013"}, times=None)

    # When the real worker drains them
    await run_burst(broker, simulator)

    # Then the accepted one is acked, each failure is a dead letter in its own queue, with
    # the attempts it took, and the work queues are empty
    assert contents(simulator, "+15550000011") == ["accepted"]
    letters = {
        variant: await broker.take_dead_letters(variant)
        for variant in ("MalformedEvent", "InvalidRequestException", "ThrottlingException")
    }
    assert {variant: len(found) for variant, found in letters.items()} == dict.fromkeys(letters, 1)
    attempts = {v: (found[0].headers or {})["x-attempts"] for v, found in letters.items()}
    assert attempts == {
        "MalformedEvent": "0",
        "InvalidRequestException": "1",
        "ThrottlingException": "3",
    }
    assert letters["MalformedEvent"][0].body == b"{not json"
    assert await broker.work_count() == 0


async def test_a_retry_follows_the_kind_of_failure(
    broker: Broker, simulator: ConnectSimulator
) -> None:
    # Given an event that meets two 500s, one that meets two throttles, one refused for good
    await publish(broker, "+15550000021", "agent", "after-outage")
    await publish(broker, "+15550000022", "agent", "after-throttles")
    await publish(broker, "+15550000023", "simulate:ResourceNotFoundException", "gone")
    await simulator_rule(simulator, {"SourceId": "+15550000021"}, "InternalServiceException", 2)
    await throttle(simulator, {"SourceId": "+15550000022"}, times=2)

    # When the real worker drains them
    await run_burst(broker, simulator)

    # Then the transient and throttled ones were retried until delivered, the other not at all
    calls = Counter(call["body"]["SourceId"] for call in simulator.calls)
    assert calls == {"+15550000021": 3, "+15550000022": 3, "+15550000023": 1}
    assert contents(simulator, "+15550000021") == ["after-outage"]
    assert contents(simulator, "+15550000022") == ["after-throttles"]
    [gone] = await broker.take_dead_letters("ResourceNotFoundException")
    assert (gone.headers or {})["x-attempts"] == "1"
    assert await broker.work_count() == 0
