"""Operations end to end: broker loss, SIGTERM mid-backlog, redrive, logs, metrics, health."""

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.integration.conftest import StartWorker
from tests.integration.support import (
    Broker,
    Samples,
    TcpProxy,
    chat_event,
    control,
    encode,
    http_get,
    run_dlq,
    scrape,
    wait_until,
    worker_environment,
)
from worker.models import conversation_key
from worker.pipeline.errors import ErrorVariant
from worker.testing.simulator import ConnectSimulator

pytestmark = pytest.mark.integration

PHONE = "+15559876543"
CONTENT = "pickup code zebra-7781 at the north gate"


def event(destination: str = "agent-1", content: str = CONTENT, **fields: object) -> dict:
    """Return a valid MESSAGE event from the customer's phone."""
    return chat_event(PHONE, destination, content, **fields)


async def publish_event(broker: Broker, body: dict, **properties: Any) -> str:
    """Publish an event keyed by its conversation, as a producer does; return its message_id."""
    return await broker.publish(encode(body), routing_key=conversation_key(body), **properties)


async def status_is(port: int, path: str, expected: int) -> bool:
    """Return True when the endpoint answers with the expected status."""
    return (await http_get(port, path))[0] == expected


def delivered_contents(simulator: ConnectSimulator) -> list[str]:
    """Return the Content of every event Connect accepted, in arrival order."""
    return [call["body"]["Event"]["Content"] for call in simulator.received]


async def dead_lettered_contents(broker: Broker) -> list[str]:
    """Remove every dead letter of every variant and return their Contents."""
    contents = []
    for variant in ErrorVariant:
        for letter in await broker.take_dead_letters(variant):
            contents.append(json.loads(letter.body)["Event"]["Content"])
    return contents


async def queued_contents(broker: Broker) -> list[str]:
    """Consume every event waiting in the work queues and return their Contents.

    Quorum queues with a single active consumer refuse basic.get, so this subscribes.
    """
    expected = await broker.work_count()
    contents: list[str] = []

    async def take(message: AbstractIncomingMessage) -> None:
        contents.append(json.loads(message.body)["Event"]["Content"])

    async with broker.connection.channel() as channel:
        for name in broker.work_queues:
            queue = await channel.get_queue(name)
            await queue.consume(take, no_ack=True)
        await wait_until(lambda: len(contents) >= expected, timeout=10)
        await asyncio.sleep(0.2)  # anything beyond the count would show up as a surplus
    return contents


def value(samples: Samples, name: str, **labels: str) -> float:
    """Return one sample's value; a missing series fails the test."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no series {name}{labels}"
    return samples[key]


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """Return every series of one metric keyed by one label's value."""
    return {
        dict(labels)[label]: sample_value
        for (sample_name, labels), sample_value in samples.items()
        if sample_name == name
    }


# --- 1. Broker loss -------------------------------------------------------------------------


async def test_a_network_cut_to_the_broker_loses_nothing_and_consuming_resumes(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a worker that reaches the broker only through a proxy, ready and consuming
    proxy = TcpProxy()
    await proxy.start()
    try:
        port = (await start_worker(WORKER_AMQP_URL=proxy.url)).port
        await wait_until(lambda: status_is(port, "/readyz", 200), timeout=10)
        before = [f"before {i}" for i in range(8)]
        for i, content in enumerate(before):
            await publish_event(broker, event(f"agent-{i % 4}", content))
        await wait_until(lambda: set(before) <= set(delivered_contents(simulator)))

        # When the network to the broker is cut, and events keep arriving meanwhile
        proxy.cut()
        await wait_until(lambda: status_is(port, "/readyz", 503), timeout=5)
        during = [f"during {i}" for i in range(8)]
        for i, content in enumerate(during):
            await publish_event(broker, event(f"agent-{i % 4}", content))
        await asyncio.sleep(0.5)
        assert await status_is(port, "/readyz", 503)

        # Then once the network is back the worker is ready again, with a consumer per partition
        proxy.restore()
        await wait_until(lambda: status_is(port, "/readyz", 200), timeout=15)
        with contextlib.suppress(AssertionError):
            await wait_until(_consumers_restored(broker), timeout=3)
        consumers = await broker.work_consumers()
        assert consumers >= broker.partitions, f"{consumers} consumer(s) after the reconnect"

        # And every event, before, during and after the cut, reached Connect or a dead letter
        after = [f"after {i}" for i in range(8)]
        for i, content in enumerate(after):
            await publish_event(broker, event(f"agent-{i % 4}", content))
        everything = set(before + during + after)

        dead_lettered: set[str] = set()

        async def all_settled() -> bool:
            dead_lettered.update(await dead_lettered_contents(broker))
            settled = set(delivered_contents(simulator)) | dead_lettered
            return everything <= settled and await broker.work_count() == 0

        await wait_until(all_settled, timeout=10)
        assert await status_is(port, "/readyz", 200)
    finally:
        await proxy.stop()


async def test_log_lines_stay_json_when_the_broker_connection_is_lost(
    broker: Broker, start_worker: StartWorker
) -> None:
    # Given a worker connected through a proxy
    proxy = TcpProxy()
    await proxy.start()
    try:
        worker = await start_worker(WORKER_AMQP_URL=proxy.url)
        port = worker.port
        logged_before_cut = len(worker.log_lines())

        # When the network to the broker is cut for a moment
        proxy.cut()
        await wait_until(lambda: status_is(port, "/readyz", 503), timeout=5)
        await wait_until(lambda: _logged_the_loss(worker.log_lines()[logged_before_cut:]))
    finally:
        await proxy.stop()

    # Then what it logged about that is still one JSON object per line, without the password
    lines = worker.log_lines()
    assert not [line for line in lines if "guest:guest@" in line]
    assert [line for line in lines if not _is_json_object(line)] == []


def _consumers_restored(broker: Broker) -> Callable[[], Awaitable[bool]]:
    """Return a predicate: every partition has its consumer again."""

    async def restored() -> bool:
        return await broker.work_consumers() >= broker.partitions

    return restored


def _logged_the_loss(lines: list[str]) -> bool:
    """Return True once a line speaks of the connection (aiormq's and aio-pika's say so)."""
    return any("connection" in line.lower() for line in lines)


def _is_json_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


# --- 2. SIGTERM mid-backlog -----------------------------------------------------------------


async def test_sigterm_mid_backlog_exits_within_grace_and_acks_only_what_was_delivered(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a slow Connect (200 ms a call) and one conversation's backlog, more than the worker
    # can send within its 2 s grace period (its 32 prefetched events take 6 s in order)
    simulator.config.latency_ms = 200
    published = [f"backlog {i}" for i in range(40)]
    for content in published:
        await publish_event(broker, event("agent-1", content))
    grace = 2.0
    worker = await start_worker(
        WORKER_SHUTDOWN_GRACE_SECONDS=str(grace), WORKER_PREFETCH=str(32 * broker.partitions)
    )
    await wait_until(lambda: len(simulator.received) >= 3)

    # When it is told to stop in the middle of the backlog
    signalled_at = time.monotonic()
    worker.signal(signal.SIGTERM)
    code = await worker.wait(timeout=grace + 10)
    took = time.monotonic() - signalled_at

    # Then it exits 0 within the grace period plus a little for closing
    assert code == 0
    assert took < grace + 3, f"took {took:.1f}s to exit"

    # And every event that left the queue was delivered: none acked unsent, none lost, and
    # what is left waits in publish order
    # A call cut off at exit may still be answered by the simulator: wait for every answer
    await wait_until(lambda: len(simulator.calls) == simulator.arrived, timeout=5)
    delivered = delivered_contents(simulator)
    queued = await queued_contents(broker)
    assert len(delivered) == len(set(delivered)), "an event was delivered twice"
    assert set(published) - set(queued) <= set(delivered), "acked without being delivered"
    assert queued == [content for content in published if content in set(queued)]
    assert 0 < len(queued) < len(published)
    for variant in ErrorVariant:
        assert await broker.dead_letter_count(variant) == 0


async def test_sigterm_does_not_hand_back_an_event_whose_call_is_on_the_wire(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a Connect that takes 3 s to answer, a backlog, and a worker with a 1 s grace period
    simulator.config.latency_ms = 3000
    published = [f"backlog {i}" for i in range(5)]
    for content in published:
        await publish_event(broker, event("agent-1", content))
    worker = await start_worker(WORKER_SHUTDOWN_GRACE_SECONDS="1")
    await wait_until(lambda: simulator.arrived >= 1, timeout=10)  # the first call is on its way

    # When it is told to stop while that call waits for its answer
    worker.signal(signal.SIGTERM)
    assert await worker.wait(timeout=10) == 0
    await wait_until(lambda: len(simulator.received) >= 1, timeout=5)

    # Then the event Connect accepted is not also back in the queue (it would be sent twice)
    delivered = delivered_contents(simulator)
    queued = await queued_contents(broker)
    assert delivered == ["backlog 0"]
    assert set(delivered).isdisjoint(queued), (
        f"delivered and requeued: {set(delivered) & set(queued)}"
    )
    assert len(delivered) + len(queued) == len(published)


# --- 3. Redrive round trip ------------------------------------------------------------------


async def test_redriven_dead_letters_are_delivered_and_a_second_failure_counts_the_redrive(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given five events that Connect refuses once each with InvalidRequestException
    invalid = ErrorVariant.INVALID_REQUEST.value
    not_found = ErrorVariant.RESOURCE_NOT_FOUND.value
    await control(
        simulator,
        "rules",
        {"match": {"DestinationId": "flaky"}, "code": "InvalidRequestException", "times": 5},
    )
    await start_worker()
    originals = [event("flaky", f"flaky {i}") for i in range(5)]
    ids = [
        await publish_event(broker, body, correlation_id=f"c-{i}")
        for i, body in enumerate(originals)
    ]
    await wait_until(lambda: _count(broker, invalid, 5))
    assert simulator.received == []

    # When an operator asks what a redrive would move
    code, output, _ = await run_dlq(broker.base, "redrive", "--dry-run")

    # Then it says so and moves nothing
    assert code == 0, output
    assert "would redrive 5 of 5" in output
    await asyncio.sleep(0.5)
    assert await broker.dead_letter_count(invalid) == 5
    assert simulator.received == []

    # When one of them will fail once more (ResourceNotFound), and the operator redrives
    await control(
        simulator,
        "rules",
        {"match": {"Event": originals[2]["Event"]}, "code": not_found, "times": 1},
    )
    code, output, _ = await run_dlq(broker.base, "redrive")

    # Then the other four reach Connect with their original bodies, and the InvalidRequest
    # dead-letter queue is empty
    assert code == 0, output
    await wait_until(lambda: len(simulator.received) == 4)
    await wait_until(lambda: _count(broker, not_found, 1))
    assert [call["body"] for call in simulator.received] == [
        body for i, body in enumerate(originals) if i != 2
    ]
    assert await broker.dead_letter_count(invalid) == 0

    # And the second dead letter is the original byte for byte, counting one redrive
    [letter] = await broker.take_dead_letters(not_found)
    assert letter.body == encode(originals[2])
    assert letter.message_id == ids[2]
    assert letter.correlation_id == "c-2"
    assert letter.headers["x-redrive-count"] == "1"
    assert letter.headers["x-error-variant"] == not_found
    assert await broker.work_count() == 0


# --- 4. Logs --------------------------------------------------------------------------------


async def test_every_log_line_is_json_with_ids_and_no_personal_data_or_secret(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a worker logging at DEBUG, which has already delivered (the account works)
    worker = await start_worker(WORKER_LOG_LEVEL="DEBUG")
    ids: dict[str, str] = {}
    ids[await publish_event(broker, event("agent-ok"))] = "delivered"
    await wait_until(lambda: len(simulator.received) == 1)

    # When real traffic of every outcome flows: each API error, a retry, malformed bodies
    await control(
        simulator,
        "rules",
        {"match": {"DestinationId": "retry-once"}, "code": "InternalServiceException", "times": 1},
    )
    ids[await publish_event(broker, event("retry-once"))] = "delivered"
    errors = {
        "AccessDeniedException": "AccessDeniedException",
        "InvalidRequestException": "InvalidRequestException",
        "ResourceNotFoundException": "ResourceNotFoundException",
        "ThrottlingException": "ThrottlingException",
        "InternalServiceException": "InternalServiceException",
        "TeapotException:418": "UnknownError",
    }
    for trigger, variant in errors.items():
        ids[await publish_event(broker, event(f"simulate:{trigger}"))] = variant
    malformed = [
        b"not json " + CONTENT.encode(),
        encode({"SourceId": PHONE, "Event": {"Type": "MESSAGE", "Content": CONTENT}}),
        encode(event(Extra=PHONE)),
    ]
    for body in malformed:
        ids[await broker.publish(body)] = "MalformedEvent"
    await wait_until(lambda: len(simulator.received) == 2)
    await wait_until(lambda: _count(broker, "MalformedEvent", len(malformed)))
    for variant in set(errors.values()):
        await wait_until(lambda v=variant: _count(broker, v, 1))
    worker.signal(signal.SIGTERM)
    assert await worker.wait(timeout=15) == 0

    # Then every line is a JSON object
    lines = worker.log_lines()
    assert lines
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"log line is not JSON: {line!r}")
    assert all(isinstance(record, dict) for record in records)

    # And no line holds the phone number, the content, the AWS secret or the AMQP password
    secret = worker_environment(broker, simulator)["AWS_SECRET_ACCESS_KEY"]
    for line in lines:
        assert PHONE not in line
        assert PHONE.removeprefix("+") not in line
        assert CONTENT not in line
        assert "zebra-7781" not in line
        assert secret not in line
        assert "guest:guest@" not in line

    # And each event is traceable by its message_id; each dead letter names its variant
    logged_ids = {record.get("message_id") for record in records}
    assert set(ids) <= logged_ids, set(ids) - logged_ids
    dead = [record for record in records if record.get("event") == "event.dead_lettered"]
    assert {record["message_id"]: record.get("variant") for record in dead} == {
        message_id: outcome for message_id, outcome in ids.items() if outcome != "delivered"
    }
    assert any(record.get("event") == "event.retrying" for record in records)


# --- 5. Metrics -----------------------------------------------------------------------------


async def test_metrics_count_each_outcome(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a worker with its HTTP endpoints on a known port
    port = (await start_worker()).port

    # When 10 events are delivered, 2 refused as invalid, 1 not found and 3 are malformed
    for i in range(10):
        await publish_event(broker, event(f"agent-{i % 3}", f"good {i}"))
    for i in range(2):
        await publish_event(broker, event("simulate:InvalidRequestException", f"bad {i}"))
    await publish_event(broker, event("simulate:ResourceNotFoundException"))
    for body in (b"{", b"[]", encode({"SourceId": PHONE})):
        await broker.publish(body)
    total = 16

    async def settled() -> bool:
        samples = await scrape(port)
        done = value(samples, "chat_worker_delivered_total") + sum(
            by_label(samples, "chat_worker_dead_lettered_total", "variant").values()
        )
        ready = value(samples, "chat_worker_ready")
        return done == total and ready == 1

    await wait_until(settled, timeout=15, every=0.2)

    # Then the counters say exactly that
    samples = await scrape(port)
    assert value(samples, "chat_worker_consumed_total") == total
    assert value(samples, "chat_worker_delivered_total") == 10
    expected_dead = {variant.value: 0.0 for variant in ErrorVariant}
    expected_dead |= {
        "InvalidRequestException": 2,
        "ResourceNotFoundException": 1,
        "MalformedEvent": 3,
    }
    assert by_label(samples, "chat_worker_dead_lettered_total", "variant") == expected_dead
    api_calls = by_label(samples, "chat_worker_api_calls_total", "outcome")
    assert api_calls["InvalidRequestException"] == 2
    assert api_calls["ResourceNotFoundException"] == 1
    assert sum(api_calls.values()) == 13  # the accepted ones: see the test below
    assert value(samples, "chat_worker_api_latency_seconds_count") == 13
    assert sum(by_label(samples, "chat_worker_retries_total", "reason").values()) == 0
    assert value(samples, "chat_worker_ready") == 1
    assert value(samples, "chat_worker_in_flight") == 0
    assert len(simulator.calls) == 13
    assert await broker.work_count() == 0


async def test_metrics_count_accepted_api_calls_as_ok(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a worker with its HTTP endpoints on a known port
    port = (await start_worker()).port

    # When Connect accepts three events
    for i in range(3):
        await publish_event(broker, event(f"agent-{i}", f"good {i}"))
    await wait_until(lambda: len(simulator.received) == 3)
    await wait_until(lambda: _metric_is(port, "chat_worker_delivered_total", 3))

    # Then the API calls are counted with outcome "ok", and nothing as "other"
    api_calls = by_label(await scrape(port), "chat_worker_api_calls_total", "outcome")
    assert api_calls["ok"] == 3
    assert api_calls.get("other", 0) == 0


async def _metric_is(port: int, name: str, expected: float) -> bool:
    return value(await scrape(port), name) == expected


# --- 6. Health ------------------------------------------------------------------------------


async def test_healthz_is_ok_while_running(broker: Broker, start_worker: StartWorker) -> None:
    # Given a running worker
    worker = await start_worker()
    port = worker.port

    # When a probe asks whether it is alive
    status, text = await http_get(port, "/healthz")

    # Then it is, with a JSON body that says so; and /readyz agrees it consumes
    assert status == 200
    assert json.loads(text)["status"] == "ok"
    await wait_until(lambda: status_is(port, "/readyz", 200), timeout=5)
    assert worker.process.returncode is None


async def _count(broker: Broker, variant: str, expected: int) -> bool:
    return await broker.dead_letter_count(variant) >= expected
