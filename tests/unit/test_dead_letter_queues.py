"""The pure helpers of `chat-worker dlq` and `check`: durations, ages, masking, redrive headers."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from worker.models import conversation_key
from worker.ops.check import mask_access_key
from worker.ops.dead_letter_queues import (
    describe_body,
    failed_at,
    header_text,
    parse_duration,
    redrive_routing_key,
    redriven_headers,
    terminal_safe,
)

PHONE = "+15557654321"
CONTENT = "my card number is 4111"
EVENT = {
    "SourceId": PHONE,
    "DestinationId": "arn:aws:connect:us-east-1:123456789012:instance/x",
    "Event": {"Type": "MESSAGE", "ContentType": "text/plain", "Content": CONTENT},
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("7d", timedelta(days=7)),
        ("1.5h", timedelta(minutes=90)),
        (" 2D ", timedelta(days=2)),
    ],
)
def test_parse_duration_accepts_s_m_h_d(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "7", "7w", "d", "-1d", "0s", "7 days", "1e3s"])
def test_parse_duration_refuses_anything_else(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_failed_at_reads_iso_utc_header() -> None:
    moment = failed_at({"x-failed-at": "2024-05-01T10:20:30.123Z"})
    assert moment == datetime(2024, 5, 1, 10, 20, 30, 123000, tzinfo=UTC)


def test_failed_at_of_a_broker_dead_letter_is_its_latest_death() -> None:
    died = datetime(2024, 2, 2, tzinfo=UTC)
    deaths = [{"reason": "expired", "queue": "q.work.1", "count": 1, "time": died}]
    assert failed_at({"x-death": deaths}, datetime(2024, 1, 1, tzinfo=UTC)) == died


def test_x_death_prints_as_the_broker_reasons() -> None:
    died = datetime(2024, 2, 2, tzinfo=UTC)
    deaths = [{"reason": b"delivery_limit", "queue": "q.work.1", "count": 1, "time": died}]
    assert header_text(deaths) == "delivery_limit from q.work.1 x1 at 2024-02-02T00:00:00.000Z"


def test_failed_at_falls_back_to_timestamp_then_none() -> None:
    stamp = datetime(2024, 1, 1, tzinfo=UTC)
    assert failed_at({"x-failed-at": "not a date"}, stamp) == stamp
    assert failed_at({}, None) is None


def test_describe_body_shows_shape_never_values() -> None:
    body = json.dumps(EVENT).encode()
    text = describe_body(body)
    assert f"{len(body)} bytes" in text
    assert "DestinationId, Event{Content, ContentType, Type}, SourceId" in text
    assert PHONE not in text and "15557654321" not in text
    assert CONTENT not in text and "MESSAGE" not in text


@pytest.mark.parametrize(
    ("body", "shape"),
    [(b"\xff\xfe", "not JSON"), (b"{broken", "not JSON"), (b"[1, 2]", "JSON list")],
)
def test_describe_body_of_non_objects(body: bytes, shape: str) -> None:
    assert describe_body(body).endswith(shape)


def test_describe_body_hash_prefix_tells_bodies_apart() -> None:
    assert describe_body(b'{"a": 1}') != describe_body(b'{"a": 2}')


def test_redriven_headers_start_count_at_one_and_keep_the_rest() -> None:
    headers = {"x-error-variant": "ThrottlingException", "app": "crm", "x-delivery-count": 3}
    redriven = redriven_headers(headers)
    assert redriven == {
        "x-error-variant": "ThrottlingException",
        "app": "crm",
        "x-redrive-count": "1",
    }


@pytest.mark.parametrize(("before", "after"), [("1", "2"), (b"4", "5"), (7, "8"), ("junk", "1")])
def test_redriven_headers_increment_the_count_as_string(before: object, after: str) -> None:
    assert redriven_headers({"x-redrive-count": before})["x-redrive-count"] == after


def test_redriven_headers_make_raw_bytes_encodable() -> None:
    assert redriven_headers({"raw": b"\xff"})["raw"] == bytearray(b"\xff")


def test_redrive_routing_key_is_the_original_one() -> None:
    body = json.dumps(EVENT).encode()
    assert redrive_routing_key({"x-original-routing-key": "abc123"}, body) == "abc123"


def test_redrive_routing_key_falls_back_to_conversation_key() -> None:
    body = json.dumps(EVENT).encode()
    assert redrive_routing_key({}, body) == conversation_key(EVENT)


def test_mask_access_key_keeps_four_at_each_end() -> None:
    assert mask_access_key("AKIAIOSFODNN7EXAMPLE") == "AKIA…MPLE"
    assert mask_access_key("short") == "****"
    assert mask_access_key(None) == "****"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("\x1b]0;title\x07", "\\x1b]0;title\\x07"),
        ("\x9b2J", "\\x9b2J"),
        ("two\nlines\r\tand\x00", "two\\nlines\\r\\tand\\x00"),
        ("abc\u202etxt.exe", "abc\\u202etxt.exe"),
        ("plain é 日本 +1555", "plain é 日本 +1555"),
    ],
)
def test_terminal_safe_escapes_controls_and_keeps_printable_text(text: str, shown: str) -> None:
    assert terminal_safe(text) == shown
