"""The worker's lifecycle: connect, wire the pipeline, consume, watch, and drain.

`Worker.run` runs until a stop is requested (SIGTERM, by the command line); `Worker.run(burst=
True)` returns by itself once every partition is empty and nothing is held, like arq's burst
mode, so that tests drive the real worker in their own event loop. What is held lives in one
`InFlight`; which partitions are consumed, in `Partitions`; how the pipeline is built, in
`wiring`.
"""

import asyncio
import contextlib
import gc
import os
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any, TypeVar

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection

from worker.broker import broker_url, connect_robust
from worker.http_server import HealthServer
from worker.metrics import Metrics
from worker.observability import get_logger
from worker.pipeline.connect_client import NO_REGION, ConnectClient, connect_region
from worker.pipeline.handler import MessageHandler
from worker.pipeline.inflight import WAITING, InFlight, Stage
from worker.problems import ExitCode, Problem
from worker.runner.partitions import Partitions
from worker.runner.wiring import declare_for_dead_letters, make_guard, make_handler, make_ledger
from worker.settings import SHUTDOWN_CLOSE_SECONDS, WorkerSettings

CONNECT_RETRY_SECONDS = 3.0
WATCH_SECONDS = 2.0
IDLE_CHECK_SECONDS = 0.2
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


class Worker:
    """Consume the partitions until asked to stop, then hand back what is unfinished."""

    def __init__(self, settings: WorkerSettings, endpoint_url: str | None = None) -> None:
        self.settings = settings
        self.metrics = Metrics(settings.worker_id)
        self.log = get_logger(worker_id=settings.worker_id, queue=settings.queue)
        self.inflight = InFlight()
        self.partitions = Partitions(settings, self._on_message, self.log)
        self.guard = make_guard(
            settings, self.metrics, self.inflight, self.log, on_accepted=self._note_connect_up
        )
        self._connect_known_up = False
        # Set whenever the prefetch may no longer fit what is known of Connect; one task acts.
        self._prefetch_review = asyncio.Event()
        # Consuming afresh (a prefetch change, a hand-back near consumer_timeout) one at a time.
        self._reconsuming = asyncio.Lock()
        self._ledger = make_ledger(settings)
        self._endpoint_url = endpoint_url
        self._stop = asyncio.Event()
        self._stop_requested_at: float | None = None
        self._connection: AbstractRobustConnection | None = None
        self._topology_channel: AbstractChannel | None = None
        self._handler: MessageHandler | None = None

    def _note_connect_up(self) -> None:
        """Remember that Connect accepted a call since the start; leave caution at once."""
        self._connect_known_up = True
        if self.partitions.cautious:
            self._prefetch_review.set()

    def _wants_cautious_prefetch(self) -> bool:
        """Return True while Connect is known down or refusing the account, or not yet known up.

        Events then wait, held, for as long as it lasts; each held one is handed back at a
        restart, and a quorum queue counts that return.
        """
        if not self.settings.cautious_prefetch:
            return False
        guard = self.guard
        return not (self._connect_known_up and guard.outage.closed and guard.account.closed)

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
        if not self.partitions.consuming():
            return False, "not consuming"
        if self.partitions.cancelled_by_broker:
            queues = ", ".join(sorted(self.partitions.cancelled_by_broker))
            return False, f"not consuming {queues}: the broker cancelled it (queue deleted?)"
        if self.guard.endpoint.reason is not None:
            return False, f"stopped sending: {self.guard.endpoint.reason}; restart once fixed"
        if not self.guard.account.closed:
            return False, "Connect refuses this account (AccessDenied/credentials): paused"
        if not self.guard.outage.closed:
            return False, "Connect is failing (5xx/transport): paused, probing"
        return True, "consuming"

    async def run(self, burst: bool = False) -> None:
        """Run until `request_stop` (or, in burst mode, until idle); close in reverse order."""
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
            await self._wire(connection, client)
            await self._serve(connection, burst)
        self.log.info("worker.stopped")

    async def _wire(self, connection: AbstractRobustConnection, client: ConnectClient) -> None:
        """Declare the topology and build the handler that every delivery goes through."""
        self._topology_channel, topology = await declare_for_dead_letters(self.settings, connection)
        self.partitions.work_arguments = topology.work_arguments
        self._handler = make_handler(
            self.settings,
            client=client,
            guard=self.guard,
            dead_letter_exchange=topology.dead_letter_exchange,
            inflight=self.inflight,
            metrics=self.metrics,
            ledger=self._ledger,
            log=self.log,
        )

    async def _serve(self, connection: AbstractRobustConnection, burst: bool) -> None:
        """Consume until asked to stop (or idle, in burst mode), then drain."""
        # Everything allocated so far lives as long as the process: keep it out of the
        # collector's full passes, which otherwise stall the loop for tens of ms.
        gc.freeze()
        await self.partitions.consume(connection)
        watchers = [
            asyncio.create_task(self._watch(connection)),
            asyncio.create_task(self._review_prefetch(connection)),
        ]
        if burst:
            watchers.append(asyncio.create_task(self._stop_when_idle(connection)))
        self.log.info("worker.consuming", partitions=self.settings.partitions)
        await self._stop.wait()
        for watcher in watchers:
            watcher.cancel()
        # Before draining: a prefetch change cut short reopens the guard as it unwinds.
        await asyncio.gather(*watchers, return_exceptions=True)
        await self._drain()

    async def _stop_when_idle(self, connection: AbstractRobustConnection) -> None:
        """Request a stop once every partition is empty and nothing is held, twice running."""
        stats = await connection.channel()
        idle_checks = 0
        while idle_checks < 2:
            await asyncio.sleep(IDLE_CHECK_SECONDS)
            backlog = await self.partitions.backlog(stats)
            idle = not self.inflight and not any(backlog.values())
            idle_checks = idle_checks + 1 if idle else 0
        self.request_stop()

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

    async def _on_message(self, message: AbstractIncomingMessage, queue_name: str) -> None:
        """Handle one delivery, held in `InFlight` so that shutdown and the watch can see it."""
        if self.stopping:
            return  # left unacked: closing the channel hands it back, in order
        assert self._handler is not None
        published = message.timestamp.timestamp() if message.timestamp else None
        with self.inflight.hold(queue_name, published):
            self.metrics.in_flight.set(len(self.inflight))
            await self._handler.handle(message, queue_name)
        self.metrics.in_flight.set(len(self.inflight))

    async def _watch(self, connection: AbstractRobustConnection) -> None:
        """Refresh the gauges, and hand everything back before a hold nears consumer_timeout."""
        stats = await connection.channel()
        while True:
            await asyncio.sleep(WATCH_SECONDS)
            try:
                await self.partitions.hear_broker_cancels()
                await self.partitions.restore_cancelled(self._topology_channel)
                await self._refresh_gauges(stats)
                if self.inflight.longest_hold() > self.settings.max_hold_seconds:
                    async with self._reconsuming:
                        await self._hand_back_everything(connection)
                self._prefetch_review.set()
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
        for name, count in (await self.partitions.backlog(stats)).items():
            self.metrics.backlog.labels(queue=name).set(count)
        self.metrics.oldest_event_age.set(self.inflight.oldest_event_age())

    async def _hand_back_everything(self, connection: AbstractRobustConnection) -> None:
        """Return every held delivery to RabbitMQ, in order, and consume afresh."""
        self.log.warning("worker.handing_back", held=len(self.inflight), reason="max_hold_seconds")
        self.inflight.returning_all = True
        try:
            await self._cancel_in_flight()
            await self.partitions.return_all(connection)
        finally:
            self.inflight.returning_all = False

    async def _review_prefetch(self, connection: AbstractRobustConnection) -> None:
        """Consume afresh whenever the prefetch no longer fits what is known of Connect.

        Asked at the first accepted call (so that a start leaves caution within a round trip,
        not at the next watch) and at every watch (a breaker that opened or closed).
        """
        while True:
            await self._prefetch_review.wait()
            self._prefetch_review.clear()
            if self.stopping or self._wants_cautious_prefetch() == self.partitions.cautious:
                continue
            try:
                async with self._reconsuming:
                    await self._change_prefetch(connection)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a broker hiccup: the next watch asks again
                self.log.warning("worker.prefetch_change_failed", error=repr(error))

    async def _change_prefetch(self, connection: AbstractRobustConnection) -> None:
        """Consume afresh with the prefetch that fits what is known of Connect.

        Each delivery held while Connect is down is handed back at a restart, and quorum
        queues count every such return (RabbitMQ 4.0-4.2 drop a message at 20 by default):
        few are held then. Changing the prefetch means consuming afresh; calls on the wire
        finish first, since cancelling one could send its event twice.
        """
        self.partitions.cautious = self._wants_cautious_prefetch()
        self.log.info(
            "worker.prefetch_changed", cautious=self.partitions.cautious, held=len(self.inflight)
        )
        # No call goes out meanwhile, so none is cut on the wire and every event not yet sent
        # goes back, in order, with the channel. Both are undone before consuming afresh: a
        # delivery on the new channel must be sent, or handed back by a nack of its own.
        self.guard.close()
        self.inflight.returning_all = True
        try:
            await self._hand_back_unsent(self.inflight.tasks())
            await self.partitions.release()
            await self._cancel_in_flight()
        finally:
            self.inflight.returning_all = False
            self.guard.reopen()
        await self.partitions.consume(connection)

    async def _cancel_in_flight(self) -> int:
        """Cancel every handler task; none of them acks after this."""
        tasks = self.inflight.tasks()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return len(tasks)

    async def _drain(self) -> None:
        """Hand back at once what cannot be sent; let calls on the wire finish within the bound.

        Nothing that waits (for its turn, a breaker, the limiter or a backoff) can be sent any
        more: those events end at once. Calls on the wire and settlements get the grace period.
        Every event not settled stays unacked, and closing the connection hands them back
        together, in order. The subscriptions are kept until then, on purpose: cancelling
        them first would let a standby replica take a partition over while this one still
        holds earlier events of its conversations, and send later ones first. Deliveries
        that still arrive are left unacked with the rest.
        """
        self.guard.close()
        self.inflight.returning_all = True
        waiting = self.inflight.tasks(WAITING)
        for task in waiting:
            task.cancel()
        self.log.info("worker.draining", in_flight=len(self.inflight), ended_waits=len(waiting))
        pending = self.inflight.tasks()
        if pending:
            grace = self._left_until(self.settings.shutdown_grace_seconds)
            _, pending = await asyncio.wait(pending, timeout=grace)
        abandoned = await self._hand_back_unsent(pending) if pending else 0
        handed_back = len(waiting) + len(pending)
        self.log.info("worker.drained", handed_back=handed_back, abandoned=abandoned)

    async def _hand_back_unsent(self, pending: set[asyncio.Task[object]]) -> int:
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
        on_the_wire = pending & self.inflight.tasks(frozenset({Stage.WIRE}))
        for task in pending - on_the_wire:
            task.cancel()
        late: set[asyncio.Task[object]] = set()
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
