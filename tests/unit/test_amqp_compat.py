"""The lenient AMQP codecs: any timestamp unit, any bytes in a string, nothing that raises."""

import datetime as dt
import struct

import pytest
from pamqp import commands, decode, encode

from worker.amqp_compat import UNDECODABLE_HEADER, install, lenient_timestamp

MOMENT = dt.datetime(2026, 11, 27, 20, 15, 30, tzinfo=dt.UTC)


def wire(value: int) -> bytes:
    """Return a timestamp as it travels: an unsigned 64-bit big-endian integer."""
    return struct.pack(">Q", value)


@pytest.mark.parametrize(
    ("scale", "unit"),
    [(1, "seconds"), (1_000, "milliseconds"), (1_000_000, "microseconds"), (10**9, "nanoseconds")],
)
def test_a_timestamp_in_any_unit_decodes_to_the_same_moment(scale: int, unit: str) -> None:
    # Given a moment written in some unit
    raw = wire(int(MOMENT.timestamp()) * scale)

    # When it is decoded
    consumed, moment = lenient_timestamp(raw)

    # Then it is the same moment, whatever the unit
    assert consumed == 8
    assert moment == MOMENT, unit


def test_pamqp_alone_fails_on_microseconds() -> None:
    # Given a timestamp in microseconds (the defect the lenient decoder exists for)
    raw = wire(int(MOMENT.timestamp()) * 1_000_000)

    # When pamqp decodes it, Then it raises
    with pytest.raises((OverflowError, ValueError, OSError)):
        decode.timestamp(raw)


def test_the_largest_value_still_decodes() -> None:
    # Given the largest unsigned 64-bit value
    consumed, moment = lenient_timestamp(wire(2**64 - 1))

    # Then it is read as nanoseconds: a moment in the 26th century
    assert consumed == 8
    assert moment.year == 2554


def test_truncated_bytes_are_a_clear_error() -> None:
    with pytest.raises(ValueError, match="timestamp"):
        lenient_timestamp(b"\x00\x01")


def test_install_covers_properties_and_header_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given pamqp's decoder tables (restored after the test)
    monkeypatch.setitem(decode.METHODS, "timestamp", decode.METHODS["timestamp"])
    monkeypatch.setitem(decode.TABLE_MAPPING, b"T", decode.TABLE_MAPPING[b"T"])

    # When the lenient decoder is installed
    install()

    # Then message properties and header values both decode microseconds
    raw = wire(int(MOMENT.timestamp()) * 1_000_000)
    assert decode.by_type(raw, "timestamp") == (8, MOMENT)
    assert decode.field_table(struct.pack(">I", 11) + b"\x01tT" + raw)[1] == {"t": MOMENT}


# --- text that is not UTF-8, odd delivery modes, undecodable properties -------------------------

NOT_UTF8 = [b"\xff", b"a\xfeb", b"\xc3", b"\xed\xa0\x80", b"\x80\x80", b"ok"]


def raw_text(raw: bytes) -> str:
    """Return bytes as the lenient decoder hands them to aio-pika."""
    return raw.decode("utf-8", "surrogateescape")


def properties_frame(properties: commands.Basic.Properties) -> tuple[int, bytes]:
    """Return the property flags and bytes of a content header, as the broker sends them."""
    marshalled = properties.marshal()
    return struct.unpack(">H", marshalled[:2])[0], marshalled[2:]


def decoded(flags: int, data: bytes) -> commands.Basic.Properties:
    """Decode properties as the consumer's connection does."""
    properties = commands.Basic.Properties()
    properties.unmarshal(flags, data)
    return properties


@pytest.fixture
def lenient(monkeypatch: pytest.MonkeyPatch) -> None:
    """Install the lenient codecs for one test, and restore pamqp's afterwards."""
    for table, key in [
        (decode.METHODS, "timestamp"),
        (decode.METHODS, "shortstr"),
        (decode.METHODS, "longstr"),
        (decode.TABLE_MAPPING, b"S"),
        (decode.METHODS, "table"),
        (decode.TABLE_MAPPING, b"T"),
        (decode.TABLE_MAPPING, b"F"),
        (encode.METHODS, "table"),
    ]:
        monkeypatch.setitem(table, key, table[key])  # type: ignore[index]
    monkeypatch.setattr(encode, "_string", encode._string)
    monkeypatch.setattr(encode, "field_table", encode.field_table)
    monkeypatch.setattr(encode, "encode_table_value", encode.encode_table_value)
    monkeypatch.setattr(commands.Basic.Properties, "unmarshal", commands.Basic.Properties.unmarshal)
    install()


@pytest.mark.parametrize("raw", NOT_UTF8)
@pytest.mark.parametrize(
    "name", ["content_type", "content_encoding", "message_id", "correlation_id", "app_id"]
)
def test_a_short_string_of_any_bytes_decodes_and_encodes_back_unchanged(
    lenient: None, name: str, raw: bytes
) -> None:
    # Given properties whose short string holds bytes that may not be UTF-8
    flags, data = properties_frame(commands.Basic.Properties(**{name: raw_text(raw)}))
    assert raw in data

    # When they are decoded and encoded again
    properties = decoded(flags, data)

    # Then the text is readable and the bytes on the wire are the producer's own
    assert isinstance(getattr(properties, name), str)
    assert properties_frame(properties) == (flags, data)


@pytest.mark.parametrize("raw", NOT_UTF8)
def test_header_names_and_nested_names_of_any_bytes_round_trip(lenient: None, raw: bytes) -> None:
    headers = {raw_text(raw): 1, "nested": {raw_text(b"k" + raw): [raw_text(raw)]}}
    flags, data = properties_frame(commands.Basic.Properties(headers=headers))
    properties = decoded(flags, data)
    assert properties.headers == headers
    assert properties_frame(properties) == (flags, data)


def test_a_header_name_longer_than_128_bytes_is_kept_whole(lenient: None) -> None:
    # pamqp's own encoder cuts names at 128 bytes; a dead letter must carry the name received.
    headers = {"n" * 200: "v"}
    properties = decoded(*properties_frame(commands.Basic.Properties(headers=headers)))
    assert properties.headers == headers


@pytest.mark.parametrize("mode", [0, 3, 7, 255])
def test_an_odd_delivery_mode_reads_as_transient(lenient: None, mode: int) -> None:
    properties = commands.Basic.Properties()
    properties.delivery_mode = mode  # pamqp validates on creation only
    assert decoded(*properties_frame(properties)).delivery_mode == 1


def test_properties_that_cannot_be_decoded_are_marked_not_raised(lenient: None) -> None:
    # Given a header table with a field type no AMQP codec knows ('Z')
    flags, data = properties_frame(
        commands.Basic.Properties(message_id="m-1", headers={"h": "v"}, priority=3)
    )
    broken = data.replace(b"hS", b"hZ")

    # When it is decoded
    properties = decoded(flags, broken)

    # Then decoding carried on as far as it could, and the message says why it stopped
    assert UNDECODABLE_HEADER in properties.headers
    assert "Unknown type" in properties.headers[UNDECODABLE_HEADER]


def test_a_double_header_keeps_its_precision(lenient: None) -> None:
    headers = {"ratio": 0.1, "small": 1e-300}
    properties = decoded(*properties_frame(commands.Basic.Properties(headers=headers)))
    assert properties.headers == headers
