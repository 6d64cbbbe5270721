"""The lenient timestamp decoder: any unit a producer may write becomes the right moment."""

import datetime as dt
import struct

import pytest
from pamqp import decode

from worker.amqp_compat import install, lenient_timestamp

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
