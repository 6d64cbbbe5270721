"""The circuit breaker: open on consecutive failures, one probe at a time, close on success.

State tests use a fake clock and ask `admit()` afresh after moving it (a call that is already
waiting sleeps in real time). Tests about calls that wait use the real clock and short intervals.
"""

import asyncio

import pytest

from worker.pipeline.breaker import Breaker, BreakerState


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_breaker(
    clock: FakeClock | None = None,
    threshold: int = 3,
    probe_seconds: float = 1.0,
    max_probe_seconds: float = 4.0,
    changes: list[BreakerState] | None = None,
) -> Breaker:
    def on_change(breaker: Breaker) -> None:
        if changes is not None:
            changes.append(breaker.state)

    if clock is None:
        return Breaker("outage", threshold, probe_seconds, max_probe_seconds, on_change)
    return Breaker("outage", threshold, probe_seconds, max_probe_seconds, on_change, clock)


def open_breaker(breaker: Breaker, threshold: int = 3) -> None:
    for _ in range(threshold):
        breaker.record_failure(probe=False)
    assert breaker.state is BreakerState.OPEN


async def admit_now(breaker: Breaker) -> bool | None:
    """Return what `admit()` answers at once, or None if it would wait."""
    try:
        return await asyncio.wait_for(breaker.admit(), 0.01)
    except TimeoutError:
        return None


async def settle() -> None:
    """Let every ready task run until it waits again."""
    for _ in range(5):
        await asyncio.sleep(0)


# Opening


async def test_closed_breaker_admits_at_once_and_not_as_a_probe() -> None:
    breaker = make_breaker(FakeClock())

    assert await admit_now(breaker) is False
    assert breaker.closed


def test_opens_after_threshold_consecutive_failures() -> None:
    # Given a breaker with threshold 3
    clock = FakeClock()
    breaker = make_breaker(clock, threshold=3)
    clock.now = 7.0

    # When two calls fail, it stays closed; when the third fails, it opens
    breaker.record_failure(probe=False)
    breaker.record_failure(probe=False)
    assert breaker.closed
    breaker.record_failure(probe=False)

    # Then it is open since the third failure
    assert breaker.state is BreakerState.OPEN
    assert breaker.opened_at == 7.0


def test_a_success_resets_the_count_of_consecutive_failures() -> None:
    # Given two failures, then a success
    breaker = make_breaker(FakeClock(), threshold=3)
    breaker.record_failure(probe=False)
    breaker.record_failure(probe=False)
    breaker.record_success()

    # When two more calls fail
    breaker.record_failure(probe=False)
    breaker.record_failure(probe=False)

    # Then the breaker is still closed: the failures were not consecutive
    assert breaker.closed
    assert breaker.failures == 2


# While open


async def test_open_breaker_holds_calls_until_the_probe_time() -> None:
    # Given a breaker that opened at t=0 with a 1 s probe interval
    clock = FakeClock()
    breaker = make_breaker(clock, probe_seconds=1.0)
    open_breaker(breaker)

    # When a call asks before the probe time, it waits; at the probe time it goes as the probe
    clock.now = 0.99
    assert await admit_now(breaker) is None
    clock.now = 1.0
    assert await admit_now(breaker) is True
    assert breaker.state is BreakerState.PROBING


async def test_exactly_one_waiting_call_is_admitted_as_the_probe() -> None:
    # Given an open breaker (real clock, 50 ms probe interval) and three waiting calls
    breaker = make_breaker(probe_seconds=0.05, max_probe_seconds=1.0)
    open_breaker(breaker)
    waiting = [asyncio.create_task(breaker.admit()) for _ in range(3)]
    await settle()
    assert not any(task.done() for task in waiting)

    # When the probe time comes
    await asyncio.sleep(0.1)

    # Then exactly one of them goes, as the probe; the others keep waiting
    done = [task for task in waiting if task.done()]
    assert [task.result() for task in done] == [True]
    assert breaker.state is BreakerState.PROBING
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)


async def test_successful_probe_closes_and_releases_every_waiting_call() -> None:
    # Given a probe out, and two calls waiting behind it
    clock = FakeClock()
    breaker = make_breaker(clock, probe_seconds=1.0)
    open_breaker(breaker)
    clock.now = 1.0
    assert await admit_now(breaker) is True
    waiting = [asyncio.create_task(breaker.admit()) for _ in range(2)]
    await settle()
    assert not any(task.done() for task in waiting)

    # When the probe succeeds
    breaker.record_success()
    await settle()

    # Then the breaker is closed and both calls go, neither as a probe
    assert breaker.closed
    assert [task.result() for task in waiting if task.done()] == [False, False]
    assert breaker.opened_at is None


async def test_failed_probe_doubles_the_interval_up_to_the_maximum() -> None:
    # Given a breaker with 1 s probes, at most 4 s apart, opened at t=0
    clock = FakeClock()
    breaker = make_breaker(clock, probe_seconds=1.0, max_probe_seconds=4.0)
    open_breaker(breaker)
    probe_at = 1.0

    # When each probe fails, the next one comes 2 s, 4 s, then 4 s later
    for interval in (2.0, 4.0, 4.0):
        clock.now = probe_at
        assert await admit_now(breaker) is True
        breaker.record_failure(probe=True)
        assert breaker.state is BreakerState.OPEN
        probe_at += interval
        clock.now = probe_at - 0.01
        assert await admit_now(breaker) is None, f"probe due {interval} s later came early"


async def test_failures_of_other_calls_while_open_do_not_delay_the_probe() -> None:
    # Given an open breaker with its probe due at t=1
    clock = FakeClock()
    breaker = make_breaker(clock, probe_seconds=1.0)
    open_breaker(breaker)

    # When calls admitted before it opened fail late
    clock.now = 0.5
    breaker.record_failure(probe=False)
    breaker.record_failure(probe=False)

    # Then the probe still goes at t=1
    clock.now = 1.0
    assert await admit_now(breaker) is True


async def test_reopening_after_a_close_starts_from_the_base_interval() -> None:
    # Given a breaker whose probe failed once (next interval 2 s), then succeeded
    clock = FakeClock()
    breaker = make_breaker(clock, probe_seconds=1.0, max_probe_seconds=8.0)
    open_breaker(breaker)
    clock.now = 1.0
    assert await admit_now(breaker) is True
    breaker.record_failure(probe=True)
    clock.now = 3.0
    assert await admit_now(breaker) is True
    breaker.record_success()

    # When it opens again at t=10
    clock.now = 10.0
    open_breaker(breaker)

    # Then its first probe comes 1 s later, and a failed one reschedules 2 s later
    clock.now = 11.0
    assert await admit_now(breaker) is True
    breaker.record_failure(probe=True)
    clock.now = 13.0
    assert await admit_now(breaker) is True


async def test_abandoned_probe_lets_another_call_probe_at_once() -> None:
    # Given a probe out and a call waiting behind it
    clock = FakeClock()
    breaker = make_breaker(clock, probe_seconds=1.0)
    open_breaker(breaker)
    clock.now = 1.0
    assert await admit_now(breaker) is True
    waiting = asyncio.create_task(breaker.admit())
    await settle()
    assert not waiting.done()

    # When the probe ends without an answer
    breaker.abandon_probe()
    await settle()

    # Then the waiting call goes at once, as the new probe
    assert waiting.done()
    assert waiting.result() is True
    assert breaker.state is BreakerState.PROBING


async def test_an_abandoned_probe_keeps_the_backoff_of_the_failed_ones() -> None:
    # Given a breaker (1 s probes, at most 8 s apart) whose probes failed at t=1 and t=3
    clock = FakeClock()
    breaker = make_breaker(clock, probe_seconds=1.0, max_probe_seconds=8.0)
    open_breaker(breaker)
    for probe_at in (1.0, 3.0):
        clock.now = probe_at
        assert await admit_now(breaker) is True
        breaker.record_failure(probe=True)

    # When the probe at t=7 is abandoned, and the one that replaces it at once fails too
    clock.now = 7.0
    assert await admit_now(breaker) is True
    breaker.abandon_probe()
    assert await admit_now(breaker) is True
    breaker.record_failure(probe=True)

    # Then the next probe is 8 s later, as after a third failure; not 2 s, as after a first
    clock.now = 9.0
    assert await admit_now(breaker) is None  # actual: True, the backoff restarted at 1 s


def test_abandon_probe_does_nothing_unless_probing() -> None:
    clock = FakeClock()
    breaker = make_breaker(clock)

    breaker.abandon_probe()
    assert breaker.closed

    open_breaker(breaker)
    breaker.abandon_probe()
    assert breaker.state is BreakerState.OPEN


# Reporting


async def test_on_change_is_called_on_every_state_change_and_only_then() -> None:
    # Given a breaker that records its state on every change
    clock = FakeClock()
    changes: list[BreakerState] = []
    breaker = make_breaker(clock, threshold=2, probe_seconds=1.0, changes=changes)

    # When it opens, probes, fails the probe, probes, abandons it, probes and closes
    breaker.record_failure(probe=False)
    breaker.record_failure(probe=False)
    breaker.record_failure(probe=False)  # already open: no change
    clock.now = 1.0
    await admit_now(breaker)
    breaker.record_failure(probe=True)
    clock.now = 3.0
    await admit_now(breaker)
    breaker.abandon_probe()
    await admit_now(breaker)
    breaker.record_success()
    breaker.record_success()  # already closed: no change

    # Then every change, and only the changes, were reported
    assert changes == [
        BreakerState.OPEN,
        BreakerState.PROBING,
        BreakerState.OPEN,
        BreakerState.PROBING,
        BreakerState.OPEN,
        BreakerState.PROBING,
        BreakerState.CLOSED,
    ]


@pytest.mark.parametrize("state", list(BreakerState))
def test_state_values_are_what_the_metric_exports(state: BreakerState) -> None:
    assert int(state) == {"CLOSED": 0, "OPEN": 1, "PROBING": 2}[state.name]
