"""Exchange and queue names (pure functions) and their idempotent declaration.

Producers only know the input exchange `<queue>`, a durable fanout, so its type never has to
change; everything behind it is named `<queue>.…` and belongs to the worker.
"""

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue
from pamqp.common import FieldTable

from worker.errors import ErrorVariant

QUORUM: FieldTable = {"x-queue-type": "quorum"}


def input_exchange_name(base: str) -> str:
    """Return the exchange producers publish to."""
    return base


def work_queue_name(base: str) -> str:
    """Return the queue the worker consumes from."""
    return f"{base}.work"


def dead_letter_exchange_name(base: str) -> str:
    """Return the direct exchange that routes dead letters by variant."""
    return f"{base}.dlx"


def dead_letter_queue_name(base: str, variant: ErrorVariant | str) -> str:
    """Return the queue that holds one variant's dead letters."""
    return f"{base}.dlq.{ErrorVariant(variant).value}"


def all_queue_names(base: str) -> list[str]:
    """Return every queue of the topology, work queue first."""
    return [work_queue_name(base)] + [dead_letter_queue_name(base, v) for v in ErrorVariant]


@dataclass(frozen=True)
class Topology:
    """The declared objects the worker uses."""

    input_exchange: AbstractExchange
    work_queue: AbstractQueue
    dead_letter_exchange: AbstractExchange


async def declare_topology(channel: AbstractChannel, base: str) -> Topology:
    """Declare every exchange, queue and binding; safe to repeat, by any number of replicas."""
    inbound = await channel.declare_exchange(
        input_exchange_name(base), aio_pika.ExchangeType.FANOUT, durable=True
    )
    work = await channel.declare_queue(work_queue_name(base), durable=True, arguments=QUORUM)
    await work.bind(inbound, routing_key="")
    dead_letters = await channel.declare_exchange(
        dead_letter_exchange_name(base), aio_pika.ExchangeType.DIRECT, durable=True
    )
    for variant in ErrorVariant:
        queue = await channel.declare_queue(
            dead_letter_queue_name(base, variant), durable=True, arguments=QUORUM
        )
        await queue.bind(dead_letters, routing_key=variant.value)
    return Topology(inbound, work, dead_letters)


async def delete_topology(channel: AbstractChannel, base: str) -> None:
    """Delete every queue and exchange of the topology (tests and the demo clean up with it)."""
    for name in all_queue_names(base):
        await channel.queue_delete(name)
    await channel.exchange_delete(dead_letter_exchange_name(base))
    await channel.exchange_delete(input_exchange_name(base))
