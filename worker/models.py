"""The request model of SendChatIntegrationEvent and the conversation key.

Field names are the API's own (PascalCase) so that a producer's body is the request, unchanged.
The constraints mirror the Connect service model, so botocore's second validation can be off.
"""

import hashlib
import re
from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

# String types bounded like the API's; lengths count characters, as the API's do, not bytes.
Text100 = Annotated[str, StringConstraints(min_length=1, max_length=100)]
Text255 = Annotated[str, StringConstraints(min_length=1, max_length=255)]
Text256 = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Text350 = Annotated[str, StringConstraints(min_length=1, max_length=350)]
ContentText = Annotated[str, StringConstraints(min_length=1, max_length=16384)]
AttributeKey = Annotated[str, StringConstraints(min_length=1, max_length=32767)]
AttributeValue = Annotated[str, StringConstraints(min_length=0, max_length=32767)]

# The two rules the model states only in the documentation of NewSessionDetails.Attributes:
# "There can be up to 32,768 UTF-8 bytes across all key-value pairs per contact. Attribute keys
# can include only alphanumeric, dash, and underscore characters." (botocore's connect model)
ATTRIBUTES_MAX_BYTES = 32768
_ATTRIBUTE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class _ApiShape(BaseModel):
    """Share the strictness every API structure needs: unknown fields are rejected."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EventType(StrEnum):
    """Kinds of chat integration event that Connect accepts."""

    DISCONNECT = "DISCONNECT"
    """End the chat."""
    MESSAGE = "MESSAGE"
    """Carry a message; needs ContentType and Content."""
    EVENT = "EVENT"
    """Carry an event such as typing or read receipt; needs ContentType."""


class ChatEvent(_ApiShape):
    """The `Event` structure."""

    # Lax for this one field so that Python callers may pass "MESSAGE" as well as the enum.
    Type: Annotated[EventType, Field(strict=False)]
    ContentType: Text100 | None = None
    Content: ContentText | None = None

    @model_validator(mode="after")
    def _require_conditional_fields(self) -> "ChatEvent":
        """Enforce what the API documents but its model cannot: fields needed per Type."""
        if self.Type in (EventType.MESSAGE, EventType.EVENT) and self.ContentType is None:
            raise ValueError(f"ContentType is required when Type is {self.Type.value}")
        if self.Type is EventType.MESSAGE and self.Content is None:
            raise ValueError("Content is required when Type is MESSAGE")
        return self


class Participant(_ApiShape):
    """The `NewSessionDetails.ParticipantDetails` structure."""

    DisplayName: Text256


class Streaming(_ApiShape):
    """The `NewSessionDetails.StreamingConfiguration` structure."""

    StreamingEndpointArn: Text350


class SessionDetails(_ApiShape):
    """The `NewSessionDetails` structure, used when the event opens a chat."""

    SupportedMessagingContentTypes: list[Text100] | None = None
    ParticipantDetails: Participant | None = None
    Attributes: dict[AttributeKey, AttributeValue] | None = None
    StreamingConfiguration: Streaming | None = None

    @field_validator("Attributes")
    @classmethod
    def _follow_attribute_rules(cls, attributes: dict[str, str] | None) -> dict[str, str] | None:
        """Enforce the Attributes rules of the model's documentation, saying which failed.

        The message names no key or value: they are the producer's data.
        """
        if attributes is None:
            return None
        if not all(_ATTRIBUTE_KEY.fullmatch(key) for key in attributes):
            raise ValueError(
                "Attribute keys can include only alphanumeric, dash, and underscore characters "
                "(Connect API model, NewSessionDetails.Attributes)"
            )
        size = sum(len(key.encode()) + len(value.encode()) for key, value in attributes.items())
        if size > ATTRIBUTES_MAX_BYTES:
            raise ValueError(
                f"Attributes hold {size} UTF-8 bytes; there can be up to {ATTRIBUTES_MAX_BYTES} "
                "across all key-value pairs (Connect API model, NewSessionDetails.Attributes)"
            )
        return attributes


class ChatIntegrationEvent(_ApiShape):
    """One SendChatIntegrationEvent request, as producers publish it."""

    SourceId: Text255
    DestinationId: Text255
    Subtype: Text100 | None = None
    Event: ChatEvent
    NewSessionDetails: SessionDetails | None = None

    def to_request(self) -> dict[str, Any]:
        """Return the keyword arguments of the API call, leaving out absent fields."""
        return self.model_dump(mode="json", exclude_none=True)


def _field_names(model: type[BaseModel]) -> set[str]:
    """Collect the field names of a model and of the models nested in it."""
    names = set(model.model_fields)
    for info in model.model_fields.values():
        for candidate in (info.annotation, *getattr(info.annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                names |= _field_names(candidate)
    return names


API_FIELD_NAMES = frozenset(_field_names(ChatIntegrationEvent))
"""Every field name of the request; what error locations may show of a body."""


def conversation_key(event: ChatIntegrationEvent | Mapping[str, Any]) -> str:
    """Return the routing key of an event's conversation.

    SPEC §3 fixes it: the lowercase hex SHA-256 of SourceId, DestinationId and Subtype (or "")
    joined by NUL, so it fits AMQP's 255-byte limit and keeps phone numbers out of routing keys.
    """
    if isinstance(event, ChatIntegrationEvent):
        parts = (event.SourceId, event.DestinationId, event.Subtype or "")
    else:
        parts = (event["SourceId"], event["DestinationId"], event.get("Subtype") or "")
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()
