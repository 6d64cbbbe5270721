"""The bare loop a user would write by hand: the baseline every benchmark compares against.

    python -m bench.baseline --queue Q [--queue Q2 ...] --endpoint URL [--count N] [--prefetch 64]
                             [--tuned]

aio-pika consume -> aiobotocore `send_chat_integration_event(**json.loads(body))` -> ack, with
the same prefetch as the worker and botocore's defaults otherwise (legacy retries, parameter
validation on), except a connection pool as large as the prefetch, as its docs advise. No
validation model, no ordering, no rate limiting, no metrics, no logging. It exits once it has
acked `--count` events (0: run until SIGTERM). AWS credentials and region come from the
environment, as for the worker. Given several queues (the worker's partitions, to tell the cost
of the topology from the cost of the worker's code), it consumes each with an equal share of
the prefetch, as the worker does.

With `--tuned`, the client gets the worker's botocore settings (a User-Agent built once,
parameter validation and botocore's retries off), so that a comparison with the worker shows
the cost of the worker's own code alone.
"""

import argparse
import asyncio
import json
import math
import os
import signal

import aio_pika
from aio_pika.abc import AbstractIncomingMessage
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def client_config(prefetch: int, tuned: bool) -> AioConfig:
    """Return botocore's defaults with a pool of `prefetch`, or the worker's settings."""
    if not tuned:
        return AioConfig(max_pool_connections=prefetch)
    return AioConfig(
        max_pool_connections=prefetch,
        user_agent="bench-baseline/1.0",
        parameter_validation=False,
        retries={"total_max_attempts": 1, "mode": "standard"},
    )


async def consume(
    queue_names: list[str], endpoint: str, count: int, prefetch: int, tuned: bool = False
) -> None:
    """Send every message of the queues to Connect and ack it, until `count` are acked."""
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, done.set)
    acked = 0
    config = client_config(prefetch, tuned)
    async with get_session().create_client(
        "connect", endpoint_url=endpoint, config=config
    ) as client:
        connection = await aio_pika.connect_robust(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=math.ceil(prefetch / len(queue_names)))

            async def on_message(message: AbstractIncomingMessage) -> None:
                nonlocal acked
                async with message.process(requeue=True):
                    await client.send_chat_integration_event(**json.loads(message.body))
                acked += 1
                if acked == count:
                    done.set()

            for name in queue_names:
                await (await channel.get_queue(name, ensure=False)).consume(on_message)
            await done.wait()


def main() -> None:
    """Parse the flags and run the loop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--queue", action="append", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--prefetch", type=int, default=64)
    parser.add_argument("--tuned", action="store_true", help="the worker's botocore settings")
    options = parser.parse_args()
    asyncio.run(
        consume(options.queue, options.endpoint, options.count, options.prefetch, options.tuned)
    )


if __name__ == "__main__":
    main()
