"""The in-memory ledger: an event is known by its message_id and its body, for a window."""

from worker.pipeline.dedupe import Fingerprint, MemoryLedger, Verdict


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_fingerprint_tells_the_body_apart_and_holds_no_content() -> None:
    one, same, other = (
        Fingerprint.of("id-1", b'{"Content":"+15550001"}'),
        Fingerprint.of("id-1", b'{"Content":"+15550001"}'),
        Fingerprint.of("id-1", b'{"Content":"+15550002"}'),
    )
    assert one == same
    assert one.id_digest == other.id_digest and one.event_digest != other.event_digest
    assert "15550001" not in repr(one)


def test_a_message_id_that_is_not_utf8_has_a_fingerprint() -> None:
    undecodable = b"id-\xff".decode("utf-8", "surrogateescape")
    assert Fingerprint.of(undecodable, b"{}") != Fingerprint.of("id-", b"{}")


async def test_the_same_event_is_delivered_another_with_its_id_is_a_reuse() -> None:
    ledger = MemoryLedger(window_seconds=60, clock=FakeClock())
    first, second = Fingerprint.of("x", b"first"), Fingerprint.of("x", b"second")
    assert await ledger.verdict(first) is Verdict.NEW
    await ledger.remember(first)
    assert await ledger.verdict(first) is Verdict.DELIVERED
    assert await ledger.verdict(second) is Verdict.REUSED_ID
    await ledger.remember(second)
    # Both stay known: the first one's redelivery after the second is still recognised.
    assert await ledger.verdict(first) is Verdict.DELIVERED
    assert await ledger.verdict(second) is Verdict.DELIVERED


async def test_entries_expire_after_the_window() -> None:
    clock = FakeClock()
    ledger = MemoryLedger(window_seconds=60, clock=clock)
    event = Fingerprint.of("x", b"body")
    await ledger.remember(event)
    clock.now += 59
    assert await ledger.verdict(event) is Verdict.DELIVERED
    clock.now += 2
    assert await ledger.verdict(event) is Verdict.NEW
    assert await ledger.verdict(Fingerprint.of("x", b"other")) is Verdict.NEW


async def test_the_oldest_entries_go_first_when_full() -> None:
    ledger = MemoryLedger(window_seconds=60, max_entries=2, clock=FakeClock())
    events = [Fingerprint.of(f"id-{n}", b"body") for n in range(3)]
    for event in events:
        await ledger.remember(event)
    assert [await ledger.verdict(event) for event in events] == [
        Verdict.NEW,
        Verdict.DELIVERED,
        Verdict.DELIVERED,
    ]
