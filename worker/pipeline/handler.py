"""One message's life: decode -> wait for its turn -> send (with retries) -> settle."""

import asyncio
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage

from worker.metrics import Metrics
from worker.models import ChatIntegrationEvent, conversation_key
from worker.pipeline.connect_client import ConnectClient
from worker.pipeline.decoding import decode
from worker.pipeline.dedupe import DeliveredLedger, Fingerprint, Verdict
from worker.pipeline.envelope import FailureContext
from worker.pipeline.errors import ErrorVariant, EventFailure, PermanentApiError
from worker.pipeline.guard import Attempts, CallGuard
from worker.pipeline.ordering import ConversationLines, Outcome
from worker.pipeline.policy import RetryPolicy
from worker.pipeline.sending import Sender
from worker.pipeline.settlement import Settler


class MessageHandler:
    """Carry each delivery through the pipeline to exactly one settlement."""

    def __init__(
        self,
        client: ConnectClient,
        policy: RetryPolicy,
        guard: CallGuard,
        settler: Settler,
        metrics: Metrics,
        ledger: DeliveredLedger | None = None,
        *,
        worker_id: str,
        max_body_bytes: int,
        log: Any,
    ) -> None:
        self._sender = Sender(client, policy, guard, metrics, log, self._remember_delivered)
        self._guard = guard
        self._settler = settler
        self._metrics = metrics
        self._ledger = ledger
        self._lines = ConversationLines()
        self._worker_id = worker_id
        self._max_body_bytes = max_body_bytes
        self._log = log

    async def handle(self, message: AbstractIncomingMessage, queue_name: str) -> None:
        """Deliver one message to Connect, or dead-letter it, or hand it back; never raise."""
        self._metrics.consumed.inc()
        attempts = Attempts()
        try:
            event = decode(message.body, self._max_body_bytes, message.headers)
        except EventFailure as failure:
            await self._dead_letter(message, failure, attempts, queue_name)
            return
        # Take the turn before the first await: deliveries arrive in queue order.
        turn = self._lines.enter(conversation_key(event))
        outcome = Outcome.HANDED_BACK
        try:
            if not await self._guard.hold(turn.wait):
                # While the worker hands everything back, the channel's closing returns the
                # held deliveries together, in order; one nack now would put this one behind
                # its successors in the queue.
                if not self._guard.closed:
                    await self._settler.hand_back(message)
                return
            outcome = await self._deliver(message, event, attempts, queue_name)
        finally:
            turn.finish(outcome)

    async def _deliver(
        self,
        message: AbstractIncomingMessage,
        event: ChatIntegrationEvent,
        attempts: Attempts,
        queue_name: str,
    ) -> Outcome:
        """Send, then settle; return whether the message was settled or handed back."""
        if await self._already_delivered(message):
            self._metrics.duplicates_skipped.inc()
            self._log.info("event.duplicate_skipped", message_id=message.message_id)
            return Outcome.SETTLED if await self._settler.settle(message) else Outcome.HANDED_BACK
        try:
            await self._sender.send(event, message, attempts)
        except EventFailure as failure:
            acked = await self._dead_letter(message, failure, attempts, queue_name)
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # a bug must cost one dead letter, not the worker
            self._log.exception("event.unexpected_error", message_id=message.message_id)
            bug = PermanentApiError(ErrorVariant.UNKNOWN, type(error).__name__, "worker error")
            acked = await self._dead_letter(message, bug, attempts, queue_name)
        else:
            self._metrics.delivered.inc()
            await self._remember_delivered(message)
            acked = await self._settler.settle(message)
        return Outcome.SETTLED if acked else Outcome.HANDED_BACK

    async def _already_delivered(self, message: AbstractIncomingMessage) -> bool:
        """Return True when the ledger says this very event was delivered; never raise.

        A message_id delivered before with another body is a reused id: a different event,
        sent like any other and counted.
        """
        if self._ledger is None or not message.message_id:
            return False
        try:
            verdict = await self._ledger.verdict(Fingerprint.of(message.message_id, message.body))
        except Exception as error:  # an unreachable ledger must not stop delivery
            self._log.warning("ledger.unavailable", error=type(error).__name__)
            return False
        if verdict is Verdict.REUSED_ID:
            self._metrics.reused_message_ids.inc()
            self._log.info("event.reused_message_id", message_id=message.message_id)
        return verdict is Verdict.DELIVERED

    async def _remember_delivered(self, message: AbstractIncomingMessage) -> None:
        """Note a delivered event in the ledger; a ledger failure only costs dedupe."""
        if self._ledger is None or not message.message_id:
            return
        try:
            await self._ledger.remember(Fingerprint.of(message.message_id, message.body))
        except Exception as error:
            self._log.warning("ledger.unavailable", error=type(error).__name__)

    async def _dead_letter(
        self,
        message: AbstractIncomingMessage,
        failure: EventFailure,
        attempts: Attempts,
        queue_name: str,
    ) -> bool:
        """Publish the dead letter and ack; return True once the original is acked."""
        failed_at = datetime.now(UTC)
        context = FailureContext(
            attempts=attempts.calls,
            ambiguous_attempts=attempts.ambiguous,
            first_attempt_at=attempts.first_at or failed_at,
            failed_at=failed_at,
            queue=queue_name,
            worker_id=self._worker_id,
        )
        acked = await self._settler.settle(message, failure, context)
        if acked:
            self._metrics.dead_lettered.labels(variant=failure.variant.value).inc()
        return acked
