"""`chat-worker dlq` against the real RabbitMQ: list, show, redrive and purge dead letters."""

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from tests.integration.support import (
    AMQP_URL,
    Broker,
    chat_event,
    encode,
    run_command,
    run_dlq,
    take_ready,
)
from worker.models import conversation_key
from worker.pipeline.envelope import FailureContext, build_dead_letter, iso_utc
from worker.pipeline.errors import ErrorVariant, EventFailure
from worker.problems import ExitCode
from worker.topology import (
    dead_letter_exchange_name,
    dead_letter_queue_name,
    input_exchange_name,
)

pytestmark = pytest.mark.integration

PHONE = "+15557654321"
CONTENT = "my card number is 4111 1111"
THROTTLED = ErrorVariant.THROTTLING.value
UNKNOWN = ErrorVariant.UNKNOWN.value
INVALID = ErrorVariant.INVALID_REQUEST.value


def event_body(number: int) -> bytes:
    """Return a realistic event body holding personal data."""
    return encode(chat_event(PHONE, f"destination-{number}", CONTENT))


@dataclass
class DeadLetters:
    """A test's topology: puts dead letters in, counts them, catches what is redriven."""

    broker: Broker
    caught: AbstractQueue

    @property
    def base(self) -> str:
        """Return the topology's base name."""
        return self.broker.base

    async def put(
        self, variant: str, number: int = 0, age: timedelta = timedelta(minutes=5), **extra: Any
    ) -> aio_pika.Message:
        """Dead-letter an event the way the worker does, failed `age` ago; return it."""
        body = event_body(number)
        failed = datetime.now(UTC) - age
        headers: dict[str, Any] = {
            "app-header": "kept",
            "x-error-variant": variant,
            "x-error-code": variant,
            "x-error-message": f"refused for {PHONE}",
            "x-attempts": "1",
            "x-failed-at": iso_utc(failed),
            "x-original-exchange": self.base,
            "x-original-routing-key": conversation_key(json.loads(body)),
        }
        headers.update(extra)
        message = aio_pika.Message(
            body=body,
            headers=headers,
            message_id=f"m-{number}",
            correlation_id=f"c-{number}",
            timestamp=failed.replace(microsecond=0),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await self.publish_dead_letter(variant, message)
        return message

    async def publish_dead_letter(self, variant: str, message: aio_pika.Message) -> None:
        """Publish a dead letter to the dead-letter exchange, confirmed."""
        exchange = await self.broker.channel.get_exchange(dead_letter_exchange_name(self.base))
        await exchange.publish(message, routing_key=variant, mandatory=True)

    async def take_redriven(self) -> list[AbstractIncomingMessage]:
        """Remove and return what reached the input exchange."""
        return await take_ready(self.caught)


@pytest.fixture
async def dead_letters(broker: Broker) -> DeadLetters:
    """The test's topology, plus a queue that catches what reaches the input exchange."""
    # No worker runs: this queue sees what is redriven, with its routing key.
    caught = await broker.channel.declare_queue(exclusive=True, auto_delete=True)
    await caught.bind(input_exchange_name(broker.base))
    return DeadLetters(broker, caught)


async def test_list_counts_each_queue(dead_letters: DeadLetters) -> None:
    # Given two throttled dead letters, the first failed three hours ago, and one unknown error
    await dead_letters.put(THROTTLED, 1, age=timedelta(hours=3, minutes=2))
    await dead_letters.put(THROTTLED, 2, age=timedelta(hours=1))
    await dead_letters.put(UNKNOWN, 3, age=timedelta(seconds=30))

    # When the queues are listed, as JSON and as a table
    code, out, err = await run_dlq(dead_letters.base, "list", "--json")
    table_code, table, _ = await run_dlq(dead_letters.base, "list")

    # Then each queue has its count, and nothing was removed
    assert code == 0, err
    states = {state["variant"]: state for state in json.loads(out)}
    assert len(states) == len(ErrorVariant)
    assert states[THROTTLED]["messages"] == 2
    assert states[UNKNOWN]["messages"] == 1
    assert states[INVALID]["messages"] == 0 and states[INVALID]["exists"]
    assert table_code == 0
    header, *rows = table.splitlines()
    assert header.split() == ["VARIANT", "MESSAGES", "QUEUE"]
    throttled_row = next(row for row in rows if row.startswith(THROTTLED))
    assert throttled_row.split()[1] == "2"
    assert len({row.index(".dlq.") for row in rows}) == 1  # aligned
    assert await dead_letters.broker.dead_letter_count(THROTTLED) == 2


async def test_show_masks_bodies_removes_nothing_and_keeps_order(
    dead_letters: DeadLetters,
) -> None:
    # Given three dead letters holding a phone number and message content
    for number in range(3):
        await dead_letters.put(INVALID, number)

    # When two of them are shown without --reveal
    code, out, err = await run_dlq(dead_letters.base, "show", "--variant", INVALID, "--limit", "2")

    # Then their properties and error headers show, but no personal data
    assert code == 0, err
    assert "3 message(s), showing 2" in out
    assert out.index("m-0") < out.index("m-1") and "m-2" not in out
    assert "c-0" in out and "x-error-code" in out and "x-original-routing-key" in out
    assert "DestinationId, Event{Content, ContentType, Type}, SourceId" in out
    assert PHONE not in out and "5557654321" not in out and CONTENT not in out
    # And all three are still there, in their order
    kept = await dead_letters.broker.take_dead_letters(INVALID)
    assert [message.message_id for message in kept] == ["m-0", "m-1", "m-2"]


async def test_show_escapes_terminal_control_sequences_from_ids_and_headers(
    dead_letters: DeadLetters,
) -> None:
    # Given a dead letter whose message_id and headers carry ANSI escape sequences (a colour,
    # a screen clear, a window title) and a line break
    message = await dead_letters.put(
        INVALID, 1, **{"x-error-message": "bad\x1b[2J\x1b[31mred", "evil\x1b]0;pwned\x07": "v\nw"}
    )
    message.message_id = "id\x1b[8mhidden"
    await dead_letters.publish_dead_letter(INVALID, message)

    # When it is shown, without and with --reveal
    for args in ((), ("--reveal",)):
        code, out, err = await run_dlq(dead_letters.base, "show", *args)

        # Then no control character reaches the terminal: each is printed escaped
        assert code == 0, err
        assert not any(char in out for char in "\x1b\x07\x9b"), repr(out)
        assert "id\\x1b[8mhidden" in out
        assert "bad\\x1b[2J\\x1b[31mred" in out
        assert "evil\\x1b]0;pwned\\x07" in out and "v\\nw" in out


async def test_show_reveal_prints_the_body(dead_letters: DeadLetters) -> None:
    await dead_letters.put(INVALID, 7)

    code, out, err = await run_dlq(dead_letters.base, "show", "--reveal")

    assert code == 0, err
    assert PHONE in out and CONTENT in out
    assert await dead_letters.broker.dead_letter_count(INVALID) == 1


async def test_redrive_all_keeps_body_properties_and_routing_key(
    dead_letters: DeadLetters,
) -> None:
    # Given dead letters of two variants
    originals = [
        await dead_letters.put(THROTTLED, 1),
        await dead_letters.put(THROTTLED, 2),
        await dead_letters.put(UNKNOWN, 3),
    ]

    # When all are redriven
    code, out, err = await run_dlq(dead_letters.base, "redrive")

    # Then each reached the input exchange as it was, with x-redrive-count "1"
    assert code == 0, err
    assert "redriven 3 dead letter(s)" in out
    redriven = await dead_letters.take_redriven()
    assert [message.message_id for message in redriven] == ["m-1", "m-2", "m-3"]
    for original, message in zip(originals, redriven, strict=True):
        assert message.body == original.body
        assert message.correlation_id == original.correlation_id
        assert message.timestamp == original.timestamp
        assert message.content_type == "application/json"
        assert message.routing_key == original.headers["x-original-routing-key"]
        assert message.headers["app-header"] == "kept"
        assert message.headers["x-redrive-count"] == "1"
    assert await dead_letters.broker.dead_letter_count(THROTTLED) == 0
    assert await dead_letters.broker.dead_letter_count(UNKNOWN) == 0


async def test_a_second_round_trip_counts_two_redrives(dead_letters: DeadLetters) -> None:
    # Given a dead letter redriven once, which the worker dead-letters again
    await dead_letters.put(THROTTLED, 1)
    assert (await run_dlq(dead_letters.base, "redrive"))[0] == 0
    [redriven] = await dead_letters.take_redriven()
    failure = EventFailure(ErrorVariant.THROTTLING, THROTTLED, "Rate exceeded", 429)
    now = datetime.now(UTC)
    context = FailureContext(3, 0, now, now, "work", "test-worker")
    await dead_letters.publish_dead_letter(THROTTLED, build_dead_letter(redriven, failure, context))

    # When it is redriven again
    code, _, err = await run_dlq(dead_letters.base, "redrive", "--variant", THROTTLED)

    # Then it counts two redrives and still has its conversation's routing key
    assert code == 0, err
    [again] = await dead_letters.take_redriven()
    assert again.headers["x-redrive-count"] == "2"
    assert again.routing_key == redriven.routing_key
    assert again.body == redriven.body


async def test_redrive_one_variant_within_a_limit(dead_letters: DeadLetters) -> None:
    for number in range(3):
        await dead_letters.put(THROTTLED, number)
    await dead_letters.put(UNKNOWN, 9)

    code, _, err = await run_dlq(
        dead_letters.base, "redrive", "--variant", THROTTLED, "--limit", "2"
    )

    assert code == 0, err
    assert [m.message_id for m in await dead_letters.take_redriven()] == ["m-0", "m-1"]
    assert [m.message_id for m in await dead_letters.broker.take_dead_letters(THROTTLED)] == ["m-2"]
    assert await dead_letters.broker.dead_letter_count(UNKNOWN) == 1


async def test_redrive_dry_run_moves_nothing(dead_letters: DeadLetters) -> None:
    await dead_letters.put(THROTTLED, 1)
    await dead_letters.put(UNKNOWN, 2)

    code, out, err = await run_dlq(dead_letters.base, "redrive", "--dry-run", "--limit", "1")

    assert code == 0, err
    assert f"would redrive 1 of 1 dead letter(s) from {dead_letters.base}.dlq.{THROTTLED}" in out
    assert UNKNOWN not in out
    assert await dead_letters.take_redriven() == []
    assert (
        await dead_letters.broker.dead_letter_count(THROTTLED) == 1
        and await dead_letters.broker.dead_letter_count(UNKNOWN) == 1
    )


async def test_redrive_with_nothing_to_move_exits_1(dead_letters: DeadLetters) -> None:
    code, out, _ = await run_dlq(dead_letters.base, "redrive")

    assert code == 1
    assert "nothing to redrive" in out


async def test_long_redrive_shows_progress(dead_letters: DeadLetters) -> None:
    for number in range(120):
        await dead_letters.put(UNKNOWN, number)

    code, _, err = await run_dlq(dead_letters.base, "redrive")

    assert code == 0, err
    assert "\r redriven 120/120" in err
    assert len(await dead_letters.take_redriven()) == 120


async def test_purge_refuses_without_yes_then_purges(dead_letters: DeadLetters) -> None:
    # Given dead letters in two queues
    await dead_letters.put(THROTTLED, 1)
    await dead_letters.put(UNKNOWN, 2)

    # When purge runs without --yes, it says what it would purge and refuses
    code, out, err = await run_dlq(dead_letters.base, "purge")
    assert code == 1
    assert f"would purge 1 dead letter(s) from {dead_letters.base}.dlq.{THROTTLED}" in out
    assert "--yes" in err
    assert await dead_letters.broker.dead_letter_count(THROTTLED) == 1

    # When it runs with --yes, every dead-letter queue is empty
    code, out, err = await run_dlq(dead_letters.base, "purge", "--yes")
    assert code == 0, err
    assert "purged 2 dead letter(s)" in out
    assert (
        await dead_letters.broker.dead_letter_count(THROTTLED) == 0
        and await dead_letters.broker.dead_letter_count(UNKNOWN) == 0
    )


async def test_purge_older_than_removes_every_old_one(dead_letters: DeadLetters) -> None:
    # Given dead letters that failed 10 and 8 days ago, then 1 day ago, then (out of order) 9
    for number, days in enumerate([10, 8, 1, 9]):
        await dead_letters.put(THROTTLED, number, age=timedelta(days=days))
    await dead_letters.put(UNKNOWN, 5, age=timedelta(days=30))

    # When dead letters older than a week are purged (no --yes: this is the retention job)
    code, out, err = await run_dlq(dead_letters.base, "purge", "--older-than", "7d")

    # Then every old one goes, the out-of-order one too, and the younger one stays
    assert code == 0, err
    assert "removed 4 dead letter(s)" in out
    assert [m.message_id for m in await dead_letters.broker.take_dead_letters(THROTTLED)] == ["m-2"]
    assert await dead_letters.broker.dead_letter_count(UNKNOWN) == 0


@pytest.mark.parametrize(
    "args",
    [
        ("purge", "--older-than", "7w"),
        ("show", "--variant", "NoSuchVariant"),
        ("redrive", "--limit", "0"),
    ],
)
async def test_usage_errors_exit_2(args: tuple[str, ...]) -> None:
    code, _, err = await run_dlq("test-dlq-unused", *args)

    assert code == 2
    assert "usage:" in err


async def test_redrive_refused_by_the_broker_keeps_the_dead_letter() -> None:
    # Given an input exchange with no queue behind it, and one dead letter
    base = f"test-dlq-{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_exchange(base, aio_pika.ExchangeType.FANOUT, auto_delete=False)
        queue = await channel.declare_queue(dead_letter_queue_name(base, UNKNOWN), durable=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b"{}", message_id="kept"), routing_key=queue.name
        )
        try:
            # When it is redriven, the unroutable copy comes back
            code, _, err = await run_dlq(base, "redrive", "--variant", UNKNOWN)

            # Then the command stops with a clear message and the dead letter stays
            assert code == 1
            assert "returned" in err and "stopped after 0" in err
            assert [m.message_id for m in await take_ready(queue)] == ["kept"]
        finally:
            await channel.queue_delete(queue.name)
            await channel.exchange_delete(base)


async def test_unreachable_broker_exits_69_without_the_password() -> None:
    done = await run_command("dlq", "list", "--amqp-url", "amqp://guest:S3cretPw@127.0.0.1:1/")

    assert done.code == ExitCode.BROKER_UNAVAILABLE
    assert "cannot connect to the broker at amqp://guest:***@127.0.0.1:1/" in done.output
    assert "S3cretPw" not in done.output
