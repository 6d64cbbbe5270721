"""Hand-backs are basic.nack, never basic.reject (RabbitMQ 4.3 counts only reject's returns).

The messages are aio-pika's own `IncomingMessage`, on a channel that records the AMQP methods
they send, so that what reaches the broker is what is checked.
"""

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any

import aio_pika
import structlog
from aiormq.abc import DeliveredMessage
from pamqp import commands
from pamqp.header import ContentHeader

from worker.pipeline.envelope import FailureContext
from worker.pipeline.errors import ErrorVariant, PermanentApiError
from worker.pipeline.inflight import InFlight
from worker.pipeline.settlement import Failed, Settler, Unsent


class RecordingChannel:
    """The AMQP methods a message sends, by name."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.connection = SimpleNamespace(basic_nack=True)
        self.is_closed = False

    async def basic_nack(self, **arguments: Any) -> None:
        self.sent.append(("basic.nack", arguments))

    async def basic_reject(self, *args: Any, **arguments: Any) -> None:
        self.sent.append(("basic.reject", arguments))

    async def basic_ack(self, *args: Any, **arguments: Any) -> None:
        self.sent.append(("basic.ack", arguments))


class RefusingExchange:
    """A dead-letter exchange whose publishes fail, as on a broken route."""

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        raise ConnectionError("no route")


def delivery(channel: RecordingChannel) -> aio_pika.IncomingMessage:
    """Return a delivery of tag 7 on the recording channel."""
    deliver = commands.Basic.Deliver(consumer_tag="c", delivery_tag=7, routing_key="k")
    raw = DeliveredMessage(
        deliver, ContentHeader(properties=commands.Basic.Properties()), b"{}", channel
    )  # type: ignore[arg-type]
    return aio_pika.IncomingMessage(raw)


def settler(inflight: InFlight | None = None) -> Settler:
    """Return a settler whose dead-letter publishes fail."""
    return Settler(
        RefusingExchange(),
        0.0,
        inflight if inflight is not None else InFlight(),
        structlog.get_logger(),
    )  # type: ignore[arg-type]


async def test_an_unsent_event_goes_back_by_nack_with_requeue() -> None:
    channel = RecordingChannel()

    await settler().settle(delivery(channel), Unsent("stopping"))

    assert channel.sent == [("basic.nack", {"delivery_tag": 7, "multiple": False, "requeue": True})]


async def test_a_dead_letter_that_cannot_be_published_goes_back_by_nack() -> None:
    channel = RecordingChannel()
    now = datetime.now(UTC)
    failure = PermanentApiError(ErrorVariant.INVALID_REQUEST, "InvalidRequestException")

    await settler().settle(
        delivery(channel),
        Failed(failure, FailureContext(1, 0, now, now, queue="q.work.0", worker_id="w")),
    )

    assert [name for name, _ in channel.sent] == ["basic.nack"]


async def test_nothing_is_sent_while_the_channel_returns_everything() -> None:
    channel = RecordingChannel()
    inflight = InFlight()
    inflight.returning_all = True

    await settler(inflight).settle(delivery(channel), Unsent("stopping"))

    assert channel.sent == []
