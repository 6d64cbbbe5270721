"""A lenient AMQP timestamp decoder, so that one producer's odd timestamp cannot stall a queue.

pamqp (aio-pika's codec) reads a timestamp above 2^32 as milliseconds and raises when even that
lies past the year 9999, as a producer writing microseconds or nanoseconds makes it. The error
surfaces while the connection reads the delivery's content header: the connection closes, the
robust connection reconnects, the broker delivers the same message first again, and every
message behind it waits forever. `install()` swaps pamqp's decoder for one that keeps dividing
by 1000 until the value is a representable moment, for message properties and header tables.
"""

import datetime
from collections.abc import Callable

from pamqp import common, decode

Decoder = Callable[[bytes], tuple[int, datetime.datetime]]

# At most three more divisions bring any unsigned 64-bit value within datetime's range.
MAX_DIVISIONS = 4


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


def install() -> None:
    """Make pamqp decode timestamps leniently, in properties and in header tables."""
    decode.METHODS["timestamp"] = lenient_timestamp
    decode.TABLE_MAPPING[b"T"] = lenient_timestamp
