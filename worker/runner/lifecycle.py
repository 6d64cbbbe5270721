"""The worker's lifecycle: connect, declare, consume every partition, watch, and drain."""

import asyncio
import contextlib
import gc
import math
import os
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, TypeVar, cast

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from pamqp.commands import Basic

from worker.broker import broker_url, connect_robust, explained
from worker.http_server import HealthServer
from worker.metrics import Metrics, api_outcome
from worker.observability import get_logger
from worker.pipeline.breaker import Breaker
from worker.pipeline.connect_client import NO_REGION, ConnectClient, connect_region
from worker.pipeline.dedupe import DeliveredLedger, MemoryLedger, RedisLedger
from worker.pipeline.guard import CallGuard, CallObserver
from worker.pipeline.handler import MessageHandler
from worker.pipeline.policy import RetryPolicy
from worker.pipeline.rate_limiter import AdaptiveRateLimiter, RateLimitConfig
from worker.pipeline.settlement import Settler
from worker.problems import ExitCode, Problem
from worker.settings import SHUTDOWN_CLOSE_SECONDS, WorkerSettings
from worker.topology import PARTITION, declare_topology, leader_lock_name, work_queue_names

CONNECT_RETRY_SECONDS = 3.0
STANDBY_DELAY_SECONDS = 2.0
WATCH_SECONDS = 2.0
SPREAD_PAUSE_SECONDS = (0.1, 0.3)
EXIT_SECONDS = 0.5
"""Of the shutdown bound, the part kept for the interpreter to exit after closing."""

T = TypeVar("T")


async def until_set(event: asyncio.Event, attempt: Awaitable[T]) -> T | None:
    """Await an attempt unless the event is set first: then cancel it and return None."""
    task = asyncio.ensure_future(attempt)
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let the attempt close what it opened
    return None if task.cancelled() else task.result()


def make_ledger(settings: WorkerSettings) -> DeliveredLedger | None:
    """Return the delivered-events ledger the settings ask for (None: dedupe off)."""
    if settings.dedupe_window_seconds <= 0:
        return None
    if settings.redis_url is not None:
        url = settings.redis_url.get_secret_value()
        return RedisLedger(url, settings.queue, settings.dedupe_window_seconds)
    return MemoryLedger(settings.dedupe_window_seconds)


class Worker:
    """Consume the partitions until asked to stop, then hand back what is unfinished."""

    def __init__(self, settings: WorkerSettings, endpoint_url: str | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.worker_id)
        self.log = get_logger(worker_id=settings.worker_id, queue=settings.queue)
        self._endpoint_url = endpoint_url
        self._stop = asyncio.Event()
        self._stop_requested_at: float | None = None
        self._in_flight: dict[asyncio.Task[Any], tuple[float, float]] = {}
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._lock_channel: AbstractChannel | None = None
        self._consumers: dict[str, tuple[AbstractQueue, str]] = {}
        self._cancelled_by_broker: set[str] = set()
        self._topology_channel: AbstractChannel | None = None
        self._handler: MessageHandler | None = None
        self.guard = self._make_guard()
        self._ledger = make_ledger(settings)

    @property
    def stopping(self) -> bool:
        """Return True once a stop was requested."""
        return self._stop.is_set()

    def request_stop(self) -> None:
        """Ask the worker to drain and stop; safe to call from a signal handler.

        The shutdown bound (`shutdown_timeout_seconds`) runs from the first request.
        """
        if self._stop_requested_at is None:
            self._stop_requested_at = time.monotonic()
        self._stop.set()

    def _left_until(self, offset: float) -> float:
        """Return the seconds from now until `offset` seconds after the stop request."""
        if self._stop_requested_at is None:  # closing after an error: no orchestrator waits
            return offset
        return max(0.0, self._stop_requested_at + offset - time.monotonic())

    def readiness(self) -> tuple[bool, str]:
        """Say whether this replica is connected, consuming, and able to send."""
        if self.stopping:
            return False, "stopping"
        if self._connection is None or not self._connection.connected.is_set():
            return False, "not connected to the broker"
        if not self._consumers or self._channel is None or self._channel.is_closed:
            return False, "not consuming"
        if self._cancelled_by_broker:
            queues = ", ".join(sorted(self._cancelled_by_broker))
            return False, f"not consuming {queues}: the broker cancelled it (queue deleted?)"
        if not self.guard.account.closed:
            return False, "Connect refuses this account (AccessDenied/credentials): paused"
        if not self.guard.outage.closed:
            return False, "Connect is failing (5xx/transport): paused, probing"
        return True, "consuming"

    async def run(self) -> None:
        """Run until `request_stop`; everything is closed on the way out, in reverse order."""
        if connect_region(self.settings) is None:
            raise Problem(NO_REGION, ExitCode.USAGE)
        async with AsyncExitStack() as stack:
            server = HealthServer(self.metrics, self.readiness, port=self.settings.http_port)
            await self._listen(server)
            stack.push_async_callback(self._close_within_bound, server.stop)
            connection = await self._connect()
            if connection is None:
                return
            self._connection = connection
            stack.push_async_callback(self._close_within_bound, connection.close)
            if self._ledger is not None:
                stack.push_async_callback(self._ledger.close)
            client = await stack.enter_async_context(
                ConnectClient(self.settings, endpoint_url=self._endpoint_url)
            )
            self._handler = await self._make_handler(connection, client)
            # Everything allocated so far lives as long as the process: keep it out of the
            # collector's full passes, which otherwise stall the loop for tens of ms.
            gc.freeze()
            await self._consume(connection)
            watcher = asyncio.create_task(self._watch(connection))
            self.log.info("worker.consuming", partitions=self.settings.partitions)
            await self._stop.wait()
            watcher.cancel()
            await self._drain()
        self.log.info("worker.stopped")

    async def _listen(self, server: HealthServer) -> None:
        """Start the health server; a port already taken is said in one line."""
        try:
            await server.start()
        except OSError as error:
            reason = os.strerror(error.errno) if error.errno else str(error)
            raise Problem(
                f"cannot listen on port {self.settings.http_port} for health and metrics "
                f"({reason}): set WORKER_HTTP_PORT to a free port",
                ExitCode.OS_ERROR,
            ) from None

    async def _close_within_bound(self, close: Callable[[], Awaitable[Any]]) -> None:
        """Close something, giving up when the shutdown bound is about to end."""
        budget = self._left_until(self.settings.shutdown_timeout_seconds - EXIT_SECONDS)
        try:
            await asyncio.wait_for(close(), budget)
        except TimeoutError:
            self.log.warning("worker.close_timed_out", closing=getattr(close, "__qualname__", ""))

    def _make_guard(self) -> CallGuard:
        """Build the rate limiter and breakers, reporting into metrics and logs."""
        s = self.settings
        limiter = AdaptiveRateLimiter(
            RateLimitConfig(initial_rate=s.rate_initial, min_rate=s.rate_min, max_rate=s.rate_max)
        )

        def breaker(name: str, threshold: int) -> Breaker:
            return Breaker(
                name, threshold, s.probe_seconds, s.probe_max_seconds, self._on_breaker_change
            )

        def on_answer(outcome: str, seconds: float) -> None:
            code = None if outcome == "ok" else outcome
            self.metrics.api_calls.labels(outcome=api_outcome(code)).inc()
            self.metrics.api_latency.observe(seconds)

        observer = CallObserver(on_answer, self.metrics.ambiguous_retries.inc)
        return CallGuard(
            limiter,
            breaker("outage", s.outage_threshold),
            breaker("account", s.account_threshold),
            s.account_memory_seconds,
            observer,
        )

    def _on_breaker_change(self, breaker: Breaker) -> None:
        """Export and log a breaker's new state; an account-wide refusal is logged loudly."""
        self.metrics.breaker_state.labels(breaker=breaker.name).set(breaker.state)
        level = "error" if breaker.name == "account" and not breaker.closed else "warning"
        getattr(self.log, level)(
            "breaker.state_changed", breaker=breaker.name, state=breaker.state.name.lower()
        )

    async def _connect(self) -> AbstractRobustConnection | None:
        """Connect to the broker, retrying while it cannot be reached; None once stopped.

        The broker may come up later, so an unreachable one (refused, unknown host, no answer)
        is tried again, with the reason logged each time. A malformed URL, a refused login or
        virtual host are settings to fix: they end the run with their line (a `Problem`). A
        stop request ends an attempt at once, since an attempt can last the connect timeout.
        """
        broker_url(self.settings)
        while not self.stopping:
            attempt = connect_robust(self.settings, name=self.settings.worker_id)
            try:
                connection = await until_set(self._stop, attempt)
            except Problem as problem:
                if problem.exit_code is not ExitCode.BROKER_UNAVAILABLE:
                    raise
                self.log.warning(
                    "broker.unreachable",
                    reason=problem.line,
                    retry_in_seconds=CONNECT_RETRY_SECONDS,
                )
            else:
                return connection
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), CONNECT_RETRY_SECONDS)
        return None

    async def _make_handler(
        self, connection: AbstractRobustConnection, client: ConnectClient
    ) -> MessageHandler:
        """Declare the topology on the publishing channel and wire the pipeline."""
        # Dead letters get their own channel: a failed publish must not close the consumer's.
        with explained(self.settings):
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            topology = await declare_topology(
                channel, self.settings.queue, self.settings.partitions
            )
        self._topology_channel = channel
        settler = Settler(
            topology.dead_letter_exchange, self.settings.dead_letter_retry_delay_seconds, self.log
        )
        return MessageHandler(
            client,
            RetryPolicy.from_settings(self.settings),
            self.guard,
            settler,
            self.metrics,
            self._ledger,
            worker_id=self.settings.worker_id,
            max_body_bytes=self.settings.max_body_bytes,
            log=self.log,
        )

    async def _consume(self, connection: AbstractRobustConnection) -> None:
        """Subscribe to every partition, as the active consumer or as a standby.

        Each partition has a single active consumer: the first subscriber. By default one
        replica, the holder of the leader lock, subscribes first everywhere and the others
        follow as standbys: with a quota shared by all replicas, one sender pacing the whole
        quota beats several guessing their shares, and a standby takes over a partition within
        seconds when the active replica dies. With `spread_partitions`, replicas take the free
        partitions first instead, for work bound by CPU rather than by the quota.
        """
        channel = await connection.channel()
        per_partition = max(1, math.ceil(self.settings.prefetch / self.settings.partitions))
        await channel.set_qos(prefetch_count=per_partition)
        self._channel = channel
        names = work_queue_names(self.settings.queue, self.settings.partitions)
        if self.settings.spread_partitions:
            await self._subscribe_spread(channel, names)
            return
        if not await self._take_leader_lock(connection):
            self.log.info("worker.standby", reason="another replica holds the leader lock")
            await asyncio.sleep(STANDBY_DELAY_SECONDS)
        for name in names:
            await self._subscribe(channel, name)

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
            await underlay.queue_declare(leader_lock_name(self.settings.queue), exclusive=True)
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
        queue = await channel.declare_queue(name, durable=True, arguments=PARTITION)

        async def on_message(message: AbstractIncomingMessage) -> None:
            await self._on_message(message, name)

        self._consumers[name] = (queue, await queue.consume(on_message))
        await self._hear_broker_cancels(channel)

    async def _hear_broker_cancels(self, channel: AbstractChannel) -> None:
        """Have the broker's consumer cancellations reported (again, after a reconnect)."""
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(self._on_broker_cancel)

    def _on_broker_cancel(self, frame: Basic.Cancel) -> None:
        """Note a partition whose consumer the broker cancelled: its queue was deleted."""
        for name, (_, tag) in self._consumers.items():
            if tag == frame.consumer_tag:
                self._cancelled_by_broker.add(name)
                self.log.warning("worker.consumer_cancelled_by_broker", partition_queue=name)

    async def _restore_cancelled(self) -> None:
        """Declare the topology again after consumers were cancelled; note those restored.

        aio-pika declares a deleted queue again by itself and consumes from it anew, but
        unbound, so that nothing would reach it: declaring the whole topology (idempotent,
        as at start-up) binds it again. Readiness returns once every consumer is back.
        """
        if not self._cancelled_by_broker or self._channel is None:
            return
        if self._topology_channel is not None:
            await declare_topology(
                self._topology_channel, self.settings.queue, self.settings.partitions
            )
        # The abstract channel does not declare `consumers`; aio-pika reads it the same way.
        underlay = cast(aiormq.Channel, await self._channel.get_underlay_channel())
        for name in sorted(self._cancelled_by_broker):
            if self._consumers[name][1] in underlay.consumers:
                self._cancelled_by_broker.discard(name)
                self.log.info("worker.consumer_restored", partition_queue=name)

    @staticmethod
    async def _consumer_count(channel: AbstractChannel, name: str) -> int:
        """Ask the broker how many consumers a queue has (a robust channel would cache it)."""
        underlay = await channel.get_underlay_channel()
        declared = await underlay.queue_declare(name, passive=True)
        return declared.consumer_count or 0

    async def _on_message(self, message: AbstractIncomingMessage, queue_name: str) -> None:
        """Handle one delivery, tracked so that shutdown and the hold watch can see it."""
        if self.stopping:
            return  # left unacked: closing the channel hands it back, in order
        task = asyncio.current_task()
        assert task is not None and self._handler is not None
        published = message.timestamp.timestamp() if message.timestamp else time.time()
        self._in_flight[task] = (time.monotonic(), published)
        self.metrics.in_flight.set(len(self._in_flight))
        try:
            await self._handler.handle(message, queue_name)
        finally:
            self._in_flight.pop(task, None)
            self.metrics.in_flight.set(len(self._in_flight))

    async def _watch(self, connection: AbstractRobustConnection) -> None:
        """Refresh the gauges, and hand everything back before a hold nears consumer_timeout."""
        stats = await connection.channel()
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                if self._channel is not None and not self._channel.is_closed:
                    await self._hear_broker_cancels(self._channel)
                await self._restore_cancelled()
                await self._refresh_gauges(stats)
                if self._oldest_hold() > self.settings.max_hold_seconds:
                    await self._hand_back_everything(connection)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a broker hiccup must not end the watch
                self.log.warning("worker.watch_failed", error=repr(error))
                if stats.is_closed:
                    stats = await connection.channel()

    async def _refresh_gauges(self, stats: AbstractChannel) -> None:
        """Export the send rate, readiness, backlog and the age of the oldest held event."""
        self.metrics.send_rate.set(self.guard.limiter.rate)
        self.metrics.ready.set(1 if self.readiness()[0] else 0)
        underlay = await stats.get_underlay_channel()
        for name in self._consumers:
            declared = await underlay.queue_declare(name, passive=True)
            self.metrics.backlog.labels(queue=name).set(declared.message_count or 0)
        if self._in_flight:
            oldest_published = min(published for _, published in self._in_flight.values())
            self.metrics.oldest_event_age.set(max(0.0, time.time() - oldest_published))

    def _oldest_hold(self) -> float:
        """Return how long the longest-held delivery has been held, in seconds."""
        if not self._in_flight:
            return 0.0
        return time.monotonic() - min(taken for taken, _ in self._in_flight.values())

    async def _hand_back_everything(self, connection: AbstractRobustConnection) -> None:
        """Return every held delivery to RabbitMQ, in order, and consume afresh.

        Closing the channel requeues its unacked deliveries together, which keeps each
        conversation's order; nacking them one by one, while later ones wait, would not.
        """
        self.log.warning(
            "worker.handing_back", held=len(self._in_flight), reason="max_hold_seconds"
        )
        await self._cancel_in_flight()
        if self._channel is not None:
            await self._channel.close()
        self._consumers.clear()
        self._cancelled_by_broker.clear()
        await self._consume(connection)

    async def _cancel_in_flight(self) -> int:
        """Cancel every handler task; none of them acks after this."""
        tasks = list(self._in_flight)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def _drain(self) -> None:
        """Hand back at once what cannot be sent; let calls on the wire finish within the bound.

        Nothing that waits (for a breaker, the limiter, its turn or a backoff) can be sent any
        more: those events end at once. Calls on the wire and settlements get the grace period.
        Every event not settled stays unacked, and closing the connection hands them back
        together, in order. The subscriptions are kept until then, on purpose: cancelling
        them first would let a standby replica take a partition over while this one still
        holds earlier events of its conversations, and send later ones first. Deliveries
        that still arrive are left unacked with the rest.
        """
        ended = self.guard.close()
        self.log.info("worker.draining", in_flight=len(self._in_flight), ended_waits=ended)
        pending = set(self._in_flight)
        if pending:
            grace = self._left_until(self.settings.shutdown_grace_seconds)
            _, pending = await asyncio.wait(pending, timeout=grace)
        abandoned = await self._hand_back_unsent(pending) if pending else 0
        self.log.info("worker.drained", handed_back=ended + len(pending), abandoned=abandoned)

    async def _hand_back_unsent(self, pending: set[asyncio.Task[Any]]) -> int:
        """Hand back what is not on the wire; give calls on the wire the rest of the bound.

        Cancelling a call on the wire would requeue an event Connect may have accepted, and
        the API has no idempotency token: it would be sent twice. So a call on the wire is
        given what is left of `shutdown_timeout_seconds`, less the time kept for closing.
        One still unanswered then is abandoned and its event handed back unacked: the
        replica that takes it sends it again, a duplicate if Connect did accept the first
        call (an abandoned call's late answer reaches no ledger, the client closes at once).
        That is the price of exiting before the orchestrator's SIGKILL, which would cost the
        same duplicate and interrupt the closing. Return the number of calls abandoned.
        """
        on_the_wire = pending & self.guard.sending
        for task in pending - on_the_wire:
            task.cancel()
        late: set[asyncio.Task[Any]] = set()
        if on_the_wire:
            bound = self.settings.shutdown_timeout_seconds - SHUTDOWN_CLOSE_SECONDS
            _, late = await asyncio.wait(on_the_wire, timeout=self._left_until(bound))
        if late:
            self.log.warning(
                "worker.calls_abandoned",
                calls=len(late),
                reason="no answer within the shutdown bound; handed back, may be sent twice",
            )
        await self._cancel_in_flight()
        return len(late)
