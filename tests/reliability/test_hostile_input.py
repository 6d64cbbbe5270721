"""Hostile producers: thousands of fuzzed bodies and properties through one real worker.

Every published event must end in exactly one of two places: delivered to Connect (when the
request model accepts its body) or the MalformedEvent dead-letter queue with its body byte for
byte and its properties kept. The worker process must survive all of it.

Hypothesis generates the examples up front (its tests must be sync); they are then published
together and drained by one worker, which keeps the run to seconds instead of one worker per
example.
"""

import asyncio
import datetime as dt
import json
import signal
import string
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import StartWorker
from tests.integration.support import Broker, readiness, wait_until
from tests.reliability.ledger import (
    Ledger,
    Tally,
    dead_letter_total,
    drained,
    quiescent,
    request_key,
    token_event,
)
from tests.reliability.raw_amqp import RawTimestamp, Typed, raw_values, typed_values
from worker.amqp_compat import text_from_wire, text_to_wire
from worker.models import conversation_key
from worker.pipeline.envelope import REPLACED_HEADERS
from worker.testing.simulator import ConnectSimulator

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

EXAMPLES = 2000
ID_SUFFIX = "id_suffix"
# Below 32,768 bytes: the Attributes that pad a body near the limit stay within their own
# documented total (32,768 UTF-8 bytes), so the body limit alone decides those examples.
MAX_BODY = 32 * 1024
Json = dict[str, Any]


# --- bodies -----------------------------------------------------------------------------------


def api_text(max_size: int) -> st.SearchStrategy[str]:
    """Return non-empty text within an API length limit (in characters, as the API counts)."""
    return st.text(min_size=1, max_size=max_size)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)

events = st.one_of(
    st.just({"Type": "DISCONNECT"}),
    st.builds(
        lambda kind, content: {"Type": "MESSAGE", "ContentType": kind, "Content": content},
        api_text(100),
        api_text(2000),
    ),
    st.builds(
        lambda kind, content: (
            {"Type": "EVENT", "ContentType": kind} | ({"Content": content} if content else {})
        ),
        st.sampled_from(["application/vnd.amazonaws.connect.event.typing"]) | api_text(100),
        st.none() | api_text(200),
    ),
)

attribute_keys = st.text(
    alphabet=string.ascii_letters + string.digits + "-_", min_size=1, max_size=40
)
sessions = st.fixed_dictionaries(
    {},
    optional={
        "SupportedMessagingContentTypes": st.lists(api_text(100), max_size=3),
        "ParticipantDetails": st.builds(lambda name: {"DisplayName": name}, api_text(256)),
        # Keys of the documented alphabet (other keys are malformed, and the mix would lose
        # its balance); a wrong key is among the wrong types below.
        "Attributes": st.dictionaries(attribute_keys, st.text(max_size=100), max_size=4),
        "StreamingConfiguration": st.builds(
            lambda arn: {"StreamingEndpointArn": arn}, api_text(350)
        ),
    },
)

valid_events = st.fixed_dictionaries(
    {
        "SourceId": api_text(255),
        # "simulate:<Code>" makes the simulator fail the call: not an API-acceptable destination.
        "DestinationId": api_text(255).filter(lambda d: not d.startswith("simulate:")),
        "Event": events,
    },
    optional={"Subtype": api_text(100), "NewSessionDetails": sessions},
)


def encode(event: Json, ascii_only: bool) -> bytes:
    """Serialise an event as a producer might."""
    return json.dumps(event, ensure_ascii=ascii_only).encode("utf-8")


def with_extra_field(event: Json, where: str, name: str, value: Any) -> bytes:
    """Add a field the API does not define (or overwrite one with a JSON value)."""
    target = event if where == "top" else event.setdefault(where, {})
    if isinstance(target, dict):
        target[name] = value
    return encode(event, True)


FIELD_PATHS = [
    ("SourceId",),
    ("DestinationId",),
    ("Subtype",),
    ("Event",),
    ("Event", "Type"),
    ("Event", "ContentType"),
    ("Event", "Content"),
    ("NewSessionDetails",),
    ("NewSessionDetails", "Attributes"),
    ("NewSessionDetails", "ParticipantDetails"),
]


def with_wrong_type(event: Json, path: tuple[str, ...], value: Any) -> bytes:
    """Replace one field, at any depth, with an arbitrary JSON value."""
    target = event
    for part in path[:-1]:
        nested = target.get(part)
        if not isinstance(nested, dict):
            nested = target[part] = {}
        target = nested
    target[path[-1]] = value
    return encode(event, False)


BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\x80"]


def with_bad_utf8(event: Json, bad: bytes, anywhere: int | None) -> bytes:
    """Put bytes that are not UTF-8 inside a string value, or anywhere in the body."""
    if anywhere is None:
        event["SourceId"] = "@@BAD@@"
        return encode(event, False).replace(b"@@BAD@@", bad)
    body = encode(event, False)
    at = anywhere % (len(body) + 1)
    return body[:at] + bad + body[at:]


def near_the_limit(event: Json, size: int) -> bytes:
    """Pad a valid event with attributes to exactly `size` bytes (valid unless too large)."""
    event.pop("NewSessionDetails", None)
    bare = len(encode(event, True))
    overhead = len(b', "NewSessionDetails": {"Attributes": {}}') + 3 * len(b'"p0": "", ')
    room = max(0, size - bare - overhead)
    chunks = [room // 3 + (1 if index < room % 3 else 0) for index in range(3)]
    event["NewSessionDetails"] = {
        "Attributes": {f"p{index}": "x" * chunk for index, chunk in enumerate(chunks)}
    }
    body = encode(event, True)
    return body + b" " * max(0, size - len(body))


def nested(depth: int, kind: str) -> bytes:
    """Return JSON nested `depth` levels deep."""
    if kind == "array":
        return b"[" * depth + b"]" * depth
    return b'{"Event":' * depth + b"{}" + b"}" * depth


bodies = st.one_of(
    st.builds(encode, valid_events, st.booleans()),
    st.builds(encode, valid_events, st.booleans()),
    st.builds(
        with_extra_field,
        valid_events,
        st.sampled_from(["top", "Event", "NewSessionDetails"]),
        st.text(max_size=20),
        json_values,
    ),
    st.builds(with_wrong_type, valid_events, st.sampled_from(FIELD_PATHS), json_values),
    st.binary(max_size=400),
    st.builds(
        with_bad_utf8,
        valid_events,
        st.sampled_from(BAD_UTF8),
        st.none() | st.integers(0, 10_000),
    ),
    st.builds(nested, st.integers(1, 20_000), st.sampled_from(["array", "object"])),
    st.builds(near_the_limit, valid_events, st.integers(MAX_BODY - 300, MAX_BODY + 300)),
    st.builds(near_the_limit, valid_events, st.integers(MAX_BODY + 1, 2 * MAX_BODY)),
    json_values.map(lambda value: json.dumps(value).encode()),
    st.sampled_from(
        [
            b"",
            b"null",
            b"\xef\xbb\xbf" + token_event("bom", 1),
            token_event("trailing", 1) + b" x",
            b'{"SourceId": NaN}',
            b'{"SourceId":"a\\ud800","DestinationId":"d","Event":{"Type":"DISCONNECT"}}',
            b'{"SourceId":"a","SourceId":"b","DestinationId":"d","Event":{"Type":"DISCONNECT"}}',
        ]
    ),
)

# --- properties -------------------------------------------------------------------------------


# Any bytes a client library can send, read as the lenient codec reads them (and sent back as
# those bytes by this process's codec): text, or bytes that are not UTF-8.
def wire_text(max_chars: int, max_bytes: int) -> st.SearchStrategy[str]:
    """Return short text, or raw bytes that are rarely UTF-8, as a producer may send either."""
    return st.text(max_size=max_chars) | st.binary(max_size=max_bytes).map(text_from_wire)


header_keys = wire_text(30, 120)  # at most 120 bytes: AMQP field names stop at 128
timestamps = st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2100, 1, 1)).map(
    lambda moment: moment.replace(microsecond=0, tzinfo=dt.UTC)
)
header_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)  # RabbitMQ has no inf
    | st.decimals(places=2, min_value=-(10**6), max_value=10**6)
    | wire_text(300, 300)
    | st.binary(max_size=64).map(bytearray)
    | timestamps
    | typed_values,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(header_keys, inner, max_size=3),
    max_leaves=8,
)
short_strings = wire_text(60, 240)  # at most 240 bytes: AMQP short strings stop at 255
properties = st.fixed_dictionaries(
    {},
    optional={
        "headers": st.dictionaries(header_keys, header_values, max_size=6),
        "correlation_id": short_strings,
        "content_type": short_strings,
        "content_encoding": short_strings,
        "type": short_strings,
        "app_id": short_strings,
        "reply_to": short_strings,
        # Any 64-bit value: seconds, milliseconds, microseconds, nanoseconds, or nonsense.
        "timestamp": timestamps | st.integers(0, 2**64 - 1).map(RawTimestamp.of),
        "priority": st.integers(0, 255),
        # Appended to the ledger's message_id: the id may hold any bytes too.
        ID_SUFFIX: st.just("") | wire_text(10, 40),
    },
)
long_header = st.none() | st.integers(1000, 10_000).map(lambda size: "ü\n\x00" * (size // 3))


def collect_examples() -> list[tuple[bytes, Json]]:
    """Draw the examples with hypothesis, deterministically; keep those a producer can send."""
    examples: list[tuple[bytes, Json]] = []

    @settings(
        max_examples=EXAMPLES,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        deadline=None,
    )
    @given(bodies, properties, long_header)
    def collect(body: bytes, props: Json, long_value: str | None) -> None:
        if long_value is not None:
            props = {**props, "headers": {**props.get("headers", {}), "long": long_value}}
        examples.append((body, props))

    collect()
    return examples


@pytest.fixture(scope="module")
def hostile_examples() -> list[tuple[bytes, Json]]:
    """Return the fuzzed (body, properties) pairs, drawn once per run."""
    return collect_examples()


def without_suffix(props: Json) -> Json:
    """Return the AMQP properties of an example, without the message_id suffix it drew."""
    return {name: value for name, value in props.items() if name != ID_SUFFIX}


def expected_delivery(body: bytes) -> bool:
    """Return True when the worker must deliver the body: within the limit and API-valid."""
    return len(body) <= MAX_BODY and request_key(body) is not None


def routing_key(body: bytes, index: int) -> str:
    """Key valid events by conversation, as producers do; spread the rest over partitions."""
    try:
        return conversation_key(json.loads(body))
    except Exception:  # no conversation in a hostile body
        return f"junk-{index}"


async def test_fuzzed_bodies_and_properties_end_delivered_or_malformed(
    broker: Broker,
    simulator: ConnectSimulator,
    start_worker: StartWorker,
    hostile_examples: list[tuple[bytes, Json]],
) -> None:
    # Given 2000 fuzzed events published with confirms, valid ones among them
    examples = hostile_examples
    assert len(examples) >= EXAMPLES
    ledger = Ledger()
    sent_properties: dict[str, Json] = {}
    for start in range(0, len(examples), 50):
        batch = [
            (f"fuzz-{i:05d}{props.get(ID_SUFFIX, '')}", body, i, without_suffix(props))
            for i, (body, props) in enumerate(examples[start : start + 50], start)
        ]
        with raw_values():
            await asyncio.gather(
                *(
                    ledger.publish(broker, body, mid, routing_key(body, i), **props)
                    for mid, body, i, props in batch
                )
            )
        sent_properties.update({mid: props for mid, _, _, props in batch})
    must_deliver = {mid for mid, body in ledger.published.items() if expected_delivery(body)}
    print(f"\nfuzz: {len(examples)} examples, {len(must_deliver)} valid")
    assert 200 <= len(must_deliver) <= len(examples) - 500, "the mix lost its balance"

    # When one worker with a 64 KiB body limit consumes them all
    worker = await start_worker(WORKER_MAX_BODY_BYTES=str(MAX_BODY))
    port = worker.port

    async def all_settled() -> bool:
        return len(simulator.received) + await dead_letter_total(broker) >= len(examples)

    await wait_until(all_settled, timeout=120, every=0.5)
    await wait_until(lambda: quiescent(broker, port), timeout=30, every=0.25)

    # Then the valid ones reached Connect, the others are MalformedEvent dead letters, unchanged
    await ledger.collect_dead_letters(broker)
    tally = ledger.tally(simulator)
    print(f"fuzz: {tally.summary()}")
    assert tally.lost == []
    assert tally.strangers == 0
    assert tally.duplicates == 0
    assert set(tally.dead_lettered) <= {"MalformedEvent"}
    letters = ledger.dead_letters["MalformedEvent"]
    assert {letter.message_id for letter in letters} == set(ledger.published) - must_deliver
    for letter in letters:
        assert letter.message_id is not None
        assert letter.body == ledger.published[letter.message_id]
        assert_properties_kept(letter, sent_properties[letter.message_id])
    assert tally.delivered == len(must_deliver)

    # And the worker lived through it, and stops cleanly
    assert worker.process.returncode is None
    assert not [line for line in worker.log_lines() if "unexpected_error" in line]
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0


KEPT_PROPERTIES = (
    "correlation_id",
    "content_type",
    "content_encoding",
    "type",
    "app_id",
    "reply_to",
)


def assert_properties_kept(letter: Any, sent: Json) -> None:
    """Check that a dead letter carries the properties and headers its original was sent with."""
    # aio-pika sends an empty short string as an absent property: compare them as equal.
    for name in KEPT_PROPERTIES:
        kept, original = getattr(letter, name) or None, sent.get(name) or None
        assert kept == original, (letter.message_id, name)
    if "timestamp" in sent:
        stamp = sent["timestamp"]
        expected = stamp.read_back() if isinstance(stamp, RawTimestamp) else stamp
        assert letter.timestamp == expected, letter.message_id
    assert (letter.priority or 0) == sent.get("priority", 0), letter.message_id
    headers = letter.headers or {}
    for name, value in (sent.get("headers") or {}).items():
        if name not in REPLACED_HEADERS:
            assert normalised(headers.get(name)) == normalised(value), (letter.message_id, name)
    assert headers["x-error-variant"] == "MalformedEvent"


def normalised(value: Any) -> Any:
    """Compare header values as the AMQP table types carry them."""
    if isinstance(value, Typed):
        return normalised(value.value)
    if isinstance(value, dict):
        return {key: normalised(item) for key, item in value.items()}
    if isinstance(value, list):
        return [normalised(item) for item in value]
    if isinstance(value, Decimal):
        return ("decimal", value.normalize())
    if isinstance(value, bytes | bytearray):
        return ("bytes", bytes(value))
    return value


# --- properties other AMQP clients send ---------------------------------------------------------


class MicrosecondTimestamp(dt.datetime):
    """A moment that goes on the wire in microseconds, as some producers write `timestamp`."""

    def timestamp(self) -> float:
        return super().timestamp() * 1_000_000


async def settle_behind(
    broker: Broker, simulator: ConnectSimulator, ledger: Ledger, prefix: str
) -> tuple[bool, Tally]:
    """Publish 40 ordinary events behind what the ledger holds; give the worker 15 s for all.

    Return whether every event was delivered or dead-lettered in time, and the tally.
    """
    await ledger.publish_tokens(broker, 40, prefix=prefix)
    settled = True
    try:
        await wait_until(lambda: drained(broker, ledger, simulator), timeout=15, every=0.25)
    except AssertionError:
        settled = False
    await ledger.collect_dead_letters(broker)
    return settled, ledger.tally(simulator)


async def test_a_timestamp_in_microseconds_does_not_stall_the_worker(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a valid event whose AMQP timestamp is in microseconds
    ledger = Ledger()
    worker = await start_worker()
    port = worker.port
    poison = "timestamp-in-microseconds"
    stamp = MicrosecondTimestamp.now(dt.UTC)
    await ledger.publish(broker, token_event(poison, 999), poison, timestamp=stamp)

    # When 40 ordinary events follow, and the worker has had 15 seconds for all 41
    settled, tally = await settle_behind(broker, simulator, ledger, "behind-the-timestamp")
    reconnects = sum("Could not unmarshal" in line for line in worker.log_lines())
    print(f"\nmicrosecond timestamp: {tally.summary()}; unmarshal failures logged: {reconnects}")

    # Then every event was delivered or dead-lettered, and the worker is ready
    assert worker.process.returncode is None
    assert settled, f"{len(tally.lost)} events still not delivered after 15 s"
    assert await readiness(port) == 200


# Just under RabbitMQ's default frame_max (131072 bytes), which bounds a content header frame.
FRAME_FILLING_HEADER = 130_900


async def test_a_malformed_event_with_frame_filling_headers_does_not_stall_the_worker(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a body that is not JSON whose headers fill the frame the broker accepts
    ledger = Ledger()
    worker = await start_worker()
    port = worker.port
    padding = {"padding": "x" * FRAME_FILLING_HEADER}
    await ledger.publish(broker, b"not json", "frame-filling-headers", headers=padding)

    # When 40 ordinary events follow, and the worker has had 15 seconds for all 41
    settled, tally = await settle_behind(broker, simulator, ledger, "behind-the-headers")
    frame_errors = sum("frame_too_large" in line for line in worker.log_lines())
    print(f"\nframe-filling headers: {tally.summary()}; frame_too_large closes: {frame_errors}")

    # Then the malformed event is dead-lettered (in some form), the others delivered
    assert worker.process.returncode is None
    assert settled, f"{len(tally.lost)} events still not delivered or dead-lettered after 15 s"
    assert await readiness(port) == 200


async def test_a_malformed_event_with_a_binary_header_is_dead_lettered(
    broker: Broker, simulator: ConnectSimulator, start_worker: StartWorker
) -> None:
    # Given a body that is not JSON, sent with a header whose long string is binary
    ledger = Ledger()
    worker = await start_worker()
    trace = text_from_wire(b"\xff\xfe\x00binary")  # goes out as these bytes
    await ledger.publish(broker, b"\x00not json", "binary-header", headers={"trace": trace})

    # When the worker has handled it
    async def dead_lettered() -> bool:
        return await dead_letter_total(broker) > 0

    await wait_until(dead_lettered, timeout=10, every=0.25)

    # Then it is a MalformedEvent dead letter, its header kept byte for byte, as a string
    [letter] = await broker.take_dead_letters("MalformedEvent")
    assert letter.body == b"\x00not json"
    assert letter.headers is not None
    assert text_to_wire(letter.headers["trace"]) == b"\xff\xfe\x00binary"
    assert not [line for line in worker.log_lines() if "dead_letter.publish_failed" in line]
    worker.signal(signal.SIGTERM)
    assert await worker.wait() == 0
