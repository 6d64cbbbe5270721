"""Publish events the way a producer should: conversation key as routing key, with confirms."""

import json
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime

import aio_pika
from aio_pika.abc import AbstractExchange

from worker.broker import connect_plain, explained
from worker.models import conversation_key
from worker.settings import WorkerSettings
from worker.topology import declare_topology

UNKEYED = "unkeyed"


def routing_key_for(body: bytes) -> str:
    """Return the conversation key of a body, or a fixed key when it has none to give."""
    try:
        event = json.loads(body)
        return conversation_key(event)
    except (ValueError, TypeError, KeyError, AttributeError):
        return UNKEYED


def event_message(body: bytes, message_id: str | None = None) -> aio_pika.Message:
    """Wrap a body as a persistent message with an id and a timestamp."""
    return aio_pika.Message(
        body=body,
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id or str(uuid.uuid4()),
        timestamp=datetime.now(UTC),
    )


async def publish_bodies(exchange: AbstractExchange, bodies: Iterable[bytes]) -> int:
    """Publish each body, waiting for the broker's confirm (and refusal if unroutable)."""
    count = 0
    for body in bodies:
        await exchange.publish(
            event_message(body), routing_key=routing_key_for(body), mandatory=True
        )
        count += 1
    return count


async def publish_file_lines(settings: WorkerSettings, lines: Iterable[bytes]) -> int:
    """Declare the topology, then publish every non-blank line as one event."""
    connection = await connect_plain(settings)
    async with connection:
        with explained(settings):
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            topology = await declare_topology(channel, settings.queue, settings.partitions)
        bodies = (line.rstrip(b"\r\n") for line in lines if line.strip())
        return await publish_bodies(topology.input_exchange, bodies)
