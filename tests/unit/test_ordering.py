"""Per-conversation order in one process: turns, hand-backs, cancellation, release of lines."""

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial

from worker.pipeline.ordering import ConversationLines, Outcome


async def settle() -> None:
    """Let every ready task run until it waits again."""
    for _ in range(10):
        await asyncio.sleep(0)


async def take_turn(
    lines: ConversationLines,
    key: str,
    work: Callable[[], Awaitable[object]],
    outcome: Outcome = Outcome.SETTLED,
) -> bool:
    """Do `work` in a turn through the handler's protocol; return whether the turn went ahead.

    Tasks enter their turns in the order they are created, as deliveries do.
    """
    with lines.take_turn(key) as turn:
        if not await turn.wait():
            return False
        await work()
        turn.outcome = outcome
        return True


def logged(log: list[str], name: str, seconds: float = 0.0) -> Callable[[], Awaitable[None]]:
    """Return work that logs its start and end, taking `seconds` in between."""

    async def work() -> None:
        log.append(f"{name} start")
        await asyncio.sleep(seconds)
        log.append(f"{name} end")

    return work


async def test_turns_of_one_conversation_run_one_after_another_in_enter_order() -> None:
    # Given three events of one conversation, the first one slow
    lines = ConversationLines()
    log: list[str] = []

    # When they all run at once
    await asyncio.gather(
        take_turn(lines, "a", logged(log, "1", 0.05)),
        take_turn(lines, "a", logged(log, "2")),
        take_turn(lines, "a", logged(log, "3")),
    )

    # Then each starts only after the previous one ended, in the order they entered
    assert log == ["1 start", "1 end", "2 start", "2 end", "3 start", "3 end"]


async def test_different_conversations_run_concurrently() -> None:
    # Given an event of conversation A that runs until it is released
    lines = ConversationLines()
    release_a = asyncio.Event()
    log: list[str] = []
    first_a = asyncio.create_task(take_turn(lines, "a", release_a.wait))
    await settle()

    # When an event of conversation B comes
    went = await asyncio.wait_for(take_turn(lines, "b", logged(log, "b")), 1.0)

    # Then B is done while A still runs
    assert went
    assert log == ["b start", "b end"]
    assert not first_a.done()
    release_a.set()
    assert await first_a


async def test_a_handed_back_event_hands_back_the_ones_behind_it() -> None:
    # Given three events of one conversation
    lines = ConversationLines()
    log: list[str] = []

    # When the first is handed back to the broker unsettled
    results = await asyncio.gather(
        take_turn(lines, "a", logged(log, "1"), outcome=Outcome.HANDED_BACK),
        take_turn(lines, "a", logged(log, "2")),
        take_turn(lines, "a", logged(log, "3")),
    )

    # Then the later ones do not go ahead, so none overtakes it when it is redelivered
    assert list(results) == [True, False, False]
    assert log == ["1 start", "1 end"]
    assert len(lines) == 0


async def test_a_settled_event_lets_the_next_one_go() -> None:
    lines = ConversationLines()
    first, second = lines.enter("a"), lines.enter("a")

    first.finish(Outcome.SETTLED)

    assert await second.wait() is True


async def test_a_cancelled_turn_keeps_its_place_until_the_earlier_event_finishes() -> None:
    # Given event 1 running and event 2 waiting behind it
    lines = ConversationLines()
    release_first = asyncio.Event()
    first = asyncio.create_task(take_turn(lines, "a", release_first.wait))
    second = asyncio.create_task(take_turn(lines, "a", logged([], "2")))
    await settle()

    # When event 2 is cancelled while event 1 still runs, and event 3 arrives
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    log: list[str] = []
    third = asyncio.create_task(take_turn(lines, "a", logged(log, "3")))
    await settle()

    # Then event 3 does not find the line empty: it waits for event 1
    assert not third.done()
    assert log == []
    assert len(lines) == 1

    # And once event 1 is settled, event 3 is handed back behind the unsettled event 2
    release_first.set()
    assert await first is True
    assert await asyncio.wait_for(third, 1.0) is False
    assert log == []
    assert len(lines) == 0


async def test_lines_are_released_after_every_turn_finished() -> None:
    # Given events of two conversations in flight
    lines = ConversationLines()
    release = asyncio.Event()
    keys = ("a", "b", "a", "b")
    tasks = [asyncio.create_task(take_turn(lines, key, release.wait)) for key in keys]
    await settle()
    assert len(lines) == 2

    # When all of them finish
    release.set()
    await asyncio.gather(*tasks)

    # Then no line is left behind
    assert len(lines) == 0


async def test_an_event_after_the_line_emptied_goes_at_once() -> None:
    # Given a conversation whose only event has finished
    lines = ConversationLines()
    lines.enter("a").finish(Outcome.SETTLED)
    assert len(lines) == 0

    # When the next event of it arrives, it does not wait
    assert await asyncio.wait_for(lines.enter("a").wait(), 0.1) is True


async def test_finish_is_idempotent() -> None:
    lines = ConversationLines()
    first, second = lines.enter("a"), lines.enter("a")

    first.finish(Outcome.SETTLED)
    first.finish(Outcome.HANDED_BACK)

    assert await second.wait() is True


async def test_a_retried_event_holds_back_its_conversation_but_not_others() -> None:
    """Unit-level test of the in-process ordering under retries."""
    # Given deliveries in queue order: A1, B1, B2, A2; A1 is throttled twice before it gets through
    lines = ConversationLines()
    sent: list[str] = []

    async def send(name: str, retries: int = 0) -> None:
        for _ in range(retries):
            await asyncio.sleep(0.02)  # a throttled attempt and its backoff
        sent.append(name)

    deliveries = [("A1", 2), ("B1", 0), ("B2", 0), ("A2", 0)]

    # When they are handled concurrently
    went = await asyncio.gather(
        *(take_turn(lines, name[0], partial(send, name, retries)) for name, retries in deliveries)
    )

    # Then B's events go first, in order, while A2 waits for A1 to get through
    assert all(went)
    assert sent == ["B1", "B2", "A1", "A2"]
    assert len(lines) == 0
