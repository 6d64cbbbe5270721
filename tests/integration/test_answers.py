"""What Connect's answers mean to the real worker: a 2xx is delivery, a known code says how to
retry, an answer that is not Connect's stops the sending.

The real worker runs in the test's loop against the real RabbitMQ and the simulator, whose
`/_sim/answers` control makes it answer 200 the way a proxy or a wrong endpoint might.
"""

import asyncio
from collections import Counter
from typing import Any

import aiohttp
import pytest
import structlog
from structlog.testing import LogCapture

from tests.integration.support import Broker, chat_event, encode, wait_until
from tests.integration.test_pipeline import (  # noqa: F401 (aws_credentials: autouse fixture)
    BURST_TIMEOUT,
    aws_credentials,
    contents,
    settings_for,
)
from worker.models import conversation_key
from worker.pipeline.errors import ErrorVariant
from worker.runner.lifecycle import Worker
from worker.testing.simulator import ConnectSimulator

pytestmark = pytest.mark.integration


async def control(simulator: ConnectSimulator, path: str, spec: dict[str, Any]) -> None:
    """POST to the simulator's control API, as an operator would."""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{simulator.url}/_sim/{path}", json=spec) as response,
    ):
        assert response.status == 200, await response.text()


async def publish(broker: Broker, source: str, content: str) -> str:
    """Publish one event of `source`'s conversation; return its message_id."""
    body = chat_event(source, "agent", content)
    return await broker.publish(encode(body), routing_key=conversation_key(body))


def capturing(worker: Worker) -> LogCapture:
    """Capture the lines of the worker's pipeline (built when it runs), debug ones included."""
    capture = LogCapture()
    worker.log = structlog.wrap_logger(
        None, processors=[capture], wrapper_class=structlog.make_filtering_bound_logger(0)
    )
    return capture


async def run_burst(worker: Worker) -> None:
    """Run the worker in this loop until it has nothing left to do."""
    await asyncio.wait_for(worker.run(burst=True), BURST_TIMEOUT)


async def dead_letters(broker: Broker) -> dict[str, int]:
    """Return the dead letters of every variant queue that holds any."""
    counts = {variant.value: await broker.dead_letter_count(variant) for variant in ErrorVariant}
    return {variant: count for variant, count in counts.items() if count}


def sample(worker: Worker, name: str, **labels: str) -> float | None:
    """Read one of the worker's metrics."""
    return worker.metrics.registry.get_sample_value(f"chat_worker_{name}", labels)


async def test_a_2xx_with_an_odd_body_is_a_delivery_never_a_dead_letter(
    broker: Broker, simulator: ConnectSimulator
) -> None:
    # Given one conversation per odd body a proxy may answer 200 with, and one answered well
    odd = {"+15550000101": "[1,2,3]", "+15550000102": "null", "+15550000103": '"accepted"'}
    for source, body in odd.items():
        await control(simulator, "answers", {"match": {"SourceId": source}, "body": body})
        for index in range(2):
            await publish(broker, source, f"{source}-{index}")
    await publish(broker, "+15550000104", "plain")
    # Six odd answers may come in a row (the order of partitions is the broker's): a
    # tripwire above that keeps this test about delivery; the tripwire has its own test.
    worker = Worker(settings_for(broker, endpoint_odd_answers=10), endpoint_url=simulator.url)
    capture = capturing(worker)

    # When the real worker drains them
    await run_burst(worker)

    # Then every event reached Connect once, in order, and none was dead-lettered
    for source in odd:
        assert contents(simulator, source) == [f"{source}-0", f"{source}-1"]
    assert contents(simulator, "+15550000104") == ["plain"]
    assert len(simulator.calls) == 7
    assert await dead_letters(broker) == {}
    assert await broker.work_count() == 0
    assert sample(worker, "delivered_total") == 7
    # And what could be read of each odd answer is logged; fewer odd answers in a row than
    # the tripwire's threshold leave the sending on
    unread = Counter(
        entry["body"]
        for entry in capture.entries
        if entry["event"] == "event.delivered_unread_answer"
    )
    assert unread == {"list": 2, "null": 2, "string": 2}
    assert worker.guard.endpoint.closed


async def test_a_2xx_without_request_id_stops_the_sending_and_keeps_the_backlog(
    broker: Broker, simulator: ConnectSimulator
) -> None:
    # Given a backlog of one conversation (one call at a time) and an endpoint that answers
    # 200 without x-amzn-RequestId: not Connect
    for index in range(10):
        await publish(broker, "+15550000201", f"m{index}")
    await control(simulator, "answers", {"request_id": False})
    worker = Worker(settings_for(broker), endpoint_url=simulator.url)

    # When the worker runs until it says it is not ready
    running = asyncio.create_task(worker.run())
    await wait_until(lambda: not worker.readiness()[0] and simulator.arrived > 0)
    ready, reason = worker.readiness()
    worker.request_stop()
    await asyncio.wait_for(running, BURST_TIMEOUT)

    # Then it said why, the first event (answered 2xx) counts as delivered, the next one was
    # never sent, and the backlog is back in RabbitMQ, nothing dead-lettered
    assert not ready
    assert "x-amzn-RequestId" in reason
    assert "stopped sending" in reason
    assert simulator.arrived == 1
    assert sample(worker, "breaker_state", breaker="endpoint") == 1
    assert sample(worker, "delivered_total") == 1
    assert await broker.work_count() == 9
    assert await dead_letters(broker) == {}


async def test_a_throttling_code_answered_with_400_is_retried_within_the_throttle_budget(
    broker: Broker, simulator: ConnectSimulator
) -> None:
    # Given a ThrottlingException answered with status 400: twice to one event, always to another
    await publish(broker, "+15550000301", "after-two-throttles")
    await publish(broker, "+15550000302", "always-throttled")
    throttle_400 = {"code": "ThrottlingException", "status": 400}
    await control(
        simulator, "rules", {**throttle_400, "match": {"SourceId": "+15550000301"}, "times": 2}
    )
    await control(simulator, "rules", {**throttle_400, "match": {"SourceId": "+15550000302"}})
    worker = Worker(settings_for(broker, throttle_max_attempts=3), endpoint_url=simulator.url)

    # When the real worker drains them
    await run_burst(worker)

    # Then both were retried as throttles: one delivered at its third call, the other
    # dead-lettered once its throttle budget (3 attempts) was spent
    calls = Counter(call["body"]["SourceId"] for call in simulator.calls)
    assert calls == {"+15550000301": 3, "+15550000302": 3}
    assert contents(simulator, "+15550000301") == ["after-two-throttles"]
    [letter] = await broker.take_dead_letters("ThrottlingException")
    assert (letter.headers or {})["x-attempts"] == "3"
    assert sample(worker, "retries_total", reason="throttled") == 4


async def test_each_delivery_is_logged_with_its_contact_id_and_new_chats_are_counted(
    broker: Broker, simulator: ConnectSimulator
) -> None:
    # Given three events of one conversation and one of another
    first = [await publish(broker, "+15550000401", f"a{index}") for index in range(3)]
    second = await publish(broker, "+15550000402", "b0")
    worker = Worker(settings_for(broker), endpoint_url=simulator.url)
    capture = capturing(worker)

    # When the real worker drains them
    await run_burst(worker)

    # Then each delivery line names its message and the contact it went to: one chat per
    # conversation, opened by its first event; two new chats counted
    delivered = {
        entry["message_id"]: entry
        for entry in capture.entries
        if entry["event"] == "event.delivered"
    }
    assert set(delivered) == {*first, second}
    contacts = {delivered[message_id]["contact_id"] for message_id in first}
    assert len(contacts) == 1
    assert None not in contacts
    assert delivered[second]["contact_id"] not in contacts | {None}
    assert [delivered[message_id]["new_chat"] for message_id in first] == [True, False, False]
    assert sample(worker, "new_chats_total") == 2
