"""Inspect, redrive and purge the dead-letter queues: `chat-worker dlq list|show|redrive|purge`.

Every subcommand uses a plain connection (`worker.broker.connect_plain`, which says why).

Reading never brings a dead letter closer to a delivery limit. On a quorum queue every message
handed back (nack, reject, or a channel closed while it was unacked) counts as a delivery on
RabbitMQ 3.10-4.2 (4.3: all but nack), and RabbitMQ 4.0-4.2 drop a message at 20 by default.
So `list` only counts, from passive queue declarations, and `show` takes no message back: it
passes over the whole queue once (`pass_over`), printing the first ones and putting each back as
a confirmed copy at the tail before acking the original, which keeps the order and starts each
copy's count afresh. Its cost grows with the queue. Dead-letter queues have no consumer, so
nobody else receives them meanwhile.

`redrive` publishes each dead letter to the input exchange (routing key: its
`x-original-routing-key`) with publisher confirms and mandatory routing, and acks it in its
dead-letter queue only once the broker has confirmed: a crash midway loses nothing and at worst
duplicates one event. It moves at most the messages present when it started, so an event that
fails again while it runs is not redriven twice.

Retention: dead letters hold personal data (phone numbers, message content), so keep them no
longer than needed. `chat-worker dlq purge --older-than 7d` removes from each queue the dead
letters whose `x-failed-at` (else their `x-death` time) is older than the period, in one pass
like `show`'s, so that the younger ones are not handed back. It needs no `--yes`: run it from
cron or a Kubernetes CronJob; finding nothing old is a success.

Exit codes: 0 done, 1 nothing done or refused (no `--yes`, nothing to redrive, missing queue),
2 usage error, and the broker's own codes (`worker.problems.ExitCode`) when it cannot be reached
or refuses us.
"""

import argparse
import hashlib
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage, HeadersType
from aio_pika.exceptions import ChannelNotFoundEntity, DeliveryError

from worker.broker import connect_plain
from worker.observability import scrub
from worker.ops.publish import routing_key_for
from worker.pipeline.envelope import copy_message, iso_utc
from worker.pipeline.errors import ErrorVariant
from worker.settings import WorkerSettings
from worker.topology import dead_letter_queue_name, input_exchange_name

EXIT_OK = 0
EXIT_NOTHING_DONE = 1

REDRIVE_COUNT = "x-redrive-count"
# The dead-letter queue's own count of our peeks: meaningless once the message leaves it.
DEAD_LETTER_QUEUE_HEADERS = frozenset({"x-delivery-count"})
PROGRESS_ABOVE = 100

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}

AddSettingsFlags = Callable[[argparse.ArgumentParser], None]


# --- Pure helpers -------------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """Parse a positive duration such as `90s`, `15m`, `12h` or `7d`."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"invalid duration {text!r}: use a number with s, m, h or d, e.g. 7d")
    seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2).lower()]
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: must be more than zero")
    return timedelta(seconds=seconds)


# C0 and C1 controls (ESC and CSI start ANSI sequences), DEL, and the bidi controls that
# reorder what a terminal shows.
_UNSAFE_FOR_TERMINAL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]"
)
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def terminal_safe(text: str) -> str:
    """Escape control characters so that a text prints as itself on a terminal.

    Message ids, headers and bodies are the producers' text: printed raw, an escape sequence
    in them could recolour, hide or rewrite what the operator reads, or the terminal's title.
    """

    def escape(match: re.Match[str]) -> str:
        char = match.group()
        code = ord(char)
        return _SHORT_ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")

    return _UNSAFE_FOR_TERMINAL.sub(escape, text)


def header_text(value: Any) -> str:
    """Render a header value for a terminal; `x-death` as the broker's reasons."""
    if isinstance(value, list | tuple) and value and all(isinstance(v, Mapping) for v in value):
        return "; ".join(
            f"{header_text(v.get('reason'))} from {header_text(v.get('queue'))} "
            f"x{header_text(v.get('count'))} at {header_text(v.get('time'))}"
            for v in value
        )
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, datetime):
        return iso_utc(value)
    return str(value)


def failed_at(headers: Mapping[str, Any], timestamp: datetime | None = None) -> datetime | None:
    """Return when a dead letter failed: `x-failed-at`, the broker's `x-death`, or its timestamp."""
    raw = headers.get("x-failed-at")
    if raw is not None:
        try:
            moment = datetime.fromisoformat(header_text(raw))
        except ValueError:
            moment = None
        if moment is not None:
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    death = broker_death(headers)
    if isinstance(death.get("time"), datetime):
        timestamp = death["time"]
    if timestamp is not None:
        return timestamp if timestamp.tzinfo else timestamp.replace(tzinfo=UTC)
    return None


def broker_death(headers: Mapping[str, Any]) -> Mapping[str, Any]:
    """Return the latest `x-death` entry the broker wrote (reason, queue, time), or nothing."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list | tuple) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return {}


def describe_body(body: bytes) -> str:
    """Describe a body without its content: size, SHA-256 prefix and JSON field names."""
    summary = f"{len(body)} bytes, sha256 {hashlib.sha256(body).hexdigest()[:16]}"
    try:
        value = json.loads(body)
    except (ValueError, RecursionError):
        return f"{summary}, not JSON"
    if not isinstance(value, dict):
        return f"{summary}, JSON {type(value).__name__}"
    return f"{summary}, JSON fields: {json_field_names(value)}"


def json_field_names(event: Mapping[str, Any]) -> str:
    """List an object's keys, and the keys of its object values one level down (no values)."""
    names = []
    for key in sorted(event, key=str):
        value = event[key]
        if isinstance(value, dict) and value:
            names.append(f"{str(key)[:64]}{{{', '.join(sorted(str(k)[:64] for k in value))}}}")
        else:
            names.append(str(key)[:64])
    return ", ".join(names)


def redrive_count(headers: Mapping[str, Any]) -> int:
    """Return how many times a dead letter has been redriven already."""
    try:
        return max(0, int(header_text(headers.get(REDRIVE_COUNT, "0"))))
    except ValueError:
        return 0


def redriven_headers(headers: Mapping[str, Any]) -> HeadersType:
    """Return the headers of a redriven dead letter: the same, with `x-redrive-count` + 1."""
    kept: HeadersType = {
        name: value for name, value in headers.items() if name not in DEAD_LETTER_QUEUE_HEADERS
    }
    kept[REDRIVE_COUNT] = str(redrive_count(headers) + 1)
    return kept


def redrive_routing_key(headers: Mapping[str, Any], body: bytes) -> str:
    """Return the routing key a dead letter was first published with (the conversation key)."""
    original = header_text(headers.get("x-original-routing-key") or "")
    return original or routing_key_for(body)


def redriven_message(message: AbstractIncomingMessage) -> aio_pika.Message:
    """Return a dead letter as it goes back to the input exchange: body and properties kept."""
    return copy_message(message, redriven_headers(message.headers or {}))


# --- Reading the queues --------------------------------------------------------------------


@dataclass(frozen=True)
class QueueState:
    """One dead-letter queue as `list` reports it; `messages` is None when it does not exist."""

    variant: str
    queue: str
    messages: int | None


async def count_messages(connection: AbstractConnection, queue_name: str) -> int:
    """Return a queue's ready count from a passive declaration: no message is touched."""
    async with connection.channel() as channel:
        queue = await channel.declare_queue(queue_name, passive=True)
        return queue.declaration_result.message_count or 0


Keep = Callable[[AbstractIncomingMessage], bool]


def keep_all(message: AbstractIncomingMessage) -> bool:
    """Keep every message (`dlq show`)."""
    return True


async def pass_over(
    connection: AbstractConnection, queue_name: str, keep: Keep, hold: int = 0
) -> tuple[int, list[AbstractIncomingMessage]]:
    """Visit every message present at the start, once; return the count and the first kept.

    At most `hold` kept messages are returned, the first ones in queue order.

    A kept message is put back as a confirmed copy at the tail, then the original is acked; the
    others are acked only. Handing a message back would count as a delivery on a quorum queue,
    and at a delivery limit (20 by default on RabbitMQ 4.0-4.2) the broker drops it; a copy
    starts afresh. Passing over the whole queue keeps its order; a crash midway duplicates at
    most one message and loses none.
    """
    channel = connection.channel(publisher_confirms=True, on_return_raises=True)
    kept: list[AbstractIncomingMessage] = []
    async with channel:
        queue = await channel.declare_queue(queue_name, passive=True)
        count = queue.declaration_result.message_count or 0
        for _ in range(count):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                break
            if keep(message):
                copy = copy_message(message, dead_letter_queue_free(message.headers or {}))
                await channel.default_exchange.publish(copy, queue_name, mandatory=True)
                if len(kept) < hold:
                    kept.append(message)
            await message.ack()
    return count, kept


def dead_letter_queue_free(headers: Mapping[str, Any]) -> HeadersType:
    """Return the headers without the dead-letter queue's own delivery count."""
    return {k: v for k, v in headers.items() if k not in DEAD_LETTER_QUEUE_HEADERS}


async def queue_state(connection: AbstractConnection, base: str, variant: str) -> QueueState:
    """Count one dead-letter queue."""
    name = dead_letter_queue_name(base, variant)
    try:
        return QueueState(variant, name, await count_messages(connection, name))
    except ChannelNotFoundEntity:
        return QueueState(variant, name, None)


def chosen_variants(variant: str | None) -> list[str]:
    """Return the variants a command acts on: the one given, or all of them."""
    return [variant] if variant else [v.value for v in ErrorVariant]


# --- list ----------------------------------------------------------------------------------


async def list_queues(connection: AbstractConnection, base: str, as_json: bool) -> int:
    """Print every dead-letter queue with its count (`dlq show` tells when its head failed)."""
    states = [await queue_state(connection, base, v) for v in chosen_variants(None)]
    if as_json:
        print(json.dumps([_state_json(state) for state in states], indent=2))
    else:
        print(_state_table(states))
    missing = [state.queue for state in states if state.messages is None]
    if missing:
        _complain(f"missing queue(s) {', '.join(missing)}; run `chat-worker declare`")
        return EXIT_NOTHING_DONE
    return EXIT_OK


def _state_json(state: QueueState) -> dict[str, Any]:
    """Return one queue's state as JSON-ready data."""
    return asdict(state) | {"exists": state.messages is not None}


def _state_table(states: Sequence[QueueState]) -> str:
    """Lay the queue states out as an aligned table."""
    rows = [("VARIANT", "MESSAGES", "QUEUE")]
    for state in states:
        count = "missing" if state.messages is None else str(state.messages)
        rows.append((state.variant, count, state.queue))
    widths = [max(len(row[column]) for row in rows) for column in range(2)]
    return "\n".join(f"{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]}" for row in rows)


# --- show ----------------------------------------------------------------------------------


async def show_messages(
    connection: AbstractConnection, base: str, variant: str | None, limit: int, reveal: bool
) -> int:
    """Print up to `limit` dead letters of each chosen queue; bodies masked unless `reveal`."""
    shown = 0
    for name in (dead_letter_queue_name(base, v) for v in chosen_variants(variant)):
        count, messages = await pass_over(connection, name, keep_all, hold=limit)
        if not messages:
            continue
        print(f"== {name}: {count} message(s), showing {len(messages)}")
        for position, message in enumerate(messages, start=1):
            print(f"-- {position}")
            print("\n".join(f"  {line}" for line in message_lines(message, reveal)))
        shown += len(messages)
    if not shown:
        print("no dead letters")
    return EXIT_OK


def message_lines(message: AbstractIncomingMessage, reveal: bool) -> list[str]:
    """Describe one dead letter: properties, headers, and its body (masked unless `reveal`)."""
    fields: list[tuple[str, str]] = [
        ("message_id", message.message_id or "-"),
        ("correlation_id", message.correlation_id or "-"),
        ("timestamp", iso_utc(message.timestamp) if message.timestamp else "-"),
        ("content_type", message.content_type or "-"),
    ]
    for name, value in (message.headers or {}).items():
        if name in DEAD_LETTER_QUEUE_HEADERS:
            continue
        text = header_text(value)
        # Connect's error texts may echo the input, a phone number included.
        fields.append((name, text if reveal or name != "x-error-message" else scrub(text, 1024)))
    body = message.body.decode("utf-8", errors="replace") if reveal else None
    fields.append(("body", body if body is not None else describe_body(message.body)))
    safe = [(terminal_safe(name), terminal_safe(value)) for name, value in fields]
    width = max(len(name) for name, _ in safe)
    return [f"{name:<{width}}  {value}" for name, value in safe]


# --- redrive -------------------------------------------------------------------------------


class Progress:
    """Write `redriven N/TOTAL` on one stderr line when a redrive is long enough to wait for."""

    def __init__(self, total: int, stream: TextIO = sys.stderr) -> None:
        self.total = total
        self.done = 0
        self._stream = stream
        self._shown = total > PROGRESS_ABOVE

    def advance(self) -> None:
        """Count one more message moved."""
        self.done += 1
        if self._shown and (self.done % 50 == 0 or self.done == self.total):
            self._stream.write(f"\r redriven {self.done}/{self.total}")
            self._stream.flush()

    def finish(self) -> None:
        """End the progress line."""
        if self._shown and self.done:
            self._stream.write("\n")
            self._stream.flush()


async def redrive_plan(
    connection: AbstractConnection, base: str, variant: str | None, limit: int | None
) -> list[tuple[str, int, int]]:
    """Return (queue, messages in it, messages to move) per chosen queue, within `limit`."""
    plan = []
    left = limit
    for name in (dead_letter_queue_name(base, v) for v in chosen_variants(variant)):
        count = await count_messages(connection, name)
        moving = count if left is None else min(count, left)
        if left is not None:
            left -= moving
        plan.append((name, count, moving))
    return plan


async def redrive(
    connection: AbstractConnection,
    base: str,
    variant: str | None,
    limit: int | None,
    dry_run: bool,
) -> int:
    """Move dead letters back to the input exchange, or say what would move."""
    plan = await redrive_plan(connection, base, variant, limit)
    steps = [(name, count, moving) for name, count, moving in plan if moving]
    exchange = input_exchange_name(base)
    verb = "would redrive" if dry_run else "redriving"
    for name, count, moving in steps:
        print(f"{verb} {moving} of {count} dead letter(s) from {name} to exchange {exchange!r}")
    total = sum(moving for _, _, moving in steps)
    if not total:
        print("nothing to redrive")
        return EXIT_NOTHING_DONE
    if dry_run:
        return EXIT_OK
    progress = Progress(total)
    try:
        for name, _, moving in steps:
            await redrive_queue(connection, base, name, moving, progress)
    except DeliveryError:
        _complain(
            f"exchange {exchange!r} returned a message (no queue bound to it?); "
            f"stopped after {progress.done}, the rest stays dead-lettered"
        )
        return EXIT_NOTHING_DONE
    finally:
        progress.finish()
    print(f"redriven {progress.done} dead letter(s) to exchange {exchange!r}")
    return EXIT_OK


async def redrive_queue(
    connection: AbstractConnection, base: str, queue_name: str, budget: int, progress: Progress
) -> None:
    """Move up to `budget` messages from the head of one dead-letter queue, one at a time."""
    channel = connection.channel(publisher_confirms=True, on_return_raises=True)
    async with channel:
        exchange = await channel.get_exchange(input_exchange_name(base), ensure=True)
        queue = await channel.declare_queue(queue_name, passive=True)
        for _ in range(budget):
            message = await queue.get(no_ack=False, fail=False)
            if message is None:
                return
            routing_key = redrive_routing_key(message.headers or {}, message.body)
            await exchange.publish(redriven_message(message), routing_key, mandatory=True)
            # Ack only once the broker has confirmed the copy: a crash in between duplicates
            # this one event and loses none.
            await message.ack()
            progress.advance()


# --- purge ---------------------------------------------------------------------------------


async def purge(
    connection: AbstractConnection,
    base: str,
    variant: str | None,
    older_than: timedelta | None,
    confirmed: bool,
) -> int:
    """Remove dead letters: those older than a period, or all of them (with `confirmed`)."""
    names = [dead_letter_queue_name(base, v) for v in chosen_variants(variant)]
    if older_than is not None:
        return await purge_older_than(connection, names, older_than)
    return await purge_all(connection, names, confirmed)


async def purge_older_than(
    connection: AbstractConnection, names: Sequence[str], older_than: timedelta
) -> int:
    """Apply the retention period to each queue; finding nothing old is a success."""
    cutoff = datetime.now(UTC) - older_than
    removed = 0
    for name in names:
        removed += await purge_older(connection, name, cutoff)
    print(f"removed {removed} dead letter(s) that failed before {iso_utc(cutoff)}")
    return EXIT_OK


async def purge_all(connection: AbstractConnection, names: Sequence[str], confirmed: bool) -> int:
    """Empty each queue, or, without `confirmed`, say what that would remove and refuse."""
    if not confirmed:
        total = 0
        for name in names:
            count = await count_messages(connection, name)
            if count:
                print(f"would purge {count} dead letter(s) from {name}")
            total += count
        print(f"would purge {total} dead letter(s) in all")
        _complain("refusing to purge without --yes")
        return EXIT_NOTHING_DONE
    removed = 0
    async with connection.channel() as channel:
        for name in names:
            queue = await channel.declare_queue(name, passive=True)
            purged = (await queue.purge()).message_count or 0
            if purged:
                print(f"purged {purged} dead letter(s) from {name}")
            removed += purged
    print(f"purged {removed} dead letter(s)")
    return EXIT_OK


async def purge_older(connection: AbstractConnection, queue_name: str, cutoff: datetime) -> int:
    """Remove the messages that failed before `cutoff`, keeping the others in order."""
    removed = 0

    def young(message: AbstractIncomingMessage) -> bool:
        nonlocal removed
        moment = failed_at(message.headers or {}, message.timestamp)
        if moment is None or moment >= cutoff:
            return True
        removed += 1
        return False

    # Bounded by the count at the start: what fails meanwhile is young anyway.
    await pass_over(connection, queue_name, young)
    if removed:
        print(f"removed {removed} dead letter(s) from {queue_name}")
    return removed


# --- Command line --------------------------------------------------------------------------


def _complain(text: str) -> None:
    """Print a one-line problem on stderr."""
    print(f"chat-worker dlq: {text}", file=sys.stderr)


def _duration_argument(text: str) -> timedelta:
    """Parse `--older-than` for argparse, which turns the error into a usage error."""
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _positive_int(text: str) -> int:
    """Parse a count of at least 1 for argparse."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def add_dlq_parser(commands: Any, add_settings_flags: AddSettingsFlags) -> None:
    """Add `dlq` and its subcommands to the command line."""
    dlq = commands.add_parser("dlq", help="list, show, redrive and purge dead letters")
    actions = dlq.add_subparsers(dest="dlq_command", required=True)
    variants = [v.value for v in ErrorVariant]

    listing = actions.add_parser("list", help="count each dead-letter queue, with oldest age")
    listing.add_argument("--json", action="store_true", help="print JSON")

    show = actions.add_parser("show", help="print dead letters without removing them")
    show.add_argument("--limit", type=_positive_int, default=5, help="per queue (default 5)")
    show.add_argument("--reveal", action="store_true", help="print bodies (personal data)")

    redrive_parser = actions.add_parser("redrive", help="move dead letters to the input exchange")
    redrive_parser.add_argument("--limit", type=_positive_int, help="at most N in all")
    redrive_parser.add_argument("--dry-run", action="store_true", help="say what would move")

    purge_parser = actions.add_parser("purge", help="delete dead letters (all, or older ones)")
    purge_parser.add_argument(
        "--older-than", type=_duration_argument, help="only those failed before, e.g. 7d"
    )
    purge_parser.add_argument("--yes", action="store_true", help="purge without --older-than")

    for parser in (show, redrive_parser, purge_parser):
        parser.add_argument("--variant", choices=variants, help="one queue (default: all)")
    for parser in (listing, show, redrive_parser, purge_parser):
        add_settings_flags(parser)


async def run_dlq(settings: WorkerSettings, args: argparse.Namespace) -> int:
    """Run one `dlq` subcommand; report a missing queue in one line.

    A broker that cannot be reached or refuses us raises its `Problem` (`worker.broker`).
    """
    connection = await connect_plain(settings)
    try:
        async with connection:
            return await _dispatch(connection, settings.queue, args)
    except ChannelNotFoundEntity as error:
        _complain(f"{error}; run `chat-worker declare`")
    return EXIT_NOTHING_DONE


async def _dispatch(connection: AbstractConnection, base: str, args: argparse.Namespace) -> int:
    """Call the function of the chosen subcommand."""
    if args.dlq_command == "list":
        return await list_queues(connection, base, args.json)
    if args.dlq_command == "show":
        return await show_messages(connection, base, args.variant, args.limit, args.reveal)
    if args.dlq_command == "redrive":
        return await redrive(connection, base, args.variant, args.limit, args.dry_run)
    return await purge(connection, base, args.variant, args.older_than, args.yes)
