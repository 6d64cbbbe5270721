"""What a 2xx answer from Connect says: the contact, a new chat, and whether it looks like Connect.

A 2xx is delivery, whatever its body: Connect (or whatever answered) took the event. botocore
parses the body into the output shape and raises on one that is no JSON object (`[1,2,3]`,
`null`, a bare string: an AttributeError, not a ClientError), which would dead-letter an event
that arrived. `tolerate_odd_bodies`, a before-parse hook, hands botocore an empty object
instead and notes what the body was, so that the answer reads as `Accepted` with `odd_body` set.
Whether such answers mean a wrong endpoint is the guard's judgement, not this module's.
"""

import json
from dataclasses import dataclass
from typing import Any

BEFORE_PARSE = "before-parse.connect.SendChatIntegrationEvent"
"""The botocore event the hook is registered for."""

_ODD_BODY = "WorkerOddBody"
"""The key under which the hook leaves its note in botocore's parsed response."""

_JSON_KINDS: dict[type, str] = {list: "list", str: "string", bool: "boolean", int: "number"}


@dataclass(frozen=True)
class Accepted:
    """A 2xx answer: the event is delivered; what could be read of the answer."""

    request_id: str | None
    """The `x-amzn-RequestId` header: every answer from Connect has one."""
    contact_id: str | None = None
    """`InitialContactId`: the chat contact the event went to (absent for some DISCONNECTs)."""
    new_chat: bool | None = None
    """`NewChatCreated`: the event opened a new chat."""
    odd_body: str | None = None
    """What the body was instead of the output shape (e.g. "list", "null"); None if it was it."""


def body_kind(body: bytes) -> str | None:
    """Return what a 2xx body is when it is not a JSON object; None when it is one."""
    if not body.strip():
        return "empty"
    try:
        value = json.loads(body)
    except ValueError:  # not UTF-8 either: UnicodeDecodeError is a ValueError
        return "not JSON"
    if isinstance(value, dict):
        return None
    if value is None:
        return "null"
    return _JSON_KINDS.get(type(value), "number")


def tolerate_odd_bodies(
    response_dict: dict[str, Any], customized_response_dict: dict[str, Any], **_: Any
) -> None:
    """Let botocore parse a 2xx whose body is no JSON object, noting what the body was."""
    if not 200 <= response_dict.get("status_code", 0) < 300:
        return
    kind = body_kind(response_dict.get("body") or b"")
    if kind is not None:
        response_dict["body"] = b"{}"  # what botocore can parse; the note says what came
        customized_response_dict[_ODD_BODY] = kind


def read_accepted(response: dict[str, Any]) -> Accepted:
    """Read a parsed 2xx answer; fields of the wrong type make it an odd body too."""
    request_id = response.get("ResponseMetadata", {}).get("RequestId") or None
    odd = response.get(_ODD_BODY)
    contact_id = response.get("InitialContactId")
    new_chat = response.get("NewChatCreated")
    if odd is None and not (
        isinstance(contact_id, str | None) and isinstance(new_chat, bool | None)
    ):
        odd = "object of other fields"
    if odd is not None:
        return Accepted(request_id, odd_body=str(odd))
    return Accepted(request_id, contact_id, new_chat)
