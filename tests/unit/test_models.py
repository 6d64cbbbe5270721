"""The request model of SendChatIntegrationEvent (SPEC §2) and the conversation key (SPEC §3)."""

import hashlib
import json
import re
from typing import Any

import pytest
from pydantic import ValidationError

from worker.models import ChatIntegrationEvent, EventType, conversation_key

DISCONNECT: dict[str, Any] = {
    "SourceId": "+15551234567",
    "DestinationId": "+15557654321",
    "Event": {"Type": "DISCONNECT"},
}
MESSAGE: dict[str, Any] = {
    "SourceId": "+15551234567",
    "DestinationId": "+15557654321",
    "Event": {"Type": "MESSAGE", "ContentType": "text/plain", "Content": "hello"},
}
FULL: dict[str, Any] = {
    "SourceId": "+15551234567",
    "DestinationId": "arn:aws:connect:us-east-1:123456789012:phone-number/abc",
    "Subtype": "connect:SMS",
    "Event": {"Type": "MESSAGE", "ContentType": "text/plain", "Content": "hello"},
    "NewSessionDetails": {
        "SupportedMessagingContentTypes": ["text/plain", "text/markdown"],
        "ParticipantDetails": {"DisplayName": "Ada"},
        "Attributes": {"customerTier": "gold", "empty": ""},
        "StreamingConfiguration": {
            "StreamingEndpointArn": "arn:aws:sns:us-east-1:123456789012:chat-stream"
        },
    },
}


def parse(body: dict[str, Any]) -> ChatIntegrationEvent:
    """Validate a body the way the consumer does: from JSON bytes."""
    return ChatIntegrationEvent.model_validate_json(json.dumps(body))


def with_changes(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """Return a deep copy of a body with top-level fields replaced (None removes one)."""
    body: dict[str, Any] = json.loads(json.dumps(base))
    for name, value in changes.items():
        if value is None:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def failures(body: dict[str, Any]) -> list[tuple[tuple[str | int, ...], str]]:
    """Return the (location, error type) pairs a body fails with."""
    with pytest.raises(ValidationError) as caught:
        parse(body)
    return [(tuple(error["loc"]), error["type"]) for error in caught.value.errors()]


# --- valid events ----------------------------------------------------------------------------


def test_message_with_content_type_and_content_is_valid() -> None:
    event = parse(MESSAGE)

    assert event.Event.Type is EventType.MESSAGE
    assert event.Event.ContentType == "text/plain"
    assert event.Event.Content == "hello"


def test_event_with_content_type_only_is_valid() -> None:
    event = parse(
        with_changes(
            MESSAGE,
            Event={
                "Type": "EVENT",
                "ContentType": "application/vnd.amazonaws.connect.event.typing",
            },
        )
    )

    assert event.Event.Type is EventType.EVENT
    assert event.Event.Content is None


def test_disconnect_alone_is_valid() -> None:
    event = parse(DISCONNECT)

    assert event.Event.Type is EventType.DISCONNECT
    assert event.Subtype is None
    assert event.NewSessionDetails is None


def test_subtype_is_kept() -> None:
    assert parse(with_changes(DISCONNECT, Subtype="connect:SMS")).Subtype == "connect:SMS"


def test_full_new_session_details_are_valid() -> None:
    details = parse(FULL).NewSessionDetails

    assert details is not None
    assert details.SupportedMessagingContentTypes == ["text/plain", "text/markdown"]
    assert details.ParticipantDetails is not None
    assert details.ParticipantDetails.DisplayName == "Ada"
    assert details.Attributes == {"customerTier": "gold", "empty": ""}
    assert details.StreamingConfiguration is not None
    assert details.StreamingConfiguration.StreamingEndpointArn.endswith(":chat-stream")


@pytest.mark.parametrize(
    "length_field",
    [
        ("SourceId", 255),
        ("DestinationId", 255),
        ("Subtype", 100),
    ],
)
def test_top_level_strings_at_their_maximum_length_are_valid(
    length_field: tuple[str, int],
) -> None:
    name, maximum = length_field

    event = parse(with_changes(DISCONNECT, **{name: "x" * maximum}))

    assert len(getattr(event, name)) == maximum


def test_content_of_16384_characters_is_valid() -> None:
    event = parse(with_changes(MESSAGE, Event={**MESSAGE["Event"], "Content": "x" * 16384}))

    assert event.Event.Content is not None
    assert len(event.Event.Content) == 16384


def test_content_length_counts_characters_not_bytes() -> None:
    # Given 16384 two-byte characters (32768 UTF-8 bytes)
    content = "é" * 16384

    event = parse(with_changes(MESSAGE, Event={**MESSAGE["Event"], "Content": content}))

    assert event.Event.Content == content


# --- to_request ------------------------------------------------------------------------------


def test_to_request_leaves_out_absent_fields() -> None:
    assert parse(DISCONNECT).to_request() == {
        "SourceId": "+15551234567",
        "DestinationId": "+15557654321",
        "Event": {"Type": "DISCONNECT"},
    }


def test_to_request_renders_the_type_as_a_plain_string() -> None:
    request_type = parse(MESSAGE).to_request()["Event"]["Type"]

    assert type(request_type) is str
    assert request_type == "MESSAGE"


@pytest.mark.parametrize("body", [DISCONNECT, MESSAGE, FULL], ids=["disconnect", "message", "full"])
def test_to_request_round_trips_the_body(body: dict[str, Any]) -> None:
    request = parse(body).to_request()

    assert request == body
    assert parse(request) == parse(body)


# --- invalid events: which field fails -------------------------------------------------------


@pytest.mark.parametrize("missing", ["SourceId", "DestinationId", "Event"])
def test_missing_required_top_level_field_is_rejected(missing: str) -> None:
    assert failures(with_changes(MESSAGE, **{missing: None})) == [((missing,), "missing")]


def test_missing_event_type_is_rejected() -> None:
    assert failures(with_changes(MESSAGE, Event={"ContentType": "text/plain", "Content": "x"})) == [
        (("Event", "Type"), "missing")
    ]


@pytest.mark.parametrize(
    ("changes", "location"),
    [
        ({"SourceId": ""}, ("SourceId",)),
        ({"DestinationId": ""}, ("DestinationId",)),
        ({"Subtype": ""}, ("Subtype",)),
        (
            {"Event": {"Type": "MESSAGE", "ContentType": "", "Content": "x"}},
            ("Event", "ContentType"),
        ),
        (
            {"Event": {"Type": "MESSAGE", "ContentType": "text/plain", "Content": ""}},
            ("Event", "Content"),
        ),
    ],
    ids=["SourceId", "DestinationId", "Subtype", "ContentType", "Content"],
)
def test_empty_string_is_rejected(changes: dict[str, Any], location: tuple[str, ...]) -> None:
    assert failures(with_changes(MESSAGE, **changes)) == [(location, "string_too_short")]


@pytest.mark.parametrize(
    ("changes", "location"),
    [
        ({"SourceId": "1" * 256}, ("SourceId",)),
        ({"DestinationId": "1" * 256}, ("DestinationId",)),
        ({"Subtype": "s" * 101}, ("Subtype",)),
        (
            {"Event": {"Type": "MESSAGE", "ContentType": "t" * 101, "Content": "x"}},
            ("Event", "ContentType"),
        ),
        (
            {"Event": {"Type": "MESSAGE", "ContentType": "text/plain", "Content": "x" * 16385}},
            ("Event", "Content"),
        ),
        (
            {"Event": {"Type": "MESSAGE", "ContentType": "text/plain", "Content": "é" * 16385}},
            ("Event", "Content"),
        ),
    ],
    ids=[
        "SourceId-256",
        "DestinationId-256",
        "Subtype-101",
        "ContentType-101",
        "Content-16385",
        "Content-16385-multibyte",
    ],
)
def test_over_long_string_is_rejected(changes: dict[str, Any], location: tuple[str, ...]) -> None:
    assert failures(with_changes(MESSAGE, **changes)) == [(location, "string_too_long")]


@pytest.mark.parametrize("event_type", ["MESSAGE", "EVENT"])
def test_content_type_is_required_for_message_and_event(event_type: str) -> None:
    body = with_changes(MESSAGE, Event={"Type": event_type, "Content": "x"})

    with pytest.raises(ValidationError) as caught:
        parse(body)

    [error] = caught.value.errors()
    assert (error["loc"], error["type"]) == (("Event",), "value_error")
    assert f"ContentType is required when Type is {event_type}" in error["msg"]


def test_content_is_required_for_message() -> None:
    body = with_changes(MESSAGE, Event={"Type": "MESSAGE", "ContentType": "text/plain"})

    with pytest.raises(ValidationError) as caught:
        parse(body)

    [error] = caught.value.errors()
    assert (error["loc"], error["type"]) == (("Event",), "value_error")
    assert "Content is required when Type is MESSAGE" in error["msg"]


@pytest.mark.parametrize("bad_type", ["TYPING", "message", ""])
def test_unknown_event_type_is_rejected(bad_type: str) -> None:
    assert failures(with_changes(DISCONNECT, Event={"Type": bad_type})) == [
        (("Event", "Type"), "enum")
    ]


@pytest.mark.parametrize(
    ("changes", "location"),
    [
        ({"ClientToken": "abc"}, ("ClientToken",)),
        ({"Event": {"Type": "DISCONNECT", "Extra": 1}}, ("Event", "Extra")),
        (
            {"NewSessionDetails": {"ParticipantDetails": {"DisplayName": "Ada", "Role": "x"}}},
            ("NewSessionDetails", "ParticipantDetails", "Role"),
        ),
    ],
    ids=["top-level", "Event", "ParticipantDetails"],
)
def test_unknown_field_is_rejected(changes: dict[str, Any], location: tuple[str, ...]) -> None:
    assert failures(with_changes(DISCONNECT, **changes)) == [(location, "extra_forbidden")]


@pytest.mark.parametrize(
    ("changes", "location", "error_type"),
    [
        ({"SourceId": 15551234567}, ("SourceId",), "string_type"),
        ({"Subtype": 1}, ("Subtype",), "string_type"),
        ({"Event": "DISCONNECT"}, ("Event",), "model_type"),
        (
            {"NewSessionDetails": {"Attributes": {"tier": 1}}},
            ("NewSessionDetails", "Attributes", "tier"),
            "string_type",
        ),
        (
            {"NewSessionDetails": {"SupportedMessagingContentTypes": "text/plain"}},
            ("NewSessionDetails", "SupportedMessagingContentTypes"),
            "list_type",
        ),
    ],
    ids=["SourceId-number", "Subtype-number", "Event-string", "Attribute-number", "types-string"],
)
def test_wrong_type_is_rejected_without_coercion(
    changes: dict[str, Any], location: tuple[str, ...], error_type: str
) -> None:
    assert failures(with_changes(DISCONNECT, **changes)) == [(location, error_type)]


def test_display_name_of_257_characters_is_rejected() -> None:
    body = with_changes(
        DISCONNECT, NewSessionDetails={"ParticipantDetails": {"DisplayName": "d" * 257}}
    )

    assert failures(body) == [
        (("NewSessionDetails", "ParticipantDetails", "DisplayName"), "string_too_long")
    ]


def test_streaming_endpoint_arn_of_351_characters_is_rejected() -> None:
    body = with_changes(
        DISCONNECT,
        NewSessionDetails={"StreamingConfiguration": {"StreamingEndpointArn": "a" * 351}},
    )

    assert failures(body) == [
        (
            ("NewSessionDetails", "StreamingConfiguration", "StreamingEndpointArn"),
            "string_too_long",
        )
    ]


def test_attributes_with_an_empty_key_are_rejected() -> None:
    body = with_changes(DISCONNECT, NewSessionDetails={"Attributes": {"": "v"}})

    assert failures(body) == [
        (("NewSessionDetails", "Attributes", "", "[key]"), "string_too_short")
    ]


def test_every_failing_field_is_reported_at_once() -> None:
    body = with_changes(MESSAGE, SourceId="", Subtype="s" * 101, Event={"Type": "BOGUS"})

    assert {location for location, _ in failures(body)} == {
        ("SourceId",),
        ("Subtype",),
        ("Event", "Type"),
    }


def test_event_is_immutable() -> None:
    event = parse(DISCONNECT)

    with pytest.raises(ValidationError):
        event.SourceId = "other"


# --- conversation_key ------------------------------------------------------------------------


def test_conversation_key_without_subtype_hashes_an_empty_third_part() -> None:
    body = {"SourceId": "a", "DestinationId": "b", "Event": {"Type": "DISCONNECT"}}

    assert conversation_key(body) == hashlib.sha256(b"a\x00b\x00").hexdigest()


def test_conversation_key_with_subtype_hashes_all_three_parts() -> None:
    body = {"SourceId": "a", "DestinationId": "b", "Subtype": "s", "Event": {"Type": "DISCONNECT"}}

    assert conversation_key(body) == hashlib.sha256(b"a\x00b\x00s").hexdigest()


def test_conversation_key_matches_pinned_digests() -> None:
    # Pinned so that a change to the definition producers rely on cannot go unnoticed.
    assert conversation_key({"SourceId": "a", "DestinationId": "b"}) == (
        "8fb20ef63ced4145fc2e983ffe597d1dcff39154c3bf21f0fa9dde6a0c50fdc9"
    )
    assert conversation_key({"SourceId": "a", "DestinationId": "b", "Subtype": "s"}) == (
        "b438ca350202af6caa76c7e92f160a652d1146e599655210e3d69126745c305f"
    )


@pytest.mark.parametrize("body", [DISCONNECT, MESSAGE, FULL], ids=["disconnect", "message", "full"])
def test_conversation_key_is_the_same_for_model_and_plain_dict(body: dict[str, Any]) -> None:
    assert conversation_key(parse(body)) == conversation_key(body)


def test_conversation_key_is_64_lowercase_hex_characters() -> None:
    key = conversation_key(parse(FULL))

    assert re.fullmatch(r"[0-9a-f]{64}", key)


def test_conversation_key_keeps_the_phone_number_out() -> None:
    assert "15551234567" not in conversation_key(parse(MESSAGE))


def test_conversation_key_differs_by_subtype() -> None:
    without = conversation_key(parse(DISCONNECT))
    sms = conversation_key(parse(with_changes(DISCONNECT, Subtype="connect:SMS")))
    whatsapp = conversation_key(parse(with_changes(DISCONNECT, Subtype="connect:WhatsApp")))

    assert len({without, sms, whatsapp}) == 3


def test_conversation_key_separates_fields_so_boundaries_matter() -> None:
    assert conversation_key({"SourceId": "ab", "DestinationId": "c"}) != conversation_key(
        {"SourceId": "a", "DestinationId": "bc"}
    )


def test_conversation_key_is_the_same_for_every_event_type_of_a_conversation() -> None:
    assert conversation_key(parse(DISCONNECT)) == conversation_key(parse(MESSAGE))


def test_conversation_key_encodes_non_ascii_as_utf8() -> None:
    body = {"SourceId": "Zoë", "DestinationId": "日本", "Subtype": "ß"}

    expected = hashlib.sha256("Zoë\x00日本\x00ß".encode()).hexdigest()
    assert conversation_key(body) == expected
    assert conversation_key(parse({**body, "Event": {"Type": "DISCONNECT"}})) == expected


# --- the Attributes rules of the model's documentation ----------------------------------------


def with_attributes(attributes: dict[str, str]) -> dict[str, Any]:
    """Return a DISCONNECT opening a chat with these Attributes."""
    return with_changes(DISCONNECT, NewSessionDetails={"Attributes": attributes})


def attribute_failure(attributes: dict[str, str]) -> str:
    """Return the message of the one error these Attributes fail with, at their location."""
    with pytest.raises(ValidationError) as caught:
        parse(with_attributes(attributes))
    [error] = caught.value.errors()
    assert error["loc"] == ("NewSessionDetails", "Attributes")
    return str(error["msg"])


@pytest.mark.parametrize("key", ["a", "Z9", "customer-tier_2", "-", "_", "A" * 100])
def test_attribute_keys_of_alphanumerics_dash_and_underscore_are_valid(key: str) -> None:
    assert parse(with_attributes({key: "v"})).NewSessionDetails is not None


@pytest.mark.parametrize("key", ["a b", "a.b", "a:b", "tier/1", "é", "\u0661", "a\n", "key!"])
def test_a_key_with_another_character_is_rejected_citing_the_model(key: str) -> None:
    message = attribute_failure({"ok": "v", key: "v"})

    assert "only alphanumeric, dash, and underscore" in message
    assert "NewSessionDetails.Attributes" in message


def test_the_rejection_does_not_repeat_the_key() -> None:
    assert "+15551234567" not in attribute_failure({"phone:+15551234567": "v"})


def test_attributes_of_exactly_32768_utf8_bytes_are_valid() -> None:
    # "é" is 2 bytes in UTF-8: the limit counts bytes, not characters
    attributes = {"k": "é" * 16383 + "a"}  # 1 + 32766 + 1 bytes

    assert parse(with_attributes(attributes)).NewSessionDetails is not None


def test_attributes_of_32769_utf8_bytes_are_rejected_counting_keys_and_values() -> None:
    attributes = {"k1": "a" * 16382, "k2": "é" * 8191 + "a"}  # 2 + 16382 + 2 + 16383 bytes

    message = attribute_failure(attributes)

    assert "32769 UTF-8 bytes" in message
    assert "up to 32768" in message


def test_a_value_under_its_own_limit_still_counts_towards_the_total() -> None:
    # each value fits its 32,767-character limit, together they do not fit 32,768 bytes
    assert "UTF-8 bytes" in attribute_failure({"a": "x" * 20000, "b": "y" * 20000})
