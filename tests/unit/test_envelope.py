"""The dead-letter envelope: original body and properties plus the headers of SPEC §4."""

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import aio_pika
import pytest
from aiormq.abc import DeliveredMessage
from pamqp import commands
from pamqp.header import ContentHeader

from worker.pipeline.decoding import decode
from worker.pipeline.envelope import (
    MAX_MESSAGE_BYTES,
    MAX_VALIDATION_ERRORS_BYTES,
    FailureContext,
    build_dead_letter,
    error_headers,
    iso_utc,
    truncate_utf8,
)
from worker.pipeline.errors import (
    ErrorVariant,
    EventFailure,
    MalformedEventError,
    PermanentApiError,
    TransientApiError,
)

FIRST = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
FAILED = FIRST + timedelta(seconds=42)
CONTEXT = FailureContext(
    attempts=3,
    ambiguous_attempts=0,
    first_attempt_at=FIRST,
    failed_at=FAILED,
    queue="events.work",
    worker_id="host-7",
)
REASON = {"AttachedFileInvalidRequestExceptionReason": "INVALID_FILE_TYPE"}
BODY = b'{"SourceId":"+15551234567","DestinationId":"d","Event":{"Type":"DISCONNECT"}}'


def invalid_request() -> PermanentApiError:
    return PermanentApiError(
        ErrorVariant.INVALID_REQUEST,
        "InvalidRequestException",
        "bad attachment",
        http_status=400,
        request_id="req-1",
        reason=REASON,
    )


def malformed(errors: list[dict[str, Any]]) -> MalformedEventError:
    return MalformedEventError(
        ErrorVariant.MALFORMED, "ValidationFailed", "1 field(s) fail", validation_errors=errors
    )


def incoming(body: bytes = BODY, headers: dict[str, Any] | None = None) -> aio_pika.IncomingMessage:
    """Build the message aio-pika would hand the consumer, without a broker."""
    properties = commands.Basic.Properties(
        message_id="m-1",
        correlation_id="c-1",
        content_type="application/json",
        content_encoding="utf-8",
        timestamp=datetime(2024, 5, 6, 7, 0, 0, tzinfo=UTC),
        headers={"trace-id": "t-1"} if headers is None else headers,
        user_id="producer",
        expiration="60000",
        delivery_mode=1,
        priority=3,
        app_id="producer-app",
        message_type="chat",
        reply_to="replies",
    )
    delivery = commands.Basic.Deliver(
        consumer_tag="ctag",
        delivery_tag=1,
        redelivered=False,
        exchange="events",
        routing_key="abc123",
    )
    header = ContentHeader(0, len(body), properties)
    return aio_pika.IncomingMessage(DeliveredMessage(delivery, header, body, None))  # type: ignore[arg-type]


# --- error_headers ---------------------------------------------------------------------------


def test_api_failure_headers_say_what_where_and_when() -> None:
    assert error_headers(invalid_request(), CONTEXT) == {
        "x-error-variant": "InvalidRequestException",
        "x-error-code": "InvalidRequestException",
        "x-error-message": "bad attachment",
        "x-error-reason": '{"AttachedFileInvalidRequestExceptionReason":"INVALID_FILE_TYPE"}',
        "x-http-status": "400",
        "x-aws-request-id": "req-1",
        "x-attempts": "3",
        "x-ambiguous-attempts": "0",
        "x-first-attempt-at": "2024-05-06T07:08:09.123Z",
        "x-failed-at": "2024-05-06T07:08:51.123Z",
        "x-original-queue": "events.work",
        "x-worker-id": "host-7",
    }


@pytest.mark.parametrize(
    "failure",
    [
        invalid_request(),
        malformed([{"type": "missing", "loc": ["SourceId"], "msg": "Field required"}]),
        TransientApiError(ErrorVariant.UNKNOWN, "ReadTimeoutError", "Read timeout"),
    ],
    ids=["api", "malformed", "transport"],
)
def test_every_header_value_is_a_string(failure: EventFailure) -> None:
    assert all(isinstance(value, str) for value in error_headers(failure, CONTEXT).values())


def test_unknown_error_keeps_the_raw_code() -> None:
    failure = PermanentApiError(ErrorVariant.UNKNOWN, "ServiceQuotaExceededException", "quota")

    headers = error_headers(failure, CONTEXT)

    assert headers["x-error-variant"] == "UnknownError"
    assert headers["x-error-code"] == "ServiceQuotaExceededException"


def test_headers_that_do_not_apply_are_left_out() -> None:
    failure = TransientApiError(ErrorVariant.UNKNOWN, "EndpointConnectionError", "no route")

    headers = error_headers(failure, CONTEXT)

    for absent in ("x-http-status", "x-aws-request-id", "x-error-reason", "x-validation-errors"):
        assert absent not in headers


def test_malformed_event_headers_carry_the_validation_errors_as_compact_json() -> None:
    errors = [
        {"type": "missing", "loc": ["SourceId"], "msg": "Field required"},
        {"type": "enum", "loc": ["Event", "Type"], "msg": "Input should be 'DISCONNECT'"},
    ]

    headers = error_headers(malformed(errors), CONTEXT)

    assert headers["x-error-variant"] == "MalformedEvent"
    assert json.loads(headers["x-validation-errors"]) == errors
    assert ", " not in headers["x-validation-errors"]
    assert ": " not in headers["x-validation-errors"]


def test_validation_errors_are_capped_in_bytes_keeping_the_first() -> None:
    errors = [{"type": "missing", "loc": [f"F{i}"], "msg": "Field required"} for i in range(500)]

    text = error_headers(malformed(errors), CONTEXT)["x-validation-errors"]
    listed = json.loads(text)

    assert len(text.encode()) <= MAX_VALIDATION_ERRORS_BYTES
    assert 0 < len(listed) < 500
    assert listed == errors[: len(listed)]


def test_validation_errors_of_a_real_body_do_not_copy_its_values() -> None:
    body = json.dumps(
        {
            "SourceId": "+15551234567" * 30,
            "DestinationId": "d",
            "Event": {"Type": "MESSAGE", "ContentType": "text/plain", "Content": 42},
            "Note": "secret diagnosis",
        }
    ).encode()
    with pytest.raises(MalformedEventError) as caught:
        decode(body, 256 * 1024)

    headers = error_headers(caught.value, CONTEXT)

    assert "+1555" not in json.dumps(headers)
    assert "secret diagnosis" not in json.dumps(headers)


def test_validation_errors_header_stays_within_an_amqp_frame() -> None:
    # Given a 180 KB body (under the 256 KiB limit) with 20 long attribute keys of wrong type
    attributes = {f"{i:02d}" + "k" * 9000: i for i in range(20)}
    body = json.dumps(
        {
            "SourceId": "s",
            "DestinationId": "d",
            "Event": {"Type": "DISCONNECT"},
            "NewSessionDetails": {"Attributes": attributes},
        }
    ).encode()
    with pytest.raises(MalformedEventError) as caught:
        decode(body, 256 * 1024)

    headers = error_headers(caught.value, CONTEXT)

    assert sum(len(k) + len(v.encode()) for k, v in headers.items()) < 131072


def test_error_message_under_the_limit_is_kept_whole() -> None:
    message = "x" * MAX_MESSAGE_BYTES
    failure = PermanentApiError(ErrorVariant.ACCESS_DENIED, "AccessDeniedException", message)

    assert error_headers(failure, CONTEXT)["x-error-message"] == message


def test_error_message_is_truncated_to_1024_utf8_bytes() -> None:
    failure = PermanentApiError(ErrorVariant.ACCESS_DENIED, "AccessDeniedException", "x" * 5000)

    assert error_headers(failure, CONTEXT)["x-error-message"] == "x" * 1024


def test_error_message_truncation_does_not_split_a_multibyte_character() -> None:
    # Given "ab" + 500 three-byte euro signs: byte 1024 falls inside the 341st euro sign
    failure = PermanentApiError(
        ErrorVariant.ACCESS_DENIED, "AccessDeniedException", "ab" + "€" * 500
    )

    message = error_headers(failure, CONTEXT)["x-error-message"]

    assert message == "ab" + "€" * 340
    assert len(message.encode("utf-8")) == 1022


@pytest.mark.parametrize("limit", range(0, 9))
def test_truncate_utf8_never_exceeds_the_limit_nor_splits_characters(limit: int) -> None:
    text = "aé€😀"  # 1 + 2 + 3 + 4 bytes

    cut = truncate_utf8(text, limit)

    assert len(cut.encode("utf-8")) <= limit
    assert text.startswith(cut)


# --- iso_utc ---------------------------------------------------------------------------------


def test_iso_utc_has_millisecond_precision_and_ends_with_z() -> None:
    assert iso_utc(FIRST) == "2024-05-06T07:08:09.123Z"


def test_iso_utc_converts_other_offsets_to_utc() -> None:
    moment = datetime(2024, 5, 6, 9, 8, 9, tzinfo=timezone(timedelta(hours=2)))

    assert iso_utc(moment) == "2024-05-06T07:08:09.000Z"


# --- build_dead_letter -----------------------------------------------------------------------


def test_dead_letter_body_is_the_original_byte_for_byte() -> None:
    body = b"\xff\xfe not even utf-8 \x00"

    assert build_dead_letter(incoming(body), malformed([]), CONTEXT).body == body


def test_dead_letter_keeps_the_original_properties() -> None:
    original = incoming()

    letter = build_dead_letter(original, invalid_request(), CONTEXT)

    assert letter.message_id == "m-1"
    assert letter.correlation_id == "c-1"
    assert letter.content_type == "application/json"
    assert letter.content_encoding == "utf-8"
    assert letter.timestamp == original.timestamp
    assert letter.priority == 3
    assert letter.app_id == "producer-app"
    assert letter.type == "chat"
    assert letter.reply_to == "replies"


def test_dead_letter_is_persistent_and_never_expires_nor_claims_a_user() -> None:
    letter = build_dead_letter(incoming(), invalid_request(), CONTEXT)

    assert letter.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert letter.expiration is None
    assert letter.user_id is None


def test_dead_letter_keeps_original_headers_and_adds_error_and_provenance_headers() -> None:
    letter = build_dead_letter(incoming(), invalid_request(), CONTEXT)

    assert letter.headers["trace-id"] == "t-1"
    assert letter.headers["x-error-variant"] == "InvalidRequestException"
    assert letter.headers["x-original-exchange"] == "events"
    assert letter.headers["x-original-routing-key"] == "abc123"
    assert letter.headers["x-original-queue"] == "events.work"


def test_dead_letter_of_a_message_without_headers() -> None:
    letter = build_dead_letter(incoming(headers={}), malformed([]), CONTEXT)

    assert letter.headers["x-error-variant"] == "MalformedEvent"


def test_redriven_dead_letter_gets_the_new_failure_and_keeps_its_redrive_count() -> None:
    # Given a dead letter that an operator redrove, which fails again with another variant
    stale = error_headers(invalid_request(), CONTEXT)
    original = incoming(headers={**stale, "x-redrive-count": "1"})
    failure = PermanentApiError(ErrorVariant.ACCESS_DENIED, "AccessDeniedException", "denied")

    letter = build_dead_letter(original, failure, CONTEXT)

    assert letter.headers["x-error-variant"] == "AccessDeniedException"
    assert letter.headers["x-error-message"] == "denied"
    assert letter.headers["x-redrive-count"] == "1"


def test_redriven_dead_letter_drops_error_headers_of_the_previous_failure() -> None:
    # Given a redriven InvalidRequestException dead letter that now fails on the network
    stale = error_headers(invalid_request(), CONTEXT)
    original = incoming(headers={**stale, "x-redrive-count": "1"})
    failure = TransientApiError(ErrorVariant.UNKNOWN, "EndpointConnectionError", "no route")

    letter = build_dead_letter(original, failure, CONTEXT)

    assert letter.headers["x-error-variant"] == "UnknownError"
    assert "x-http-status" not in letter.headers
    assert "x-aws-request-id" not in letter.headers
    assert "x-error-reason" not in letter.headers


def test_header_values_decoded_as_bytes_can_be_published_again() -> None:
    # Given headers as pamqp decodes them when a long string is not UTF-8, nested too
    from worker.pipeline.envelope import encodable

    decoded = {"raw": b"\xff\xfe", "table": {"inner": b"\x80"}, "list": [b"\x81", 1]}

    # When made encodable, then bytes become bytearray (sent unchanged), the rest is kept
    assert encodable(decoded) == {
        "raw": bytearray(b"\xff\xfe"),
        "table": {"inner": bytearray(b"\x80")},
        "list": [bytearray(b"\x81"), 1],
    }
    assert isinstance(encodable(decoded)["raw"], bytearray)
