"""Exchange and queue names (pure functions) and their idempotent declaration.

Producers only know the input exchange `<queue>`, a durable fanout, so its type never has to
change; everything behind it is named `<queue>.…` and belongs to the worker:

    <queue> (fanout) -> <queue>.partitions (x-consistent-hash on the routing key)
        -> <queue>.work.<i> (quorum, single active consumer), i in 0..partitions-1

The routing key is the conversation key, so one conversation always lands in one partition,
and a single active consumer per partition keeps its order across replicas. The consistent-hash
exchange is a plugin shipped with RabbitMQ: `rabbitmq_consistent_hash_exchange`.

The broker itself may remove an event from a work queue: at a delivery limit (RabbitMQ 4.0-4.2
give quorum queues one of 20 by default) or when a producer's per-message `expiration` passes.
So every work queue dead-letters, at least once, into the `BrokerDeadLettered` dead-letter queue
(`WORK_DEAD_LETTERING`), where the broker's `x-death` header keeps the reason.

Queues declared by an older version lack those arguments, and RabbitMQ refuses to redeclare a
queue with other arguments (PRECONDITION_FAILED). The worker then keeps the queue as it is
(`LEGACY_PARTITION`), logs it, and the same settings come from a policy instead
(`dead_letter_policy`): old and new replicas declare what already exists, so they never fight.
"""

import json
import re
from dataclasses import dataclass

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractExchange
from pamqp.common import FieldTable

from worker.observability import get_logger
from worker.pipeline.errors import ErrorVariant

QUORUM: FieldTable = {"x-queue-type": "quorum"}
LEGACY_PARTITION: FieldTable = {"x-queue-type": "quorum", "x-single-active-consumer": True}
# At-least-once dead-lettering needs reject-publish overflow; the queue has no length limit.
WORK_DEAD_LETTERING: FieldTable = {
    "x-dead-letter-strategy": "at-least-once",
    "x-overflow": "reject-publish",
    "x-dead-letter-routing-key": ErrorVariant.BROKER_DEAD_LETTERED.value,
}
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


def work_queue_arguments(base: str) -> FieldTable:
    """Return the arguments of a work queue: single active consumer, dead-lettering to ours."""
    return {
        **LEGACY_PARTITION,
        "x-dead-letter-exchange": dead_letter_exchange_name(base),
        **WORK_DEAD_LETTERING,
    }


def queue_arguments(base: str, partitions: int) -> dict[str, FieldTable]:
    """Return every queue of the topology with its arguments (all durable), work queues first."""
    work = {name: work_queue_arguments(base) for name in work_queue_names(base, partitions)}
    return work | {name: QUORUM for name in dead_letter_queue_names(base)}


def dead_letter_policy_name(base: str) -> str:
    """Return the name of the policy that gives older work queues their dead-lettering."""
    return f"{base}.work-dead-lettering"


def dead_letter_policy(base: str) -> dict[str, str | int]:
    """Return the policy definition equal to the work queues' dead-letter arguments."""
    return {
        "dead-letter-exchange": dead_letter_exchange_name(base),
        "dead-letter-routing-key": ErrorVariant.BROKER_DEAD_LETTERED.value,
        "dead-letter-strategy": "at-least-once",
        "overflow": "reject-publish",
    }


def dead_letter_policy_command(base: str) -> str:
    """Return the `rabbitmqctl` line that applies `dead_letter_policy` to the work queues."""
    pattern = "^" + re.escape(base) + r"\.work\.[0-9]+$"
    definition = json.dumps(dead_letter_policy(base), separators=(",", ":"))
    return (
        f"rabbitmqctl set_policy {dead_letter_policy_name(base)} '{pattern}' '{definition}' "
        "--apply-to queues"
    )


@dataclass(frozen=True)
class Topology:
    """The declared objects the worker uses."""

    input_exchange: AbstractExchange
    dead_letter_exchange: AbstractExchange
    work_arguments: dict[str, FieldTable]
    """The arguments each work queue was declared with: ours, or those of an older version."""


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
    work_arguments = {}
    for name in work_queue_names(base, partitions):
        work_arguments[name] = await _work_arguments_accepted(channel, name, queues[name])
        queue = await channel.declare_queue(name, durable=True, arguments=work_arguments[name])
        await queue.bind(spread, routing_key="1")  # the weight of the partition
    dead_letters = await channel.declare_exchange(
        dead_letters_name, types[dead_letters_name], durable=True
    )
    for variant in ErrorVariant:
        name = dead_letter_queue_name(base, variant)
        queue = await channel.declare_queue(name, durable=True, arguments=queues[name])
        await queue.bind(dead_letters, routing_key=variant.value)
    return Topology(inbound, dead_letters, work_arguments)


async def _work_arguments_accepted(
    channel: AbstractChannel, name: str, arguments: FieldTable
) -> FieldTable:
    """Return `arguments`, or the older ones when the queue exists with those (see module doc).

    The probe runs on a raw channel of its own: PRECONDITION_FAILED closes the channel, and a
    robust channel would otherwise replay the refused declaration after every reconnect.
    """
    underlay = await channel.get_underlay_channel()
    if await _declares(underlay.connection, name, arguments):
        return arguments
    if not await _declares(underlay.connection, name, LEGACY_PARTITION):
        return arguments  # neither: a real conflict, which the declaration then reports
    get_logger().warning(
        "topology.work_queue_without_dead_lettering",
        partition_queue=name,
        remedy="apply the policy printed by `chat-worker declare` (README, Upgrading)",
    )
    return LEGACY_PARTITION


async def _declares(
    connection: aiormq.abc.AbstractConnection, name: str, arguments: FieldTable
) -> bool:
    """Return True if the queue can be declared with these arguments (on a channel of its own)."""
    probe = await connection.channel()
    try:
        await probe.queue_declare(name, durable=True, arguments=arguments)
    except aiormq.exceptions.ChannelPreconditionFailed:
        return False  # the broker closed the probe's channel
    await probe.close()
    return True


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
