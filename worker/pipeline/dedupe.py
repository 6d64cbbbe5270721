"""Remember which events Connect accepted, so that a redelivered one is not sent again.

The API has no idempotency token, and RabbitMQ redelivers an event whose ack was lost (a
crash, a cut connection). The ledger remembers every accepted event, by its message_id *and*
its body, for a window; a redelivery inside the window (same id, same body) is acked without a
call. An event that reuses the message_id of another (a producer's counter that restarted, an
id built from a timestamp) is a different event: it is sent, and counted as a reused id. In
memory by default (one replica's own redeliveries); in Redis when `WORKER_REDIS_URL` is set,
shared by every replica. An event without a message_id cannot be recognised, and is sent again.

Redis keys (per base queue name `ns`), each expiring after the window:

- `ns:delivered:v2:<sha256(id \\0 body)>`: this exact event was delivered;
- `ns:delivered:v2id:<sha256(id)>`: an event with this id was delivered (tells a reused id);
- `ns:delivered:<id>`: the key of earlier versions, which knew the id alone. It is still
  written, so that replicas of the earlier version recognise this version's deliveries while a
  rolling deploy runs, and read only when the id has no v2 entry, so that an event an earlier
  replica delivered is not sent again by this one. It can go once no earlier version runs.
"""

import enum
import hashlib
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

from worker.amqp_compat import text_to_wire


class Verdict(enum.Enum):
    """What the ledger knows of an event."""

    NEW = "new"
    """Never delivered within the window: send it."""
    DELIVERED = "delivered"
    """This event (same message_id, same body) was delivered: do not send it again."""
    REUSED_ID = "reused_id"
    """Another event with the same message_id was delivered: send this one too."""


@dataclass(frozen=True)
class Fingerprint:
    """What identifies an event in the ledger; digests only, so no personal data is stored."""

    message_id: str
    id_digest: str
    event_digest: str

    @classmethod
    def of(cls, message_id: str, body: bytes) -> "Fingerprint":
        """Return the fingerprint of an event: its message_id, and its id with its body."""
        raw_id = text_to_wire(message_id)
        event = hashlib.sha256(raw_id + b"\x00" + body).hexdigest()
        return cls(message_id, hashlib.sha256(raw_id).hexdigest(), event)


class DeliveredLedger(Protocol):
    """What the consumer needs of a ledger."""

    async def verdict(self, event: Fingerprint) -> Verdict:
        """Say whether this event, or another with its message_id, was delivered."""
        ...

    async def remember(self, event: Fingerprint) -> None:
        """Note that this event was delivered."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryLedger:
    """A bounded, time-windowed record of delivered events in this process.

    It only has to recognise this process's own redeliveries (at most `prefetch` events, back
    within seconds of a cut connection), so a few thousand entries are plenty; the cap bounds
    its memory (about 300 bytes an entry).
    """

    def __init__(
        self,
        window_seconds: float,
        max_entries: int = 20_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._window = window_seconds
        self._max = max_entries
        self._clock = clock
        # event digest -> (id digest, delivered at), oldest first; and how many of those
        # events carry each id digest.
        self._delivered: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._ids: Counter[str] = Counter()

    async def verdict(self, event: Fingerprint) -> Verdict:
        """Say whether this event, or another with its message_id, was delivered."""
        self._expire(self._clock())
        if event.event_digest in self._delivered:
            return Verdict.DELIVERED
        return Verdict.REUSED_ID if self._ids[event.id_digest] else Verdict.NEW

    async def remember(self, event: Fingerprint) -> None:
        """Note a delivery; the oldest entries go first when the ledger is full."""
        self._forget(event.event_digest)
        self._delivered[event.event_digest] = (event.id_digest, self._clock())
        self._ids[event.id_digest] += 1
        while len(self._delivered) > self._max:
            self._forget(next(iter(self._delivered)))

    async def close(self) -> None:
        """Nothing to release."""

    def _expire(self, now: float) -> None:
        """Forget deliveries older than the window (they are in insertion order)."""
        while self._delivered:
            oldest, (_, at) = next(iter(self._delivered.items()))
            if now - at < self._window:
                return
            self._forget(oldest)

    def _forget(self, event_digest: str) -> None:
        """Drop one delivered event, if known."""
        known = self._delivered.pop(event_digest, None)
        if known is not None:
            self._ids[known[0]] -= 1
            if not self._ids[known[0]]:
                del self._ids[known[0]]


class RedisLedger:
    """Delivered events in Redis, with the window as their expiry, shared by all replicas."""

    def __init__(self, url: str, namespace: str, window_seconds: float) -> None:
        self._redis: Redis = Redis.from_url(url)
        self._prefix = f"{namespace}:delivered:"
        self._window = max(1, int(window_seconds))

    def keys(self, event: Fingerprint) -> tuple[bytes, bytes, bytes]:
        """Return the event's key, its id's key, and the key earlier versions used."""
        prefix = self._prefix.encode()
        return (
            prefix + b"v2:" + event.event_digest.encode(),
            prefix + b"v2id:" + event.id_digest.encode(),
            prefix + text_to_wire(event.message_id),
        )

    async def verdict(self, event: Fingerprint) -> Verdict:
        """Say whether any replica delivered this event, or another with its id."""
        event_key, id_key, legacy_key = self.keys(event)
        exact, same_id, legacy = await self._redis.mget(event_key, id_key, legacy_key)
        if exact is not None:
            return Verdict.DELIVERED
        if same_id is not None:
            return Verdict.REUSED_ID
        # Delivered by a replica of an earlier version, which recorded the id alone.
        return Verdict.DELIVERED if legacy is not None else Verdict.NEW

    async def remember(self, event: Fingerprint) -> None:
        """Note a delivery under every key, expiring after the window."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in self.keys(event):
                pipe.set(key, b"1", ex=self._window)
            await pipe.execute()

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
