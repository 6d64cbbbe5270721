"""Judge a refusal of the caller by what other calls show: the event's own, or the account's.

An AccessDenied or credentials error says nothing by itself about whether the event or the
whole account is refused. Other calls do (as MassTransit's kill switch and Google SRE's
client-side throttling judge by the share of failures over a window of recent requests):

- account-wide, when the last `streak` distinct conversations answered were all refused, or
  when at least `streak` of the recent conversations were and they make at least `share` of
  them (a flapping account);
- the event's own, when calls of `accepted_after` other conversations, sent after the refusal
  came back, were accepted; or when `undecided_seconds` pass without other evidence (a quiet
  stream still decides);
- undecided otherwise: the event is held, not charged.

An accepted call sent after the verdict ends it and wipes the evidence before it: the account
works again, and the refusals of the outage must not judge the calls that follow. One sent
before (an answer that was still on its way) says nothing about the account now.
Pure: no I/O, no asyncio; the clock is injected.
"""

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class AccountVerdict(Enum):
    """What the evidence says about a refusal of the caller."""

    ACCEPTED = "accepted"
    """Other calls get past authentication: the refusal concerns that event alone."""
    UNDECIDED = "undecided"
    """Not enough evidence yet: the event is held, not charged."""
    SUSPECT = "suspect"
    """Refusals across conversations: the account is refused, every event is held."""


@dataclass(frozen=True)
class EvidenceRules:
    """The thresholds of the verdict; `streak` is the worker's `account_threshold`."""

    streak: int = 3
    share: float = 0.5
    accepted_after: int = 3
    window: int = 20
    memory_seconds: float = 60.0
    undecided_seconds: float = 5.0


@dataclass(frozen=True)
class _Answer:
    """The latest answer for one conversation: refused or not, and when."""

    refused: bool
    at: float


class AccountEvidence:
    """Remember the latest answer of recent conversations; judge refusals from them."""

    def __init__(self, rules: EvidenceRules, clock: Callable[[], float] = time.monotonic) -> None:
        self.rules = rules
        self._clock = clock
        self._latest: OrderedDict[str, _Answer] = OrderedDict()
        self._refused_in_a_row: set[str] = set()
        self._account_wide = False
        self._judged_wide_at = -float("inf")

    @property
    def account_wide(self) -> bool:
        """Return True while the refusals look account-wide (until a call is accepted)."""
        return self._account_wide

    def record_refused(self, conversation: str) -> float:
        """Note a refusal answered now; return its time, the key of its judgement."""
        now = self._clock()
        self._remember(conversation, _Answer(refused=True, at=now))
        self._refused_in_a_row.add(conversation)
        if not self._account_wide and self._looks_account_wide(now):
            self._account_wide = True
            self._judged_wide_at = now
        return now

    def record_accepted(self, conversation: str, sent_at: float) -> bool:
        """Note a call, sent at `sent_at`, that got past authentication.

        Return False when it cannot end an account-wide verdict: it was sent before it.
        """
        if self._account_wide:
            if sent_at < self._judged_wide_at:
                self._remember(conversation, _Answer(refused=False, at=sent_at))
                return False
            # The account works again: the outage's refusals must not judge what follows.
            self._latest.clear()
            self._account_wide = False
        self._refused_in_a_row.clear()
        self._remember(conversation, _Answer(refused=False, at=sent_at))
        return True

    def judge(self, conversation: str, refused_at: float) -> AccountVerdict:
        """Judge the refusal of `conversation` answered at `refused_at`, on today's evidence."""
        if self._account_wide:
            return AccountVerdict.SUSPECT
        if self._accepted_since(refused_at, conversation) >= self.rules.accepted_after:
            return AccountVerdict.ACCEPTED
        if self.undecided_left(refused_at) <= 0:
            return AccountVerdict.ACCEPTED
        return AccountVerdict.UNDECIDED

    def undecided_left(self, refused_at: float) -> float:
        """Return how long a refusal answered at `refused_at` may still stay undecided."""
        return refused_at + self.rules.undecided_seconds - self._clock()

    def _remember(self, conversation: str, answer: _Answer) -> None:
        """Keep the latest answer of the `window` most recent conversations."""
        self._latest[conversation] = answer
        self._latest.move_to_end(conversation)
        while len(self._latest) > self.rules.window:
            self._latest.popitem(last=False)

    def _looks_account_wide(self, now: float) -> bool:
        """Apply the streak and share rules to the recent answers."""
        streak = self.rules.streak
        if len(self._refused_in_a_row) >= streak:
            return True
        recent = [a for a in self._latest.values() if now - a.at <= self.rules.memory_seconds]
        refused = sum(a.refused for a in recent)
        return refused >= streak and refused >= self.rules.share * len(recent)

    def _accepted_since(self, refused_at: float, conversation: str) -> int:
        """Count other conversations with a call sent after `refused_at` and accepted."""
        return sum(
            not a.refused and a.at > refused_at
            for other, a in self._latest.items()
            if other != conversation
        )
