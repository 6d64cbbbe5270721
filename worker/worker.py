"""The worker's lifecycle: connect, declare, consume, and drain on shutdown."""

import asyncio
import contextlib
from contextlib import AsyncExitStack
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from worker.connect_client import ConnectClient
from worker.consumer import MessageHandler
from worker.observability import get_logger
from worker.policy import RetryPolicy
from worker.settings import WorkerSettings
from worker.settlement import Settler
from worker.topology import declare_topology, work_queue_name

CONNECT_RETRY_SECONDS = 3.0


class Worker:
    """Consume the work queue until asked to stop, then hand back what is unfinished."""

    def __init__(self, settings: WorkerSettings, endpoint_url: str | None = None) -> None:
        self.settings = settings
        self._endpoint_url = endpoint_url
        self._stop = asyncio.Event()
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._handler: MessageHandler | None = None
        self.log = get_logger(worker_id=settings.worker_id, queue=settings.queue)

    @property
    def stopping(self) -> bool:
        """Return True once a stop was requested."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Ask the worker to drain and stop; safe to call from a signal handler."""
        self._stop.set()

    async def run(self) -> None:
        """Run until `request_stop`; connection and client are closed on the way out."""
        async with AsyncExitStack() as stack:
            connection = await self._connect()
            if connection is None:
                return
            stack.push_async_callback(connection.close)
            client = await stack.enter_async_context(
                ConnectClient(self.settings, endpoint_url=self._endpoint_url)
            )
            self._handler = await self._make_handler(connection, client)
            queue = await self._open_queue(connection)
            tag = await queue.consume(self._on_message)
            self.log.info("worker.consuming", prefetch=self.settings.prefetch)
            await self._stop.wait()
            await self._drain(queue, tag)
        self.log.info("worker.stopped")

    async def _connect(self) -> AbstractRobustConnection | None:
        """Connect to the broker, retrying until it answers or a stop is requested."""
        url = self.settings.amqp_url.get_secret_value()
        while not self.stopping:
            try:
                return await aio_pika.connect_robust(
                    url, client_properties={"connection_name": self.settings.worker_id}
                )
            except (OSError, aio_pika.exceptions.AMQPError) as error:
                self.log.warning(
                    "broker.unreachable",
                    url=self.settings.masked_amqp_url(),
                    error=type(error).__name__,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), CONNECT_RETRY_SECONDS)
        return None

    async def _open_queue(self, connection: AbstractRobustConnection) -> AbstractQueue:
        """Open the consuming channel with its prefetch and return the work queue."""
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=self.settings.prefetch)
        return await channel.get_queue(work_queue_name(self.settings.queue), ensure=True)

    async def _make_handler(
        self, connection: AbstractRobustConnection, client: ConnectClient
    ) -> MessageHandler:
        """Declare the topology on the publishing channel and wire the pipeline."""
        # Dead letters get their own channel: a failed publish must not close the consumer's.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        topology = await declare_topology(channel, self.settings.queue)
        settler = Settler(
            topology.dead_letter_exchange, self.settings.dead_letter_retry_delay_seconds, self.log
        )
        return MessageHandler(
            client,
            RetryPolicy.from_settings(self.settings),
            settler,
            queue_name=work_queue_name(self.settings.queue),
            worker_id=self.settings.worker_id,
            max_body_bytes=self.settings.max_body_bytes,
            log=self.log,
        )

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        """Handle one delivery, tracked so that shutdown can wait for it."""
        task = asyncio.current_task()
        assert task is not None and self._handler is not None
        self._in_flight.add(task)
        try:
            await self._handler.handle(message)
        finally:
            self._in_flight.discard(task)

    async def _drain(self, queue: AbstractQueue, tag: str) -> None:
        """Stop deliveries, give in-flight events the grace period, cancel the rest.

        The consumer is cancelled first so that the broker stops sending while we finish;
        cancelled events are never acked, so closing the channel hands them back.
        """
        self.log.info("worker.draining", in_flight=len(self._in_flight))
        with contextlib.suppress(Exception):
            await queue.cancel(tag)
        pending = set(self._in_flight)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=self.settings.shutdown_grace_seconds)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        self.log.info("worker.drained", handed_back=len(pending))
