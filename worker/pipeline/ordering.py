"""Per-conversation order inside one process.

Deliveries arrive in queue order and each gets a turn in its conversation's line when it
arrives, before its task first awaits. A turn may start only once every earlier event of the
conversation here is settled (acked or dead-lettered). If an earlier one was handed back to the
broker unsettled, the later ones are handed back too, so that none overtakes it when it is
delivered again. Conversations do not wait for each other.
"""

import asyncio
from enum import Enum


class Outcome(Enum):
    """How a turn ended."""

    SETTLED = "settled"
    """Acked or dead-lettered: the next event of the conversation may go."""
    HANDED_BACK = "handed_back"
    """Left unsettled for the broker to redeliver: later events must not overtake it."""


class Turn:
    """One event's place in its conversation's line."""

    def __init__(
        self,
        line: "ConversationLines",
        key: str,
        previous: "asyncio.Future[Outcome] | None",
        mine: "asyncio.Future[Outcome]",
    ) -> None:
        self._line = line
        self._key = key
        self._previous = previous
        self._mine = mine
        self.outcome = Outcome.HANDED_BACK
        """How the turn ends unless the holder says otherwise: handed back is the safe side."""

    def __enter__(self) -> "Turn":
        return self

    def __exit__(self, *_: object) -> None:
        self.finish(self.outcome)

    async def wait(self) -> bool:
        """Wait until the previous event is done; return True if this one may go ahead."""
        if self._previous is None:
            return True
        return await asyncio.shield(self._previous) is Outcome.SETTLED

    def finish(self, outcome: Outcome) -> None:
        """End the turn; idempotent, so a `finally` can always call it.

        A turn cancelled while an earlier one still runs ends only after that one, so that a
        newcomer never finds the line empty while an earlier event is unsettled.
        """
        if self._previous is not None and not self._previous.done():
            self._previous.add_done_callback(lambda _: self._resolve(outcome))
        else:
            self._resolve(outcome)

    def _resolve(self, outcome: Outcome) -> None:
        """Publish the outcome to the next turn and leave the line."""
        if not self._mine.done():
            self._mine.set_result(outcome)
        self._line.release(self._key, self._mine)


class ConversationLines:
    """Hand out turns per conversation key."""

    def __init__(self) -> None:
        self._tails: dict[str, asyncio.Future[Outcome]] = {}

    def __len__(self) -> int:
        return len(self._tails)

    def take_turn(self, key: str) -> Turn:
        """Take the next turn of a conversation, to hold in a `with` block.

        Enter in arrival order, before the delivery's task first awaits; inside, `await
        turn.wait()` says whether the event may go, and the holder sets `turn.outcome` once it
        is settled. Leaving the block any other way (an error, a cancellation) hands it back.
        """
        return self.enter(key)

    def enter(self, key: str) -> Turn:
        """Take the next turn of a conversation; call it in arrival order, without awaiting."""
        previous = self._tails.get(key)
        if previous is not None and previous.done():
            previous = None  # everything before it has ended: nothing to wait for
        mine: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._tails[key] = mine
        return Turn(self, key, previous, mine)

    def release(self, key: str, future: "asyncio.Future[Outcome]") -> None:
        """Forget a conversation once its last turn has ended."""
        if self._tails.get(key) is future:
            del self._tails[key]
