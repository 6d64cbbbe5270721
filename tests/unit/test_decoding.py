"""The first step of a message's life: a body becomes a request or a MalformedEvent (SPEC §3)."""

import json
from typing import Any

import pytest

from worker.models import ChatIntegrationEvent, EventType
from worker.pipeline.decoding import decode
from worker.pipeline.errors import ErrorVariant, MalformedEventError

LIMIT = 256 * 1024
PHONE = "+15551234567"
SECRET = "my card number is 4111"
VALID: dict[str, Any] = {
    "SourceId": PHONE,
    "DestinationId": "+15557654321",
    "Event": {"Type": "MESSAGE", "ContentType": "text/plain", "Content": SECRET},
}


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode("utf-8")


def malformed(body: bytes, limit: int = LIMIT) -> MalformedEventError:
    """Decode a body that must fail, and return the failure."""
    with pytest.raises(MalformedEventError) as caught:
        decode(body, limit)
    return caught.value


def test_valid_body_returns_the_model() -> None:
    event = decode(encode(VALID), LIMIT)

    assert isinstance(event, ChatIntegrationEvent)
    assert event.Event.Type is EventType.MESSAGE
    assert event.to_request() == VALID


def test_body_of_exactly_the_limit_is_accepted() -> None:
    body = encode(VALID)

    assert decode(body, len(body)).SourceId == PHONE


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "NotJson"),
        (b"", "NotJson"),
        (b'{"SourceId": "a",', "NotJson"),
        (b'{"SourceId":"\xff"}', "NotUtf8"),
        (b"\xff\xfe", "NotUtf8"),
        ('{"SourceId":"Zoë"}'.encode("latin-1"), "NotUtf8"),
        (b"[]", "NotAnObject"),
        (b'[{"SourceId": "a"}]', "NotAnObject"),
        (b'"a string"', "NotAnObject"),
        (b"42", "NotAnObject"),
        (b"null", "NotAnObject"),
        (b'{"DestinationId":"d","Event":{"Type":"DISCONNECT"}}', "ValidationFailed"),
        (b'{"SourceId":"s","DestinationId":"d","Event":{"Type":"TYPING"}}', "ValidationFailed"),
    ],
    ids=[
        "text",
        "empty",
        "truncated",
        "invalid-byte-in-string",
        "utf16-bom",
        "latin-1",
        "empty-array",
        "array",
        "string",
        "number",
        "null",
        "missing-field",
        "invalid-enum",
    ],
)
def test_malformed_body_is_a_malformed_event_with_its_code(body: bytes, code: str) -> None:
    failure = malformed(body)

    assert failure.variant is ErrorVariant.MALFORMED
    assert failure.code == code


def test_oversized_body_is_refused_before_parsing() -> None:
    body = encode(VALID)

    failure = malformed(body, limit=len(body) - 1)

    assert (failure.variant, failure.code) == (ErrorVariant.MALFORMED, "BodyTooLarge")
    assert failure.validation_errors == []


def test_oversized_garbage_is_too_large_rather_than_not_json() -> None:
    assert malformed(b"\xff" * 100, limit=10).code == "BodyTooLarge"


def test_not_utf8_says_where_the_bad_byte_is() -> None:
    assert "byte 13" in str(malformed(b'{"SourceId":"\xff"}'))


def test_validation_failure_lists_each_failing_field() -> None:
    body = encode({"DestinationId": "", "Event": {"Type": "TYPING"}})

    failure = malformed(body)

    assert {tuple(error["loc"]) for error in failure.validation_errors} == {
        ("SourceId",),
        ("DestinationId",),
        ("Event", "Type"),
    }
    assert all(set(error) == {"type", "loc", "msg"} for error in failure.validation_errors)


def test_missing_content_of_a_message_is_a_validation_failure() -> None:
    body = encode({**VALID, "Event": {"Type": "MESSAGE", "ContentType": "text/plain"}})

    assert malformed(body).code == "ValidationFailed"


@pytest.mark.parametrize(
    "body",
    [
        # over-long SourceId made of the phone number; over-long content
        {
            "SourceId": PHONE * 30,
            "DestinationId": "d",
            "Event": {"Type": "MESSAGE", "ContentType": "text/plain", "Content": SECRET * 1000},
        },
        # wrong types: a number where text belongs, content as a list
        {
            "SourceId": PHONE,
            "DestinationId": 15557654321,
            "Event": {"Type": "MESSAGE", "ContentType": "text/plain", "Content": [SECRET]},
        },
        # an unknown field carrying personal data, and a bad enum
        {**VALID, "Event": {**VALID["Event"], "Type": SECRET}, "Phone": PHONE},
        # a conditional rule failing next to the personal data
        {"SourceId": PHONE, "DestinationId": "d", "Event": {"Type": "EVENT", "Content": SECRET}},
    ],
    ids=["too-long", "wrong-types", "extra-field-and-enum", "missing-content-type"],
)
def test_validation_errors_never_contain_the_input_values(body: dict[str, Any]) -> None:
    failure = malformed(encode(body))

    assert failure.code == "ValidationFailed"
    for text in (repr(failure.validation_errors), str(failure), repr(failure.message)):
        assert PHONE not in text
        assert "15551234567" not in text
        assert SECRET not in text


def test_json_errors_never_contain_the_input_values() -> None:
    body = f'{{"SourceId": "{PHONE}", "Content": "{SECRET}"'.encode()

    failure = malformed(body)

    assert failure.code == "NotJson"
    assert PHONE not in repr(failure.validation_errors) + str(failure)
    assert SECRET not in repr(failure.validation_errors) + str(failure)


def test_attribute_keys_are_hidden_in_error_locations() -> None:
    # Given an attribute whose key is personal data and whose value has the wrong type
    body = json.dumps(
        {
            "SourceId": "s",
            "DestinationId": "d",
            "Event": {"Type": "DISCONNECT"},
            "NewSessionDetails": {"Attributes": {"jane.doe@example.com": 7}},
        }
    ).encode()

    with pytest.raises(MalformedEventError) as caught:
        decode(body, 1024)

    # Then the location names the fields but not the key
    assert caught.value.validation_errors[0]["loc"] == ["NewSessionDetails", "Attributes", "<key>"]
    assert "jane.doe" not in repr(caught.value.validation_errors)
