"""Every delivery this replica holds unsettled, and where in the pipeline it stands.

The worker owns one `InFlight`. A delivery enters it when it arrives and leaves it once settled
(acked, dead-lettered) or handed back. On the way it moves through stages: waiting for its
conversation's turn, waiting for the guard (a breaker, the rate limiter, a backoff), on the
wire. The stage is what shutdown needs: a delivery that waits can be handed back at once, one
on the wire must get its answer first. The age of what is held is what the hold watch (stay
under RabbitMQ's `consumer_timeout`) and the oldest-event gauge need.

Each delivery runs in a task of its own (aio-pika's consumer gives each message one), so the
current task identifies it: the guard marks stages without being handed the message.
"""

import asyncio
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass


class Stage(enum.Enum):
    """Where a held delivery stands."""

    WORKING = "working"
    """Between waits (decoding, checking the ledger, settling): it runs on by itself."""
    TURN = "turn"
    """Waiting for an earlier event of its conversation to be settled."""
    GUARD = "guard"
    """Waiting for a breaker, the rate limiter or a backoff before its next call."""
    WIRE = "wire"
    """Its call is on the wire: Connect may accept it; it must not be handed back unanswered."""


WAITING = frozenset({Stage.TURN, Stage.GUARD})
"""The stages in which a delivery can be handed back at once: nothing of it was sent."""


class Stopping(Exception):
    """The worker is handing its deliveries back: the call was not made."""


@dataclass
class Delivery:
    """One held delivery: when it was taken, when its event was published, where it stands."""

    queue: str
    taken_at: float
    published_at: float
    stage: Stage = Stage.WORKING


class InFlight:
    """The registry of held deliveries, keyed by the task that carries each."""

    def __init__(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._monotonic = monotonic
        self._wall = wall
        self._held: dict[asyncio.Task[object], Delivery] = {}
        self.returning_all = False
        """True while every held delivery goes back by closing the channel (shutdown, a hold
        near consumer_timeout): handing one back on its own would put it behind its successors."""

    def __len__(self) -> int:
        return len(self._held)

    def hold(self, queue: str, published_at: float | None) -> "Holding":
        """Register the current task's delivery for as long as the `with` block runs."""
        task = asyncio.current_task()
        assert task is not None, "a delivery is carried by a task"
        delivery = Delivery(queue, self._monotonic(), published_at or self._wall())
        return Holding(self._held, task, delivery)

    def stage(self, stage: Stage) -> "StageMark":
        """Mark the current task's delivery as in `stage` for a `with` block, then as it was.

        A call outside any delivery (a probe in a test) is marked nowhere.
        """
        return StageMark(self._held.get(asyncio.current_task()), stage)  # type: ignore[arg-type]

    def tasks(self, stages: frozenset[Stage] | None = None) -> set[asyncio.Task[object]]:
        """Return the tasks of the deliveries in the given stages (all when None)."""
        return {task for task, held in self._held.items() if stages is None or held.stage in stages}

    def longest_hold(self) -> float:
        """Return how long the longest-held delivery has been held, in seconds (0 if none)."""
        if not self._held:
            return 0.0
        return self._monotonic() - min(held.taken_at for held in self._held.values())

    def oldest_event_age(self) -> float | None:
        """Return the age of the oldest event held (since it was published), None if none."""
        if not self._held:
            return None
        oldest = min(held.published_at for held in self._held.values())
        return max(0.0, self._wall() - oldest)


# Context managers as small classes rather than @contextmanager generators: every event goes
# through several of them, and a generator-based one costs several times as much CPU.


class Holding:
    """The registration of one delivery, for the duration of a `with` block."""

    __slots__ = ("_delivery", "_held", "_task")

    def __init__(
        self,
        held: dict[asyncio.Task[object], Delivery],
        task: asyncio.Task[object],
        delivery: Delivery,
    ) -> None:
        self._held, self._task, self._delivery = held, task, delivery

    def __enter__(self) -> Delivery:
        self._held[self._task] = self._delivery
        return self._delivery

    def __exit__(self, *_: object) -> None:
        self._held.pop(self._task, None)


class StageMark:
    """A delivery's stage for the duration of a `with` block."""

    __slots__ = ("_before", "_delivery", "_stage")

    def __init__(self, delivery: Delivery | None, stage: Stage) -> None:
        self._delivery, self._stage = delivery, stage
        self._before = stage

    def __enter__(self) -> None:
        if self._delivery is not None:
            self._before, self._delivery.stage = self._delivery.stage, self._stage

    def __exit__(self, *_: object) -> None:
        if self._delivery is not None:
            self._delivery.stage = self._before
