"""Publish events the way a producer should: conversation key as routing key, with confirms."""

import json
import sys
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import aio_pika
from aio_pika.abc import AbstractExchange

from worker.broker import connect_plain, explained
from worker.models import conversation_key
from worker.pipeline.decoding import decode
from worker.pipeline.errors import EventFailure
from worker.problems import ExitCode, Problem
from worker.settings import WorkerSettings
from worker.topology import declare_topology

UNKEYED = "unkeyed"
SHOWN_FIELD_ERRORS = 3


def read_input(file: str) -> bytes:
    """Return the bytes of a file of JSON lines (`-`: standard input), or raise a `Problem`."""
    if file == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(file).read_bytes()
    except FileNotFoundError:
        raise Problem(f"no such file: {file}", ExitCode.NO_INPUT) from None
    except IsADirectoryError:
        line = f"{file} is a directory, not a file of JSON lines"
        raise Problem(line, ExitCode.NO_INPUT) from None
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise Problem(f"cannot read {file}: {reason}", ExitCode.NO_INPUT) from None


def event_bodies(
    lines: Iterable[bytes], max_body_bytes: int, *, allow_malformed: bool, source: str
) -> list[bytes]:
    """Return the non-blank lines as bodies; raise a `Problem` naming the first bad line.

    Every line is checked before anything is published, so a typo does not leave half a file
    published. A bad line is one the worker would dead-letter as MalformedEvent; with
    `allow_malformed` such lines are published as they are, to see them dead-lettered.
    """
    bodies = []
    for number, line in enumerate(lines, start=1):
        body = line.rstrip(b"\r\n")
        if not body.strip():
            continue
        why = None if allow_malformed else malformed_reason(body, max_body_bytes)
        if why is not None:
            raise Problem(
                f"{source} line {number}: {why}; nothing was published "
                "(--allow-malformed publishes such lines, for the worker to dead-letter)",
                ExitCode.DATA,
            )
        bodies.append(body)
    return bodies


def malformed_reason(body: bytes, max_body_bytes: int) -> str | None:
    """Say why the worker would dead-letter a body as MalformedEvent, or None if it would not.

    Field errors name the field, never its value: the line may hold personal data.
    """
    try:
        decode(body, max_body_bytes)
    except EventFailure as failure:
        errors = failure.validation_errors
        if failure.code == "NotJson" and errors:
            # pydantic counts lines within the body, which is always one line here.
            why = str(errors[0]["msg"]).removeprefix("Invalid JSON: ")
            return "not valid JSON: " + why.replace(" at line 1 column ", " at column ")
        if failure.code == "ValidationFailed":
            fields = [
                f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
                for error in errors[:SHOWN_FIELD_ERRORS]
            ]
            more = len(errors) - SHOWN_FIELD_ERRORS
            tail = f" (and {more} more)" if more > 0 else ""
            return "not a valid event: " + "; ".join(fields) + tail
        return failure.message.removeprefix("body is ")
    return None


def routing_key_for(body: bytes) -> str:
    """Return the conversation key of a body, or a fixed key when it has none to give."""
    try:
        event = json.loads(body)
        return conversation_key(event)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
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
