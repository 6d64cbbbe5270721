"""The spine end to end: real worker process, real RabbitMQ, the simulator over HTTP."""

import asyncio
import json
import signal
from datetime import UTC, datetime

import pytest

from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, chat_event, encode, wait_until
from worker.models import conversation_key
from worker.pipeline.errors import ErrorVariant
from worker.testing.simulator import ConnectSimulator
from worker.topology import dead_letter_queue_name

pytestmark = pytest.mark.integration

PHONE = "+15551234567"
CONTENT = "my secret appointment is at 3pm"


def event(destination: str = "agent-1", content: str = CONTENT, **fields: object) -> dict:
    """Return a valid MESSAGE event."""
    return chat_event(PHONE, destination, content, **fields)


async def test_good_events_reach_connect_once_and_are_acked(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given 40 events over 4 conversations, already waiting when the worker starts
    bodies = [encode(event(f"agent-{i % 4}", f"message {i}")) for i in range(40)]
    for body in bodies:
        await broker.publish(body, routing_key=conversation_key(json.loads(body)))
    worker = await start_worker()

    # When the worker has sent them all and stops
    await wait_until(lambda: len(simulator.received) >= 40)
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0

    # Then each reached Connect exactly once and nothing went back to the queue unacked
    contents = sorted(call["body"]["Event"]["Content"] for call in simulator.received)
    assert contents == sorted(f"message {i}" for i in range(40))
    assert len(simulator.calls) == 40
    assert await broker.work_count() == 0
    for variant in ErrorVariant:
        assert await broker.dead_letter_count(variant) == 0


MODELLED = [
    ("AccessDeniedException", 403, 1),
    ("InvalidRequestException", 400, 1),
    ("ResourceNotFoundException", 404, 1),
    ("ThrottlingException", 429, 3),
    ("InternalServiceException", 500, 3),
]


async def test_each_api_error_lands_in_its_dead_letter_queue_with_headers(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a worker that has already delivered an event (the account is known to work)
    await start_worker()
    await broker.publish(encode(event("agent-ok")))
    await wait_until(lambda: len(simulator.received) == 1)

    # Given one event per modelled error, and one answered with an unmodelled code
    cases = [(code, status, attempts, code) for code, status, attempts in MODELLED]
    cases.append(("TeapotException", 418, 1, "UnknownError"))
    published = {}
    stamp = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    for code, status, _, variant in cases:
        destination = f"simulate:{code}:{status}"
        body = encode(event(destination))
        key = conversation_key(json.loads(body))
        message_id = await broker.publish(
            body,
            routing_key=key,
            correlation_id=f"corr-{code}",
            timestamp=stamp,
            content_type="application/json",
            headers={"x-producer": "gateway-7"},
        )
        published[variant] = (body, key, message_id, code, status)

    # When the worker has processed them
    await wait_until(lambda: _all_dead_lettered(broker, list(published)))

    # Then each dead letter is the original body and properties, with the spec's headers
    for code, status, attempts, variant in cases:
        body, key, message_id, raw_code, _ = published[variant]
        [letter] = await broker.take_dead_letters(variant)
        assert letter.body == body
        assert letter.message_id == message_id
        assert letter.correlation_id == f"corr-{code}"
        assert letter.timestamp == stamp
        assert letter.content_type == "application/json"
        headers = letter.headers
        assert headers["x-producer"] == "gateway-7"
        assert headers["x-error-variant"] == variant
        assert headers["x-error-code"] == raw_code
        assert headers["x-http-status"] == str(status)
        assert headers["x-attempts"] == str(attempts)
        assert headers["x-aws-request-id"]
        assert f"Simulated {raw_code}" in headers["x-error-message"]
        assert headers["x-original-exchange"] == broker.base
        assert headers["x-original-routing-key"] == key
        assert headers["x-original-queue"] in broker.work_queues
        assert headers["x-worker-id"]
        for stamp_header in ("x-first-attempt-at", "x-failed-at"):
            assert datetime.fromisoformat(headers[stamp_header]).tzinfo is not None
        added = {n: v for n, v in headers.items() if n.startswith(("x-error", "x-original"))}
        assert all(isinstance(value, str) for value in added.values())
    invalid_reason = json.loads(published["InvalidRequestException"][0])  # body unchanged
    assert invalid_reason["DestinationId"].startswith("simulate:")

    # And permanent errors were called exactly once, retried ones up to their budget
    calls_by_code: dict[str, int] = {}
    for call in simulator.calls:
        calls_by_code[call["code"]] = calls_by_code.get(call["code"], 0) + 1
    assert calls_by_code == {None: 1} | {code: attempts for code, _, attempts, _ in cases}
    assert len(simulator.received) == 1
    assert await broker.work_count() == 0


async def test_invalid_request_reason_is_kept_as_json(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    await broker.publish(encode(event("simulate:InvalidRequestException")))
    await start_worker()
    await wait_until(lambda: broker.dead_letter_count("InvalidRequestException"))
    [letter] = await broker.take_dead_letters("InvalidRequestException")
    reason = json.loads(letter.headers["x-error-reason"])
    assert reason == {"AttachedFileInvalidRequestExceptionReason": "INVALID_FILE_SIZE"}


MALFORMED = {
    "NotJson": b"this is not json",
    "NotUtf8": b'{"SourceId":"\xff\xfe","DestinationId":"x"}',
    "NotAnObject": b'["SourceId", "+15551234567"]',
    "missing-field": encode({"SourceId": PHONE, "Event": {"Type": "DISCONNECT"}}),
    "bad-enum": encode({"SourceId": PHONE, "DestinationId": "a", "Event": {"Type": "HELLO"}}),
    "no-content": encode(
        {
            "SourceId": PHONE,
            "DestinationId": "a",
            "Event": {"Type": "MESSAGE", "ContentType": "text/plain"},
        }
    ),
    "extra-field": encode(event(Extra=CONTENT)),
    "BodyTooLarge": encode(event(content="x" * 5000)),
}


async def test_malformed_bodies_are_dead_lettered_unchanged_and_never_sent(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given bodies that are broken in every way the request model knows
    ids = {}
    for kind, body in MALFORMED.items():
        ids[await broker.publish(body)] = kind

    # When a worker with a 4 KiB body limit processes them
    await start_worker(WORKER_MAX_BODY_BYTES="4096")
    await wait_until(lambda: _count_is(broker, ErrorVariant.MALFORMED, len(MALFORMED)))

    # Then every one is in MalformedEvent, byte for byte, with no input copied into headers
    letters = await broker.take_dead_letters("MalformedEvent")
    assert {ids[letter.message_id] for letter in letters} == set(MALFORMED)
    for letter in letters:
        kind = ids[letter.message_id]
        assert letter.body == MALFORMED[kind]
        assert letter.headers["x-error-variant"] == "MalformedEvent"
        assert letter.headers["x-attempts"] == "0"
        if kind in {"NotJson", "NotUtf8", "NotAnObject", "BodyTooLarge"}:
            assert letter.headers["x-error-code"] == kind
        else:
            assert letter.headers["x-error-code"] == "ValidationFailed"
            assert json.loads(letter.headers["x-validation-errors"])
        header_text = json.dumps({k: str(v) for k, v in letter.headers.items()})
        assert PHONE not in header_text
        assert CONTENT not in header_text
    assert simulator.calls == []


async def test_unroutable_dead_letter_keeps_the_original(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a running worker whose InvalidRequestException dead-letter queue was deleted
    await start_worker()
    dead_letter_queue = dead_letter_queue_name(broker.base, "InvalidRequestException")
    await broker.channel.queue_delete(dead_letter_queue)

    # When an event fails and its dead letter cannot be routed, again and again
    await broker.publish(encode(event("simulate:InvalidRequestException")))
    await wait_until(lambda: len(simulator.calls) >= 2)

    # Then the original is back in its queue each time, never acked; once the queue is
    # restored, the dead letter lands there and the work queue is empty
    exchange = await broker.channel.get_exchange(f"{broker.base}.dlx")
    restored = await broker.channel.declare_queue(
        dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await restored.bind(exchange, routing_key="InvalidRequestException")
    await wait_until(lambda: broker.dead_letter_count("InvalidRequestException"))
    assert await broker.dead_letter_count("InvalidRequestException") == 1
    await asyncio.sleep(0.5)
    assert await broker.work_count() == 0


async def test_sigterm_while_idle_exits_zero(broker: Broker, start_worker: StartWorker) -> None:
    worker = await start_worker()
    worker.signal(signal.SIGTERM)
    assert await worker.wait(timeout=15) == 0


async def test_sigterm_while_busy_exits_zero_and_loses_nothing(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a slow Connect (300 ms a call), a backlog, and a worker with a 1 s grace period
    simulator.config.latency_ms = 300
    for i in range(200):
        await broker.publish(encode(event(f"agent-{i}", f"m{i}")))
    worker = await start_worker(WORKER_SHUTDOWN_GRACE_SECONDS="1", WORKER_PREFETCH="20")
    await wait_until(lambda: len(simulator.calls) >= 10)

    # When it is told to stop in the middle of the backlog
    worker.signal(signal.SIGTERM)

    # Then it exits 0, and every event was either delivered or is back in the queue
    assert await worker.wait(timeout=15) == 0
    delivered = {call["body"]["Event"]["Content"] for call in simulator.received}
    left = await broker.work_count()
    assert len(delivered) == len(simulator.received)
    assert len(delivered) + left == 200, (len(delivered), left)
    assert 0 < left < 200


async def _all_dead_lettered(broker: Broker, variants: list[str]) -> bool:
    for variant in variants:
        if await broker.dead_letter_count(variant) < 1:
            return False
    return True


async def _count_is(broker: Broker, variant: ErrorVariant, expected: int) -> bool:
    return await broker.dead_letter_count(variant) >= expected
