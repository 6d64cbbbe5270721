"""The one place that decides a message's fate: ack it, or dead-letter it and then ack it.

A dead letter is published with publisher confirms and mandatory routing on a channel opened
with `on_return_raises=True`; the original is acked only once the broker has confirmed it. If
that publish fails, the original goes back to its queue after a pause, and is never acked.
"""

import asyncio
from typing import Any

from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from worker.observability import scrub
from worker.pipeline.envelope import FailureContext, build_dead_letter
from worker.pipeline.errors import EventFailure

PUBLISH_TIMEOUT_SECONDS = 30.0


class Settler:
    """Settle messages of one work queue."""

    def __init__(
        self, dead_letter_exchange: AbstractExchange, retry_delay_seconds: float, log: Any
    ) -> None:
        self._exchange = dead_letter_exchange
        self._retry_delay = retry_delay_seconds
        self._log = log

    async def settle(
        self,
        message: AbstractIncomingMessage,
        failure: EventFailure | None = None,
        context: FailureContext | None = None,
    ) -> bool:
        """Ack a delivered message or dead-letter a failed one; return True once it is acked."""
        if failure is None or context is None:
            return await self._ack(message)
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
            await self._requeue_later(message)
            return False
        log.warning(
            "event.dead_lettered",
            http_status=failure.http_status,
            error_message=scrub(failure.message),
        )
        return await self._ack(message)

    async def hand_back(self, message: AbstractIncomingMessage) -> None:
        """Return a message unsettled, at once, for the broker to deliver again."""
        try:
            await message.nack(requeue=True)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._log.warning("message.nack_lost", message_id=message.message_id, error=repr(error))

    async def _ack(self, message: AbstractIncomingMessage) -> bool:
        """Ack; a closed channel means the broker redelivers the message anyway."""
        try:
            await message.ack()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._log.warning("message.ack_lost", message_id=message.message_id, error=repr(error))
            return False
        return True

    async def _requeue_later(self, message: AbstractIncomingMessage) -> None:
        """Hand the message back after a pause, so a broken route does not spin hot."""
        await asyncio.sleep(self._retry_delay)
        try:
            await message.nack(requeue=True)
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._log.warning("message.nack_lost", message_id=message.message_id, error=repr(error))
