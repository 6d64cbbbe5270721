"""The one place that decides a message's fate: ack it, dead-letter it, or hand it back.

The handler says what became of an event (`Delivered`, `Failed`, `Unsent`); `Settler.settle`
picks the verb, and nothing else acks, nacks or publishes a dead letter:

- ack: Connect accepted the event (or had already accepted it: a redelivered duplicate);
- dead-letter: the event failed for good. The dead letter is published with publisher
  confirms and mandatory routing on a channel opened with `on_return_raises=True`; the original
  is acked only once the broker has confirmed it. If that publish fails, the original is handed
  back after a pause, and is never acked;
- hand back: the event was not sent (the worker is stopping, or an earlier event of its
  conversation went back). While the worker returns every held delivery by closing its channel
  (`InFlight.returning_all`), a hand-back leaves the message to that: one nack now would put it
  behind its successors in the queue.
"""

import asyncio
from dataclasses import dataclass
from typing import Any

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from worker.observability import scrub
from worker.pipeline.envelope import FailureContext, build_dead_letter
from worker.pipeline.errors import EventFailure
from worker.pipeline.inflight import InFlight
from worker.pipeline.ordering import Outcome

PUBLISH_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Delivered:
    """Connect accepted the event, now or before (a redelivered duplicate)."""


@dataclass(frozen=True)
class Failed:
    """The event failed for good: its dead letter says why."""

    failure: EventFailure
    context: FailureContext


@dataclass(frozen=True)
class Unsent:
    """The event was not sent and did not fail: it goes back to its queue."""

    reason: str


Result = Delivered | Failed | Unsent


class Settler:
    """Settle the messages of the work queues."""

    def __init__(
        self,
        dead_letter_exchange: AbstractExchange,
        retry_delay_seconds: float,
        inflight: InFlight,
        log: Any,
    ) -> None:
        self._exchange = dead_letter_exchange
        self._retry_delay = retry_delay_seconds
        self._inflight = inflight
        self._log = log

    async def settle(self, message: AbstractIncomingMessage, result: Result) -> Outcome:
        """Ack, dead-letter or hand back, as the result says; return how the turn ended."""
        match result:
            case Delivered():
                acked = await self.ack(message)
            case Failed(failure, context):
                acked = await self.dead_letter(message, failure, context)
            case Unsent():
                await self.hand_back(message)
                acked = False
        return Outcome.SETTLED if acked else Outcome.HANDED_BACK

    async def ack(self, message: AbstractIncomingMessage) -> bool:
        """Ack; a closed channel means the broker redelivers the message anyway."""
        try:
            await message.ack()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._log.warning("message.ack_lost", message_id=message.message_id, error=repr(error))
            return False
        return True

    async def dead_letter(
        self, message: AbstractIncomingMessage, failure: EventFailure, context: FailureContext
    ) -> bool:
        """Publish the dead letter, confirmed, then ack; return True once the original is acked."""
        log = self._log.bind(
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            variant=failure.variant.value,
            error_code=failure.code,
            attempts=context.attempts,
        )
        try:
            await self._exchange.publish(
                build_dead_letter(message, failure, context),
                routing_key=failure.variant.value,
                mandatory=True,
                timeout=PUBLISH_TIMEOUT_SECONDS,
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.error("dead_letter.publish_failed", error=scrub(repr(error)))
            # A pause first, so that a broken route does not spin hot.
            await self.hand_back(message, after=self._retry_delay)
            return False
        log.warning(
            "event.dead_lettered",
            http_status=failure.http_status,
            error_message=scrub(failure.message),
        )
        return await self.ack(message)

    async def hand_back(self, message: AbstractIncomingMessage, after: float = 0.0) -> None:
        """Return a message unsettled for the broker to deliver again (see the module doc)."""
        if after:
            await asyncio.sleep(after)
        if self._inflight.returning_all:
            return
        try:
            await message.nack(requeue=True)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._log.warning("message.nack_lost", message_id=message.message_id, error=repr(error))
