"""Which partitions this replica consumes, as the active consumer or as a standby.

Each partition queue has a single active consumer: the first subscriber. By default one
replica, the holder of the leader lock, subscribes first everywhere and the others follow as
standbys: with a quota shared by all replicas, one sender pacing the whole quota beats several
guessing their shares, and a standby takes over a partition within seconds when the active
replica dies. With `spread_partitions`, replicas take the free partitions first instead, for
work bound by CPU rather than by the quota. This is the room where partitions are decided;
the lifecycle only asks for them to be consumed, returned or restored.
"""

import asyncio
import contextlib
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pamqp.commands import Basic
from pamqp.common import FieldTable

from worker.settings import WorkerSettings
from worker.topology import (
    declare_topology,
    leader_lock_name,
    work_queue_arguments,
    work_queue_names,
)

STANDBY_DELAY_SECONDS = 2.0
# Deliveries per partition while Connect is known down, or not yet known up: each one held
# is handed back at a restart, and quorum queues count that towards their delivery limit.
CAUTIOUS_PREFETCH = 1
SPREAD_PAUSE_SECONDS = (0.1, 0.3)

OnMessage = Callable[[AbstractIncomingMessage, str], Awaitable[None]]


class Partitions:
    """Consume the partition queues on one channel, and know which ones are consumed."""

    def __init__(self, settings: WorkerSettings, on_message: OnMessage, log: Any) -> None:
        self._settings = settings
        self._on_message = on_message
        self._log = log
        self.names = work_queue_names(settings.queue, settings.partitions)
        # As declared with the topology: an older version's queues keep their arguments.
        self.work_arguments: dict[str, FieldTable] = {
            name: work_queue_arguments(settings.queue) for name in self.names
        }
        self.channel: AbstractChannel | None = None
        self._lock_channel: AbstractChannel | None = None
        self._consumers: dict[str, tuple[AbstractQueue, str]] = {}
        self.cancelled_by_broker: set[str] = set()
        self.cautious = settings.cautious_prefetch

    def consuming(self) -> bool:
        """Return True while the channel is open and every partition has its consumer."""
        return bool(self._consumers) and self.channel is not None and not self.channel.is_closed

    def prefetch_per_partition(self) -> int:
        """Return the deliveries each partition's consumer may hold (see `cautious`)."""
        if self.cautious:
            return CAUTIOUS_PREFETCH
        return max(1, math.ceil(self._settings.prefetch / self._settings.partitions))

    async def consume(self, connection: AbstractRobustConnection) -> None:
        """Subscribe to every partition, as the active consumer or as a standby."""
        channel = await connection.channel()
        # Per consumer, and only for consumers created after it: changing it means consuming
        # afresh (`return_all`).
        await channel.set_qos(prefetch_count=self.prefetch_per_partition())
        self.channel = channel
        names = list(self.names)
        if self._settings.spread_partitions:
            await self._subscribe_spread(channel, names)
            return
        if not await self._take_leader_lock(connection):
            self._log.info("worker.standby", reason="another replica holds the leader lock")
            await asyncio.sleep(STANDBY_DELAY_SECONDS)
        for name in names:
            await self._subscribe(channel, name)

    async def return_all(self, connection: AbstractRobustConnection) -> None:
        """Hand every unacked delivery back by closing the channel, then consume afresh.

        Closing the channel requeues its unacked deliveries together, which keeps each
        conversation's order; nacking them one by one, while later ones wait, would not.
        """
        await self.release()
        await self.consume(connection)

    async def release(self) -> None:
        """Close the consumers' channel: every unacked delivery goes back, in order."""
        if self.channel is not None:
            await self.channel.close()
        self._consumers.clear()
        self.cancelled_by_broker.clear()

    async def _take_leader_lock(self, connection: AbstractRobustConnection) -> bool:
        """Try to hold the leader lock: an exclusive queue, gone with its connection.

        It is declared on the raw channel, so that a reconnect does not try to restore it
        (another replica may hold it by then): leadership ends with the connection.
        """
        if self._lock_channel is not None and not self._lock_channel.is_closed:
            return True
        channel = await connection.channel()
        underlay = await channel.get_underlay_channel()
        try:
            await underlay.queue_declare(leader_lock_name(self._settings.queue), exclusive=True)
        except aio_pika.exceptions.ChannelClosed:
            with contextlib.suppress(Exception):
                await channel.close()
            return False
        self._lock_channel = channel
        return True

    async def _subscribe_spread(self, channel: AbstractChannel, names: list[str]) -> None:
        """Take the partitions without an active consumer first, in random order.

        A pause after each one leaves free partitions for replicas starting at the same time;
        without it, the first replica up took all of them before the second one asked.
        """
        random.shuffle(names)
        standby = []
        for name in names:
            if await self._consumer_count(channel, name):
                standby.append(name)
            else:
                await self._subscribe(channel, name)
                await asyncio.sleep(random.uniform(*SPREAD_PAUSE_SECONDS))
        for name in standby:
            await self._subscribe(channel, name)

    async def _subscribe(self, channel: AbstractChannel, name: str) -> None:
        """Consume one partition queue."""
        # Declared (same arguments, so idempotent) rather than looked up: the robust channel
        # only restores consumers of queues it declared itself, after a reconnect.
        queue = await channel.declare_queue(name, durable=True, arguments=self.work_arguments[name])

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._on_message(message, name)

        self._consumers[name] = (queue, await queue.consume(on_message))
        await self.hear_broker_cancels()

    async def hear_broker_cancels(self) -> None:
        """Have the broker's consumer cancellations reported (again, after a reconnect)."""
        if self.channel is None or self.channel.is_closed:
            return
        underlay = await self.channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)

    def _on_broker_cancel(self, frame: Basic.Cancel) -> None:
        """Note a partition whose consumer the broker cancelled: its queue was deleted."""
        for name, (_, tag) in self._consumers.items():
            if tag == frame.consumer_tag:
                self.cancelled_by_broker.add(name)
                self._log.warning("worker.consumer_cancelled_by_broker", partition_queue=name)

    async def restore_cancelled(self, topology_channel: AbstractChannel | None) -> None:
        """Declare the topology again after consumers were cancelled; note those restored.

        aio-pika declares a deleted queue again by itself and consumes from it anew, but
        unbound, so that nothing would reach it: declaring the whole topology (idempotent,
        as at start-up) binds it again. Readiness returns once every consumer is back.
        """
        if not self.cancelled_by_broker or self.channel is None:
            return
        if topology_channel is not None:
            await declare_topology(
                topology_channel, self._settings.queue, self._settings.partitions
            )
        # The abstract channel does not declare `consumers`; aio-pika reads it the same way.
        underlay = cast(aiormq.Channel, await self.channel.get_underlay_channel())
        for name in sorted(self.cancelled_by_broker):
            if self._consumers[name][1] in underlay.consumers:
                self.cancelled_by_broker.discard(name)
                self._log.info("worker.consumer_restored", partition_queue=name)

    async def backlog(self, stats: AbstractChannel) -> dict[str, int]:
        """Return the ready messages of each consumed partition (a plain passive declare)."""
        underlay = await stats.get_underlay_channel()
        counts = {}
        for name in self._consumers:
            declared = await underlay.queue_declare(name, passive=True)
            counts[name] = declared.message_count or 0
        return counts

    @staticmethod
    async def _consumer_count(channel: AbstractChannel, name: str) -> int:
        """Ask the broker how many consumers a queue has (a robust channel would cache it)."""
        underlay = await channel.get_underlay_channel()
        declared = await underlay.queue_declare(name, passive=True)
        return declared.consumer_count or 0
