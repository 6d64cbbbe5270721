"""The account verdict: a refusal of the caller judged by the answers to other calls."""

from typing import Any

from tests.unit.fake_clock import FakeClock
from worker.pipeline.account import AccountEvidence, AccountVerdict, EvidenceRules

ACCEPTED = AccountVerdict.ACCEPTED
UNDECIDED = AccountVerdict.UNDECIDED
SUSPECT = AccountVerdict.SUSPECT


def make_evidence(clock: FakeClock, **rules: Any) -> AccountEvidence:
    return AccountEvidence(EvidenceRules(**rules), clock)


def accept(evidence: AccountEvidence, clock: FakeClock, *conversations: str) -> None:
    """Have one call of each conversation, sent now, accepted; then move the clock on."""
    for conversation in conversations:
        evidence.record_accepted(conversation, clock.now)
        clock.now += 0.01


def refuse(evidence: AccountEvidence, clock: FakeClock, conversation: str) -> float:
    refused_at = evidence.record_refused(conversation)
    clock.now += 0.01
    return refused_at


def answer(evidence: AccountEvidence, clock: FakeClock, *conversations: str) -> None:
    """Answer one call of each conversation in turn: refused if its name starts with r."""
    for conversation in conversations:
        if conversation.startswith("r"):
            refuse(evidence, clock, conversation)
        else:
            accept(evidence, clock, conversation)


def trip(evidence: AccountEvidence, clock: FakeClock, *conversations: str) -> None:
    """Refuse one call of each conversation in a row: the account is then judged refused."""
    for conversation in conversations:
        refuse(evidence, clock, conversation)
    assert evidence.account_wide


def test_a_refusal_followed_by_accepted_calls_of_other_conversations_is_the_events_own() -> None:
    clock = FakeClock()
    evidence = make_evidence(clock)
    accept(evidence, clock, *[f"a{n}" for n in range(50)])

    refused_at = refuse(evidence, clock, "forbidden")
    assert evidence.judge("forbidden", refused_at) is UNDECIDED
    accept(evidence, clock, "b1", "b2")
    assert evidence.judge("forbidden", refused_at) is UNDECIDED
    accept(evidence, clock, "b3")

    assert evidence.judge("forbidden", refused_at) is ACCEPTED
    assert not evidence.account_wide


def test_calls_sent_before_the_refusal_prove_nothing_about_it() -> None:
    # Given a refusal at t, and calls sent before t whose acceptance is learnt only after it
    clock = FakeClock()
    evidence = make_evidence(clock)
    sent_before = clock.now
    refused_at = refuse(evidence, clock, "c1")
    for conversation in ("a", "b", "c"):
        evidence.record_accepted(conversation, sent_before)

    assert evidence.judge("c1", refused_at) is UNDECIDED


def test_accepted_calls_of_the_same_conversation_do_not_clear_it() -> None:
    clock = FakeClock()
    evidence = make_evidence(clock, accepted_after=1)
    refused_at = refuse(evidence, clock, "c1")

    accept(evidence, clock, "c1")

    assert evidence.judge("c1", refused_at) is UNDECIDED


def test_refusals_of_distinct_conversations_in_a_row_are_account_wide() -> None:
    # Given an account that worked for 200 calls
    clock = FakeClock()
    evidence = make_evidence(clock, streak=3)
    accept(evidence, clock, *[f"a{n}" for n in range(200)])

    # When three distinct conversations are refused in a row
    refused = [(c, refuse(evidence, clock, c)) for c in ("c1", "c2")]
    assert not evidence.account_wide
    refused.append(("c3", refuse(evidence, clock, "c3")))

    # Then every one of those refusals is the account's
    assert evidence.account_wide
    assert [evidence.judge(c, at) for c, at in refused] == [SUSPECT] * 3


def test_repeated_refusals_of_one_conversation_count_once() -> None:
    clock = FakeClock()
    evidence = make_evidence(clock, streak=3)

    for _ in range(10):
        refuse(evidence, clock, "c1")

    assert not evidence.account_wide


def test_a_flapping_account_is_judged_account_wide_by_its_share_of_refusals() -> None:
    # Given an account that refuses and accepts calls in turn (no streak of refusals)
    clock = FakeClock()
    evidence = make_evidence(clock, streak=3, share=0.5, accepted_after=3)
    refusals: list[tuple[str, float]] = []
    for n in range(3):
        refusals.append((f"r{n}", refuse(evidence, clock, f"r{n}")))
        if n < 2:
            assert not evidence.account_wide
            accept(evidence, clock, f"a{n}")

    # Then once three refusals are half the recent conversations, the account is judged
    # refused, and the refusals still undecided are held as the account's
    assert evidence.account_wide
    assert [evidence.judge(c, at) for c, at in refusals] == [SUSPECT] * 3


def test_a_flapping_account_cleared_by_an_accept_trips_again_on_the_next_refusals() -> None:
    clock = FakeClock()
    evidence = make_evidence(clock, streak=3, share=0.5)
    trip(evidence, clock, "r1", "r2", "r3")

    # When a call is accepted, the account is taken as working again
    accept(evidence, clock, "a1")
    assert not evidence.account_wide

    # And when refusals and accepts alternate again, it is judged refused again
    answer(evidence, clock, "r4", "a2", "r5", "a3", "r6")
    assert evidence.account_wide


def test_an_accepted_call_ends_the_account_wide_verdict_and_its_evidence() -> None:
    # Given an account judged refused, with a truly forbidden event among the held ones
    clock = FakeClock()
    evidence = make_evidence(clock, streak=3, accepted_after=3)
    trip(evidence, clock, "c1", "c2", "forbidden")

    # When a probe is accepted, then the forbidden event is refused again amid accepted calls
    accept(evidence, clock, "c1")
    refused_at = refuse(evidence, clock, "forbidden")
    accept(evidence, clock, "c2", "c3", "c4")

    # Then the old refusals do not judge it: it is that event's own
    assert not evidence.account_wide
    assert evidence.judge("forbidden", refused_at) is ACCEPTED


def test_an_answer_sent_before_the_verdict_does_not_end_it() -> None:
    # Given a call on its way when the account was judged refused
    clock = FakeClock()
    evidence = make_evidence(clock, streak=3)
    sent_before = clock.now
    clock.now += 0.01
    trip(evidence, clock, "c1", "c2", "c3")

    # When it is accepted afterwards, then the verdict stands; a call sent now ends it
    assert not evidence.record_accepted("late", sent_before)
    assert evidence.account_wide
    assert evidence.record_accepted("probe", clock.now)
    assert not evidence.account_wide


def test_a_lone_refusal_in_a_quiet_stream_is_decided_after_the_bound() -> None:
    clock = FakeClock(1000.0)
    evidence = make_evidence(clock, undecided_seconds=5.0)
    refused_at = evidence.record_refused("c1")

    clock.now = 1004.99
    assert evidence.judge("c1", refused_at) is UNDECIDED
    assert evidence.undecided_left(refused_at) > 0
    clock.now = 1005.0
    assert evidence.judge("c1", refused_at) is ACCEPTED


def test_old_answers_leave_the_share_after_the_memory() -> None:
    # Given two refusals long ago, among few conversations
    clock = FakeClock()
    evidence = make_evidence(clock, streak=3, share=0.5, memory_seconds=60.0)
    answer(evidence, clock, "r1", "a1", "r2", "a2")

    # When a third refusal comes after the memory, with accepted calls in between
    clock.now += 120.0
    accept(evidence, clock, "a3")
    refuse(evidence, clock, "r3")

    # Then the share counts only recent answers: not account-wide
    assert not evidence.account_wide


def test_the_window_keeps_only_the_most_recent_conversations() -> None:
    clock = FakeClock()
    evidence = make_evidence(clock, streak=3, share=0.5, window=4)
    answer(evidence, clock, "r1", "a1", "r2", "a2", "a3", "a4", "a5")  # r1, r2 fall out

    refuse(evidence, clock, "r3")

    assert not evidence.account_wide
