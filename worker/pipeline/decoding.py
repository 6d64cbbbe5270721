"""Decode a delivery's body into the request model, or say exactly why it is malformed.

Nothing of the input is copied into the failure: validation errors keep the API's field names
and list indexes, never values or map keys (attribute keys are the producer's data).
"""

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from worker.amqp_compat import UNDECODABLE_HEADER
from worker.models import API_FIELD_NAMES, ChatIntegrationEvent
from worker.pipeline.errors import ErrorVariant, EventFailure, MalformedEventError


def malformed(code: str, message: str, errors: list[dict[str, Any]] | None = None) -> EventFailure:
    """Return the failure of a body that cannot become a request."""
    return MalformedEventError(
        ErrorVariant.MALFORMED, code, message, validation_errors=errors or []
    )


def decode(
    body: bytes, max_body_bytes: int, headers: Mapping[str, Any] | None = None
) -> ChatIntegrationEvent:
    """Parse and validate a body; raise `MalformedEventError` saying what is wrong with it.

    A message whose properties the AMQP codec could not fully read (`amqp_compat` marks it)
    is malformed too: what it carries cannot be trusted, nor copied whole.
    """
    if headers and UNDECODABLE_HEADER in headers:
        raise malformed("UndecodableProperties", str(headers[UNDECODABLE_HEADER]))
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
