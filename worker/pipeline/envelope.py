"""The dead-letter envelope: the original body and properties, plus the error headers of SPEC §4.

Pure functions: nothing here talks to the broker.
"""

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, HeadersType

from worker.amqp_compat import encode_field_table as field_table
from worker.pipeline.errors import EventFailure

MAX_MESSAGE_BYTES = 1024
MAX_VALIDATION_ERRORS_BYTES = 4096
# Room left in the 128 KiB properties frame for the error headers and the other properties.
MAX_COPIED_HEADER_BYTES = 96 * 1024

# Headers a dead letter gets from its failure. A redriven dead letter that fails again must not
# keep the ones its new failure lacks, so all are dropped before the new ones are added.
# `x-delivery-count` is the work queue's own count, meaningless outside it.
REPLACED_HEADERS = frozenset(
    {
        "x-error-variant",
        "x-error-code",
        "x-error-message",
        "x-error-reason",
        "x-http-status",
        "x-aws-request-id",
        "x-attempts",
        "x-ambiguous-attempts",
        "x-first-attempt-at",
        "x-failed-at",
        "x-original-exchange",
        "x-original-routing-key",
        "x-original-queue",
        "x-worker-id",
        "x-validation-errors",
        "x-delivery-count",
    }
)


@dataclass(frozen=True)
class FailureContext:
    """Where and when an event failed, beyond the failure itself."""

    attempts: int
    ambiguous_attempts: int
    first_attempt_at: datetime
    failed_at: datetime
    queue: str
    worker_id: str


def iso_utc(moment: datetime) -> str:
    """Format a moment as ISO-8601 UTC with millisecond precision."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def truncate_utf8(text: str, limit: int) -> str:
    """Cut text to at most `limit` UTF-8 bytes without splitting a character."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    return encoded[:limit].decode("utf-8", errors="ignore")


def compact_json(value: Any) -> str:
    """Serialise as compact JSON, the form header values take."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def error_headers(failure: EventFailure, context: FailureContext) -> dict[str, str]:
    """Return the `x-error-*` and provenance headers that explain a failure."""
    headers = {
        "x-error-variant": failure.variant.value,
        "x-error-code": failure.code,
        "x-error-message": truncate_utf8(failure.message, MAX_MESSAGE_BYTES),
        "x-attempts": str(context.attempts),
        "x-ambiguous-attempts": str(context.ambiguous_attempts),
        "x-first-attempt-at": iso_utc(context.first_attempt_at),
        "x-failed-at": iso_utc(context.failed_at),
        "x-original-queue": context.queue,
        "x-worker-id": context.worker_id,
    }
    if failure.http_status is not None:
        headers["x-http-status"] = str(failure.http_status)
    if failure.request_id:
        headers["x-aws-request-id"] = failure.request_id
    if failure.reason is not None:
        headers["x-error-reason"] = compact_json(failure.reason)
    if failure.validation_errors:
        headers["x-validation-errors"] = bounded_errors_json(failure.validation_errors)
    return headers


def bounded_errors_json(errors: list[dict[str, Any]]) -> str:
    """Serialise as many leading errors as fit in 4 KiB, so the header always fits a frame."""
    kept = list(errors)
    text = compact_json(kept)
    while len(text.encode("utf-8")) > MAX_VALIDATION_ERRORS_BYTES and kept:
        kept = kept[: len(kept) // 2]
        text = compact_json(kept)
    return text


def build_dead_letter(
    message: AbstractIncomingMessage, failure: EventFailure, context: FailureContext
) -> aio_pika.Message:
    """Return the dead letter of a message: its body byte for byte, its properties, the headers."""
    headers: HeadersType = {
        name: value
        for name, value in (message.headers or {}).items()
        if name not in REPLACED_HEADERS
    }
    headers = fit_in_frame(headers)
    headers.update(error_headers(failure, context))
    headers["x-original-exchange"] = message.exchange or ""
    headers["x-original-routing-key"] = message.routing_key or ""
    return copy_message(message, headers)


def fit_in_frame(headers: HeadersType) -> HeadersType:
    """Drop the largest original headers until the rest leaves room for the error headers.

    All properties travel in one frame (128 KiB by default): a producer's headers that nearly
    fill it would make the dead letter too large, and the broker closes the connection of a
    client that sends an oversized frame. The names dropped are listed in `x-dropped-headers`.
    """
    if len(field_table(encodable(headers))) <= MAX_COPIED_HEADER_BYTES:
        return headers
    kept = dict(headers)
    dropped = []
    by_size = sorted(kept, key=lambda name: len(field_table(encodable({name: kept[name]}))))
    while by_size and len(field_table(encodable(kept))) > MAX_COPIED_HEADER_BYTES:
        name = by_size.pop()
        dropped.append(name)
        del kept[name]
    kept["x-dropped-headers"] = truncate_utf8(",".join(dropped), MAX_MESSAGE_BYTES)
    return kept


def encodable(value: Any) -> Any:
    """Return a header value that can be published again.

    pamqp decodes a long string that is not UTF-8 as bytes, but cannot encode bytes back; as a
    bytearray it goes out unchanged. Nested tables and arrays are walked.
    """
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, dict):
        return {key: encodable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [encodable(item) for item in value]
    return value


def copy_message(message: AbstractIncomingMessage, headers: HeadersType) -> aio_pika.Message:
    """Return a persistent copy of a message with other headers, body and properties kept.

    `user_id` and `expiration` are not copied: the broker would refuse a foreign user id, and
    a copy must not expire before an operator has seen it.
    """
    return aio_pika.Message(
        body=message.body,
        headers={name: encodable(value) for name, value in headers.items()},
        content_type=message.content_type,
        content_encoding=message.content_encoding,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        priority=message.priority,
        correlation_id=message.correlation_id,
        reply_to=message.reply_to,
        message_id=message.message_id,
        timestamp=message.timestamp,
        type=message.type,
        app_id=message.app_id,
    )
