"""Exchange and queue names (pure functions) and their idempotent declaration.

Producers only know the input exchange `<queue>`, a durable fanout, so its type never has to
change; everything behind it is named `<queue>.…` and belongs to the worker:

    <queue> (fanout) -> <queue>.partitions (x-consistent-hash on the routing key)
        -> <queue>.work.<i> (quorum, single active consumer), i in 0..partitions-1

The routing key is the conversation key, so one conversation always lands in one partition,
and a single active consumer per partition keeps its order across replicas. The consistent-hash
exchange is a plugin shipped with RabbitMQ: `rabbitmq_consistent_hash_exchange`.
"""

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange
from pamqp.common import FieldTable

from worker.pipeline.errors import ErrorVariant

QUORUM: FieldTable = {"x-queue-type": "quorum"}
PARTITION: FieldTable = {"x-queue-type": "quorum", "x-single-active-consumer": True}
CONSISTENT_HASH = "x-consistent-hash"
PLUGIN_HINT = "rabbitmq-plugins enable rabbitmq_consistent_hash_exchange"


def input_exchange_name(base: str) -> str:
    """Return the exchange producers publish to."""
    return base


def partition_exchange_name(base: str) -> str:
    """Return the consistent-hash exchange that spreads conversations over partitions."""
    return f"{base}.partitions"


def work_queue_name(base: str, partition: int) -> str:
    """Return the queue of one partition."""
    return f"{base}.work.{partition}"


def leader_lock_name(base: str) -> str:
    """Return the exclusive queue whose holder subscribes first to every partition."""
    return f"{base}.leader"


def work_queue_names(base: str, partitions: int) -> list[str]:
    """Return the queues of every partition, in partition order."""
    return [work_queue_name(base, partition) for partition in range(partitions)]


def dead_letter_exchange_name(base: str) -> str:
    """Return the direct exchange that routes dead letters by variant."""
    return f"{base}.dlx"


def dead_letter_queue_name(base: str, variant: ErrorVariant | str) -> str:
    """Return the queue that holds one variant's dead letters."""
    return f"{base}.dlq.{ErrorVariant(variant).value}"


def dead_letter_queue_names(base: str) -> list[str]:
    """Return the dead-letter queue of every variant."""
    return [dead_letter_queue_name(base, variant) for variant in ErrorVariant]


def all_queue_names(base: str, partitions: int) -> list[str]:
    """Return every queue of the topology, work queues first."""
    return work_queue_names(base, partitions) + dead_letter_queue_names(base)


def exchange_types(base: str, partition_exchange_type: str = CONSISTENT_HASH) -> dict[str, str]:
    """Return every exchange of the topology with its type (all durable)."""
    return {
        input_exchange_name(base): aio_pika.ExchangeType.FANOUT.value,
        partition_exchange_name(base): partition_exchange_type,
        dead_letter_exchange_name(base): aio_pika.ExchangeType.DIRECT.value,
    }


def queue_arguments(base: str, partitions: int) -> dict[str, FieldTable]:
    """Return every queue of the topology with its arguments (all durable), work queues first."""
    work = {name: PARTITION for name in work_queue_names(base, partitions)}
    return work | {name: QUORUM for name in dead_letter_queue_names(base)}


@dataclass(frozen=True)
class Topology:
    """The declared objects the worker uses."""

    input_exchange: AbstractExchange
    dead_letter_exchange: AbstractExchange


class PluginMissingError(RuntimeError):
    """The broker lacks the exchange type of the partitions (its plugin is not enabled)."""


async def declare_topology(
    channel: AbstractChannel,
    base: str,
    partitions: int,
    *,
    partition_exchange_type: str = CONSISTENT_HASH,
) -> Topology:
    """Declare every exchange, queue and binding; safe to repeat, by any number of replicas.

    `partition_exchange_type` exists for tests, which imitate a broker without the plugin.
    """
    types = exchange_types(base, partition_exchange_type)
    inbound_name, dead_letters_name = input_exchange_name(base), dead_letter_exchange_name(base)
    inbound = await channel.declare_exchange(inbound_name, types[inbound_name], durable=True)
    spread = await _declare_partition_exchange(channel, base, partition_exchange_type)
    await spread.bind(inbound, routing_key="")
    queues = queue_arguments(base, partitions)
    for name in work_queue_names(base, partitions):
        queue = await channel.declare_queue(name, durable=True, arguments=queues[name])
        await queue.bind(spread, routing_key="1")  # the weight of the partition
    dead_letters = await channel.declare_exchange(
        dead_letters_name, types[dead_letters_name], durable=True
    )
    for variant in ErrorVariant:
        name = dead_letter_queue_name(base, variant)
        queue = await channel.declare_queue(name, durable=True, arguments=queues[name])
        await queue.bind(dead_letters, routing_key=variant.value)
    return Topology(inbound, dead_letters)


async def _declare_partition_exchange(
    channel: AbstractChannel, base: str, exchange_type: str
) -> AbstractExchange:
    """Declare the consistent-hash exchange, naming the plugin when the broker lacks the type."""
    try:
        return await channel.declare_exchange(
            partition_exchange_name(base), exchange_type, durable=True
        )
    except aio_pika.exceptions.ConnectionClosed as error:
        # RabbitMQ closes the whole connection: 503 "unknown exchange type '…'".
        if "exchange type" not in str(error):
            raise
        raise PluginMissingError(
            f"the broker has no exchange type {exchange_type!r}: enable its plugin with "
            f"`{PLUGIN_HINT}` on every node"
        ) from error


async def delete_topology(channel: AbstractChannel, base: str, partitions: int) -> None:
    """Delete every queue and exchange of the topology (tests and the demo clean up with it)."""
    for name in all_queue_names(base, partitions):
        await channel.queue_delete(name)
    for exchange in (
        dead_letter_exchange_name(base),
        partition_exchange_name(base),
        input_exchange_name(base),
    ):
        await channel.exchange_delete(exchange)
