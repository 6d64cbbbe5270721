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
from worker.pipeline.inflight import InFlight, Stage, Stopping
from worker.pipeline.ordering import ConversationLines, Outcome, Turn
from worker.pipeline.policy import RetryPolicy
from worker.pipeline.sending import Sender
from worker.pipeline.settlement import Delivered, Failed, Result, Settler, Unsent


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
        inflight: InFlight,
        worker_id: str,
        max_body_bytes: int,
        log: Any,
    ) -> None:
        self._sender = Sender(client, policy, guard, metrics, log, self._remember_delivered)
        self._guard = guard
        self._settler = settler
        self._metrics = metrics
        self._ledger = ledger
        self._inflight = inflight
        self._lines = ConversationLines()
        self._worker_id = worker_id
        self._max_body_bytes = max_body_bytes
        self._log = log

    async def handle(self, message: AbstractIncomingMessage, queue_name: str) -> None:
        """Carry one delivery to its one settlement (ack, dead letter, hand back); never raise."""
        self._metrics.consumed.inc()
        attempts = Attempts()
        try:
            event = decode(message.body, self._max_body_bytes, message.headers)
        except EventFailure as failure:
            await self._settle(message, self._failed(failure, attempts, queue_name))
            return
        attempts.conversation = conversation_key(event)  # what the account verdict weighs
        # Take the turn before the first await: deliveries arrive in queue order.
        with self._lines.take_turn(attempts.conversation) as turn:
            result = await self._process(turn, message, event, attempts, queue_name)
            turn.outcome = await self._settle(message, result)

    async def _process(
        self,
        turn: Turn,
        message: AbstractIncomingMessage,
        event: ChatIntegrationEvent,
        attempts: Attempts,
        queue_name: str,
    ) -> Result:
        """Wait for the turn, then send; say what became of the event, not what to do with it."""
        try:
            with self._inflight.stage(Stage.TURN):
                may_go = await turn.wait()
            if not may_go:
                return Unsent("an earlier event of its conversation went back")
            if await self._already_delivered(message):
                self._metrics.duplicates_skipped.inc()
                self._log.info("event.duplicate_skipped", message_id=message.message_id)
                return Delivered()
            await self._sender.send(event, message, attempts)
        except EventFailure as failure:
            return self._failed(failure, attempts, queue_name)
        except Stopping:
            return Unsent("the worker is stopping")
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # a bug must cost one dead letter, not the worker
            self._log.exception("event.unexpected_error", message_id=message.message_id)
            bug = PermanentApiError(ErrorVariant.UNKNOWN, type(error).__name__, "worker error")
            return self._failed(bug, attempts, queue_name)
        self._metrics.delivered.inc()
        await self._remember_delivered(message)
        return Delivered()

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

    def _failed(self, failure: EventFailure, attempts: Attempts, queue_name: str) -> Failed:
        """Return a failure with what its dead letter says about the attempts."""
        failed_at = datetime.now(UTC)
        context = FailureContext(
            attempts=attempts.calls,
            ambiguous_attempts=attempts.ambiguous,
            first_attempt_at=attempts.first_at or failed_at,
            failed_at=failed_at,
            queue=queue_name,
            worker_id=self._worker_id,
        )
        return Failed(failure, context)

    async def _settle(self, message: AbstractIncomingMessage, result: Result) -> Outcome:
        """Settle through the one decider; count a dead letter once it is confirmed."""
        outcome = await self._settler.settle(message, result)
        if isinstance(result, Failed) and outcome is Outcome.SETTLED:
            self._metrics.dead_lettered.labels(variant=result.failure.variant.value).inc()
        return outcome
