"""A test publisher's patch that writes header values of every AMQP field type and any timestamp.

aio-pika picks one field type per Python type (an int goes out as the smallest signed type, a
float as a double); a producer in another language may send any of them. A `Typed` header
value goes out exactly as its tag and payload say, and carries the value a reader must get.
"""

import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from hypothesis import strategies as st
from pamqp import encode

from worker.amqp_compat import lenient_timestamp


@dataclass(frozen=True)
class Typed:
    """A header value on the wire: its type tag, its payload, and what a reader decodes."""

    tag: bytes
    payload: bytes
    value: Any


def _packed(tag: str, fmt: str, values: st.SearchStrategy[Any]) -> st.SearchStrategy[Typed]:
    """Return Typed values of one numeric field type."""
    return values.map(lambda v: Typed(tag.encode(), struct.pack(fmt, v), v))


def _raw_timestamp(raw: int) -> Typed:
    """Return a timestamp of any 64-bit value, read back as the lenient decoder reads it."""
    payload = struct.pack(">Q", raw)
    return Typed(b"T", payload, as_carried(lenient_timestamp(payload)[1]))


def as_carried(moment: datetime) -> datetime:
    """Return a moment as a copy carries it: in seconds, or past the year 2106 in milliseconds."""
    if moment.timestamp() <= 0xFFFFFFFF:
        return moment.replace(microsecond=0)
    return datetime.fromtimestamp(round(moment.timestamp() * 1000) / 1000.0, tz=UTC)


def _float(width: int) -> st.SearchStrategy[float]:
    """Return finite floats (RabbitMQ refuses infinities and NaN in tables)."""
    return st.floats(width=width, allow_nan=False, allow_infinity=False)


typed_values: st.SearchStrategy[Typed] = st.one_of(
    _packed("b", ">b", st.integers(-(2**7), 2**7 - 1)),
    _packed("B", ">B", st.integers(0, 2**8 - 1)),
    _packed("s", ">h", st.integers(-(2**15), 2**15 - 1)),
    _packed("u", ">H", st.integers(0, 2**16 - 1)),
    _packed("I", ">i", st.integers(-(2**31), 2**31 - 1)),
    _packed("i", ">I", st.integers(0, 2**32 - 1)),
    _packed("l", ">q", st.integers(-(2**63), 2**63 - 1)),
    _packed("f", ">f", _float(32)),
    _packed("d", ">d", _float(64)),
    st.integers(0, 2**64 - 1).map(_raw_timestamp),
    st.binary(max_size=32).map(lambda raw: Typed(b"x", struct.pack(">I", len(raw)) + raw, raw)),
    st.just(Typed(b"V", b"", None)),
)


class RawTimestamp(datetime):
    """A timestamp property that goes on the wire as any 64-bit value a producer may write."""

    raw: int

    @classmethod
    def of(cls, raw: int) -> "RawTimestamp":
        """Return a moment that is sent as `raw`."""
        moment = cls.fromtimestamp(0, tz=UTC)
        moment.raw = raw
        return moment

    def read_back(self) -> datetime:
        """Return the moment the worker reads, as a dead letter carries it."""
        return as_carried(lenient_timestamp(struct.pack(">Q", self.raw))[1])


@contextmanager
def raw_values() -> Iterator[None]:
    """Let this process publish `Typed` header values and `RawTimestamp`s, within the block."""
    table_value, stamp = encode.encode_table_value, encode.METHODS["timestamp"]

    def encode_value(value: Any) -> bytes:
        if isinstance(value, Typed):
            return value.tag + value.payload
        return table_value(value)

    def encode_timestamp(value: Any) -> bytes:
        if isinstance(value, RawTimestamp):
            return struct.pack(">Q", value.raw)
        return stamp(value)

    encode.encode_table_value, encode.METHODS["timestamp"] = encode_value, encode_timestamp
    try:
        yield
    finally:
        encode.encode_table_value, encode.METHODS["timestamp"] = table_value, stamp
