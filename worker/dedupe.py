"""Remember which events Connect accepted, so that a redelivered one is not sent again.

The API has no idempotency token, and RabbitMQ redelivers an event whose ack was lost (a
crash, a cut connection). The ledger remembers the message_id of every accepted event for a
window; a redelivery inside the window is acked without a call. In memory by default (one
replica's own redeliveries); in Redis when `WORKER_REDIS_URL` is set, shared by every replica.
An event without a message_id cannot be recognised, and is sent again.
"""

import time
from collections import OrderedDict
from typing import Protocol

from redis.asyncio import Redis


class DeliveredLedger(Protocol):
    """What the consumer needs of a ledger."""

    async def seen(self, message_id: str) -> bool:
        """Return True if this message_id was delivered within the window."""
        ...

    async def remember(self, message_id: str) -> None:
        """Note that this message_id was delivered."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class MemoryLedger:
    """A bounded, time-windowed set of message_ids in this process.

    It only has to recognise this process's own redeliveries (at most `prefetch` events, back
    within seconds of a cut connection), so a few thousand entries are plenty; the cap bounds
    its memory (about 200 bytes an entry).
    """

    def __init__(self, window_seconds: float, max_entries: int = 20_000) -> None:
        self._window = window_seconds
        self._max = max_entries
        self._delivered: OrderedDict[str, float] = OrderedDict()

    async def seen(self, message_id: str) -> bool:
        """Return True if this message_id was delivered within the window."""
        self._expire(time.monotonic())
        return message_id in self._delivered

    async def remember(self, message_id: str) -> None:
        """Note a delivery; the oldest entries go first when the ledger is full."""
        self._delivered[message_id] = time.monotonic()
        self._delivered.move_to_end(message_id)
        while len(self._delivered) > self._max:
            self._delivered.popitem(last=False)

    async def close(self) -> None:
        """Nothing to release."""

    def _expire(self, now: float) -> None:
        """Forget deliveries older than the window (they are in insertion order)."""
        while self._delivered:
            oldest, at = next(iter(self._delivered.items()))
            if now - at < self._window:
                return
            del self._delivered[oldest]


class RedisLedger:
    """Message_ids in Redis, with the window as their expiry, shared by all replicas."""

    def __init__(self, url: str, namespace: str, window_seconds: float) -> None:
        self._redis: Redis = Redis.from_url(url)
        self._prefix = f"{namespace}:delivered:"
        self._window = max(1, int(window_seconds))

    async def seen(self, message_id: str) -> bool:
        """Return True if any replica delivered this message_id within the window."""
        return bool(await self._redis.exists(self._prefix + message_id))

    async def remember(self, message_id: str) -> None:
        """Note a delivery, expiring after the window."""
        await self._redis.set(self._prefix + message_id, b"1", ex=self._window)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
