"""One message's life: decode -> validate -> send (with retries) -> settle."""

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError
from tenacity import RetryCallState

from worker.connect_client import ConnectClient
from worker.dead_letter import FailureContext
from worker.errors import (
    ErrorVariant,
    EventFailure,
    MalformedEventError,
    PermanentApiError,
    TransientApiError,
)
from worker.models import API_FIELD_NAMES, ChatIntegrationEvent, conversation_key
from worker.observability import scrub, short_key
from worker.policy import RetryPolicy
from worker.settlement import Settler


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Attempts:
    """Count the API calls made for one message, and when the first one was."""

    count: int = 0
    first_at: datetime | None = None
    ambiguous: int = 0
    received_at: datetime = field(default_factory=_now)

    def record(self) -> None:
        """Note one more call."""
        self.count += 1
        if self.first_at is None:
            self.first_at = _now()


def malformed(code: str, message: str, errors: list[dict[str, Any]] | None = None) -> EventFailure:
    """Return the failure of a body that cannot become a request."""
    return MalformedEventError(
        ErrorVariant.MALFORMED, code, message, validation_errors=errors or []
    )


def decode(body: bytes, max_body_bytes: int) -> ChatIntegrationEvent:
    """Parse and validate a body; raise `MalformedEventError` saying what is wrong with it."""
    if len(body) > max_body_bytes:
        raise malformed("BodyTooLarge", f"body is {len(body)} bytes, limit {max_body_bytes}")
    try:
        return ChatIntegrationEvent.model_validate_json(body)
    except ValidationError as error:
        raise _classify(body, error) from None


def redact_location(location: tuple[int | str, ...]) -> list[int | str]:
    """Keep the API's field names and list indexes of an error location; hide map keys.

    Attribute keys are the producer's data and may hold personal data.
    """
    return [
        part if isinstance(part, int) or part in API_FIELD_NAMES else "<key>" for part in location
    ]


def _classify(body: bytes, error: ValidationError) -> EventFailure:
    """Name what kind of malformed body this is, without copying any input value."""
    details = [
        {"type": item["type"], "loc": redact_location(item["loc"]), "msg": item["msg"]}
        for item in error.errors(include_input=False, include_url=False, include_context=False)
    ]
    first = details[0]["type"] if details else ""
    if first == "json_invalid":
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as bad:
            return malformed("NotUtf8", f"body is not valid UTF-8 at byte {bad.start}", details)
        return malformed("NotJson", "body is not valid JSON", details)
    if first == "model_type":
        return malformed("NotAnObject", "body is JSON but not an object", details)
    return malformed("ValidationFailed", f"{len(details)} field(s) fail the request model", details)


class MessageHandler:
    """Carry each delivery through the pipeline to exactly one settlement."""

    def __init__(
        self,
        client: ConnectClient,
        policy: RetryPolicy,
        settler: Settler,
        *,
        queue_name: str,
        worker_id: str,
        max_body_bytes: int,
        log: Any,
    ) -> None:
        self._client = client
        self._policy = policy
        self._settler = settler
        self._queue_name = queue_name
        self._worker_id = worker_id
        self._max_body_bytes = max_body_bytes
        self._log = log

    async def handle(self, message: AbstractIncomingMessage) -> None:
        """Deliver one message to Connect, or dead-letter it; then settle it."""
        attempts = Attempts()
        try:
            event = decode(message.body, self._max_body_bytes)
            await self.send(event, attempts, message)
        except EventFailure as failure:
            await self._settler.settle(message, failure, self._context(attempts))
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # a bug must cost one dead letter, not the worker
            self._log.exception("event.unexpected_error", message_id=message.message_id)
            bug = PermanentApiError(ErrorVariant.UNKNOWN, type(error).__name__, "worker error")
            await self._settler.settle(message, bug, self._context(attempts))
        else:
            await self._settler.settle(message)

    async def send(
        self, event: ChatIntegrationEvent, attempts: Attempts, message: AbstractIncomingMessage
    ) -> None:
        """Call Connect until it succeeds or the retry policy gives up (then raise)."""

        def log_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            self._log.info(
                "event.retrying",
                message_id=message.message_id,
                conversation=short_key(conversation_key(event)),
                attempt=state.attempt_number,
                error_code=getattr(error, "code", None),
                error=scrub(str(error)),
                sleep=round(state.upcoming_sleep, 3),
            )

        async for attempt in self._policy.retrying(before_sleep=log_retry):
            with attempt:
                attempts.record()
                try:
                    await self._client.send(event)
                except TransientApiError as failure:
                    attempts.ambiguous += failure.ambiguous
                    raise
        self._log.debug("event.delivered", message_id=message.message_id, attempts=attempts.count)

    def _context(self, attempts: Attempts) -> FailureContext:
        """Describe where and when a message failed, for its dead letter."""
        failed_at = _now()
        return FailureContext(
            attempts=attempts.count,
            ambiguous_attempts=attempts.ambiguous,
            first_attempt_at=attempts.first_at or failed_at,
            failed_at=failed_at,
            queue=self._queue_name,
            worker_id=self._worker_id,
        )
