"""Lenient AMQP codecs, so that nothing a producer puts in a message can stall a queue.

pamqp (aio-pika's codec) raises on a few things other clients send: a timestamp past the year
9999 (a producer writing microseconds or nanoseconds), a short string (content_type,
message_id, ...) or a header name that is not UTF-8 (any client library that takes bytes), and
aio-pika then refuses a delivery mode other than 1 or 2. The error surfaces while the
connection reads the delivery's content header: the connection closes, the robust connection
reconnects, the broker delivers the same message first again, and every message behind it
waits forever. `install()` swaps in codecs that never fail on those:

- short strings, long strings (header values) and header names that are not UTF-8 are
  decoded with `surrogateescape`, and encoded back the same way, so a dead letter or a
  redrive carries the producer's bytes unchanged (valid UTF-8 is unaffected either way);
- header values keep their value: a float goes out as a double (pamqp would round a double to
  32 bits);
- timestamps are divided by 1000 until they are a representable moment, and a moment past
  2106 is written back in milliseconds, the unit in which readers take it;
- a delivery mode other than 1 or 2 is read as 1 (transient), as RabbitMQ treats it;
- properties that still cannot be decoded (a malformed frame) keep what was decoded before the
  fault and gain the header `UNDECODABLE_HEADER` with the reason: the consumer dead-letters
  such a message as a MalformedEvent instead of the connection dying on it.
"""

import datetime
import struct
import time
from collections.abc import Callable
from typing import Any

from pamqp import commands, common, decode, encode

Decoder = Callable[[bytes], tuple[int, datetime.datetime]]

# At most three more divisions bring any unsigned 64-bit value within datetime's range.
MAX_DIVISIONS = 4
# Marks a message whose properties could not be fully decoded; the value says why.
UNDECODABLE_HEADER = "x-worker-undecodable-properties"
TRANSIENT = 1
_KNOWN_DELIVERY_MODES = (1, 2)
_pamqp_unmarshal = commands.Basic.Properties.unmarshal
_pamqp_encode_table_value = encode.encode_table_value
_pamqp_encode_timestamp = encode.timestamp
# The largest timestamp readers take as seconds; above it they read milliseconds.
MAX_SECONDS = 0xFFFFFFFF


def lenient_timestamp(value: bytes) -> tuple[int, datetime.datetime]:
    """Decode an AMQP timestamp read in seconds, milliseconds, microseconds or nanoseconds."""
    try:
        return decode.timestamp(value)
    except (OverflowError, OSError, ValueError) as error:
        if len(value) < 8:
            raise ValueError("Could not unpack timestamp value") from error
        raw = float(common.Struct.timestamp.unpack(value[0:8])[0])
    for _ in range(MAX_DIVISIONS):
        raw /= 1000.0
        try:
            return 8, datetime.datetime.fromtimestamp(raw, tz=datetime.UTC)
        except (OverflowError, OSError, ValueError):
            continue
    raise ValueError("Could not read timestamp value as a moment")


def encode_timestamp(value: datetime.datetime | time.struct_time) -> bytes:
    """Encode a moment so that an AMQP reader reads it back as the same moment.

    Readers (pamqp, and this module) take a value above 2^32 as milliseconds: a moment past
    the year 2106 is written in milliseconds, where pamqp would write seconds that read back
    as a moment in 1971.
    """
    if not isinstance(value, datetime.datetime):
        return _pamqp_encode_timestamp(value)
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        value = value.replace(tzinfo=datetime.UTC)
    seconds = int(value.timestamp())
    if seconds > MAX_SECONDS:
        return common.Struct.timestamp.pack(round(value.timestamp() * 1000))
    return common.Struct.timestamp.pack(seconds)


def text_from_wire(raw: bytes) -> str:
    """Decode bytes as UTF-8, keeping any invalid byte recoverable as a lone surrogate."""
    return raw.decode("utf-8", "surrogateescape")


def text_to_wire(text: str) -> bytes:
    """Encode a string as UTF-8, restoring the bytes `text_from_wire` could not decode."""
    return text.encode("utf-8", "surrogateescape")


def _lenient_text(value: bytes, length: struct.Struct) -> tuple[int, str]:
    """Decode a length-prefixed AMQP string, whatever its bytes."""
    try:
        size = length.unpack(value[0 : length.size])[0]
    except struct.error as error:
        raise ValueError("Could not unpack string value") from error
    return length.size + size, text_from_wire(value[length.size : length.size + size])


def lenient_short_str(value: bytes) -> tuple[int, str]:
    """Decode an AMQP short string (a property, a header name), whatever its bytes."""
    return _lenient_text(value, common.Struct.byte)


def lenient_long_str(value: bytes) -> tuple[int, str]:
    """Decode an AMQP long string (a header value); pamqp returns bytes when not UTF-8."""
    return _lenient_text(value, common.Struct.integer)


def lenient_field_table(value: bytes) -> tuple[int, common.FieldTable]:
    """Decode an AMQP field table whose names may be any bytes (pamqp's, but for the names)."""
    try:
        length = common.Struct.integer.unpack(value[0:4])[0]
    except struct.error as error:
        raise ValueError("Could not unpack field table") from error
    end = 4 + length
    if end > len(value):
        raise ValueError("Field table length exceeds available data")
    table: dict[str, common.FieldValue] = {}
    offset = 4
    while offset < end:
        consumed, key = lenient_short_str(value[offset:end])
        offset += consumed
        if offset > end:
            raise ValueError("Field table key length exceeds data")
        consumed, table[key] = decode.embedded_value(value[offset:end])
        offset += consumed
    return end, table


def lenient_string(encoder: struct.Struct, value: str) -> bytes:
    """Encode a short or long string, restoring bytes decoded by `text_from_wire`."""
    if not isinstance(value, str):
        raise TypeError(f"str required, received {type(value)}")
    raw = text_to_wire(value)
    max_length = 255 if encoder is common.Struct.byte else 4294967295
    if len(raw) > max_length:
        raise TypeError(f"string exceeds maximum length of {max_length} bytes")
    return encoder.pack(len(raw)) + raw


def encode_field_table(value: common.FieldTable) -> bytes:
    """Encode a field table, names included, restoring bytes decoded by `text_from_wire`."""
    if not value:
        return common.Struct.integer.pack(0)
    if not isinstance(value, dict):
        raise TypeError(f"dict required, received {type(value)}")
    parts = []
    # Names are kept whole: pamqp cuts them at 128 bytes, but a name the broker delivered
    # (up to 255) must go out again unchanged in a dead letter.
    for key, item in sorted(value.items()):
        parts.append(lenient_string(common.Struct.byte, key))
        parts.append(encode.encode_table_value(item))
    data = b"".join(parts)
    return common.Struct.integer.pack(len(data)) + data


def encode_table_value(value: Any) -> bytes:
    """Encode a header value as pamqp does, but a float as a double.

    pamqp writes every float as a 32-bit float, which would round a producer's double in a
    dead letter; a double holds a 32-bit float exactly, so both travel unchanged.
    """
    if isinstance(value, float):
        return b"d" + encode.double(value)
    return _pamqp_encode_table_value(value)


def lenient_unmarshal(self: commands.Basic.Properties, flags: int, data: bytes) -> None:
    """Decode message properties; never raise on what a producer could have sent."""
    try:
        _pamqp_unmarshal(self, flags, data)
    except (ValueError, TypeError, struct.error) as error:
        headers: dict[str, Any] = dict(getattr(self, "headers", None) or {})
        headers[UNDECODABLE_HEADER] = f"{type(error).__name__}: {error}"[:512]
        self.headers = headers
    if getattr(self, "delivery_mode", None) not in (None, *_KNOWN_DELIVERY_MODES):
        self.delivery_mode = TRANSIENT


def install() -> None:
    """Make pamqp decode and encode leniently, in properties and in header tables."""
    decode.METHODS["timestamp"] = lenient_timestamp
    decode.TABLE_MAPPING[b"T"] = lenient_timestamp
    decode.METHODS["shortstr"] = lenient_short_str
    decode.METHODS["longstr"] = lenient_long_str
    decode.TABLE_MAPPING[b"S"] = lenient_long_str
    decode.METHODS["table"] = lenient_field_table
    decode.TABLE_MAPPING[b"F"] = lenient_field_table
    encode._string = lenient_string
    encode.field_table = encode_field_table
    encode.encode_table_value = encode_table_value
    encode.METHODS["table"] = encode_field_table
    encode.METHODS["timestamp"] = encode_timestamp
    encode.timestamp = encode_timestamp
    commands.Basic.Properties.unmarshal = lenient_unmarshal  # type: ignore[method-assign,assignment]
