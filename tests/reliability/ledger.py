"""The reliability ledger: every event a test published, and where each one ended.

Connect (the simulator) records request bodies, not AMQP properties, so an event is recognised
by its request: the canonical JSON of what the worker sends for its body. Tests that need an
exact mapping put the message_id into `Content` (`token_event`); the fuzz relies on counting
(several published events may share one request, and then the arrivals are counted against
them as a multiset).
"""

import asyncio
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError
from redis.asyncio import Redis

from tests.integration.support import Broker, chat_event, encode, metric, readiness
from worker.models import ChatIntegrationEvent, conversation_key
from worker.pipeline.dedupe import Fingerprint, RedisLedger
from worker.pipeline.errors import ErrorVariant
from worker.testing.simulator import ConnectSimulator

REDIS_URL = "redis://127.0.0.1:6379/0"

Json = dict[str, Any]


def canonical(request: Json) -> str:
    """Return one spelling of a request, whatever its key order."""
    return json.dumps(request, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def request_key(body: bytes) -> str | None:
    """Return the canonical request the worker sends for a body, or None if it is malformed."""
    try:
        return canonical(ChatIntegrationEvent.model_validate_json(body).to_request())
    except ValidationError:
        return None


def token_event(token: str, conversation: int, destination: str = "agent") -> bytes:
    """Return a valid MESSAGE event whose Content is the token (the message_id, usually)."""
    return encode(chat_event(f"+1555{conversation:07d}", destination, token))


@dataclass
class Tally:
    """Where the published events ended, counted against the ledger."""

    published: int
    delivered: int
    dead_lettered: Counter[str]
    lost: list[str]
    duplicates: int
    dead_letter_duplicates: int
    strangers: int
    """Arrivals or dead letters that no published event explains."""

    def summary(self) -> str:
        """Return one line for the test output."""
        return (
            f"published={self.published} delivered={self.delivered} "
            f"dead_lettered={dict(self.dead_lettered)} lost={len(self.lost)} "
            f"duplicates={self.duplicates} dead_letter_duplicates={self.dead_letter_duplicates} "
            f"strangers={self.strangers}"
        )


@dataclass
class Ledger:
    """The set of message_ids a test published, with their bodies."""

    published: dict[str, bytes] = field(default_factory=dict)
    dead_letters: dict[str, list[AbstractIncomingMessage]] = field(
        default_factory=lambda: defaultdict(list)
    )

    async def publish(
        self,
        broker: Broker,
        body: bytes,
        message_id: str,
        routing_key: str | None = None,
        **properties: Any,
    ) -> str:
        """Publish with confirms under a message_id the ledger has not seen; record it."""
        assert message_id not in self.published, f"message_id {message_id} reused"
        self.published[message_id] = body
        key = routing_key or routing_key_of(body)
        await broker.publish(body, routing_key=key, message_id=message_id, **properties)
        return message_id

    async def publish_tokens(
        self, broker: Broker, count: int, prefix: str, conversations: int = 50
    ) -> list[str]:
        """Publish `count` token events spread over conversations, a few confirms at a time."""
        ids = [f"{prefix}-{index:05d}" for index in range(count)]
        for start in range(0, count, 50):
            batch = ids[start : start + 50]
            await asyncio.gather(
                *(
                    self.publish(broker, token_event(mid, index % conversations), mid)
                    for index, mid in enumerate(batch, start)
                )
            )
        return ids

    async def collect_dead_letters(self, broker: Broker) -> int:
        """Take every dead letter out of the broker into the ledger; return how many there were."""
        taken = 0
        for variant in ErrorVariant:
            letters = await broker.take_dead_letters(variant.value)
            self.dead_letters[variant.value].extend(letters)
            taken += len(letters)
        return taken

    def tally(self, simulator: ConnectSimulator) -> Tally:
        """Count deliveries, dead letters, losses and duplicates against what was published."""
        arrivals = Counter(canonical(call["body"]) for call in simulator.received)
        dead = Counter(
            letter.message_id for letters in self.dead_letters.values() for letter in letters
        )
        expected: dict[str | None, list[str]] = defaultdict(list)
        for message_id, body in self.published.items():
            if message_id not in dead:
                expected[request_key(body)].append(message_id)
        lost: list[str] = []
        duplicates = delivered = 0
        for key, ids in expected.items():
            arrived = arrivals.pop(key, 0) if key is not None else 0
            delivered += min(arrived, len(ids))
            duplicates += max(0, arrived - len(ids))
            lost.extend(ids[arrived:])
        # Requests of dead-lettered events that also reached Connect are duplicates too.
        for dead_id in dead:
            dead_key = request_key(self.published.get(dead_id or "", b""))
            if dead_key is not None and arrivals.get(dead_key, 0) > 0:
                arrivals[dead_key] -= 1
                duplicates += 1
        strangers = sum(arrivals.values()) + sum(1 for mid in dead if mid not in self.published)
        return Tally(
            published=len(self.published),
            delivered=delivered,
            dead_lettered=Counter(
                {variant: len(letters) for variant, letters in self.dead_letters.items() if letters}
            ),
            lost=lost,
            duplicates=duplicates,
            dead_letter_duplicates=sum(count - 1 for count in dead.values()),
            strangers=strangers,
        )

    def settled_at_least(self, simulator: ConnectSimulator, dead_lettered: int) -> bool:
        """Return True once distinct deliveries plus dead letters cover every published event."""
        distinct = {canonical(call["body"]) for call in simulator.received}
        return len(distinct) + dead_lettered >= len(self.published)


def routing_key_of(body: bytes) -> str:
    """Return the conversation key of a body, as a producer sends it; any key for a bad one."""
    try:
        return conversation_key(json.loads(body))
    except Exception:  # a hostile body has no conversation: any key routes it
        return "malformed"


def received_at_least(simulator: ConnectSimulator, count: int) -> Callable[[], bool]:
    """Return a predicate: Connect has accepted at least `count` calls."""
    return lambda: len(simulator.received) >= count


def received_tokens(simulator: ConnectSimulator) -> Counter[str]:
    """Count arrivals by Content (the token of `token_event`)."""
    return Counter(call["body"]["Event"].get("Content", "") for call in simulator.received)


async def dead_letter_total(broker: Broker) -> int:
    """Return how many dead letters wait over every variant."""
    return sum([await broker.dead_letter_count(variant.value) for variant in ErrorVariant])


async def drained(broker: Broker, ledger: Ledger, simulator: ConnectSimulator) -> bool:
    """Return True once every published event was delivered or dead-lettered."""
    return ledger.settled_at_least(simulator, await dead_letter_total(broker))


async def quiescent(broker: Broker, port: int) -> bool:
    """Return True when the worker is ready, holds nothing, and no event waits in its queues."""
    if await readiness(port) != 200:
        return False
    return await metric(port, "chat_worker_in_flight") == 0 and await broker.work_count() == 0


async def remembered_ids(redis: Redis, base: str, ledger: Ledger) -> set[str]:
    """Return the published message_ids whose event the Redis ledger remembers as delivered.

    Fails if the ledger holds an event key that matches no published event.
    """
    keys = RedisLedger(REDIS_URL, base, 60)
    remembered = {
        message_id
        for message_id, body in ledger.published.items()
        if await redis.exists(keys.keys(Fingerprint.of(message_id, body))[0])
    }
    stored = [key async for key in redis.scan_iter(f"{base}:delivered:v2:*", count=1000)]
    assert len(stored) == len(remembered), "the ledger remembers events nobody published"
    return remembered
