"""Call Connect for one event until it accepts it or the retry decision says stop.

Each attempt goes through the guard (breakers, limiter: when a call may go); each failure goes
to the policy with the guard's account verdict (what follows it); the backoff between
attempts waits through the guard, so that shutdown ends it.
"""

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

from aio_pika.abc import AbstractIncomingMessage

from worker.metrics import Metrics
from worker.models import ChatIntegrationEvent
from worker.observability import short_key
from worker.pipeline.accepted import Accepted
from worker.pipeline.errors import EventFailure
from worker.pipeline.guard import Attempts, CallGuard
from worker.pipeline.policy import Action, Decision, FailureKind, RetryPolicy, Spent


class EventClient(Protocol):
    """What sending needs of the Connect client (`connect_client.ConnectClient`)."""

    async def send(self, event: ChatIntegrationEvent) -> Accepted:
        """Call SendChatIntegrationEvent once; raise an `EventFailure` for anything but a 2xx."""
        ...


class Sender:
    """Send events to Connect, retrying as the policy decides."""

    def __init__(
        self,
        client: EventClient,
        policy: RetryPolicy,
        guard: CallGuard,
        metrics: Metrics,
        log: Any,
        remember_delivered: Callable[[AbstractIncomingMessage], Awaitable[None]],
    ) -> None:
        self._client = client
        self._policy = policy
        self._guard = guard
        self._metrics = metrics
        self._log = log
        self._remember_delivered = remember_delivered
        self._background: set[asyncio.Future[None]] = set()

    async def send(
        self, event: ChatIntegrationEvent, message: AbstractIncomingMessage, attempts: Attempts
    ) -> None:
        """Call Connect until it accepts the event; raise the failure the policy stops at.

        The first call is made directly: most events need no retry, and even one more
        coroutine per event shows in the CPU per event. Retries are a plain loop rather than a
        tenacity one: a tenacity loop per message leaves reference cycles that only the garbage
        collector frees (measured: most of the worker's overhead over the bare libraries).
        tenacity computes the backoff (`RetryPolicy.backoff`).
        """
        try:
            accepted = await self._guard.call(lambda: self._call(event, message), attempts)
        except EventFailure as failure:
            accepted = await self._retry(failure, event, message, attempts)
        self._note_delivered(accepted, message, attempts)

    def _note_delivered(
        self, accepted: Accepted, message: AbstractIncomingMessage, attempts: Attempts
    ) -> None:
        """Log the delivery with the chat contact it went to (not personal data); count chats."""
        if accepted.new_chat:
            self._metrics.new_chats.inc()
        if accepted.odd_body is not None:
            # Delivered all the same: a 2xx is delivery, whatever its body.
            self._log.warning(
                "event.delivered_unread_answer",
                message_id=message.message_id,
                body=accepted.odd_body,
                request_id=accepted.request_id,
            )
        self._log.debug(
            "event.delivered",
            message_id=message.message_id,
            calls=attempts.calls,
            contact_id=accepted.contact_id,
            new_chat=accepted.new_chat,
        )

    async def _retry(
        self,
        failure: EventFailure,
        event: ChatIntegrationEvent,
        message: AbstractIncomingMessage,
        attempts: Attempts,
    ) -> Accepted:
        """Call again after a failure, as the policy decides, until accepted; else raise."""
        last: EventFailure | Accepted = failure
        while isinstance(last, EventFailure):
            decision = await self._decide(last, attempts)
            if decision.action is Action.STOP:
                raise last
            self._note_retry(last, decision, attempts, message)
            await self._guard.hold(partial(asyncio.sleep, decision.wait))
            last = await self._attempt(event, message, attempts)
        return last

    async def _attempt(
        self, event: ChatIntegrationEvent, message: AbstractIncomingMessage, attempts: Attempts
    ) -> EventFailure | Accepted:
        """Make one call through the guard; return its failure, or its 2xx answer."""
        try:
            return await self._guard.call(lambda: self._call(event, message), attempts)
        except EventFailure as failure:
            return failure

    async def _decide(self, failure: EventFailure, attempts: Attempts) -> Decision:
        """Ask the policy what follows a failure; take a held call off the budget."""
        verdict = await self._guard.account_verdict(failure, attempts)
        spent = Spent(attempts.calls, attempts.charged, attempts.budget_seconds())
        decision = self._policy.decide(failure, spent, verdict)
        if not decision.charged:
            attempts.forgive_last()
        return decision

    def _note_retry(
        self,
        failure: EventFailure,
        decision: Decision,
        attempts: Attempts,
        message: AbstractIncomingMessage,
    ) -> None:
        """Count and log a retry."""
        reason = "throttled" if decision.kind is FailureKind.THROTTLED else "transient"
        self._metrics.retries.labels(reason=reason).inc()
        self._log.debug(
            "event.retrying",
            message_id=message.message_id,
            conversation=short_key(message.routing_key),
            attempt=attempts.calls,
            error_code=failure.code,
            kind=decision.kind.value,
            sleep=round(decision.wait, 3),
        )

    async def _call(
        self, event: ChatIntegrationEvent, message: AbstractIncomingMessage
    ) -> Accepted:
        """Call Connect once; if this task is cancelled meanwhile, let the call finish.

        The channel's closing (a cut connection) cancels the handler while the request may
        already be on the wire. The call is left to complete and, if Connect accepts it, the
        ledger learns so, and skips the redelivery instead of sending the event twice.
        """
        call = asyncio.ensure_future(self._client.send(event))
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._remember_if_accepted(done, message))
            raise

    def _remember_if_accepted(
        self, call: "asyncio.Future[Accepted]", message: AbstractIncomingMessage
    ) -> None:
        """Record an abandoned call that Connect accepted (its failure needs nothing)."""
        if not call.cancelled() and call.exception() is None:
            self._metrics.delivered.inc()
            task = asyncio.ensure_future(self._remember_delivered(message))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
